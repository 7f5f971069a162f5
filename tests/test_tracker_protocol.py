"""The tracker on in-memory transports and a fake clock."""

from __future__ import annotations

import json
import random
import sys

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from p2pshare.registry import MemoryRegistry
from p2pshare.tap import TrackerOptions, makeTrackerService
from p2pshare.tracker import EXPIRE_AFTER, TrackerClientProtocol, TrackerFactory, TrackerServerProtocol
from p2pshare.wire import MAX_PEERS_ANSWER, MAX_TRACKER_LINE, PeerInfo, TrackerReply, TrackerRequest


def peer_id(n: int) -> str:
    return f"{n:032x}"


class Conn:
    """One client connection to a TrackerFactory, seen from a given address."""

    def __init__(self, factory: TrackerFactory, host: str) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 50000))
        self.proto = factory.buildProtocol(self.transport.getPeer())
        assert isinstance(self.proto, TrackerServerProtocol)
        self.proto.makeConnection(self.transport)
        self._next = 1

    def ask(self, op: str, **fields) -> dict:
        self.transport.clear()
        self.proto.dataReceived(TrackerRequest(op, self._next, **fields).encode() + b"\n")
        self._next += 1
        return json.loads(self.transport.value())

    def lose(self) -> None:
        self.proto.connectionLost(None)


def factory(**kw) -> TrackerFactory:  # type: ignore[no-untyped-def]
    return TrackerFactory(Clock(), rng=random.Random(1), **kw)


def register(f: TrackerFactory, n: int, host: str = "10.0.0.1", **extra) -> Conn:
    c = Conn(f, host)
    reply = c.ask("register", peer=peer_id(n), udp=4000 + n, tcp=4000 + n, **extra)
    assert reply["ok"], reply
    return c


def test_register_records_the_observed_address() -> None:
    f = factory(interval=5.0)
    c = Conn(f, "192.0.2.44")
    reply = c.ask("register", peer=peer_id(1), udp=4001, tcp=4002)
    assert reply == {"v": 1, "id": 1, "ok": True, "host": "192.0.2.44", "interval": 5.0}
    assert f.registry.get(peer_id(1)).host == "192.0.2.44"  # type: ignore[attr-defined, union-attr]


def test_an_advertised_host_overrides_the_observed_one() -> None:
    f = factory()
    c = Conn(f, "192.0.2.44")
    assert c.ask("register", peer=peer_id(1), udp=1, tcp=1, host="192.0.2.80")["host"] == "192.0.2.80"


def test_peers_answer_is_a_random_subset_without_the_asker() -> None:
    f = factory(max_peers=5)
    conns = [register(f, n, host=f"10.0.{n}.1") for n in range(30)]
    answers = set()
    for _ in range(20):
        reply = conns[0].ask("peers", peer=peer_id(0), max=50)
        ids = [p["peer"] for p in reply["peers"]]
        assert len(ids) == 5 == len(set(ids))
        assert peer_id(0) not in ids
        answers.add(tuple(sorted(ids)))
    assert len(answers) > 1  # random, not the same first five each time


def test_one_address_cannot_fill_the_table_or_an_answer() -> None:
    f = factory(max_peers=20, max_per_address=6)
    crowd = Conn(f, "10.6.6.6")
    replies = [crowd.ask("register", peer=peer_id(n), udp=1, tcp=1) for n in range(10)]
    assert [r["ok"] for r in replies] == [True] * 6 + [False] * 4
    assert replies[-1]["error"] == "too_many"
    others = [register(f, 100 + n, host=f"10.0.{n}.1") for n in range(10)]
    answer = others[0].ask("peers", peer=peer_id(100), max=20)["peers"]
    assert sum(p["host"] == "10.6.6.6" for p in answer) <= 4  # PER_HOST_IN_ANSWER
    assert len(answer) >= 13


def test_connections_beyond_the_per_address_limit_are_refused() -> None:
    f = factory(max_per_address=3)
    address = IPv4Address("TCP", "10.7.7.7", 1)
    built = [f.buildProtocol(address) for _ in range(4)]
    assert built[3] is None and all(built[:3])
    assert f.counters["tracker_connections_refused"] == 1
    assert f.buildProtocol(IPv4Address("TCP", "10.7.7.8", 1)) is not None


