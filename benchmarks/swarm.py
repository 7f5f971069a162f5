"""Benchmark 3, swarm distribution: the slot for the Kumar-Ross figure of issue 5.

The goal is T / T_min <= 1.5 for N = 8 downloaders over rate-limited links in
network namespaces, where T_min = max(F / u_s, F / d_min, N F / (u_s + sum u_i)).
p2pshare cannot download from several holders at once yet (issue 5), so this
slot reports the single-source figure instead: benchmark 1's, when it ran in
the same invocation, else a single-source transfer measured here.  No T / T_min
is computed: without swarming there is nothing honest to put there.
"""

from __future__ import annotations

from benchmarks import transfer
from benchmarks.harness import Context, Figure

BENCH = "3 swarm"
NOT_DONE = "swarming not implemented (issue 5): T/T_min (goal <= 1.5) not measured; single-source figure shown"


def run(ctx: Context) -> list[Figure]:
    earlier = ctx.results.get("transfer")
    if earlier:
        p2p = earlier[0]
        return [Figure(BENCH, "single source (from benchmark 1)", p2p.unit, p2p.samples, note=NOT_DONE,
                       status="n/a")]
    size = ctx.size(256 << 20, 64 << 20, 1 << 20)
    seconds = transfer.measure(ctx, size)
    rate = [size / s / 1e9 for s in seconds["p2p"]]
    return [Figure(BENCH, f"single source, {size >> 20} MiB", "GB/s", rate, note=NOT_DONE, status="n/a")]
