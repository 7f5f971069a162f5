"""Memory under exhaustion: floods of unique request IDs, registrations and endless lines leave memory flat.

The security issue asks for "the duplicate cache bounded in entries and age, so a million unique
request IDs leave memory flat".  Each test here feeds one kind of hostile input at a protocol
object running on a fake clock (``twisted.internet.task.Clock`` or p2pshare.testing's
``UDPMemoryReactorClock``, advanced by the test: simulated time, no sleeping), measures the
memory Python has allocated with ``tracemalloc`` (traced current size, after ``gc.collect()``)
once a warm-up has filled the bounded tables to their steady state, and again at the end.

**Pass criterion, for every test:** memory allocated after the warm-up and still held at the end
(end minus warm-up) is below the test's ``bound`` (stated in its docstring, with what a leak of
one small object per message would cost instead), and every bounded table is at or under its
documented maximum at every check.  The figures are printed (``-s`` shows them).

A full datagram costs the real peer some 40-70 microseconds of CPython (JSON decoding, attrs
validation of four addresses, forwarding), and several times that with tracemalloc hooked
into every allocation: a million of them through ``SearchProtocol.datagramReceived`` would take
minutes.  So the million goes through ``SearchCore``'s duplicate cache directly (``core.seen.add``,
the call ``on_query`` makes first for every datagram), and the protocol-level test sends fewer
but complete, valid encoded query datagrams, from 5,000 source addresses, through
``SearchProtocol`` with forwarding, flood records, retransmission timers and rate limiting all
live.  Nothing here is specific to 1M: these tables are bounded by count and by
age, so once full they stay at their size whatever the number of IDs.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections import deque
from typing import Any, Callable, Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from p2pshare.errors import NotFound
from p2pshare.neighbours import MAX_LEARNED, Neighbourhood
from p2pshare.search import MAX_FLOODS, DedupCache, SearchCore, SearchProtocol
from p2pshare.testing import UDPMemoryReactorClock, by_name
from p2pshare.tracker import MAX_PER_ADDRESS, TrackerFactory, TrackerServerProtocol
from p2pshare.transfer import ITransferNode, TransferFactory, TransferProtocol
from p2pshare.wire import MAX_DATAGRAM, MAX_FRAME, MAX_TRACKER_LINE, TrackerRequest

DEDUP_MAX_ENTRIES = 65536  # docs/operations.md and docs/security.md: "65,536 request IDs, 120 s"
DEDUP_MAX_AGE = 120.0
ME = "a" * 32


@pytest.fixture
def memory() -> Iterator[Callable[[], int]]:
    """Returns a function giving the bytes tracemalloc sees allocated now (after a collection)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()

    def now() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    try:
        yield now
    finally:
        if not was_tracing:
            tracemalloc.stop()


def report(text: str) -> None:
    print(f"\n{text}", flush=True)


def test_the_documented_bounds_are_the_defaults() -> None:
    cache = DedupCache()
    assert (cache.max_entries, cache.max_age) == (DEDUP_MAX_ENTRIES, DEDUP_MAX_AGE)


# -- search: a million unique request IDs ------------------------------------------------------------


def test_a_million_unique_request_ids_leave_the_duplicate_cache_and_memory_flat(
        memory: Callable[[], int]) -> None:
    """1,000,000 unique request IDs through ``SearchCore``'s duplicate cache (``core.seen.add``, as
    ``on_query`` calls it for each datagram), 10,000 a second of simulated time (so the count bound,
    not the age bound, is the one that bites).

    Pass: the duplicate cache never holds more than 65,536 IDs (checked after every ID), and
    every ID is taken as new (none is wrongly dropped as a duplicate); memory still held at the end
    that was not held after the first 100,000 IDs is under 1 MiB: about one byte per further ID,
    where keeping a single 32-character ID per request (81 bytes in CPython) would be 73 MB.
    """
    clock = Clock()
    core = SearchCore(by_name({}), lambda: [], lambda: (ME, ("", 6000)))
    seen, add = core.seen._seen, core.seen.add
    total, warm_up, bound = 1_000_000, 100_000, 1 << 20
    largest = 0
    started = time.perf_counter()
    base = 0
    for i in range(total):
        if i == warm_up:
            base = memory()
        if i % 100 == 0:
            clock.advance(0.01)  # 10,000 IDs a second
        rid = f"{i:032x}"
        now = clock.seconds()
        assert add(rid, now)  # every ID is new: the first sighting
        if len(seen) > largest:
            largest = len(seen)
            assert largest <= DEDUP_MAX_ENTRIES, f"the duplicate cache holds {largest} IDs after {i + 1}"
    grown = memory() - base
    seconds = time.perf_counter() - started
    report(f"[1M unique request IDs through SearchCore] cache at most {largest} IDs (max {DEDUP_MAX_ENTRIES}); "
           f"memory held after the first {warm_up:,}: "
           f"{base / 1e6:.1f} MB, growth over the next {total - warm_up:,}: {grown} bytes (bound {bound}); "
           f"{seconds:.1f} s")
    assert largest == DEDUP_MAX_ENTRIES
    assert grown < bound, f"memory grew by {grown} bytes over {total - warm_up} unique IDs"


