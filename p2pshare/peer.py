"""The peer service: composes the shared folder, search, transfer and the tracker client.

``Peer.search`` and ``Peer.fetch`` are the library's verbs; the control API and
the CLI only call them.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import IO, Any, Callable, Optional

from attrs import asdict
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, TCP6ClientEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pshare.bandwidth import Limits
from p2pshare.download import Download
from p2pshare.errors import InvalidName, NotFound, P2PError
from p2pshare.fetch import Fetcher, FetchResult
from p2pshare.metrics import PeerMetrics
from p2pshare import lan as lan_module
from p2pshare.lan import LanDiscovery, LanDiscovery6
from p2pshare.neighbours import Neighbourhood
from p2pshare.ratelimit import Backoff, Counters
from p2pshare.reliable import Retransmitter
from p2pshare.search import DEFAULT_TTL, Reaction, SearchCore, SearchProtocol
from p2pshare.shares import Entry, Shares
from p2pshare.tracker import TrackerClient
from p2pshare.transfer import IDLE_TIMEOUT, ITransferNode, TransferFactory, TransferProtocol, dial, offer_for
from p2pshare.wire import (MAX_DATAGRAM, Address, Frame, Hello, Hit, PeerInfo, Query, is_ip, is_ipv6, is_sha256,
                           plain_host, validate_name)

MAX_OFFERS = 16  # connections a holder opens to requesters at once
SUSPECT_EVERY = 60.0  # seconds between re-hashes of one file that requesters say does not match


class _Search:
    def __init__(self, name: str, sha256: str) -> None:
        self.name, self.sha256 = name, sha256
        self.ids: list[str] = []
        self.hits: dict[tuple[str, str], Hit] = {}
        self.done: Deferred[list[Hit]] = Deferred()
        self.end: Optional[IDelayedCall] = None
        self.again: Optional[IDelayedCall] = None
        self.started = self.deadline = 0.0


@implementer(ITransferNode)
class Peer(MultiService):
    """A p2pshare peer sharing *directory*; start it as a service, then await ``when_ready()``."""

    log = Logger()

    def __init__(self, directory: str | Path, tracker: Optional[IStreamClientEndpoint] = None, port: int = 0,
                 interface: str = "0.0.0.0", advertise: Optional[str] = None, peers: tuple[Address, ...] = (),
                 want: int = 4, refresh: float = 30.0, rescan: float = 30.0, ttl: int = DEFAULT_TTL,
                 dial_wait: float = 0.5, idle: float = IDLE_TIMEOUT, requery: float = 3.0,
                 reactor: Any = None, key: Any = None, only_placed: bool = False, max_upload_rate: int = 0,
                 max_download_rate: int = 0, lan: bool = False, lan_group: str = lan_module.GROUP,
                 lan_port: int = lan_module.PORT) -> None:
        """*key*, a ``netkey.NetworkKey``, makes the peer a member of that private network only.
        With *only_placed*, the peer shares only the files it downloads, none of the folder's others.
        *max_upload_rate* and *max_download_rate* (bytes a second, 0 for none) limit the file
        transfers of the whole peer; ``limits`` changes them while it runs.  With *lan*, the peer
        announces itself on the local link and takes the peers it hears there as neighbours
        (``lan.py``); never on a loopback *interface*."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.key = key
        self.tls: Any = None  # netkey.NetworkTLS: this process's certificate in the private network
        seal = None
        self.shares = Shares(directory, reactor=reactor, only_placed=only_placed)
        self.peer_id = self._load_peer_id()
        self.port, self.interface, self.advertise = port, interface, advertise
        self.static_peers = list(peers)
        self.dial_wait, self.idle, self.requery, self.want = dial_wait, idle, requery, want
        self.counters = Counters()
        self.limits = Limits(reactor, max_upload_rate, max_download_rate)
        self.metrics = PeerMetrics(self)  # its own registry: several peers in one process stay apart
        if key is not None:
            from p2pshare.netkey import DatagramSeal, NetworkTLS, reporter
            from p2pshare.ratelimit import RateLimitedLog

            self.tls, seal = NetworkTLS.for_key(key), DatagramSeal(key)
            tls_log = RateLimitedLog(self.log, reactor, burst=1)  # once a minute per source, however many
            self._outsider = reporter(self.counters, "outsider_connections", tls_log,
                                      "refused a transfer connection from {host}: it did not prove it holds "
                                      "this network's key ({why})")
            self._dial_failed = reporter(self.counters, "tls_dial_failures", tls_log,
                                         "a transfer connection to {host} failed its TLS handshake ({why}); does "
                                         "that peer run with the same --key?")
        self.udp_port = self.tcp_port = 0
        self.hood = Neighbourhood(expire_after=refresh * 3)
        self.lan: Optional[LanDiscovery] = None  # IPv4: on 0.0.0.0, ::, or an IPv4 LAN address
        self.lan6: Optional[LanDiscovery6] = None  # IPv6: on :: or an IPv6 address
        if lan and not lan_module.is_loopback(interface) and interface != "::1":
            announce = (self.peer_id, lambda: self.udp_port, self._found_on_lan, reactor, self.counters)
            if not is_ipv6(interface) or interface == "::":
                self.lan = LanDiscovery(*announce, seal=seal, group=lan_group, port=lan_port,
                                        interface="" if interface in ("0.0.0.0", "", "::") else interface)
            if is_ipv6(interface) and lan_module.ipv6_multicast():
                self.lan6 = LanDiscovery6(*announce, seal=seal, port=lan_port)
        self.rng = random.SystemRandom()
        self.core = SearchCore(self.shares.lookup, self.neighbours, self._me, self.counters, max_ttl=ttl,
                               retransmitter=Retransmitter(self.counters, on_give_up=self._unanswered),
                               partial=self._partial_entry, trusted=self._trusted)
        self.search_proto = SearchProtocol(self.core, reactor, self._offer, self._heard_from, self._hello, seal)
        # One byte more than the longest acceptable datagram (sealed, in a private network): longer ones were cut.
        self._read_size = (MAX_DATAGRAM if seal is None else seal.max_sealed) + 1
        self.tracker: Optional[TrackerClient] = None
        if tracker is not None:
            self.tracker = TrackerClient(tracker, reactor, self._registration, self._set_tracker_peers, 2 * want,
                                         refresh, key=key)
        self._rescan_loop = LoopingCall(self._rescan)
        self._rescan_loop.clock = reactor
        self._hello_loop = LoopingCall(self._say_hello)
        self._hello_loop.clock = reactor
        self._refresh = refresh
        self._rescan_every = rescan
        self._ports: list[IListeningPort] = []
        self.fetcher = Fetcher(self)
        self.seeds: dict[str, Any] = {}  # content -> transfer.SuperSeed, while several requesters fetch it from us
        self._searches: set[_Search] = set()
        self._connections: set[TransferProtocol] = set()
        self._offering = 0
        self._dial_backoff = Backoff(base=1.0, cap=300.0)
        self._suspects = Backoff(base=SUSPECT_EVERY, cap=SUSPECT_EVERY)
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
        self.log.error("the peer could not start: {error}", error=f.getErrorMessage())
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
            resolved.append((plain_host(host) if is_ip(host) else await self.reactor.resolve(host), port))
        if self.advertise and not is_ip(self.advertise):
            self.advertise = await self.reactor.resolve(self.advertise)
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
            endpoint = (TCP6ServerEndpoint if is_ipv6(self.interface) else TCP4ServerEndpoint)(
                self.reactor, self.port, interface=self.interface)
            tcp = await endpoint.listen(self.transfer_factory())
            number = tcp.getHost().port
            try:
                udp = self.reactor.listenUDP(number, self.search_proto, interface=self.interface,
                                             maxPacketSize=self._read_size)
            except CannotListenError:
                await tcp.stopListening()
                if self.port:
                    raise
                continue
            self.search_proto.dual_stack = is_ipv6(self.interface)
            self._ports = [tcp, udp]
            self.tcp_port = self.udp_port = number
            # Several peers on one machine share the group's port (SO_REUSEADDR / SO_REUSEPORT).
            if self.lan is not None:
                self._ports.append(self.reactor.listenMulticast(self.lan.port, self.lan, listenMultiple=True))
            if self.lan6 is not None:
                self._ports.append(self.reactor.listenMulticast(self.lan6.port, self.lan6, interface="::",
                                                                listenMultiple=True))
            return
        raise CannotListenError(self.interface, 0, "no port free for both TCP and UDP")

    def transfer_factory(self) -> Any:
        """The factory for incoming transfer connections (behind TLS in a private network)."""
        factory = TransferFactory(self, self.idle, self.reactor)
        if self.tls is None:
            return factory
        return self.tls.server(factory, self._outsider)

    def endpoint_to(self, address: Address) -> IStreamClientEndpoint:
        """The endpoint for a transfer connection to another peer's TCP *address* (TLS in a private network)."""
        kind = TCP6ClientEndpoint if is_ipv6(address[0]) else TCP4ClientEndpoint
        endpoint = kind(self.reactor, address[0], address[1], timeout=10)
        if self.tls is None:
            return endpoint
        return self.tls.client(endpoint, self._dial_failed, self.reactor)

    def stopService(self) -> Deferred[Any]:
        for loop in (self._rescan_loop, self._hello_loop):
            if loop.running:
                loop.stop()
        settling = self.fetcher.stop()
        for state in list(self._searches):
            self._end_search(state)
        closing = []
        for conn in list(self._connections):
            closing.append(conn.closed)
            conn.transport.abortConnection()
        d = super().stopService()
        ports, self._ports = self._ports, []
        stops = [d, settling, *closing] + [p.stopListening() for p in ports]
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
        self.hood.set_own(self._own_addresses)
        fresh = [(p.host, p.udp) for p in peers if p.peer != self.peer_id]
        self._say_hello(self.hood.refresh_tracker(fresh, self.want))

    def _found_on_lan(self, addr: Address) -> None:
        self.hood.set_own(self._own_addresses)
        if self.hood.found_on_lan(addr, self.reactor.seconds()):
            self._say_hello([addr])  # so that it forwards to us at once, without waiting for our announcement

    def _unanswered(self, kind: str, request_id: str, dest: Address) -> None:
        """A neighbour acknowledged nothing through every retry: stop counting on what we learned of it."""
        self.hood.forget(dest)

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
        try:
            now = self.reactor.seconds()
            if to is None:
                self.neighbours()  # refreshes our own addresses
                to = self.hood.chosen(now, tracker_up=self._tracker_up)
            for addr in to:
                hello = Hello(self.peer_id, self.hood.sample(8, self.rng, now, exclude=addr))
                self.search_proto.send_all(Reaction([(hello.encode(), addr)]))
        except Exception:  # a LoopingCall stops for good on an exception
            self.log.failure("sending hellos failed")

    @property
    def _own_addresses(self) -> set[Address]:
        return {(self.host_for_others, self.udp_port), ("127.0.0.1", self.udp_port), ("::1", self.udp_port)}

    def neighbours(self) -> list[Address]:
        self.hood.set_own(self._own_addresses)
        return self.hood.current(self.reactor.seconds(), tracker_up=self._tracker_up)

    @property
    def _tracker_up(self) -> bool:
        return bool(self.tracker and self.tracker.registered)

    # -- search -------------------------------------------------------------------------

    def query(self, name: str, fetch: bool, on_hit: Callable[[Hit], None], sha256: str = "") -> str:
        """Send a query for *name* (or content *sha256*) to the neighbours; *on_hit* gets each hit.
        Returns its request ID, for ``finish_query``."""
        me = (self.host_for_others, self.udp_port), (self.host_for_others, self.tcp_port)
        rid, reaction = self.core.start_query(name, me[0], me[1], fetch, self.reactor.seconds(), on_hit,
                                              sha256=sha256)
        self.search_proto.send_all(reaction)
        return rid

    def finish_query(self, request_id: str) -> None:
        """Stop retransmitting a query and forget it: its hits are no longer wanted."""
        self.core.finish_query(request_id)

    def search(self, name: str = "", timeout: float = 3.0, sha256: str = "") -> Deferred[list[Hit]]:
        """Ask the network who has *name* (or content *sha256*); fires after *timeout* with the hits.

        One hit per holder and content: two different files of one name are both listed.
        """
        try:
            if name or not sha256:
                validate_name(name)
            if sha256 and not is_sha256(sha256):
                raise InvalidName(f"{sha256!r} is not a SHA-256 in hex")
        except P2PError as e:
            return fail(e)
        state = _Search(name, sha256)
        state.started = self.reactor.seconds()
        state.deadline = state.started + timeout
        self._searches.add(state)
        self._search_query(state)
        state.end = self.reactor.callLater(timeout, self._end_search, state)
        return state.done

    def _search_query(self, state: "_Search") -> None:
        """Query (again, with a new request ID, while nothing has answered)."""
        state.again = None
        if state.hits:
            return
        state.ids.append(self.query(state.name, False, lambda h: self._search_hit(state, h), state.sha256))
        if self.reactor.seconds() + self.requery < state.deadline:
            state.again = self.reactor.callLater(self.requery, self._search_query, state)

    def _search_hit(self, state: "_Search", hit: Hit) -> None:
        if not state.hits:
            self.metrics.first_hit.observe("search", self.reactor.seconds() - state.started)
        state.hits.setdefault((hit.peer, hit.sha256), hit)

    def _end_search(self, state: "_Search") -> None:
        self._searches.discard(state)
        for call in (state.end, state.again):
            if call is not None and call.active():
                call.cancel()
        for rid in state.ids:
            self.core.finish_query(rid)
        state.done.callback(list(state.hits.values()))

    # -- fetch: the requester's side ----------------------------------------------------

    def fetch(self, name: str = "", timeout: float = 10.0, progress: Optional[Callable[[int, int], None]] = None,
              sha256: str = "") -> Deferred[FetchResult]:
        """Find *name* (or content *sha256*, or that content under that name), download it from a
        holder, verify it and put it in the shared folder.

        Asked by name alone, a fetch fails with AmbiguousName when holders answer with
        different contents, rather than guess.  Cancelling the Deferred withdraws this caller;
        when no other caller waits for the same fetch, it stops, keeping the verified pieces.
        """
        return self.fetcher.fetch(name, timeout, progress, sha256)

    # -- ITransferNode: the holder's side and offers arriving -----------------------------

    def open_for_sending(self, frame: Frame) -> tuple[Entry, IO[bytes], Optional[Download]]:
        try:
            entry, f = self.shares.open_for_reading(frame.name)
        except NotFound:
            download = self.fetcher.serving(frame.name, frame.sha256)
            if download is None:
                raise
            f = open(download.tmp_path, "rb")  # its verified pieces only: see TransferProtocol._on_get
            self.counters.add("uploads_opened_partial")
            return download.entry(), f, download
        if frame.sha256 and frame.sha256 != entry.sha256:
            f.close()
            raise NotFound(f"{frame.name!r} here has different content")
        self.counters.add("uploads_opened")
        return entry, f, None

    def _trusted(self, addr: Address) -> bool:
        """Addresses proven without us: the tracker saw them over TCP; static ones, the operator gave."""
        return addr in self.hood.tracker or addr in self.hood.static

    def _partial_entry(self, name: str, sha256: str) -> Optional[Entry]:
        """A file we are downloading and can serve part of, for the search (a hit that still forwards)."""
        download = self.fetcher.serving(name, sha256)
        return download.entry() if download is not None else None

    def sent(self, nbytes: int) -> None:
        self.counters.add("bytes_sent", nbytes)

    def suspect(self, entry: Entry) -> None:
        """A requester found a piece of *entry* that does not match: hash the file again (at most
        once a SUSPECT_EVERY per file, so requesters cannot keep us hashing)."""
        now = self.reactor.seconds()
        indexed = self.shares.entries.get(entry.name)
        if indexed is None or indexed.sha256 != entry.sha256 or not self._suspects.allowed(entry.name, now):
            return
        self._suspects.failed(entry.name, now)
        self.counters.add("files_rechecked")
        self.log.warn("a requester found pieces of {name} that do not match its index; hashing it again",
                      name=entry.name)
        self.shares.suspect(entry.name).addErrback(
            lambda f: self.log.failure("re-indexing {name} failed", f, name=entry.name))

    def accept_offer(self, frame: Frame, proto: TransferProtocol) -> Optional[Download]:
        return self.fetcher.accept_offer(frame, proto)

    def track(self, proto: TransferProtocol, alive: bool) -> None:
        (self._connections.add if alive else self._connections.discard)(proto)

    def _offer(self, q: Query, entry: Entry) -> None:
        """The original design: the holder connects to the requester and offers the file."""
        if self._offering >= MAX_OFFERS:
            self.counters.add("offers_skipped")
            return
        target = q.tcp
        if not self._dial_backoff.allowed(target, self.reactor.seconds()):
            # Dials to this address failed before: it may not be a peer at all (a forged requester
            # address). The requester can still dial us after our hit.
            self.counters.add("offers_backed_off")
            return
        try:
            entry, f = self.shares.open_for_reading(entry.name)
        except (NotFound, OSError):
            return
        greeting = offer_for(entry, q.id, self.peer_id)
        proto = TransferProtocol(self, greeting=greeting, sending=(entry, f), idle=self.idle, clock=self.reactor)
        self._offering += 1
        self.counters.add("offers_dialled")

        def ended(result: Any) -> None:
            self._offering -= 1
            if isinstance(result, Failure) or not proto.answered:
                self._dial_backoff.failed(target, self.reactor.seconds())
            else:
                self._dial_backoff.succeeded(target)
            if isinstance(result, Failure):
                f.close()
                self.log.debug("could not offer {name} to {addr}: {error}", name=entry.name, addr=q.tcp,
                               error=result.value)

        dial(self.endpoint_to(q.tcp), proto).addCallbacks(lambda p: p.closed.addBoth(ended), ended)

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
            "files_version": self.shares.generation,  # changes whenever the list of shared files does
            "fetching": self.fetcher.status(),
            "fetched": list(reversed(self.fetcher.history)),  # the latest first
            "limits": self.limits.status(),  # bytes a second, 0 for none
            "counters": dict(sorted(self.counters.items())),
        }


def hit_json(hit: Hit) -> dict[str, Any]:
    return asdict(hit) | {"tcp": f"{hit.tcp[0]}:{hit.tcp[1]}"}
