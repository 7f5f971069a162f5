"""System test: a file of more than 4 GiB crosses the network, verified, with flat daemon memory.

A tracker and two peers run as ``twistd -n p2ptracker`` / ``twistd -n p2ppeer``
subprocesses, started with the helpers of ``test_system``.  The holder shares
one file; the requester fetches it with ``p2pshare get NAME --dir REQUESTER``,
as a user would.  The big file is 4 GiB + 1 MiB + 7 bytes: above 2**32, so a
32-bit size or offset anywhere would show, and with a short last piece.  It is
made in a moment: a sparse file (``truncate``) with random 1 MiB blocks written
at a few offsets (at 0, across 2**31, across 2**32, beyond 2**32, and at the
end), so that its content is not all zeros and a misplaced piece changes the hash.

Pass criteria, for a 256 MiB file and for the 4 GiB one, each in a network of
its own daemons:

1. the fetched file has the source's size and SHA-256 (hashed here,
   independently of the peers), and the requester's ``.p2pshare/tmp`` is empty;
2. the peak RSS (``VmHWM``, read from ``/proc/PID/status`` just before each
   daemon is stopped) of the tracker, the holder and the requester is under
   ``RSS_BOUND`` (200 MiB), and for the holder and the requester the 4 GiB peak
   is within ``FLAT_MARGIN`` (64 MiB) of the 256 MiB peak: memory does not
   grow with the size of the file.  The bound is the interpreter, Twisted and
   the control API (about 50 MiB: the tracker, which holds nothing, peaks at
   50 MiB) plus what a download holds by design, independent of the file's
   size: up to ``download.HIGH_WATER`` (8 MiB) of pieces waiting for the
   disk, a piece being assembled per source, the pieces kept for the
   whole-file hash, the ranges in flight and the socket buffers, with room to
   spare.  The margin allows for pieces of 4 MiB instead of 1 MiB (the
   manifest doubles the piece size above 2 GiB).  A daemon that kept a
   fraction of the file, or leaked a little per piece, would pass both.

   Measured on a 2-CPU VM (SHA-256 about 1.5 GB/s) shared with other test
   runs, against commit 96b3bf9 plus the swarming work in progress:
   tracker 50 MiB; holder 56-58 MiB (256 MiB) / 61-65 MiB (4 GiB); requester
   78-102 MiB (256 MiB) / 174-253 MiB (4 GiB), so the 4 GiB case FAILS: the
   requester's Python objects stay flat (tracemalloc: 26 MiB at the end) but
   glibc's malloc keeps the freed megabyte-sized buffers (1 MiB socket reads,
   pieces) in fragmented heaps and arenas.  With ``MALLOC_MMAP_THRESHOLD_=131072``
   in the daemons' environment (what a ``mallopt`` at start-up would do) the
   requester peaks at 64-71 MiB (256 MiB) / 116-124 MiB (4 GiB), back to 54 MiB
   after the fetch, and the module passes.

3. The holder's index cache: restarting the holder does not hash the 4 GiB
   file again.  Its first start hashes it (two SHA-256 passes: the whole file
   and the pieces, several CPU seconds); the restart must use less than a
   third of that CPU time before it is ready.  Measured: first start 9-11 s
   of CPU, restart 0.5-0.7 s of CPU (1.2-2.7 s of wall time).

The whole module took 105-128 s on that loaded VM: the 4 GiB fetch itself
35-48 s, the holder's first start (hashing 4 GiB) up to 49 s of wall time for
9-11 s of CPU.  The 4 GiB test is skipped when the temporary folder has less
than 10 GiB free (the fetched copy is a real 4 GiB file; the source is sparse).
Both big files are deleted at the end, pass or fail.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from test_system import Daemon, accepts, cli, free_port, peer_status, poll, start_peer, start_tracker

pytestmark = pytest.mark.system

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
BIG = 4 * GiB + MiB + 7
SMALL = 256 * MiB
BLOCK = MiB  # random bytes written at each chosen offset of the sparse file
FREE_NEEDED = 10 * GiB
RSS_BOUND = 200 * MiB
FLAT_MARGIN = 64 * MiB
NAME = "big.bin"
START_DEADLINE = 180.0  # seconds for a holder to hash its 4 GiB file and register, on a slow disk
FETCH_TIMEOUT = 600.0  # seconds for the CLI's fetch of 4 GiB, a generous ceiling


# -- the file ------------------------------------------------------------------------------------


def make_sparse_file(path: Path, size: int, seed: int) -> list[int]:
    """A sparse file of *size* bytes with random BLOCKs at a few offsets; returns those offsets."""
    wanted = [0, size // 3, 2**31 - 3, 2**32 - BLOCK // 2, 2**32 + 5 * MiB + 11, size - BLOCK]
    offsets = sorted({o for o in wanted if 0 <= o and o + BLOCK <= size})
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for offset in offsets:
            os.pwrite(f.fileno(), rng.randbytes(BLOCK), offset)
    return offsets


def file_sha256(path: Path) -> str:
    """SHA-256 of a file of any size, in 4 MiB reads (hashlib releases the GIL: runs well in a thread)."""
    h = hashlib.sha256()
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# -- /proc ---------------------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A size from /proc/PID/status, in bytes: ``VmHWM`` (peak resident set size), ``VmRSS``..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            value, unit = line.split()[1:3]
            assert unit == "kB"
            return int(value) * KiB
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def vm_hwm(pid: int) -> int:
    return proc_status(pid, "VmHWM")


class RssSampler(threading.Thread):
    """Records a daemon's RSS as its download passes each quarter of the file (for the report only).

    Progress is what the temporary files in *tmp* occupy on disk (pieces may come out of order).
    """

    def __init__(self, pid: int, tmp: Path, size: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.tmp, self.size = pid, tmp, size
        self.at: dict[int, int] = {}  # quarter (1-3) -> RSS in bytes
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            try:
                got = sum(p.stat().st_blocks * 512 for p in self.tmp.glob("*.part"))
                rss = proc_status(self.pid, "VmRSS")
            except (OSError, AssertionError):
                continue
            for quarter in range(1, min(3, got * 4 // self.size) + 1):
                self.at.setdefault(quarter, rss)

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.join()
        seen = {f"{25 * q}%": rss for q, rss in sorted(self.at.items())}
        try:
            seen["done"] = proc_status(self.pid, "VmRSS")
        except OSError:
            pass  # it exited: the caller's checks say so
        return seen


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time *pid* has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def stop_measured(daemon: Daemon) -> int:
    """VmHWM of a running daemon read just before stopping it."""
    assert daemon.proc.poll() is None, f"{daemon.name} exited early ({daemon.proc.returncode}):\n" \
                                       f"{daemon.output()[-3000:]}"
    try:
        return vm_hwm(daemon.proc.pid)
    finally:
        daemon.stop()


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one fetch of one file measured."""

    size: int
    fetch_seconds: float = 0.0
    holder_start_seconds: float = 0.0
    holder_start_cpu: float = 0.0
    restart_seconds: Optional[float] = None
    restart_cpu: Optional[float] = None
    rss: dict[str, int] = field(default_factory=dict)  # daemon -> VmHWM in bytes
    requester_rss: dict[str, int] = field(default_factory=dict)  # VmRSS at 25%, 50%, 75% and done
    total_seconds: float = 0.0

    def report(self) -> str:
        rss = ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in self.rss.items())
        during = ", ".join(f"{k} {v / MiB:.0f}" for k, v in self.requester_rss.items())
        restart = "" if self.restart_seconds is None else \
            f"; holder restart {self.restart_seconds:.1f}s wall / {self.restart_cpu:.2f}s CPU"
        return (f"{self.size} bytes: fetched in {self.fetch_seconds:.1f}s "
                f"({self.size / MiB / max(self.fetch_seconds, 1e-9):.0f} MiB/s); holder first start "
                f"{self.holder_start_seconds:.1f}s wall / {self.holder_start_cpu:.2f}s CPU{restart}; "
                f"peak RSS {rss}; requester RSS (MiB) at {during}; {self.total_seconds:.1f}s in all")


