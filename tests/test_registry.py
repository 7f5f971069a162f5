"""The tracker's table: pure, driven by explicit times and a seeded random generator."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from zope.interface.verify import verifyObject

from p2pshare.registry import IPeerRegistry, MemoryRegistry, PeerTable, RegistryUnavailable
from p2pshare.wire import PeerInfo


def info(n: int) -> PeerInfo:
    return PeerInfo(f"{n:032x}", f"10.0.0.{n % 250}", 4000 + n, 4000 + n)


def filled(n: int, timeout: float = 30.0) -> PeerTable:
    reg = PeerTable(timeout=timeout, max_per_source=n)
    for i in range(n):
        reg.register(info(i), now=0.0)
    return reg


def test_memory_registry_provides_the_interface() -> None:
    assert verifyObject(IPeerRegistry, MemoryRegistry())


def test_sample_is_a_subset_of_at_most_k_distinct_peers() -> None:
    reg = filled(100)
    picked = reg.sample(20, None, random.Random(1))
    assert len(picked) == 20
    assert len({p.peer for p in picked}) == 20


def test_sample_never_returns_the_asker() -> None:
    reg = filled(5)
    asker = info(3).peer
    for seed in range(200):
        assert asker not in {p.peer for p in reg.sample(4, asker, random.Random(seed))}
    assert len(reg.sample(10, asker, random.Random(0))) == 4


def test_sample_is_roughly_uniform() -> None:
    reg = filled(10)
    rng = random.Random(7)
    counts = Counter(p.peer for _ in range(5000) for p in reg.sample(2, None, rng))
    assert len(counts) == 10
    assert max(counts.values()) < 1.25 * min(counts.values())


def test_sample_from_a_large_table_is_uniform_and_never_the_asker() -> None:
    """A table much larger than the answer is drawn from one slot at a time (not shuffled): each
    slot equally likely (Pearson's chi-square over the 199 others: 198 degrees of freedom, mean 198,
    standard deviation 20; the bound is five of them above), none twice in an answer, the asker never."""
    reg = filled(200)
    asker = info(17).peer
    rng = random.Random(11)
    counts: Counter[str] = Counter()
    rounds = 20_000
    for _ in range(rounds):
        picked = [p.peer for p in reg.sample(10, asker, rng)]
        assert len(picked) == len(set(picked)) == 10 and asker not in picked
        counts.update(picked)
    assert len(counts) == 199
    expected = rounds * 10 / 199
    assert sum((c - expected) ** 2 / expected for c in counts.values()) < 300


def test_one_host_holds_at_most_per_host_places_of_2k_drawn() -> None:
    """docs/protocol.md 2.2: of 2k peers drawn, kept in order, at most 4 with one host, until k.
    900 of 1,000 peers on one host: 40 draws bring about 4 others, so an answer of 20 has about 8
    (drawing on until 20 were kept would always give 20); all on one host: exactly 4."""
    reg = PeerTable(max_per_source=2000)
    for i in range(1000):
        reg.register(PeerInfo(f"{i:032x}", "10.9.9.9" if i < 900 else f"10.0.{i // 250}.{i % 250}", 4000, 4000), 0.0)
    rng = random.Random(5)
    sizes = []
    for _ in range(300):
        picked = reg.sample(20, None, rng, per_host=4)
        assert sum(p.host == "10.9.9.9" for p in picked) == 4
        assert len({p.peer for p in picked}) == len(picked)
        sizes.append(len(picked))
    assert 6 < sum(sizes) / len(sizes) < 11
    same = PeerTable(max_per_source=100)
    for i in range(100):
        same.register(PeerInfo(f"{i:032x}", "10.9.9.9", 4000, 4000), 0.0)
    assert len(same.sample(20, None, rng, per_host=4)) == 4
    assert len(same.sample(20, None, rng)) == 20


def test_remove_keeps_sampling_consistent() -> None:
    reg = filled(10)
    for i in (0, 9, 4):
        assert reg.remove(info(i).peer)
    assert not reg.remove(info(4).peer)
    assert len(reg) == 7
    remaining = {p.peer for p in reg.sample(100, None, random.Random(0))}
    assert remaining == {info(i).peer for i in range(10) if i not in (0, 9, 4)}


def test_reregistering_replaces_addresses() -> None:
    reg = filled(1)
    reg.register(PeerInfo(info(0).peer, "10.9.9.9", 1, 2), now=1.0)
    assert len(reg) == 1
    assert reg.get(info(0).peer) == PeerInfo(info(0).peer, "10.9.9.9", 1, 2)


def test_silent_peers_expire_and_heartbeats_keep_others() -> None:
    reg = filled(3, timeout=30.0)
    assert reg.heartbeat(info(1).peer, now=20.0)
    assert reg.expire(now=29.0) == []
    gone = reg.expire(now=31.0)
    assert sorted(gone) == [info(0).peer, info(2).peer]
    assert [p.peer for p in reg.sample(5, None, random.Random(0))] == [info(1).peer]


def test_heartbeat_of_an_unknown_peer_is_refused() -> None:
    assert not PeerTable().heartbeat(info(1).peer, now=0.0)


def test_empty_registry_samples_nothing() -> None:
    assert PeerTable().sample(5, None, random.Random(0)) == []
    assert filled(3).sample(0, None, random.Random(0)) == []


def test_one_source_may_hold_at_most_its_limit_and_a_peer_that_moves_frees_its_place() -> None:
    reg = PeerTable(max_per_source=2)
    assert reg.register(info(1), 0.0, "10.1.1.1") and reg.register(info(2), 0.0, "10.1.1.1")
    assert not reg.register(info(3), 0.0, "10.1.1.1")
    assert reg.register(info(1), 1.0, "10.1.1.1")  # the same peer again: not a new place
    assert reg.register(info(2), 1.0, "10.2.2.2")  # moved: its old source has a place again
    assert reg.register(info(3), 1.0, "10.1.1.1")
    assert reg.remove(info(1).peer) and reg.register(info(4), 2.0, "10.1.1.1")
    assert len(reg) == 3


def test_a_redis_record_packs_both_ports_the_host_and_a_different_source_and_reads_back() -> None:
    from p2pshare.redis_registry import _pack, _unpack

    for record in (("10.0.0.1", 1, 65535, "10.0.0.1"), ("fd00::1", 7000, 7001, "10.9.9.9"),
                   ("192.0.2.5", 4000, 4000, "2001:db8::7"), ("10.0.0.2", 5, 6, "fe80::1%eth0")):
        assert _unpack(_pack(*record)) == record
    assert len(_pack("10.0.0.1", 7000, 7000, "10.0.0.1")) == 9  # ports, length, 4 bytes: no source


# -- the Redis wire, without a Redis: RespConnection against an in-memory transport ----------------


def _resp_connection() -> tuple[Any, StringTransport, Clock]:
    pytest.importorskip("hiredis", reason="the redis extra (pip install 'p2pshare[redis]') is not installed")
    from p2pshare.redis_registry import RespConnection

    clock = Clock()
    conn = RespConnection(clock, timeout=2.0)
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, clock


def test_resp_batches_are_written_at_once_and_answered_in_order_whatever_the_read_sizes() -> None:
    conn, transport, _ = _resp_connection()
    first = conn.batch([("ZADD", b"p:i:1", "XX", "CH", 123, b"\x00\x01"), ("HGET", b"p:r:1", b"\x00\x01")])
    second = conn.batch([("ZCARD", b"p:i:1")])
    assert transport.value() == (b"*6\r\n$4\r\nZADD\r\n$5\r\np:i:1\r\n$2\r\nXX\r\n$2\r\nCH\r\n$3\r\n123\r\n$2\r\n\x00\x01\r\n"
                                 b"*3\r\n$4\r\nHGET\r\n$5\r\np:r:1\r\n$2\r\n\x00\x01\r\n"
                                 b"*2\r\n$5\r\nZCARD\r\n$5\r\np:i:1\r\n")
    got: list[Any] = []
    first.addCallback(got.append)
    second.addCallback(got.append)
    replies = b":1\r\n$3\r\nrec\r\n:7\r\n"
    for i in range(len(replies)):  # a byte at a time
        conn.dataReceived(replies[i: i + 1])
    assert got == [[1, b"rec"], [7]]


def test_a_resp_error_reply_is_handed_over_as_an_exception_for_the_operation_to_refuse() -> None:
    from p2pshare.redis_registry import _checked

    conn, _, _ = _resp_connection()
    got: list[Any] = []
    conn.batch([("ZADD",), ("PING",)]).addCallback(got.append)
    conn.dataReceived(b"-ERR wrong number of arguments for 'zadd' command\r\n+PONG\r\n")
    (replies,) = got
    assert isinstance(replies[0], Exception) and replies[1] == b"PONG"
    with pytest.raises(RegistryUnavailable, match="wrong number of arguments"):
        _checked(replies)


def test_a_resp_batch_not_answered_in_time_closes_the_connection_and_fails_every_waiting_batch() -> None:
    conn, transport, clock = _resp_connection()
    failures: list[Failure] = []
    for _ in range(3):
        conn.batch([("PING",)]).addErrback(failures.append)
    conn.dataReceived(b"+PONG\r\n")  # the first is answered, the others never are
    clock.advance(2.0)
    assert transport.disconnecting
    conn.connectionLost(Failure(ConnectionDone()))
    assert [f.check(RegistryUnavailable) for f in failures] == [RegistryUnavailable] * 2
    assert "no answer within 2s" in failures[0].getErrorMessage()
    assert not clock.getDelayedCalls()  # no timer left behind
    later: list[Failure] = []
    conn.batch([("PING",)]).addErrback(later.append)  # on a closed connection: at once
    assert later and later[0].check(RegistryUnavailable)


def test_a_resp_reply_nothing_asked_for_closes_the_connection() -> None:
    conn, transport, _ = _resp_connection()
    conn.dataReceived(b"+PONG\r\n")
    assert transport.disconnecting


def test_an_empty_resp_batch_is_answered_at_once_without_a_round_trip() -> None:
    conn, transport, clock = _resp_connection()
    got: list[Any] = []
    conn.batch([]).addCallback(got.append)
    assert got == [[]] and transport.value() == b"" and not clock.getDelayedCalls()


def test_a_redis_url_with_a_database_that_is_not_a_number_is_refused_before_anything_starts() -> None:
    from p2pshare.redis_registry import _database, check_url

    assert _database("redis://127.0.0.1:6379/3") == 3 and _database("unix:///run/redis.sock?db=2") == 2
    assert _database("redis://127.0.0.1:6379") == 0
    for url in ("redis://127.0.0.1:6379/x", "unix:///run/redis.sock?db=one"):
        with pytest.raises(ValueError, match="must be a number"):
            check_url(url)


def test_a_resp_connection_over_tcp_does_not_wait_for_acknowledgements() -> None:
    pytest.importorskip("hiredis", reason="the redis extra (pip install 'p2pshare[redis]') is not installed")
    from p2pshare.redis_registry import RespConnection

    class TCPLike(StringTransport):
        no_delay = False

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.no_delay = enabled

    transport = TCPLike()
    RespConnection(Clock(), timeout=2.0).makeConnection(transport)
    assert transport.no_delay  # Nagle would hold a batch until the previous one's ACK
    RespConnection(Clock(), timeout=2.0).makeConnection(StringTransport())  # a unix socket has no such option


class _HeldBatches:
    """Stands in for ``RespClient``: every batch waits until the test answers it."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[tuple[Any, ...]], Any]] = []

    def batch(self, commands: list[tuple[Any, ...]]) -> Any:
        from twisted.internet.defer import Deferred

        d: Any = Deferred()
        self.batches.append((commands, d))
        return d

    def close(self) -> None:
        pass


