"""LAN discovery: announcements (pure), the protocol on a Clock with a fake transport (flooded, sealed),
and five ``twistd`` peers in network namespaces on one bridge finding each other without a tracker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet.task import Clock

from p2pshare.lan import BURST, FIRST, MAX_ANNOUNCEMENT, PERIOD, LanDiscovery, decode, encode, is_loopback
from p2pshare.neighbours import MAX_LAN, Neighbourhood
from p2pshare.ratelimit import Counters
from tests.netns import TestNetwork, requires_netns
from tests.test_system import P2PSHARE, TWISTD

ME, OTHER = "a" * 32, "b" * 32


# -- pure ---------------------------------------------------------------------------------------

def test_an_announcement_round_trips_and_nothing_else_passes_for_one() -> None:
    assert decode(encode(OTHER, 7000)) == (OTHER, 7000, "")
    assert decode(encode(OTHER, 7000, "fd00::5")) == (OTHER, 7000, "fd00::5")
    for host in ("fe80::1", "10.0.0.1", "name"):  # a host, when named, is an IPv6 address others can reach
        with pytest.raises(ValueError):
            decode(encode(OTHER, 7000, host))
    assert len(encode(OTHER, 65535)) < MAX_ANNOUNCEMENT
    for bad in (b"", b"[]", b'{"v":1,"t":"lan","peer":"x","udp":7000}', b'{"v":2,"t":"lan","peer":"' + b"b" * 32
                + b'","udp":7000}', b'{"v":1,"t":"lan","peer":"' + b"b" * 32 + b'","udp":0}',
                b'{"v":1,"t":"lan","peer":"' + b"b" * 32 + b'","udp":true}',
                b'{"v":1,"t":"lan","peer":"' + b"b" * 32 + b'","udp":7000,"x":1}', b"\xff"):
        with pytest.raises(ValueError):
            decode(bad)


def test_loopback_interfaces_are_recognised() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_lan_neighbours_are_kept_greeted_bounded_and_expire() -> None:
    hood = Neighbourhood(lan_expire_after=100.0)
    assert hood.found_on_lan(("10.0.0.2", 7000), 0.0)
    assert not hood.found_on_lan(("10.0.0.2", 7000), 1.0)  # known: no second hello
    assert hood.current(1.0, tracker_up=True) == [("10.0.0.2", 7000)]
    assert hood.chosen(1.0, tracker_up=True) == [("10.0.0.2", 7000)]  # we say hello to them
    for i in range(3 * MAX_LAN):
        hood.found_on_lan(("10.0.1.%d" % i, 7000), 2.0)
    assert len(hood.current(3.0, tracker_up=True)) == MAX_LAN
    assert hood.current(200.0, tracker_up=True) == []


# -- the protocol, on a clock ---------------------------------------------------------------------

class FakeMulticast:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.groups: list[tuple[str, str]] = []
        self.ttl = self.loop = None

    def setTTL(self, ttl: int) -> None:
        self.ttl = ttl

    def setLoopbackMode(self, mode: bool) -> None:
        self.loop = mode

    def setOutgoingInterface(self, addr: str) -> None:
        pass

    def joinGroup(self, group: str, interface: str = "") -> Any:
        from twisted.internet.defer import succeed

        self.groups.append((group, interface))
        return succeed(None)

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def discovery(seal: Any = None) -> tuple[LanDiscovery, FakeMulticast, Clock, list[tuple[str, int]], Counters]:
    clock, found, counters = Clock(), [], Counters()
    clock.advance(time.time())  # seals carry the wall clock's time
    lan = LanDiscovery(ME, lambda: 7000, found.append, clock, counters, seal=seal)
    transport = FakeMulticast()
    lan.makeConnection(transport)  # type: ignore[arg-type]
    return lan, transport, clock, found, counters


def test_a_peer_announces_three_times_at_start_then_every_period_with_jitter() -> None:
    lan, transport, clock, _, counters = discovery()
    assert transport.ttl == 1 and transport.loop is True and transport.groups == [("239.192.72.69", "")]
    clock.advance(FIRST[-1] + 0.01)
    assert len(transport.sent) == 3 and {a for _, a in transport.sent} == {("239.192.72.69", 7771)}
    assert decode(transport.sent[0][0]) == (ME, 7000, "")
    clock.advance(PERIOD * 1.2)
    assert len(transport.sent) == 4
    clock.pump([1.0] * int(PERIOD * 10))
    assert 12 <= len(transport.sent) <= 16 and counters["lan_announcements_sent"] == len(transport.sent)
    lan.stopProtocol()
    assert not clock.getDelayedCalls()


def test_peers_heard_are_found_and_our_own_echo_is_not() -> None:
    lan, _, _, found, counters = discovery()
    lan.datagramReceived(encode(OTHER, 7001), ("10.0.0.2", 7771))
    lan.datagramReceived(encode(ME, 7000), ("10.0.0.1", 7771))
    assert found == [("10.0.0.2", 7001)] and counters["lan_announcements_received"] == 1


def test_an_ipv6_announcement_from_a_link_local_source_is_used_through_the_host_it_names() -> None:
    lan, _, _, found, counters = discovery()
    lan.datagramReceived(encode(OTHER, 7001, "fd00::5"), ("fe80::5", 7771))
    lan.datagramReceived(encode("c" * 32, 7002), ("fe80::6", 7771))  # no host: unreachable, dropped
    lan.datagramReceived(encode("d" * 32, 7003), ("::ffff:10.0.0.7", 7771))  # IPv4 on a dual-stack socket
    assert found == [("fd00::5", 7001), ("10.0.0.7", 7003)] and counters["lan_dropped_bad"] == 1


class FakeSocket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, Any]] = []

    def setsockopt(self, level: int, name: int, value: Any) -> None:
        self.options.append((level, name, value))


def test_on_ipv6_a_peer_joins_the_link_local_group_per_interface_and_names_its_address(tmp_path: Path) -> None:
    import socket

    from p2pshare.lan import GROUP6, LanDiscovery6, own_ipv6_addresses

    clock, found, counters = Clock(), [], Counters()
    lan = LanDiscovery6(ME, lambda: 7000, found.append, clock, counters, addresses=lambda: {4: "fd00::2", 7: "fd01::9"})
    transport = FakeMulticast()
    transport.socket = FakeSocket()  # type: ignore[attr-defined]
    lan.makeConnection(transport)  # type: ignore[arg-type]
    joins = [v for level, name, v in transport.socket.options if name == socket.IPV6_JOIN_GROUP]  # type: ignore
    assert [v[16:] for v in joins] == [(4).to_bytes(4, "little"), (7).to_bytes(4, "little")]
    assert all(v[:16] == socket.inet_pton(socket.AF_INET6, GROUP6) for v in joins)
    clock.advance(0.01)
    assert [decode(d) for d, _ in transport.sent] == [(ME, 7000, "fd00::2"), (ME, 7000, "fd01::9")]
    assert {a for _, a in transport.sent} == {(GROUP6, 7771)}
    hops = [v for level, name, v in transport.socket.options if name == socket.IPV6_MULTICAST_HOPS]  # type: ignore
    assert hops == [1]
    table = tmp_path / "if_inet6"
    table.write_text("00000000000000000000000000000001 01 80 10 80 lo\n"
                     "fe8000000000000000fc00fffe000001 04 40 20 80 eth0\n"
                     "fd000000000000000000000000000002 04 40 00 82 eth0\n"
                     "fd000000000000000000000000000003 05 40 00 a0 eth1\n")  # eth1's: tentative, deprecated
    assert own_ipv6_addresses(str(table)) == {4: "fd00::2"}
    lan.stopProtocol()


def test_a_flood_of_forged_announcements_costs_bounded_work_and_memory() -> None:
    lan, _, clock, found, counters = discovery()
    for i in range(20_000):
        lan.datagramReceived(encode("%032x" % i, 7000), (f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 7771))
    assert len(found) <= BURST  # all at one instant: the burst, no more
    clock.advance(10.0)
    for i in range(20_000):
        lan.datagramReceived(encode("%032x" % i, 7000), ("10.9.9.9", 7771))
    assert len(found) <= 2 * BURST  # one source: its own small budget
    assert counters["lan_dropped_rate_limited"] >= 40_000 - 2 * BURST
    assert len(lan._per_source) <= 4096


def test_in_a_private_network_announcements_are_sealed_and_others_dropped(tmp_path: Path) -> None:
    from p2pshare.netkey import DatagramSeal, NetworkKey

    ours, theirs = DatagramSeal(NetworkKey.generate()), DatagramSeal(NetworkKey.generate())
    lan, transport, clock, found, counters = discovery(seal=ours)
    clock.advance(0.01)
    sealed = transport.sent[0][0]
    assert b"lan" not in sealed and b"peer" not in sealed  # outsiders learn nothing
    lan.datagramReceived(encode(OTHER, 7001), ("10.0.0.2", 7771))  # not sealed
    lan.datagramReceived(theirs.seal(encode(OTHER, 7001)), ("10.0.0.3", 7771))  # another network's
    assert found == [] and counters["lan_dropped_bad"] == 2
    lan.datagramReceived(ours.seal(encode(OTHER, 7001)), ("10.0.0.4", 7771))
    assert found == [("10.0.0.4", 7001)]


# -- five hosts on one link -----------------------------------------------------------------------

HOSTS = 5
PORT = 7000


def start_peers(net: TestNetwork, root: Path, *extra: str) -> list[Any]:
    procs = []
    for k, host in enumerate(net.hosts):
        host.run("ip", "route", "replace", "224.0.0.0/4", "dev", "eth0", check=True)  # as a LAN host's default route
        (root / f"p{k}").mkdir(exist_ok=True)
        log = (root / f"p{k}.log").open("ab")
        procs.append(host.popen(TWISTD, "-n", "--pidfile=", "p2ppeer", "--dir", f"p{k}", "--port", str(PORT),
                                "--control", "tcp:0:interface=127.0.0.1", "--rescan", "3600", *extra, cwd=root,
                                stdout=log, stderr=log))
    return procs


def search(host: Any, root: Path, name: str) -> Optional[list[str]]:
    done = host.run(P2PSHARE, "--dir", "p0", "search", name, "--timeout", "0.5", "--json", cwd=root, timeout=30)
    if done.returncode != 0:
        return None
    return [h["tcp"] for h in json.loads(done.stdout)["hits"]]


def logs(root: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(root.glob("*.log")))


def hits_within_5_seconds_of_starting(net: TestNetwork, root: Path, name: str, text: str) -> Optional[list[str]]:
    """The last host shares *name*; every host starts a peer; host 0 searches until a hit or 5 s."""
    (root / f"p{HOSTS - 1}").mkdir()
    (root / f"p{HOSTS - 1}" / name).write_text(text)
    started = time.monotonic()
    start_peers(net, root)
    hits = None
    while time.monotonic() - started < 5.0 and not hits:
        hits = search(net.hosts[0], root, name)
    return hits


@requires_netns
@pytest.mark.netns
def test_five_peers_without_a_tracker_find_a_file_within_5_seconds_of_starting(tmp_path: Path) -> None:
    with TestNetwork(HOSTS, tmp_path / "net") as net:
        hits = hits_within_5_seconds_of_starting(net, tmp_path, "lan.txt", "found on the link")
        assert hits == [f"{net.hosts[-1].ip}:{PORT}"], f"no hit within 5 s of starting{logs(tmp_path)}"
        # The hit needs only the holder; the other peers may still be starting (five daemons on two
        # cores), and each is known from its first announcement or its hello: all within seconds.
        deadline, status = time.monotonic() + 10.0, {"neighbours": []}
        while time.monotonic() < deadline and len(status["neighbours"]) < HOSTS - 1:
            status = json.loads(net.hosts[0].run(P2PSHARE, "--dir", "p0", "status", "--json", cwd=tmp_path).stdout)
        assert status["tracker"] is None and len(status["neighbours"]) == HOSTS - 1, \
            f"p0 knows {status['neighbours']}{logs(tmp_path)}"
        assert status["counters"]["lan_announcements_received"] >= 1
        got = net.hosts[0].run(P2PSHARE, "--dir", "p0", "get", "lan.txt", cwd=tmp_path, timeout=60)
        assert got.returncode == 0 and (tmp_path / "p0" / "lan.txt").read_text() == "found on the link"


@requires_netns
@pytest.mark.netns
def test_with_a_tracker_too_nothing_breaks_and_across_a_router_only_the_tracker_links_peers(
        tmp_path: Path) -> None:
    """Hosts 0-1 and 2-4 on two links (two bridges, two subnets) joined by a router, which forwards
    unicast only: without a tracker the two sides do not find each other; with one (in host 2), they
    do, and LAN discovery still runs beside it."""
    with TestNetwork(HOSTS, tmp_path / "net", second_link_from=2) as net:
        (tmp_path / f"p{HOSTS - 1}").mkdir()
        (tmp_path / f"p{HOSTS - 1}" / "far.txt").write_text("across the router")
        procs = start_peers(net, tmp_path)
        time.sleep(3.0)  # three announcements each, by now
        assert not search(net.hosts[0], tmp_path, "far.txt"), "found across the router without a tracker"
        for p in procs:
            p.terminate()
            p.wait(10)
        tracker_log = (tmp_path / "tracker.log").open("ab")
        net.hosts[2].popen(TWISTD, "-n", "--pidfile=", "p2ptracker", "--port", "8000", "--interval", "1", cwd=tmp_path,
                           stdout=tracker_log, stderr=tracker_log)
        start_peers(net, tmp_path, "--tracker", f"{net.hosts[2].ip}:8000", "--refresh", "1")
        deadline, hits = time.monotonic() + 20.0, None
        while time.monotonic() < deadline and not hits:
            hits = search(net.hosts[0], tmp_path, "far.txt")
        assert hits == [f"{net.hosts[-1].ip}:{PORT}"], f"not found through the tracker{logs(tmp_path)}"
        # The peers start with the tracker, so a first connection may be refused and retried after its
        # backoff (about a second), and the hit above can come before p0 is registered or has heard a
        # LAN announcement (one a second): both come within a few seconds.
        def both(status: dict[str, Any]) -> bool:
            return (status.get("tracker", {}).get("connected", False)
                    and status.get("counters", {}).get("lan_announcements_received", 0) >= 1)

        deadline, status = time.monotonic() + 10.0, {}
        while time.monotonic() < deadline and not both(status):
            status = json.loads(net.hosts[0].run(P2PSHARE, "--dir", "p0", "status", "--json", cwd=tmp_path).stdout)
        assert status["tracker"]["connected"], f"p0 never connected to the tracker{logs(tmp_path)}"
        assert status["counters"].get("lan_announcements_received", 0) >= 1


@requires_netns
@pytest.mark.netns
def test_five_peers_on_an_ipv6_only_link_find_each_other_without_a_tracker(tmp_path: Path) -> None:
    """The same on a link with IPv6 only (a ULA prefix, no IPv4 address): the link-local group."""
    with TestNetwork(HOSTS, tmp_path / "net") as net:
        for k, host in enumerate(net.hosts):
            host.run("ip", "-6", "addr", "add", f"fd00:213::{10 + k}/64", "dev", "eth0", "nodad", check=True)
            host.run("ip", "addr", "del", f"{host.ip}/24", "dev", "eth0", check=True)
        hits = hits_within_5_seconds_of_starting(net, tmp_path, "lan6.txt", "found on an IPv6 link")
        assert hits == [f"fd00:213::{10 + HOSTS - 1}:{PORT}"], f"no hit within 5 s of starting{logs(tmp_path)}"
        got = net.hosts[0].run(P2PSHARE, "--dir", "p0", "get", "lan6.txt", cwd=tmp_path, timeout=60)
        assert got.returncode == 0 and (tmp_path / "p0" / "lan6.txt").read_text() == "found on an IPv6 link"
