"""p2pshare's benchmark suite: ``make bench`` (``python -m benchmarks``).

Eight benchmarks, one module each (search has a second, on separate hosts, and the tracker one on
Redis); each is judged
against a baseline measured in the same run, because absolute figures drift by
tens of percent on shared machines while ratios hold.  ``docs/performance.md``
says what each figure means.
"""

from __future__ import annotations

# --only NAME -> module, in the order they run and print
BENCHMARKS = {
    "transfer": "benchmarks.transfer",
    "small_files": "benchmarks.small_files",
    "swarm": "benchmarks.swarm",
    "search": "benchmarks.search",
    "search_hosts": "benchmarks.search_hosts",
    "tracker": "benchmarks.tracker",
    "tracker_redis": "benchmarks.tracker_redis",
    "memory": "benchmarks.memory",
    "limits": "benchmarks.limits",
    "observe": "benchmarks.observe",
}
