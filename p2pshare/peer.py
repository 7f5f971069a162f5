"""The peer service: composes the shared folder, search, transfer and the tracker client.

``Peer.search`` and ``Peer.fetch`` are the library's verbs; the control API and
the CLI only call them.
"""

from __future__ import annotations

import json
import os
import time
import random
from pathlib import Path
from typing import IO, Any, Callable, Optional

from attrs import asdict, frozen
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pshare.errors import AlreadyExists, NotFound, P2PError, TransferFailed
from p2pshare.ratelimit import Counters
from p2pshare.neighbours import Neighbourhood
from p2pshare.search import DEFAULT_TTL, Reaction, SearchCore, SearchProtocol
from p2pshare.shares import Entry, Shares
from p2pshare.tracker import TrackerClient
from p2pshare.download import Download, in_thread
from p2pshare.transfer import IDLE_TIMEOUT, ITransferNode, TransferFactory, TransferProtocol, dial
from p2pshare.wire import MAX_DATAGRAM, Address, Frame, Hello, Hit, PeerInfo, Query, validate_name

MAX_OFFERS = 16  # connections a holder opens to requesters at once


@frozen
class FetchResult:
    """What ``Peer.fetch`` fires with: the verified file in place, and how it came."""

    name: str
    path: str
    size: int
    sha256: str
    holder: str  # host:port of the holder's transfer socket
    holder_peer: str
    dialled_by: str  # "holder" (the original design) or "requester" (dial-back)
    seconds: float


class _Fetch:
    def __init__(self, name: str, timeout: float) -> None:
        self.name, self.timeout = name, timeout
        self.ids: list[str] = []  # one per query sent: the first, then re-queries
        self.active = True
        self.requery: Optional[IDelayedCall] = None
        self.waiters: list[Deferred[FetchResult]] = []
        self.progress: list[Callable[[int, int], None]] = []
        self.hits: list[Hit] = []
        self.tried: set[Address] = set()
        self.download: Optional[Download] = None
        self.dialing: Optional[TransferProtocol] = None
        self.timer: Optional[IDelayedCall] = None
        self.dial_timer: Optional[IDelayedCall] = None
        self.expired = False
        self.error: Optional[BaseException] = None
        self.started = time.monotonic()

    def report(self, got: int, size: int) -> None:
        for listener in self.progress:
            listener(got, size)


class _Search:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ids: list[str] = []
        self.hits: dict[tuple[str, str], Hit] = {}
        self.done: Deferred[list[Hit]] = Deferred()
        self.end: Optional[IDelayedCall] = None
        self.again: Optional[IDelayedCall] = None


@implementer(ITransferNode)
class _Dialer:
    """The node for a connection a requester dialled to a holder it heard from."""

    def __init__(self, peer: "Peer", fetch: _Fetch, hit: Hit) -> None:
        self.peer, self.fetch, self.hit = peer, fetch, hit
        self.peer_id = peer.peer_id

    def open_for_sending(self, frame: Frame) -> tuple[Entry, IO[bytes]]:
        raise NotFound("this connection only receives")

    def accept_offer(self, frame: Frame, proto: TransferProtocol) -> Optional[Download]:
        if frame.name != self.fetch.name or frame.sha256 != self.hit.sha256 or frame.size != self.hit.size:
            return None
        return self.peer._accept(self.fetch, frame, proto, "requester")

    def track(self, proto: TransferProtocol, alive: bool) -> None:
        self.peer.track(proto, alive)


