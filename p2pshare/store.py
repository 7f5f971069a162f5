"""A download's disk side: the temporary file, streamed writes, piece verification, resume, the
whole-file check.

Bytes arrive from the connections as *segments* (a slice of a received buffer,
never copied): each belongs to one piece, in order within that piece.  The
reactor thread only queues them; one worker job at a time (the hashes, ``pwritev``
and ``preadv`` release the GIL, so the reactor keeps receiving meanwhile) takes
everything queued, feeds each piece's hash (BLAKE3 or SHA-256, the manifest's kind)
and writes the bytes at their offset (``FileWriter``: straight to the disk with ``O_DIRECT``, not
through the page cache, where the file system allows it).  A piece's bytes are thus hashed once, as they are written, and the
piece is checked against the manifest when its last byte is in.  One copy of a
piece writes (its *writer*, the first source to start it); an endgame copy from
another source is hashed and kept in memory, and written only if it is
verified first.  A piece whose copy does not verify is simply fetched again
(its bytes on disk are never served or trusted: only the record of verified
pieces is).

The verified pieces are recorded beside the temporary file
(``<sha256>.part`` and ``<sha256>.have``), at most once a ``SAVE_EVERY``, so a
download that stops resumes from them.  The SHA-256 of the whole file is
computed (reading the file back) only when the fetch asked for that content
hash, or when the file came without a manifest: see docs/protocol.md section
4.7 for what is verified against what.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Hashable, Optional

from attrs import define
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pshare.shares import Shares, piece_hasher, root_matches

SAVE_EVERY = 1.0  # seconds between updates of the record of verified pieces
SMALL = 256 * 1024  # files up to this size are written and hashed on the reactor thread
READ_BACK = 1024 * 1024  # bytes read at a time for the whole-file hash
WRITE_RUN = 2 * 1024 * 1024  # bytes hashed before they are written
BATCH = 256 * 1024  # bytes queued before a worker job starts, unless a piece is complete
ALIGN = 4096  # direct writes: file offsets, lengths and memory in multiples of this
DIRECT_CHUNK = 1024 * 1024  # the aligned buffers direct writes go through
DIRECT_BUFFERS = 3  # of them: while one is filled, the others are written

Executor = Callable[..., "Deferred[Any]"]


def in_thread(reactor: Any = None) -> Executor:
    """Run blocking calls in *reactor*'s thread pool."""
    from twisted.internet.threads import deferToThreadPool

    if reactor is None:
        from twisted.internet import reactor
    return lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def synchronously(f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """An executor for tests: run the call at once on this thread."""
    return maybeDeferred(f, *args)


@define
class Segment:
    """Bytes of one piece from one source, at *offset* in the file; *first*/*last*: the piece's
    first/last byte is in it; *write*: this copy is the piece's writer (else an endgame copy)."""

    source: Hashable
    index: int
    offset: int
    data: memoryview
    first: bool
    last: bool
    write: bool


def digests_match(digest: bytes, manifest: Optional[bytes], index: int) -> bool:
    return manifest is None or digest == manifest[32 * index: 32 * index + 32]


class PieceStore:
    """The temporary file of one download and the worker that writes and verifies it."""

    log = Logger()

    def __init__(self, shares: Shares, sha256: str, size: int, piece_size: int, root: str,
                 executor: Executor, on_checked: Callable[[Hashable, int, bool], None]) -> None:
        self.shares, self.sha256, self.size, self.piece_size, self.root = shares, sha256, size, piece_size, root
        self.count = -(-size // piece_size) if size else 0
        self.executor = executor if size > SMALL else synchronously
        self.on_checked = on_checked
        self.on_error: Callable[[BaseException], None] = lambda e: None
        self.on_written: Callable[[], None] = lambda: None  # after each worker job
        self.manifest: Optional[bytes] = None
        self.have = bytearray(self.count)
        self.settled: Deferred[None] = Deferred()  # fires once no worker job uses the file any more
        self.queued = 0  # bytes queued for the worker and not yet written
        self._queue: deque[Segment] = deque()
        self._busy = False
        self._quiet: list[Deferred[None]] = []  # fired once no job runs or waits to run
        self._closing: Optional[str] = None  # set at the end: "keep" (the verified pieces), "discard" or "placed"
        self._saved_at = 0.0
        # Worker-side state: only touched by the job running (one at a time).
        self._hashers: dict[tuple[int, int], Any] = {}
        self._copies: dict[tuple[int, int], list[memoryview]] = {}
        self._done: set[int] = set()  # pieces verified (or, without a manifest, written) by the worker
        # The checks of the last job, held until its writes are done: the next job reports them (or a
        # job of its own once nothing else is queued), so that no job waits for its own writes.
        self._held: Optional[tuple[list[tuple[Hashable, int, bool]], list[Future[None]]]] = None
        self.tmp_path, self.have_path, self._file = self._open()
        self._done.update(i for i in range(self.count) if self.have[i])
        self._writer = FileWriter(self.tmp_path, self._file.fileno(), size, direct=size > SMALL)

    # -- the temporary file and its record ------------------------------------------------

    def _open(self) -> tuple[Path, Path, IO[bytes]]:
        """The temporary file, reusing the verified pieces of an earlier attempt when there are some."""
        tmp, have = self.shares.tmp / f"{self.sha256}.part", self.shares.tmp / f"{self.sha256}.have"
        if self.sha256 in self.shares.downloading:  # another download of this content: no sharing a file
            tmp, f = self.shares.new_temporary()
            return tmp, tmp.with_suffix(".have"), f
        self.shares.downloading.add(self.sha256)
        if self.count <= 1:  # one piece: no record of pieces is ever kept, nothing to resume
            return tmp, have, self.shares.temporary(tmp)
        try:
            state = have.read_text().split()
            if self.root and state[:3] == [str(self.size), str(self.piece_size), self.root]:
                pieces, bits = bytes.fromhex(state[3]), bytes.fromhex(state[4])
                if root_matches(pieces, self.root) and len(bits) == self.count:
                    self.manifest, self.have = pieces, bytearray(bits)
                    return tmp, have, open(tmp, "r+b")
        except (OSError, ValueError, IndexError):
            pass
        have.unlink(missing_ok=True)
        return tmp, have, self.shares.temporary(tmp)

    def set_manifest(self, pieces: bytes) -> bool:
        """The holder's manifest: accepted only if it hashes to the root and fits the size."""
        if len(pieces) != 32 * self.count or not root_matches(pieces, self.root):
            return False
        self.manifest = pieces
        return True

    def save(self, now: bool = True) -> None:
        """Record the verified pieces (at most once a SAVE_EVERY unless *now*): a resume trusts only these."""
        if self.manifest is None or self.count <= 1 or (not now and time.monotonic() - self._saved_at < SAVE_EVERY):
            return  # (a file of one piece is verified whole or not at all: nothing to resume)
        self._saved_at = time.monotonic()
        self.have_path.write_text(f"{self.size} {self.piece_size} {self.root} {self.manifest.hex()} "
                                  f"{bytes(self.have).hex()}\n")

    # -- writing --------------------------------------------------------------------------

    def write(self, segment: Segment) -> None:
        """Queue *segment* for the worker."""
        if self._closing is not None:
            return
        self._queue.append(segment)
        self.queued += len(segment.data)
        # A worker job costs a thread hand-off: on a slow link, where each read brings a few KiB,
        # bytes wait until there are BATCH of them or a piece is complete (so that it is checked
        # and announced at once).
        if segment.last or self.queued >= BATCH:
            self._pump()

    def _pump(self) -> None:
        if self._busy:
            return
        if self._closing is not None:
            self._held = None  # nothing is reported any more; closing the writer waits for its writes
            self._close_now()
            return
        if not self._queue and self._held is None:
            quiet, self._quiet = self._quiet, []
            for d in quiet:
                d.callback(None)
            return
        batch, self._queue = list(self._queue), deque()
        self._busy = True
        self.executor(self._work, batch).addCallbacks(self._worked, self._failed, (batch,), errbackArgs=(batch,))

    def _work(self, batch: list[Segment]) -> list[tuple[Hashable, int, bool]]:
        """In the worker: hash and write *batch*, in order; the pieces whose last byte came, checked, as
        soon as their bytes are in the file (those of the job before included)."""
        held, self._held = self._held, None
        write, manifest = self._writer.write, self.manifest
        results: list[tuple[Hashable, int, bool]] = []
        run: list[memoryview] = []
        run_at = run_end = 0

        def flush() -> None:
            nonlocal run
            if run:
                write(run, run_at)
                run = []

        for s in batch:
            key = (id(s.source), s.index)
            if s.first:
                self._hashers[key] = piece_hasher(self.root)
                if not s.write:
                    self._copies[key] = []
            hasher = self._hashers.get(key)
            if hasher is None or s.index in self._done:
                # a late copy of a piece already in, or the tail of an abandoned one
                if s.last:
                    self._hashers.pop(key, None)
                    self._copies.pop(key, None)
                continue
            if manifest is not None:
                hasher.update(s.data)
            if s.write:  # in runs of at most WRITE_RUN bytes, written while the hash has left them in cache
                if run and run_end == s.offset and run_end - run_at < WRITE_RUN:
                    run.append(s.data)
                else:
                    flush()
                    run, run_at = [s.data], s.offset
                run_end = s.offset + len(s.data)
            else:
                self._copies[key].append(s.data)
            if s.last:
                del self._hashers[key]
                good = digests_match(hasher.digest(), manifest, s.index)
                copy = self._copies.pop(key, None)
                if good:
                    flush()
                    if copy is not None:  # an endgame copy that came in first: it is the one written
                        write(copy, s.index * self.piece_size)
                    self._done.add(s.index)
                results.append((s.source, s.index, good))
        flush()
        # A piece is reported only once its bytes are in the file.  This job's writes are left under
        # way when there are more bytes to come: the next job hashes while the disk finishes them.
        reported: list[tuple[Hashable, int, bool]] = []
        if held is not None:
            wait_for_writes(held[1])
            reported = held[0]
        writes = self._writer.under_way()
        if batch and not all(w.done() for w in writes):
            self._held = (results, writes)
            return reported
        wait_for_writes(writes)
        return reported + results

    def _worked(self, results: list[tuple[Hashable, int, bool]], batch: list[Segment]) -> None:
        self._busy = False
        self.queued -= sum(len(s.data) for s in batch)
        if self._closing is None:
            for source, index, good in results:
                self.on_checked(source, index, good)  # which marks the piece in ``have`` when it is new
                if self._closing is not None:  # that finished or failed the download
                    break
            else:
                try:
                    if any(good for _, _, good in results):
                        self.save(now=False)
                except OSError as e:
                    self.on_error(e)
            if self._closing is None:
                self.on_written()
        self._pump()

    def _failed(self, f: Failure, batch: list[Segment]) -> None:
        self._busy = False
        self.queued -= sum(len(s.data) for s in batch)
        if self._closing is None:
            self.on_error(f.value)
        self._pump()

    # -- the end --------------------------------------------------------------------------

    def whole_sha256(self) -> Deferred[str]:
        """The SHA-256 of the whole temporary file, read back in the worker (once the queue is empty)."""
        assert not self._busy and not self._queue
        self._busy = True

        def read_back() -> str:
            h, buf = hashlib.sha256(), bytearray(READ_BACK)
            view, fd, offset = memoryview(buf), self._file.fileno(), 0
            while offset < self.size:
                n = os.preadv(fd, [view[: min(READ_BACK, self.size - offset)]], offset)
                if n <= 0:
                    break
                h.update(view[:n])
                offset += n
            return h.hexdigest()

        def done(result: Any) -> Any:
            self._busy = False
            if self._closing is not None:
                self._close_now()
            return result

        return self.executor(read_back).addBoth(done)

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._queue) or self._held is not None

    def when_quiet(self) -> Deferred[None]:
        """Fires once no worker job runs or waits to run, and every check made is reported."""
        d: Deferred[None] = Deferred()
        if self.busy:
            self._quiet.append(d)
        else:
            d.callback(None)
        return d

    def drop_queued(self) -> None:
        """Forget the bytes waiting for the worker (late copies of pieces already verified)."""
        self.queued -= sum(len(s.data) for s in self._queue)
        self._queue.clear()

    def close(self, keep: bool) -> Deferred[None]:
        """Stop: once no worker job runs, close the file and remove it (or, with *keep*, keep it and the
        record of its verified pieces for a resume).  Fires ``settled``."""
        if self._closing is None:
            self._closing = "keep" if keep and self.manifest is not None and any(self.have) else "discard"
            self.drop_queued()
            self._pump()  # closes now, or once the job running is done
        return self.settled

    def detach_file(self) -> Path:
        """The download is verified: close the file (no job runs) and hand its path over for placing;
        ``release`` once it is placed."""
        assert not self.busy
        self._closing = "placed"
        self._writer.close()
        self._file.close()
        return self.tmp_path

    def _close_now(self) -> None:
        if self.settled.called or self._closing == "placed":
            return
        self._writer.close()
        if not self._file.closed:
            self._file.close()
        if self._closing == "keep":
            self.save()
        else:
            self.tmp_path.unlink(missing_ok=True)
            self.have_path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """The temporary file is no longer ours (placed, or given up): let another download take its name."""
        if self.tmp_path.name == f"{self.sha256}.part":
            self.shares.downloading.discard(self.sha256)
        if not self.settled.called:
            self.settled.callback(None)


class FileWriter:
    """Writes a download's bytes into its temporary file, with ``O_DIRECT`` when *direct*: from an
    aligned buffer straight to the disk, not through the page cache.

    A download is written once and read again only when it is served or hashed whole, so its pages
    in the page cache buy nothing while it arrives; copying into them cost 0.2 CPU-s per GiB at best
    and, where new memory is expensive to the kernel (a virtual machine whose balloon returns freed
    pages to the host), over 2 (docs/performance.md, "1 transfer").  Direct writes must start, end
    and sit in memory on ``ALIGN`` boundaries: the bytes are copied into an aligned buffer (a copy in
    cache, about 0.1 s per GiB), whole blocks are written, and the few bytes of a run that end in the
    middle of a block wait (``_heads``, by the offset they end at) for the next run of the same piece,
    which starts there.  Pieces start and end on block boundaries (their size is a multiple of 1 MiB)
    except at the end of the file, whose last partial block goes through the page cache.  A file
    system that refuses ``O_DIRECT`` (tmpfs, some network file systems) or a write it does not take
    (``EINVAL``: other alignments) gets ordinary writes from then on, the heads waiting included.
    Only the worker job running calls ``write``.
    """

    def __init__(self, path: Path, fd: int, size: int, direct: bool) -> None:
        self.fd, self.size = fd, size  # fd: the file opened as usual (the tail, and the fallback)
        self.direct_fd: Optional[int] = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                pass
        self._heads: dict[int, tuple[int, bytes]] = {}  # end offset -> (offset, bytes) not written yet
        # The disk works while the worker hashes and copies the next bytes: DIRECT_BUFFERS aligned
        # buffers in turn, written by DIRECT_BUFFERS - 1 threads, each filled again once its write is done.
        self._buffers: list[memoryview] = []
        self._writes: list[Optional[Future[None]]] = []
        self._next = 0
        self._thread: Optional[ThreadPoolExecutor] = None
        self._refused = False  # a direct write was refused (EINVAL): ordinary writes from now on

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None and not self._refused

    def write(self, views: list[memoryview], offset: int) -> None:
        """Write the contiguous *views* at *offset* (with direct writes, maybe still under way: ``drain``)."""
        if self._refused:
            self._stop_direct()
        head = self._heads.pop(offset, None)
        if head is not None:
            offset, data = head[0], head[1]
            views = [memoryview(data), *views]
        if self.direct_fd is None:
            return _pwritev_all(self.fd, views, offset)
        buffer, fill = self._buffer(), 0
        for view in views:
            while view:
                n = min(len(view), DIRECT_CHUNK - fill)
                buffer[fill:fill + n] = view[:n]
                fill, view = fill + n, view[n:]
                if fill == DIRECT_CHUNK:
                    self._submit(buffer, offset)
                    buffer, offset, fill = self._buffer(), offset + fill, 0
        whole = fill - fill % ALIGN
        if fill > whole:  # part of a block: the file's end, or bytes the next run of this piece follows
            if offset + fill == self.size:
                _pwritev_all(self.fd, [buffer[whole:fill]], offset + whole)
            else:
                self._heads[offset + fill] = (offset + whole, bytes(buffer[whole:fill]))
        if whole:
            self._submit(buffer[:whole], offset)

    def under_way(self) -> list[Future[None]]:
        """The writes submitted since their buffers were last reused, done or not."""
        return [w for w in self._writes if w is not None]

    def drain(self) -> None:
        """Wait until every write has reached the file; raises the first error a write raised."""
        error: Optional[BaseException] = None
        for i, done in enumerate(self._writes):
            if done is not None:
                self._writes[i] = None
                error = error or done.exception()
        if error is not None:
            raise error

    def _buffer(self) -> memoryview:
        """The next aligned buffer, once its last write is done (one is filled while the others are written)."""
        if not self._buffers:
            self._buffers = [memoryview(mmap.mmap(-1, DIRECT_CHUNK)) for _ in range(DIRECT_BUFFERS)]  # page aligned
            self._writes = [None] * DIRECT_BUFFERS
            self._thread = ThreadPoolExecutor(DIRECT_BUFFERS - 1, thread_name_prefix="p2pshare-direct")
        i = self._next
        done = self._writes[i]
        if done is not None:
            self._writes[i] = None
            done.result()
        return self._buffers[i]

    def _submit(self, data: memoryview, offset: int) -> None:
        assert self._thread is not None
        self._writes[self._next] = self._thread.submit(self._direct, data, offset)
        self._next = (self._next + 1) % len(self._buffers)

    def _direct(self, data: memoryview, offset: int) -> None:
        n = 0
        if not self._refused:
            assert self.direct_fd is not None
            try:
                n = os.pwritev(self.direct_fd, [data], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._refused = True  # the file system wants other alignments, or no direct writes
        if n < len(data):
            _pwritev_all(self.fd, [data[n:]], offset + n)

    def _stop_direct(self) -> None:
        self.close()
        for at, (start, head) in list(self._heads.items()):
            del self._heads[at]
            _pwritev_all(self.fd, [memoryview(head)], start)

    def close(self) -> None:
        """Wait for the writes under way, then let go of the direct descriptor and the thread.  A write
        that failed here concerned no piece reported (the job that made it failed): nothing to raise."""
        try:
            self.drain()
        except OSError:
            pass
        finally:
            if self._thread is not None:
                self._thread.shutdown()
                self._thread = None
            self._buffers, self._writes = [], []
            if self.direct_fd is not None:
                os.close(self.direct_fd)
                self.direct_fd = None


def wait_for_writes(writes: list[Future[None]]) -> None:
    """Block until *writes* are done; raises the first error one of them raised."""
    for w in writes:
        w.result()


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write *buffers* at *offset*, however many calls it takes."""
    while buffers:
        n = os.pwritev(fd, buffers, offset)
        offset += n
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers = buffers[1:]
        if n:
            buffers = [buffers[0][n:]] + buffers[1:]
