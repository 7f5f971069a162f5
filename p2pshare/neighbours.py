"""Who a peer sends queries to: pure bookkeeping, the clock reading passed in.

Four sources, in order: static peers from the command line, the tracker's
random subset, peers that sent us a query or a hello (so every link works both
ways, and nobody is left without anyone forwarding to them), and peers our
neighbours told us about (peer exchange), used only while the tracker cannot
be reached.  Learned and exchanged entries expire unless heard from again.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Iterable

from attrs import define, field

Address = tuple[str, int]

MAX_LEARNED = 32
MAX_EXCHANGED = 32


@define
class Neighbourhood:
    own: set[Address] = field(factory=set)  # our own addresses, never a neighbour
    static: list[Address] = field(factory=list)
    tracker: list[Address] = field(factory=list)
    expire_after: float = 90.0
    _learned: OrderedDict[Address, float] = field(factory=OrderedDict)
    _exchanged: OrderedDict[Address, float] = field(factory=OrderedDict)

    def heard_from(self, addr: Address, now: float) -> None:
        """*addr* sent us a query or a hello: it is a neighbour for a while."""
        self._remember(self._learned, addr, now, MAX_LEARNED)

    def told_about(self, addrs: Iterable[Address], now: float) -> None:
        """A neighbour listed these peers (peer exchange)."""
        for addr in addrs:
            self._remember(self._exchanged, addr, now, MAX_EXCHANGED)

    def _remember(self, table: OrderedDict[Address, float], addr: Address, now: float, limit: int) -> None:
        if addr in self.own:
            return
        table[addr] = now
        table.move_to_end(addr)
        while len(table) > limit:
            table.popitem(last=False)

    def forget(self, addr: Address) -> None:
        """*addr* stopped answering: drop what we learned of it (the tracker's list refreshes itself)."""
        self._learned.pop(addr, None)
        self._exchanged.pop(addr, None)

    def current(self, now: float, tracker_up: bool) -> list[Address]:
        """Neighbours to forward to, without duplicates or ourselves."""
        for table in (self._learned, self._exchanged):
            for addr in [a for a, t in table.items() if t < now - self.expire_after]:
                del table[addr]
        sources = [self.static, self.tracker, list(self._learned)]
        if not tracker_up:
            sources.append(list(self._exchanged))
        seen: dict[Address, None] = {}
        for source in sources:
            for addr in source:
                if addr not in self.own:
                    seen[addr] = None
        return list(seen)

    def sample(self, k: int, rng: random.Random, now: float, exclude: Address) -> list[Address]:
        """Up to *k* of our neighbours to tell *exclude* about."""
        pool = [a for a in self.current(now, tracker_up=True) if a != exclude]
        return rng.sample(pool, min(k, len(pool)))