def registered(root: Path, directory: Path) -> Optional[bool]:
    """True once the peer sharing *directory* is registered with the tracker and has a neighbour."""
    status = peer_status(root, directory)
    return True if status and status["tracker"]["connected"] and status["neighbours"] else None


def start_holder(root: Path, tracker_address: str, others: tuple[Daemon, ...]) -> tuple[Daemon, float, float]:
    """Start the holder; return it once ready, with the wall and CPU seconds it took.

    A peer registers with the tracker only after its first scan of the folder, so
    this includes hashing the file, or finding it in the index cache.
    """
    (root / "holder" / ".p2pshare" / "peer.json").unlink(missing_ok=True)
    started = time.monotonic()
    holder = start_peer(root, "holder", tracker_address, "--refresh", "0.5", "--rescan", "3600")
    try:
        poll(lambda: registered(root, root / "holder"), "the holder indexed its file and registered",
             (*others, holder), START_DEADLINE)
    except BaseException:
        holder.stop()
        raise
    return holder, time.monotonic() - started, cpu_seconds(holder.proc.pid)


def fetch_big_file(root: Path, size: int, seed: int, restart: bool = False) -> Run:
    """Holder shares a *size*-byte file, requester fetches it with the CLI; every check of criterion 1 here.

    With *restart*, the holder is then restarted (criterion 3) before the daemons are stopped.
    """
    began = time.monotonic()
    run = Run(size)
    holder_dir, requester_dir = root / "holder", root / "requester"
    holder_dir.mkdir()
    requester_dir.mkdir()
    source, fetched = holder_dir / NAME, requester_dir / NAME
    daemons: list[Daemon] = []

    def logs() -> str:
        return "".join(f"\n--- {d.name}\n{d.output()[-1500:]}" for d in daemons)

    try:
        make_sparse_file(source, size, seed)
        with ThreadPoolExecutor(1) as pool:
            source_hash = pool.submit(file_sha256, source)  # meanwhile, the holder hashes it too
            address = f"127.0.0.1:{free_port()}"
            tracker = start_tracker(root, f"tcp:{address.split(':')[1]}:interface=127.0.0.1")
            daemons.append(tracker)
            poll(lambda: accepts(address), "the tracker listening", (tracker,))
            requester = start_peer(root, "requester", address, "--refresh", "0.5", "--rescan", "3600")
            daemons.append(requester)
            holder, run.holder_start_seconds, run.holder_start_cpu = start_holder(root, address, tuple(daemons))
            daemons.append(holder)
            poll(lambda: registered(root, requester_dir), "the requester registered, with a neighbour",
                 tuple(daemons))
            expected = source_hash.result()

        sampler = RssSampler(requester.proc.pid, requester_dir / ".p2pshare" / "tmp", size)
        sampler.start()
        started = time.monotonic()
        try:
            result = cli("get", NAME, "--dir", str(requester_dir), cwd=root, timeout=FETCH_TIMEOUT)
        finally:
            run.fetch_seconds = time.monotonic() - started
            run.requester_rss = sampler.stop()
        assert result.returncode == 0, result.stderr + logs()
        assert "verified" in result.stdout, result.stdout
        assert fetched.stat().st_size == size
        assert list((requester_dir / ".p2pshare" / "tmp").iterdir()) == []
        assert file_sha256(fetched) == expected, "the fetched file differs from the source"
        fetched.unlink()  # gigabytes of real blocks: free them now

        run.rss["holder"] = stop_measured(holder)
        if restart:
            holder, run.restart_seconds, run.restart_cpu = start_holder(root, address, (tracker, requester))
            daemons.append(holder)
            status = peer_status(root, holder_dir)
            assert status is not None and status["files"] == 1, status
            holder.stop()
        run.rss["requester"] = stop_measured(requester)
        run.rss["tracker"] = stop_measured(tracker)
    finally:
        for d in daemons:
            d.stop()
        source.unlink(missing_ok=True)
        fetched.unlink(missing_ok=True)
    run.total_seconds = time.monotonic() - began
    return run


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The 256 MiB run, which the 4 GiB run is compared with."""
    root = tmp_path_factory.mktemp("small")
    if shutil.disk_usage(root).free < 2 * GiB:
        pytest.skip(f"less than 2 GiB free in {root}")
    run = fetch_big_file(root, SMALL, seed=256)
    print(f"\n256 MiB run: {run.report()}")
    return run


def test_a_256_mib_file_is_fetched_verified_with_bounded_memory(baseline: Run) -> None:
    for daemon, peak in baseline.rss.items():
        assert peak < RSS_BOUND, f"{daemon} peaked at {peak / MiB:.0f} MiB for 256 MiB ({baseline.report()})"


def test_a_file_above_4_gib_is_fetched_verified_with_flat_memory(tmp_path: Path, baseline: Run) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < FREE_NEEDED:
        pytest.skip(f"needs {FREE_NEEDED / GiB:.0f} GiB free in {tmp_path} for a 4 GiB copy, "
                    f"has {free / GiB:.1f} GiB")
    run = fetch_big_file(tmp_path, BIG, seed=4, restart=True)
    print(f"\n4 GiB run: {run.report()}")
    for daemon, peak in run.rss.items():
        assert peak < RSS_BOUND, f"{daemon} peaked at {peak / MiB:.0f} MiB for 4 GiB ({run.report()})"
    for daemon in ("holder", "requester"):
        grew = run.rss[daemon] - baseline.rss[daemon]
        assert grew < FLAT_MARGIN, f"{daemon}'s peak grew by {grew / MiB:.0f} MiB from 256 MiB to 4 GiB:\n" \
                                   f"{baseline.report()}\n{run.report()}"
    # Criterion 3: the restart found the index cache and did not hash 4 GiB again.
    assert run.restart_cpu is not None and run.restart_cpu < run.holder_start_cpu / 3, run.report()


def test_helpers_describe_the_file_as_the_docstring_says(tmp_path: Path) -> None:
    """The sparse file has random blocks where it should, and reads back with the hash we compute."""
    path = tmp_path / "f"
    offsets = make_sparse_file(path, 3 * MiB + 7, seed=1)
    assert offsets == [0, MiB + 2, 2 * MiB + 7]
    data = path.read_bytes()
    assert len(data) == 3 * MiB + 7 and data.count(0) < len(data) // 100
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
