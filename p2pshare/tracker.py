"""The tracker protocol: the server that keeps the table of peers and the peer's client.

One JSON object a line in both directions (``wire.TrackerRequest`` /
``wire.TrackerReply``); requests carry an ``id`` so a client may pipeline them.
A registration belongs to the connection that made it (one connection may
register several peer ids): when the connection drops, its peers leave the
table at once; a peer that stays connected but stops
heartbeating is expired after ``EXPIRE_AFTER`` intervals.
"""

from __future__ import annotations

import os
import random
import socket
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator, Optional, Union

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pshare.errors import MalformedMessage, TrackerError
from p2pshare.metrics import TrackerMetrics
from p2pshare.ratelimit import Counters, RateLimitedLog
from p2pshare.registry import IPeerRegistry, MemoryRegistry, RegistryUnavailable
from p2pshare.wire import MAX_PEERS_ANSWER, MAX_TRACKER_LINE, PeerInfo, TrackerReply, TrackerRequest, plain_host

if TYPE_CHECKING:
    from p2pshare.netkey import NetworkKey

EXPIRE_AFTER = 3  # heartbeat intervals without news before a peer is dropped
PER_HOST_IN_ANSWER = 4  # entries with one host in one answer to "peers"
MAX_PER_ADDRESS = 32  # registrations, and open connections, from one address
_OP_COUNTER = {op: f"tracker_{op}" for op in ("register", "heartbeat", "leave", "peers")}
_LOG_PREFIX, _REPR = "TrackerServerProtocol", "<TrackerServerProtocol>"  # every connection's (connectionMade)


