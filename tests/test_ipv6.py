"""IPv6: address normalisation (pure), peers and a tracker on ::1 over loopback, a dual-stack peer
(``--interface ::``) between IPv4 and IPv6 peers; then namespace networks on IPv6 only (a ULA prefix)
and mixed (hosts with IPv4 only, IPv6 only, both), driven through the ``twistd`` plugins."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted

from p2pshare.tap import PeerOptions, control_endpoint_string, host_port
from p2pshare.wire import Hit, Query, decode_datagram, mapped, plain_host
from tests.loopback import Network, eventually
from tests.netns import TestNetwork, requires_netns
from tests.test_system import P2PSHARE, TWISTD

HAS_IPV6 = socket.has_ipv6 and Path("/proc/net/if_inet6").exists()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="this system has no IPv6")


# -- pure ---------------------------------------------------------------------------------------

def test_ipv4_mapped_addresses_are_named_as_ipv4_and_ipv6_compressed() -> None:
    assert plain_host("::ffff:10.0.0.1") == "10.0.0.1"
    assert plain_host("FD00:0:0:0:0:0:0:1") == "fd00::1"
    assert plain_host("10.0.0.1") == "10.0.0.1" and plain_host("not an address") == "not an address"
    assert mapped("10.0.0.1") == "::ffff:10.0.0.1" and mapped("fd00::1") == "fd00::1"


def test_every_address_field_carries_either_family() -> None:
    hit = Hit("a" * 32, "f.txt", 3, "b" * 64, ("fd00::7", 7000), "c" * 32)
    assert decode_datagram(hit.encode()).tcp == ("fd00::7", 7000)
    query = Query("a" * 32, "f.txt", ("fd00::1", 7000), ("fd00::1", 7000), 5)
    assert decode_datagram(query.encode()).udp == ("fd00::1", 7000)


def test_options_take_bracketed_ipv6_forms() -> None:
    assert host_port("[fd00::1]:8000", "--tracker") == ("fd00::1", 8000)
    assert control_endpoint_string("[::1]:7878") == "tcp6:7878:interface=\\:\\:1"
    options = PeerOptions()
    options.parseOptions(["--tracker", "[fd00::1]:8000", "--peer", "[fd00::2]:7000", "--dir", ".",
                          "--interface", "::", "--control", "[::1]:7879"])
    assert options["peers"] == [("fd00::2", 7000)] and options["control"] == "tcp6:7879:interface=\\:\\:1"


# -- loopback -------------------------------------------------------------------------------------

@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_a_tracker_and_peers_on_ipv6_loopback_search_and_fetch(net: Network) -> None:
    from p2pshare import start_tracker
    from tests.loopback import reactor

    net.tracker = await start_tracker(reactor(), "tcp6:0:interface=\\:\\:1", interval=1.0)
    address = f"[::1]:{net.tracker.port.getHost().port}"
    data = b"six " * 100_000
    holder = await net.add({"six.txt": data}, tracker=address, interface="::1")
    requester = await net.add(tracker=address, interface="::1")
    await eventually(lambda: requester.tracker.registered and holder.tracker.registered and requester.neighbours())
    assert requester.host_for_others == "::1" and requester.neighbours() == [("::1", holder.udp_port)]
    hits = await requester.search("six.txt", timeout=2.0)
    assert [h.tcp for h in hits] == [("::1", holder.tcp_port)]
    result = await requester.fetch("six.txt", timeout=10.0)
    assert (requester.shares.root / "six.txt").read_bytes() == data and result.holder == f"::1:{holder.tcp_port}"


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_a_dual_stack_peer_links_ipv4_and_ipv6_peers(net: Network) -> None:
    """An IPv4 peer and an IPv6 peer each know only a dual-stack peer (``--interface ::``), which knows
    both: searches cross it both ways, and the dual-stack peer fetches from each in its own family."""
    middle = await net.add({"middle.txt": b"m"}, interface="::", peers=(("127.0.0.1", 9),))
    v4 = await net.add({"four.txt": b"4" * 5000}, interface="127.0.0.1", peers=(("127.0.0.1", middle.udp_port),))
    v6 = await net.add({"six.txt": b"6" * 5000}, interface="::1", peers=(("::1", middle.udp_port),))
    await eventually(lambda: {("127.0.0.1", v4.udp_port), ("::1", v6.udp_port)} <= set(middle.neighbours()))
    assert all(":ffff:" not in h for h, _ in middle.neighbours())  # IPv4 peers named as IPv4
    assert [h.tcp for h in await v4.search("middle.txt", timeout=2.0)][0][1] == middle.tcp_port
    assert [h.tcp for h in await v6.search("middle.txt", timeout=2.0)][0][1] == middle.tcp_port
    assert (await middle.fetch("four.txt", timeout=10.0)).size == 5000
    assert (await middle.fetch("six.txt", timeout=10.0)).size == 5000
    assert middle.counters["send_errors"] == 0


# -- namespaces: IPv6 only, and mixed ---------------------------------------------------------------

PORT = 7000
ULA = "fd00:213::"


def v6(k: int) -> str:
    return f"{ULA}{10 + k}"


def configure(net: TestNetwork, families: list[set[int]]) -> None:
    """Give host k the families in families[k]: an IPv6 ULA address (no duplicate detection wait), and
    the harness's IPv4 address removed where IPv4 is not wanted."""
    for host, fam in zip(net.hosts, families):
        if 6 in fam:
            host.run("ip", "-6", "addr", "add", f"{v6(host.index)}/64", "dev", "eth0", "nodad", check=True)
        if 4 not in fam:
            host.run("ip", "addr", "del", f"{host.ip}/24", "dev", "eth0", check=True)


