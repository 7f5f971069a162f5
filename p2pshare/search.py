"""Search over UDP: flood a query to neighbours, drop duplicates by request ID, answer hits.

``SearchCore`` decides (pure: the clock reading is an argument); the
``SearchProtocol`` only decodes, counts, sends what the core returns and wakes
the core when a retransmission is due.  Queries and hits travel hop by hop
with acknowledgements (see reliable.py); acks and hellos are sent once.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Optional

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from p2pshare.errors import MalformedMessage, MessageTooLarge, UnsupportedVersion
from p2pshare.ratelimit import Counters, RateLimitedLog, TokenBuckets, touch
from p2pshare.reliable import Retransmitter
from p2pshare.shares import Entry
from p2pshare.wire import (MAX_DATAGRAM, MIN_QUERY, Ack, Address, Hello, Hit, Query, decode_datagram, mapped,
                           plain_host)

if TYPE_CHECKING:
    from p2pshare.netkey import DatagramSeal

_QUERY_PREFIX = b'{"v":1,"t":"query","id":"'
_HEX32 = re.compile(rb"[0-9a-f]{32}")
_ACK = re.compile(rb'\{"v":1,"t":"ack","id":"([0-9a-f]{32})","kind":"(query|hit)"\}')

DEFAULT_TTL = 7
DATAGRAMS_PER_SOURCE = 1000  # a second, from one IP address (bursts of twice as many)  # hops a query may travel; larger values on the wire are clamped to this


def new_request_id() -> str:
    """128 random bits, hex."""
    return os.urandom(16).hex()


@define
class DedupCache:
    """Request IDs seen recently: bounded in entries and in age, so memory stays flat."""

    max_entries: int = 65536
    max_age: float = 120.0
    _seen: OrderedDict[str, float] = field(factory=OrderedDict)

    def seen_recently(self, key: str, now: float) -> bool:
        when = self._seen.get(key)
        return when is not None and when > now - self.max_age

    def add(self, key: str, now: float) -> bool:
        """Remember *key*; True if it was not already remembered (the first sighting)."""
        while self._seen:
            oldest, when = next(iter(self._seen.items()))
            if when > now - self.max_age and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]
        if key in self._seen:
            return False
        self._seen[key] = now
        return True

    def __len__(self) -> int:
        return len(self._seen)


MAX_BUDGETS = 4096  # addresses whose return budget is kept (most recent first)
HEADERS = 28  # IPv4 and UDP header bytes of a datagram: counted both ways, so the bound holds on the wire


@define
class ReturnBudget:
    """No amplification: to an address that has not proven it receives our datagrams, send at most
    the bytes it sent us.

    An address proves itself by acknowledging a datagram we sent it: the ack names a 128-bit
    request ID that only that datagram carried.  Until then each datagram from it is credit,
    and each ack or hit to it spends some.  Queries pad themselves (``wire.MIN_QUERY``) so that
    one buys its ack and a hit.  Queries and hellos, which go only to neighbours, are not limited.
    """

    max_addresses: int = MAX_BUDGETS
    overhead: int = HEADERS  # bytes a datagram takes on the wire beyond its payload
    _credit: OrderedDict[Address, int] = field(factory=OrderedDict)
    _proven: OrderedDict[Address, None] = field(factory=OrderedDict)

    def received(self, addr: Address, nbytes: int) -> None:
        if addr not in self._proven:
            touch(self._credit, addr, self._credit.get(addr, 0) + nbytes + self.overhead, self.max_addresses)

    def prove(self, addr: Address) -> None:
        touch(self._proven, addr, None, self.max_addresses)
        self._credit.pop(addr, None)

    def spend(self, addr: Address, nbytes: int) -> bool:
        """May *nbytes* go to *addr*?  If so, they are spent."""
        if addr in self._proven:
            return True
        credit = self._credit.get(addr, 0)
        if credit < nbytes + self.overhead:
            return False
        self._credit[addr] = credit - nbytes - self.overhead
        return True


@define
class _Flood:
    """What this peer did with one request ID: whom it sent copies to, copies received per sender,
    and where the first copy came from (where hits go back when the requester is unproven)."""

    sent_to: set[Address] = field(factory=set)
    copies: dict[Address, int] = field(factory=dict)
    came_from: Optional[Address] = None


MAX_FLOODS = 4096  # request IDs whose flood state is kept (most recent first)


@define
class Reaction:
    """What the core wants done with one datagram.

    ``sends`` go once; ``tracked`` are (kind, request id, payload, destination)
    and are resent until acknowledged.
    """

    sends: list[tuple[bytes, Address]] = field(factory=list)
    tracked: list[tuple[str, str, bytes, Address]] = field(factory=list)
    offer: Optional[tuple[Query, Entry]] = None


@define
class SearchCore:
    """Flood logic for one peer.

    *lookup* finds a shared file by name and, when given, content hash; *partial* finds a file
    being downloaded whose verified pieces we serve (a hit, but the query goes on, to reach
    holders of the whole file); *neighbours* lists UDP addresses to
    forward to; *me* gives this peer's id and TCP address for hits (an empty
    host means "wherever my datagram came from").
    """

    lookup: Callable[[str, str], Optional[Entry]]
    neighbours: Callable[[], list[Address]]
    me: Callable[[], tuple[str, Address]]
    counters: Counters = field(factory=Counters)
    seen: DedupCache = field(factory=DedupCache)
    max_ttl: int = DEFAULT_TTL
    waiting: dict[str, Callable[[Hit], None]] = field(factory=dict)
    retransmitter: Retransmitter = field(default=None)
    partial: Callable[[str, str], Optional[Entry]] = lambda name, sha256: None
    budget: ReturnBudget = field(factory=ReturnBudget)
    trusted: Optional[Callable[[Address], bool]] = None  # addresses proven otherwise (default: our neighbours)
    _floods: OrderedDict[str, _Flood] = field(factory=OrderedDict)

    def __attrs_post_init__(self) -> None:
        if self.retransmitter is None:
            self.retransmitter = Retransmitter(self.counters)

    def start_query(self, name: str, udp: Address, tcp: Address, fetch: bool, now: float,
                    on_hit: Callable[[Hit], None], request_id: Optional[str] = None,
                    sha256: str = "") -> tuple[str, Reaction]:
        """Begin a search of our own: returns its request ID and the datagrams to send."""
        rid = request_id or new_request_id()
        self.seen.add(rid, now)  # our own query coming back is a duplicate
        self.waiting[rid] = on_hit
        q = Query(rid, name, udp, tcp, self.max_ttl, 0, fetch, sha256)
        payload = q.encode()
        self.counters.add("queries_started")
        targets = self.neighbours()
        self._flood(rid).sent_to.update(targets)
        return rid, Reaction(tracked=[("query", rid, payload, n) for n in targets])

    def _flood(self, request_id: str) -> _Flood:
        state = self._floods.get(request_id)
        if state is None:
            state = self._floods[request_id] = _Flood()
            while len(self._floods) > MAX_FLOODS:
                self._floods.popitem(last=False)
        return state

    def finish_query(self, request_id: str) -> None:
        """Stop listening for hits to *request_id* (later ones count as unknown) and resending it."""
        self.waiting.pop(request_id, None)
        self.retransmitter.forget(request_id)

    def _may_send(self, dest: Address, nbytes: int) -> bool:
        """May an ack or a hit of *nbytes* go to *dest*? (Spends its return budget if it is not trusted.)"""
        trusted = self.trusted(dest) if self.trusted is not None else dest in self.neighbours()
        return trusted or self.budget.spend(dest, nbytes)

    def _affordable(self, sends: list[tuple[bytes, Address]]) -> list[tuple[bytes, Address]]:
        """The acks among *sends* that the return budget allows (the others are counted and dropped)."""
        allowed = [(payload, dest) for payload, dest in sends if self._may_send(dest, len(payload))]
        if len(allowed) < len(sends):
            self.counters.add("dropped_unproven", len(sends) - len(allowed))
        return allowed

    def _hit_to(self, q: Query, hit: Hit, sender: Address) -> list[tuple[str, str, bytes, Address]]:
        """A hit goes to the requester if its budget allows, else back to the neighbour the query
        came from (which passes it on, section 3.10 of protocol.md), else nowhere."""
        payload = hit.encode()
        for dest in (q.udp, sender):
            if self._may_send(dest, len(payload)):
                if dest != q.udp:
                    self.counters.add("hits_sent_back")
                return [("hit", q.id, payload, dest)]
        self.counters.add("dropped_unproven")
        return []

    def on_query(self, q: Query, sender: Address, now: float, size: Optional[int] = None) -> Reaction:
        """A query of *size* bytes (default: as we would encode it) from *sender*."""
        self.budget.received(sender, len(q.encode()) if size is None else size)
        ack = [(Ack(q.id, "query").encode(), sender)]
        q = q.with_sender(sender[0])
        if not self.seen.add(q.id, now):
            self.counters.add("dropped_duplicate")
            return Reaction(self._affordable(self._ack_duplicate(q.id, sender, now)))
        self.counters.add("queries_received")
        ack = self._affordable(ack)
        entry = self.lookup(q.name, q.sha256)
        if entry is not None:
            peer, tcp = self.me()
            hit = Hit(q.id, entry.name, entry.size, entry.sha256, tcp, peer, min(q.hops + 1, 255))
            self.counters.add("hits_sent")
            return Reaction(ack, self._hit_to(q, hit, sender), (q, entry) if q.fetch else None)
        hits = []
        partial = self.partial(q.name, q.sha256)
        if partial is not None:
            peer, tcp = self.me()
            hit = Hit(q.id, partial.name, partial.size, partial.sha256, tcp, peer, min(q.hops + 1, 255))
            self.counters.add("hits_sent_partial")
            hits = self._hit_to(q, hit, sender)
        ttl = min(q.ttl, self.max_ttl)
        if ttl <= 0:
            self.counters.add("dropped_expired")
            return Reaction(ack, hits)
        fwd = q.encode(ttl=ttl - 1, hops=min(q.hops + 1, 255))  # what forwarded(ttl) encodes, unvalidated
        targets = [n for n in self.neighbours() if n != sender and n != q.udp]
        self.counters.add("queries_forwarded", len(targets))
        flood = self._flood(q.id)
        flood.sent_to.update(targets)
        flood.copies[sender] = 1
        flood.came_from = sender
        return Reaction(ack, hits + [("query", q.id, fwd, n) for n in targets])

    def on_duplicate(self, request_id: str, sender: Address, now: float, size: int = MIN_QUERY) -> Reaction:
        """A further copy of a query already processed, recognised without decoding it all."""
        self.budget.received(sender, size)
        self.counters.add("dropped_duplicate")
        return Reaction(self._affordable(self._ack_duplicate(request_id, sender, now)))

    def _ack_duplicate(self, request_id: str, sender: Address, now: float) -> list[tuple[bytes, Address]]:
        """A copy from *sender*: proof that it has the query, and maybe a reason to acknowledge.

        When we sent *sender* a copy too, that copy is its acknowledgement (an
        implicit ack), so no ``ack`` datagram is needed, unless *sender* sends
        again: then our copy was lost and an explicit ack is due.
        """
        if self.retransmitter.ack("query", request_id, sender, now, implicit=True):
            self.counters.add("acks_implicit")
        flood = self._floods.get(request_id)
        if flood is not None:
            flood.copies[sender] = copies = flood.copies.get(sender, 0) + 1
            if sender in flood.sent_to and copies == 1:
                return []
        return [(Ack(request_id, "query").encode(), sender)]

    def on_hit(self, hit: Hit, sender: Address, now: float, size: Optional[int] = None) -> Reaction:
        """Deliver a hit to the search that asked (each holder once), or pass on one that came back
        along the query's path; acknowledge it either way."""
        self.budget.received(sender, len(hit.encode()) if size is None else size)
        ack = Reaction(self._affordable([(Ack(hit.id, "hit").encode(), sender)]))
        handler = self.waiting.get(hit.id)
        flood = self._floods.get(hit.id)
        if handler is None and (flood is None or flood.came_from in (None, sender)):
            self.counters.add("dropped_unknown_hit")
            return ack
        if not self.seen.add(f"hit:{hit.id}:{hit.peer}", now):
            self.counters.add("dropped_duplicate_hit")
            return ack
        if handler is None:  # sent back to us: on towards the requester, as far as budgets allow
            assert flood is not None and flood.came_from is not None
            payload = hit.encode()
            if self._may_send(flood.came_from, len(payload)):
                self.counters.add("hits_passed_back")
                ack.tracked.append(("hit", hit.id, payload, flood.came_from))
            else:
                self.counters.add("dropped_unproven")
            return ack
        self.counters.add("hits_received")
        handler(hit)
        return ack

    def on_ack(self, kind: str, request_id: str, sender: Address, now: float) -> None:
        """An ack: *sender* received a datagram only it could have read, so it has proven its address."""
        if self.retransmitter.ack(kind, request_id, sender, now):
            self.budget.prove(sender)

    def due(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams to send again; hits only as far as the return budget allows."""
        resend = []
        for kind, payload, dest in self.retransmitter.due(now):
            if kind == "hit" and not self._may_send(dest, len(payload)):
                self.counters.add("dropped_unproven")
                continue
            resend.append((payload, dest))
        return resend


class SearchProtocol(DatagramProtocol):
    """The UDP socket: decode, count, hand to the core, send what it returns, resend when due."""

    log = Logger()
    noisy = False

    def __init__(self, core: SearchCore, clock: IReactorTime,
                 on_offer: Callable[[Query, Entry], None] = lambda q, e: None,
                 on_sender: Callable[[Address], None] = lambda a: None,
                 on_hello: Callable[[Hello, Address], None] = lambda h, a: None,
                 seal: Optional["DatagramSeal"] = None) -> None:
        self.core = core
        self.dual_stack = False  # set when the port is an IPv6 socket (IPv4 peers reach it as ::ffff:a.b.c.d)
        self.seal = seal  # a private network's: every datagram sealed on the way out, opened first on the way in
        if seal is not None:
            core.budget.overhead = HEADERS + seal.max_sealed - MAX_DATAGRAM  # sealing adds as much to each
        self.clock = clock
        self.on_offer = on_offer
        self.on_sender = on_sender
        self.on_hello = on_hello
        self.bad_input = RateLimitedLog(self.log, clock)
        self.outsiders = RateLimitedLog(self.log, clock, burst=1)  # once a minute per source, however many
        self.limit = TokenBuckets(rate=DATAGRAMS_PER_SOURCE, burst=2 * DATAGRAMS_PER_SOURCE)
        self._timer: Optional[IDelayedCall] = None

    @property
    def counters(self) -> Counters:
        return self.core.counters

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if self.dual_stack:
            addr = (plain_host(addr[0]), addr[1])  # an IPv4 sender reaches an IPv6 socket as ::ffff:a.b.c.d
        if not self.limit.allow(addr[0], self.clock.seconds()):
            self.counters.add("dropped_rate_limited")
            self.bad_input.warn(addr[0], "dropping datagrams from {host}: more than {rate} a second",
                                host=addr[0], rate=DATAGRAMS_PER_SOURCE)
            return
        if self.seal is not None:
            opened = self._open(data, addr)
            if opened is None:
                return
            data = opened
        if self._fast_path(data, addr):
            return
        try:
            if len(data) > MAX_DATAGRAM:  # the port reads MAX_DATAGRAM + 1: anything longer was cut
                raise MessageTooLarge(f"datagram longer than {MAX_DATAGRAM} bytes")
            msg = decode_datagram(data)
        except MalformedMessage as e:
            kind = ("oversized" if isinstance(e, MessageTooLarge)
                    else "unsupported_version" if isinstance(e, UnsupportedVersion) else "malformed")
            self.counters.add(f"dropped_{kind}")
            self.bad_input.warn(addr[0], "dropped {kind} datagram from {addr}: {error}", kind=kind, addr=addr,
                                error=e)
            return
        now = self.clock.seconds()
        if isinstance(msg, Ack):
            self.core.on_ack(msg.kind, msg.id, addr, now)
        elif isinstance(msg, Hello):
            self.on_hello(msg, addr)
        elif isinstance(msg, Hit):
            self.send_all(self.core.on_hit(msg.with_sender(addr[0]), addr, now, len(data)))
        else:
            self.on_sender(addr)
            reaction = self.core.on_query(msg, addr, now, len(data))
            self.send_all(reaction)
            if reaction.offer is not None:
                self.on_offer(*reaction.offer)

    def _open(self, data: bytes, addr: Address) -> Optional[bytes]:
        """The datagram inside a sealed one, or None (counted, logged at a bounded rate) if it is not ours."""
        assert self.seal is not None
        if len(data) > self.seal.max_sealed:  # the port reads one byte more: anything longer was cut
            self.counters.add("dropped_oversized")
            self.bad_input.warn(addr[0], "dropped oversized datagram from {addr}", addr=addr)
            return None
        try:
            return self.seal.open(data, self.clock.seconds())
        except MalformedMessage as e:  # netkey.SealError: its class names the counter
            self.counters.add(getattr(e, "counter", "outsider_datagrams"))
            self.outsiders.warn(addr[0], "dropped a datagram from {addr}: not from this private network ({error})",
                                addr=addr, error=e)
            return None

    def _fast_path(self, data: bytes, addr: Address) -> bool:
        """Most datagrams of a flood are acks and copies of queries already processed.

        Both are recognised from their fixed leading bytes (as this implementation
        encodes them; anything else takes the full decoder) and handled without
        parsing the rest: a copy only needs its request ID, an ack is all ID.
        """
        if len(data) > MAX_DATAGRAM:
            return False  # the full path counts and drops it
        if data.startswith(_QUERY_PREFIX):
            request_id = data[len(_QUERY_PREFIX): len(_QUERY_PREFIX) + 32]
            if not _HEX32.fullmatch(request_id):
                return False
            rid = request_id.decode()
            now = self.clock.seconds()
            if not self.core.seen.seen_recently(rid, now):
                return False
            self.on_sender(addr)
            self.send_all(self.core.on_duplicate(rid, addr, now, len(data)))
            return True
        match = _ACK.fullmatch(data)
        if match is None:
            return False
        self.core.on_ack(match[2].decode(), match[1].decode(), addr, self.clock.seconds())
        return True

    def send_all(self, reaction: Reaction) -> None:
        now = self.clock.seconds()
        for payload, dest in reaction.sends:
            self._send(payload, dest)
        for kind, rid, payload, dest in reaction.tracked:
            if self._send(payload, dest):
                self.core.retransmitter.track(kind, rid, payload, dest, now)
        if reaction.tracked:  # nothing else can bring the next deadline forward
            self._schedule()

    def _send(self, payload: bytes, dest: Address) -> bool:
        if self.transport is None:
            return False
        if len(payload) > MAX_DATAGRAM:  # receivers would drop it
            self.counters.add("send_oversized")
            return False
        if self.dual_stack and ":" not in dest[0]:
            dest = (mapped(dest[0]), dest[1])
        try:
            self.transport.write(payload if self.seal is None else self.seal.seal(payload, self.clock.seconds()),
                                 dest)
        except Exception as e:  # unroutable or invalid address: this datagram only
            self.counters.add("send_errors")
            self.bad_input.warn(("send", dest[0]), "could not send to {dest}: {error}", dest=dest, error=e)
            return False
        self.counters.add("datagrams_sent")
        return True

    def _schedule(self) -> None:
        deadline = self.core.retransmitter.next_deadline()
        if deadline is None or self.transport is None:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= deadline:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._resend)

    def _resend(self) -> None:
        self._timer = None
        for payload, dest in self.core.due(self.clock.seconds()):
            self._send(payload, dest)
        self._schedule()

    def stopProtocol(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
