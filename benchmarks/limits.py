"""Benchmark 8, bandwidth limits: the rate a limited transfer achieves against the rate configured.

A holder ``twistd p2ppeer`` serves one file to a requester daemon through its control API
(``POST /v1/get``), once with the holder started with ``--max-upload-rate R`` and once with the
requester started with ``--max-download-rate R``.  The achieved rate is measured between the first
progress line and the end of the fetch (so the search and the dial are left out), on a file of R x
10 s (``--quick``: 3 s).  The baseline is the configured rate itself; the figures are the ratio and
its distance from 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.daemons import BenchmarkError, ControlClient, free_ports, remove_fetched, start_peer, wait_ready
from benchmarks.harness import Context, Figure, Goal, link_into

BENCH = "8 limits"
NAME = "limited.bin"


def timed_fetch(control: ControlClient, name: str) -> float:
    """Bytes a second from the first progress line to ``done``."""
    response = control._request("POST", "/v1/get", {"name": name, "timeout": 60}, timeout=600.0)
    first = None
    last: dict = {}
    for raw in response:
        if not raw.strip():
            continue
        last = json.loads(raw)
        if last.get("event") == "progress" and last["received"] > 0 and first is None:
            first = (time.perf_counter(), last["received"])
    end = time.perf_counter()
    if last.get("event") != "done" or first is None:
        raise BenchmarkError(f"the limited fetch failed: {last}")
    return (last["size"] - first[1]) / (end - first[0])


def run(ctx: Context) -> list[Figure]:
    rate = ctx.size(20_000_000, 10_000_000, 2_000_000)
    size = rate * ctx.size(10, 3, 1)
    data = ctx.random_file(size)
    figures = []
    for side in ("upload", "download"):
        holder_dir, requester_dir = ctx.folder("limits", side, "holder"), ctx.folder("limits", side, "requester")
        link_into(data, holder_dir, NAME)
        hport, rport = free_ports(2)
        limit = ["--max-upload-rate" if side == "upload" else "--max-download-rate", str(rate)]
        holder = start_peer(ctx, holder_dir, hport, [rport], f"limits-{side}-holder",
                            extra=limit if side == "upload" else ())
        requester = start_peer(ctx, requester_dir, rport, [hport], f"limits-{side}-requester",
                               extra=limit if side == "download" else ())
        control = None
        try:
            wait_ready(holder, files=1)
            control = wait_ready(requester)

            def once(i: int, control: ControlClient = control, requester_dir: Path = requester_dir) -> float:
                achieved = timed_fetch(control, NAME)
                remove_fetched(requester_dir, [NAME])
                return achieved / rate

            ratios = ctx.repeat(once)
        finally:
            if control is not None:
                control.close()
            for proc in (holder.proc, requester.proc):
                ctx.procs.stop(proc)
        figures += [
            Figure(BENCH, f"--max-{side}-rate {rate / 1e6:g} MB/s: achieved / configured", "x", ratios),
            Figure(BENCH, f"--max-{side}-rate: distance from the configured rate", "%",
                   [abs(r - 1) * 100 for r in ratios], Goal("<=", 10)),
        ]
    return figures