class TrackerServerProtocol(LineReceiver):
    """One connected peer (or a one-shot client such as ``p2pshare peers``).

    Idle connections are closed by the factory's periodic sweep (``close_idle``)
    rather than a timer per connection, which would be reset on every request.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_TRACKER_LINE
    # A tracker holds a connection per peer: what most connections never need is made on first use.
    # The keys (``TrackerFactory.key``) of the peers registered through this connection; what they
    # registered is the factory's (``TrackerFactory.held``, with this connection as their owner).  A
    # peer's own connection has one, in an attribute; a list only for a connection that registers
    # more, which may still name peers that left or moved to another connection: those are skipped,
    # and pruned as the list grows.
    _keys: Optional[list[Hashable]] = None
    _pruned = 0  # the list's length when it was last pruned
    _closed_waiters: Optional[list[Deferred[None]]] = None

    def __init__(self, factory: "TrackerFactory") -> None:
        self.factory = factory
        self.last_heard = factory.clock.seconds()
        self._buffer, self._busyReceiving = b"", False  # LineReceiver's starting values: see connectionMade
        self._one: Optional[Hashable] = None

    def when_closed(self) -> Deferred[None]:
        """Fires once the connection is gone."""
        d: Deferred[None] = Deferred()
        if self._closed_waiters is None:
            self._closed_waiters = []
        self._closed_waiters.append(d)
        return d

    def note(self, key: Hashable) -> None:
        """Peer *key* is registered through this connection now (it was not)."""
        if self._keys is not None:
            self._keys.append(key)
            if len(self._keys) > 2 * self._pruned + 16:
                self._keys = self.registered()
                self._pruned = len(self._keys)
        elif self._one is None or not self.factory.owns(self, self._one):
            self._one = key
        else:
            self._keys = [self._one, key]
            self._one = None

    def registration(self, key: Hashable) -> Optional["Packed"]:
        """What *key* registered through this connection, or None."""
        return self.factory.registration(self, key)

    def registered(self) -> list[Hashable]:
        """The keys of the peers registered through this connection."""
        return list(dict.fromkeys(self._owned()))

    def _owned(self) -> Iterator[Hashable]:
        """The keys this connection lists that it still owns, in order (a key listed twice, twice)."""
        owns = self.factory.owns
        return (key for key in (self._keys if self._keys is not None else (self._one,))
                if key is not None and owns(self, key))

    def first_registered(self) -> Optional[Hashable]:
        """One key of a peer registered through this connection (the first), without listing them all."""
        return next(self._owned(), None)

    def connectionMade(self) -> None:
        if isinstance(self.transport, FileDescriptor):
            # A tracker holds a connection per peer.  Twisted sets a transport's write offset at its
            # first write, and LineReceiver its buffer at the first line; given their starting values
            # here and in __init__ instead, before any I/O, each transport and each protocol keeps its
            # attributes in the compact layout its class shares (measured on CPython 3.11 with 300 to
            # 100,000 connections): otherwise each gets a dictionary of its own, 870 and 200 bytes more
            # a connection (tests/test_integration.py).  Twisted also makes two strings per connection
            # for its log prefix and repr (170 bytes); tracker connections share theirs, and what the
            # tracker logs names the peer's address itself.
            self.transport.offset = 0
            self.transport.logstr, self.transport.repstr = _LOG_PREFIX, _REPR
        self.factory.open.add(self)

    def lineReceived(self, line: bytes) -> None:
        self.last_heard = self.factory.clock.seconds()
        try:
            request = TrackerRequest.decode(line)
        except MalformedMessage as e:
            self._refuse("malformed", str(e))
            return
        self.factory.handle(request, self).addCallback(self._reply)

    def _reply(self, reply: TrackerReply) -> None:
        if self.connected:  # answers from a shared table may come after the peer hung up
            self.sendLine(reply.encode())

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse("too_long", f"a line may hold at most {MAX_TRACKER_LINE} bytes")

    def _refuse(self, code: str, message: str) -> None:
        self.factory.counters.add(f"tracker_{code}")
        self.factory.bad_input.warn(self.transport.getPeer().host, "closing tracker connection from {peer}: {why}",
                                    peer=self.transport.getPeer(), why=message)
        self.sendLine(TrackerReply(0, False, code, message).encode())
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.open.discard(self)
        self.factory.connection_closed(self)
        for key in self.registered():
            self.factory.forget(self.factory.peer_of(key))
        waiters, self._closed_waiters = self._closed_waiters or [], None
        for d in waiters:
            d.callback(None)


Packed = Union[int, bytes]
_HOST_GIVEN = 1 << 64  # in a packed int: an IPv4 host in bits 32 to 63 (else the connection's address)
_OWNER = 65  # in a held registration: the owning connection's id() from this bit up
Held = Union[int, tuple[int, bytes]]


def _held(conn: "TrackerServerProtocol", packed: Packed) -> Held:
    """*packed* as the factory holds it, with the connection it came through: one int (40 bytes), or a
    pair for the rare bytes form."""
    return id(conn) << _OWNER | packed if isinstance(packed, int) else (id(conn), packed)


def _owner(held: Held) -> int:
    return held >> _OWNER if isinstance(held, int) else held[0]


def _registration(held: Held) -> Packed:
    return held & ((1 << _OWNER) - 1) if isinstance(held, int) else held[1]


def _packed(info: PeerInfo, source: str) -> Packed:
    """A registration as its connection keeps it (whose address is *source*): the two ports in one
    int when the peer's host is that address, as it almost always is (32 bytes); an IPv4 host given
    in the same int (36 bytes); else ``host udp tcp`` (an IPv6 literal)."""
    ports = info.udp << 16 | info.tcp
    if info.host == source:
        return ports
    try:
        ip = socket.inet_aton(info.host)
    except OSError:
        ip = b""
    if ip and socket.inet_ntoa(ip) == info.host:  # (inet_aton also takes forms such as "10.1")
        return _HOST_GIVEN | int.from_bytes(ip, "big") << 32 | ports
    return b"%s %d %d" % (info.host.encode(), info.udp, info.tcp)


def _unpacked(peer: str, packed: Packed, source: str) -> PeerInfo:
    if isinstance(packed, int):
        host = source if packed < _HOST_GIVEN else socket.inet_ntoa(((packed >> 32) & 0xFFFFFFFF).to_bytes(4, "big"))
        return PeerInfo(peer, host, (packed >> 16) & 0xFFFF, packed & 0xFFFF)
    host, udp, tcp = packed.decode().split(" ")
    return PeerInfo(peer, host, int(udp), int(tcp))


def _int_key(peer: str) -> int:
    return int(peer, 16)


def _peer_of_int(key: Hashable) -> str:
    return f"{key:032x}"


def _same(peer: Any) -> Any:
    return peer


class TrackerFactory(Factory):
    """Holds the registry and answers requests; protocols only frame them."""

    log = Logger()
    noisy = False

    def __init__(self, clock: IReactorTime, registry: Optional[IPeerRegistry] = None, max_peers: int = 20,
                 interval: float = 10.0, rng: Optional[random.Random] = None,
                 max_per_address: int = MAX_PER_ADDRESS) -> None:
        self.clock = clock
        self.interval = interval
        self.registry: IPeerRegistry = registry if registry is not None else MemoryRegistry(
            timeout=interval * EXPIRE_AFTER, max_per_source=max_per_address)
        self.max_peers = max(0, min(max_peers, MAX_PEERS_ANSWER))
        self.rng = rng or random.Random(os.urandom(32))  # unpredictable seed, fast draws
        self.max_per_address = max_per_address
        # What each peer registered, and the connection it came through (its owner, the only one that
        # may bring the registration back, from its own address): a shared table that lost it (a store
        # restarted empty) gets it again at its next heartbeat.  Packed (``_packed``, ``_held``): with
        # 100,000 peers a PeerInfo, a tuple and their strings each would be some 30 MB of a tracker
        # on Redis; the packed form, owner included, is 40 bytes a peer.  The owner is known by its
        # id(): an open connection is alive, and a closing one forgets its peers.
        self.held: dict[Hashable, Held] = {}
        # The key of a peer in those two maps, and back: a table in this process holds the id strings
        # already, and the same objects serve; a shared one holds none here, and an int is smaller.
        local = getattr(self.registry, "local", True)
        self.key: Callable[[str], Hashable] = _same if local else _int_key
        self.peer_of: Callable[[Hashable], str] = _same if local else _peer_of_int
        self.open: set[TrackerServerProtocol] = set()
        self.counters = Counters()
        self.metrics = TrackerMetrics(self)
        self.bad_input = RateLimitedLog(self.log, clock)
        self._connections_from: Counter[str] = Counter()

    def buildProtocol(self, addr: Any) -> Optional[TrackerServerProtocol]:
        host = getattr(addr, "host", None)
        if host is not None:
            host = plain_host(host)  # IPv4 on a dual-stack port: a.b.c.d, as connection_closed counts it
            if self._connections_from[host] >= self.max_per_address:
                self.counters.add("tracker_connections_refused")
                self.bad_input.warn(("connections", host), "refusing a connection from {host}: it has {n} already",
                                    host=host, n=self._connections_from[host])
                return None  # Twisted closes the connection
            self._connections_from[host] += 1
        return TrackerServerProtocol(self)

    def connection_closed(self, conn: TrackerServerProtocol) -> None:
        host = plain_host(conn.transport.getPeer().host)
        self._connections_from[host] -= 1
        if self._connections_from[host] <= 0:
            del self._connections_from[host]

    def owns(self, conn: TrackerServerProtocol, key: Hashable) -> bool:
        """Is *conn* the connection peer *key* registered through?"""
        held = self.held.get(key)
        return held is not None and _owner(held) == id(conn)

    def registration(self, conn: TrackerServerProtocol, key: Hashable) -> Optional[Packed]:
        """What peer *key* registered through *conn*, or None (not registered, or through another)."""
        held = self.held.get(key)
        return None if held is None or _owner(held) != id(conn) else _registration(held)

    def forget(self, peer: str) -> Deferred[Any]:
        """Remove *peer* from the table, whichever way it goes (leave, expiry, lost connection)."""
        self.held.pop(self.key(peer), None)
        return self.registry.remove(peer).addErrback(self._table_down)

    def handle(self, req: TrackerRequest, conn: TrackerServerProtocol) -> Deferred[TrackerReply]:
        """The answer to *req*: at once from the in-memory table, later from a shared one."""
        self.counters[_OP_COUNTER[req.op]] += 1
        started = self.clock.seconds()
        if req.op == "register":
            d = self._register(req, conn)
        elif req.op == "heartbeat":
            d = self._heartbeat(req, conn)
        elif req.op == "leave":
            d = self.forget(req.peer).addCallback(lambda _: TrackerReply(req.id, True))  # type: ignore[arg-type]
        else:
            d = self._peers(req, conn)
        return d.addBoth(self._answered, req, started)  # (one callback for both: this runs per request)

    def _answered(self, reply: Union[TrackerReply, Failure], req: TrackerRequest, started: float) -> TrackerReply:
        if isinstance(reply, Failure):
            reply = self._unavailable(reply, req)
        self.metrics.latency.observe(req.op, self.clock.seconds() - started)
        return reply

    def _register(self, req: TrackerRequest, conn: TrackerServerProtocol) -> Deferred[TrackerReply]:
        assert req.peer is not None
        peer = req.peer
        observed = plain_host(conn.transport.getPeer().host)  # IPv4 on a dual-stack port: a.b.c.d
        info = PeerInfo(peer, req.host or observed, req.udp, req.tcp)  # type: ignore[arg-type]

        def recorded(ok: bool) -> TrackerReply:
            if not ok:
                self.counters.add("tracker_registrations_refused")
                return TrackerReply(req.id, False, "too_many", f"at most {self.max_per_address} peers may "
                                    f"register from one address")
            if conn.connected:  # (a connection gone meanwhile holds nothing: its peer expires)
                key = self.key(peer)
                new = not self.owns(conn, key)
                self.held[key] = _held(conn, _packed(info, observed))  # the newer connection owns it
                if new:
                    conn.note(key)
            return TrackerReply(req.id, True, host=info.host, interval=self.interval)

        return self.registry.register(info, observed, self.clock.seconds()).addCallback(recorded)

    def _heartbeat(self, req: TrackerRequest, conn: TrackerServerProtocol) -> Deferred[TrackerReply]:
        peer = req.peer
        assert peer is not None

        def known(alive: bool) -> Any:
            if alive:
                return TrackerReply(req.id, True)
            mine = conn.registration(self.key(peer))
            if mine is None:
                return TrackerReply(req.id, False, "unknown_peer", "register first")
            # Registered here, still connected, yet not in the table: a shared table that lost it.
            self.counters.add("tracker_reregistered")
            source = plain_host(conn.transport.getPeer().host)  # as _register saw it
            return self.registry.register(_unpacked(peer, mine, source), source, self.clock.seconds()).addCallback(
                lambda ok: TrackerReply(req.id, True) if ok else
                TrackerReply(req.id, False, "unknown_peer", "register first"))

        return self.registry.heartbeat(peer, self.clock.seconds()).addCallback(known)

    def _peers(self, req: TrackerRequest, conn: TrackerServerProtocol) -> Deferred[TrackerReply]:
        exclude = req.peer
        if not exclude:
            first = conn.first_registered()
            exclude = None if first is None else self.peer_of(first)
        # One host may hold several places, but never more than PER_HOST_IN_ANSWER in one answer, so a
        # host that registered many ids cannot crowd out the others.
        return self.registry.sample(min(req.max, self.max_peers), exclude, self.rng, PER_HOST_IN_ANSWER).addCallback(
            lambda peers: TrackerReply(req.id, True, peers=tuple(peers)))

    def _unavailable(self, f: Failure, req: TrackerRequest) -> TrackerReply:
        f.trap(RegistryUnavailable)
        self._table_down(f)
        return TrackerReply(req.id, False, "unavailable", "the tracker's peer table is unavailable; try again later")

    def _table_down(self, f: Failure) -> None:
        f.trap(RegistryUnavailable)
        self.counters.add("tracker_unavailable")
        self.bad_input.warn("registry", "the peer table is unavailable: {error}", error=f.value)

    def expire(self) -> Deferred[None]:
        """Forget silent peers and close connections idle for EXPIRE_AFTER intervals."""
        now = self.clock.seconds()
        for conn in [c for c in self.open if c.last_heard < now - self.interval * EXPIRE_AFTER]:
            self.counters.add("tracker_idle_closed")
            conn.transport.abortConnection()

        def expired(gone: list[str]) -> None:
            for peer in gone:
                self.counters.add("tracker_expired")
                if self.key(peer) in self.held:
                    self.forget(peer)

        return self.registry.expire(now).addCallbacks(expired, self._table_down)


class TrackerService(Service):
    """Listens on an endpoint and expires silent peers once per heartbeat interval.

    With a *key* (``netkey.NetworkKey``) it serves a private network: every connection
    is TLS 1.3 and must prove it holds the key; those that do not are counted
    (``tracker_outsider_connections``) and closed before a line is read.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: TrackerFactory,
                 key: Optional["NetworkKey"] = None) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.key = key
        self.port: Optional[IListeningPort] = None
        self._listening: Deferred[IListeningPort] = Deferred()
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = factory.clock

    def startService(self) -> None:
        super().startService()
        d = self.endpoint.listen(self._listening_factory())

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            self.log.info("tracker listening on {address}", address=port.getHost())
            self._listening.callback(port)
            return port

        d.addCallbacks(listening, self._listening.errback)
        self._expiry.start(self.factory.interval, now=False)

    def _listening_factory(self) -> Factory:
        if self.key is None:
            return self.factory
        from p2pshare.netkey import NetworkTLS, reporter

        once = RateLimitedLog(self.log, self.factory.clock, burst=1)  # a line a minute per source
        report = reporter(self.factory.counters, "tracker_outsider_connections", once,
                          "refused a tracker connection from {host}: it did not prove it holds this network's "
                          "key ({why})")
        return NetworkTLS.for_key(self.key).server(self.factory, report)

    def _expire(self) -> Deferred[None]:
        return self.factory.expire().addErrback(lambda f: self.log.failure("expiring peers failed", f))

    def when_listening(self) -> Deferred[IListeningPort]:
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._listening.addBoth(lambda r: (d.callback(r) if not isinstance(r, Failure) else d.errback(r), r)[1])
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._expiry.running:
            self._expiry.stop()
        closing = []
        for conn in list(self.factory.open):
            closing.append(conn.when_closed())
            conn.transport.abortConnection()
        port, self.port = self.port, None
        if port is not None:
            closing.append(maybeDeferred(port.stopListening))
        return DeferredList(closing).addCallback(lambda _: self.factory.registry.close())


