"""Prometheus metrics of a peer and of a tracker, in the text format ``prometheus_client`` writes.

Each peer and each tracker has its own ``CollectorRegistry`` (``metrics.registry``), so several
in one process do not mix their figures.  Nothing is counted twice: at scrape time a collector
turns the ``Counters`` that ``status --json`` shows into counter families with labels
(``dropped_duplicate`` -> ``p2pshare_datagrams_dropped_total{reason="duplicate"}``) and reads the
gauges from the live objects.  Histograms are plain bucket counts, observed on the reactor thread
(a bisect and two additions: cheap enough for a tracker answering tens of thousands of requests a
second) and exported by the same collector.

Serving them over HTTP is ``metrics_web``'s: a tracker without ``--metrics`` never loads
``twisted.web``, nor ``prometheus_client`` (a registry is made when something first reads it).
"""

from __future__ import annotations

from bisect import bisect_left
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric


PREFIX = "p2pshare_"

# Counter names by prefix: the family they join and the label the rest of the name becomes.
# Names come from the code, never from the network, so every label has few values.
_LABELLED = (
    ("dropped_", "datagrams_dropped", "reason", "Datagrams dropped, by reason."),
    ("retries_", "retransmissions", "kind", "Datagrams sent again because no acknowledgement came, by kind."),
    ("gave_up_", "retransmission_give_ups", "kind", "Datagrams given up on after every retry, by kind."),
    ("queries_", "queries", "event", "Search queries: started here, received, forwarded."),
    ("hits_", "hits", "event", "Search hits: received, sent, sent back along the path, passed back."),
    ("acks_", "acks", "kind", "Acknowledgements received: explicit (received) or implied by a copy (implicit)."),
    ("offers_", "offers", "outcome", "Offers: dialled to requesters, skipped, backed off, declined here."),
    ("downloads_", "downloads", "outcome", "Downloads ended: completed or failed."),
    ("sources_dialled_by_", "download_sources", "dialled_by", "Sources taken on by downloads, by who dialled."),
    ("tracker_", "tracker_events", "event", "Tracker events: refusals, expiries, closed and refused connections."),
    ("lan_", "lan_events", "event", "LAN discovery: announcements sent and received, dropped (bad, rate_limited), "
     "send errors."),
)
# Counters renamed one by one: name -> (family, label, value, help).
_EXACT = {
    "uploads_opened": ("uploads", "kind", "whole", "Files opened to serve a requester: whole, or a partial download."),
    "uploads_opened_partial": ("uploads", "kind", "partial", ""),
}
# Help for counters that stay families of their own (others: their status --json name).
_HELP = {
    "datagrams_sent": "UDP datagrams sent (queries, hits, acks, hellos).",
    "hellos_received": "Hello datagrams received (a peer that made this one its neighbour).",
    "bad_pieces": "Pieces received that did not match their hash; their sender is dropped.",
    "bad_manifests": "Manifests whose pieces made other content; their holders are dropped.",
    "fetches_cancelled": "Fetches ended because every caller withdrew.",
    "send_errors": "Datagrams the system refused to send.",
    "send_oversized": "Datagrams not sent because they would be too long.",
    "download_pauses": "Times the disk fell behind the network and every source of a download paused.",
    "dials_to_holders": "Connections dialled to holders that answered (the requester dialled back).",
    "files_rechecked": "Shared files hashed again after a requester reported a bad piece.",
    "retransmit_queue_full": "Datagrams sent without retransmission because the queue was full.",
    "outsider_datagrams": "Datagrams refused in a private network: not sealed with its key.",
    "outsider_connections": "Transfer connections refused in a private network: no proof of its key.",
    "tls_dial_failures": "Transfer connections dialled whose TLS handshake failed.",
}
# Counters that exist before anything happens, so that rate() and alerts see a zero, not nothing.
PEER_COUNTERS = (
    "datagrams_sent", "queries_started", "queries_received", "queries_forwarded", "hits_received", "hits_sent",
    "acks_received", "hellos_received", "dropped_duplicate", "dropped_malformed", "dropped_unproven",
    "dropped_rate_limited", "retries_query", "gave_up_query", "downloads_completed", "downloads_failed",
    "bad_pieces", "bad_manifests", "fetches_cancelled", "uploads_opened", "offers_declined", "send_errors",
    "lan_announcements_sent", "lan_announcements_received", "lan_dropped_bad", "lan_dropped_rate_limited",
    "lan_send_errors",
)
TRACKER_OPS = ("register", "heartbeat", "leave", "peers")
TRACKER_COUNTERS = ("tracker_malformed", "tracker_unavailable", "tracker_expired", "tracker_connections_refused",
                    "tracker_registrations_refused")
