"""The peer table on a real Redis and a real Redis Cluster, and trackers sharing it.

The servers are real ``redis-server`` processes (tests/redis_servers.py) on free ports in
temporary folders; without ``redis-server`` or the redis package these tests skip and say why.
The first tests drive ``RedisRegistry`` in the test's reactor; the last ones run the trackers as
users do, ``twistd -n p2ptracker --registry ...``, with ``twistd -n p2ppeer`` peers.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.internet.address import IPv4Address
from zope.interface.verify import verifyObject

from loopback import reactor
from p2pshare.registry import IPeerRegistry, RegistryUnavailable
from p2pshare.wire import PeerInfo, TrackerReply, TrackerRequest
from redis_servers import RedisCluster, RedisServer, client, free_port, keys_per_node, requires_redis
from test_system import TWISTD, Daemon, cli, poll

pytestmark = requires_redis



def info(n: int, host: str = "10.0.0.1") -> PeerInfo:
    return PeerInfo(os.urandom(16).hex() if n < 0 else f"{n:032x}", host, 4000 + n % 1000, 5000 + n % 1000)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield redis
    redis.stop()


def registry(url: str, prefix: str = "", **kw: Any) -> Any:
    from p2pshare.redis_registry import RedisRegistry

    return RedisRegistry.for_url(url, reactor(), prefix=prefix or f"t{os.urandom(4).hex()}", **kw)


async def sizes_known(reg: Any) -> None:
    """Until the registry has read the table again (its sample pool)."""
    await reg._refresh()


@pytest_twisted.ensureDeferred
async def test_the_table_on_redis_registers_beats_samples_removes_and_expires(server: RedisServer) -> None:
    reg = registry(server.url, timeout=30.0)
    try:
        assert verifyObject(IPeerRegistry, reg)
        now = reactor().seconds()
        assert await defer.gatherResults([reg.register(info(n), "10.0.0.1", now) for n in range(10)]) == [True] * 10
        assert await reg.heartbeat(info(3).peer, now) and not await reg.heartbeat(info(99).peer, now)
        assert await reg.remove(info(4).peer) and not await reg.remove(info(4).peer)
        await sizes_known(reg)
        assert reg.count() == 9
        picked = await reg.sample(20, info(0).peer, random.Random(1))
        assert {p.peer for p in picked} == {info(n).peer for n in range(10)} - {info(0).peer, info(4).peer}
        assert picked[0] == next(info(n) for n in range(10) if info(n).peer == picked[0].peer)
        # 31 s later every peer has expired: Redis dropped the records, the sweep empties the buckets
        gone = await reg.expire(now + 31)
        assert sorted(gone) == sorted(info(n).peer for n in range(10) if n != 4)
        await sizes_known(reg)
        assert await reg.sample(5, None, random.Random(2)) == [] and reg.count() == 0
        # nothing is left behind: no records, and the source's count went with its last peer
        store = client(server.url)
        leftovers = [k for k in store.scan_iter(match=reg.prefix + b":*") if store.type(k) != b"none"]
        store.close()
        assert leftovers == []
    finally:
        await reg.close()


@pytest_twisted.ensureDeferred
async def test_two_trackers_share_the_table_and_the_per_address_limit(server: RedisServer) -> None:
    prefix = f"t{os.urandom(4).hex()}"
    a, b = registry(server.url, prefix, max_per_source=3), registry(server.url, prefix, max_per_source=3)
    try:
        now = reactor().seconds()
        assert await a.register(info(1), "10.9.9.9", now) and await b.register(info(2), "10.9.9.9", now)
        assert await a.register(info(3), "10.9.9.9", now)
        assert not await b.register(info(4), "10.9.9.9", now)  # the fourth from one address, through B
        assert await b.register(info(1), "10.9.9.9", now)  # the same peer again takes no new place
        assert await b.register(info(1), "10.8.8.8", now)  # it moved: its place at the old address is free
        assert await a.register(info(4), "10.9.9.9", now)
        assert await b.heartbeat(info(2).peer, now)  # registered through A, heartbeating through B
        await sizes_known(b)
        seen = {p.peer for p in await b.sample(10, None, random.Random(3))}
        assert seen == {info(n).peer for n in (1, 2, 3, 4)}
    finally:
        await a.close()
        await b.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


@pytest.mark.parametrize("where", ["standalone", "cluster"])
@pytest_twisted.ensureDeferred
async def test_sampling_is_uniform_across_the_buckets(where: str, request: pytest.FixtureRequest) -> None:
    store = request.getfixturevalue("server" if where == "standalone" else "cluster")
    reg = registry(store.url)
    try:
        now = reactor().seconds()
        peers = [info(-1) for _ in range(200)]
        await defer.gatherResults([reg.register(p, f"10.1.{i % 200}.1", now) for i, p in enumerate(peers)])
        await sizes_known(reg)
        rng = random.Random(5)
        for _ in range(20):  # a whole table smaller than the pool: answers draw from all of it
            picked = await reg.sample(10, None, rng)
            assert len(picked) == 10 and len({p.peer for p in picked}) == 10
        assert {raw.hex() for raw, _ in reg.pool} == {p.peer for p in peers}
        # a pool of 50 of the 200: each refresh a uniform sample, whichever bucket a peer is in
        reg.pool_size = 50
        counts: Counter[str] = Counter()
        for _ in range(100):
            await reg._refresh()
            assert 25 <= len(reg.pool) <= 80  # about 50: each bucket rounds up or down at random
            counts.update(raw.hex() for raw, _ in reg.pool)
        expected = sum(counts.values()) / 200
        assert len(counts) == 200
        assert min(counts.values()) > 0.3 * expected and max(counts.values()) < 1.9 * expected, counts.most_common(3)
        buckets = {reg._bucket(bytes.fromhex(p.peer)) for p in peers}
        assert len(buckets) > 100  # 200 ids over 256 buckets: spread, not one key
        if where == "cluster":  # and over the masters' slots
            per_master = keys_per_node(store.masters(), f"{reg.prefix.decode()}:*")
            assert len(per_master) == 3 and min(per_master.values()) > 100, per_master
    finally:
        await reg.close()


@pytest_twisted.ensureDeferred
async def test_a_redis_that_does_not_answer_makes_the_tracker_answer_unavailable_at_once() -> None:
    from p2pshare.tracker import TrackerFactory, TrackerServerProtocol

    reg = registry(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    factory = TrackerFactory(reactor(), registry=reg)
    try:
        proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.5", 1))
        assert isinstance(proto, TrackerServerProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 1))
        proto.makeConnection(transport)
        started = time.monotonic()
        proto.dataReceived(TrackerRequest("register", 7, peer=info(1).peer, udp=1, tcp=1).encode() + b"\n")
        for _ in range(200):
            if transport.value():
                break
            await task.deferLater(reactor(), 0.02, lambda: None)
        reply = TrackerReply.decode(transport.value().strip())
        assert (reply.ok, reply.error, reply.id) == (False, "unavailable", 7)
        assert time.monotonic() - started < 3.0
        assert not transport.disconnecting  # the peer stays connected, and is registered again later
        assert factory.counters["tracker_unavailable"] >= 1
    finally:
        await reg.close()


@pytest_twisted.ensureDeferred
async def test_a_redis_that_stops_answering_costs_a_bounded_wait_and_bounded_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet.protocol import Factory, Protocol

    from p2pshare import redis_registry

    monkeypatch.setattr(redis_registry, "MAX_PENDING", 100)
    silent = reactor().listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # reads, never answers
    reg = registry(f"redis://127.0.0.1:{silent.getHost().port}/0")
    try:
        started = time.monotonic()
        waiting = [reg.heartbeat(info(n).peer, reactor().seconds()) for n in range(1000)]
        refused_at_once = sum(d.called for d in waiting)
        assert refused_at_once >= 1000 - 100  # at most MAX_PENDING wait for the silent Redis
        outcomes = await defer.DeferredList(waiting, consumeErrors=True)
        assert all(not ok and f.check(RegistryUnavailable) for ok, f in outcomes)
        # the batch in flight (the pool refresh) and the one after it: each two tries of 2 s at most
        assert time.monotonic() - started < 2 * 2 * redis_registry.SOCKET_TIMEOUT + 2
        with pytest.raises(RegistryUnavailable):
            await reg.sample(5, None, random.Random(1))  # no answers from a picture it could not refresh
    finally:
        await reg.close()
        await silent.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_redis_connection_that_keeps_breaking_fails_requests_not_the_tracker_and_heals(
        server: RedisServer) -> None:
    """A proxy in front of the real Redis that, while lossy, cuts every connection as soon as a
    command arrives: requests are answered unavailable within the bounded wait, the memory used by
    thousands of them stays flat, and once the proxy is healthy again everything works."""
    import gc
    import tracemalloc

    from twisted.protocols import portforward

    lossy = [True]

    class Cutting(portforward.ProxyServer):
        def dataReceived(self, data: bytes) -> None:
            if lossy[0]:
                self.transport.abortConnection()
            else:
                super().dataReceived(data)

    factory = portforward.ProxyFactory("127.0.0.1", server.port)
    factory.protocol = Cutting
    proxy = reactor().listenTCP(0, factory, interface="127.0.0.1")
    reg = registry(f"redis://127.0.0.1:{proxy.getHost().port}/0")
    try:
        now = reactor().seconds()
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            await reg.register(info(1), "10.0.0.1", now)
        assert time.monotonic() - started < 2 * 2.0 + 1
        tracemalloc.start()
        sizes = []
        for round_ in range(6):
            outcomes = await defer.DeferredList([reg.heartbeat(info(n).peer, now) for n in range(1000)],
                                                consumeErrors=True)
            assert not any(ok for ok, _ in outcomes)
            del outcomes
            gc.collect()  # failures and their tracebacks are cycles
            sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        assert sizes[-1] - sizes[1] < 256 * 1024, sizes  # 5,000 failed requests later: flat
        lossy[0] = False
        assert await reg.register(info(1), "10.0.0.1", reactor().seconds())
        assert await reg.heartbeat(info(1).peer, reactor().seconds())
    finally:
        await reg.close()
        await proxy.stopListening()


@pytest_twisted.ensureDeferred
async def test_work_waiting_for_redis_is_bounded(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pshare import redis_registry

    monkeypatch.setattr(redis_registry, "MAX_PENDING", 5)
    reg = registry(server.url)
    try:
        await sizes_known(reg)
        now = reactor().seconds()
        waiting = [reg.heartbeat(info(n).peer, now) for n in range(8)]  # none sent yet: one reactor turn
        refused = [d for d in waiting if d.called]
        assert len(refused) == 3
        for d in refused:
            with pytest.raises(RegistryUnavailable):
                await d
        assert await defer.gatherResults(waiting[:5]) == [False] * 5
    finally:
        await reg.close()


# -- trackers as users run them --------------------------------------------------------------------


def peers_of(tracker: str) -> set[str]:
    """The peer ids a tracker answers with (``p2pshare peers``); raises on an error answer."""
    done = cli("peers", "--tracker", tracker, "--max", "100", cwd=Path.cwd(), timeout=30)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())
    return {line.split("\t")[0] for line in done.stdout.splitlines() if line}


def wait(check: Any, what: str, deadline: float, procs: list[Daemon]) -> Any:
    """``poll`` (test_system) for a *check* that returns a truth value, or raises RuntimeError (a
    ``p2pshare peers`` refused) while the answer is not there yet."""
    def holds() -> Any:
        try:
            return check() or None
        except RuntimeError:
            return None

    return poll(holds, what, tuple(procs), deadline)


def peer_id(folder: Path) -> str:
    import json

    return str(json.loads((folder / ".p2pshare" / "peer.json").read_text())["peer"])


@pytest.fixture
def procs() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for p in reversed(started):
        p.stop()


INTERVAL = 1.0


def start_tracker(procs: list[Daemon], root: Path, registry_url: str, name: str, prefix: str) -> str:
    port = free_port()
    procs.append(Daemon.start(name, ["p2ptracker", "--port", f"tcp:{port}:interface=127.0.0.1", "--interval", str(INTERVAL),
                             "--registry", registry_url, "--registry-prefix", prefix], root))
    address = f"127.0.0.1:{port}"
    wait(lambda: peers_of(address) is not None, f"{name} answering", 20, procs)
    return address


def start_peer(procs: list[Daemon], root: Path, tracker: str, name: str, *more: str,
               files: dict[str, bytes] = {}) -> Path:  # noqa: B006 (never mutated)
    folder = root / name
    folder.mkdir()
    for file, data in files.items():
        (folder / file).write_bytes(data)
    control = ["--control", f"tcp:{free_port()}:interface=127.0.0.1"] if files or more else ["--control", "none"]
    trackers = [a for t in (tracker, *more) for a in ("--tracker", t)]
    procs.append(Daemon.start(name, ["p2ppeer", *trackers, "--dir", str(folder), "--port", "0", "--interface",
                                     "127.0.0.1", *control,
                             "--refresh", str(INTERVAL)], root))
    wait(lambda: (folder / ".p2pshare" / "peer.json").exists(), f"{name} started", 20, procs)
    return folder


@pytest.mark.system
def test_two_twistd_trackers_on_one_redis_answer_with_each_others_peers(tmp_path: Path, server: RedisServer,
                                                                         procs: list[Daemon]) -> None:
    prefix = f"t{os.urandom(4).hex()}"
    a = start_tracker(procs, tmp_path, server.url, "tracker-a", prefix)
    b = start_tracker(procs, tmp_path, f"unix://{server.unix}?db=0", "tracker-b", prefix)  # same Redis, by its socket
    one, two = start_peer(procs, tmp_path, a, "one"), start_peer(procs, tmp_path, b, "two")
    ids = {peer_id(one), peer_id(two)}
    wait(lambda: peers_of(b) == ids, "B answering with the peer registered through A", 10, procs)
    wait(lambda: peers_of(a) == ids, "A answering with the peer registered through B", 10, procs)


@pytest.mark.system
def test_redis_back_empty_after_an_outage_gets_every_live_peer_again(tmp_path: Path, procs: list[Daemon]) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        tracker = start_tracker(procs, tmp_path, redis.url, "tracker", "p2pshare")
        peers = [start_peer(procs, tmp_path, tracker, f"peer{i}", files={f"own-{i}.txt": b"%d\n" % i})
                 for i in range(3)]
        ids = {peer_id(p) for p in peers}
        wait(lambda: peers_of(tracker) == ids, "every peer registered", 10, procs)

        def search(name: str) -> subprocess.CompletedProcess[str]:
            return cli("--dir", str(peers[0]), "search", name, "--timeout", "1", cwd=tmp_path)

        wait(lambda: search("own-2.txt").returncode == 0, "a search across the network", 10, procs)
        redis.stop()

        def refused() -> bool:
            try:
                peers_of(tracker)
            except RuntimeError as e:
                assert "unavailable" in str(e)
                return True
            return False  # answered from the sample pool read before Redis stopped (at most a second old)

        wait(refused, "the tracker answering unavailable", 2 * INTERVAL + 2 * 2.0, procs)
        time.sleep(3 * INTERVAL)  # an outage longer than a peer's expiry
        assert all(p.proc.poll() is None for p in procs), "a daemon exited while Redis was down"
        during = search("own-2.txt")  # the peers go on with the neighbours they have
        assert during.returncode == 0 and "own-2.txt" in during.stdout, during.stdout + during.stderr
        redis = RedisServer(redis.folder, port=redis.port).start()  # back, and empty
        wait(lambda: peers_of(tracker) == ids, "every live peer in the table again", 2 * INTERVAL + 3, procs)
    finally:
        redis.stop()


@pytest.mark.system
def test_a_tracker_on_a_redis_cluster_spreads_its_keys_and_survives_a_master_failing(
        tmp_path: Path, procs: list[Daemon]) -> None:
    cluster = RedisCluster(tmp_path / "cluster").start()
    try:
        tracker = start_tracker(procs, tmp_path, cluster.url, "tracker", "p2pshare")
        peers = [start_peer(procs, tmp_path, tracker, f"peer{i}") for i in range(4)]  # 4 per host in an answer
        ids = {peer_id(p) for p in peers}
        wait(lambda: peers_of(tracker) == ids, "every peer registered", 15, procs)
        # Four peers make nine keys, which all miss one master now and then (3 x (2/3)^9, 8 %): twenty
        # more registrations, held on one connection for the check, spread some fifty.
        extra = socket.create_connection(("127.0.0.1", int(tracker.rsplit(":", 1)[1])), timeout=10)
        try:
            extra.sendall(b"".join(TrackerRequest("register", n + 1, peer=f"{n + 1:032x}", udp=4001 + n,
                                                  tcp=4001 + n).encode() + b"\n" for n in range(20)))
            lines = extra.makefile("rb")
            assert all(TrackerReply.decode(lines.readline().rstrip(b"\n")).ok for _ in range(20))
            per_master = keys_per_node(cluster.masters(), "p2pshare:*")
            assert len(per_master) == 3 and all(n > 0 for n in per_master.values()), per_master
        finally:
            extra.close()  # its peers leave with it
        wait(lambda: peers_of(tracker) == ids, "only the four peers again", 10, procs)
        victim = cluster.masters()[0]
        victim.stop()
        killed = time.monotonic()
        cluster.wait_ok()
        wait(lambda: peers_of(tracker) == ids, "every live peer answered after the failover", 1.0 + 2 * INTERVAL + 10,
             procs)
        assert len(cluster.masters()) == 3
        assert time.monotonic() - killed < 20
    finally:
        cluster.stop()


@pytest.mark.system
def test_a_bad_registry_option_stops_the_tracker_with_one_clear_line(tmp_path: Path) -> None:
    bad = subprocess.run([TWISTD, "-n", "--pidfile=", "p2ptracker", "--registry", "mongodb://x"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode != 0 and "--registry must be memory or a URL" in bad.stdout + bad.stderr
    cluster = subprocess.run([TWISTD, "-n", "--pidfile=", "p2ptracker", "--registry",
                              "redis+cluster://127.0.0.1"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert cluster.returncode != 0 and "a cluster URL lists HOST:PORT" in cluster.stdout + cluster.stderr
    shim = tmp_path / "shim"
    shim.mkdir()
    for package in ("redis", "hiredis"):
        (shim / f"{package}.py").write_text(f"raise ImportError('no {package} here')\n")
    missing = subprocess.run([TWISTD, "-n", "--pidfile=", "p2ptracker", "--registry",
                              "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(shim)})
    assert missing.returncode != 0
    assert "pip install 'p2pshare[redis]'" in missing.stdout + missing.stderr


@pytest.mark.system
def test_a_tracker_killed_its_peers_move_to_another_and_searches_and_fetches_go_on(
        tmp_path: Path, server: RedisServer, procs: list[Daemon]) -> None:
    prefix = f"t{os.urandom(4).hex()}"
    a = start_tracker(procs, tmp_path, server.url, "tracker-a", prefix)
    b = start_tracker(procs, tmp_path, server.url, "tracker-b", prefix)
    data = os.urandom(300_000)
    holder = start_peer(procs, tmp_path, a, "holder", b, files={"moving.bin": data})
    asker = start_peer(procs, tmp_path, a, "asker", b)
    ids = {peer_id(holder), peer_id(asker)}
    wait(lambda: peers_of(b) == ids, "both peers in the shared table", 10, procs)
    tracker_a = next(p for p in procs if p.name == "tracker-a")
    tracker_a.proc.kill()  # SIGKILL: no goodbye to anyone
    tracker_a.proc.wait()
    procs.remove(tracker_a)  # the waits below fail if a daemon exits: not this one
    killed = time.monotonic()
    for name in ("holder", "asker"):
        log = tmp_path / f"{name}.log"
        wait(lambda: f"using the tracker at {b}" in log.read_text(), f"{name} registered through B", 2 * INTERVAL + 1,
             procs)
    assert time.monotonic() - killed <= 2 * INTERVAL + 1
    time.sleep(4 * INTERVAL)  # longer than the expiry: only heartbeats through B keep them in the table
    assert peers_of(b) == ids

    found = cli("--dir", str(asker), "search", "moving.bin", "--timeout", "1", cwd=tmp_path)
    assert found.returncode == 0 and "moving.bin" in found.stdout, found.stdout + found.stderr
    got = cli("--dir", str(asker), "get", "moving.bin", cwd=tmp_path)
    assert got.returncode == 0, got.stdout + got.stderr
    assert (asker / "moving.bin").read_bytes() == data


@pytest.mark.system
def test_a_tracker_starts_while_its_redis_cluster_is_down_and_answers_unavailable(tmp_path: Path,
                                                                                   procs: list[Daemon]) -> None:
    nowhere = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    port = free_port()
    procs.append(Daemon.start("tracker", ["p2ptracker", "--port", f"tcp:{port}:interface=127.0.0.1", "--interval", "1",
                                  "--registry", nowhere], tmp_path))

    def refused() -> bool:
        try:
            peers_of(f"127.0.0.1:{port}")
        except RuntimeError as e:
            return "unavailable" in str(e)
        return False

    wait(refused, "the tracker answering unavailable", 20, procs)
    assert procs[0].proc.poll() is None