def test_the_duplicate_cache_is_bounded_in_age_too(memory: Callable[[], int]) -> None:
    """40,000 unique IDs at 50 a second: the age bound (120 s) bites before the count bound.

    Pass: the cache never holds more than the IDs of the last 120 s (6,000, plus the one just
    added), every one of them younger than 120 s; memory growth after the first 20,000 under 64 KiB
    (keeping one ID per request would be 1.6 MB).
    """
    clock = Clock()
    cache = DedupCache()
    per_second, total, warm_up, bound = 50, 40_000, 20_000, 64 * 1024
    base = largest = 0
    for i in range(total):
        if i == warm_up:
            base = memory()
        clock.advance(1 / per_second)
        assert cache.add(f"{i:032x}", clock.seconds())
        largest = max(largest, len(cache))
    grown = memory() - base
    oldest = next(iter(cache._seen.values()))
    report(f"[age bound] {total:,} IDs at {per_second}/s: cache at most {largest} IDs, oldest "
           f"{clock.seconds() - oldest:.2f} s old; growth after the first {warm_up:,}: {grown} bytes")
    assert largest <= DEDUP_MAX_AGE * per_second + 1
    assert clock.seconds() - oldest <= DEDUP_MAX_AGE
    assert grown < bound


# -- search: valid datagrams through the protocol ------------------------------------------------------


