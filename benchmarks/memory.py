"""Benchmark 6, memory under load and start-up with many files.

* A holder (``twistd p2ppeer``) serves one big file to 8 requester daemons
  that all ask for it at once through their control APIs; its peak RSS
  (VmHWM, reset just before the downloads start) is the figure.  The holder
  knows no requester (its ``--peer`` is the discard port), so no search is
  forwarded from one requester to another; its ``bytes_sent`` counter shows
  how much of the 8 copies it served itself.
* A requester (``twistd p2ppeer``) fetches a 4 GiB file from a holder through
  its control API, once per repeat; its peak RSS (VmHWM, reset just before the
  fetch) is the figure.  A peak needs no warm-up, and each fetch moves 4 GiB.
* A peer sharing 10,000 files: time from spawning ``twistd`` to ready (its
  ``peer.json`` written, i.e. sockets listening and folder indexed, and the
  control API showing every file), with the index cache present; the first
  indexing of the same 1 GiB (cache removed; the files are in the page cache,
  so this is hashing, not disk, time).  Baselines in each repeat: the same
  start-up with an empty folder, and hashlib over the same files here.

Every daemon is driven as a user would: its command line and its control API.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.daemons import (STATE, BenchmarkError, ControlClient, PeerDaemon, free_ports, remove_fetched,
                                reset_peak_rss, rss_kib, start_peer, wait_ready)
from benchmarks.harness import Context, Figure, Goal, link_into, size_text

BENCH = "6 memory"
NAME = "big.bin"
BUFFER = 1024 * 1024


def _check_copy(ctx: Context, requester: PeerDaemon, done: dict[str, Any], source: Path, size: int) -> None:
    """The fetched copy has the original's size (and bytes, in smoke mode); then it is deleted."""
    got = requester.folder / NAME
    if done.get("size") != size or got.stat().st_size != size or (
            ctx.mode == "smoke" and not filecmp.cmp(got, source, shallow=False)):
        raise BenchmarkError(f"the copy of {NAME} in {requester.folder} differs from the original")
    remove_fetched(requester.folder, [NAME])


