"""Benchmark 5, tracker: requests/s, p99 latency and RSS with 10,000 and 100,000 peers registered.

The tracker is a ``twistd p2ptracker`` subprocess.  This process is the one
client: it fills the table, then sends a mix of requests (70% heartbeat, 20%
peers with max 20, 10% register) pipelined over 4 connections with 100 in
flight, timing each request from its send to its reply (replies on one
connection come in order).  The same mix goes to a bare Twisted JSON-lines
server (``benchmarks.baselines jsonlines``) in every repeat: the ceiling.

How the table is filled: a real peer keeps one connection, so each peer gets
its own connection, up to ``HELD_CAP``.  This machine allows 20,000 open files
per process (a hard limit root cannot raise here), for the tracker as for the
client, so beyond the cap the remaining peers are registered several per
connection (100 connections), which the protocol allows.  The RSS of 100,000
peers each on its own connection is then estimated from the per-connection
cost measured at the smaller size.  ``--interval 600`` keeps the silent held
peers from expiring during the run (they would after 3 intervals).
"""

from __future__ import annotations

import random
import selectors
import socket
import statistics
import sys
import time
from collections import deque
from typing import Any

from p2pshare.wire import TrackerRequest

from benchmarks.daemons import BenchmarkError, can_connect, free_ports, rss_kib, start_tracker, wait_for
from benchmarks.harness import Context, Figure, Goal, quantile

BENCH = "5 tracker"
HELD_CAP = 10_000  # peers on their own connection; the rest share MULTIPLEX connections
MULTIPLEX = 100
BATCH = 32  # connections opened at once (twistd's listen backlog is 50)
CONNECTIONS, IN_FLIGHT = 4, 100
MIX = (("heartbeat", 0.7), ("peers", 0.2), ("register", 0.1))
POOL = 1000  # peer ids the mix's registrations cycle through


def peer_id(i: int) -> str:
    return f"{i:032x}"


def register(i: int) -> bytes:
    # Each peer advertises its own address, as peers on separate hosts would have: answers then hold
    # the full 20 entries (the tracker puts at most 4 of one host in an answer).
    host = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}"
    return TrackerRequest("register", i % (2**31 - 1), peer=peer_id(i), udp=1024 + i % 60000,
                          tcp=1024 + i % 60000, host=host).encode() + b"\n"


def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    """Read *count* reply lines from a blocking socket."""
    buf = b""
    lines: list[bytes] = []
    while len(lines) < count:
        data = sock.recv(1 << 20)
        if not data:
            raise BenchmarkError("the tracker closed a connection while registering")
        buf += data
        *done, buf = buf.split(b"\n")
        lines += done
    return lines