class _Sink:
    """Stands for the UDP port: counts what would be sent, keeps only the last few."""

    def __init__(self) -> None:
        self.sent = 0
        self.last: deque[tuple[bytes, tuple[str, int]]] = deque(maxlen=8)

    def write(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.sent += 1
        self.last.append((datagram, addr))


def _query(i: int, source: tuple[str, int], ttl: int = 7) -> bytes:
    """A valid encoded query, as this implementation encodes one (``Query.encode``), built without the
    attrs round trip so that the test spends its time in the peer rather than in building input."""
    return (b'{"v":1,"t":"query","id":"%032x","name":"wanted/file-%d.txt","udp":["%s",%d],"tcp":["%s",%d],'
            b'"ttl":%d,"hops":0,"fetch":false}' % (i, i % 97, source[0].encode(), source[1], source[0].encode(),
                                                   source[1], ttl))


def test_unique_queries_from_many_sources_leave_the_protocol_memory_flat(memory: Callable[[], int]) -> None:
    """16,000 valid query datagrams, each with a new request ID, from 5,000 source addresses (so no
    source comes near the rate limit of 1,000 a second), 20 a second of simulated time, into a
    ``SearchProtocol`` wired as a peer wires it: a neighbour that never acknowledges (so every
    forwarded copy is retransmitted until given up), every source noted as a learned neighbour
    (``Neighbourhood.heard_from``, as ``Peer`` does; forwarding goes to the one only, to keep the
    test fast), retransmission timers run by the clock.

    Pass: after 8,000 datagrams, memory growth over the next 8,000 is under 64 KiB (8 bytes a
    datagram; keeping one request ID per datagram would be 650 KB); the duplicate cache stays
    within its maxima (full by age here: the 2,400 IDs of the last 120 s, plus one), the flood
    records within 4,096, the retransmission queue within its 8,192, the learned neighbours within
    32, the rate limiter's table within 4,096 sources.  The warm-up is past the point where every
    table is full and has been resized once after that (CPython sizes a dict's table by its live
    entries when insertions and deletions have used it up), so what follows is the steady state.
    """
    reactor = UDPMemoryReactorClock()
    hood = Neighbourhood(expire_after=90.0)
    forward_to = [("10.9.0.1", 4000)]
    core = SearchCore(by_name({}), lambda: forward_to, lambda: (ME, ("", 6000)))
    proto = SearchProtocol(core, reactor, on_sender=lambda addr: hood.heard_from(addr, reactor.seconds()))
    reactor.listenUDP(0, proto, maxPacketSize=MAX_DATAGRAM + 1)
    sink = _Sink()
    proto.transport = sink  # the fake port would record every datagram sent
    sources = [(f"10.{100 + n // 65536}.{n // 256 % 256}.{n % 256}", 4000) for n in range(5_000)]
    total, warm_up, per_second, bound = 16_000, 8_000, 20, 64 * 1024
    biggest: dict[str, int] = {}

    def check() -> None:
        for name, size, limit in (("dedup", len(core.seen), DEDUP_MAX_ENTRIES),
                                  ("floods", len(core._floods), MAX_FLOODS),
                                  ("retransmit", len(core.retransmitter), core.retransmitter.max_pending),
                                  ("learned", len(hood.current(reactor.seconds(), True)), MAX_LEARNED),
                                  ("buckets", len(proto.limit), proto.limit.keys)):
            biggest[name] = max(biggest.get(name, 0), size)
            assert size <= limit, f"{name}: {size} > {limit}"

    base = 0
    started = time.perf_counter()
    for i in range(total):
        if i == warm_up:
            base = memory()
        source = sources[i % len(sources)]
        proto.datagramReceived(_query(i, source), source)
        reactor.advance(1 / per_second)  # runs the retransmission timer when due
        if i % 500 == 0:
            check()
    check()
    grown = memory() - base
    counters = proto.counters
    report(f"[{total:,} unique queries through SearchProtocol] tables at most {biggest}; counters "
           f"received {counters['queries_received']}, forwarded {counters['queries_forwarded']}, retries "
           f"{counters['retries_query']}, given up {counters['gave_up_query']}, rate limited "
           f"{counters['dropped_rate_limited']}; growth after {warm_up:,}: {grown} bytes (bound {bound}); "
           f"{time.perf_counter() - started:.1f} s")
    assert counters["queries_received"] == total and counters["dropped_rate_limited"] == 0
    assert counters["gave_up_query"] > 0  # the retransmission queue was exercised to the end
    assert biggest["floods"] == MAX_FLOODS
    assert biggest["dedup"] <= DEDUP_MAX_AGE * per_second + 1
    assert grown < bound, f"memory grew by {grown} bytes over {total - warm_up} datagrams"


def test_a_flood_from_one_source_is_rate_limited_at_constant_memory(memory: Callable[[], int]) -> None:
    """50,000 unique-ID queries from one address as fast as it can send (no simulated time passes):
    the token bucket lets the first 2,000 (its burst) through and drops the rest before decoding.

    Pass: exactly 48,000 counted as ``dropped_rate_limited``; memory growth over the last
    40,000 under 64 KiB.
    """
    reactor = UDPMemoryReactorClock()
    core = SearchCore(by_name({}), lambda: [("10.9.0.1", 4000)], lambda: (ME, ("", 6000)))
    proto = SearchProtocol(core, reactor)
    reactor.listenUDP(0, proto, maxPacketSize=MAX_DATAGRAM + 1)
    proto.transport = _Sink()
    source = ("10.66.0.1", 4000)
    total, warm_up, bound = 50_000, 10_000, 64 * 1024
    base = 0
    for i in range(total):
        if i == warm_up:
            base = memory()
        proto.datagramReceived(_query(i, source), source)
    grown = memory() - base
    report(f"[one source, {total:,} datagrams at once] passed {proto.counters['queries_received']}, rate limited "
           f"{proto.counters['dropped_rate_limited']}; growth after {warm_up:,}: {grown} bytes")
    assert proto.counters["queries_received"] == 2000
    assert proto.counters["dropped_rate_limited"] == total - 2000
    assert grown < bound


# -- the tracker ------------------------------------------------------------------------------------


class _Discarding(StringTransport):
    """A TCP transport that only counts what is written (StringTransport would keep it all)."""

    written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)


def test_many_registrations_from_one_address_are_capped_at_constant_memory(memory: Callable[[], int]) -> None:
    """5,000 registrations, each of a new peer id, over one connection from one address.

    Pass: exactly ``MAX_PER_ADDRESS`` (32) are accepted and the registry never holds more; the
    rest are refused (``tracker_registrations_refused``); memory growth over the last 4,000 under
    64 KiB (keeping one 32-character id per refusal would be 320 KB).
    """
    clock = Clock()
    factory = TrackerFactory(clock)
    transport = _Discarding(peerAddress=IPv4Address("TCP", "10.6.6.6", 50000))
    proto = factory.buildProtocol(transport.getPeer())
    assert isinstance(proto, TrackerServerProtocol)
    proto.makeConnection(transport)
    total, warm_up, bound = 5_000, 1_000, 64 * 1024
    base = largest = 0
    for i in range(total):
        if i == warm_up:
            base = memory()
        proto.dataReceived(TrackerRequest("register", i + 1, peer=f"{i:032x}", udp=4000, tcp=4000).encode() + b"\n")
        if i % 100 == 0:
            clock.advance(1)
            largest = max(largest, len(factory.held), len(factory.registry.table._source))  # type: ignore[attr-defined]
    grown = memory() - base
    refused = factory.counters["tracker_registrations_refused"]
    report(f"[{total:,} registrations from one address] accepted {factory.counters['tracker_register'] - refused}, "
           f"refused {refused}, table at most {largest}; growth after {warm_up:,}: {grown} bytes")
    assert factory.counters["tracker_registrations_refused"] == total - MAX_PER_ADDRESS
    assert largest <= MAX_PER_ADDRESS and len(factory.registry.table._per_source) == 1  # type: ignore[attr-defined]
    assert not transport.disconnecting  # refused, not disconnected: it may still ask for peers
    assert grown < bound


