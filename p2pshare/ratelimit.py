"""Counters for everything dropped or refused, and logging that cannot be flooded.

Bad input from the network is counted every time but logged at most ``burst``
times per source and ``period``; the number suppressed is logged with the next
message that gets through.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class Counters(Counter[str]):
    """Named event counts, shown by ``p2pshare status``."""

    def add(self, name: str, n: int = 1) -> None:
        self[name] += n


class RateLimitedLog:
    """``warn`` at most *burst* times per key per *period* seconds; remembers *keys* sources."""

    def __init__(self, log: Logger, clock: IReactorTime, period: float = 60.0, burst: int = 5,
                 keys: int = 1024) -> None:
        self.log = log
        self.clock = clock
        self.period = period
        self.burst = burst
        self.keys = keys
        self._windows: OrderedDict[Any, list[float]] = OrderedDict()  # key -> [start, logged, suppressed]

    def warn(self, key: Any, template: str, **fields: Any) -> bool:
        """Log unless *key* has used up its budget; True when the message was logged."""
        now = self.clock.seconds()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.period:
            suppressed = int(window[2]) if window is not None else 0
            window = [now, 0, 0]
            self._windows[key] = window
            if suppressed:
                template += " ({suppressed} similar messages suppressed)"
                fields["suppressed"] = suppressed
        self._windows.move_to_end(key)
        while len(self._windows) > self.keys:
            self._windows.popitem(last=False)
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        self.log.warn(template, **fields)
        return True
