"""Each benchmark of ``make bench`` at its smallest size, so the suite keeps working.

No timing is asserted (these machines are noisy): only that every figure is
produced and sane.  The benchmarks check the bytes themselves in this mode
(every received file is compared with the original) and raise if they differ.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from benchmarks import limits, memory, observe, search, search_hosts, small_files, swarm, tracker, tracker_redis, transfer
from benchmarks.harness import Context, Figure

pytestmark = pytest.mark.system
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="the http.server + curl baseline needs curl")


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    context = Context("smoke", tmp_path, repeats=1, warmup=0, verbose=False)
    try:
        yield context
    finally:
        context.procs.stop_all()


def by_name(figures: list[Figure]) -> dict[str, Figure]:
    for f in figures:
        assert f.samples and all(math.isfinite(x) for x in f.samples), f
    return {f.name: f for f in figures}


@needs_curl
def test_transfer_reports_rates_for_p2pshare_and_both_baselines(ctx: Context) -> None:
    got = by_name(transfer.run(ctx))
    for name in ("p2pshare 1 MiB, verified", "raw socket baseline", "http.server + curl", "p2pshare / raw"):
        assert got[name].median > 0
    assert got["p2pshare / raw"].verdict in ("pass", "FAIL")


@needs_curl
def test_transfer_reports_the_private_network_and_cpu_per_gib_against_the_raw_ends(ctx: Context) -> None:
    got = by_name(transfer.run(ctx))
    assert got["private network (--key, TLS 1.3) 1 MiB, verified"].median > 0
    assert got["1 MiB over a private network (--key, TLS 1.3) / raw"].verdict in ("pass", "FAIL")
    for side in ("holder", "requester", "raw sender", "raw receiver", "private network (--key, TLS 1.3) holder",
                 "private network (--key, TLS 1.3) requester"):
        assert got[f"{side} CPU-seconds per GiB"].median >= 0
    for above, daemon, raw in (("sender's own, holder", "holder", "raw sender"),
                               ("receiver's own, requester", "requester", "raw receiver")):
        figure = got[f"CPU-seconds per GiB above the raw {above}"]
        assert figure.verdict in ("pass", "FAIL")
        assert figure.samples == [d - r for d, r in zip(got[f"{daemon} CPU-seconds per GiB"].samples,
                                                        got[f"{raw} CPU-seconds per GiB"].samples)]


def test_small_files_reports_files_per_second(ctx: Context) -> None:
    got = by_name(small_files.run(ctx))
    assert got["10 x 16 KiB via the control API"].median > 0
    assert got["time per file, median"].median > 0


def test_swarm_reports_t_over_t_min_upload_and_cpu_share_at_40_and_100_mbit(ctx: Context) -> None:
    figures = swarm.run(ctx)
    reason = swarm.unavailable_reason()
    if reason is not None:
        assert [f.name.split(",")[0] for f in figures] == ["T / T_min at 40 Mbit/s", "T / T_min at 100 Mbit/s"]
        assert all(f.verdict == "skipped" and reason in f.note for f in figures)
        return
    got = by_name([f for f in figures if f.samples])
    for rate in ("40", "100"):
        at = f"at {rate} Mbit/s"
        assert got[f"T / T_min {at}"].median > 0 and got[f"T / T_min {at}"].verdict in ("pass", "FAIL")
        assert got[f"holder eth0 bytes sent / F {at}"].median > 0
        assert 0 < got[f"daemons' CPU share {at}"].median <= 100
    assert got["holder upload (bytes_sent) / F at 40 Mbit/s"].verdict in ("pass", "FAIL")
    assert got["2 sequential single-source downloads at 40 Mbit/s, total"].median > 0
    assert got["speed-up at 40 Mbit/s: sequential / T"].median > 0


def test_search_counts_datagrams_and_reach_for_p2pshare_and_the_naive_flood(ctx: Context) -> None:
    got = by_name(search.run(ctx))
    assert got["datagrams per search"].median > 0
    assert got["naive flood datagrams per search"].median > 0
    assert 0 < got["other peers reached"].median <= 100
    assert got["first hit, p95"].median > 0
    assert got["first hit p95 / naive flood's"].verdict in ("pass", "FAIL")


def test_search_on_separate_hosts_reports_the_first_hit_five_hops_away(ctx: Context) -> None:
    figures = search_hosts.run(ctx)
    reason = swarm.unavailable_reason()
    if reason is not None:
        assert [f.verdict for f in figures] == ["skipped"] and reason in figures[0].note
        return
    got = by_name(figures)
    assert got["separate hosts: hops searcher -> holder"].median == 5
    assert 0 < got["first hit on separate hosts, median"].median <= got["first hit on separate hosts, p95"].median
    assert got["first hit on separate hosts, p95"].verdict in ("pass", "FAIL")


def test_tracker_reports_rate_latency_and_memory(ctx: Context) -> None:
    got = by_name(tracker.run(ctx))
    assert got["300 peers: requests/s"].median > 0
    assert got["300 peers: p99 latency"].median > 0
    assert got["300 peers: tracker RSS"].median > 1
    assert got["per peer on its own connection"].median > 0


def test_memory_reports_peak_rss_and_start_up_times(ctx: Context) -> None:
    got = by_name(memory.run(ctx))
    # The peak is reset just before the downloads: by then the process may have handed back a little
    # of what it held when "before" was read.
    assert got["holder peak RSS serving 2 x 4 MiB"].median >= got["holder RSS before the downloads"].median - 1 > 1
    assert got["holder peak RSS serving 2 x 4 MiB"].verdict in ("pass", "FAIL")
    assert got["requester peak RSS fetching 4 MiB"].median >= got["requester RSS before the fetch"].median - 1 > 1
    assert got["requester peak RSS fetching 4 MiB"].verdict in ("pass", "FAIL")
    assert got["start to ready, 200 files, index cached"].median > 0
    assert got["first indexing, 4 MiB in 200 files"].median > 0


def test_tracker_on_redis_reports_rate_memory_and_the_cost_of_two_trackers(ctx: Context) -> None:
    figures = tracker_redis.run(ctx)
    reason = tracker_redis.unavailable_reason()
    if reason is not None:
        assert [f.verdict for f in figures] == ["skipped"] and reason in figures[0].note
        return
    got = {f.name.split(": ", 1)[-1]: f for f in by_name(figures).values()}
    assert got["requests/s"].median > 0 and got["requests/s"].verdict in ("pass", "FAIL")
    assert 0 < got["Redis memory per peer"].median < 10_000
    assert got["two trackers, aggregate requests/s"].median > 0
    # CPU time comes in clock ticks (10 ms): a smoke-sized load may take less than one of Redis's
    assert all(got[f"two trackers, CPU per request, {who}"].median >= 0 for who in ("tracker A", "tracker B", "Redis"))
    assert 0 < got["Redis memory per peer, 300 peers on their own addresses"].median < 10_000


def test_observe_times_a_scrape_against_a_status_request_and_the_open_dashboards_cpu(ctx: Context) -> None:
    figures = observe.run(ctx)
    got = {f.name: f for f in figures}
    scrape = next(f for name, f in got.items() if name.startswith("GET /metrics with"))
    assert scrape.median > 0 and got["scrape size"].median > 1000
    assert got["scrape / status"].median > 0
    opened = next(f for name, f in got.items() if name.endswith("dashboard open"))
    if opened.status == "n/a":
        pytest.skip("no Chromium or Playwright: the dashboard figures are n/a")
    assert opened.verdict in ("pass", "FAIL")
    assert got["status requests from the page in that time"].median >= 1


def test_limits_reports_the_achieved_rate_against_the_configured_one_both_ways(ctx: Context) -> None:
    got = by_name(limits.run(ctx))
    for side in ("upload", "download"):
        assert got[f"--max-{side}-rate 2 MB/s: achieved / configured"].median > 0
        assert got[f"--max-{side}-rate: distance from the configured rate"].verdict in ("pass", "FAIL")