@implementer(ITransferNode)
class Peer(MultiService):
    """A p2pshare peer sharing *directory*; start it as a service, then await ``when_ready()``."""

    log = Logger()

    def __init__(self, directory: str | Path, tracker: Optional[IStreamClientEndpoint] = None, port: int = 0,
                 interface: str = "0.0.0.0", advertise: Optional[str] = None, peers: tuple[Address, ...] = (),
                 want: int = 8, refresh: float = 30.0, rescan: float = 30.0, ttl: int = DEFAULT_TTL,
                 dial_wait: float = 0.5, idle: float = IDLE_TIMEOUT, requery: float = 3.0,
                 reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.shares = Shares(directory, reactor=reactor)
        self.peer_id = self._load_peer_id()
        self.port, self.interface, self.advertise = port, interface, advertise
        self.static_peers = list(peers)
        self.dial_wait, self.idle, self.requery = dial_wait, idle, requery
        self.counters = Counters()
        self.udp_port = self.tcp_port = 0
        self.hood = Neighbourhood(expire_after=refresh * 3)
        self.rng = random.SystemRandom()
        self.core = SearchCore(self.shares.lookup, self.neighbours, self._me, self.counters, max_ttl=ttl)
        self.search_proto = SearchProtocol(self.core, reactor, self._offer, self._heard_from, self._hello)
        self.tracker: Optional[TrackerClient] = None
        if tracker is not None:
            self.tracker = TrackerClient(tracker, reactor, self._registration, self._set_tracker_peers, want,
                                         refresh)
        self._rescan_loop = LoopingCall(self._rescan)
        self._rescan_loop.clock = reactor
        self._hello_loop = LoopingCall(self._say_hello)
        self._hello_loop.clock = reactor
        self._refresh = refresh
        self._rescan_every = rescan
        self._ports: list[IListeningPort] = []
        self._fetches: dict[str, _Fetch] = {}  # by name
        self._by_id: dict[str, _Fetch] = {}
        self._searches: set[_Search] = set()
        self._connections: set[TransferProtocol] = set()
        self._offering = 0
        self._ready: Optional[Deferred[Peer]] = None

    # -- life cycle ---------------------------------------------------------------------

    def _load_peer_id(self) -> str:
        path = self.shares.state / "peer_id"
        try:
            pid = path.read_text().strip()
            if len(pid) == 32 and all(c in "0123456789abcdef" for c in pid):
                return pid
        except OSError:
            pass
        pid = os.urandom(16).hex()
        path.write_text(pid + "\n")
        return pid

    def startService(self) -> None:
        super().startService()
        self._ready = Deferred.fromCoroutine(self._start())
        self._ready.addErrback(self._start_failed)

    def _start_failed(self, f: Failure) -> Failure:
        self.log.failure("the peer could not start", f)
        return f

    def when_ready(self) -> Deferred["Peer"]:
        """Fires with the peer once its sockets listen and its folder is indexed."""
        if self._ready is None:
            return fail(P2PError("the peer service has not been started"))
        d: Deferred[Peer] = Deferred()
        self._ready.addBoth(lambda r: (d.errback(r) if isinstance(r, Failure) else d.callback(r), r)[1])
        return d

    async def _start(self) -> "Peer":
        resolved = []
        for host, port in self.static_peers:  # datagrams go to IP addresses only
            resolved.append((await self.reactor.resolve(host), port))
        self.static_peers = resolved
        self.hood.static = resolved
        await self._listen()
        await self.shares.rescan()
        if self.tracker is not None:
            self.tracker.setServiceParent(self)
        self._rescan_loop.start(self._rescan_every, now=False)
        self._hello_loop.start(self._refresh, now=True)
        info = {"peer": self.peer_id, "udp": self.udp_port, "tcp": self.tcp_port, "pid": os.getpid()}
        (self.shares.state / "peer.json").write_text(json.dumps(info) + "\n")
        self.log.info("peer {peer} sharing {n} files from {root} on port {port}", peer=self.peer_id[:8],
                      n=len(self.shares.entries), root=self.shares.root, port=self.tcp_port)
        return self

    async def _listen(self) -> None:
        for attempt in range(20):
            tcp = await TCP4ServerEndpoint(self.reactor, self.port, interface=self.interface).listen(
                TransferFactory(self, self.idle))
            number = tcp.getHost().port
            try:
                udp = self.reactor.listenUDP(number, self.search_proto, interface=self.interface,
                                             maxPacketSize=MAX_DATAGRAM + 1)
            except CannotListenError:
                await tcp.stopListening()
                if self.port:
                    raise
                continue
            self._ports = [tcp, udp]
            self.tcp_port = self.udp_port = number
            return
        raise CannotListenError(self.interface, 0, "no port free for both TCP and UDP")

    def stopService(self) -> Deferred[Any]:
        for loop in (self._rescan_loop, self._hello_loop):
            if loop.running:
                loop.stop()
        for f in list(self._fetches.values()):
            self._finish(f, Failure(TransferFailed(f"{f.name}: the peer is shutting down")))
        for state in list(self._searches):
            self._end_search(state)
        closing = []
        for conn in list(self._connections):
            closing.append(conn.closed)
            conn.transport.abortConnection()
        d = super().stopService()
        ports, self._ports = self._ports, []
        stops = [d, *closing] + [p.stopListening() for p in ports]
        return DeferredList([x for x in stops if isinstance(x, Deferred)])

    def _rescan(self) -> None:
        self.shares.rescan().addErrback(lambda f: self.log.failure("rescanning the shared folder failed", f))

    # -- neighbours ---------------------------------------------------------------------

    @property
    def host_for_others(self) -> str:
        """Our host as others see it; empty means "the address my datagrams come from"."""
        if self.advertise:
            return self.advertise
        if self.tracker is not None and self.tracker.observed_host:
            return self.tracker.observed_host
        return ""

    def _registration(self) -> tuple[str, int, int, Optional[str]]:
        return self.peer_id, self.udp_port, self.tcp_port, self.advertise

    def _me(self) -> tuple[str, Address]:
        return self.peer_id, (self.host_for_others, self.tcp_port)

    def _set_tracker_peers(self, peers: list[PeerInfo]) -> None:
        fresh = [(p.host, p.udp) for p in peers if p.peer != self.peer_id]
        new = [a for a in fresh if a not in self.hood.tracker]
        self.hood.tracker = fresh
        self._say_hello(new)

    def _heard_from(self, addr: Address) -> None:
        self.hood.heard_from(addr, self.reactor.seconds())

    def _hello(self, hello: Hello, sender: Address) -> None:
        """A neighbour says hello: link back to it, and note the peers it knows."""
        self.counters.add("hellos_received")
        now = self.reactor.seconds()
        self.hood.heard_from(sender, now)
        self.hood.told_about(hello.peers, now)

    def _say_hello(self, to: Optional[list[Address]] = None) -> None:
        """Tell neighbours we exist (so they forward to us) and whom we know (peer exchange)."""
        now = self.reactor.seconds()
        for addr in self.neighbours() if to is None else to:
            hello = Hello(self.peer_id, self.hood.sample(8, self.rng, now, exclude=addr))
            self.search_proto.send_all(Reaction([(hello.encode(), addr)]))

    @property
    def _own_addresses(self) -> set[Address]:
        return {(self.host_for_others, self.udp_port), ("127.0.0.1", self.udp_port)}

    def neighbours(self) -> list[Address]:
        self.hood.own = self._own_addresses
        return self.hood.current(self.reactor.seconds(), tracker_up=bool(self.tracker and self.tracker.registered))

    # -- search -------------------------------------------------------------------------

    def _query(self, name: str, fetch: bool, on_hit: Callable[[Hit], None]) -> str:
        me = (self.host_for_others, self.udp_port), (self.host_for_others, self.tcp_port)
        rid, reaction = self.core.start_query(name, me[0], me[1], fetch, self.reactor.seconds(), on_hit)
        self.search_proto.send_all(reaction)
        return rid

    def search(self, name: str, timeout: float = 3.0) -> Deferred[list[Hit]]:
        """Ask the network who has *name*; fires after *timeout* with the hits, one per holder."""
        try:
            validate_name(name)
        except P2PError as e:
            return fail(e)
        state = _Search(name)
        self._searches.add(state)
        self._search_query(state)
        state.end = self.reactor.callLater(timeout, self._end_search, state)
        return state.done

    def _search_query(self, state: "_Search") -> None:
        """Query (again, with a new request ID, while nothing has answered)."""
        state.again = None
        if state.hits:
            return
        state.ids.append(self._query(state.name, False, lambda h: state.hits.setdefault((h.peer, h.sha256), h)))
        state.again = self.reactor.callLater(self.requery, self._search_query, state)

    def _end_search(self, state: "_Search") -> None:
        self._searches.discard(state)
        for call in (state.end, state.again):
            if call is not None and call.active():
                call.cancel()
        for rid in state.ids:
            self.core.finish_query(rid)
        state.done.callback(list(state.hits.values()))

    # -- fetch: the requester's side ----------------------------------------------------

    def fetch(self, name: str, timeout: float = 10.0,
              progress: Optional[Callable[[int, int], None]] = None) -> Deferred[FetchResult]:
        """Find *name*, download it from a holder, verify it and put it in the shared folder."""
        try:
            validate_name(name)
            if os.path.lexists(self.shares.root / name):
                raise AlreadyExists(f"{name} already exists in {self.shares.root}")
        except P2PError as e:
            return fail(e)
        f = self._fetches.get(name)
        if f is None:
            f = self._fetches[name] = _Fetch(name, timeout)
            self._fetch_query(f)
            f.timer = self.reactor.callLater(timeout, self._fetch_expired, f)
        if progress is not None:
            f.progress.append(progress)
        d: Deferred[FetchResult] = Deferred()
        f.waiters.append(d)
        return d

    def _fetch_query(self, f: _Fetch) -> None:
        """Query (again, with a new request ID, while no holder has answered)."""
        f.requery = None
        if f.hits or not f.active:
            return
        rid = self._query(f.name, True, lambda hit: self._fetch_hit(f, hit))
        f.ids.append(rid)
        self._by_id[rid] = f
        f.requery = self.reactor.callLater(self.requery, self._fetch_query, f)

    def _fetch_hit(self, f: _Fetch, hit: Hit) -> None:
        f.hits.append(hit)
        if f.download is None and f.dialing is None and f.dial_timer is None:
            f.dial_timer = self.reactor.callLater(self.dial_wait, self._dial_next, f)

    def _dial_next(self, f: _Fetch) -> None:
        """No holder has connected to us (we may be unreachable): connect to one ourselves."""
        f.dial_timer = None
        if f.download is not None or f.dialing is not None or not f.active:
            return
        hit = next((h for h in f.hits if h.tcp not in f.tried), None)
        if hit is None:
            if f.expired:
                self._give_up(f)
            return
        f.tried.add(hit.tcp)
        self.counters.add("dials_to_holders")
        greeting = Frame("open", id=hit.id, name=f.name, sha256=hit.sha256)
        proto = TransferProtocol(_Dialer(self, f, hit), greeting=greeting, idle=self.idle)
        f.dialing = proto
        endpoint = TCP4ClientEndpoint(self.reactor, hit.tcp[0], hit.tcp[1], timeout=10)

        def ended(result: Any) -> None:
            if f.dialing is proto:
                f.dialing = None
                if isinstance(result, Failure):
                    f.error = TransferFailed(f"{f.name}: could not connect to {hit.tcp[0]}:{hit.tcp[1]}")
                if f.download is None:
                    self._dial_next(f)

        dial(endpoint, proto).addCallbacks(lambda p: p.closed.addBoth(ended), ended)

    def _accept(self, f: _Fetch, frame: Frame, proto: TransferProtocol, dialled_by: str) -> Optional[Download]:
        if f.download is not None or not f.active:
            self.counters.add("offers_declined")
            return None
        download = Download(self.shares, f.name, frame.size, frame.sha256, f.report, in_thread(self.reactor))
        f.download = download
        if f.dial_timer is not None:
            f.dial_timer.cancel()
            f.dial_timer = None
        holder = proto.transport.getPeer()
        listening = next((h.tcp for h in f.hits if h.peer == frame.peer), (holder.host, holder.port))
        address = f"{listening[0]}:{listening[1]}"
        self.counters.add(f"downloads_dialled_by_{dialled_by}")

        def done(path: Path) -> None:
            result = FetchResult(f.name, str(path), frame.size, frame.sha256, address, frame.peer, dialled_by,
                                 round(time.monotonic() - f.started, 3))
            self.counters.add("downloads_completed")
            self.counters.add("bytes_received", frame.size)
            self._finish(f, result)

        def failed(failure: Failure) -> None:
            self.counters.add("downloads_failed")
            self.log.warn("download of {name} from {holder} failed: {error}", name=f.name, holder=address,
                          error=failure.value)
            f.download = None
            f.error = failure.value
            f.tried.add(listening)
            if f.dialing is proto:
                f.dialing = None
            if any(h.tcp not in f.tried for h in f.hits):
                self._dial_next(f)
            elif f.expired or not f.hits:
                self._give_up(f)

        download.done.addCallbacks(done, failed)
        return download

    def _fetch_expired(self, f: _Fetch) -> None:
        f.timer = None
        f.expired = True
        if f.download is None and f.dialing is None and f.dial_timer is None:
            self._give_up(f)

    def _give_up(self, f: _Fetch) -> None:
        if f.error is not None:
            error: BaseException = f.error
        elif f.hits:
            error = TransferFailed(f"{f.name}: {len(f.hits)} holder(s) answered but none delivered the file")
        else:
            error = NotFound(f"{f.name}: no peer answered within {f.timeout:g}s")
        self._finish(f, Failure(error))

    def _finish(self, f: _Fetch, result: Any) -> None:
        self._fetches.pop(f.name, None)
        f.active = False
        for rid in f.ids:
            self._by_id.pop(rid, None)
            self.core.finish_query(rid)
        for call in (f.timer, f.dial_timer, f.requery):
            if call is not None and call.active():
                call.cancel()
        f.timer = f.dial_timer = f.requery = None
        if f.download is not None and not f.download.done.called:
            f.download.fail(TransferFailed(f"{f.name}: cancelled"))
        waiters, f.waiters = f.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # -- ITransferNode: the holder's side and offers arriving -----------------------------

    def open_for_sending(self, frame: Frame) -> tuple[Entry, IO[bytes]]:
        entry, f = self.shares.open_for_reading(frame.name)
        if frame.sha256 and frame.sha256 != entry.sha256:
            f.close()
            raise NotFound(f"{frame.name!r} here has different content")
        self.counters.add("uploads_opened")
        return entry, f

    def accept_offer(self, frame: Frame, proto: TransferProtocol) -> Optional[Download]:
        f = self._by_id.get(frame.id)
        if f is None or frame.name != f.name:
            self.counters.add("offers_declined")
            return None
        return self._accept(f, frame, proto, "holder")

    def track(self, proto: TransferProtocol, alive: bool) -> None:
        (self._connections.add if alive else self._connections.discard)(proto)

    def _offer(self, q: Query, entry: Entry) -> None:
        """The original design: the holder connects to the requester and offers the file."""
        if self._offering >= MAX_OFFERS:
            self.counters.add("offers_skipped")
            return
        try:
            entry, f = self.shares.open_for_reading(entry.name)
        except (NotFound, OSError):
            return
        greeting = Frame("offer", id=q.id, name=entry.name, size=entry.size, sha256=entry.sha256,
                         peer=self.peer_id)
        proto = TransferProtocol(self, greeting=greeting, sending=(entry, f), idle=self.idle)
        self._offering += 1
        self.counters.add("offers_dialled")

        def ended(result: Any) -> None:
            self._offering -= 1
            if isinstance(result, Failure):
                f.close()
                self.log.debug("could not offer {name} to {addr}: {error}", name=entry.name, addr=q.tcp,
                               error=result.value)

        endpoint = TCP4ClientEndpoint(self.reactor, q.tcp[0], q.tcp[1], timeout=10)
        dial(endpoint, proto).addCallbacks(lambda p: p.closed.addBoth(ended), ended)

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "peer": self.peer_id,
            "host": self.host_for_others,
            "udp": self.udp_port,
            "tcp": self.tcp_port,
            "dir": str(self.shares.root),
            "tracker": {"connected": bool(self.tracker and self.tracker.registered)} if self.tracker else None,
            "neighbours": [list(a) for a in self.neighbours()],
            "files": len(self.shares.entries),
            "fetching": {name: {"received": f.download.received if f.download else 0,
                                "size": f.download.size if f.download else None} for name, f in self._fetches.items()},
            "counters": dict(sorted(self.counters.items())),
        }


def hit_json(hit: Hit) -> dict[str, Any]:
    return asdict(hit) | {"tcp": f"{hit.tcp[0]}:{hit.tcp[1]}"}