def serving(ctx: Context) -> list[Figure]:
    size, count = ctx.size(1 << 30, 128 << 20, 4 << 20), ctx.size(8, 8, 2)
    source = ctx.random_file(size)
    folder = ctx.folder("memory", "holder")
    link_into(source, folder, NAME)
    port, *ports = free_ports(1 + count)
    holder = start_peer(ctx, folder, port, label="memory-holder")
    requesters = [start_peer(ctx, ctx.folder("memory", f"requester-{k}"), p, [port], f"memory-requester-{k}")
                  for k, p in enumerate(ports)]
    holder_control: Optional[ControlClient] = None
    controls: list[ControlClient] = []
    try:
        holder_control = wait_ready(holder, files=1, deadline=120.0)
        controls += [wait_ready(r) for r in requesters]

        def once(i: int) -> tuple[float, float, float, float]:
            assert holder_control is not None
            before = holder_control.status().get("counters") or {}
            idle = rss_kib(holder.pid) / 1024
            reset_peak_rss(holder.pid)
            done: dict[int, Any] = {}

            def fetch(k: int) -> None:
                try:
                    done[k] = controls[k].get(NAME)
                except Exception as e:  # reported below, with the others
                    done[k] = e

            threads = [threading.Thread(target=fetch, args=(k,)) for k in range(count)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            peak = rss_kib(holder.pid, "VmHWM") / 1024
            after = holder_control.status().get("counters") or {}
            failed = {k: e for k, e in done.items() if isinstance(e, Exception)}
            if failed:
                raise BenchmarkError(f"{len(failed)} of {count} downloads failed: {failed}")
            for k, requester in enumerate(requesters):
                _check_copy(ctx, requester, done[k], source, size)
            sent = (after["bytes_sent"] - before.get("bytes_sent", 0)) / (count * size) \
                if "bytes_sent" in after else float("nan")
            return peak, idle, count * size / elapsed / 1e9, sent

        rounds = ctx.repeat(once)
    finally:
        for control in [holder_control, *controls]:
            if control is not None:
                control.close()
        for proc in [holder.proc, *(r.proc for r in requesters)]:
            ctx.procs.stop(proc)
    peak, idle, rate, sent = ([r[k] for r in rounds] for k in range(4))
    label = f"{count} x {size_text(size)}"
    figures = [
        Figure(BENCH, f"holder peak RSS serving {label}", "MB", peak, Goal("<=", 80),
               note=f"MiB, VmHWM; {count} twistd p2ppeer requesters ask at once through their control APIs"),
        Figure(BENCH, "holder RSS before the downloads", "MB", idle),
        Figure(BENCH, f"aggregate rate of the {count} downloads", "GB/s", rate,
               note="until the last requester has its copy verified and in place"),
    ]
    if all(x == x for x in sent):  # NaN: the peer has no bytes_sent counter
        figures.append(Figure(BENCH, f"holder bytes_sent / ({label})", "x", sent,
                              note="1 when the holder served every copy itself"))
    return figures


def requesting(ctx: Context) -> list[Figure]:
    """The peak RSS of a requester daemon while it fetches, verifies and places one big file."""
    size = ctx.size(4 << 30, 256 << 20, 4 << 20)
    source = ctx.random_file(size)
    holder_dir, requester_dir = ctx.folder("memory", "big-holder"), ctx.folder("memory", "requester")
    link_into(source, holder_dir, NAME)
    holder_port, requester_port = free_ports(2)
    holder = start_peer(ctx, holder_dir, holder_port, [requester_port], "memory-big-holder")
    requester = start_peer(ctx, requester_dir, requester_port, [holder_port], "memory-requester")
    control: Optional[ControlClient] = None
    try:
        wait_ready(holder, files=1, deadline=300.0).close()  # the first start hashes the file
        control = wait_ready(requester)

        def once(i: int) -> tuple[float, float, float]:
            assert control is not None
            idle = rss_kib(requester.pid) / 1024
            reset_peak_rss(requester.pid)
            started = time.perf_counter()
            done = control.get(NAME, timeout=1800.0)
            elapsed = time.perf_counter() - started
            peak = rss_kib(requester.pid, "VmHWM") / 1024
            _check_copy(ctx, requester, done, source, size)
            return peak, idle, size / elapsed / 1e9

        rounds = [once(i) for i in range(ctx.repeats)]  # no warm-up round: see the module's docstring
    finally:
        if control is not None:
            control.close()
        for proc in (holder.proc, requester.proc):
            ctx.procs.stop(proc)
    peak, idle, rate = ([r[k] for r in rounds] for k in range(3))
    label = size_text(size)
    return [
        Figure(BENCH, f"requester peak RSS fetching {label}", "MB", peak, Goal("<=", 80),
               note="MiB, VmHWM, from POST /v1/get until the file is verified and in place"),
        Figure(BENCH, "requester RSS before the fetch", "MB", idle),
        Figure(BENCH, f"rate of the {label} fetch", "GB/s", rate),
    ]


def make_tree(ctx: Context, count: int, total: int) -> Path:
    """*count* random files adding up to *total* bytes, 100 per subfolder."""
    folder = ctx.folder("memory", "many")
    each = total // count
    for i in range(count):
        path = folder / f"d{i // 100:03d}" / f"f{i:05d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(each))
    return folder


def start_to_ready(ctx: Context, folder: Path, files: int, label: str) -> float:
    """Seconds from spawning a peer sharing *folder* to it being ready with *files* files."""
    port, = free_ports(1)
    peer = start_peer(ctx, folder, port, label=label)
    try:
        wait_ready(peer, files=files, deadline=300.0).close()
        return time.monotonic() - peer.started
    finally:
        ctx.procs.stop(peer.proc)


def hash_all(folder: Path) -> float:
    """Seconds for hashlib to hash every shared file under *folder*: the floor for indexing."""
    started = time.perf_counter()
    for path in sorted(folder.rglob("*.bin")):
        if STATE not in path.parts:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(BUFFER):
                    digest.update(chunk)
    return time.perf_counter() - started


def startup(ctx: Context) -> list[Figure]:
    count, total = ctx.size(10_000, 2_000, 200), ctx.size(1 << 30, 128 << 20, 4 << 20)
    folder = make_tree(ctx, count, total)
    empty = ctx.folder("memory", "empty")

    def once(i: int) -> tuple[float, float, float, float]:
        (folder / STATE / "index.json").unlink(missing_ok=True)
        first = start_to_ready(ctx, folder, count, "memory-first-index")
        if not (folder / STATE / "index.json").exists():
            raise BenchmarkError("the peer wrote no index cache")
        cached = start_to_ready(ctx, folder, count, "memory-cached")
        bare = start_to_ready(ctx, empty, 0, "memory-empty")
        return cached, first, bare, hash_all(folder)

    rounds = ctx.repeat(once)
    cached, first, bare, floor = ([r[k] for r in rounds] for k in range(4))
    label = f"{count:,} files"
    return [
        Figure(BENCH, f"start to ready, {label}, index cached", "s", cached, Goal("<", 2)),
        Figure(BENCH, "start to ready, empty folder (baseline)", "s", bare),
        Figure(BENCH, f"first indexing, {total >> 20} MiB in {label}", "s", first,
               note="start to ready without the index cache; files in the page cache"),
        Figure(BENCH, "hashlib over the same files (floor)", "s", floor),
        Figure(BENCH, "first indexing / hashlib floor", "x", [f / h for f, h in zip(first, floor)]),
    ]


def run(ctx: Context) -> list[Figure]:
    return serving(ctx) + requesting(ctx) + startup(ctx)
