"""Flooding: the pure core, the datagram protocol's handling of bad input, and a flood in memory."""

from __future__ import annotations

import random
from typing import Optional

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from p2pshare.search import DedupCache, SearchCore, SearchProtocol
from p2pshare.shares import Entry
from p2pshare.testing import DatagramNetwork, UDPMemoryReactorClock, by_name
from p2pshare.wire import MAX_DATAGRAM, Ack, Address, Hit, Query, decode_datagram

RID = "1" * 32
ME = "a" * 32
SHA = "c" * 64
REQUESTER: Address = ("10.0.0.1", 5000)


def core(files: dict[str, Entry] | None = None, neighbours: list[Address] | None = None,
         max_ttl: int = 7) -> SearchCore:
    files = files or {}
    return SearchCore(by_name(files), lambda: list(neighbours or []), lambda: (ME, ("", 6000)), max_ttl=max_ttl)


def query(ttl: int = 3, fetch: bool = False, name: str = "f.txt", rid: str = RID) -> Query:
    return Query(rid, name, REQUESTER, REQUESTER, ttl, 0, fetch)


# -- DedupCache --------------------------------------------------------------------------


def test_dedup_cache_reports_the_first_sighting_only() -> None:
    cache = DedupCache()
    assert cache.add("x", 0.0)
    assert not cache.add("x", 1.0)


def test_dedup_cache_forgets_after_max_age() -> None:
    cache = DedupCache(max_age=10.0)
    cache.add("x", 0.0)
    assert cache.add("x", 10.5)


def test_dedup_cache_is_bounded_in_entries() -> None:
    cache = DedupCache(max_entries=100, max_age=1e9)
    for i in range(10_000):
        cache.add(f"{i}", float(i))
    assert len(cache) == 100


# -- SearchCore --------------------------------------------------------------------------


def tracked_to(reaction) -> list[tuple[str, Address]]:  # type: ignore[no-untyped-def]
    return [(kind, dest) for kind, _, _, dest in reaction.tracked]


def test_every_query_is_acknowledged_to_its_sender() -> None:
    sender = ("10.0.0.9", 1)
    reaction = core().on_query(query(), sender, now=0.0)
    assert reaction.sends == [(Ack(RID, "query").encode(), sender)]


def test_holder_answers_with_a_hit_to_the_requester_and_does_not_forward() -> None:
    entry = Entry("f.txt", 10, 1, SHA)
    c = core({"f.txt": entry}, neighbours=[("10.0.0.2", 1), ("10.0.0.3", 1)])
    reaction = c.on_query(query(), REQUESTER, now=0.0)  # straight from the requester: its query paid for it
    assert tracked_to(reaction) == [("hit", REQUESTER)]
    hit = decode_datagram(reaction.tracked[0][2])
    assert isinstance(hit, Hit)
    assert (hit.id, hit.name, hit.size, hit.sha256, hit.peer, hit.tcp, hit.hops) == (
        RID, "f.txt", 10, SHA, ME, ("", 6000), 1)
    assert reaction.offer is None


def test_holder_offers_the_file_when_the_query_is_a_fetch() -> None:
    entry = Entry("f.txt", 10, 1, SHA)
    reaction = core({"f.txt": entry}).on_query(query(fetch=True), ("10.0.0.9", 1), now=0.0)
    assert reaction.offer is not None and reaction.offer[1] == entry


def test_a_peer_downloading_the_file_answers_and_still_forwards_without_offering() -> None:
    """A partial holder serves what it has verified, but the query goes on to reach whole copies."""
    partial = Entry("f.txt", 10, 0, SHA, 1 << 20, b"p" * 32)
    c = core(neighbours=[("10.0.0.2", 1)])
    c.partial = lambda name, sha256: partial if name == "f.txt" else None
    reaction = c.on_query(query(fetch=True), REQUESTER, now=0.0)
    assert tracked_to(reaction) == [("hit", REQUESTER), ("query", ("10.0.0.2", 1))]
    assert reaction.offer is None  # the requester dials a partial holder; it is not offered to
    assert c.counters["hits_sent_partial"] == 1


