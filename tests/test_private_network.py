"""Private networks over loopback: members work together, outsiders get nothing and are counted.

A keyed tracker and keyed peers in one reactor; peers with another key or none
try to join, search and fetch.  The last tests run the ``twistd`` plugins and the
``p2pshare`` command as subprocesses, as tests/test_system.py does.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs

from loopback import Network, eventually, reactor
from p2pshare import NotFound, Peer
from p2pshare.cli import main as cli_main
from p2pshare.netkey import NetworkKey, NetworkTLS, load_key, write_key
from p2pshare.wire import TrackerReply, TrackerRequest
from test_system import P2PSHARE, TWISTD, Daemon, peer_status, poll

KEY = NetworkKey.generate()
OTHER = NetworkKey.generate()


@pytest_twisted.async_yield_fixture
async def net(tmp_path: Path) -> AsyncIterator[Network]:
    network = Network(tmp_path)
    yield network
    await network.stop()


class _OneRequest(Protocol):
    """Sends one tracker request and collects what comes back until the connection ends."""

    def __init__(self, line: bytes) -> None:
        self.line, self.received, self.done = line, b"", defer.Deferred()
        self.tls_version: Optional[str] = None

    def connectionMade(self) -> None:
        self.transport.write(self.line)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        handle = getattr(self.transport, "getHandle", lambda: None)()
        self.tls_version = handle.get_protocol_version_name() if handle is not None else None
        if self.received.endswith(b"\n"):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


async def ask_tracker(address: str, key: Optional[NetworkKey], report: Callable[[str, str], None]) -> _OneRequest:
    host, port = address.split(":")
    endpoint: Any = TCP4ClientEndpoint(reactor(), host, int(port))
    if key is not None:
        endpoint = NetworkTLS.for_key(key).client(endpoint, report, reactor())
    proto = _OneRequest(TrackerRequest("peers", 1, max=10).encode() + b"\n")
    try:
        await endpoint.connect(Factory.forProtocol(lambda: proto))
    except Exception:
        proto.done.callback(b"")
    await proto.done
    return proto


# -- members -----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_members_register_search_and_fetch_both_ways_over_tls(net: Network) -> None:
    await net.start_tracker(KEY)
    data = os.urandom(300_000)
    holder = await net.add({"secret.bin": data, "other.bin": b"more"}, tracker=net.address, key=KEY)
    asker = await net.add(tracker=net.address, key=KEY)
    await eventually(lambda: len(net.tracker.factory.registry) == 2 and asker.neighbours())
    [hit] = await asker.search("secret.bin", timeout=1.0)
    assert (hit.size, hit.peer) == (len(data), holder.peer_id)
    result = await asker.fetch("secret.bin", timeout=5.0)  # the holder dials the asker (TLS client: holder)
    assert result.dialled_by == "holder" and (asker.shares.root / "secret.bin").read_bytes() == data
    await asker._ports[0].stopListening()  # now offers cannot reach the asker: it dials (TLS client: asker)
    result = await asker.fetch("other.bin", timeout=5.0)
    assert result.dialled_by == "requester" and (asker.shares.root / "other.bin").read_bytes() == b"more"
    refusals = ("outsider_datagrams", "outsider_connections", "tls_dial_failures", "dropped_replayed",
                "dropped_stale", "dropped_malformed")
    for peer in (holder, asker):
        assert [peer.counters[name] for name in refusals] == [0] * len(refusals)
    assert net.tracker.factory.counters["tracker_outsider_connections"] == 0


@pytest_twisted.ensureDeferred
async def test_a_member_talks_tls_1_3_to_the_tracker(net: Network) -> None:
    address = await net.start_tracker(KEY)
    proto = await ask_tracker(address, KEY, lambda host, why: pytest.fail(why))
    assert TrackerReply.decode(proto.received.strip()).ok
    assert proto.tls_version == "TLSv1.3"


# -- outsiders ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_outsiders_cannot_register_search_or_fetch_and_are_counted(net: Network) -> None:
    await net.start_tracker(KEY)
    holder = await net.add({"secret.txt": b"members only\n"}, tracker=net.address, key=KEY)
    await eventually(lambda: len(net.tracker.factory.registry) == 1)
    static = (("127.0.0.1", holder.udp_port),)  # outsiders know the holder's address anyway
    with capturedLogs() as events:
        outsiders = [await net.add(tracker=net.address, key=OTHER, peers=static),
                     await net.add(tracker=net.address, key=None, peers=static)]
        await eventually(lambda: net.tracker.factory.counters["tracker_outsider_connections"] >= 2)
        assert len(net.tracker.factory.registry) == 1  # neither registered
        assert not any(o.tracker.registered for o in outsiders)
        for outsider in outsiders:
            assert await outsider.search("secret.txt", timeout=0.5) == []
            with pytest.raises(NotFound):
                await outsider.fetch("secret.txt", timeout=0.5)
        # Straight to the holder's TCP port: an `open` for the file, with the wrong key and with none.
        for outsider in outsiders:
            await ask_holder_directly(outsider, holder)
        await eventually(lambda: holder.counters["outsider_connections"] == 2)
        await eventually(lambda: holder.counters["outsider_datagrams"] >= 4)
    assert holder.counters["queries_received"] == 0
    assert holder.counters["uploads_opened"] == holder.counters["offers_dialled"] == 0
    assert not (outsiders[0].shares.root / "secret.txt").exists()
    assert not (outsiders[1].shares.root / "secret.txt").exists()
    for outsider in outsiders:
        assert outsider.counters["hits_received"] == 0
    assert outsiders[0].counters["tls_dial_failures"] == 1  # the other key's side refused the holder too
    # Logged, but at most once a minute per source and kind however many attempts.
    text = [e["log_format"] for e in events if e["log_level"] == LogLevel.warn]
    assert sum("not from this private network" in t for t in text) == 1  # all from 127.0.0.1
    assert sum("refused a transfer connection" in t for t in text) == 1
    assert sum("refused a tracker connection" in t for t in text) == 1


async def ask_holder_directly(outsider: Peer, holder: Peer) -> None:
    received: list[bytes] = []
    done: defer.Deferred[None] = defer.Deferred()

    class Opener(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b'{"v":1,"t":"open","name":"secret.txt"}\n')

        def dataReceived(self, data: bytes) -> None:
            received.append(data)

        def connectionLost(self, reason: Any = None) -> None:
            done.callback(None)

    try:
        await outsider.endpoint_to(("127.0.0.1", holder.tcp_port)).connect(Factory.forProtocol(Opener))
    except Exception:
        return
    await done
    assert b"members only" not in b"".join(received)


@pytest_twisted.ensureDeferred
async def test_a_keyed_peer_refuses_an_unkeyed_tracker_and_says_why(net: Network) -> None:
    await net.start_tracker(None, interval=0.2)  # closes silent connections after 0.6 s
    with capturedLogs() as events:
        peer = await net.add(tracker=net.address, key=KEY)

        def refused() -> bool:
            return any("is not part of this private network" in e.get("log_format", "") for e in events)

        await eventually(refused)
    assert len(net.tracker.factory.registry) == 0 and not peer.tracker.registered
    [event] = [e for e in events if "is not part of this private network" in e.get("log_format", "")]
    assert event["host"] == "127.0.0.1" and event["log_level"] == LogLevel.warn


@pytest_twisted.ensureDeferred
async def test_a_keyed_tracker_gives_nothing_to_a_client_without_the_key(net: Network) -> None:
    address = await net.start_tracker(KEY)
    await net.add(tracker=net.address, key=KEY)
    await eventually(lambda: len(net.tracker.factory.registry) == 1)
    reports: list[str] = []
    plain = await ask_tracker(address, None, lambda host, why: None)
    other = await ask_tracker(address, OTHER, lambda host, why: reports.append(why))
    assert b"peer" not in plain.received and other.received == b""
    assert reports and "certificate verify failed" in reports[0]
    await eventually(lambda: net.tracker.factory.counters["tracker_outsider_connections"] == 2)


# -- the TLS client endpoint -------------------------------------------------------------------------


class Silent(Protocol):
    """Accepts and never says a word (nor hangs up); ``lost`` fires when the other side has gone."""

    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def dial_silent_server(timeout: float, factory: Factory) -> tuple[defer.Deferred[Any], list[tuple[str, str]],
                                                                        list[Silent], Any]:
    accepted: list[Silent] = []
    port = await serverFromString(reactor(), "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(lambda: accepted.append(Silent()) or accepted[-1]))
    reports: list[tuple[str, str]] = []
    endpoint = NetworkTLS.for_key(KEY).client(TCP4ClientEndpoint(reactor(), "127.0.0.1", port.getHost().port),
                                              lambda host, why: reports.append((host, why)), reactor(), timeout)
    return endpoint.connect(factory), reports, accepted, port


@pytest_twisted.ensureDeferred
async def test_a_dial_that_gets_no_handshake_fails_after_the_timeout_and_says_why() -> None:
    attempt, reports, accepted, port = await dial_silent_server(0.2, Factory.forProtocol(Protocol))
    try:
        with pytest.raises(TimeoutError):
            await attempt
        assert reports == [("127.0.0.1", "no TLS handshake within 0.2s")]
        await accepted[0].lost  # the attempt ended by closing its socket
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_dial_waiting_for_its_handshake_can_be_cancelled() -> None:
    built: list[Protocol] = []
    attempt, reports, accepted, port = await dial_silent_server(
        10.0, Factory.forProtocol(lambda: built.append(Protocol()) or built[-1]))
    try:
        await eventually(lambda: accepted)  # connected, waiting for a ServerHello that never comes
        attempt.cancel()
        with pytest.raises(defer.CancelledError):
            await attempt
        await accepted[0].lost
        assert built == [] and reports == []  # the application's protocol is built only for a member
    finally:
        await port.stopListening()


# -- the commands ------------------------------------------------------------------------------------

def run(*args: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PSHARE, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.mark.system
def test_keygen_to_stdout_makes_the_file_0600(tmp_path: Path) -> None:
    with (tmp_path / "piped.key").open("w") as out:  # like `p2pshare keygen > piped.key`
        assert subprocess.run([P2PSHARE, "keygen"], stdout=out, timeout=60).returncode == 0
    assert stat.S_IMODE((tmp_path / "piped.key").stat().st_mode) == 0o600
    assert load_key(tmp_path / "piped.key")


def test_keygen_out_creates_a_new_0600_file_and_never_overwrites(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keygen", "--out", str(tmp_path / "new.key")]) == 0
    assert stat.S_IMODE((tmp_path / "new.key").stat().st_mode) == 0o600
    first = load_key(tmp_path / "new.key")
    capsys.readouterr()
    assert cli_main(["keygen", "--out", str(tmp_path / "new.key")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "File exists" in err
    assert load_key(tmp_path / "new.key") == first
    assert cli_main(["keygen"]) == 0  # on stdout when it is not a file
    assert NetworkKey.decode(capsys.readouterr().out) != first


@pytest.mark.system
@pytest.mark.parametrize("plugin", ["p2ptracker", "p2ppeer"])
def test_a_key_file_others_can_read_is_a_one_line_usage_error(tmp_path: Path, plugin: str) -> None:
    (tmp_path / "net.key").write_text(KEY.encode())
    (tmp_path / "net.key").chmod(0o644)
    args = ["p2ptracker", "--port", "0"] if plugin == "p2ptracker" else \
        ["p2ppeer", "--tracker", "127.0.0.1:9", "--dir", "."]
    result = subprocess.run([TWISTD, "-n", "--pidfile=", *args, "--key", "net.key"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert re.search(r"--key: net\.key: .*mode 0644.*chmod 600", output.strip().splitlines()[-1])


@pytest.mark.system
def test_twistd_tracker_and_peers_with_a_key_share_files_and_refuse_an_outsider(tmp_path: Path) -> None:
    write_key(tmp_path / "net.key", KEY)  # `p2pshare keygen` has its own tests
    for name, files in {"alice": {}, "bob": {"bob.txt": b"for members\n"}}.items():
        (tmp_path / name).mkdir()
        for file, data in files.items():
            (tmp_path / name / file).write_bytes(data)
    daemons = [Daemon.start("tracker", ["p2ptracker", "--port", "tcp:0:interface=127.0.0.1", "--key", "net.key"],
                            tmp_path)]
    try:
        def tracker_port() -> Optional[str]:
            found = re.search(r"tracker listening on IPv4Address\(.*port=(\d+)\)", daemons[0].output())
            return f"127.0.0.1:{found[1]}" if found else None

        address = poll(tracker_port, "the tracker listening", tuple(daemons))
        for name in ("alice", "bob"):
            daemons.append(Daemon.start(name, ["p2ppeer", "--tracker", address, "--dir", name, "--key", "net.key",
                                               "--interface", "127.0.0.1", "--control", "tcp:0:interface=127.0.0.1",
                                               "--refresh", "0.5"], tmp_path))
        (tmp_path / "eve").mkdir()  # a peer without the key, at the same time
        eve = Daemon.start("eve", ["p2ppeer", "--tracker", address, "--dir", "eve", "--interface", "127.0.0.1",
                                   "--control", "none"], tmp_path)
        daemons.append(eve)

        def alice_ready() -> Optional[dict]:  # her neighbour can only be bob, through the tracker
            status = peer_status(tmp_path, tmp_path / "alice")
            return status if status and status["tracker"]["connected"] and status["neighbours"] else None

        poll(alice_ready, "alice registered with a neighbour", tuple(daemons))
        got = run("--dir", "alice", "get", "bob.txt", "--timeout", "10", cwd=tmp_path)
        assert got.returncode == 0, got.stderr + "".join(d.output()[-1500:] for d in daemons)
        assert (tmp_path / "alice" / "bob.txt").read_bytes() == b"for members\n"
        # The tracker refused eve, and says so in its log; the members' logs have no tracebacks.
        poll(lambda: True if "refused a tracker connection from 127.0.0.1" in daemons[0].output() else None,
             "the tracker refusing eve", tuple(daemons))
        assert not [d.name for d in daemons[:3] if "Traceback" in d.output()]
    finally:
        for daemon in daemons:
            daemon.stop()


@pytest_twisted.ensureDeferred
async def test_a_large_file_comes_over_tls_from_several_sources_with_backpressure(
        net: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 MiB over TLS from two holders, into a requester whose disk is slower than the network:
    the download pauses its sources (backpressure through the TLS transports) and resumes them,
    and the file arrives whole and verified."""
    import hashlib

    from twisted.internet import task

    import p2pshare.fetch
    from p2pshare.store import in_thread

    def slow_disk(reactor_: Any = None) -> Callable[..., Any]:
        threads = in_thread(reactor_)

        def run(f: Callable[..., Any], *args: Any) -> Any:  # every worker job waits 20 ms first
            return task.deferLater(reactor(), 0.02, lambda: None).addCallback(lambda _: threads(f, *args))

        return run

    monkeypatch.setattr(p2pshare.fetch, "in_thread", slow_disk)
    await net.start_tracker(KEY)
    data = os.urandom(64 * 1024 * 1024)
    holders = [await net.add({"big.bin": data}, tracker=net.address, key=KEY) for _ in range(2)]
    asker = await net.add(tracker=net.address, key=KEY, requery=0.2)
    await eventually(lambda: len(net.tracker.factory.registry) == 3 and len(asker.neighbours()) == 2)
    result = await asker.fetch(sha256=hashlib.sha256(data).hexdigest(), timeout=60.0)
    assert (asker.shares.root / "big.bin").read_bytes() == data
    assert result.sources == 2
    assert asker.counters["download_pauses"] >= 1
    assert all(h.counters["bytes_sent"] > 0 for h in holders)