class Population:
    """The registered peers and the connections that hold them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sockets: list[socket.socket] = []
        self.count = 0

    def _open(self, lines: list[list[bytes]]) -> None:
        socks = [socket.create_connection(("127.0.0.1", self.port)) for _ in lines]
        self.sockets += socks
        for sock, batch in zip(socks, lines):
            sock.sendall(b"".join(batch))
        for sock, batch in zip(socks, lines):
            if not all(b'"ok":true' in line for line in read_lines(sock, len(batch))):
                raise BenchmarkError("the tracker refused a registration")

    def grow(self, to: int) -> None:
        """Register peers ``count .. to - 1``: one connection each up to HELD_CAP, then shared ones."""
        while self.count < min(to, HELD_CAP):
            n = min(BATCH, min(to, HELD_CAP) - self.count)
            self._open([[register(self.count + j)] for j in range(n)])
            self.count += n
        if self.count < to:
            rest = to - self.count
            per = -(-rest // MULTIPLEX)
            groups = [[register(i) for i in range(start, min(start + per, to))]
                      for start in range(self.count, to, per)]
            for k in range(0, len(groups), BATCH):
                self._open(groups[k:k + BATCH])
            self.count = to

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def mix(population: int, length: int, rng: random.Random) -> list[bytes]:
    """*length* request lines drawn from MIX; heartbeats and peers name registered peers."""
    ops = rng.choices([op for op, _ in MIX], [w for _, w in MIX], k=length)
    base = 1 << 40  # the pool's ids are apart from the population's
    lines = []
    for i, op in enumerate(ops):
        rid = i % (2**31 - 1)
        if op == "register":
            lines.append(register(base + i % POOL))
        else:
            who = peer_id(rng.randrange(population))
            req = TrackerRequest(op, rid, peer=who, max=20) if op == "peers" else TrackerRequest(op, rid, peer=who)
            lines.append(req.encode() + b"\n")
    return lines


def load(port: int, lines: list[bytes], total: int) -> tuple[float, list[float]]:
    """Send *total* requests (cycling *lines*) with IN_FLIGHT outstanding; (requests/s, latencies in s)."""
    sel = selectors.DefaultSelector()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
    latencies: list[float] = []
    sent = done = errors = 0
    try:
        started = time.perf_counter()
        for sock in socks:
            k = IN_FLIGHT // CONNECTIONS
            sock.sendall(b"".join(lines[(sent + j) % len(lines)] for j in range(k)))
            sel.register(sock, selectors.EVENT_READ, [deque([started] * k), b""])
            sent += k
        while done < total:
            events = sel.select(timeout=30)
            if not events:
                raise BenchmarkError(f"no reply for 30 s ({done} of {total} done)")
            for key, _ in events:
                sock, state = key.fileobj, key.data
                data = sock.recv(1 << 18)  # type: ignore[union-attr]
                if not data:
                    raise BenchmarkError("the server closed a load connection")
                *replies, state[1] = (state[1] + data).split(b"\n")
                now = time.perf_counter()
                fifo = state[0]
                for reply in replies:
                    latencies.append(now - fifo.popleft())
                    errors += b'"ok":true' not in reply
                done += len(replies)
                k = min(len(replies), total - sent)
                if k:
                    sock.sendall(b"".join(lines[(sent + j) % len(lines)] for j in range(k)))  # type: ignore[union-attr]
                    fifo.extend([now] * k)
                    sent += k
        elapsed = time.perf_counter() - started
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    if errors:
        raise BenchmarkError(f"{errors} of {total} requests were refused")
    return total / elapsed, latencies


def run(ctx: Context) -> list[Figure]:
    sizes = ctx.size((10_000, 100_000), (1_000, 10_000), (50, 300))
    total = ctx.size(100_000, 20_000, 2_000)
    port, echo_port = free_ports(2)
    tracker = start_tracker(ctx, port, interval=600.0)
    echo = ctx.procs.start([sys.executable, "-m", "benchmarks.baselines", "jsonlines", str(echo_port)],
                           ctx.folder("logs") / "tracker-baseline.log")
    population = Population(port)
    rng = random.Random(5)
    figures: list[Figure] = []
    try:
        wait_for(lambda: can_connect("127.0.0.1", echo_port), "the baseline server to listen", proc=echo)
        idle_kib = rss_kib(tracker.pid)
        per_connection_kib = 0.0
        for size in sizes:
            ctx.say(f"registering {size} peers")
            started = time.perf_counter()
            population.grow(size)
            fill_rate = size / (time.perf_counter() - started) if size else 0.0
            filled_kib = rss_kib(tracker.pid)
            if size <= HELD_CAP:
                per_connection_kib = (filled_kib - idle_kib) / size
            lines = mix(size, min(total, 50_000), rng)

            def once(i: int) -> dict[str, Any]:
                rate, lat = load(port, lines, total)
                base_rate, _ = load(echo_port, lines, total)
                return {"rate": rate, "p99": quantile(lat, 0.99) * 1000, "p50": statistics.median(lat) * 1000,
                        "base": base_rate, "rss": rss_kib(tracker.pid) / 1024}

            rounds = ctx.repeat(once)
            got = {k: [r[k] for r in rounds] for k in rounds[0]}
            held = min(size, HELD_CAP)
            how = (f"{held} on their own connection" + (f", {size - held} on {MULTIPLEX} shared connections"
                                                        if size > held else ""))
            label = f"{size:,} peers"
            figures += [
                Figure(BENCH, f"{label}: requests/s", "req/s", got["rate"], Goal(">=", 40_000),
                       note=f"{how}; registered at {fill_rate:,.0f} peers/s"),
                Figure(BENCH, f"{label}: p99 latency", "ms", got["p99"], Goal("<", 20)),
                Figure(BENCH, f"{label}: median latency", "ms", got["p50"]),
                Figure(BENCH, f"{label}: bare JSON-lines baseline", "req/s", got["base"]),
                Figure(BENCH, f"{label}: tracker / baseline", "x",
                       [r / b for r, b in zip(got["rate"], got["base"])]),
                Figure(BENCH, f"{label}: tracker RSS", "MB", got["rss"],
                       Goal("<", 200) if size >= 100_000 else None, note="MiB, VmRSS after each repeat"),
            ]
            if size > HELD_CAP:
                estimate = (idle_kib + size * per_connection_kib) / 1024
                figures.append(Figure(
                    BENCH, f"{label}: RSS, all on own connections (estimate)", "MB", [estimate], Goal("<", 200),
                    note=f"idle RSS + {size:,} x {per_connection_kib:.2f} KiB, the per-peer cost with one "
                         f"connection each measured at {HELD_CAP:,}"))
        figures.append(Figure(BENCH, "per peer on its own connection", "KiB", [per_connection_kib],
                              note="RSS growth / peers, measured when every peer had its own connection"))
    finally:
        population.close()
        ctx.procs.stop(echo)
        ctx.procs.stop(tracker)
    return figures
