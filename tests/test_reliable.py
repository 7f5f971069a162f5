"""Per-hop retransmission, neighbour bookkeeping, and a flood that survives loss on a fake clock."""

from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock

from p2pshare.neighbours import Neighbourhood
from p2pshare.ratelimit import Backoff, TokenBuckets
from p2pshare.reliable import Retransmitter
from p2pshare.search import SearchCore, SearchProtocol
from p2pshare.shares import Entry
from p2pshare.testing import DatagramNetwork, by_name
from p2pshare.wire import Address, Hit

A: Address = ("10.0.0.1", 1)
B: Address = ("10.0.0.2", 1)


def test_an_unacknowledged_datagram_is_resent_with_backoff_then_given_up() -> None:
    r = Retransmitter(first_timeout=0.25, max_timeout=1.0, tries=4)
    r.track("query", "id", b"payload", A, now=0.0)
    times = []
    now = 0.0
    while (deadline := r.next_deadline()) is not None:
        now = deadline
        if r.due(now):
            times.append(now)
    assert times == [0.25, 0.75, 1.75]  # 3 resends: 4 sends in all, timeouts 0.25, 0.5, 1.0
    assert r.counters["retries_query"] == 3 and r.counters["gave_up_query"] == 1
    assert len(r) == 0


def test_an_ack_from_the_destination_stops_the_resending() -> None:
    r = Retransmitter()
    r.track("hit", "id", b"p", A, now=0.0)
    assert not r.ack("hit", "id", B)  # from someone else: not ours
    assert r.ack("hit", "id", A)
    assert r.due(100.0) == [] and r.next_deadline() is None


def test_forget_drops_everything_about_a_request() -> None:
    r = Retransmitter()
    r.track("query", "x", b"p", A, now=0.0)
    r.track("query", "x", b"p", B, now=0.0)
    r.track("query", "y", b"p", B, now=0.0)
    r.forget("x")
    assert len(r) == 1


def test_the_pending_table_is_bounded() -> None:
    r = Retransmitter(max_pending=10)
    for i in range(100):
        r.track("query", f"{i}", b"p", A, now=0.0)
    assert len(r) == 10 and r.counters["retransmit_queue_full"] == 90


def test_neighbourhood_merges_sources_without_duplicates_or_self() -> None:
    me: Address = ("10.0.0.9", 9)
    hood = Neighbourhood(own={me}, static=[A], tracker=[A, B, me], expire_after=10.0)
    hood.heard_from(("10.0.0.3", 1), now=0.0)
    hood.heard_from(me, now=0.0)
    assert hood.current(1.0, tracker_up=True) == [A, B, ("10.0.0.3", 1)]


def test_learned_neighbours_expire_unless_heard_from_again() -> None:
    hood = Neighbourhood(expire_after=10.0)
    hood.heard_from(A, now=0.0)
    hood.heard_from(B, now=0.0)
    hood.heard_from(B, now=8.0)
    assert hood.current(12.0, tracker_up=True) == [B]


def test_exchanged_peers_are_used_only_while_the_tracker_is_down() -> None:
    hood = Neighbourhood(tracker=[A])
    hood.told_about([B], now=0.0)
    assert hood.current(1.0, tracker_up=True) == [A]
    assert hood.current(1.0, tracker_up=False) == [A, B]


def test_a_sample_for_a_hello_leaves_out_its_recipient() -> None:
    hood = Neighbourhood(tracker=[A, B, ("10.0.0.3", 1)])
    assert A not in hood.sample(8, random.Random(1), 0.0, exclude=A)
    assert len(hood.sample(1, random.Random(1), 0.0, exclude=A)) == 1