class TrackerClientProtocol(LineReceiver):
    """Sends requests and pairs each reply with its Deferred by id."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_TRACKER_LINE
    log = Logger()

    def __init__(self) -> None:
        self._pending: dict[int, Deferred[TrackerReply]] = {}
        self._next_id = 1
        self.connected_d: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.connected_d.callback(None)

    def request(self, op: str, **fields: Any) -> Deferred[TrackerReply]:
        if not self.connected or self.transport is None:
            return fail(TrackerError("not connected to the tracker"))
        rid, self._next_id = self._next_id, (self._next_id % (2**31 - 1)) + 1
        d: Deferred[TrackerReply] = Deferred()
        self._pending[rid] = d
        self.sendLine(TrackerRequest(op, rid, **fields).encode())
        return d

    def lineReceived(self, line: bytes) -> None:
        try:
            reply = TrackerReply.decode(line)
        except MalformedMessage as e:
            self.log.warn("closing connection to tracker: {error}", error=e)
            self.transport.loseConnection()
            return
        d = self._pending.pop(reply.id, None)
        if d is not None and d.called:  # given up on (a timeout) before the reply came
            return
        if d is None:
            if not reply.ok:
                self.log.warn("tracker refused: {message}", message=reply.message)
            return
        if reply.ok:
            d.callback(reply)
        else:
            d.errback(TrackerError(f"tracker refused {reply.error}: {reply.message}", reply.error))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False  # Protocol leaves it set; ``registered`` relies on it
        pending, self._pending = self._pending, {}
        for d in pending.values():
            if not d.called:
                d.errback(TrackerError("the connection to the tracker was lost"))


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Several trackers as one client endpoint: ``connect`` tries each in turn, starting with the
    one that last worked, and fails only when none connects (``ClientService`` then backs off)."""

    log = Logger()

    def __init__(self, endpoints: list[IStreamClientEndpoint], names: Optional[list[str]] = None) -> None:
        self.endpoints = endpoints
        self.names = names or [str(e) for e in endpoints]
        self.current = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        count = len(self.endpoints)

        def attempt(i: int) -> Deferred[Any]:
            index = (self.current + i) % count

            def connected(proto: Any) -> Any:
                if index != self.current:
                    self.log.info("using the tracker at {tracker}", tracker=self.names[index])
                self.current = index
                return proto

            def failed(f: Failure) -> Any:
                if i + 1 < count:
                    return attempt(i + 1)
                return f

            return self.endpoints[index].connect(factory).addCallbacks(connected, failed)

        return attempt(0)