def test_a_hit_for_an_unproven_requester_goes_back_along_the_query_path() -> None:
    """A holder that never heard from the requester sends the hit to the neighbour the query came
    from, which passes it on to where its own copy came from: only the first hop, which the
    requester's query paid, sends anything to the requester's address."""
    entry = Entry("f.txt", 10, 1, SHA)
    first_hop, holder_address = ("10.0.0.2", 1), ("10.0.0.3", 1)
    relay = core(neighbours=[holder_address])
    holder = core({"f.txt": entry}, neighbours=[first_hop])
    forwarded = relay.on_query(query(), REQUESTER, now=0.0)
    assert tracked_to(forwarded) == [("query", holder_address)]
    answer = holder.on_query(decode_datagram(forwarded.tracked[0][2]), first_hop, now=0.0)
    assert tracked_to(answer) == [("hit", first_hop)] and holder.counters["hits_sent_back"] == 1
    hit = decode_datagram(answer.tracked[0][2])
    passed = relay.on_hit(hit.with_sender(holder_address[0]), holder_address, now=0.0)
    assert tracked_to(passed) == [("hit", REQUESTER)] and relay.counters["hits_passed_back"] == 1
    assert passed.sends == [(Ack(RID, "hit").encode(), holder_address)]
    assert decode_datagram(passed.tracked[0][2]).tcp == (holder_address[0], 6000)  # the holder's host, filled in


def test_an_unproven_address_gets_no_more_bytes_than_it_sent() -> None:
    """Forged queries naming a victim as requester and source: the victim's budget is the bytes its
    (forged) queries brought; acks and hits beyond it, and retransmissions, are dropped and counted.
    An address that acknowledges a hit has proven it receives: it is no longer limited."""
    entry = Entry("f.txt", 10, 1, SHA)
    c = core({"f.txt": entry})
    received = sent = 0
    for i in range(20):
        q = query(rid=f"{i:032x}")
        received += len(q.encode())
        reaction = c.on_query(q, REQUESTER, now=0.0)
        sent += sum(len(p) for p, _ in reaction.sends) + sum(len(p) for *_, p, _ in reaction.tracked)
        for kind, rid, payload, dest in reaction.tracked:
            c.retransmitter.track(kind, rid, payload, dest, 0.0)
    for t in range(1, 40):
        sent += sum(len(p) for p, _ in c.due(t * 2.0))
    assert 0 < sent <= received and c.counters["dropped_unproven"] > 0
    assert c.on_query(query(rid="e" * 32), REQUESTER, now=80.0, size=1).tracked == []  # no credit, no hit
    answered = c.on_query(query(rid="d" * 32), REQUESTER, now=80.0)
    (kind, rid, payload, dest), = answered.tracked
    c.retransmitter.track(kind, rid, payload, dest, 80.0)
    c.on_ack("hit", rid, REQUESTER, now=80.1)  # the pending hit acknowledged: proven
    reaction = c.on_query(query(rid="f" * 32), REQUESTER, now=81.0, size=1)  # a tiny datagram: answered
    assert reaction.sends and tracked_to(reaction) == [("hit", REQUESTER)]


def test_non_holder_forwards_to_neighbours_except_sender_and_requester() -> None:
    sender = ("10.0.0.9", 1)
    c = core(neighbours=[sender, REQUESTER, ("10.0.0.2", 1), ("10.0.0.3", 1)])
    reaction = c.on_query(query(ttl=3), sender, now=0.0)
    assert tracked_to(reaction) == [("query", ("10.0.0.2", 1)), ("query", ("10.0.0.3", 1))]
    forwarded = decode_datagram(reaction.tracked[0][2])
    assert isinstance(forwarded, Query)
    assert (forwarded.ttl, forwarded.hops) == (2, 1)


def test_duplicate_queries_are_acknowledged_but_not_forwarded_again() -> None:
    c = core(neighbours=[("10.0.0.2", 1)])
    assert c.on_query(query(), ("10.0.0.9", 1), now=0.0).tracked
    again = c.on_query(query(), ("10.0.0.8", 1), now=1.0)
    assert again.tracked == [] and again.sends == [(Ack(RID, "query").encode(), ("10.0.0.8", 1))]
    assert c.counters["dropped_duplicate"] == 1


def test_expired_queries_are_not_forwarded() -> None:
    c = core(neighbours=[("10.0.0.2", 1)])
    assert c.on_query(query(ttl=0), ("10.0.0.9", 1), now=0.0).tracked == []
    assert c.counters["dropped_expired"] == 1


