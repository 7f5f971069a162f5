"""Benchmark 1, single-source verified transfer: one big file between two peer processes.

Two ``twistd p2ppeer`` processes on 127.0.0.1, each naming the other with
``--peer``; the requester's control API is asked ``POST /v1/get`` and the clock
stops when it reports the file verified and in place.  Two more peers, started
with the same ``--key`` file (``p2pshare keygen``), form a private network and
move the same file over TLS 1.3.  In every repeat the same file also goes
through two baselines, all four ways in rotating order:

* raw sockets: a process sending with ``socket.sendfile``, this process
  receiving with ``recv_into`` a 1 MiB buffer and writing to a file;
* ``python -m http.server`` and ``curl -o`` (curl's own ``time_total``).

CPU time is read around each fetch: the two daemons' from ``/proc/PID/stat``
(every thread), the raw sender's the same way, and the raw receiver's (the
thread of this process that calls :func:`raw_fetch`) from ``getrusage``.  The
daemons' CPU above the raw sender's and receiver's own is what p2pshare adds to
moving the bytes.  GB/s is 10^9 bytes per second; ratios and differences are
per repeat, then the median.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.baselines import raw_fetch
from benchmarks.daemons import (BenchmarkError, ControlClient, PeerDaemon, can_connect, cpu_seconds, free_ports,
                                keygen, remove_fetched, start_peer, thread_cpu_seconds, wait_for, wait_ready)
from benchmarks.harness import Context, Figure, Goal, link_into, size_text

BENCH = "1 transfer"
NAME = "big.bin"
GIB = 1 << 30
KEYED = "private network (--key, TLS 1.3)"

Sample = dict[str, float]  # seconds, and CPU seconds of the "sender" and the "receiver"


def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        raise BenchmarkError("curl is not installed (apt-get install curl)")
    return found


def _check(ctx: Context, got: Path, source: Path, size: int, what: str) -> None:
    if got.stat().st_size != size or (ctx.mode == "smoke" and not filecmp.cmp(got, source, shallow=False)):
        raise BenchmarkError(f"{what}: the received file differs from the original")


def p2p_fetch(ctx: Context, control: ControlClient, holder: PeerDaemon, requester: PeerDaemon, source: Path,
              size: int, what: str) -> Callable[[], Sample]:
    """One verified fetch through *requester*'s control API; its seconds and both daemons' CPU."""

    def once() -> Sample:
        holder_cpu, requester_cpu = cpu_seconds(holder.pid), cpu_seconds(requester.pid)
        started = time.perf_counter()
        done = control.get(NAME)
        seconds = time.perf_counter() - started
        holder_cpu, requester_cpu = cpu_seconds(holder.pid) - holder_cpu, cpu_seconds(requester.pid) - requester_cpu
        if done["size"] != size:
            raise BenchmarkError(f"{what} fetched {done['size']} bytes, expected {size}")
        _check(ctx, requester.folder / NAME, source, size, what)
        remove_fetched(requester.folder, [NAME])
        return {"seconds": seconds, "sender": holder_cpu, "receiver": requester_cpu}

    return once


def measure(ctx: Context, size: int) -> dict[str, list[Sample]]:
    """Per repeat, for p2pshare, its private network, raw sockets and http.server + curl moving *size* bytes."""
    source = ctx.random_file(size)
    holder_dir, key_holder_dir = ctx.folder("transfer", "holder"), ctx.folder("transfer", "key-holder")
    link_into(source, holder_dir, NAME)
    link_into(source, key_holder_dir, NAME)
    requester_dir, out_dir = ctx.folder("transfer", "requester"), ctx.folder("transfer", "baselines")
    key_requester_dir = ctx.folder("transfer", "key-requester")
    holder_port, requester_port, key_holder_port, key_requester_port, raw_port, http_port = free_ports(6)
    key = keygen(ctx)
    holder = start_peer(ctx, holder_dir, holder_port, [requester_port], "transfer-holder")
    requester = start_peer(ctx, requester_dir, requester_port, [holder_port], "transfer-requester")
    key_holder = start_peer(ctx, key_holder_dir, key_holder_port, [key_requester_port], "transfer-key-holder",
                            key=key)
    key_requester = start_peer(ctx, key_requester_dir, key_requester_port, [key_holder_port],
                               "transfer-key-requester", key=key)
    logs = ctx.folder("logs")
    raw = ctx.procs.start([sys.executable, "-m", "benchmarks.baselines", "rawfile", str(holder_dir), str(raw_port)],
                          logs / "transfer-raw.log")
    http = ctx.procs.start([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                            "--directory", str(holder_dir)], logs / "transfer-http.log")
    controls: list[ControlClient] = []
    try:
        wait_ready(holder, files=1, deadline=120.0)  # the first start hashes the file
        wait_ready(key_holder, files=1, deadline=120.0)
        controls += [wait_ready(requester), wait_ready(key_requester)]
        for port, proc in ((raw_port, raw), (http_port, http)):
            wait_for(lambda: can_connect("127.0.0.1", port), "a baseline server to listen", proc=proc)

        def raw_socket() -> Sample:
            target = out_dir / "raw.bin"
            sender, receiver = cpu_seconds(raw.pid), thread_cpu_seconds()
            got, seconds = raw_fetch(raw_port, NAME, target)
            receiver = thread_cpu_seconds() - receiver  # only this thread, only around the fetch
            sender = cpu_seconds(raw.pid) - sender  # it has sent everything once the fetch sees the end
            _check(ctx, target, source, size, "raw sockets")
            target.unlink()
            return {"seconds": seconds, "sender": sender, "receiver": receiver}

        def http_curl() -> Sample:
            target = out_dir / "curl.bin"
            done = subprocess.run([curl(), "-sS", "-o", str(target), "-w", "%{time_total}",
                                   f"http://127.0.0.1:{http_port}/{NAME}"], capture_output=True, text=True,
                                  timeout=600, check=True)
            _check(ctx, target, source, size, "curl")
            target.unlink()
            return {"seconds": float(done.stdout.strip())}

        ways: dict[str, Callable[[], Sample]] = {
            "p2p": p2p_fetch(ctx, controls[0], holder, requester, source, size, "p2pshare"),
            "raw": raw_socket,
            "curl": http_curl,
            "key": p2p_fetch(ctx, controls[1], key_holder, key_requester, source, size, KEYED),
        }

        def once(i: int) -> dict[str, Sample]:
            order = list(ways)
            order = order[i % len(order):] + order[: i % len(order)]  # rotate, so no way always goes first
            return {way: ways[way]() for way in order}

        rounds = ctx.repeat(once)
    finally:
        for control in controls:
            control.close()
        for proc in (holder.proc, requester.proc, key_holder.proc, key_requester.proc, raw, http):
            ctx.procs.stop(proc)
    return {way: [r[way] for r in rounds] for way in ways}


def run(ctx: Context) -> list[Figure]:
    size = ctx.size(1 << 30, 64 << 20, 1 << 20)
    got = measure(ctx, size)
    rate = {way: [size / r["seconds"] / 1e9 for r in samples] for way, samples in got.items()}
    vs_raw = [p / r for p, r in zip(rate["p2p"], rate["raw"])]
    vs_curl = [p / c for p, c in zip(rate["p2p"], rate["curl"])]
    key_vs_raw = [k / r for k, r in zip(rate["key"], rate["raw"])]

    def per_gib(way: str, side: str) -> list[float]:
        return [r[side] * GIB / size for r in got[way]]

    holder, requester = per_gib("p2p", "sender"), per_gib("p2p", "receiver")
    sender, receiver = per_gib("raw", "sender"), per_gib("raw", "receiver")
    label = f"{size >> 20} MiB"
    scaled = "" if size == GIB else f"; {size_text(size)} moved, scaled to 1 GiB"
    return [
        Figure(BENCH, f"p2pshare {label}, verified", "GB/s", rate["p2p"],
               note="two twistd p2ppeer processes; POST /v1/get until the file is verified and in place"),
        Figure(BENCH, "raw socket baseline", "GB/s", rate["raw"]),
        Figure(BENCH, "http.server + curl", "GB/s", rate["curl"]),
        Figure(BENCH, "p2pshare / raw", "x", vs_raw, Goal(">=", 0.6)),
        Figure(BENCH, "p2pshare / http.server + curl", "x", vs_curl, Goal(">=", 1.2)),
        Figure(BENCH, f"{KEYED} {label}, verified", "GB/s", rate["key"],
               note="two more twistd p2ppeer processes started with the same --key file (p2pshare keygen)"),
        Figure(BENCH, f"{size_text(size)} over a {KEYED} / raw", "x", key_vs_raw, Goal(">=", 0.3),
               note="against the raw socket baseline of the same repeat"),
        Figure(BENCH, "CPU-seconds per GiB above the raw sender's own, holder", "CPU-s/GiB",
               [h - s for h, s in zip(holder, sender)], Goal("<=", 0.4),
               note="holder daemon's user + system time over a fetch minus the raw sender's over a raw fetch, "
                    f"same repeat{scaled}"),
        Figure(BENCH, "CPU-seconds per GiB above the raw receiver's own, requester", "CPU-s/GiB",
               [r - s for r, s in zip(requester, receiver)], Goal("<=", 1.0),
               note="requester daemon's user + system time over a fetch minus the raw receiver's (this "
                    f"process's fetching thread) over a raw fetch, same repeat{scaled}"),
        Figure(BENCH, "holder CPU-seconds per GiB", "CPU-s/GiB", holder),
        Figure(BENCH, "requester CPU-seconds per GiB", "CPU-s/GiB", requester),
        Figure(BENCH, "raw sender CPU-seconds per GiB", "CPU-s/GiB", sender),
        Figure(BENCH, "raw receiver CPU-seconds per GiB", "CPU-s/GiB", receiver),
        Figure(BENCH, f"{KEYED} holder CPU-seconds per GiB", "CPU-s/GiB", per_gib("key", "sender")),
        Figure(BENCH, f"{KEYED} requester CPU-seconds per GiB", "CPU-s/GiB", per_gib("key", "receiver")),
    ]