def test_requests_do_not_wait_behind_the_pool_refresh_and_a_refresh_makes_no_peer_infos() -> None:
    from p2pshare.redis_registry import RedisRegistry, _pack

    clock, held = Clock(), _HeldBatches()
    reg = RedisRegistry(lambda: None, clock, resp=held, buckets=2)  # type: ignore[arg-type]
    (refresh, answer), = held.batches  # the refresh started at once: two ZCARDs
    assert [c[0] for c in refresh] == ["ZCARD", "ZCARD"]
    beat = reg.heartbeat(info(1).peer, 100.0)
    clock.advance(0)
    (zadd, answer_beat) = held.batches[1]  # a batch of its own, while the refresh waits for Redis
    assert [c[0] for c in zadd] == ["ZADD"]
    answer_beat.callback([1])
    assert beat.result is True
    answer.callback([1, 0])  # one member in bucket 0
    commands, answer = held.batches[2]
    assert [c[0] for c in commands] == ["ZRANDMEMBER"]
    raw = bytes.fromhex(info(1).peer)
    answer.callback([[raw, b"9999999999999"]])
    commands, answer = held.batches[3]
    answer.callback([[_pack("10.0.0.1", 4001, 5001, "10.0.0.1")]])
    assert reg.pool == [(raw, _pack("10.0.0.1", 4001, 5001, "10.0.0.1"))]
    assert reg._infos == {}  # no PeerInfo made until an answer picks the member
    picked: list[Any] = []
    reg.sample(5, None, random.Random(1)).addCallback(picked.extend)
    assert [(p.peer, p.host, p.udp, p.tcp) for p in picked] == [(info(1).peer, "10.0.0.1", 4001, 5001)]
    reg.close()


