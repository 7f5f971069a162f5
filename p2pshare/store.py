"""A download's disk side: the temporary file, streamed writes, piece verification, resume, the
whole-file check.

Bytes arrive from the connections as *segments* (a slice of a received buffer,
never copied): each belongs to one piece, in order within that piece.  The
reactor thread only queues them; one worker job at a time (the hashes, ``pwritev``
and ``preadv`` release the GIL, so the reactor keeps receiving meanwhile) takes
everything queued, feeds each piece's hash (BLAKE3 or SHA-256, the manifest's kind)
and writes the bytes at their offset.  A piece's bytes are thus hashed once, as they are written, and the
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

import hashlib
import os
import time
from collections import deque
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
        self.manifest: Optional[bytes] = None
        self.have = bytearray(self.count)
        self.settled: Deferred[None] = Deferred()  # fires once no worker job uses the file any more
        self.queued = 0  # bytes queued for the worker and not yet written
        self._queue: deque[Segment] = deque()
        self._busy = False
        self._closing: Optional[str] = None  # set at the end: "keep" (the verified pieces), "discard" or "placed"
        self._saved_at = 0.0
        # Worker-side state: only touched by the job running (one at a time).
        self._hashers: dict[tuple[int, int], Any] = {}
        self._copies: dict[tuple[int, int], list[memoryview]] = {}
        self._done: set[int] = set()  # pieces verified (or, without a manifest, written) by the worker
        self.tmp_path, self.have_path, self._file = self._open()
        self._done.update(i for i in range(self.count) if self.have[i])

    # -- the temporary file and its record ------------------------------------------------

    def _open(self) -> tuple[Path, Path, IO[bytes]]:
        """The temporary file, reusing the verified pieces of an earlier attempt when there are some."""
        tmp, have = self.shares.tmp / f"{self.sha256}.part", self.shares.tmp / f"{self.sha256}.have"
        if self.sha256 in self.shares.downloading:  # another download of this content: no sharing a file
            tmp, f = self.shares.new_temporary()
            return tmp, tmp.with_suffix(".have"), f
        self.shares.downloading.add(self.sha256)
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
        if self.manifest is None or (not now and time.monotonic() - self._saved_at < SAVE_EVERY):
            return
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
            self._close_now()
            return
        if not self._queue:
            return
        batch, self._queue = list(self._queue), deque()
        self._busy = True
        self.executor(self._work, batch).addCallbacks(self._worked, self._failed, (batch,), errbackArgs=(batch,))

    def _work(self, batch: list[Segment]) -> list[tuple[Hashable, int, bool]]:
        """In the worker: hash and write *batch*, in order; the pieces whose last byte came, checked."""
        fd, manifest = self._file.fileno(), self.manifest
        results: list[tuple[Hashable, int, bool]] = []
        run: list[memoryview] = []
        run_at = run_end = 0

        def flush() -> None:
            nonlocal run
            if run:
                _pwritev_all(fd, run, run_at)
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
                        _pwritev_all(fd, copy, s.index * self.piece_size)
                    self._done.add(s.index)
                results.append((s.source, s.index, good))
        flush()
        return results

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
        return self._busy or bool(self._queue)

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
            if not self._busy:
                self._close_now()
        return self.settled

    def detach_file(self) -> Path:
        """The download is verified: close the file (no job runs) and hand its path over for placing;
        ``release`` once it is placed."""
        assert not self.busy
        self._closing = "placed"
        self._file.close()
        return self.tmp_path

    def _close_now(self) -> None:
        if self.settled.called or self._closing == "placed":
            return
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
