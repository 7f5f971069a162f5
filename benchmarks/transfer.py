"""Benchmark 1, single-source verified transfer: one big file between two peer processes.

Two ``twistd p2ppeer`` processes on 127.0.0.1, each naming the other with
``--peer``; the requester's control API is asked ``POST /v1/get`` and the clock
stops when it reports the file verified and in place.  In every repeat the same
file also goes through two baselines, in rotating order:

* raw sockets: a process sending with ``socket.sendfile``, this process
  receiving with ``recv_into`` a 1 MiB buffer and writing to a file;
* ``python -m http.server`` and ``curl -o`` (curl's own ``time_total``).

GB/s is 10^9 bytes per second.  The ratios are per repeat, then the median.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.baselines import raw_fetch
from benchmarks.daemons import (BenchmarkError, can_connect, free_ports, remove_fetched, start_peer, wait_for,
                                wait_ready)
from benchmarks.harness import Context, Figure, Goal, link_into

BENCH = "1 transfer"
NAME = "big.bin"


def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        raise BenchmarkError("curl is not installed (apt-get install curl)")
    return found


def _check(ctx: Context, got: Path, source: Path, size: int, what: str) -> None:
    if got.stat().st_size != size or (ctx.mode == "smoke" and not filecmp.cmp(got, source, shallow=False)):
        raise BenchmarkError(f"{what}: the received file differs from the original")


def measure(ctx: Context, size: int) -> dict[str, list[float]]:
    """Seconds per repeat for p2pshare, raw sockets and http.server + curl, moving *size* bytes."""
    source = ctx.random_file(size)
    holder_dir = ctx.folder("transfer", "holder")
    link_into(source, holder_dir, NAME)
    requester_dir, out_dir = ctx.folder("transfer", "requester"), ctx.folder("transfer", "baselines")
    holder_port, requester_port, raw_port, http_port = free_ports(4)
    holder = start_peer(ctx, holder_dir, holder_port, [requester_port], "transfer-holder")
    requester = start_peer(ctx, requester_dir, requester_port, [holder_port], "transfer-requester")
    logs = ctx.folder("logs")
    raw = ctx.procs.start([sys.executable, "-m", "benchmarks.baselines", "rawfile", str(holder_dir), str(raw_port)],
                          logs / "transfer-raw.log")
    http = ctx.procs.start([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                            "--directory", str(holder_dir)], logs / "transfer-http.log")
    control = None
    try:
        wait_ready(holder, files=1, deadline=120.0)  # the first start hashes the file
        control = wait_ready(requester)
        for port, proc in ((raw_port, raw), (http_port, http)):
            wait_for(lambda: can_connect("127.0.0.1", port), "a baseline server to listen", proc=proc)

        def p2p() -> float:
            started = time.perf_counter()
            assert control is not None
            done = control.get(NAME)
            seconds = time.perf_counter() - started
            if done["size"] != size:
                raise BenchmarkError(f"p2pshare fetched {done['size']} bytes, expected {size}")
            _check(ctx, requester_dir / NAME, source, size, "p2pshare")
            remove_fetched(requester_dir, [NAME])
            return seconds

        def raw_socket() -> float:
            target = out_dir / "raw.bin"
            got, seconds = raw_fetch(raw_port, NAME, target)
            _check(ctx, target, source, size, "raw sockets")
            target.unlink()
            return seconds

        def http_curl() -> float:
            target = out_dir / "curl.bin"
            done = subprocess.run([curl(), "-sS", "-o", str(target), "-w", "%{time_total}",
                                   f"http://127.0.0.1:{http_port}/{NAME}"], capture_output=True, text=True,
                                  timeout=600, check=True)
            _check(ctx, target, source, size, "curl")
            target.unlink()
            return float(done.stdout.strip())

        ways = {"p2p": p2p, "raw": raw_socket, "curl": http_curl}

        def once(i: int) -> dict[str, float]:
            order = list(ways)
            order = order[i % 3:] + order[: i % 3]  # rotate, so no way always goes first
            return {way: ways[way]() for way in order}

        rounds = ctx.repeat(once)
    finally:
        if control is not None:
            control.close()
        for proc in (holder.proc, requester.proc, raw, http):
            ctx.procs.stop(proc)
    return {way: [r[way] for r in rounds] for way in ways}


def run(ctx: Context) -> list[Figure]:
    size = ctx.size(1 << 30, 64 << 20, 1 << 20)
    seconds = measure(ctx, size)
    rate = {way: [size / s / 1e9 for s in values] for way, values in seconds.items()}
    vs_raw = [p / r for p, r in zip(rate["p2p"], rate["raw"])]
    vs_curl = [p / c for p, c in zip(rate["p2p"], rate["curl"])]
    label = f"{size >> 20} MiB"
    return [
        Figure(BENCH, f"p2pshare {label}, verified", "GB/s", rate["p2p"],
               note="two twistd p2ppeer processes; POST /v1/get until the file is verified and in place"),
        Figure(BENCH, "raw socket baseline", "GB/s", rate["raw"]),
        Figure(BENCH, "http.server + curl", "GB/s", rate["curl"]),
        Figure(BENCH, "p2pshare / raw", "x", vs_raw, Goal(">=", 0.7)),
        Figure(BENCH, "p2pshare / http.server + curl", "x", vs_curl),
    ]
