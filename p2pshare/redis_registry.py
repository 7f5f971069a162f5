"""The peer table on Redis (or a Redis Cluster), shared by any number of trackers.

Needs the ``redis`` package with hiredis (``pip install 'p2pshare[redis]'``); nothing else in
p2pshare imports this module.  Each operation is a generator of command lists, and every
operation that arrives while a batch is in flight joins the next one, which sends the first
commands of all its operations in one pipeline, then their second ones in another.  A
standalone Redis (``redis://``, ``unix://``) is spoken to from the reactor thread, over one
Twisted connection (``RespConnection``: hiredis packs the commands and parses the replies); a
Redis Cluster, and TLS (``rediss://``), through redis-py's synchronous client (``RedisCluster``,
``Redis``) in one worker thread of its own.  Either way the reactor never waits on Redis
(docs/architecture.md says why, and how it was measured).

The keys, under a prefix (``--registry-prefix``, so that several networks share one Redis),
each of them one of ``BUCKETS`` (the id's first bytes pick a peer's bucket, a hash of the address
its count's), so that they spread across a cluster's slots (no hash tag):

``PREFIX:i:<n>``    a sorted set: the peers' ids (16 raw bytes), scored by their expiry time in ms.
                    A heartbeat is one ``ZADD XX``.  Sampling reads the sizes, then members of each
                    bucket in proportion (``ZRANDMEMBER``), so it stays uniform across them.
``PREFIX:r:<n>``    a hash: id -> the record: both ports, the host, the source address (``_pack``).
``PREFIX:c:<n>``    a hash: source address -> how many peers it registered, so that the
                    per-address limit holds across trackers.

About 230 to 280 bytes of Redis memory per peer (100,000 to 1,000,000 peers); a key per peer
cost some 250 more.

Expiry works whichever tracker the heartbeats reach: every tracker sweeps the buckets of entries
past their score once per interval, and the one whose ``ZREM`` takes an entry deletes its record
and gives its source the place back.
"""

from __future__ import annotations

import ipaddress
import os
import random
import urllib.parse
import zlib
from collections import deque
from typing import Any, Callable, Generator, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from p2pshare.registry import IPeerRegistry, RegistryUnavailable, draw
from p2pshare.wire import PeerInfo

BUCKETS = 256
MAX_PENDING = 20_000  # operations waiting for Redis; beyond, answered "unavailable" at once
SOCKET_TIMEOUT = 2.0  # seconds a Redis command may take before the batch fails
POOL = 4096  # members read for the sample pool each refresh (all of them in a smaller table)
POOL_EVERY = 1.0  # seconds between refreshes of the pool
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")

Op = Generator[list[tuple[Any, ...]], list[Any], Any]


def redis_client(url: str) -> Any:
    """A redis-py client for *url*: ``redis://``, ``rediss://``, ``unix://`` or
    ``redis+cluster://HOST:PORT,HOST:PORT,...`` (``rediss+cluster://`` with TLS)."""
    try:
        import redis
        from redis.cluster import ClusterNode, RedisCluster
    except ImportError:
        raise RegistryUnavailable("a Redis registry needs the redis package: pip install 'p2pshare[redis]'") from None
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # A command waits at most SOCKET_TIMEOUT and is tried again once (a pooled connection that went
    # stale when Redis restarted); redis-py's default of 10 retries would hold a batch for 20 s.
    options: dict[str, Any] = dict(socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
                                   retry=Retry(NoBackoff(), 1))
    scheme = check_url(url)
    if scheme.endswith("+cluster"):
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            options["password"] = urllib.parse.unquote(parts.password)
        nodes = [ClusterNode(host, port) for host, port in _cluster_nodes(url)]
        return RedisCluster(startup_nodes=nodes, ssl=scheme.startswith("rediss"), **options)
    return redis.Redis.from_url(url, **options)


