"""The tracker's table of peers.

Pure: the clock reading and the random generator are arguments, so expiry and
sampling are tested without a reactor.  Sampling is O(k) whatever the table's
size: peers live in a list with an index, removal swaps with the last entry.
"""

from __future__ import annotations

import random
from typing import Optional

from attrs import define, field
from zope.interface import Interface, implementer

from p2pshare.wire import PeerInfo


class IPeerRegistry(Interface):
    """What the tracker needs of a table of peers."""

    def register(info: PeerInfo, now: float) -> None:
        """Add or replace the peer ``info.peer``, seen at *now*."""

    def heartbeat(peer: str, now: float) -> bool:
        """Mark *peer* alive at *now*; False if it is not registered."""

    def remove(peer: str) -> bool:
        """Forget *peer*; False if it was not registered."""

    def expire(now: float) -> list[str]:
        """Forget every peer not seen since ``now - timeout``; return their ids."""

    def sample(k: int, exclude: Optional[str], rng: random.Random) -> list[PeerInfo]:
        """At most *k* distinct peers chosen uniformly at random, never *exclude*."""

    def __len__() -> int:
        """How many peers are registered."""


@implementer(IPeerRegistry)
@define
class MemoryRegistry:
    """The in-memory registry: a peer is dropped *timeout* seconds after it was last seen."""

    timeout: float = 30.0
    _peers: list[PeerInfo] = field(factory=list)
    _index: dict[str, int] = field(factory=dict)
    _seen: dict[str, float] = field(factory=dict)

    def register(self, info: PeerInfo, now: float) -> None:
        at = self._index.get(info.peer)
        if at is None:
            self._index[info.peer] = len(self._peers)
            self._peers.append(info)
        else:
            self._peers[at] = info
        self._seen[info.peer] = now

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
        return True

    def expire(self, now: float) -> list[str]:
        # Insertion order of _seen is not last-seen order, so this is a full pass; the
        # tracker calls it once per heartbeat interval, which keeps it cheap per request.
        cutoff = now - self.timeout
        gone = [peer for peer, seen in self._seen.items() if seen < cutoff]
        for peer in gone:
            self.remove(peer)
        return gone

    def sample(self, k: int, exclude: Optional[str], rng: random.Random) -> list[PeerInfo]:
        n = len(self._peers)
        if k <= 0 or n == 0:
            return []
        skip = self._index.get(exclude) if exclude is not None else None
        pool = n - (skip is not None)
        picks = rng.sample(range(pool), min(k, pool))
        # Indices at or past the excluded slot shift by one, so it is never chosen.
        return [self._peers[i + (skip is not None and i >= skip)] for i in picks]

    def get(self, peer: str) -> Optional[PeerInfo]:
        at = self._index.get(peer)
        return None if at is None else self._peers[at]

    def __len__(self) -> int:
        return len(self._peers)