# Seconds: a search hit on a LAN comes in milliseconds, across a slow network in seconds.
SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FETCH_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
TRACKER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Histogram:
    """Bucket counts and a sum, for ``HistogramMetricFamily``; ``observe`` is the only cost per event."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket le=b holds values <= b
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Histograms:
    """One ``Histogram`` per value of one label (values come from the code: few)."""

    def __init__(self, name: str, doc: str, label: str, bounds: Iterable[float], values: Iterable[str] = ()) -> None:
        self.name, self.doc, self.label, self.bounds = name, doc, label, tuple(bounds)
        self.by = {v: Histogram(self.bounds) for v in values}

    def observe(self, value: str, seconds: float) -> None:
        h = self.by.get(value)
        if h is None:
            h = self.by[value] = Histogram(self.bounds)
        h.observe(seconds)

    def family(self) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily

        fam = HistogramMetricFamily(PREFIX + self.name, self.doc, labels=[self.label])
        for value, h in sorted(self.by.items()):
            fam.add_metric([value], h.buckets(), h.sum)
        return fam


def counter_families(counters: dict[str, int], known: Iterable[str] = ()) -> Iterator[Metric]:
    """*counters* (name -> count) as counter families: labelled where a prefix says so, else one each."""
    from prometheus_client.core import CounterMetricFamily

    values = dict.fromkeys(known, 0)
    values.update(counters)
    families: dict[str, CounterMetricFamily] = {}
    for name, value in sorted(values.items()):
        if name in _EXACT:
            family, label, labelled, doc = _EXACT[name]
            fam = families.get(family)
            if fam is None:
                fam = families[family] = CounterMetricFamily(PREFIX + family, doc, labels=[label])
            fam.add_metric([labelled], value)
            continue
        for prefix, family, label, doc in _LABELLED:
            if name.startswith(prefix) and name != prefix:
                fam = families.get(family)
                if fam is None:
                    fam = families[family] = CounterMetricFamily(PREFIX + family, doc, labels=[label])
                fam.add_metric([name[len(prefix):]], value)
                break
        else:
            fam = CounterMetricFamily(PREFIX + name, _HELP.get(name, f"The status --json counter {name}."))
            fam.add_metric([], value)
            families[name] = fam
    return iter(families.values())


def gauge(name: str, doc: str, value: float, labels: Optional[dict[str, str]] = None) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    fam = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels or ()))
    fam.add_metric(list((labels or {}).values()), value)
    return fam


class _Collector:
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.collect = collect


def _registry(collect: Callable[[], Iterator[Metric]]) -> CollectorRegistry:
    """A registry of its own that asks *collect* at each scrape."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(collect))  # type: ignore[arg-type]
    return registry


class PeerMetrics:
    """The metrics of one ``Peer``: its registry, and the histograms the peer observes."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.first_hit = Histograms("search_first_hit_seconds", "Seconds from a search (or a fetch's query) to "
                                    "its first hit.", "kind", SEARCH_BUCKETS, ("search", "fetch"))
        self.fetch = Histograms("fetch_duration_seconds", "Seconds from asking for a file to its end, by "
                                "outcome.", "outcome", FETCH_BUCKETS, ("completed", "failed", "cancelled"))

    @cached_property
    def registry(self) -> CollectorRegistry:
        return _registry(self.collect)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, InfoMetricFamily

        peer = self.peer
        network = "private" if peer.key is not None else "public"
        from p2pshare import __version__

        info = InfoMetricFamily(PREFIX + "peer", "This peer: its id, version and network kind.")
        info.add_metric([], {"peer_id": peer.peer_id, "version": __version__, "network": network})
        yield info
        counters = dict(peer.counters)
        in_flight = [f.download for f in peer.fetcher.fetches.values() if f.download is not None]
        received = counters.pop("bytes_received", 0) + sum(d.wire_bytes for d in in_flight)
        sent = counters.pop("bytes_sent", 0)
        moved = CounterMetricFamily(PREFIX + "transfer_bytes", "File bytes sent and received over transfer "
                                    "connections, by direction and network.", labels=["direction", "network"])
        moved.add_metric(["sent", network], sent)
        moved.add_metric(["received", network], received)
        yield moved
        yield from counter_families(counters, PEER_COUNTERS)
        entries = peer.shares.entries
        yield gauge("neighbours", "Peers this one sends its queries to.", len(peer.neighbours()))
        yield gauge("shared_files", "Files in the shared folder's index.", len(entries))
        yield gauge("shared_bytes", "Bytes in the shared folder's indexed files.",
                    sum(e.size for e in entries.values()))
        yield gauge("downloads_active", "Fetches in progress (searching or downloading).", len(peer.fetcher.fetches))
        yield gauge("upload_connections", "Open transfer connections.", len(peer._connections))
        if peer.tracker is not None:
            yield gauge("tracker_connected", "1 while registered with a tracker.", int(peer.tracker.registered))
        yield self.first_hit.family()
        yield self.fetch.family()


class TrackerMetrics:
    """The metrics of one ``TrackerFactory``."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.latency = Histograms("tracker_request_duration_seconds", "Seconds from a request's line to its "
                                  "answer, by operation.", "op", TRACKER_BUCKETS, TRACKER_OPS)

    @cached_property
    def registry(self) -> CollectorRegistry:
        return _registry(self.collect)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        f = self.factory
        counters = dict(f.counters)
        ops = CounterMetricFamily(PREFIX + "tracker_requests", "Requests answered, by operation.", labels=["op"])
        for op in TRACKER_OPS:
            ops.add_metric([op], counters.pop(f"tracker_{op}", 0))
        yield ops
        yield from counter_families(counters, TRACKER_COUNTERS)
        yield gauge("tracker_peers", "Peers in the table (a shared table: as of its last sweep).", f.registry.count())
        yield gauge("tracker_connections", "Open peer connections to this tracker.", len(f.open))
        yield self.latency.family()
