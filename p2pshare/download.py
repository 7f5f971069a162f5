"""The requester's side of one file: pieces from one or more sources, verified, resumable.

A ``Download`` hands out pieces to the connections that feed it (its
*sources*): each asks ``claim`` for the next piece its holder has, and gives
the bytes back with ``deliver``.  Verifying (SHA-256 per piece against the
manifest, itself checked against the ``root`` the offer named) and writing
(``pwrite`` at the piece's offset) run in a worker thread, one piece at a time,
while the reactor keeps receiving: hashlib and file writes release the GIL.
A bad piece goes back to the pool and its source is reported.  When more than
``HIGH_WATER`` bytes wait for the disk, every source is paused until the
backlog falls under ``LOW_WATER``.

A source is asked for one piece at a time.  With a single holder, in order
(the first missing piece), so the whole-file hash keeps up from memory.  Once
the download is ``swarming`` (other peers hold or fetch the same content), at
random over the whole file among the pieces the source has that score best
(the caller's ``rank``: from a partial holder the rarest among our sources, from
a complete holder those no partial source of ours has): peers fetching one file
at once then hold different pieces early and trade them (see
``watchers``: a peer serves the pieces it has verified while it downloads).
When the missing pieces are all claimed, the last ones may be claimed a second
time by another source (endgame), so one slow source does not hold the end
back.  The verified pieces are recorded beside the temporary file
(``<sha256>.part`` and ``<sha256>.have`` in the state folder): a download that
stops resumes from them.  The file is moved into place only when the SHA-256
of the whole matches too.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections import Counter, deque
from pathlib import Path
from typing import IO, Any, Callable, Optional, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pshare.errors import TransferFailed, VerificationFailed
from p2pshare.shares import Entry, Shares

RANGE = 16 * 1024 * 1024  # the piece size of a file offered without a manifest
CLAIM = 16 * 1024 * 1024  # bytes of consecutive pieces one request may cover
SAVE_EVERY = 1.0  # seconds between updates of the record of verified pieces
HIGH_WATER = 32 * 1024 * 1024  # pause the sources above this backlog
LOW_WATER = 8 * 1024 * 1024  # and resume them below this
SMALL = 256 * 1024  # files up to this size are written and hashed on the reactor thread
ENDGAME_COPIES = 2  # sources that may fetch one piece at once, at the end
RANDOM_START = 2  # first pieces picked at random even with one holder: peers starting together differ
WHOLE_AHEAD = 16 * 1024 * 1024  # bytes of pieces kept in memory, out of order, for the whole-file hash

Executor = Callable[..., "Deferred[Any]"]


class Source(Protocol):
    """What a download needs of a connection feeding it."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def download_finished(self) -> None:
        """Every piece is in: say goodbye."""

    def bad_piece(self, index: int) -> None:
        """A piece this source sent did not match the manifest."""

    def more(self) -> None:
        """Pieces changed hands (one verified, a source gone): claim again if there is room."""