def flood_under_loss(loss: float, seed: int, tries: int = 7) -> tuple[bool, int]:
    """A 12-peer ring with chords, a file 3+ hops away, *loss* on every datagram; found?, datagrams."""
    net = DatagramNetwork(loss=loss, rng=random.Random(seed))
    clock = Clock()
    n = 12
    addrs = [(f"127.0.0.{i + 1}", 7000) for i in range(n)]
    links = {a: {addrs[(i + 1) % n], addrs[(i - 1) % n]} for i, a in enumerate(addrs)}
    holder = addrs[n // 2]
    cores = {}
    for a in addrs:
        files = {"f": Entry("f", 1, 1, "c" * 64)} if a == holder else {}
        cores[a] = SearchCore(by_name(files), lambda a=a: sorted(links[a]), lambda: ("a" * 32, ("", 1)), max_ttl=8,
                              retransmitter=Retransmitter(tries=tries))
        net.attach(SearchProtocol(cores[a], clock), a)
    hits: list[Hit] = []
    requester = addrs[0]
    _, reaction = cores[requester].start_query("f", requester, requester, False, 0.0, hits.append)
    proto = net.ports[requester].protocol
    assert isinstance(proto, SearchProtocol)
    proto.send_all(reaction)
    for _ in range(400):  # 20 s of fake time in 50 ms steps
        net.run()
        clock.advance(0.05)
    net.run()
    assert not clock.getDelayedCalls()  # every retransmission ended: acknowledged or given up
    return bool(hits), net.sent


@pytest.mark.parametrize("loss", [0.2, 0.4])
def test_loss_is_repaired_at_every_hop(loss: float) -> None:
    results = [flood_under_loss(loss, seed) for seed in range(40)]
    found = sum(ok for ok, _ in results)
    assert found >= (39 if loss == 0.2 else 36), f"{found}/40 found at {loss:.0%} loss"
    baseline = flood_under_loss(0.0, 0)[1]
    worst = max(sent for _, sent in results)
    assert worst <= 7 * baseline  # the bound: each datagram sent at most `tries` times (plus acks)


def test_without_retransmission_the_same_loss_loses_searches() -> None:
    """The control for the test above: one send per datagram, no repair."""
    found = sum(flood_under_loss(0.4, seed, tries=1)[0] for seed in range(40))
    assert found < 30


def test_giving_up_on_a_destination_is_reported() -> None:
    lost: list[tuple[str, str, Address]] = []
    r = Retransmitter(tries=2, on_give_up=lambda *key: lost.append(key))
    r.track("query", "id", b"p", A, now=0.0)
    r.due(1.0)
    r.due(10.0)
    assert lost == [("query", "id", A)]


def test_a_neighbour_that_is_forgotten_drops_out_of_learned_and_exchanged() -> None:
    hood = Neighbourhood(tracker=[B])
    hood.heard_from(A, now=0.0)
    hood.told_about([A], now=0.0)
    hood.forget(A)
    assert hood.current(1.0, tracker_up=False) == [B]


def test_tracker_neighbours_stay_put_and_only_free_places_are_filled() -> None:
    c: Address = ("10.0.0.3", 1)
    hood = Neighbourhood()
    assert hood.refresh_tracker([A, B], want=2) == [A, B]
    assert hood.refresh_tracker([c, B], want=2) == []  # A and B are kept
    hood.forget(A)  # A stopped answering
    assert hood.refresh_tracker([B, c], want=2) == [c]
    assert hood.tracker == [B, c]


def test_the_first_timeout_follows_measured_round_trips() -> None:
    r = Retransmitter(first_timeout=0.25, min_timeout=0.1, max_timeout=2.0)
    for i in range(50):
        r.track("query", f"{i}", b"p", A, now=float(i))
        r.ack("query", f"{i}", A, now=i + 0.6)  # a slow, loaded network
    assert 0.6 < r.first_timeout <= 1.0
    for i in range(50, 200):
        r.track("query", f"{i}", b"p", A, now=float(i))
        r.ack("query", f"{i}", A, now=i + 0.001)  # a quiet LAN
    assert r.first_timeout == 0.1


def test_hellos_go_to_chosen_neighbours_not_to_those_that_only_greeted_us() -> None:
    c: Address = ("10.0.0.3", 1)
    hood = Neighbourhood(static=[A], tracker=[B])
    hood.heard_from(c, now=0.0)
    hood.told_about([("10.0.0.4", 1)], now=0.0)
    assert hood.current(1.0, tracker_up=True) == [A, B, c]
    assert hood.chosen(1.0, tracker_up=True) == [A, B]
    assert hood.chosen(1.0, tracker_up=False) == [A, B, ("10.0.0.4", 1)]


def test_token_buckets_allow_bursts_then_the_rate() -> None:
    buckets = TokenBuckets(rate=10, burst=20, keys=2)
    assert sum(buckets.allow("a", 0.0) for _ in range(100)) == 20
    assert sum(buckets.allow("a", 1.0) for _ in range(100)) == 10  # one second refills ten
    assert buckets.allow("b", 1.0) and buckets.allow("c", 1.0)
    assert len(buckets) == 2  # the table is bounded: "a" was pushed out


def test_backoff_doubles_after_each_failure_and_a_success_forgets() -> None:
    b = Backoff(base=1.0, cap=5.0)
    b.failed("x", 0.0)
    assert not b.allowed("x", 0.5) and b.allowed("x", 1.0)
    b.failed("x", 1.0)
    assert not b.allowed("x", 2.5) and b.allowed("x", 3.0)
    for _ in range(10):
        b.failed("x", 3.0)
    assert b.allowed("x", 8.0)  # capped at 5 s
    b.succeeded("x")
    assert b.allowed("x", 3.0)