def start(net: TestNetwork, root: Path, k: int, *args: str) -> None:
    (root / f"p{k}").mkdir(exist_ok=True)
    log = (root / f"p{k}.log").open("ab")
    net.hosts[k].popen(TWISTD, "-n", "--pidfile=", "p2ppeer", "--dir", f"p{k}", "--port", str(PORT), "--control",
                       "tcp:0:interface=127.0.0.1", "--rescan", "3600", "--refresh", "1", "--no-lan", *args,
                       cwd=root, stdout=log, stderr=log)


def cli(net: TestNetwork, root: Path, k: int, *args: str, timeout: float = 60.0) -> Any:
    return net.hosts[k].run(P2PSHARE, "--dir", f"p{k}", *args, cwd=root, timeout=timeout)


def found(net: TestNetwork, root: Path, k: int, name: str, deadline: float = 20.0) -> Optional[list[str]]:
    end, hits = time.monotonic() + deadline, None
    while time.monotonic() < end and not hits:
        done = cli(net, root, k, "search", name, "--timeout", "1", "--json")
        hits = [h["tcp"] for h in json.loads(done.stdout)["hits"]] if done.returncode == 0 else None
    return hits


def logs(root: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(root.glob("*.log")))


@requires_netns
@pytest.mark.netns
def test_an_ipv6_only_network_with_a_tracker_searches_and_fetches(tmp_path: Path) -> None:
    with TestNetwork(4, tmp_path / "net") as net:
        configure(net, [{6}] * 4)
        tlog = (tmp_path / "tracker.log").open("ab")
        # The defaults, as on any host: a port number and no --interface take IPv6 (and IPv4) by themselves.
        net.hosts[0].popen(TWISTD, "-n", "--pidfile=", "p2ptracker", "--port", "8000", "--interval", "1",
                           cwd=tmp_path, stdout=tlog, stderr=tlog)
        (tmp_path / "p3").mkdir()
        (tmp_path / "p3" / "v6.txt").write_text("only over IPv6")
        for k in (1, 2, 3):
            start(net, tmp_path, k, "--tracker", f"[{v6(0)}]:8000")
        hits = found(net, tmp_path, 1, "v6.txt")
        assert hits == [f"{v6(3)}:{PORT}"], logs(tmp_path)
        got = cli(net, tmp_path, 1, "get", "v6.txt")
        assert got.returncode == 0, got.stderr + logs(tmp_path)
        assert (tmp_path / "p1" / "v6.txt").read_text() == "only over IPv6"
        peers = net.hosts[1].run(P2PSHARE, "peers", "--tracker", f"[{v6(0)}]:8000", cwd=tmp_path)
        assert peers.returncode == 0 and all(v6(k) in peers.stdout for k in (1, 2, 3)), peers.stdout


@requires_netns
@pytest.mark.netns
def test_a_mixed_network_finds_and_fetches_wherever_a_path_exists(tmp_path: Path) -> None:
    """Host 0: IPv4 only; host 1: IPv6 only; host 2: both (dual stack, the only peer either can reach).
    Each knows host 2.  Searches from 0 and 1 reach 2's file, and each fetches it; host 2 fetches from
    both.  A fetch between 0 and 1, which share no family, is not possible and fails cleanly."""
    with TestNetwork(3, tmp_path / "net") as net:
        configure(net, [{4}, {6}, {4, 6}])
        files = {0: ("four.txt", "ipv4 only"), 1: ("six.txt", "ipv6 only"), 2: ("both.txt", "dual stack")}
        for k, (name, text) in files.items():
            (tmp_path / f"p{k}").mkdir()
            (tmp_path / f"p{k}" / name).write_text(text)
        (tmp_path / "p1" / "kept.txt").write_text("never leaves host 1")  # host 2 never fetches this one
        start(net, tmp_path, 2, "--interface", "::", "--peer", f"{net.hosts[0].ip}:{PORT}", "--peer",
              f"[{v6(1)}]:{PORT}")
        start(net, tmp_path, 0, "--peer", f"{net.hosts[2].ip}:{PORT}")
        start(net, tmp_path, 1, "--interface", "::", "--peer", f"[{v6(2)}]:{PORT}")
        assert found(net, tmp_path, 0, "both.txt") == [f"{net.hosts[2].ip}:{PORT}"], logs(tmp_path)
        assert found(net, tmp_path, 1, "both.txt") == [f"{v6(2)}:{PORT}"], logs(tmp_path)
        for k in (0, 1):
            got = cli(net, tmp_path, k, "get", "both.txt")
            assert got.returncode == 0 and (tmp_path / f"p{k}" / "both.txt").read_text() == "dual stack", \
                got.stderr + logs(tmp_path)
        for name, text in (files[0], files[1]):
            got = cli(net, tmp_path, 2, "get", name)
            assert got.returncode == 0 and (tmp_path / "p2" / name).read_text() == text, got.stderr + logs(tmp_path)
        # 0 and 1 share no family: no transfer can pass between them, and the fetch ends with a clear error
        got = cli(net, tmp_path, 0, "get", "kept.txt", "--timeout", "3")
        assert got.returncode == 1 and "Traceback" not in got.stderr and not (tmp_path / "p0" / "kept.txt").exists()
        assert got.stderr.count("\n") == 1, got.stderr
