"""The requester's side of one file: a temporary file, a hash, progress, verification.

Writing and hashing run in a worker thread, one batch at a time and in order,
while the reactor thread keeps receiving: hashlib and file writes release the
GIL, so the two overlap.  When more than ``HIGH_WATER`` bytes wait for the disk,
the connection is paused (``pauseProducing`` on its transport) until the
backlog falls under ``LOW_WATER``, so memory stays bounded whatever the network
speed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pshare.errors import TransferFailed, VerificationFailed
from p2pshare.shares import Shares

RANGE = 16 * 1024 * 1024  # bytes the requester asks for at a time
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
                 executor: Optional[Executor] = None) -> None:
        self.shares, self.name, self.size, self.sha256 = shares, name, size, sha256
        self.progress = progress
        self.executor = executor or in_thread()
        self.tmp_path, self._file = shares.new_temporary()
        self._hash = hashlib.sha256()
        self.received = 0
        self.asked = 0
        self.done: Deferred[Path] = Deferred()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = 0  # bytes in the batch the worker holds, 0 when idle
        self._finishing = False
        self._ended = False
        self._source: Optional[IPushProducer] = None
        self._paused = False

    def attach(self, source: IPushProducer) -> None:
        """The connection the bytes come from, paused while the disk lags behind."""
        self._source = source

    def next_range(self) -> Optional[tuple[int, int]]:
        if self.asked >= self.size:
            return None
        length = min(RANGE, self.size - self.asked)
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
        batch, self._pending, self._writing, self._pending_bytes = self._pending, [], self._pending_bytes, 0
        self.executor(self._write_batch, batch).addCallbacks(self._written, self._write_failed)

    def _write_batch(self, batch: list[bytes]) -> None:
        """In the worker thread: write and hash, in order."""
        for piece in batch:
            self._file.write(piece)
            self._hash.update(piece)

    def _written(self, _: None) -> None:
        self._writing = 0
        if self._ended:
            self._discard()
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
        if self._ended:  # failed meanwhile: the file is ours to remove now
            self._discard()
            return
        error = f.value
        reason = getattr(error, "strerror", None) or str(error)
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
            except OSError as e:
                self._write_failed(Failure(e))
                return
            self._verify()
        elif self._pending:
            self._flush()
        else:
            self._verify()

    def _verify(self) -> None:
        try:
            self._file.close()
            digest = self._hash.hexdigest()
            if self.received != self.size or digest != self.sha256:
                raise VerificationFailed(
                    f"{self.name}: received {self.received} bytes with SHA-256 {digest[:16]}, "
                    f"expected {self.size} bytes with {self.sha256[:16]}"
                )
            path = self.shares.place(self.tmp_path, self.name, self.sha256)
        except Exception as e:
            self.fail(e)
            return
        self._ended = True
        self.done.callback(path)

    def fail(self, error: BaseException) -> None:
        """Give up: the temporary file goes (once the worker lets go of it) and ``done`` fails."""
        if self._ended:
            return
        self._ended = True
        self._pending = []
        if self._source is not None and self._paused:
            self._paused = False
            self._source.resumeProducing()
        if not self._writing:
            self._discard()
        self.done.errback(Failure(error))

    def _discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)