def test_a_huge_ttl_is_clamped_to_the_peers_maximum() -> None:
    c = core(neighbours=[("10.0.0.2", 1)], max_ttl=4)
    forwarded = decode_datagram(c.on_query(query(ttl=200), ("10.0.0.9", 1), now=0.0).tracked[0][2])
    assert isinstance(forwarded, Query) and forwarded.ttl == 3


def test_an_empty_requester_host_is_replaced_by_the_senders() -> None:
    c = core({"f.txt": Entry("f.txt", 1, 1, SHA)})
    q = Query(RID, "f.txt", ("", 5000), ("", 5001), 3)
    assert tracked_to(c.on_query(q, ("192.0.2.7", 5000), now=0.0)) == [("hit", ("192.0.2.7", 5000))]


def test_own_query_coming_back_is_a_duplicate() -> None:
    c = core(neighbours=[("10.0.0.2", 1)])
    rid, reaction = c.start_query("f.txt", REQUESTER, REQUESTER, False, 0.0, lambda h: None)
    assert tracked_to(reaction) == [("query", ("10.0.0.2", 1))]
    echoed = decode_datagram(reaction.tracked[0][2])
    assert isinstance(echoed, Query)
    assert c.on_query(echoed, ("10.0.0.2", 1), now=0.1).tracked == []


def test_hits_reach_the_search_that_asked_and_late_ones_are_counted() -> None:
    c = core()
    got: list[Hit] = []
    rid, _ = c.start_query("f.txt", REQUESTER, REQUESTER, False, 0.0, got.append)
    hit = Hit(rid, "f.txt", 1, SHA, ("10.0.0.5", 1), ME, 1)
    holder = ("10.0.0.5", 1)
    c.on_hit(hit, holder, 0.1)
    c.on_hit(hit, holder, 0.2)  # a retransmission whose ack was lost
    c.finish_query(rid)
    late = c.on_hit(hit, holder, 0.3)
    assert got == [hit]
    assert c.counters["dropped_duplicate_hit"] == 1
    assert c.counters["dropped_unknown_hit"] == 1
    assert late.sends == [(Ack(rid, "hit").encode(), holder)]  # acknowledged all the same


def test_request_ids_carry_128_random_bits() -> None:
    c = core()
    ids = {c.start_query("f", REQUESTER, REQUESTER, False, 0.0, lambda h: None)[0] for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 for i in ids)


# -- SearchProtocol ----------------------------------------------------------------------


def protocol_on_fake_port(c: Optional[SearchCore] = None) -> tuple[SearchProtocol, UDPMemoryReactorClock]:
    reactor = UDPMemoryReactorClock()
    proto = SearchProtocol(c or core(neighbours=[("10.0.0.2", 1)]), reactor)
    reactor.listenUDP(0, proto, maxPacketSize=MAX_DATAGRAM + 1)
    return proto, reactor


def test_bad_datagrams_are_counted_by_kind_and_dropped() -> None:
    proto, reactor = protocol_on_fake_port()
    for data in (b"", b"garbage", b'{"v":1,"t":"nope"}', b'{"v":9,"t":"query"}', b"x" * (MAX_DATAGRAM + 1)):
        proto.datagramReceived(data, ("10.0.0.3", 1))
    counters = proto.counters
    assert (counters["dropped_malformed"], counters["dropped_unsupported_version"],
            counters["dropped_oversized"]) == (3, 1, 1)
    assert reactor.udpPorts[40000].written == []


def test_bad_input_logging_is_rate_limited_per_source() -> None:
    proto, _ = protocol_on_fake_port()
    with capturedLogs() as events:
        for _ in range(100):
            proto.datagramReceived(b"garbage", ("10.0.0.3", 1))
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert 1 <= len(warnings) <= 5
    assert proto.counters["dropped_malformed"] == 100


def test_suppressed_messages_are_reported_when_the_window_reopens() -> None:
    proto, reactor = protocol_on_fake_port()
    for _ in range(20):
        proto.datagramReceived(b"garbage", ("10.0.0.3", 1))
    reactor.advance(61)
    with capturedLogs() as events:
        proto.datagramReceived(b"garbage", ("10.0.0.3", 1))
    assert any(e.get("suppressed") == 15 for e in events)


