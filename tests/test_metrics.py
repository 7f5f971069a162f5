"""Prometheus metrics: the mapping of counters (pure), the scrape of live peers over loopback (parsed with
``prometheus_client.parser``, values moving as traffic happens), and ``--metrics`` of the twistd plugins."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.endpoints import TCP4ServerEndpoint

from p2pshare.control import ControlService
from p2pshare.metrics import Histogram, TrackerMetrics, counter_families
from p2pshare.registry import MemoryRegistry
from tests.loopback import Network, eventually, reactor
from tests.test_control_and_options import TOKENS, call
from tests.test_system import Daemon, free_port, poll


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict[Any, float], name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


# -- pure ---------------------------------------------------------------------------------------

def test_counters_become_labelled_families_with_prometheus_names() -> None:
    text = generate_latest(_Registry(counter_families({"dropped_duplicate": 3, "retries_hit": 2, "hits_sent": 1,
                                                       "uploads_opened_partial": 4, "bad_pieces": 5}))).decode()
    got = samples(text)
    assert got[("p2pshare_datagrams_dropped_total", (("reason", "duplicate"),))] == 3
    assert got[("p2pshare_retransmissions_total", (("kind", "hit"),))] == 2
    assert got[("p2pshare_hits_total", (("event", "sent"),))] == 1
    assert got[("p2pshare_uploads_total", (("kind", "partial"),))] == 4
    assert got[("p2pshare_bad_pieces_total", ())] == 5
    assert all(name.startswith("p2pshare_") for name, _ in got)


def test_known_counters_are_exported_as_zero_before_anything_happens() -> None:
    got = samples(generate_latest(_Registry(counter_families({}, ["dropped_malformed", "downloads_completed"])))
                  .decode())
    assert got == {("p2pshare_datagrams_dropped_total", (("reason", "malformed"),)): 0.0,
                   ("p2pshare_downloads_total", (("outcome", "completed"),)): 0.0}


def test_histogram_buckets_are_cumulative_and_hold_values_at_their_bound() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.sum == pytest.approx(3.65)


class _Registry:
    """A registry-like object holding fixed families, for ``generate_latest``."""

    def __init__(self, families: Any) -> None:
        self.families = list(families)

    def collect(self) -> Any:
        return iter(self.families)


# -- a live network over loopback ---------------------------------------------------------------

async def scrape(control: ControlService) -> dict[Any, float]:
    code, body = await call(control.url + "/metrics")
    assert code == 200, body
    return samples(body.decode())


@pytest_twisted.ensureDeferred
async def test_the_scrape_moves_with_searches_fetches_and_garbage(net: Network) -> None:
    data = b"metrics " * 50_000
    address = await net.start_tracker()
    holder = await net.add({"m.bin": data}, tracker=address)
    requester = await net.add(tracker=address)
    await eventually(lambda: holder.tracker.registered and requester.tracker.registered and requester.neighbours())
    control = ControlService(TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1"), requester)
    control.startService()
    await control.when_listening()
    TOKENS[control.url] = control.token
    try:
        before = await scrape(control)
        assert value(before, "p2pshare_tracker_connected") == 1
        assert value(before, "p2pshare_neighbours") >= 1
        assert value(before, "p2pshare_queries_total", event="started") == 0

        hits = await requester.search("m.bin", timeout=1.0)
        assert hits
        after_search = await scrape(control)
        assert value(after_search, "p2pshare_queries_total", event="started") >= 1
        assert value(after_search, "p2pshare_search_first_hit_seconds_count", kind="search") == 1
        assert value(after_search, "p2pshare_search_first_hit_seconds_bucket", kind="search", le="+Inf") == 1

        await requester.fetch("m.bin", timeout=10.0)
        after_fetch = await scrape(control)
        assert value(after_fetch, "p2pshare_transfer_bytes_total", direction="received", network="public") \
            == len(data)
        assert value(after_fetch, "p2pshare_downloads_total", outcome="completed") == 1
        assert value(after_fetch, "p2pshare_fetch_duration_seconds_count", outcome="completed") == 1
        assert value(after_fetch, "p2pshare_shared_files") == 1
        assert value(after_fetch, "p2pshare_shared_bytes") == len(data)
        held = samples(generate_latest(holder.metrics.registry).decode())
        assert value(held, "p2pshare_transfer_bytes_total", direction="sent", network="public") >= len(data)

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\xff not a datagram", ("127.0.0.1", requester.udp_port))
        await eventually(lambda: requester.counters["dropped_malformed"] >= 1)
        after_garbage = await scrape(control)
        assert value(after_garbage, "p2pshare_datagrams_dropped_total", reason="malformed") == 1

        tracked = samples(generate_latest(net.tracker.factory.metrics.registry).decode())
        assert value(tracked, "p2pshare_tracker_peers") == 2
        assert value(tracked, "p2pshare_tracker_requests_total", op="register") == 2
        assert value(tracked, "p2pshare_tracker_request_duration_seconds_count", op="register") == 2
    finally:
        TOKENS.pop(control.url, None)
        await control.stopService()


@pytest_twisted.ensureDeferred
async def test_two_peers_in_one_process_keep_their_own_figures(net: Network) -> None:
    a = await net.add(peers=(("127.0.0.1", 9),))
    b = await net.add(peers=(("127.0.0.1", 9),))
    a.counters.add("bad_pieces", 7)
    assert value(samples(generate_latest(a.metrics.registry).decode()), "p2pshare_bad_pieces_total") == 7
    assert value(samples(generate_latest(b.metrics.registry).decode()), "p2pshare_bad_pieces_total") == 0


@pytest_twisted.ensureDeferred
async def test_the_control_api_scrape_needs_the_token(net: Network) -> None:
    peer = await net.add(peers=(("127.0.0.1", 9),))
    control = ControlService(TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1"), peer)
    control.startService()
    await control.when_listening()
    try:
        code, _ = await call(control.url + "/metrics", token=None)
        assert code == 401
        code, body = await call(control.url + "/metrics", token=control.token, accept=b"application/openmetrics-text")
        assert code == 200 and body.endswith(b"# EOF\n")
    finally:
        await control.stopService()


def test_a_tracker_counts_its_requests_by_operation_with_their_latency() -> None:
    from twisted.internet.task import Clock

    from p2pshare.tracker import TrackerFactory

    factory = TrackerFactory(Clock(), registry=MemoryRegistry(timeout=30))
    assert isinstance(factory.metrics, TrackerMetrics)
    factory.metrics.latency.observe("peers", 0.0004)
    got = samples(generate_latest(factory.metrics.registry).decode())
    assert value(got, "p2pshare_tracker_request_duration_seconds_bucket", op="peers", le="0.0005") == 1
    assert value(got, "p2pshare_tracker_request_duration_seconds_bucket", op="peers", le="0.00025") == 0
    assert value(got, "p2pshare_tracker_peers") == 0


# -- the twistd plugins' --metrics ----------------------------------------------------------------

def fetch_metrics(port: int) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return samples(r.read().decode())
    except OSError:
        return None


def test_metrics_option_serves_the_scrape_of_a_twistd_tracker_and_peer(tmp_path: Path) -> None:
    tport, tmetrics, pmetrics = free_port(), free_port(), free_port()
    (tmp_path / "files").mkdir()
    tracker = Daemon.start("tracker", ["p2ptracker", "--port", f"tcp:{tport}:interface=127.0.0.1",
                                       "--metrics", f"tcp:{tmetrics}:interface=127.0.0.1"], tmp_path)
    peer = Daemon.start("peer", ["p2ppeer", "--tracker", f"127.0.0.1:{tport}", "--dir", "files", "--interface",
                                 "127.0.0.1", "--control", "none", "--metrics",
                                 f"tcp:{pmetrics}:interface=127.0.0.1"], tmp_path)
    try:
        got = poll(lambda: (lambda s: s if s and value(s, "p2pshare_tracker_peers") == 1 else None)(
            fetch_metrics(tmetrics)), "the tracker's scrape to count the peer", (tracker, peer))
        assert value(got, "p2pshare_tracker_requests_total", op="register") == 1
        got = poll(lambda: (lambda s: s if s and value(s, "p2pshare_tracker_connected") == 1 else None)(
            fetch_metrics(pmetrics)), "the peer's scrape to show it registered", (tracker, peer))
        assert any(name == "p2pshare_peer_info" for name, _ in got)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{pmetrics}/v1/status", timeout=5)
        assert refused.value.code == 404  # only /metrics there: the control API stays on loopback with its token
    finally:
        peer.stop()
        tracker.stop()
    assert "Traceback" not in tracker.output() + peer.output()


def test_a_bad_metrics_option_is_a_usage_error(tmp_path: Path) -> None:
    from twisted.python import usage

    from p2pshare.tap import TrackerOptions

    with pytest.raises(usage.UsageError, match="--metrics"):
        TrackerOptions().parseOptions(["--metrics", "nonsense"])
