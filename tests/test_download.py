"""The requester's bookkeeping: pieces from several sources, verification, backpressure, resume."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.python.failure import Failure

from p2pshare.download import HIGH_WATER, LOW_WATER, Download, synchronously
from p2pshare.pieces import RANDOM_START, RUN
from p2pshare.errors import TransferFailed, VerificationFailed
from p2pshare.shares import Shares
from p2pshare.store import FileWriter

PIECE = 1024 * 1024


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

    def release_all(self) -> None:
        while self.calls:
            self.release_one()


class Source:
    """Stands in for a connection feeding the download."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.finished = False
        self.bad: list[int] = []
        self.asked_again = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def download_finished(self) -> None:
        self.finished = True

    def bad_piece(self, index: int) -> None:
        self.bad.append(index)

    def more(self) -> None:
        self.asked_again += 1


def manifest(data: bytes) -> tuple[bytes, str]:
    pieces = b"".join(hashlib.sha256(data[i: i + PIECE]).digest() for i in range(0, len(data), PIECE))
    return pieces, hashlib.sha256(pieces).hexdigest()


def download(shares: Shares, data: bytes, executor: Any = synchronously, **kw: Any) -> Download:
    pieces, root = manifest(data)
    dl = Download(shares, "f.bin", len(data), kw.pop("sha256", hashlib.sha256(data).hexdigest()),
                  executor=executor, piece_size=PIECE, root=root, **kw)
    if dl.needs_manifest:
        assert dl.set_manifest(pieces)
    return dl


def deliver(dl: Download, source: Any, offset: int, buffers: list[bytes]) -> None:
    """*source* hands over *buffers*, in order, from *offset*: as a connection passes on what it reads."""
    for b in buffers:
        dl.receive(source, offset, memoryview(b))
        offset += len(b)


def abandon(dl: Download) -> None:
    """End a download a test leaves unfinished."""
    dl.fail(TransferFailed("test over"))
    dl.done.addErrback(lambda f: None)


def feed(dl: Download, source: Source, data: bytes, corrupt: set[int] = frozenset()) -> bool:  # type: ignore
    """Let *source* claim a range and deliver its pieces; False when it had nothing to claim."""
    claimed = dl.claim(source)
    if claimed is None:
        return False
    offset, length = claimed
    for start in range(offset, offset + length, PIECE):
        piece = bytearray(data[start: min(start + PIECE, offset + length)])
        if start // PIECE in corrupt:
            piece[0] ^= 0xFF
        half = len(piece) // 2
        deliver(dl, source, start, [bytes(piece[:half]), bytes(piece[half:])])
    return True


def test_two_sources_share_the_pieces_and_the_file_is_placed(share: Path) -> None:
    data = os.urandom(40 * PIECE + 321)
    dl = download(Shares(share), data)
    a, b = Source(), Source()
    dl.attach(a)
    dl.attach(b)
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    dl.swarming = True
    first_a, first_b = dl.claim(a), dl.claim(b)
    assert first_a and first_b and first_a[0] != first_b[0]  # different pieces, one each
    assert {first_a[1], first_b[1]} <= {PIECE, 321}  # one piece each (the last one is short)
    for start in (first_b[0], first_a[0]):  # out of order
        deliver(dl, b if start == first_b[0] else a, start, [data[start: start + PIECE]])
    while feed(dl, a, data) | feed(dl, b, data):
        pass
    assert placed == [share / "f.bin"] and (share / "f.bin").read_bytes() == data
    assert a.finished and b.finished
    assert list((share / ".p2pshare" / "tmp").iterdir()) == []


def test_a_bad_piece_is_reported_and_fetched_from_another_source(share: Path) -> None:
    data = os.urandom(3 * PIECE)
    dl = download(Shares(share), data)
    liar, honest = Source(), Source()
    dl.attach(liar)
    dl.attach(honest)
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    while not liar.bad and feed(dl, liar, data, corrupt={0}):
        pass
    dl.detach(liar)  # the fetch drops that connection
    assert liar.bad == [0] and not dl.have[0]
    while feed(dl, honest, data):
        pass
    assert placed and (share / "f.bin").read_bytes() == data


