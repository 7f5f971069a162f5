"""The tracker's table of peers: the interface, and the in-memory table (the default).

``PeerTable`` is pure: the clock reading and the random generator are arguments, so expiry and
sampling are tested without a reactor.  Sampling is O(k) whatever the table's size: peers live in a
list with an index, removal swaps with the last entry.  The table shared by several trackers, on
Redis, is ``redis_registry.RedisRegistry``.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Optional

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from zope.interface import Attribute, Interface, implementer

from p2pshare.wire import PeerInfo


class IPeerRegistry(Interface):
    """What the tracker needs of a table of peers.  Asynchronous: each method returns a Deferred,
    which fails with ``RegistryUnavailable`` when the table cannot be reached (a shared store that
    is down or too slow); the tracker then answers ``unavailable``."""

    def register(info: PeerInfo, source: str, now: float) -> "Deferred[bool]":
        """Add or replace the peer ``info.peer``, seen at *now*, registered from address *source*.
        False, and nothing recorded, if *source* already registered its limit of other peers."""

    def heartbeat(peer: str, now: float) -> "Deferred[bool]":
        """Mark *peer* alive at *now*; False if it is not registered."""

    def remove(peer: str) -> "Deferred[bool]":
        """Forget *peer*; False if it was not registered."""

    def expire(now: float) -> "Deferred[list[str]]":
        """Forget every peer not seen since ``now - timeout``; the ids forgotten."""

    def sample(k: int, exclude: Optional[str], rng: random.Random, per_host: int = 0) -> "Deferred[list[PeerInfo]]":
        """At most *k* distinct peers chosen uniformly at random, never *exclude*.  With *per_host*, as
        docs/protocol.md section 2.2 says: of ``2k`` peers drawn in turn, those kept in the order
        drawn, skipping each beyond the *per_host*-th with one host, until there are *k* (``draw``)."""

    def count() -> int:
        """How many peers are registered (a shared table: as of its last sweep)."""

    local = Attribute(
        """True when the table lives in this process and keeps each peer's id string: the tracker then
        keys what each connection registered by those same strings.  A shared table (False, or absent:
        True is assumed) keeps nothing here, and the tracker keys its own records by each id as an
        integer instead (48 bytes, against 88 for the string).""")

    def close() -> "Deferred[None]":
        """Release connections and threads."""


def draw(n: int, k: int, rng: random.Random, peer_at: Callable[[int], Optional[PeerInfo]],
         per_host: int = 0) -> list[PeerInfo]:
    """Up to *k* peers from slots ``0 .. n - 1`` drawn uniformly at random without replacement, in the
    order drawn; ``peer_at(i)`` is the slot's peer, or None for one never to be picked (the asker).
    With *per_host*: from at most ``2k`` peers drawn, at most *per_host* with one host.  One pass,
    stopping as soon as there are *k*, so an answer costs about *k* draws whatever the table's size."""
    if k <= 0 or n <= 0:
        return []
    limit = 2 * k if per_host else k
    out: list[PeerInfo] = []
    hosts: dict[str, int] = {}
    drawn = 0
    if n <= 4 * limit:  # a small table: one shuffle
        order: Optional[list[int]] = rng.sample(range(n), n)
    else:  # a large one: draws, a repeat drawn again (rare: under 1 in 4 even at the end)
        order, chosen, uniform = None, set(), rng.random
    taken = 0
    while len(out) < k and drawn < limit and taken < n:
        if order is not None:
            i = order[taken]
        else:
            i = int(uniform() * n)
            if i in chosen:
                continue
            chosen.add(i)
        taken += 1
        info = peer_at(i)
        if info is None:
            continue
        drawn += 1
        if per_host:
            seen = hosts.get(info.host, 0)
            if seen >= per_host:
                continue
            hosts[info.host] = seen + 1
        out.append(info)
    return out


class RegistryUnavailable(Exception):
    """The table cannot be reached (a shared store down, slow, or too much pending)."""


@define
class PeerTable:
    """The in-memory table, synchronous: a peer is dropped *timeout* seconds after it was last seen,
    and one source address may hold at most *max_per_source* peers."""

    timeout: float = 30.0
    max_per_source: int = 32
    _peers: list[PeerInfo] = field(factory=list)
    _index: dict[str, int] = field(factory=dict)
    _seen: dict[str, float] = field(factory=dict)
    _source: dict[str, str] = field(factory=dict)  # peer id -> the address that registered it
    _per_source: Counter[str] = field(factory=Counter)

    def register(self, info: PeerInfo, now: float, source: str = "") -> bool:
        if self._source.get(info.peer) != source:
            if self._per_source[source] >= self.max_per_source:
                return False
            self.remove(info.peer)  # registered before from elsewhere: it moved
            self._source[info.peer] = source
            self._per_source[source] += 1
        at = self._index.get(info.peer)
        if at is None:
            self._index[info.peer] = len(self._peers)
            self._peers.append(info)
        else:
            self._peers[at] = info
        self._seen[info.peer] = now
        return True

    def heartbeat(self, peer: str, now: float) -> bool:
        if peer not in self._index:
            return False
        self._seen[peer] = now
        return True

    def remove(self, peer: str) -> bool:
        at = self._index.pop(peer, None)
        if at is None:
            return False
        last = self._peers.pop()
        if at < len(self._peers):
            self._peers[at] = last
            self._index[last.peer] = at
        del self._seen[peer]
        source = self._source.pop(peer, None)
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]
        return True

    def expire(self, now: float) -> list[str]:
        # Insertion order of _seen is not last-seen order, so this is a full pass; the
        # tracker calls it once per heartbeat interval, which keeps it cheap per request.
        cutoff = now - self.timeout
        gone = [peer for peer, seen in self._seen.items() if seen < cutoff]
        for peer in gone:
            self.remove(peer)
        return gone

    def sample(self, k: int, exclude: Optional[str], rng: random.Random, per_host: int = 0) -> list[PeerInfo]:
        peers = self._peers
        skip = self._index.get(exclude) if exclude is not None else None
        return draw(len(peers), k, rng, peers.__getitem__ if skip is None else
                    (lambda i: None if i == skip else peers[i]), per_host)

    def get(self, peer: str) -> Optional[PeerInfo]:
        at = self._index.get(peer)
        return None if at is None else self._peers[at]

    def __len__(self) -> int:
        return len(self._peers)


@implementer(IPeerRegistry)
class MemoryRegistry:
    """The default registry: a ``PeerTable`` in this process, each answer ready at once."""

    local = True

    def __init__(self, timeout: float = 30.0, max_per_source: int = 32) -> None:
        self.table = PeerTable(timeout, max_per_source)

    def register(self, info: PeerInfo, source: str, now: float) -> Deferred[bool]:
        return succeed(self.table.register(info, now, source))

    def heartbeat(self, peer: str, now: float) -> Deferred[bool]:
        return succeed(self.table.heartbeat(peer, now))

    def remove(self, peer: str) -> Deferred[bool]:
        return succeed(self.table.remove(peer))

    def expire(self, now: float) -> Deferred[list[str]]:
        return succeed(self.table.expire(now))

    def sample(self, k: int, exclude: Optional[str], rng: random.Random, per_host: int = 0) -> Deferred[list[PeerInfo]]:
        return succeed(self.table.sample(k, exclude, rng, per_host))

    def count(self) -> int:
        return len(self.table)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def get(self, peer: str) -> Optional[PeerInfo]:
        return self.table.get(peer)

    def __len__(self) -> int:
        return len(self.table)