def test_peer_infos_are_kept_only_for_the_members_of_the_current_pool() -> None:
    """Each refresh draws a new sample; the PeerInfos made for members no longer in it are let go (a
    tracker answering thousands of requests a second made one for every member of every pool, and kept
    up to four pools' worth: megabytes).  A member still in the pool keeps the one already made."""
    from p2pshare.redis_registry import RedisRegistry, _pack

    clock, held = Clock(), _HeldBatches()
    reg = RedisRegistry(lambda: None, clock, resp=held, buckets=1, refresh=1.0)  # type: ignore[arg-type]
    record = _pack("10.0.0.1", 4001, 5001, "10.0.0.1")

    def refresh_with(members: list[int]) -> None:
        """Answer the refresh under way with *members* (peer numbers) as the new pool."""
        commands, answer = held.batches.pop()
        assert [c[0] for c in commands] == ["ZCARD"]
        answer.callback([len(members)])
        _, answer = held.batches.pop()
        answer.callback([[x for m in members for x in (bytes.fromhex(info(m).peer), b"9999999999999")]])
        _, answer = held.batches.pop()
        answer.callback([[record] * len(members)])
        assert [raw for raw, _ in reg.pool] == [bytes.fromhex(info(m).peer) for m in members]

    kept = None
    for round_ in range(5):
        members = list(range(10 * round_, 10 * round_ + 10)) + [1000]  # ten new ones, and one that stays
        refresh_with(members)
        for _ in range(20):  # answers pick every member of the pool
            reg.sample(5, None, random.Random(round_))
        assert set(reg._infos) <= set(reg.pool)
        stays = reg._infos[(bytes.fromhex(info(1000).peer), record)]
        assert kept is None or stays is kept  # made once while it stays in the pool
        kept = stays
        clock.advance(1.0)  # the next refresh
    reg.close()
