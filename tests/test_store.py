"""The download's disk side: ``FileWriter`` puts every byte where it belongs, with direct writes or
without them.  Pure file I/O in a temporary folder, no sockets."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from p2pshare.store import ALIGN, FileWriter

MIB = 1024 * 1024


def _runs(data: bytes, piece: int, rng: random.Random) -> list[tuple[int, list[memoryview]]]:
    """Each piece cut into segments of random sizes (as socket reads come), grouped into runs of
    consecutive segments (as worker jobs take them); the pieces in random order."""
    out = []
    starts = list(range(0, len(data), piece))
    rng.shuffle(starts)
    for start in starts:
        end, at = min(len(data), start + piece), start
        run: list[memoryview] = []
        run_at = start
        while at < end:
            n = min(end - at, rng.choice((1, 7, 100, 4095, 4096, 4097, 65536, 200_000)))
            run.append(memoryview(data)[at:at + n])
            at += n
            if rng.random() < 0.3 or at == end:
                out.append((run_at, run))
                run, run_at = [], at
    return out


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Bytes written per file descriptor."""
    written: dict[int, int] = {}
    pwritev = os.pwritev

    def counting(fd: int, buffers: Any, offset: int) -> int:
        n = pwritev(fd, buffers, offset)
        written[fd] = written.get(fd, 0) + n
        return n

    monkeypatch.setattr(os, "pwritev", counting)
    return written


def _fail_writes_to(monkeypatch: pytest.MonkeyPatch, fd: Any, code: int) -> None:
    """From now on every write to *fd* raises OSError(*code*); other descriptors are written."""
    pwritev = os.pwritev

    def failing(to: int, buffers: Any, offset: int) -> int:
        if to == fd:
            raise OSError(code, os.strerror(code))
        return pwritev(to, buffers, offset)

    monkeypatch.setattr(os, "pwritev", failing)


def _writer(tmp_path: Path, size: int, direct: bool = True) -> tuple[FileWriter, Any]:
    f = open(tmp_path / "file.part", "w+b")
    writer = FileWriter(tmp_path / "file.part", f.fileno(), size, direct=direct)
    if direct and not writer.direct:
        f.close()
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    return writer, f


@pytest.mark.parametrize("seed", range(4))
def test_direct_writes_put_every_byte_in_place_whatever_the_cuts(tmp_path: Path, seed: int,
                                                                 counted: dict[int, int]) -> None:
    """5 pieces of 1 MiB and a last one of 1,234 bytes, cut and ordered at random: the file is the
    data exactly, and all but the file's last partial block went through the direct descriptor."""
    rng = random.Random(seed)
    data = rng.randbytes(5 * MIB + 1234)
    writer, f = _writer(tmp_path, len(data))
    direct_fd, fd = writer.direct_fd, f.fileno()
    assert direct_fd is not None
    for offset, views in _runs(data, MIB, rng):
        writer.write(views, offset)
    writer.close()
    f.close()
    assert (tmp_path / "file.part").read_bytes() == data
    assert counted == {direct_fd: len(data) - len(data) % ALIGN, fd: len(data) % ALIGN}


def test_a_whole_piece_and_a_piece_in_runs_side_by_side(tmp_path: Path) -> None:
    """A piece written at once (an endgame copy) beside pieces arriving in unaligned runs."""
    rng = random.Random(9)
    data = rng.randbytes(3 * MIB)
    writer, f = _writer(tmp_path, len(data))
    view = memoryview(data)
    writer.write([view[:5000]], 0)
    writer.write([view[MIB:2 * MIB]], MIB)  # whole, in one view
    writer.write([view[5000:9000], view[9000:MIB]], 5000)
    writer.write([view[2 * MIB:2 * MIB + 1]], 2 * MIB)
    writer.write([view[2 * MIB + 1:]], 2 * MIB + 1)
    writer.close()
    f.close()
    assert (tmp_path / "file.part").read_bytes() == data


def test_a_refused_direct_write_falls_back_to_ordinary_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that accepts O_DIRECT at open but refuses the writes (EINVAL): what was waiting
    for its block and everything after are written the ordinary way; the file is still exact."""
    rng = random.Random(3)
    data = rng.randbytes(2 * MIB + 10)
    writer, f = _writer(tmp_path, len(data))
    view = memoryview(data)
    writer.write([view[:3000]], 0)  # a head of 3,000 bytes waits for its block
    _fail_writes_to(monkeypatch, writer.direct_fd, errno.EINVAL)
    writer.write([view[3000:MIB + 5]], 3000)
    writer.drain()  # the writes are under way in the writer's thread until then
    assert not writer.direct
    writer.write([view[MIB + 5:]], MIB + 5)
    writer.close()
    f.close()
    assert (tmp_path / "file.part").read_bytes() == data


def test_without_direct_writes_the_same_bytes_land(tmp_path: Path, counted: dict[int, int]) -> None:
    rng = random.Random(4)
    data = rng.randbytes(2 * MIB + 77)
    writer, f = _writer(tmp_path, len(data), direct=False)
    fd = f.fileno()
    assert writer.direct_fd is None
    for offset, views in _runs(data, MIB, rng):
        writer.write(views, offset)
    f.close()
    assert (tmp_path / "file.part").read_bytes() == data and counted == {fd: len(data)}


def test_a_failed_write_fails_the_job_that_waits_for_it_and_not_the_close(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error in a writer thread reaches the worker job when it waits for its writes (the job
    fails, and with it the download, which reports no piece of it); closing afterwards raises nothing."""
    data = random.Random(5).randbytes(3 * MIB)
    writer, f = _writer(tmp_path, len(data))
    _fail_writes_to(monkeypatch, writer.direct_fd, errno.EIO)
    with pytest.raises(OSError) as raised:  # when a buffer is needed again, or at the latest when drained
        writer.write([memoryview(data)], 0)
        writer.drain()
    assert raised.value.errno == errno.EIO
    writer.close()  # the other writes under way failed too: nothing raised
    assert writer.direct_fd is None
    f.close()
