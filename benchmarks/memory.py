"""Benchmark 6, memory under load and start-up with many files.

* A holder (``twistd p2ppeer``) serves 8 concurrent downloads of one big file;
  its peak RSS (VmHWM, reset just before the downloads start) is the figure.
  The downloaders are 8 threads of this process speaking the transfer
  protocol directly (``open``, then ``get`` ranges two ahead, as the requester
  does) and hashing what they receive, so that the holder is the only p2pshare
  process measured and the bytes are checked against its offer.
* A peer sharing 10,000 files: time from spawning ``twistd`` to ready (its
  ``peer.json`` written, i.e. sockets listening and folder indexed, and the
  control API showing every file), with the index cache present; the first
  indexing of the same 1 GiB (cache removed; the files are in the page cache,
  so this is hashing, not disk, time).  Baselines in each repeat: the same
  start-up with an empty folder, and hashlib over the same files here.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path

from p2pshare.wire import Frame

from benchmarks.daemons import (STATE, BenchmarkError, free_ports, reset_peak_rss, rss_kib, start_peer,
                                wait_ready)
from benchmarks.harness import Context, Figure, Goal, link_into

BENCH = "6 memory"
NAME = "big.bin"
BUFFER = 1024 * 1024
RANGE, WINDOW = 16 * 1024 * 1024, 2  # what p2pshare's requester asks for: ranges of 16 MiB, two ahead


class Reader:
    """Control lines and raw bytes from one blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.chunk = bytearray(BUFFER)

    def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            data = self.sock.recv(65536)
            if not data:
                raise BenchmarkError("the holder closed the connection")
            self.buf += data
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return line

    def into_hash(self, length: int, digest: "hashlib._Hash") -> None:
        take = min(length, len(self.buf))
        digest.update(self.buf[:take])
        del self.buf[:take]
        length -= take
        view = memoryview(self.chunk)
        while length:
            n = self.sock.recv_into(view[: min(length, BUFFER)])
            if not n:
                raise BenchmarkError("the holder closed the connection mid-range")
            digest.update(view[:n])
            length -= n


def download(port: int, name: str) -> bool:
    """Fetch *name* from the holder on *port*; True if the bytes hash to what it offered."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = Reader(sock)
        sock.sendall(Frame("open", name=name).encode() + b"\n")
        offer = Frame.decode(reader.line())
        if offer.t != "offer":
            raise BenchmarkError(f"the holder answered {offer}")
        digest = hashlib.sha256()
        asked = received = 0
        outstanding: deque[int] = deque()
        while received < offer.size:
            while len(outstanding) < WINDOW and asked < offer.size:
                length = min(RANGE, offer.size - asked)
                sock.sendall(Frame("get", offset=asked, length=length).encode() + b"\n")
                outstanding.append(length)
                asked += length
            data = Frame.decode(reader.line())
            if data.t != "data" or data.length != outstanding.popleft():
                raise BenchmarkError(f"unexpected frame {data}")
            reader.into_hash(data.length, digest)
            received += data.length
        sock.sendall(Frame("bye").encode() + b"\n")
    return digest.hexdigest() == offer.sha256


def serving(ctx: Context) -> list[Figure]:
    size, count = ctx.size(1 << 30, 128 << 20, 4 << 20), ctx.size(8, 8, 2)
    folder = ctx.folder("memory", "holder")
    link_into(ctx.random_file(size), folder, NAME)
    port, = free_ports(1)
    holder = start_peer(ctx, folder, port, label="memory-holder")
    try:
        wait_ready(holder, files=1, deadline=120.0).close()

        def once(i: int) -> tuple[float, float, float]:
            idle = rss_kib(holder.pid) / 1024
            reset_peak_rss(holder.pid)
            results: list[bool] = []
            threads = [threading.Thread(target=lambda: results.append(download(port, NAME))) for _ in range(count)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            if results != [True] * count:
                raise BenchmarkError(f"{results.count(True)} of {count} downloads arrived intact")
            return rss_kib(holder.pid, "VmHWM") / 1024, idle, count * size / elapsed / 1e9

        rounds = ctx.repeat(once)
    finally:
        ctx.procs.stop(holder.proc)
    peak, idle, rate = ([r[k] for r in rounds] for k in range(3))
    label = f"{count} x {size >> 20} MiB"
    return [
        Figure(BENCH, f"holder peak RSS serving {label}", "MB", peak, Goal("<", 150), note="MiB, VmHWM"),
        Figure(BENCH, "holder RSS before the downloads", "MB", idle),
        Figure(BENCH, f"aggregate rate of the {count} downloads", "GB/s", rate),
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
    return serving(ctx) + startup(ctx)