def test_the_asker_is_excluded_even_without_naming_itself() -> None:
    f = factory()
    conns = [register(f, n) for n in range(3)]
    ids = {p["peer"] for p in conns[1].ask("peers", max=10)["peers"]}
    assert ids == {peer_id(0), peer_id(2)}


def test_a_dropped_connection_removes_its_peer_at_once() -> None:
    f = factory()
    a, b = register(f, 1), register(f, 2)
    a.lose()
    assert [p["peer"] for p in b.ask("peers", max=10)["peers"]] == []


def test_one_connection_may_register_several_peers_and_they_leave_with_it() -> None:
    f = factory()
    gateway = Conn(f, "10.0.0.7")
    for n in range(3):
        assert gateway.ask("register", peer=peer_id(n), udp=1, tcp=1)["ok"]
    watcher = register(f, 9)
    assert len(watcher.ask("peers", max=10)["peers"]) == 3
    gateway.lose()
    assert watcher.ask("peers", max=10)["peers"] == []


def test_a_peer_that_reconnects_is_owned_by_its_new_connection() -> None:
    f = factory()
    old = register(f, 1)
    register(f, 1)
    old.lose()
    assert len(f.registry) == 1


def test_silent_peers_expire_after_three_intervals() -> None:
    f = factory(interval=10.0)
    register(f, 1)
    other = register(f, 2)
    for _ in range(EXPIRE_AFTER * 10 + 1):
        f.clock.advance(1)  # type: ignore[attr-defined]
        if f.clock.seconds() % 5 == 0:  # type: ignore[attr-defined]
            other.ask("heartbeat", peer=peer_id(2))
    f.expire()
    assert len(f.registry) == 1
    assert f.counters["tracker_expired"] == 1