def native_url(url: str) -> bool:
    """Is *url* one this module speaks to without redis-py (a standalone Redis, no TLS)?"""
    return url.split("://", 1)[0] in ("redis", "unix")


class RespConnection(Protocol):
    """One connection to a standalone Redis: batches of commands written at once, their replies
    parsed by hiredis in order.  A batch that is not answered within *timeout* seconds closes the
    connection, which fails every batch waiting on it."""

    def __init__(self, reactor: IReactorTime, timeout: float) -> None:
        import hiredis

        self._pack = hiredis.pack_command
        self._reader = hiredis.Reader()
        self._reactor, self._timeout = reactor, timeout
        self._waiting: deque[tuple[Deferred[list[Any]], int, list[Any], Any]] = deque()
        self._error: Optional[str] = None  # why we closed the connection, when we did
        self.lost = False

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:  # (TCP, not a unix socket) a batch must not wait for the last one's ACK
            set_no_delay(True)

    def batch(self, commands: list[tuple[Any, ...]]) -> Deferred[list[Any]]:
        if self.lost:
            return fail(RegistryUnavailable("Redis: the connection is closed"))
        if not commands:  # (an operation with nothing to ask this round: a sample of an empty table)
            return succeed([])
        d: Deferred[list[Any]] = Deferred()
        timer = self._reactor.callLater(self._timeout, self._too_slow)  # type: ignore[attr-defined]
        self._waiting.append((d, len(commands), [], timer))
        self.transport.write(b"".join(self._pack(c) for c in commands))
        return d

    def _too_slow(self) -> None:
        self._error = f"no answer within {self._timeout:g}s"
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:
                self._error = "a reply nothing was asked for"
                return self.transport.abortConnection()
            d, count, replies, timer = self._waiting[0]
            replies.append(reply)
            if len(replies) == count:
                self._waiting.popleft()
                timer.cancel()
                d.callback(replies)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        why = self._error or (reason.getErrorMessage() if reason is not None else "closed")
        waiting, self._waiting = self._waiting, deque()
        for d, _, _, timer in waiting:
            if timer.active():
                timer.cancel()
            d.errback(RegistryUnavailable(f"Redis: {why}"))


