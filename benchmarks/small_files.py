"""Benchmark 2, many small files: 16 KiB files fetched one after another through the daemon.

A requester ``twistd p2ppeer`` fetches each file with ``POST /v1/get`` on one
kept-alive HTTP connection, waiting for ``done`` before asking for the next:
each fetch is a search, an offer connection, a range, a verification and a
rename.  Baseline in the same repeat: the same files over raw sockets, one new
connection per file (the raw server of benchmark 1).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from benchmarks.baselines import raw_fetch
from benchmarks.daemons import can_connect, free_ports, remove_fetched, start_peer, wait_for, wait_ready
from benchmarks.harness import Context, Figure, Goal

BENCH = "2 small files"
FILE_SIZE = 16 * 1024


def run(ctx: Context) -> list[Figure]:
    count = ctx.size(1000, 100, 10)
    names = [f"small/f{i:05d}.bin" for i in range(count)]
    holder_dir = ctx.folder("small", "holder")
    (holder_dir / "small").mkdir(exist_ok=True)
    for name in names:
        (holder_dir / name).write_bytes(os.urandom(FILE_SIZE))
    requester_dir, raw_dir = ctx.folder("small", "requester"), ctx.folder("small", "raw")
    holder_port, requester_port, raw_port = free_ports(3)
    holder = start_peer(ctx, holder_dir, holder_port, [requester_port], "small-holder")
    requester = start_peer(ctx, requester_dir, requester_port, [holder_port], "small-requester")
    raw = ctx.procs.start([sys.executable, "-m", "benchmarks.baselines", "rawfile", str(holder_dir),
                           str(raw_port)], ctx.folder("logs") / "small-raw.log")
    control = None
    try:
        wait_ready(holder, files=count)
        control = wait_ready(requester)
        wait_for(lambda: can_connect("127.0.0.1", raw_port), "the raw server to listen", proc=raw)

        def once(i: int) -> tuple[float, float, float]:
            assert control is not None
            per_file = []
            started = time.perf_counter()
            for name in names:
                t0 = time.perf_counter()
                control.get(name, timeout=60.0)
                per_file.append(time.perf_counter() - t0)
            p2p_rate = count / (time.perf_counter() - started)
            fetched = sum((requester_dir / n).stat().st_size == FILE_SIZE for n in names)
            remove_fetched(requester_dir, names)
            started = time.perf_counter()
            for name in names:
                raw_fetch(raw_port, name, raw_dir / "f.bin")
            raw_rate = count / (time.perf_counter() - started)
            if fetched != count:
                raise AssertionError(f"only {fetched} of {count} files arrived whole")
            return p2p_rate, statistics.median(per_file) * 1000, raw_rate

        rounds = ctx.repeat(once)
    finally:
        if control is not None:
            control.close()
        for proc in (holder.proc, requester.proc, raw):
            ctx.procs.stop(proc)
    p2p, per_file, raw_rates = ([r[k] for r in rounds] for k in range(3))
    return [
        Figure(BENCH, f"{count} x 16 KiB via the control API", "files/s", p2p, Goal(">=", 500)),
        Figure(BENCH, "time per file, median", "ms", per_file),
        Figure(BENCH, "raw socket baseline, a connection per file", "files/s", raw_rates),
        Figure(BENCH, "p2pshare / raw", "x", [p / r for p, r in zip(p2p, raw_rates)]),
    ]