def in_thread(reactor: Any = None) -> Executor:
    """Run blocking calls in *reactor*'s thread pool."""
    from twisted.internet.threads import deferToThreadPool

    if reactor is None:
        from twisted.internet import reactor
    return lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def synchronously(f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """An executor for tests: run the call at once on this thread."""
    return maybeDeferred(f, *args)


class Download:
    """One file being received into the state folder; ``done`` fires with its final path."""

    log = Logger()

    def __init__(self, shares: Shares, name: str, size: int, sha256: str,
                 progress: Callable[[int, int], None] = lambda got, size: None,
                 executor: Optional[Executor] = None, piece_size: int = 0, root: str = "") -> None:
        self.shares, self.name, self.size, self.sha256 = shares, name, size, sha256
        self.progress = progress
        self.executor = executor or in_thread()
        self.root = root if piece_size and root else ""
        self.piece_size = piece_size if self.root else RANGE
        self.count = -(-size // self.piece_size)
        self.pieces: Optional[bytes] = None  # the manifest, once received and checked against root
        self.done: Deferred[Path] = Deferred()
        self.settled: Deferred[None] = Deferred()  # fires once the worker has let go of the file
        self.sources: set[Any] = set()
        self.have = bytearray(self.count)  # 1: written and verified
        self._claims: dict[int, set[Any]] = {}
        self._checking: Counter[int] = Counter()  # pieces received and waiting to be verified: copies of each
        self._queue: deque[tuple[Any, int, list[bytes]]] = deque()
        self._queued_bytes = 0
        self._writing = False
        self._paused = False
        self._finishing = False
        self._ended = False
        self._keep = False
        self._hash = hashlib.sha256()
        self._whole_next = 0  # pieces from the start hashed into the whole-file hash
        self._whole_mem: dict[int, list[bytes]] = {}  # received pieces at or just after _whole_next
        self._whole_busy = False
        self._whole_spoilt = False
        self._low = 0  # no missing piece before this one
        self._saved_at = 0.0
        self.rng = random.Random()
        self.watchers: set[Any] = set()  # connections serving this download's verified pieces to others
        self.swarming = False  # other peers hold or fetch this content: pick pieces at random
        self._claimed = 0  # pieces handed out so far
        if self.root and self.count == 1:
            # One piece: its digest is the file's SHA-256, so the manifest needs no round trip.
            self.set_manifest(bytes.fromhex(sha256))
        self.tmp_path, self.have_path, self._file = self._open()
        self.resumed_from = self.verified = sum(self._length(i) for i in range(self.count) if self.have[i])
        self.received = self.verified

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
                if hashlib.sha256(pieces).hexdigest() == self.root and len(bits) == self.count:
                    self.pieces, self.have = pieces, bytearray(bits)
                    return tmp, have, open(tmp, "r+b")
        except (OSError, ValueError, IndexError):
            pass
        have.unlink(missing_ok=True)
        return tmp, have, open(tmp, "w+b")

    def _save_state(self, now: bool = True) -> None:
        """Record the verified pieces (at most once a SAVE_EVERY unless *now*): a resume trusts only these."""
        if self.pieces is None or (not now and time.monotonic() - self._saved_at < SAVE_EVERY):
            return
        self._saved_at = time.monotonic()
        self.have_path.write_text(f"{self.size} {self.piece_size} {self.root} {self.pieces.hex()} "
                                  f"{bytes(self.have).hex()}\n")

    # -- sources and pieces ---------------------------------------------------------------

    def entry(self) -> Entry:
        """This download as a shared file, to serve its verified pieces (it needs the manifest)."""
        assert self.pieces is not None
        return Entry(self.name, self.size, 0, self.sha256, self.piece_size, self.pieces)

    @property
    def needs_manifest(self) -> bool:
        return bool(self.root) and self.pieces is None and self.size > 0

    def set_manifest(self, pieces: bytes) -> bool:
        """The holder's manifest: accepted only if it hashes to the offer's root and fits the size."""
        if len(pieces) != 32 * self.count or hashlib.sha256(pieces).hexdigest() != self.root:
            return False
        self.pieces = pieces
        return True

    def attach(self, source: Any) -> None:
        self.sources.add(source)
        if self._paused:
            source.pauseProducing()

    def detach(self, source: Any) -> None:
        """A source went away: its claims go back to the pool."""
        self.sources.discard(source)
        for claimants in self._claims.values():
            claimants.discard(source)
        self._kick()

    def _kick(self) -> None:
        for source in list(self.sources):
            source.more()

    @property
    def missing(self) -> int:
        """Pieces not verified yet."""
        return self.have.count(0)

    def _length(self, index: int) -> int:
        return min(self.piece_size, self.size - index * self.piece_size)

    def claim(self, source: Any, has: Callable[[int], bool] = lambda i: True,
              rank: Callable[[int], int] = lambda i: 0) -> Optional[tuple[int, int]]:
        """The next range for *source* to fetch, as (offset, length), among the pieces it *has*.

        With a manifest: one piece nobody has claimed, the first one, or when
        ``swarming`` one at random among those of the lowest *rank*.  Without: up to
        CLAIM bytes of consecutive pieces.  Else (endgame) one piece another source
        is already fetching.  None when there is nothing for it.
        """
        if self._ended or (self.root and self.pieces is None):
            return None
        if self.pieces is not None and self.count > 1:
            return self._claim_piece(source, has, rank)
        spare = None
        for index in range(self._first_missing, self.count):
            if self.have[index] or not has(index):
                continue
            claimants = self._claims.setdefault(index, set())
            if not claimants:
                end = index
                while (end + 1 < self.count and (end + 1 - index) * self.piece_size < CLAIM
                       and not self.have[end + 1] and not self._claims.get(end + 1) and has(end + 1)):
                    end += 1
                for i in range(index, end + 1):
                    self._claims.setdefault(i, set()).add(source)
                return index * self.piece_size, sum(self._length(i) for i in range(index, end + 1))
            if spare is None and source not in claimants and len(claimants) < ENDGAME_COPIES:
                spare = index
        if spare is None:
            return None
        self._claims[spare].add(source)  # endgame: every missing piece is claimed; ask again elsewhere
        return spare * self.piece_size, self._length(spare)

    def _claim_piece(self, source: Any, has: Callable[[int], bool],
                     rank: Callable[[int], int]) -> Optional[tuple[int, int]]:
        free: list[int] = []
        spare = None
        for index in range(self._first_missing, self.count):
            if self.have[index] or index in self._checking or not has(index):
                continue
            claimants = self._claims.get(index)
            if not claimants:
                free.append(index)
                if not self.swarming and self._claimed >= RANDOM_START:
                    break
            elif spare is None and source not in claimants and len(claimants) < ENDGAME_COPIES:
                spare = index
        if free:
            ranks = [rank(i) for i in free]
            best = min(ranks)
            index = self.rng.choice([i for i, r in zip(free, ranks) if r == best])
        elif spare is not None and self.have.count(0) <= max(ENDGAME_COPIES, len(self.sources)):
            index = spare  # endgame: only the last few pieces, or every source would fetch copies
        else:
            return None
        self._claims.setdefault(index, set()).add(source)
        self._claimed += 1
        return index * self.piece_size, self._length(index)

    @property
    def _first_missing(self) -> int:
        while self._low < self.count and self.have[self._low]:
            self._low += 1
        return self._low

    def deliver(self, source: Any, offset: int, chunks: list[bytes]) -> None:
        """*source* received a whole piece."""
        index = offset // self.piece_size
        self._claims.get(index, set()).discard(source)
        if self._ended or self.have[index]:
            return  # an endgame copy that lost the race
        length = sum(len(c) for c in chunks)
        self.received = min(self.size, self.received + length)
        self.progress(self.received, self.size)
        self._checking[index] += 1  # not to be asked again meanwhile
        self._queue.append((source, index, chunks))
        self._queued_bytes += length
        if not self._paused and self._queued_bytes > HIGH_WATER:
            self._paused = True
            for s in self.sources:
                s.pauseProducing()
        self._next_job()

    @property
    def complete(self) -> bool:
        return all(self.have)

    # -- the worker ---------------------------------------------------------------------

    def _next_job(self) -> None:
        if self._writing or self._ended:
            return
        if self._queue:
            source, index, chunks = self._queue.popleft()
            self._queued_bytes -= sum(len(c) for c in chunks)
            self._writing = True
            ahead = max(1, WHOLE_AHEAD // self.piece_size)
            if self._whole_next <= index < self._whole_next + ahead and not self._whole_spoilt:
                self._whole_mem[index] = chunks  # hashed from memory when its turn comes
                self._pump_whole()
            self._run(self._write_piece, index, chunks).addCallbacks(self._written, self._write_failed,
                                                                     (source, index))
        elif self.complete and not self._finishing and not self._whole_busy:
            self._finishing = True
            self._run(self._hash_rest).addCallbacks(lambda _: self._verify(), self._write_failed)

    def _pump_whole(self) -> None:
        """The whole-file hash, in order, a piece at a time, on another worker than the pieces':
        from memory when the piece is still there, else read back once it is verified."""
        if self._whole_busy or self._ended or self._finishing or self._whole_spoilt:
            return
        index = self._whole_next
        chunks = self._whole_mem.pop(index, None)
        if chunks is None and (index >= self.count or not self.have[index]):
            return
        self._whole_busy = True
        self._run(self._hash_piece, index, chunks).addCallbacks(self._whole_done, self._write_failed)

    def _hash_piece(self, index: int, chunks: Optional[list[bytes]]) -> None:
        if chunks is None:
            chunks = [os.pread(self._file.fileno(), self._length(index), index * self.piece_size)]
        for c in chunks:
            self._hash.update(c)

    def _whole_done(self, _: None) -> None:
        self._whole_busy = False
        self._whole_next += 1
        for stale in [i for i in self._whole_mem if i < self._whole_next]:
            del self._whole_mem[stale]
        if self._ended:
            return
        self._next_job()  # first: once every piece is in, the rest is hashed in one pass
        self._pump_whole()

    def _run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        # A small file is written here: a hand-off to the worker thread would cost more than the work.
        return (synchronously if self.size <= SMALL else self.executor)(f, *args)

    def _write_piece(self, index: int, chunks: list[bytes]) -> bool:
        """In the worker: check the piece against the manifest, write it at its offset, hash it in."""
        if self.pieces is not None:
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)
            if h.digest() != self.pieces[32 * index: 32 * index + 32]:
                return False
        fd, offset = self._file.fileno(), index * self.piece_size
        for c in chunks:
            os.pwrite(fd, c, offset)
            offset += len(c)
        return True

    def _hash_rest(self) -> None:
        """In the worker, at the end: hash what arrived out of order, reading it back."""
        self._whole_mem.clear()
        if self._whole_spoilt:  # a bad piece went into the whole-file hash: start it again from disk
            self._hash, self._whole_next = hashlib.sha256(), 0
        offset = self._whole_next * self.piece_size
        while offset < self.size:
            chunk = os.pread(self._file.fileno(), min(1 << 20, self.size - offset), offset)
            if not chunk:
                break
            self._hash.update(chunk)
            offset += len(chunk)
        self._whole_next = self.count

    def _written(self, good: bool, source: Any, index: int) -> None:
        self._writing = False
        self._checking[index] -= 1
        if self._checking[index] <= 0:
            del self._checking[index]
        if self._ended:
            self._discard(self._keep)
            return
        if good and not self.have[index]:
            self.have[index] = 1
            self.verified += self._length(index)
            self._claims.pop(index, None)
            self._save_state(now=False)
            for watcher in list(self.watchers):
                watcher.piece_verified(index)
        elif not good:
            self.received -= self._length(index)
            self._claims.pop(index, None)
            self._whole_mem.pop(index, None)
            if index < self._whole_next or (self._whole_busy and index == self._whole_next):
                self._whole_spoilt = True  # it went into the whole-file hash
            if source in self.sources:
                source.bad_piece(index)
        if self._paused and self._queued_bytes < LOW_WATER:
            self._paused = False
            for s in list(self.sources):
                s.resumeProducing()
        if self.complete:
            for s in list(self.sources):
                s.download_finished()
        else:
            self._kick()
        self._next_job()
        self._pump_whole()

    def _write_failed(self, f: Failure, *_: Any) -> None:
        self._writing = False
        if self._ended:
            self._discard(self._keep)
            return
        reason = getattr(f.value, "strerror", None) or str(f.value)
        self.fail(TransferFailed(f"{self.name}: could not write the temporary file: {reason}"))

    def _verify(self) -> None:
        try:
            self._file.close()
            digest = self._hash.hexdigest()
            if digest != self.sha256:
                raise VerificationFailed(f"{self.name}: the whole file has SHA-256 {digest[:16]}, "
                                         f"expected {self.sha256[:16]}")
            path = self.shares.place(self.tmp_path, self.name, self.sha256,
                                     self.piece_size if self.pieces else 0, self.pieces or b"")
        except Exception as e:
            self.fail(e)
            return
        self._ended = True
        self.have_path.unlink(missing_ok=True)
        self._release()
        self.done.callback(path)

    def start(self) -> None:
        """Nothing more to fetch (an empty file, or all pieces verified before): finish now."""
        self._next_job()

    def fail(self, error: BaseException, keep: bool = False) -> None:
        """Give up; ``done`` fails.  With *keep* (and a manifest), the verified pieces stay for a resume."""
        if self._ended:
            return
        self._ended = True
        self._keep = keep and self.pieces is not None and any(self.have)
        self._queue.clear()
        if not self._writing:
            self._discard(self._keep)
        self.done.errback(Failure(error))

    def _discard(self, keep: bool) -> None:
        if not self._file.closed:
            self._file.close()
        if keep:
            self._save_state()
        else:
            self.tmp_path.unlink(missing_ok=True)
            self.have_path.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self.tmp_path.name == f"{self.sha256}.part":
            self.shares.downloading.discard(self.sha256)
        if not self.settled.called:
            self.settled.callback(None)
