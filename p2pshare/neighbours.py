"""Who a peer sends queries to: pure bookkeeping, the clock reading passed in.

Five sources, in order: static peers from the command line, the tracker's
random subset, peers found on the local link (multicast announcements, lan.py),
peers that sent us a query or a hello (so every link works both ways, and nobody
is left without anyone forwarding to them), and peers our neighbours told us
about (peer exchange), used only while the tracker cannot be reached.  LAN,
learned and exchanged entries expire unless heard from again.

Tracker neighbours are kept across refreshes, and a refresh only fills the
places of those that stopped answering: a graph that churned with every
refresh would keep every old link alive as a learned one and grow the flood.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Iterable, Optional

from attrs import define, field

from p2pshare.ratelimit import touch

Address = tuple[str, int]

MAX_LEARNED = 32
MAX_EXCHANGED = 32
MAX_LAN = 16


@define
class Neighbourhood:
    own: set[Address] = field(factory=set)  # our own addresses, never a neighbour
    static: list[Address] = field(factory=list)
    tracker: list[Address] = field(factory=list)
    expire_after: float = 90.0
    lan_expire_after: float = 105.0  # three and a half announcement periods
    _lan: OrderedDict[Address, float] = field(factory=OrderedDict)
    _learned: OrderedDict[Address, float] = field(factory=OrderedDict)
    _exchanged: OrderedDict[Address, float] = field(factory=OrderedDict)
    _cache: Optional[tuple[float, bool, list[Address]]] = None  # (when, tracker_up, answer)

    def set_own(self, own: set[Address]) -> None:
        if own != self.own:
            self.own = own
            self._cache = None

    def heard_from(self, addr: Address, now: float) -> None:
        """*addr* sent us a query or a hello: it is a neighbour for a while."""
        self._remember(self._learned, addr, now, MAX_LEARNED)

    def found_on_lan(self, addr: Address, now: float) -> bool:
        """*addr* announced itself on the local link; True when it is new (say hello to it)."""
        new = addr not in self._lan and addr not in self.own
        self._remember(self._lan, addr, now, MAX_LAN)
        return new

    def told_about(self, addrs: Iterable[Address], now: float) -> None:
        """A neighbour listed these peers (peer exchange)."""
        for addr in addrs:
            self._remember(self._exchanged, addr, now, MAX_EXCHANGED)

    def _remember(self, table: OrderedDict[Address, float], addr: Address, now: float, limit: int) -> None:
        if addr in self.own:
            return
        if addr not in table:
            self._cache = None
        touch(table, addr, now, limit)

    def refresh_tracker(self, fresh: list[Address], want: int) -> list[Address]:
        """Keep our tracker neighbours, fill free places from *fresh*; return the newcomers."""
        keep = self.tracker[:want]
        new = [a for a in dict.fromkeys(fresh) if a not in keep and a not in self.own][: max(0, want - len(keep))]
        self.tracker = keep + new
        self._cache = None
        return new

    def forget(self, addr: Address) -> None:
        """*addr* stopped answering: drop it; a tracker refresh fills its place."""
        self._learned.pop(addr, None)
        self._exchanged.pop(addr, None)
        self._lan.pop(addr, None)
        if addr in self.tracker:
            self.tracker = [a for a in self.tracker if a != addr]
        self._cache = None

    def current(self, now: float, tracker_up: bool) -> list[Address]:
        """Neighbours to forward to, without duplicates or ourselves (worked out at most once a second)."""
        cached = self._cache
        if cached is not None and cached[1] == tracker_up and 0 <= now - cached[0] < 1.0:
            return cached[2]
        for table, expire_after in ((self._learned, self.expire_after), (self._exchanged, self.expire_after),
                                    (self._lan, self.lan_expire_after)):
            for addr in [a for a, t in table.items() if t < now - expire_after]:
                del table[addr]
        sources = [self.static, self.tracker, list(self._lan), list(self._learned)]
        if not tracker_up:
            sources.append(list(self._exchanged))
        seen: dict[Address, None] = {}
        for source in sources:
            for addr in source:
                if addr not in self.own:
                    seen[addr] = None
        answer = list(seen)
        self._cache = (now, tracker_up, answer)
        return answer

    def chosen(self, now: float, tracker_up: bool) -> list[Address]:
        """The neighbours this peer picked itself (static, tracker, exchanged while the tracker is
        down): the ones it says hello to.  Learned ones are not greeted back, or two peers that
        met once would keep each other as neighbours for ever."""
        learned = set(self._learned)
        picked = set(self.static) | set(self.tracker) | set(self._lan) | (set() if tracker_up else set(self._exchanged))
        return [a for a in self.current(now, tracker_up) if a in picked or a not in learned]

    def sample(self, k: int, rng: random.Random, now: float, exclude: Address) -> list[Address]:
        """Up to *k* of our neighbours to tell *exclude* about."""
        pool = [a for a in self.current(now, tracker_up=True) if a != exclude]
        return rng.sample(pool, min(k, len(pool)))