# -- line buffers -----------------------------------------------------------------------------------


@implementer(ITransferNode)
class _NullNode:
    """A transfer node with nothing to share and no interest in offers."""

    peer_id = "b" * 32

    def open_for_sending(self, frame: Any) -> Any:
        raise NotFound("nothing here")

    def accept_offer(self, frame: Any, proto: Any) -> None:
        return None

    def track(self, proto: Any, alive: bool) -> None:
        pass


@pytest.mark.parametrize("which", ["tracker", "transfer"])
def test_an_endless_line_is_cut_off_at_the_line_limit(which: str, memory: Callable[[], int]) -> None:
    """Bytes without a newline, in 1 KiB reads, at a tracker connection (limit 16 KiB a line) and a
    transfer connection (4 KiB): until the connection is closed, then 4 MiB more (a reactor stops
    reading a connection it closes; this checks the buffer even if data kept coming).

    Pass: the connection is closed (``too_long``) by the read that takes the line past its limit,
    the buffer never holds more than the limit plus one read, and the peak memory allocated
    meanwhile stays under 256 KiB.
    """
    clock = Clock()
    transport = _Discarding(peerAddress=IPv4Address("TCP", "10.7.7.7", 50000))
    limit: int
    proto: TrackerServerProtocol | TransferProtocol
    if which == "tracker":
        built = TrackerFactory(clock).buildProtocol(transport.getPeer())
        assert built is not None
        proto, limit = built, MAX_TRACKER_LINE
    else:
        proto, limit = TransferFactory(_NullNode(), clock=clock).buildProtocol(transport.getPeer()), MAX_FRAME
    proto.makeConnection(transport)
    chunk = b"x" * 1024
    base = memory()
    tracemalloc.reset_peak()
    fed = largest = 0
    closed_at = None
    while closed_at is None or fed < closed_at + (4 << 20):
        proto.dataReceived(chunk)
        fed += len(chunk)
        largest = max(largest, len(proto._buffer if isinstance(proto, TrackerServerProtocol) else proto._line))
        if closed_at is None and transport.disconnecting:
            closed_at = fed
        assert fed < 1 << 30
    peak = tracemalloc.get_traced_memory()[1] - base
    report(f"[{which}: {fed} bytes without a newline] closed after {closed_at} bytes (limit {limit}); buffer at "
           f"most {largest} bytes; peak memory {peak} bytes")
    assert closed_at <= limit + len(chunk)
    assert largest <= limit + len(chunk)
    assert peak < 256 * 1024
    if which == "transfer":
        proto.connectionLost(None)


def test_a_registered_peer_costs_the_tracker_little_memory(memory: Callable[[], int]) -> None:
    """2,000 connections, each registering one peer (as every peer holds its own connection).

    Pass: what the tracker keeps for each, beyond the transports made before the count (Twisted's
    own, about 1.5 KB over TCP), is under 1,000 bytes: the protocol, the registry's record, the
    connection's record of what the peer said.  A set of peer ids and a ``Deferred`` made for every
    connection, whether or not anything waits for it, took 1,330; a dictionary for the one
    registration, 1,046 (about 870 now).
    """
    clock = Clock()
    factory = TrackerFactory(clock, max_per_address=10_000)
    count, bound = 2_000, 1_000
    transports = [_Discarding(peerAddress=IPv4Address("TCP", f"10.7.{i // 250}.{i % 250 + 1}", 50000))
                  for i in range(count)]
    lines = [TrackerRequest("register", 1, peer=f"{i:032x}", udp=4000, tcp=4000).encode() + b"\n"
             for i in range(count)]
    base = memory()
    for transport, line in zip(transports, lines):
        proto = factory.buildProtocol(transport.getPeer())
        assert proto is not None
        proto.makeConnection(transport)
        proto.dataReceived(line)
    per = (memory() - base) / count
    report(f"[{count:,} peers, each on its own connection] {per:.0f} bytes each in the tracker")
    assert len(factory.held) == count and len(factory.open) == count
    assert per < bound