def test_the_last_pieces_may_be_asked_of_a_second_source(share: Path) -> None:
    data = os.urandom(2 * PIECE)
    dl = download(Shares(share), data)
    slow, fast = Source(), Source()
    assert {dl.claim(slow), dl.claim(slow)} == {(0, PIECE), (PIECE, PIECE)}
    assert dl.claim(slow) is None  # slow has every piece claimed
    assert dl.claim(fast) == (0, PIECE)  # endgame: everything is claimed by slow, ask fast too
    assert dl.claim(fast) == (PIECE, PIECE)
    assert dl.claim(Source()) is None  # but not a third time
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    deliver(dl, fast, PIECE, [data[PIECE:]])
    deliver(dl, fast, 0, [data[:PIECE]])
    deliver(dl, slow, 0, [data[:PIECE]])  # the loser's copies are dropped
    assert placed and (share / "f.bin").read_bytes() == data


def test_sources_read_again_after_a_job_that_completes_no_piece(share: Path) -> None:
    """The backlog that paused the sources is made of pieces begun and not finished: the worker jobs
    that write it verify nothing, and the sources must still read again once it is written (they
    waited forever when only a verified piece resumed them)."""
    data = os.urandom(40 * PIECE)
    executor = ManualExecutor()
    dl = download(Shares(share), data, executor)
    a = Source()
    dl.attach(a)
    index = 0
    while not a.paused:
        deliver(dl, a, index * PIECE, [data[index * PIECE: index * PIECE + PIECE // 2]])
        index += 1
    assert dl.store.queued > HIGH_WATER and dl.verified == 0
    while executor.calls:
        executor.release_one()
    assert dl.verified == 0 and dl.store.queued == 0
    assert not a.paused
    abandon(dl)


def test_a_slow_disk_pauses_every_source_and_a_drained_one_resumes_them(share: Path) -> None:
    data = os.urandom(60 * PIECE)
    executor = ManualExecutor()
    dl = download(Shares(share), data, executor)
    a, b = Source(), Source()
    dl.attach(a)
    dl.attach(b)
    while not a.paused:
        feed(dl, a, data)
    assert b.paused
    names = [f.__name__ for f, _, _ in executor.calls]
    assert names == ["_work"]  # one worker job at a time, whatever is queued behind it
    assert dl.store.queued > HIGH_WATER
    while a.paused:
        executor.release_one()
    assert not b.paused and dl.store.queued < LOW_WATER
    dl.fail(TransferFailed("test over"))
    dl.done.addErrback(lambda f: None)
    executor.release_all()


def test_a_disk_error_fails_with_a_clear_message_and_removes_the_file(share: Path) -> None:
    def full(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return fail(OSError(errno.ENOSPC, "No space left on device"))

    data = os.urandom(2 * PIECE)
    dl = download(Shares(share), data, full)
    failures: list[Failure] = []
    dl.done.addErrback(failures.append)
    feed(dl, Source(), data)
    assert failures[0].check(TransferFailed) and "No space left on device" in str(failures[0].value)
    assert not dl.tmp_path.exists() and not dl.store.have_path.exists()


def test_a_small_file_is_written_without_the_worker(share: Path) -> None:
    data = b"s" * 16384
    executor = ManualExecutor()
    dl = download(Shares(share), data, executor)
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    feed(dl, Source(), data)
    assert executor.calls == [] and placed == [share / "f.bin"]


def test_a_stopped_download_resumes_from_its_verified_pieces(share: Path) -> None:
    data = os.urandom(4 * PIECE + 7)
    shares = Shares(share)
    dl = download(shares, data)
    source = Source()
    dl.claim(source)
    deliver(dl, source, 0, [data[:PIECE]])
    deliver(dl, source, PIECE, [data[PIECE: 2 * PIECE]])
    dl.fail(TransferFailed("the peer stopped"), keep=True)
    dl.done.addErrback(lambda f: None)
    assert dl.tmp_path.exists() and dl.store.have_path.exists()

    again = download(Shares(share), data)  # as after a restart
    assert again.resumed_from == 2 * PIECE and not again.needs_manifest
    source = Source()
    claimed = {again.claim(source) for _ in range(3)}
    assert claimed == {(2 * PIECE, PIECE), (3 * PIECE, PIECE), (4 * PIECE, 7)}  # only what is missing
    placed: list[Path] = []
    again.done.addCallback(placed.append)
    for start in range(2 * PIECE, len(data), PIECE):
        deliver(again, source, start, [data[start: start + PIECE]])
    assert placed and (share / "f.bin").read_bytes() == data


def test_a_manifest_that_does_not_match_the_root_is_refused(share: Path) -> None:
    data = os.urandom(2 * PIECE)
    pieces, root = manifest(data)
    dl = Download(Shares(share), "f.bin", len(data), "0" * 64, executor=synchronously, piece_size=PIECE, root=root)
    assert dl.claim(Source()) is None  # nothing is asked for before the manifest
    assert not dl.set_manifest(pieces[:-1] + b"x")
    assert not dl.set_manifest(pieces[:32])
    assert dl.set_manifest(pieces)


def test_a_whole_file_mismatch_removes_everything(share: Path) -> None:
    data = os.urandom(PIECE + 5)
    pieces, root = manifest(data)
    dl = Download(Shares(share), "f.bin", len(data), "0" * 64, executor=synchronously, piece_size=PIECE, root=root,
                  verify_whole=True)  # as when the fetch names the content by its SHA-256
    dl.set_manifest(pieces)
    failures: list[Failure] = []
    dl.done.addErrback(failures.append)
    source = Source()
    while feed(dl, source, data):
        pass
    assert failures[0].check(VerificationFailed)
    assert not dl.tmp_path.exists() and not (share / "f.bin").exists()


def test_resumable_partial_downloads_survive_a_restart_and_junk_does_not(share: Path) -> None:
    shares = Shares(share)
    (shares.tmp / ("a" * 64 + ".part")).write_bytes(b"x")
    (shares.tmp / ("a" * 64 + ".have")).write_text("1 1048576 " + "b" * 64 + " 00 00\n")
    (shares.tmp / "0123.part").write_bytes(b"junk")
    (shares.tmp / ("c" * 64 + ".part")).write_bytes(b"no state beside it")
    assert sorted(p.name for p in Shares(share).tmp.iterdir()) == ["a" * 64 + ".have", "a" * 64 + ".part"]


def test_one_holder_is_asked_in_order_and_a_swarm_at_random_and_for_what_a_source_has(share: Path) -> None:
    """A single holder's pieces come in order (the whole-file hash keeps up from memory) after the
    first RANDOM_START, taken at random so that peers starting together do not all ask for piece 0.
    Peers fetching one file at once (swarming) pick at random, so they can trade; a partial source
    is asked only for what it has, and the pieces of the lowest rank come first."""
    data = os.urandom(24 * PIECE)
    starts = set()
    for _ in range(10):
        dl = download(Shares(share), data)
        first = [dl.claim(Source())[0] // PIECE for _ in range(RANDOM_START)]
        rest = [dl.claim(Source()) for _ in range(3)]  # then in order, by runs of up to RUN bytes
        expected = [i for i in range(24) if i not in first]
        got = [i for offset, length in rest for i in range(offset // PIECE, (offset + length) // PIECE)]
        assert got == expected[:len(got)] and all(length <= RUN for _, length in rest)
        starts.add(first[0])
        abandon(dl)
    assert len(starts) > 3

    firsts = set()
    for _ in range(20):
        dl = download(Shares(share), data)
        dl.swarming = True
        offset, length = dl.claim(Source())
        assert length == PIECE
        firsts.add(offset)
        abandon(dl)
    assert len(firsts) > 5 and max(firsts) > 12 * PIECE  # anywhere in the file

    dl = download(Shares(share), data)
    dl.swarming = True
    partial, full = Source(), Source()
    odd = {i for i in range(24) if i % 2}
    for _ in range(10):
        offset, _length = dl.claim(partial, has=lambda i: i in odd)
        assert offset // PIECE in odd
    for _ in range(5):
        offset, _length = dl.claim(full, rank=lambda i: 1 if i in odd else 0)
        assert offset // PIECE not in odd
    assert dl.claim(Source(), has=lambda i: False) is None
    abandon(dl)


def test_watchers_hear_of_each_verified_piece_and_not_of_bad_ones(share: Path) -> None:
    data = os.urandom(4 * PIECE)
    dl = download(Shares(share), data)
    heard: list[int] = []

    class Watcher:
        def piece_verified(self, index: int) -> None:
            heard.append(index)

    dl.watchers.add(Watcher())
    source = Source()
    dl.attach(source)
    deliver(dl, source, 2 * PIECE, [data[2 * PIECE: 3 * PIECE]])
    deliver(dl, source, 0, [b"x" * PIECE])  # corrupt
    assert heard == [2] and source.bad == [0]


def test_pieces_arriving_in_any_order_give_the_whole_file(share: Path) -> None:
    """The whole-file hash runs in order, from memory or reading verified pieces back."""
    import random
    data = os.urandom(40 * PIECE + 5)
    executor = ManualExecutor()
    dl = download(Shares(share), data, executor)
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    source = Source()
    dl.attach(source)
    order = list(range(41))
    random.Random(7).shuffle(order)
    for index in order:
        deliver(dl, source, index * PIECE, [data[index * PIECE: (index + 1) * PIECE]])
        if index % 3:
            executor.release_all()
    while executor.calls:
        executor.release_all()
    assert placed and (share / "f.bin").read_bytes() == data


def shares_in(share: Path, name: str) -> Shares:
    (share / name).mkdir()
    return Shares(share / name)


def test_pieces_are_hashed_once_and_the_whole_file_only_when_asked_for(share: Path) -> None:
    """With a manifest, each byte is hashed once, as it is written; the file is read back for its
    SHA-256 only when the fetch named that hash (or there is no manifest to check pieces against)."""
    data = os.urandom(3 * PIECE)
    for verify_whole in (False, True):
        executor = ManualExecutor()
        dl = download(shares_in(share, str(verify_whole)), data, executor, verify_whole=verify_whole)
        placed: list[Path] = []
        dl.done.addCallback(placed.append)
        source = Source()
        while feed(dl, source, data):
            pass
        names = []
        while executor.calls:
            names.append(executor.calls[0][0].__name__)
            executor.release_one()
        assert set(names) == ({"_work", "read_back"} if verify_whole else {"_work"})
        assert placed and placed[0].read_bytes() == data

    no_manifest = Download(shares_in(share, "none"), "f.bin", len(data), hashlib.sha256(data).hexdigest(),
                           executor=synchronously)
    assert no_manifest.verify_whole  # nothing else could be checked
    one_piece = download(shares_in(share, "one"), data[:1000])
    assert not one_piece.verify_whole and not one_piece.needs_manifest  # the piece's digest is the file's
    abandon(no_manifest)
    abandon(one_piece)


def test_an_endgame_copy_is_written_only_when_it_verifies_first(share: Path) -> None:
    data = os.urandom(2 * PIECE)
    dl = download(Shares(share), data)
    slow, fast = Source(), Source()
    for s in (slow, fast):
        dl.attach(s)
    assert {dl.claim(slow), dl.claim(slow)} == {(0, PIECE), (PIECE, PIECE)}
    assert dl.claim(fast) is not None  # endgame copy of one piece
    offset = next(o for o, _ in [(0, 0), (PIECE, 0)] if fast in dl.picker.claims.get(o // PIECE, ()))
    index = offset // PIECE
    half = PIECE // 2
    piece = data[offset: offset + PIECE]
    deliver(dl, slow, offset, [b"\0" * half])  # the writer's copy starts, corrupt
    deliver(dl, fast, offset, [piece])  # the copy, complete and good: written and verified
    assert dl.have[index] and not slow.bad
    deliver(dl, slow, offset + half, [b"\0" * half])  # the rest of the writer's copy is ignored
    with open(dl.tmp_path, "rb") as f:
        f.seek(offset)
        assert f.read(PIECE) == piece
    assert not slow.bad  # a late copy of a piece already in is not held against its source
    abandon(dl)


def test_failing_while_the_worker_holds_a_piece_waits_for_it_before_settling(share: Path) -> None:
    data = os.urandom(2 * PIECE)
    executor = ManualExecutor()
    dl = download(Shares(share), data, executor)
    feed(dl, Source(), data)
    settled: list[None] = []
    dl.settled.addCallback(settled.append)
    failures: list[Failure] = []
    dl.done.addErrback(failures.append)
    dl.fail(TransferFailed("connection lost"))
    assert failures and settled == [] and dl.tmp_path.exists()  # the worker still writes to it
    executor.release_all()
    assert settled == [None] and not dl.tmp_path.exists()


def test_a_job_leaves_its_writes_under_way_and_its_pieces_wait_for_them(share: Path,
                                                                         monkeypatch: Any) -> None:
    """A worker job hashes, copies and hands its direct writes to the disk's threads, and returns
    without waiting for them: the next job hashes meanwhile.  Its pieces are reported (verified,
    served, counted) only once their bytes are in the file: by the next job, or by a job of their own
    once nothing else is queued."""
    disk = threading.Event()  # the disk holds every write until the test lets it go
    direct = FileWriter._direct

    def slow(self: FileWriter, data: memoryview, offset: int) -> None:
        disk.wait(10.0)
        direct(self, data, offset)

    monkeypatch.setattr(FileWriter, "_direct", slow)
    data = os.urandom(3 * PIECE)
    executor = ManualExecutor()
    dl = download(Shares(share), data, executor)
    if not dl.store._writer.direct:
        abandon(dl)
        pytest.skip(f"the file system of {share} refuses O_DIRECT")
    placed: list[Path] = []
    dl.done.addCallback(placed.append)
    source = Source()
    dl.attach(source)
    deliver(dl, source, 0, [data[:PIECE]])
    started = time.monotonic()
    executor.release_one()  # piece 0: hashed, copied, written... not yet
    assert time.monotonic() - started < 5.0, "the job waited for its own writes"
    assert dl.verified == 0 and not dl.have[0]
    # nothing else is queued: a job of their own (no new bytes) waits for the disk
    assert [args for _, args, _ in executor.calls] == [([],)]
    disk.set()
    executor.release_one()
    assert dl.have[0] and dl.verified == PIECE
    deliver(dl, source, PIECE, [data[PIECE:]])
    while executor.calls:
        executor.release_one()
    assert dl.have[0] and dl.verified == 3 * PIECE
    assert placed and placed[0].read_bytes() == data


def test_a_file_of_one_piece_reads_and_writes_no_record_of_pieces(share: Path, monkeypatch: Any) -> None:
    """A file of one piece is verified whole or not at all: there is nothing to resume, so its
    download neither looks for a ``.have`` record nor writes one (a small file's fetch costs a few
    hundred microseconds of the requester's CPU, and those were a tenth of it)."""
    touched: list[tuple[str, str]] = []
    for method in ("read_text", "write_text"):
        real = getattr(Path, method)

        def spying(self: Path, *args: Any, _real: Any = real, _method: str = method, **kw: Any) -> Any:
            if self.suffix == ".have":
                touched.append((_method, self.name))
            return _real(self, *args, **kw)

        monkeypatch.setattr(Path, method, spying)
    for size in (100, PIECE):  # written on the reactor thread, and through the worker
        data = os.urandom(size)
        dl = download(shares_in(share, str(size)), data)
        placed: list[Path] = []
        dl.done.addCallback(placed.append)
        source = Source()
        dl.attach(source)
        while feed(dl, source, data):
            pass
        assert placed and placed[0].read_bytes() == data
    assert touched == []
    data = os.urandom(2 * PIECE)  # two pieces: the record is kept as they are verified
    dl = download(shares_in(share, "two"), data)
    dl.attach(Source())
    while feed(dl, Source(), data):
        pass
    assert ("write_text", f"{dl.sha256}.have") in touched
