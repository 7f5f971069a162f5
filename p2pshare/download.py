"""The requester's side of one file: a temporary file, hashes, progress, verification, resume.

Writing and hashing run in a worker thread, one batch at a time and in order,
while the reactor thread keeps receiving: hashlib and file writes release the
GIL, so the two overlap.  When more than ``HIGH_WATER`` bytes wait for the disk,
the connection is paused (``pauseProducing`` on its transport) until the
backlog falls under ``LOW_WATER``, so memory stays bounded whatever the network
speed.

With a manifest (a SHA-256 per piece, checked against the ``root`` the offer
named) every piece is verified as it is written, and the count of verified
bytes is kept beside the temporary file (``<sha256>.part`` and
``<sha256>.have`` in the state folder), so a download that stops (a lost
connection, a bad piece, a crash) resumes from its verified pieces.  The file
is moved into place only when the SHA-256 of the whole matches too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO, Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pshare.errors import TransferFailed, VerificationFailed
from p2pshare.shares import Shares

RANGE = 16 * 1024 * 1024  # bytes the requester asks for at a time (a whole number of pieces)
BATCH = 4 * 1024 * 1024  # bytes handed to the writer thread at once
HIGH_WATER = 32 * 1024 * 1024  # pause the connection above this backlog
LOW_WATER = 8 * 1024 * 1024  # and resume it below this
SMALL = 256 * 1024  # files up to this size are written and hashed on the reactor thread

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


class Download:
    """One file being received into the state folder; ``done`` fires with its final path."""

    log = Logger()

    def __init__(self, shares: Shares, name: str, size: int, sha256: str,
                 progress: Callable[[int, int], None] = lambda got, size: None,
                 executor: Optional[Executor] = None, piece_size: int = 0, root: str = "") -> None:
        self.shares, self.name, self.size, self.sha256 = shares, name, size, sha256
        self.progress = progress
        self.executor = executor or in_thread()
        self.piece_size, self.root = (piece_size, root) if piece_size and root else (0, "")
        self.pieces: Optional[bytes] = None  # the manifest, once received and checked against root
        self.done: Deferred[Path] = Deferred()
        self.settled: Deferred[None] = Deferred()  # fires once the worker has let go of the file
        self._hash = hashlib.sha256()
        self._piece_hash = hashlib.sha256()
        self._written = 0  # bytes the worker has written (and hashed)
        self._verified = 0  # of those, the bytes in verified pieces
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = 0  # bytes in the batch the worker holds, 0 when idle
        self._finishing = False
        self._ended = False
        self._source: Optional[IPushProducer] = None
        self._paused = False
        self._rehash_prefix = 0  # resumed bytes the whole-file hash has not seen yet
        self.tmp_path, self.have_path, self._file = self._open()
        self.received = self.asked = self.resumed_from = self._written

    def _open(self) -> tuple[Path, Path, IO[bytes]]:
        """The temporary file, reusing the verified part of an earlier attempt when there is one."""
        tmp, have = self.shares.tmp / f"{self.sha256}.part", self.shares.tmp / f"{self.sha256}.have"
        if self.sha256 in self.shares.downloading:  # another download of this content: no sharing a file
            tmp, f = self.shares.new_temporary()
            return tmp, tmp.with_suffix(".have"), f
        self.shares.downloading.add(self.sha256)
        try:
            state = have.read_text().split()
            if self.piece_size and state[:3] == [str(self.size), str(self.piece_size), self.root]:
                pieces = bytes.fromhex(state[3])
                verified = int(state[4])
                if hashlib.sha256(pieces).hexdigest() == self.root and 0 <= verified <= os.path.getsize(tmp):
                    f = open(tmp, "r+b")
                    f.seek(verified)
                    self.pieces, self._written, self._verified = pieces, verified, verified
                    self._rehash_prefix = verified
                    return tmp, have, f
        except (OSError, ValueError, IndexError):
            pass
        have.unlink(missing_ok=True)
        return tmp, have, open(tmp, "wb")

    def attach(self, source: IPushProducer) -> None:
        """The connection the bytes come from, paused while the disk lags behind."""
        self._source = source

    @property
    def needs_manifest(self) -> bool:
        return bool(self.root) and self.pieces is None and self.size > 0

    def set_manifest(self, pieces: bytes) -> bool:
        """The holder's manifest: accepted only if it hashes to the offer's root and fits the size."""
        count = -(-self.size // self.piece_size) if self.piece_size else 0
        if len(pieces) != 32 * count or hashlib.sha256(pieces).hexdigest() != self.root:
            return False
        self.pieces = pieces
        return True

    def next_range(self) -> Optional[tuple[int, int]]:
        if self.asked >= self.size:
            return None
        step = max(RANGE - RANGE % self.piece_size, self.piece_size) if self.piece_size else RANGE
        length = min(step, self.size - self.asked)
        offset, self.asked = self.asked, self.asked + length
        return offset, length

    @property
    def complete(self) -> bool:
        return self.received >= self.size

    def write(self, data: bytes) -> None:
        if self._ended:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.received += len(data)
        self.progress(self.received, self.size)
        if not self._writing and self._pending_bytes >= BATCH:
            self._flush()
        if self._source is not None and not self._paused and self._backlog > HIGH_WATER:
            self._paused = True
            self._source.pauseProducing()

    @property
    def _backlog(self) -> int:
        return self._pending_bytes + self._writing

    def _flush(self) -> None:
        batch, self._pending, self._writing, self._pending_bytes = self._pending, [], self._pending_bytes or 1, 0
        self.executor(self._write_batch, batch).addCallbacks(self._written_batch, self._write_failed)

    def _write_batch(self, batch: list[bytes]) -> None:
        """In the worker thread: write, hash the whole and each piece, in order."""
        if self._rehash_prefix:  # resumed: the whole-file hash starts with what is already on disk
            with open(self.tmp_path, "rb") as f:
                remaining = self._rehash_prefix
                while remaining and (chunk := f.read(min(remaining, 1 << 20))):
                    self._hash.update(chunk)
                    remaining -= len(chunk)
            self._rehash_prefix = 0
        for data in batch:
            self._file.write(data)
            self._hash.update(data)
            if self.pieces is not None:
                self._check_pieces(memoryview(data))
            self._written += len(data)
        if self.pieces is not None:
            self._file.flush()
            self._save_state()

    def _check_pieces(self, view: memoryview) -> None:
        position = self._written
        while view:
            index = position // self.piece_size
            end = min((index + 1) * self.piece_size, self.size)
            take = view[: end - position]
            self._piece_hash.update(take)
            position += len(take)
            view = view[len(take):]
            if position == end:
                if self._piece_hash.digest() != self.pieces[32 * index: 32 * index + 32]:  # type: ignore[index]
                    raise VerificationFailed(f"{self.name}: piece {index} does not match the manifest")
                self._piece_hash = hashlib.sha256()
                self._verified = end

    def _save_state(self) -> None:
        self.have_path.write_text(f"{self.size} {self.piece_size} {self.root} {self.pieces.hex()} "  # type: ignore
                                  f"{self._verified}\n")

    def _written_batch(self, _: None) -> None:
        self._writing = 0
        if self._ended:
            self._discard(keep=self._keep)
            return
        if self._paused and self._backlog < LOW_WATER and self._source is not None:
            self._paused = False
            self._source.resumeProducing()
        if self._pending and (self._pending_bytes >= BATCH or self._finishing):
            self._flush()
        elif self._finishing:
            self._verify()

    def _write_failed(self, f: Failure) -> None:
        self._writing = 0
        if self._ended:  # failed meanwhile: the file is ours to clean up now
            self._discard(keep=self._keep)
            return
        if f.check(VerificationFailed):  # a bad piece: what was verified before it stays for a resume
            self.fail(f.value, keep=True)
            return
        reason = getattr(f.value, "strerror", None) or str(f.value)
        self.fail(TransferFailed(f"{self.name}: could not write the temporary file: {reason}"))

    def finish(self) -> None:
        """All bytes are in: write the rest, verify, move into place; then ``done`` fires."""
        self._finishing = True
        if self._writing:
            return
        if self._pending and self.size <= SMALL:
            # A small file never went to the worker: two thread hand-offs would cost more
            # than writing and hashing it here.
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            try:
                self._write_batch(batch)
            except (OSError, VerificationFailed) as e:
                self._write_failed(Failure(e))
                return
            self._verify()
        elif self._pending or self._rehash_prefix:
            self._flush()
        else:
            self._verify()

    def _verify(self) -> None:
        try:
            self._file.close()
            digest = self._hash.hexdigest()
            if self._written != self.size or digest != self.sha256:
                raise VerificationFailed(
                    f"{self.name}: received {self._written} bytes with SHA-256 {digest[:16]}, "
                    f"expected {self.size} bytes with {self.sha256[:16]}"
                )
            path = self.shares.place(self.tmp_path, self.name, self.sha256, self.piece_size, self.pieces or b"")
        except Exception as e:
            self.fail(e)
            return
        self._ended = True
        self._release()
        self.have_path.unlink(missing_ok=True)
        self.done.callback(path)

    _keep = False

    def fail(self, error: BaseException, keep: bool = False) -> None:
        """Give up; ``done`` fails.  With *keep* (and a manifest), the verified part stays for a resume."""
        if self._ended:
            return
        self._ended = True
        self._keep = keep and self.pieces is not None and self._verified > 0
        self._pending = []
        if self._source is not None and self._paused:
            self._paused = False
            self._source.resumeProducing()
        if not self._writing:
            self._discard(keep=self._keep)
        self.done.errback(Failure(error))

    def _discard(self, keep: bool) -> None:
        if not self._file.closed:
            self._file.close()
        if keep:
            os.truncate(self.tmp_path, self._verified)
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