class TrackerClient(Service):
    """Keeps a peer registered: reconnects with backoff, heartbeats, refreshes neighbours.

    *me* returns ``(peer_id, udp_port, tcp_port, advertise_host_or_None)``;
    *on_peers* receives each fresh neighbour list.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, clock: IReactorTime,
                 me: Callable[[], tuple[str, int, int, Optional[str]]],
                 on_peers: Callable[[list[PeerInfo]], None], want: int = 8, refresh: float = 30.0,
                 key: Optional["NetworkKey"] = None) -> None:
        self.clock = clock
        if key is not None:  # a private network: TLS to a tracker that must hold the same key
            endpoint = self._private(endpoint, key)
        self.me = me
        self.on_peers = on_peers
        self.want = want
        self.refresh = refresh
        self.interval = 10.0
        self.observed_host: Optional[str] = None
        self.proto: Optional[TrackerClientProtocol] = None
        self._first_peers: list[Deferred[list[PeerInfo]]] = []
        self.last_peers: Optional[list[PeerInfo]] = None
        self._refusals = 0  # registrations failed in a row: they back off like failed connections
        factory = Factory.forProtocol(self._connection)
        factory.noisy = False
        # A reconnection waits at most max_delay plus a jitter (which spreads the herd after a restart)
        # of at most half of it, so a restarted tracker hears from every peer within two refresh
        # intervals; Twisted's default jitter (up to 1 s) alone would break that for refresh <= 1 s.
        max_delay = max(1.0, min(30.0, refresh))
        policy = backoffPolicy(initialDelay=0.5, maxDelay=max_delay,
                               jitter=lambda: random.random() * min(1.0, max_delay / 2))
        # Registration runs on a connection ClientService already holds, not as its prepareConnection:
        # a connection lost while prepareConnection runs (a tracker that hangs up on an outsider)
        # reaches a state of ClientService's machine that has no transition for it (NoTransition).
        self._client = ClientService(endpoint, factory, clock=clock,
                                     retryPolicy=lambda attempt: policy(attempt + self._refusals))
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._refresher = LoopingCall(self.refresh_now)
        self._refresher.clock = clock

    def _private(self, endpoint: IStreamClientEndpoint, key: "NetworkKey") -> IStreamClientEndpoint:
        from p2pshare.netkey import NetworkTLS

        refusals = RateLimitedLog(self.log, self.clock, burst=1)

        def refused(host: str, why: str) -> None:
            refusals.warn(host, "the tracker at {host} is not part of this private network, or refused us: TLS "
                          "failed ({why}); do both run with the same --key?", host=host, why=why)

        return NetworkTLS.for_key(key).client(endpoint, refused, self.clock)

    @property
    def registered(self) -> bool:
        return self.proto is not None and self.proto.connected

    def _connection(self) -> TrackerClientProtocol:
        proto = TrackerClientProtocol()
        proto.connected_d.addCallback(lambda _: self._register(proto))
        return proto

    def _register(self, proto: TrackerClientProtocol) -> Deferred[None]:
        peer, udp, tcp, host = self.me()
        d = proto.request("register", peer=peer, udp=udp, tcp=tcp, host=host)

        def done(reply: TrackerReply) -> None:
            if not self.running:  # stopped while registering
                proto.transport.loseConnection()
                return
            self._refusals = 0
            self.proto = proto
            self.observed_host = reply.host
            self.log.info("registered with the tracker as {host}:{udp}", host=reply.host, udp=udp)
            if reply.interval and reply.interval != self.interval or not self._heartbeat.running:
                self.interval = reply.interval or self.interval
                if self._heartbeat.running:
                    self._heartbeat.stop()
                self._heartbeat.start(self.interval, now=False)
            self.refresh_now()

        def failed(f: Failure) -> None:
            self.log.warn("registration failed: {error}", error=f.value)
            self._refusals += 1
            proto.transport.loseConnection()  # ClientService connects again after its backoff

        return d.addCallbacks(done, failed)

    def _beat(self) -> Optional[Deferred[Any]]:
        if not self.registered:
            return None
        assert self.proto is not None
        peer = self.me()[0]
        proto = self.proto
        d = self.proto.request("heartbeat", peer=peer)
        # No answer within an interval: the connection is dead even if TCP has not noticed (a silent
        # partition); abort it so that ClientService reconnects and registers again.
        d.addTimeout(self.interval, self.clock, onTimeoutCancel=lambda *_: self._silent(proto))
        d.addErrback(self._lost, proto)
        return None

    def _silent(self, proto: TrackerClientProtocol) -> None:
        self.log.warn("the tracker did not answer a heartbeat within {interval}s; reconnecting",
                      interval=self.interval)
        if proto.connected:
            proto.transport.abortConnection()
        return None

    def refresh_now(self) -> Deferred[list[PeerInfo]]:
        """Ask the tracker for neighbours now; fires with the list (empty when unreachable)."""
        if not self.registered or self.want <= 0:
            return succeed([])
        assert self.proto is not None
        d = self.proto.request("peers", peer=self.me()[0], max=self.want)

        def got(reply: TrackerReply) -> list[PeerInfo]:
            peers = list(reply.peers or ())
            self.on_peers(peers)
            self.last_peers = peers
            waiting, self._first_peers = self._first_peers, []
            for w in waiting:
                w.callback(peers)
            return peers

        return d.addCallback(got).addErrback(lambda f: (self._lost(f, self.proto), [])[1])

    def when_peers(self) -> Deferred[list[PeerInfo]]:
        """Fires with the tracker's neighbour list: the last one, or the first to come."""
        if self.last_peers is not None:
            return succeed(self.last_peers)
        d: Deferred[list[PeerInfo]] = Deferred(lambda d: self._first_peers.remove(d))
        self._first_peers.append(d)
        return d

    def _lost(self, f: Failure, proto: Optional[TrackerClientProtocol]) -> None:
        self.log.warn("tracker request failed: {error}", error=f.value)
        if f.check(TrackerError) and f.value.code == "unavailable":
            return  # its table is down for a while: stay connected, it registers us again when it is back
        if f.check(TrackerError) and proto is not None and proto.connected:
            proto.transport.loseConnection()  # ClientService reconnects and registers again

    def startService(self) -> None:
        super().startService()
        self._client.startService()
        self._refresher.start(self.refresh, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for loop in (self._heartbeat, self._refresher):
            if loop.running:
                loop.stop()
        proto = self.proto
        if proto is not None and proto.connected:
            d = proto.request("leave", peer=self.me()[0])
            d.addErrback(lambda f: None)
        self.proto = None
        return self._client.stopService()