def test_a_query_is_forwarded_through_the_port() -> None:
    proto, reactor = protocol_on_fake_port()
    proto.datagramReceived(query().encode(), ("10.0.0.9", 1))
    (ack, sender), (payload, dest) = reactor.udpPorts[40000].written
    assert (decode_datagram(ack), sender) == (Ack(RID, "query"), ("10.0.0.9", 1))
    assert dest == ("10.0.0.2", 1)
    assert isinstance(decode_datagram(payload), Query)


def test_send_errors_are_counted_not_raised() -> None:
    proto, reactor = protocol_on_fake_port(core(neighbours=[("not-an-ip", 1)]))

    class Refusing:
        def write(self, data: bytes, addr: Address) -> None:
            raise ValueError("write() only accepts IP addresses, not hostnames")

    proto.transport = Refusing()  # type: ignore[assignment]
    proto.datagramReceived(query().encode(), ("10.0.0.9", 1))
    assert proto.counters["send_errors"] == 2  # the ack and the forwarded query
    assert len(proto.core.retransmitter) == 0  # what was never sent is not resent


# -- a flood across many peers in memory ----------------------------------------------------


def test_flood_finds_a_file_several_hops_away_and_each_peer_sees_the_query_once() -> None:
    net = DatagramNetwork()
    clock = Clock()
    n = 30
    addrs = [(f"127.0.0.{i + 1}", 7000) for i in range(n)]
    rng = random.Random(3)
    # A ring (so everyone is reachable) plus two random chords per peer.
    links = {a: {addrs[(i + 1) % n], *rng.sample(addrs, 2)} - {a} for i, a in enumerate(addrs)}
    holder = addrs[n // 2]
    cores = {}
    for a in addrs:
        files = {"f.txt": Entry("f.txt", 5, 1, SHA)} if a == holder else {}
        c = SearchCore(by_name(files), lambda a=a: sorted(links[a]), lambda: (ME, ("", 6000)), max_ttl=16)
        cores[a] = c
        net.attach(SearchProtocol(c, clock), a)
    hits: list[Hit] = []
    requester = addrs[0]
    rid, reaction = cores[requester].start_query("f.txt", requester, requester, False, 0.0, hits.append)
    proto = net.ports[requester].protocol
    assert isinstance(proto, SearchProtocol)
    proto.send_all(reaction)
    net.run()
    assert len(hits) == 1 and hits[0].hops >= 2
    assert all(c.counters["queries_received"] <= 1 for c in cores.values())
    clock.advance(1)  # retransmission timers wake, find everything acknowledged, and stop
    net.run()
    assert sum(c.counters["retries_query"] + c.counters["retries_hit"] for c in cores.values()) == 0
    assert not clock.getDelayedCalls()


def test_a_copy_from_a_neighbour_we_sent_to_acknowledges_both_ways() -> None:
    first, other = ("10.0.0.9", 1), ("10.0.0.2", 1)
    c = core(neighbours=[first, other])
    forwarded = c.on_query(query(), first, now=0.0)
    for kind, rid, payload, dest in forwarded.tracked:
        c.retransmitter.track(kind, rid, payload, dest, 0.0)
    assert c.retransmitter.pending_to("query", RID, other)
    duplicate = c.on_query(query(), other, now=0.01)  # other forwarded it to us as we did to it
    assert duplicate.sends == []  # our copy is its acknowledgement
    assert not c.retransmitter.pending_to("query", RID, other)  # and its copy is ours
    again = c.on_query(query(), other, now=0.5)  # other sends again: our copy was lost
    assert again.sends == [(Ack(RID, "query").encode(), other)]


def test_a_source_sending_too_fast_is_rate_limited_and_counted() -> None:
    proto, reactor = protocol_on_fake_port()
    for i in range(3000):
        proto.datagramReceived(Query(f"{i:032x}", "f.txt", REQUESTER, REQUESTER, 0).encode(), ("10.0.0.66", 1))
    assert proto.counters["dropped_rate_limited"] == 1000  # bursts of 2000 get through
    proto.datagramReceived(query(rid="e" * 32).encode(), ("10.0.0.67", 1))  # others are not affected
    assert proto.counters["queries_received"] == 2001