class RespClient:
    """Batches for a standalone Redis at *url* over one ``RespConnection``, made when first needed
    and again after it was lost (``AUTH`` and ``SELECT`` as the URL says)."""

    def __init__(self, url: str, reactor: IReactorTime, timeout: float = SOCKET_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        self.reactor, self.timeout = reactor, timeout
        if parts.scheme == "unix":
            self.endpoint: Any = UNIXClientEndpoint(reactor, parts.path, timeout=timeout)
        else:
            self.endpoint = HostnameEndpoint(reactor, parts.hostname or "127.0.0.1", parts.port or 6379,
                                             timeout=timeout)
        self.setup: list[tuple[Any, ...]] = []
        if parts.password is not None:
            password = urllib.parse.unquote(parts.password)
            user = urllib.parse.unquote(parts.username or "")
            self.setup.append(("AUTH", user, password) if user else ("AUTH", password))
        db = _database(url)
        if db:
            self.setup.append(("SELECT", db))
        self._conn: Optional[RespConnection] = None
        self._waiters: list[Deferred[RespConnection]] = []  # batches waiting for a connection

    def batch(self, commands: list[tuple[Any, ...]]) -> Deferred[list[Any]]:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn.batch(commands)
        return self._connect().addCallback(lambda c: c.batch(commands))

    def _connect(self) -> Deferred[RespConnection]:
        d: Deferred[RespConnection] = Deferred()
        self._waiters.append(d)
        if len(self._waiters) > 1:  # already connecting
            return d

        def connected(conn: RespConnection) -> Any:
            if not self.setup:
                return conn
            return conn.batch(self.setup).addCallback(lambda replies: (_checked(replies), conn)[1])

        def ready(conn: RespConnection) -> None:
            self._conn = conn
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(conn)

        def failed(f: Failure) -> None:
            error = _as_unavailable(f)
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(error)

        attempt = self.endpoint.connect(Factory.forProtocol(lambda: RespConnection(self.reactor, self.timeout)))
        attempt.addCallback(connected).addCallbacks(ready, failed)
        return d

    def close(self) -> None:
        if self._conn is not None and not self._conn.lost:
            self._conn.transport.loseConnection()


def check_url(url: str) -> str:
    """The scheme of a registry URL; ValueError, saying why, for one that cannot work."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(f"must be memory or a URL starting {', '.join(s + '://' for s in SCHEMES)}; got {url!r}")
    if scheme.endswith("+cluster"):
        _cluster_nodes(url)
    elif native_url(url):
        _database(url)
    return scheme


def _database(url: str) -> int:
    """The database number of a standalone Redis URL (``redis://HOST:PORT/N``, ``unix:///PATH?db=N``)."""
    parts = urllib.parse.urlsplit(url)
    db = "" if parts.scheme == "unix" else parts.path.strip("/")
    db = db or urllib.parse.parse_qs(parts.query).get("db", ["0"])[0]
    if not db.isdigit():
        raise ValueError(f"the database in {url!r} must be a number")
    return int(db)


def _cluster_nodes(url: str) -> list[tuple[str, int]]:
    nodes = []
    for hostport in urllib.parse.urlsplit(url).netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a cluster URL lists HOST:PORT,HOST:PORT,...; got {url!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


@implementer(IPeerRegistry)
class RedisRegistry:
    """The table in Redis, through a redis-py ``Redis`` or ``RedisCluster``.

    ``peers`` answers come from a pool: every *refresh* seconds (at most a second, at most half a
    heartbeat interval) the registry reads the bucket sizes and a uniform sample of ``POOL``
    members (the whole table when it is smaller), and answers draw from it at once, without a
    round trip: a peer registered through any tracker is in every tracker's answers within one
    refresh.
    """

    log = Logger()
    local = False  # nothing of the table is kept here

    def __init__(self, connect: Callable[[], Any], reactor: IReactorTime, timeout: float = 30.0,
                 max_per_source: int = 32, prefix: str = "p2pshare", buckets: int = BUCKETS,
                 refresh: float = POOL_EVERY, pool: int = POOL, resp: Optional[RespClient] = None) -> None:
        """*connect* makes a redis-py client (``lambda: redis_client(url)``), in the worker thread when it
        is first needed and again after it failed: a cluster client connects as it is made, and a
        tracker must start, answering ``unavailable``, while its Redis is still down.  With *resp*,
        batches go through it on the reactor thread instead (see ``for_url``)."""
        self.client: Any = None
        self._connect = connect
        self._resp = resp
        self.reactor = reactor
        self.timeout_ms = int(timeout * 1000)
        self.max_per_source = max_per_source
        self.prefix = prefix.encode()
        self.buckets = buckets
        self.pool_size = pool
        self.sizes = [0] * buckets
        # A uniform sample of the live table as of the last refresh, as (id, record) pairs: a PeerInfo is
        # made (and validated) only for a member an answer picks, so that a refresh does not stop the
        # reactor for the 4,096 of them at once.
        self.pool: list[tuple[bytes, bytes]] = []
        self._known_sizes = False
        self._infos: dict[tuple[bytes, bytes], Optional[PeerInfo]] = {}  # made so far (None: not ours)
        self._down: Optional[RegistryUnavailable] = None  # why the last refresh failed
        self._rng = random.Random(os.urandom(16))  # the sampling's own (drawn in the worker thread with redis-py)
        self._queue: list[tuple[Op, Deferred[Any]]] = []
        self._busy = False
        self._pool: Optional[ThreadPool] = None  # redis-py's worker thread; none for hiredis on the reactor
        if resp is None:
            self._pool = ThreadPool(1, 1, name="p2pshare-redis")
            self._pool.start()
        self._refresher = LoopingCall(self._refresh)
        self._refresher.clock = reactor
        self._refresher.start(refresh, now=True)

    @classmethod
    def for_url(cls, url: str, reactor: IReactorTime, **kw: Any) -> "RedisRegistry":
        """The registry for *url*: on the reactor thread for a standalone Redis, through redis-py in a
        worker thread for a cluster or TLS."""
        if native_url(url):
            return cls(lambda: redis_client(url), reactor, resp=RespClient(url, reactor), **kw)
        return cls(lambda: redis_client(url), reactor, **kw)

    # -- keys ----------------------------------------------------------------------------------

    def _bucket(self, raw: bytes) -> int:
        return int.from_bytes(raw[:4], "big") % self.buckets

    def _index_key(self, bucket: int) -> bytes:
        return self.prefix + b":i:%d" % bucket

    def _record_key(self, bucket: int) -> bytes:
        return self.prefix + b":r:%d" % bucket

    def _count_key(self, source: str) -> bytes:
        return self.prefix + b":c:%d" % (zlib.crc32(source.encode()) % self.buckets)

    # -- IPeerRegistry -------------------------------------------------------------------------

    def register(self, info: PeerInfo, source: str, now: float) -> Deferred[bool]:
        return self._submit(self._register(info, source, int(now * 1000)))

    def heartbeat(self, peer: str, now: float) -> Deferred[bool]:
        return self._submit(self._heartbeat(bytes.fromhex(peer), int(now * 1000)))

    def remove(self, peer: str) -> Deferred[bool]:
        return self._submit(self._remove(bytes.fromhex(peer)))

    def expire(self, now: float) -> Deferred[list[str]]:
        return self._submit(self._expire(int(now * 1000)))

    def sample(self, k: int, exclude: Optional[str], rng: random.Random, per_host: int = 0) -> Deferred[list[PeerInfo]]:
        if self._down is not None:  # the last refresh failed: no answers from an old picture
            return fail(self._down)
        pool = self.pool
        skip = bytes.fromhex(exclude) if exclude else None

        def peer_at(i: int) -> Optional[PeerInfo]:
            raw, record = pool[i]
            return None if raw == skip else self._info(raw, record)

        return succeed(draw(len(pool), k, rng, peer_at, per_host))

    def count(self) -> int:
        return sum(self.sizes) if self._known_sizes else 0

    def close(self) -> Deferred[None]:
        if self._refresher.running:
            self._refresher.stop()
        if self._pool is not None:
            self._pool.stop()
        if self._resp is not None:
            self._resp.close()
        try:
            if self.client is not None:
                self.client.close()
        except Exception:  # closing a client whose server is gone
            pass
        return succeed(None)

    # -- the operations (pure functions of Redis's replies, run where the client runs) -----------

    def _register(self, info: PeerInfo, source: str, now_ms: int) -> Op:
        raw = bytes.fromhex(info.peer)
        bucket, counts = self._bucket(raw), self._count_key(source)
        old, count = _checked((yield [("HGET", self._record_key(bucket), raw), ("HGET", counts, source)]))
        old_source = _unpack(old)[3] if old is not None else None
        if old_source != source and int(count or 0) >= self.max_per_source:
            return False
        commands: list[tuple[Any, ...]] = [
            ("HSET", self._record_key(bucket), raw, _pack(info.host, info.udp, info.tcp, source)),
            ("ZADD", self._index_key(bucket), now_ms + self.timeout_ms, raw)]
        if old_source != source:
            commands.append(("HINCRBY", counts, source, 1))
            if old_source is not None:  # it moved: free its place at the old address
                commands.append(("HINCRBY", self._count_key(old_source), old_source, -1))
        replies = _checked((yield commands))
        if old_source not in (None, source) and int(replies[-1]) <= 0:
            _checked((yield [("HDEL", self._count_key(old_source), old_source)]))
        return True

    def _heartbeat(self, raw: bytes, now_ms: int) -> Op:
        index = self._index_key(self._bucket(raw))
        (changed,) = _checked((yield [("ZADD", index, "XX", "CH", now_ms + self.timeout_ms, raw)]))
        if int(changed):
            return True
        (score,) = _checked((yield [("ZSCORE", index, raw)]))  # the same expiry again, or not there
        return score is not None

    def _remove(self, raw: bytes) -> Op:
        bucket = self._bucket(raw)
        (record,) = _checked((yield [("HGET", self._record_key(bucket), raw)]))
        if record is None:
            _checked((yield [("ZREM", self._index_key(bucket), raw)]))
            return False
        yield from self._forget([(bucket, raw, record)])
        return True

    def _forget(self, gone: list[tuple[int, bytes, bytes]]) -> Op:
        """Delete the records of *gone* (bucket, id, record) and give their places back to their sources."""
        commands: list[tuple[Any, ...]] = []
        for bucket, raw, record in gone:
            source = _unpack(record)[3]
            commands += [("HDEL", self._record_key(bucket), raw), ("ZREM", self._index_key(bucket), raw),
                         ("HINCRBY", self._count_key(source), source, -1)]
        replies = _checked((yield commands))
        empty = [_unpack(record)[3] for (_, _, record), left in zip(gone, replies[2::3]) if int(left) <= 0]
        if empty:
            _checked((yield [("HDEL", self._count_key(source), source) for source in empty]))

    def _expire(self, now_ms: int) -> Op:
        late = _checked((yield [("ZRANGEBYSCORE", self._index_key(b), "-inf", f"({now_ms}")
                                for b in range(self.buckets)]))
        found = [(b, raw) for b, members in enumerate(late) for raw in members]
        if not found:
            return []
        # Only the tracker whose ZREM takes an entry forgets it, so that sweeping trackers do not
        # give a source its place back twice.
        replies = _checked((yield [c for b, raw in found for c in (("ZREM", self._index_key(b), raw),
                                                                    ("HGET", self._record_key(b), raw))]))
        gone = [(b, raw, record) for (b, raw), removed, record in zip(found, replies[0::2], replies[1::2])
                if int(removed) and record is not None]
        if gone:
            yield from self._forget(gone)
        return [raw.hex() for _, raw, _ in gone]

    def _sample_pool(self, now_ms: int) -> Op:
        """The bucket sizes, then about ``pool_size`` members drawn in proportion to them, with their records."""
        sizes = [int(n) for n in _checked((yield [("ZCARD", self._index_key(b)) for b in range(self.buckets)]))]
        total = sum(sizes)
        # n * pool / total from each bucket, rounded up or down at random so that every member is
        # read with the same chance, pool / total, however few a bucket holds
        share = 1.0 if total <= self.pool_size else self.pool_size / total
        wanted = [(b, int(n * share + self._rng.random())) for b, n in enumerate(sizes) if n]
        wanted = [(b, n) for b, n in wanted if n]
        replies = _checked((yield [("ZRANDMEMBER", self._index_key(b), n, "WITHSCORES") for b, n in wanted]))
        live = [(b, [raw for raw, score in _pairs(reply) if float(score) >= now_ms])
                for (b, _), reply in zip(wanted, replies)]
        live = [(b, ids) for b, ids in live if ids]
        records = _checked((yield [("HMGET", self._record_key(b), *ids) for b, ids in live]))
        members = [(raw, record) for (_, ids), values in zip(live, records)
                   for raw, record in zip(ids, values) if record is not None]
        return sizes, members

    def _info(self, raw: bytes, record: bytes) -> Optional[PeerInfo]:
        """The PeerInfo of a pool member, made and validated once (None for a record not of ours)."""
        key = (raw, record)
        try:
            return self._infos[key]
        except KeyError:
            pass
        try:
            host, udp, tcp, _ = _unpack(record)
            info: Optional[PeerInfo] = PeerInfo(raw.hex(), host, int(udp), int(tcp))
        except (ValueError, UnicodeDecodeError, IndexError):  # not one of ours: not offered
            info = None
        self._infos[key] = info
        return info

    def _refresh(self) -> Deferred[None]:
        def got(result: tuple[list[int], list[tuple[bytes, bytes]]]) -> None:
            self.sizes, self.pool = result
            # Only the new pool's members keep their PeerInfo: a pool is a fresh sample each time, and
            # infos kept for members gone from it were megabytes of a tracker's memory.
            made = self._infos
            self._infos = {key: made[key] for key in self.pool if key in made}
            self._known_sizes, self._down = True, None

        def failed(f: Failure) -> None:
            f.trap(RegistryUnavailable)
            self._down = f.value
            self.pool = []

        def outcome(outcomes: list[tuple[bool, Any]]) -> Any:
            ok, value = outcomes[0]
            return value if ok else Failure(value)

        # Beside the queue, not in a batch of requests: none waits behind the refresh's three rounds.
        d = self._drive([self._sample_pool(int(self.reactor.seconds() * 1000))])
        d.addCallback(outcome).addErrback(lambda f: Failure(_as_unavailable(f)))
        return d.addCallbacks(got, failed)

    # -- batching --------------------------------------------------------------------------------

    def _submit(self, op: Op) -> Deferred[Any]:
        if len(self._queue) >= MAX_PENDING:
            op.close()
            return fail(RegistryUnavailable(f"{MAX_PENDING} requests already wait for Redis"))
        d: Deferred[Any] = Deferred()
        self._queue.append((op, d))
        if not self._busy:
            self._busy = True
            self.reactor.callLater(0, self._next_batch)  # type: ignore[attr-defined]
        return d

    def _next_batch(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            self._busy = False
            return
        d = self._drive([op for op, _ in batch])

        def done(outcomes: list[tuple[bool, Any]]) -> None:
            for (_, waiting), (ok, value) in zip(batch, outcomes):
                if ok:
                    waiting.callback(value)
                else:
                    waiting.errback(value)

        def failed(f: Failure) -> None:
            error = _as_unavailable(f)
            for _, waiting in batch:
                waiting.errback(error)

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._next_batch())

    def _drive(self, ops: list[Op]) -> Deferred[list[tuple[bool, Any]]]:
        """Run *ops* to their ends: each one's (ok, value or error)."""
        if self._resp is not None:
            return _run_async(self._resp, ops)
        assert self._pool is not None
        return deferToThreadPool(self.reactor, self._pool, self._run, ops)

    def _run(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """In the worker thread: the client (made now if need be), then the batch."""
        if self.client is None:
            try:
                self.client = self._connect()
            except Exception:
                for op in ops:
                    op.close()
                raise
        return _run(self.client, ops)


class _Lockstep:
    """*ops* driven together: the commands of every operation still running make one round, and
    each operation gets its own replies back."""

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops
        self.outcomes: list[tuple[bool, Any]] = [(True, None)] * len(ops)
        self.active: list[tuple[int, list[tuple[Any, ...]]]] = []
        for i in range(len(ops)):
            self._step(i, None)

    def _step(self, i: int, replies: Any) -> None:
        try:
            self.active.append((i, self.ops[i].send(replies)))
        except StopIteration as e:
            self.outcomes[i] = (True, e.value)
        except Exception as e:  # a reply it cannot use: this operation fails, the others go on
            self.outcomes[i] = (False, e if isinstance(e, RegistryUnavailable) else RegistryUnavailable(str(e)))

    def round(self) -> Optional[list[tuple[Any, ...]]]:
        """The next round's commands (perhaps none: a sample of an empty table), or None once every
        operation is done."""
        if not self.active:
            return None
        self._current, self.active = self.active, []
        return [c for _, commands in self._current for c in commands]

    def replies(self, replies: list[Any]) -> None:
        at = 0
        for i, commands in self._current:
            self._step(i, replies[at: at + len(commands)])
            at += len(commands)

    def close(self) -> None:
        for op in self.ops:
            op.close()


def _run(client: Any, ops: list[Op]) -> list[tuple[bool, Any]]:
    """Drive *ops* in lockstep (in the worker thread): one pipeline per round of commands."""
    lockstep = _Lockstep(ops)
    try:
        while (commands := lockstep.round()) is not None:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            try:
                lockstep.replies(pipe.execute(raise_on_error=False))
            except Exception:
                _rediscover(client)
                raise
    finally:
        lockstep.close()
    return lockstep.outcomes


def _run_async(client: RespClient, ops: list[Op]) -> Deferred[list[tuple[bool, Any]]]:
    """``_run`` on the reactor thread: one batch of *client* per round of commands."""
    lockstep = _Lockstep(ops)

    def next_round(replies: Optional[list[Any]] = None) -> Any:
        if replies is not None:
            lockstep.replies(replies)
        commands = lockstep.round()
        if commands is None:
            return lockstep.outcomes
        return client.batch(commands).addCallback(next_round)

    def close(result: Any) -> Any:
        lockstep.close()
        return result

    try:
        first = next_round()
    except Exception:
        lockstep.close()
        raise
    return first.addBoth(close) if isinstance(first, Deferred) else succeed(close(first))


def _as_unavailable(f: Failure) -> RegistryUnavailable:
    """What a failed batch tells the tracker: Redis is unavailable, and why."""
    return f.value if isinstance(f.value, RegistryUnavailable) else RegistryUnavailable(f"Redis: {f.getErrorMessage()}")


def _rediscover(client: Any) -> None:
    """After a failed batch, a cluster client learns the slots again (a replica promoted in place of a
    master that died), so that the next batch goes to the new master."""
    nodes = getattr(client, "nodes_manager", None)
    if nodes is None:
        return
    try:
        nodes.initialize()
    except Exception:  # no node answers yet: the next failed batch tries again
        pass


def _checked(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise RegistryUnavailable(f"Redis: {reply}")
    return replies


def _pairs(reply: list[Any]) -> list[Any]:
    """``ZRANDMEMBER ... WITHSCORES``: flat (RESP2) or pairs (as redis-py parses it), as pairs."""
    if reply and isinstance(reply[0], (list, tuple)):
        return reply
    return list(zip(reply[0::2], reply[1::2]))


def _pack(host: str, udp: int, tcp: int, source: str) -> bytes:
    """A peer's record, small (Redis keeps a million of them): both ports, the host's address in
    binary, and the source's only when it differs from the host."""
    packed = _address(host)
    return (udp.to_bytes(2, "big") + tcp.to_bytes(2, "big") + bytes([len(packed)]) + packed
            + (b"" if source == host else _address(source)))


def _address(host: str) -> bytes:
    """An IP address literal in binary (4 or 16 bytes); anything else (a scoped IPv6 address, whose
    scope the binary form would lose) as its text, marked by a 0 byte."""
    if "%" not in host:
        try:
            return ipaddress.ip_address(host).packed
        except ValueError:
            pass
    return b"\0" + host.encode()


def _text(packed: bytes) -> str:
    if packed[:1] == b"\0":
        return packed[1:].decode()
    return str(ipaddress.ip_address(packed))


def _unpack(record: bytes) -> tuple[str, int, int, str]:
    """``(host, udp, tcp, source)``."""
    n = record[4]
    host = _text(record[5:5 + n])
    rest = record[5 + n:]
    return host, int.from_bytes(record[0:2], "big"), int.from_bytes(record[2:4], "big"), _text(rest) if rest else host