def test_a_full_answer_of_ipv6_peers_fits_in_one_line() -> None:
    peers = tuple(PeerInfo(peer_id(n), "fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 65535)
                  for n in range(MAX_PEERS_ANSWER))
    line = TrackerReply(2**31 - 1, True, peers=peers).encode()
    assert len(line) <= MAX_TRACKER_LINE
    assert TrackerReply.decode(line).peers == peers


class _SharedLike(MemoryRegistry):
    """An in-memory table the tracker treats as a shared one (``local`` False): it keys its own
    records by integers instead of the id strings the table holds."""

    local = False


@pytest.mark.parametrize("shared", [False, True], ids=["in-memory", "shared"])
def test_a_table_that_lost_its_peers_gets_them_again_as_registered_at_their_next_heartbeat(shared: bool) -> None:
    """A shared table that comes back empty: each peer's connection kept what it registered, host
    given or not, and the next heartbeat puts exactly that back (from the same source address)."""
    f = factory(registry=_SharedLike(timeout=30.0)) if shared else factory()
    own, advertised, ipv4 = Conn(f, "192.0.2.44"), Conn(f, "192.0.2.45"), Conn(f, "192.0.2.47")
    assert own.ask("register", peer=peer_id(1), udp=65535, tcp=1)["ok"]
    assert advertised.ask("register", peer=peer_id(2), udp=4001, tcp=65535, host="2001:db8::7")["ok"]
    assert ipv4.ask("register", peer=peer_id(3), udp=1, tcp=65535, host="198.51.100.255")["ok"]
    # what each connection keeps: a tracker on Redis holds this for every peer it serves
    key = f.key(peer_id(1))
    assert f.peer_of(key) == peer_id(1) and sys.getsizeof(key) <= (44 if shared else 81)
    assert sys.getsizeof(own.proto.registration(key)) <= 32
    assert sys.getsizeof(ipv4.proto.registration(f.key(peer_id(3)))) <= 36  # an IPv4 host in the same int
    for n in (1, 2, 3):
        f.registry.remove(peer_id(n))  # the table lost them
    assert all(c.ask("heartbeat", peer=peer_id(n))["ok"] for n, c in ((1, own), (2, advertised), (3, ipv4)))
    assert f.counters["tracker_reregistered"] == 3
    assert f.registry.get(peer_id(1)) == PeerInfo(peer_id(1), "192.0.2.44", 65535, 1)  # type: ignore[attr-defined]
    assert f.registry.get(peer_id(2)) == PeerInfo(peer_id(2), "2001:db8::7", 4001, 65535)  # type: ignore[attr-defined]
    assert f.registry.get(peer_id(3)) == PeerInfo(peer_id(3), "198.51.100.255", 1, 65535)  # type: ignore[attr-defined]
    assert f.registry.table._source == {peer_id(1): "192.0.2.44", peer_id(2): "192.0.2.45",  # type: ignore[attr-defined]
                                        peer_id(3): "192.0.2.47"}
    other = Conn(f, "192.0.2.46")  # a connection that did not register it cannot bring it back
    f.registry.remove(peer_id(1))
    assert other.ask("heartbeat", peer=peer_id(1))["error"] == "unknown_peer"
    answer = ipv4.ask("peers", max=10)["peers"]  # without naming its peer: never its own
    assert sorted(p["peer"] for p in answer) == [peer_id(2)]
    ipv4.lose()  # its peers leave with it
    assert f.registry.get(peer_id(3)) is None and f.key(peer_id(3)) not in f.held  # type: ignore[attr-defined]


def test_heartbeat_from_an_unknown_peer_is_an_error() -> None:
    reply = Conn(factory(), "10.0.0.1").ask("heartbeat", peer=peer_id(9))
    assert (reply["ok"], reply["error"]) == (False, "unknown_peer")


def test_leave_removes_the_peer() -> None:
    f = factory()
    c = register(f, 1)
    assert c.ask("leave", peer=peer_id(1))["ok"]
    assert len(f.registry) == 0


def test_malformed_requests_get_an_error_and_the_connection_closes() -> None:
    f = factory()
    c = Conn(f, "10.0.0.1")
    c.proto.dataReceived(b'{"v":1,"op":"register","id":1}\n')
    assert json.loads(c.transport.value())["error"] == "malformed"
    assert c.transport.disconnecting
    assert f.counters["tracker_malformed"] == 1


def test_an_oversized_line_closes_the_connection() -> None:
    c = Conn(factory(), "10.0.0.1")
    c.proto.dataReceived(b"x" * (MAX_TRACKER_LINE + 100))
    assert json.loads(c.transport.value())["error"] == "too_long"
    assert c.transport.disconnecting


def test_an_idle_connection_is_closed_by_the_sweep() -> None:
    f = factory(interval=10.0)
    idle, busy = Conn(f, "10.0.0.1"), register(f, 2)
    for _ in range(EXPIRE_AFTER * 10 + 1):
        f.clock.advance(1)  # type: ignore[attr-defined]
        busy.ask("heartbeat", peer=peer_id(2))
    f.expire()
    assert idle.transport.disconnecting and not busy.transport.disconnecting
    assert f.counters["tracker_idle_closed"] == 1
    assert not f.clock.getDelayedCalls()  # type: ignore[attr-defined]  # no timer per connection


def test_client_pairs_replies_with_requests_by_id() -> None:
    client = TrackerClientProtocol()
    transport = StringTransport()
    client.makeConnection(transport)
    first = client.request("peers", max=1)
    second = client.request("heartbeat", peer=peer_id(1))
    results: list = []
    first.addCallback(results.append)
    second.addErrback(results.append)
    client.dataReceived(TrackerReply(2, False, "unknown_peer", "register first").encode() + b"\n")
    client.dataReceived(TrackerReply(1, True).encode() + b"\n")
    assert "unknown_peer" in str(results[0].value)
    assert results[1] == TrackerReply(1, True)


def test_client_fails_pending_requests_when_the_connection_drops() -> None:
    client = TrackerClientProtocol()
    client.makeConnection(StringTransport())
    d = client.request("peers", max=1)
    errors: list = []
    d.addErrback(errors.append)
    client.connectionLost(None)
    assert "lost" in str(errors[0].value)


@pytest_twisted.ensureDeferred
async def test_tracker_service_listens_and_leaves_no_timers() -> None:
    reactor, opts = MemoryReactorClock(), TrackerOptions()
    opts.parseOptions(["--port", "8000"])
    svc = makeTrackerService(opts, reactor=reactor)
    svc.startService()
    assert [port for port, *_ in reactor.tcpServers] == [8000]
    reactor.advance(60)  # the expiry loop runs
    await svc.stopService()
    assert reactor.getDelayedCalls() == []


def test_a_heartbeat_without_answer_aborts_the_connection() -> None:
    from twisted.internet.testing import StringTransport as T

    from p2pshare.tracker import TrackerClient

    clock = Clock()
    client = TrackerClient(None, clock, lambda: (peer_id(1), 1, 1, None), lambda peers: None)  # type: ignore
    proto = TrackerClientProtocol()
    transport = T()
    proto.makeConnection(transport)
    client.proto, client.interval = proto, 5.0
    client._beat()
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)  # a silent partition: no reply, no reset
    assert transport.disconnecting or transport.disconnected
    proto.connectionLost(None)  # the pending heartbeat was already given up: no second failure
    assert not clock.getDelayedCalls()


