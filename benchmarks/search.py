"""Benchmark 4, search: 200 peers on 127.0.0.x, a file 3+ hops away, against a naive flood.

The peers run in one process (``benchmarks.search_worker``), started through
the public API with a tracker (``want=5``).  One repeat is a batch of searches,
each from a searcher at least three hops from the holder; every p2pshare search
is paired with a naive-flood search (fanout 5, TTL 7) in the same process.
Figures per batch: time to the first hit (median, p95), datagrams per search
(the sum of the peers' ``datagrams_sent`` counters) and its ratio to the naive
flood's, the share of other peers reached (their ``queries_received`` or
``dropped_duplicate`` counters moved), and misses: peers within TTL hops of the
searcher in the neighbour graph (not through the holder, which answers instead
of forwarding) that the query never reached.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

from benchmarks.daemons import BenchmarkError
from benchmarks.harness import Context, Figure, Goal, quantile

BENCH = "4 search"


def batch(ctx: Context, peers: int, searches: int, warmup: int, seed: int,
          window: float) -> dict[str, list[dict[str, Any]]]:
    """One worker run: *warmup* + *searches* paired searches; the records of the measured ones."""
    base = ctx.folder(f"search-{seed}")
    args = [sys.executable, "-m", "benchmarks.search_worker", "--base", str(base), "--peers", str(peers),
            "--searches", str(searches), "--warmup", str(warmup), "--seed", str(seed), "--window", str(window)]
    proc = ctx.procs.start(args, ctx.folder("logs") / f"search-{seed}.log", stdout_pipe=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        raise BenchmarkError("the search worker did not finish within 300 s") from None
    finally:
        ctx.procs.stop(proc)
    if proc.returncode != 0:
        raise BenchmarkError(f"the search worker failed (status {proc.returncode}); see logs/search-{seed}.log")
    return json.loads(out)  # type: ignore[no-any-return]


def _first_hits(records: list[dict[str, Any]], window_ms: float) -> list[float]:
    # a search without a hit counts as the whole window (and is also counted separately)
    return [r["first_hit_ms"] if r["first_hit_ms"] is not None else window_ms for r in records]


def run(ctx: Context) -> list[Figure]:
    peers = ctx.size(200, 200, 20)
    searches = ctx.size(20, 10, 3)
    warmup = ctx.size(3, 2, 1) if ctx.warmup else 0
    window = ctx.size(1.0, 1.0, 0.3)  # each p2pshare search's timeout, s
    results = []
    for i in range(ctx.repeats):  # one worker per repeat: a fresh network and a fresh naive graph
        ctx.say(f"batch {i + 1}/{ctx.repeats}: {peers} peers, {warmup} + {searches} paired searches")
        results.append(batch(ctx, peers, searches, warmup, i + 1, window))
    window *= 1000
    figures: dict[str, list[float]] = {k: [] for k in (
        "med", "p95", "naive_p95", "dgrams", "naive_dgrams", "ratio", "reached", "naive_reached", "misses",
        "naive_misses", "no_hit", "hops", "degree", "retries", "p95_ratio")}
    for r in results:
        p2p, naive = r["p2p"], r["naive"]
        hits = _first_hits(p2p, window)
        figures["med"].append(statistics.median(hits))
        figures["p95"].append(quantile(hits, 0.95))
        figures["naive_p95"].append(quantile(_first_hits(naive, window), 0.95))
        figures["p95_ratio"].append(figures["p95"][-1] / figures["naive_p95"][-1])
        dgrams = statistics.mean(x["datagrams"] for x in p2p)
        naive_dgrams = statistics.mean(x["datagrams"] for x in naive)
        figures["dgrams"].append(dgrams)
        figures["naive_dgrams"].append(naive_dgrams)
        figures["ratio"].append(dgrams / naive_dgrams)
        figures["reached"].append(statistics.mean(x["reached"] / x["others"] for x in p2p) * 100)
        figures["naive_reached"].append(statistics.mean(x["reached"] / x["others"] for x in naive) * 100)
        figures["misses"].append(sum(x["misses"] for x in p2p))
        figures["naive_misses"].append(sum(x["misses"] for x in naive))
        figures["no_hit"].append(sum(x["first_hit_ms"] is None for x in p2p))
        figures["hops"].append(statistics.median(x["hops"] for x in p2p))
        figures["degree"].append(statistics.mean(x["degree"] for x in p2p))
        figures["retries"].append(statistics.mean(
            sum(v for k, v in x.get("counters", {}).items() if k.startswith("retries_")) for x in p2p))
    n = f"{peers} peers, {searches} searches per repeat"
    return [
        Figure(BENCH, "first hit, median", "ms", figures["med"], note=n),
        Figure(BENCH, "first hit, p95", "ms", figures["p95"]),
        Figure(BENCH, "naive flood first hit, p95", "ms", figures["naive_p95"]),
        Figure(BENCH, "first hit p95 / naive flood's", "x", figures["p95_ratio"], Goal("<=", 2),
               note="both in the same repeat, the same process and the same 200 addresses"),
        Figure(BENCH, "datagrams per search", "", figures["dgrams"]),
        Figure(BENCH, "naive flood datagrams per search", "", figures["naive_dgrams"]),
        Figure(BENCH, "retransmissions per search", "", figures["retries"],
               note="the peers' retries_* counters: datagrams resent because an ack was late"),
        Figure(BENCH, "datagrams / naive flood", "x", figures["ratio"], Goal("<=", 1.6)),
        Figure(BENCH, "other peers reached", "%", figures["reached"]),
        Figure(BENCH, "naive flood peers reached", "%", figures["naive_reached"]),
        Figure(BENCH, "misses (reachable, not reached)", "", figures["misses"], Goal("<=", 0, on="max")),
        Figure(BENCH, "naive flood misses", "", figures["naive_misses"]),
        Figure(BENCH, "searches without a hit", "", figures["no_hit"], Goal("<=", 0, on="max")),
        Figure(BENCH, "hops searcher -> holder", "", figures["hops"],
               note="shortest path in the neighbour graph at search time; the searcher is picked 3+ hops away"),
        Figure(BENCH, "neighbours per peer", "", figures["degree"],
               note="5 from the tracker plus those learned from incoming queries"),
    ]
