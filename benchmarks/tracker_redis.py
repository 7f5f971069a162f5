"""Benchmark 5, tracker on Redis: one and two ``p2ptracker --registry redis://...`` on one Redis.

A ``redis-server`` (no persistence) in the run's folder, then a tracker subprocess with
``--registry`` pointing at it; the table is filled and loaded exactly as in benchmark 5
(benchmarks.tracker: 70% heartbeat, 20% peers, 10% register, 4 connections, 100 in flight).
Figures: requests/s and p99 latency with 100,000 peers registered (``--quick``: 10,000); the
Redis memory per registered peer (``INFO memory`` ``used_memory`` growth over the fill / peers);
the tracker's RSS; then a second tracker on the same Redis and the same load sent to both at once:
the aggregate rate, and the CPU time per request of each tracker and of Redis (from /proc).  Every
benchmark client connects from 127.0.0.1, so all registrations share one source address, whose
set in Redis (for ``--max-per-address``) then holds every peer: the memory figure includes that.

Then the memory of the table as peers on their own addresses make it: another key prefix filled
with 100,000 and 1,000,000 peers (``--quick``: 10,000 and 100,000), each from its own source
address, through ``RedisRegistry`` itself in a helper process (``python -m
benchmarks.tracker_redis fill``), and ``used_memory``'s growth per peer.

Skipped, with the reason, without ``redis-server`` or the redis package.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from benchmarks.daemons import BenchmarkError, can_connect, cpu_seconds, free_ports, rss_kib, start_tracker, wait_for
from benchmarks.harness import Context, Figure, Goal, quantile
from benchmarks.tracker import Population, load, mix

BENCH = "5 tracker"


def unavailable_reason() -> Optional[str]:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt install redis-server; .ci/run does)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'p2pshare[redis]')"
    return None


def _used_memory(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "memory"], capture_output=True, text=True,
                         timeout=30).stdout
    for line in out.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise BenchmarkError("redis-cli info memory: no used_memory")


def run(ctx: Context) -> list[Figure]:
    size = ctx.size(100_000, 10_000, 300)
    total = ctx.size(100_000, 20_000, 2_000)
    label = f"on Redis, {size:,} peers"
    reason = unavailable_reason()
    if reason is not None:
        return [Figure(BENCH, f"{label}: requests/s", "req/s", [], Goal(">=", 15_000), status="skipped",
                       note=f"not measured: {reason}")]
    redis_port, port, port_b = free_ports(3)
    folder = ctx.folder("redis")
    redis = ctx.procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], ctx.folder("logs") / "redis.log")
    wait_for(lambda: can_connect("127.0.0.1", redis_port), "redis-server to listen", proc=redis)
    url = f"redis://127.0.0.1:{redis_port}/0"
    tracker = start_tracker(ctx, port, interval=600.0, label="tracker-redis", registry=url)
    population = Population(port)
    rng = random.Random(7)
    try:
        empty = _used_memory(redis_port)
        ctx.say(f"registering {size:,} peers through a tracker on Redis")
        started = time.perf_counter()
        for step in range(min(size, 10_000), size + 1, 10_000):  # at most 32 x 100 requests wait at once:
            population.grow(step)  # far below the registry's bound on work waiting for Redis
        population.grow(size)
        fill_rate = size / (time.perf_counter() - started)
        per_peer = (_used_memory(redis_port) - empty) / size
        time.sleep(1.5)  # the trackers' sample pool reads the filled table
        lines = mix(size, min(total, 50_000), rng)

        def once(i: int) -> dict[str, Any]:
            rate, lat = load(port, lines, total)
            return {"rate": rate, "p99": quantile(lat, 0.99) * 1000, "rss": rss_kib(tracker.pid) / 1024}

        rounds = ctx.repeat(once)
        got = {k: [r[k] for r in rounds] for k in rounds[0]}

        ctx.say("a second tracker on the same Redis; the load sent to both at once")
        second = start_tracker(ctx, port_b, interval=600.0, label="tracker-redis-b", registry=url)
        time.sleep(1.5)

        def both(i: int) -> dict[str, Any]:
            pids = {"a": tracker.pid, "b": second.pid, "redis": redis.pid}
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            started = time.perf_counter()
            with ThreadPoolExecutor(2) as clients:  # both trackers loaded at once
                list(clients.map(lambda p: load(p, lines, total), (port, port_b)))
            elapsed = time.perf_counter() - started
            used = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
            return {"aggregate": 2 * total / elapsed, "us_a": used["a"] / total * 1e6,
                    "us_b": used["b"] / total * 1e6, "us_redis": used["redis"] / (2 * total) * 1e6}

        pair = ctx.repeat(both)
        two = {k: [r[k] for r in pair] for k in pair[0]}
        ctx.procs.stop(second)
        ctx.procs.stop(tracker)
        memory = {}
        for count in ctx.size((100_000, 1_000_000), (10_000, 100_000), (300,)):
            ctx.say(f"filling a second table with {count:,} peers, each from its own address")
            before = _used_memory(redis_port)
            fill = subprocess.run([sys.executable, "-m", "benchmarks.tracker_redis", "fill", url, str(count)],
                                  capture_output=True, text=True, timeout=1800)
            if fill.returncode != 0:
                raise BenchmarkError(f"the fill helper failed: {fill.stderr[-2000:]}")
            memory[count] = (_used_memory(redis_port) - before) / count
            subprocess.run(["redis-cli", "-p", str(redis_port), "flushdb"], capture_output=True, timeout=120)
    finally:
        population.close()
        ctx.procs.stop(tracker)
        if "second" in locals():
            ctx.procs.stop(second)
        ctx.procs.stop(redis)
    return [
        Figure(BENCH, f"{label}: requests/s", "req/s", got["rate"], Goal(">=", 15_000),
               note=f"one tracker; registered at {fill_rate:,.0f} peers/s"),
        Figure(BENCH, f"{label}: p99 latency", "ms", got["p99"], Goal("<", 50)),
        Figure(BENCH, f"{label}: Redis memory per peer", "bytes", [per_peer], Goal("<=", 300),
               note="INFO used_memory growth over the fill / peers"),
        Figure(BENCH, f"{label}: tracker RSS", "MB", got["rss"], Goal("<", 80), note="MiB, VmRSS"),
        Figure(BENCH, f"{label}: two trackers, aggregate requests/s", "req/s", two["aggregate"],
               note="the same load sent to both at once; two cores shared by both trackers, Redis and the client"),
        Figure(BENCH, f"{label}: two trackers, CPU per request, tracker A", "us", two["us_a"]),
        Figure(BENCH, f"{label}: two trackers, CPU per request, tracker B", "us", two["us_b"]),
        Figure(BENCH, f"{label}: two trackers, CPU per request, Redis", "us", two["us_redis"]),
    ] + [Figure(BENCH, f"Redis memory per peer, {count:,} peers on their own addresses", "bytes", [per],
                Goal("<=", 300), note="used_memory growth / peers, filled through RedisRegistry")
         for count, per in memory.items()]


async def _fill(reactor: Any, url: str, count: int) -> None:
    """Register *count* peers, each from its own source address, through RedisRegistry."""
    from twisted.internet.defer import gatherResults

    from p2pshare.redis_registry import RedisRegistry, redis_client
    from p2pshare.wire import PeerInfo

    registry = RedisRegistry(lambda: redis_client(url), reactor, timeout=3600.0, prefix="memory")
    try:
        now = reactor.seconds()
        for start in range(0, count, 5000):
            batch = []
            for i in range(start, min(start + 5000, count)):
                host = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
                batch.append(registry.register(PeerInfo(f"{i:032x}", host, 1024 + i % 60000, 1024 + i % 60000),
                                               host, now))
            if not all(await gatherResults(batch)):
                raise SystemExit("a registration was refused")
    finally:
        await registry.close()


if __name__ == "__main__" and sys.argv[1:2] == ["fill"]:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(_fill(reactor, sys.argv[2], int(sys.argv[3]))))
