"""Search over UDP: flood a query to neighbours, drop duplicates by request ID, answer hits.

``SearchCore`` decides (pure: the clock reading is an argument); the
``SearchProtocol`` only decodes, counts and sends what the core returns.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Optional

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from p2pshare.errors import MalformedMessage, MessageTooLarge, UnsupportedVersion
from p2pshare.ratelimit import Counters, RateLimitedLog
from p2pshare.shares import Entry
from p2pshare.wire import MAX_DATAGRAM, Address, Hit, Query, decode_datagram

DEFAULT_TTL = 7  # hops a query may travel; larger values on the wire are clamped to this


def new_request_id() -> str:
    """128 random bits, hex."""
    return os.urandom(16).hex()


@define
class DedupCache:
    """Request IDs seen recently: bounded in entries and in age, so memory stays flat."""

    max_entries: int = 65536
    max_age: float = 120.0
    _seen: OrderedDict[str, float] = field(factory=OrderedDict)

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


@define
class Reaction:
    """What the core wants done with one datagram."""

    sends: list[tuple[bytes, Address]] = field(factory=list)
    offer: Optional[tuple[Query, Entry]] = None


@define
class SearchCore:
    """Flood logic for one peer.

    *lookup* finds a shared file by name; *neighbours* lists UDP addresses to
    forward to; *me* gives this peer's id and TCP address for hits (an empty
    host means "wherever my datagram came from").
    """

    lookup: Callable[[str], Optional[Entry]]
    neighbours: Callable[[], list[Address]]
    me: Callable[[], tuple[str, Address]]
    counters: Counters = field(factory=Counters)
    seen: DedupCache = field(factory=DedupCache)
    max_ttl: int = DEFAULT_TTL
    waiting: dict[str, Callable[[Hit], None]] = field(factory=dict)

    def start_query(self, name: str, udp: Address, tcp: Address, fetch: bool, now: float,
                    on_hit: Callable[[Hit], None], request_id: Optional[str] = None) -> tuple[str, Reaction]:
        """Begin a search of our own: returns its request ID and the datagrams to send."""
        rid = request_id or new_request_id()
        self.seen.add(rid, now)  # our own query coming back is a duplicate
        self.waiting[rid] = on_hit
        q = Query(rid, name, udp, tcp, self.max_ttl, 0, fetch)
        payload = q.encode()
        self.counters.add("queries_started")
        return rid, Reaction([(payload, n) for n in self.neighbours()])

    def finish_query(self, request_id: str) -> None:
        """Stop listening for hits to *request_id*; later ones count as unknown."""
        self.waiting.pop(request_id, None)

    def on_query(self, q: Query, sender: Address, now: float) -> Reaction:
        q = q.with_sender(sender[0])
        if not self.seen.add(q.id, now):
            self.counters.add("dropped_duplicate")
            return Reaction()
        self.counters.add("queries_received")
        entry = self.lookup(q.name)
        if entry is not None:
            peer, tcp = self.me()
            hit = Hit(q.id, entry.name, entry.size, entry.sha256, tcp, peer, min(q.hops + 1, 255))
            self.counters.add("hits_sent")
            return Reaction([(hit.encode(), q.udp)], (q, entry) if q.fetch else None)
        ttl = min(q.ttl, self.max_ttl)
        if ttl <= 0:
            self.counters.add("dropped_expired")
            return Reaction()
        fwd = Query(q.id, q.name, q.udp, q.tcp, ttl, q.hops, q.fetch).forwarded().encode()
        targets = [n for n in self.neighbours() if n != sender and n != q.udp]
        self.counters.add("queries_forwarded", len(targets))
        return Reaction([(fwd, n) for n in targets])

    def on_hit(self, hit: Hit) -> None:
        handler = self.waiting.get(hit.id)
        if handler is None:
            self.counters.add("dropped_unknown_hit")
            return
        self.counters.add("hits_received")
        handler(hit)


class SearchProtocol(DatagramProtocol):
    """The UDP socket: decode, count, hand to the core, send what it returns."""

    log = Logger()
    noisy = False

    def __init__(self, core: SearchCore, clock: IReactorTime,
                 on_offer: Callable[[Query, Entry], None] = lambda q, e: None,
                 on_sender: Callable[[Address], None] = lambda a: None) -> None:
        self.core = core
        self.clock = clock
        self.on_offer = on_offer
        self.on_sender = on_sender
        self.bad_input = RateLimitedLog(self.log, clock)

    @property
    def counters(self) -> Counters:
        return self.core.counters

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
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
        if isinstance(msg, Hit):
            self.core.on_hit(msg.with_sender(addr[0]))
            return
        self.on_sender(addr)
        reaction = self.core.on_query(msg, addr, self.clock.seconds())
        self.send_all(reaction)
        if reaction.offer is not None:
            self.on_offer(*reaction.offer)

    def send_all(self, reaction: Reaction) -> None:
        for payload, dest in reaction.sends:
            try:
                self.transport.write(payload, dest)
            except Exception as e:  # unroutable or invalid address: this datagram only
                self.counters.add("send_errors")
                self.bad_input.warn(("send", dest[0]), "could not send to {dest}: {error}", dest=dest, error=e)
            else:
                self.counters.add("datagrams_sent")