class HangingUpTracker:
    """A client endpoint to a tracker that accepts each connection and hangs up on the register."""

    def __init__(self) -> None:
        self.connections: list[TrackerClientProtocol] = []

    def connect(self, factory):  # type: ignore[no-untyped-def]
        from twisted.internet.defer import succeed

        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        proto.makeConnection(StringTransport())
        self.connections.append(proto)
        return succeed(proto)


def test_a_tracker_that_hangs_up_on_registration_is_retried_with_growing_delays() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from p2pshare.tracker import TrackerClient

    clock, tracker = Clock(), HangingUpTracker()
    client = TrackerClient(tracker, clock, lambda: (peer_id(1), 1, 1, None), lambda peers: None)  # type: ignore
    client.startService()
    delays = []
    for attempt in range(1, 6):
        assert len(tracker.connections) == attempt
        tracker.connections[-1].connectionLost(Failure(ConnectionDone()))  # during registration
        (retry,) = [c for c in clock.getDelayedCalls() if c is not client._refresher.call]
        delays.append(retry.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert not client.registered
    assert delays[-1] > delays[0] + 2  # backed off, not retried at the first delay forever
    client.stopService()
    assert not clock.getDelayedCalls()


def test_several_trackers_are_tried_in_turn_from_the_one_that_last_worked() -> None:
    from twisted.internet.defer import fail, succeed

    from p2pshare.tracker import FailoverEndpoint

    attempts: list[str] = []

    class Endpoint:
        def __init__(self, name: str, up: bool) -> None:
            self.name, self.up = name, up

        def connect(self, factory: object) -> object:
            attempts.append(self.name)
            return succeed(self.name) if self.up else fail(ConnectionRefusedError(self.name))

    a, b, c = Endpoint("a", False), Endpoint("b", True), Endpoint("c", True)
    endpoint = FailoverEndpoint([a, b, c])  # type: ignore[list-item]
    got: list[object] = []
    endpoint.connect(None).addCallback(got.append)
    assert got == ["b"] and attempts == ["a", "b"]
    a.up = True
    endpoint.connect(None).addCallback(got.append)
    assert got == ["b", "b"] and attempts == ["a", "b", "b"]  # stays with the one that works
    b.up = c.up = a.up = False
    failures: list[object] = []
    endpoint.connect(None).addErrback(failures.append)
    assert len(failures) == 1 and attempts[3:] == ["b", "c", "a"]



def test_a_connection_that_registers_and_drops_many_peers_keeps_a_short_record() -> None:
    """A connection's list of its peers may still name peers that left or moved to another connection
    (what each registered is the factory's); it is pruned as it grows, so a gateway registering and
    dropping peers all day holds no more than about twice what it has registered now."""
    f = factory(max_per_address=10_000)
    gateway, other = Conn(f, "10.0.0.1"), Conn(f, "10.0.0.2")
    for n in range(1000):
        assert gateway.ask("register", peer=peer_id(n), udp=1, tcp=1)["ok"]
        if n % 2:
            assert gateway.ask("leave", peer=peer_id(n))["ok"]
        elif n >= 20:
            assert other.ask("register", peer=peer_id(n), udp=1, tcp=1)["ok"]  # moved: the newer owns it
    kept = [f.key(peer_id(n)) for n in range(0, 20, 2)]
    assert gateway.proto.registered() == kept
    assert len(gateway.proto._keys or ()) <= 2 * len(kept) + 16 + 1
    gateway.lose()  # its own peers leave with it; those that moved stay
    assert all(f.registry.get(peer_id(n)) is None for n in range(0, 20))  # type: ignore[attr-defined]
    assert all(f.registry.get(peer_id(n)) is not None for n in range(20, 1000, 2))  # type: ignore[attr-defined]
