"""The requester's bookkeeping: batching to the writer thread, backpressure, verification, failures."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure

from p2pshare.download import BATCH, HIGH_WATER, LOW_WATER, Download, synchronously
from p2pshare.errors import TransferFailed, VerificationFailed
from p2pshare.shares import Shares


class ManualExecutor:
    """Holds each call until the test releases it, as a busy worker thread would."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def release_one(self) -> None:
        f, args, d = self.calls.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)


class Source:
    """Stands in for the TCP transport the bytes come from."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_bytes_are_handed_to_the_writer_in_batches_and_in_order(share: Path) -> None:
    data = bytes(range(256)) * (3 * BATCH // 256)
    executor = ManualExecutor()
    dl = Download(Shares(share), "f.bin", len(data), hashlib.sha256(data).hexdigest(), executor=executor)
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    for i in range(0, len(data), 65536):
        dl.write(data[i: i + 65536])
        while executor.calls:
            executor.release_one()
    dl.finish()
    while executor.calls:
        executor.release_one()
    assert placed == [share / "f.bin"]
    assert (share / "f.bin").read_bytes() == data


def test_a_slow_disk_pauses_the_connection_and_a_drained_one_resumes_it(share: Path) -> None:
    executor = ManualExecutor()
    dl = Download(Shares(share), "f.bin", 10 * HIGH_WATER, "0" * 64, executor=executor)
    source = Source()
    dl.attach(source)
    chunk = b"x" * (1024 * 1024)
    while not source.paused:
        dl.write(chunk)
    assert dl.received > HIGH_WATER
    assert len(executor.calls) == 1  # one batch at a time
    while source.paused:
        executor.release_one()
    assert source.pauses == 1
    assert dl._backlog < LOW_WATER
    dl.fail(TransferFailed("test over"))
    dl.done.addErrback(lambda f: None)
    while executor.calls:
        executor.release_one()
    assert not dl.tmp_path.exists()


def test_a_hash_mismatch_fails_and_removes_the_temporary_file(share: Path) -> None:
    dl = Download(Shares(share), "f.bin", 3, "0" * 64, executor=synchronously)
    failures: list[Failure] = []
    dl.done.addErrback(failures.append)
    dl.write(b"abc")
    dl.finish()
    assert failures[0].check(VerificationFailed)
    assert not dl.tmp_path.exists() and not (share / "f.bin").exists()


def test_a_disk_error_fails_with_a_clear_message_and_removes_the_file(share: Path) -> None:
    def full(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return fail(OSError(errno.ENOSPC, "No space left on device"))

    dl = Download(Shares(share), "f.bin", 2 * BATCH, "0" * 64, executor=full)
    failures: list[Failure] = []
    dl.done.addErrback(failures.append)
    dl.write(b"x" * BATCH)
    assert failures[0].check(TransferFailed)
    assert "No space left on device" in str(failures[0].value)
    assert not dl.tmp_path.exists()
    dl.write(b"more")  # late bytes after failure are ignored
    assert not dl.tmp_path.exists()


def test_failing_while_the_worker_holds_a_batch_waits_for_it_before_deleting(share: Path) -> None:
    executor = ManualExecutor()
    dl = Download(Shares(share), "f.bin", 2 * BATCH, "0" * 64, executor=executor)
    dl.write(b"y" * BATCH)
    failures: list[Failure] = []
    dl.done.addErrback(failures.append)
    dl.fail(TransferFailed("connection lost"))
    assert failures and dl.tmp_path.exists()  # the worker still writes to it
    executor.release_one()
    assert not dl.tmp_path.exists()


def test_a_small_file_is_written_and_verified_without_the_worker(share: Path) -> None:
    data = b"s" * 16384
    executor = ManualExecutor()
    dl = Download(Shares(share), "small.bin", len(data), hashlib.sha256(data).hexdigest(), executor=executor)
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    dl.write(data)
    dl.finish()
    assert executor.calls == [] and placed == [share / "small.bin"]


PIECE = 1024 * 1024


def manifest(data: bytes) -> tuple[bytes, str]:
    pieces = b"".join(hashlib.sha256(data[i: i + PIECE]).digest() for i in range(0, len(data), PIECE))
    return pieces, hashlib.sha256(pieces).hexdigest()


def test_a_bad_piece_fails_the_download_and_keeps_the_verified_pieces(share: Path) -> None:
    data = os.urandom(5 * PIECE + 123)
    pieces, root = manifest(data)
    sha = hashlib.sha256(data).hexdigest()
    shares = Shares(share)
    dl = Download(shares, "f.bin", len(data), sha, executor=synchronously, piece_size=PIECE, root=root)
    assert dl.needs_manifest and dl.set_manifest(pieces)
    failures: list[Failure] = []
    dl.done.addErrback(failures.append)
    corrupt = bytearray(data)
    corrupt[3 * PIECE + 10] ^= 0xFF  # piece 3 is bad
    dl.write(bytes(corrupt[: 4 * PIECE + 5]))
    dl.finish()
    assert failures and failures[0].check(VerificationFailed) and "piece 3" in str(failures[0].value)
    assert os.path.getsize(dl.tmp_path) == 3 * PIECE  # pieces 0-2 verified and kept

    again = Download(shares, "f.bin", len(data), sha, executor=synchronously, piece_size=PIECE, root=root)
    assert again.resumed_from == 3 * PIECE and not again.needs_manifest
    assert again.next_range() == (3 * PIECE, len(data) - 3 * PIECE)
    placed: list[Path] = []
    again.done.addCallback(placed.append)
    again.write(data[3 * PIECE:])
    again.finish()
    assert placed == [share / "f.bin"] and (share / "f.bin").read_bytes() == data
    assert list(shares.tmp.iterdir()) == []


def test_a_manifest_that_does_not_match_the_root_is_refused(share: Path) -> None:
    data = os.urandom(2 * PIECE)
    pieces, root = manifest(data)
    dl = Download(Shares(share), "f.bin", len(data), "0" * 64, executor=synchronously, piece_size=PIECE, root=root)
    assert not dl.set_manifest(pieces[:-1] + b"x")
    assert not dl.set_manifest(pieces[:32])
    assert dl.set_manifest(pieces)


def test_resumable_partial_downloads_survive_a_restart_and_junk_does_not(share: Path) -> None:
    shares = Shares(share)
    (shares.tmp / ("a" * 64 + ".part")).write_bytes(b"x")
    (shares.tmp / ("a" * 64 + ".have")).write_text("1 1048576 " + "b" * 64 + " 00 0\n")
    (shares.tmp / "0123.part").write_bytes(b"junk")
    (shares.tmp / ("c" * 64 + ".part")).write_bytes(b"no state beside it")
    assert sorted(p.name for p in Shares(share).tmp.iterdir()) == ["a" * 64 + ".have", "a" * 64 + ".part"]
