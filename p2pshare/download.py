"""The requester's side of one file: pieces from one or more sources, verified, resumable.

A ``Download`` joins the three parts of receiving a file: the piece policy
(``pieces.PiecePicker``: which range to ask which source for), the disk side
(``store.PieceStore``: write, hash, verify, resume) and the connections that
feed it (its *sources*, see ``transfer.Requester``).  A source asks ``claim``
for its next range and hands the bytes over with ``receive`` as they arrive,
slices of its receive buffers that are never copied.  When more than
``HIGH_WATER`` bytes wait for the disk, every source is paused until the
backlog falls under ``LOW_WATER``.  A peer that downloads a file serves the
pieces it has verified meanwhile: ``watchers`` are told of each.

``done`` fires with the file's final path once every piece is verified (and,
where the fetch asked for the content's SHA-256 or the file came without a
manifest, the whole file's SHA-256 matches) and it is in place.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pshare.errors import TransferFailed, VerificationFailed
from p2pshare.pieces import PiecePicker
from p2pshare.shares import Entry, Shares, root_kind
from p2pshare.store import Executor, PieceStore, Segment, in_thread, synchronously

__all__ = ["Download", "Source", "in_thread", "synchronously", "RANGE", "HIGH_WATER", "LOW_WATER"]

RANGE = 16 * 1024 * 1024  # the piece size of a file offered without a manifest
HIGH_WATER = 8 * 1024 * 1024  # pause the sources above this backlog (requester RSS <= 80 MB: 16 was over)
LOW_WATER = 3 * 1024 * 1024  # and resume them below this


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


class Download:
    """One file being received into the state folder; ``done`` fires with its final path."""

    log = Logger()

    def __init__(self, shares: Shares, name: str, size: int, sha256: str,
                 progress: Callable[[int, int], None] = lambda got, size: None,
                 executor: Optional[Executor] = None, piece_size: int = 0, root: str = "",
                 verify_whole: bool = False) -> None:
        self.shares, self.name, self.size, self.sha256 = shares, name, size, sha256
        self.progress = progress
        self.root = root if piece_size and root else ""
        self.piece_size = piece_size if self.root else RANGE
        self.done: Deferred[Any] = Deferred()
        self.sources: set[Any] = set()
        self.wire_bytes = 0  # bytes the sources delivered, duplicates included
        self.watchers: set[Any] = set()  # connections serving this download's verified pieces to others
        self.store = PieceStore(shares, sha256, size, self.piece_size, self.root, executor or in_thread(),
                                self._checked)
        self.store.on_error = self._disk_failed
        self.store.on_written = self._written
        self.count = self.store.count
        if self.root and self.count == 1 and self.store.manifest is None:
            # One piece: its digest is the file's SHA-256, so the manifest needs no round trip.
            self.store.set_manifest(bytes.fromhex(sha256))
        self.picker = PiecePicker(size, self.piece_size, self.store.have, manifest=bool(self.root))
        # Without a manifest nothing but the whole file can be checked; one piece's digest is the whole's.
        self.verify_whole = (verify_whole or not self.root) and not (self.root and self.count == 1)
        self._writers: dict[int, Any] = {}  # piece -> the source whose copy is written
        self._writing: dict[tuple[int, int], bool] = {}  # (id(source), piece) -> that copy writes
        self._paused = False
        self.pauses = 0  # times the disk fell behind and every source was paused
        self._finishing = False
        self._ended = False
        self.resumed_from = self.verified = sum(self.picker.length(i) for i in range(self.count) if self.have[i])
        self.received = self.verified

    # -- what other modules read ----------------------------------------------------------

    @property
    def settled(self) -> Deferred[None]:
        """Fires once no worker job uses the temporary file any more."""
        return self.store.settled

    @property
    def tmp_path(self) -> Any:
        return self.store.tmp_path

    @property
    def pieces(self) -> Optional[bytes]:
        """The manifest, once received and checked against the root."""
        return self.store.manifest

    @property
    def have(self) -> bytearray:
        return self.store.have

    @property
    def swarming(self) -> bool:
        return self.picker.swarming

    @swarming.setter
    def swarming(self, value: bool) -> None:
        self.picker.swarming = value

    @property
    def missing(self) -> int:
        return self.picker.missing

    @property
    def complete(self) -> bool:
        return self.picker.complete

    @property
    def needs_manifest(self) -> bool:
        return bool(self.root) and self.pieces is None and self.size > 0

    def entry(self) -> Entry:
        """This download as a shared file, to serve its verified pieces (it needs the manifest)."""
        assert self.pieces is not None
        if root_kind(self.root) == "blake3":
            return Entry(self.name, self.size, 0, self.sha256, self.piece_size, pieces3=self.pieces)
        return Entry(self.name, self.size, 0, self.sha256, self.piece_size, self.pieces)

    def set_manifest(self, pieces: bytes) -> bool:
        return self.store.set_manifest(pieces)

    # -- sources --------------------------------------------------------------------------

    def attach(self, source: Any) -> None:
        self.sources.add(source)
        if self._paused:
            source.pauseProducing()

    def detach(self, source: Any) -> None:
        """A source went away: its claims go back to the pool, and no copy of it is written any more."""
        self.sources.discard(source)
        self.picker.release(source)
        for index in [i for i, s in self._writers.items() if s is source]:
            del self._writers[index]
        self._kick()

    def _kick(self) -> None:
        for source in list(self.sources):
            source.more()

    def claim(self, source: Hashable, has: Callable[[int], bool] = lambda i: True,
              rank: Callable[[int], int] = lambda i: 0) -> Optional[tuple[int, int]]:
        """The next range for *source* to fetch, as (offset, length); None when there is nothing for it."""
        if self._ended or self._finishing or self.needs_manifest:
            return None
        return self.picker.claim(source, has, rank, len(self.sources))

    def receive(self, source: Any, offset: int, data: memoryview) -> None:
        """Bytes *source* received for the file at *offset* (a range it claimed), handed on to the disk."""
        self.wire_bytes += len(data)
        if self._ended or self._finishing:
            return
        piece = self.piece_size
        while data:
            index = offset // piece
            end = min(self.size, (index + 1) * piece)
            n = min(len(data), end - offset)
            key = (id(source), index)
            first, last = offset == index * piece, offset + n == end
            if first:
                writer = self._writers.setdefault(index, source)
                self._writing[key] = writer is source
            write = self._writing.get(key, False)
            if last:  # (before the write: a synchronous store reports the check at once)
                self._writing.pop(key, None)
                if self._writers.get(index) is source:
                    del self._writers[index]
                self.picker.received(source, index)
            self.received = min(self.size, self.received + n)
            segment, data, offset = Segment(source, index, offset, data[:n], first, last, write), data[n:], offset + n
            if last or not data:  # reported before a piece is checked, which may finish the download
                self.progress(self.received, self.size)
            self.store.write(segment)
            if self._ended or self._finishing:
                return
        if not self._paused and not self._ended and self.store.queued > HIGH_WATER:
            self._paused = True
            self.pauses += 1
            for s in self.sources:
                s.pauseProducing()

    # -- what the disk side reports -------------------------------------------------------

    def _checked(self, source: Any, index: int, good: bool) -> None:
        if self._ended:
            return
        if self.picker.checked(index, good):
            self.verified += self.picker.length(index)
            for watcher in list(self.watchers):
                watcher.piece_verified(index)
        elif not good and not self.have[index]:
            self.received -= self.picker.length(index)
            if source in self.sources:
                source.bad_piece(index)
        if self.complete:
            self._finish()
        else:
            self._kick()

    def _written(self) -> None:
        """A worker job is done: the sources read again once the backlog is short (whether or not the job
        completed a piece)."""
        if self._paused and not self._ended and self.store.queued < LOW_WATER:
            self._paused = False
            for s in list(self.sources):
                s.resumeProducing()

    def _disk_failed(self, error: BaseException) -> None:
        reason = getattr(error, "strerror", None) or str(error)
        self.fail(TransferFailed(f"{self.name}: could not write the temporary file: {reason}"))

    # -- the end --------------------------------------------------------------------------

    def start(self) -> None:
        """Nothing more to fetch (an empty file, or all pieces verified before): finish now."""
        if self.complete:
            self._finish()

    def _finish(self) -> None:
        if self._finishing or self._ended:
            return
        self._finishing = True
        for s in list(self.sources):
            s.download_finished()
        self.store.drop_queued()  # late endgame copies: nothing of them is needed now
        self.store.when_quiet().addCallback(self._finish_quiet)

    def _finish_quiet(self, _: None) -> None:
        """Every piece is in and the worker is done with the file: check it whole where needed, place it."""
        if self._ended:
            return
        if self.verify_whole:
            self.store.whole_sha256().addCallbacks(self._place, self._whole_failed)
        else:
            self._place(None)

    def _whole_failed(self, f: Failure) -> None:
        self._finishing = False
        self._disk_failed(f.value)

    def _place(self, digest: Optional[str]) -> None:
        if self._ended:
            return
        try:
            if digest is not None and digest != self.sha256:
                raise VerificationFailed(f"{self.name}: the whole file has SHA-256 {digest[:16]}, "
                                         f"expected {self.sha256[:16]}")
            tmp = self.store.detach_file()
            # with its manifest, of the kind received (none: a file that came without one)
            entry = self.entry() if self.pieces is not None else Entry(self.name, self.size, 0, self.sha256)
            path = self.shares.place(tmp, self.name, self.sha256, entry.piece_size, entry.pieces, entry.pieces3)
        except Exception as e:
            self._finishing = False
            self.fail(e)
            return
        self._ended = True
        self.store.have_path.unlink(missing_ok=True)
        self.store.release()
        self.done.callback(path)

    def fail(self, error: BaseException, keep: bool = False) -> None:
        """Give up; ``done`` fails.  With *keep* (and a manifest), the verified pieces stay for a resume.
        ``settled`` fires once the worker has let go of the file."""
        if self._ended:
            return
        self._ended = True
        self.store.close(keep)
        self.done.errback(Failure(error))
