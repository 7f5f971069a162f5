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


def touch(table: "OrderedDict[Any, Any]", key: Any, value: Any, limit: int) -> None:
    """Set *key* as the most recently used entry of *table*, forgetting the least recent beyond *limit*."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


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
            if suppressed:
                template += " ({suppressed} similar messages suppressed)"
                fields["suppressed"] = suppressed
        touch(self._windows, key, window, self.keys)
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        self.log.warn(template, **fields)
        return True


class TokenBuckets:
    """A token bucket per key: *rate* events a second, bursts of *burst*; at most *keys* keys.

    Pure: the time is an argument.  Keys beyond *keys* push out the least recently
    seen, so a flood of forged sources costs bounded memory.
    """

    def __init__(self, rate: float, burst: float, keys: int = 4096) -> None:
        self.rate, self.burst, self.keys = rate, burst, keys
        self._buckets: OrderedDict[Any, list[float]] = OrderedDict()  # key -> [tokens, last time]

    def allow(self, key: Any, now: float, cost: float = 1.0) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [self.burst, now]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        touch(self._buckets, key, bucket, self.keys)
        if bucket[0] < cost:
            return False
        bucket[0] -= cost
        return True

    def __len__(self) -> int:
        return len(self._buckets)


class Backoff:
    """Per key: after *n* failures in a row, wait ``base * 2**(n-1)`` seconds (at most *cap*) before
    trying again; a success forgets the key.  At most *keys* keys are remembered."""

    def __init__(self, base: float = 1.0, cap: float = 300.0, keys: int = 4096) -> None:
        self.base, self.cap, self.keys = base, cap, keys
        self._failures: OrderedDict[Any, tuple[int, float]] = OrderedDict()  # key -> (failures, not before)

    def allowed(self, key: Any, now: float) -> bool:
        entry = self._failures.get(key)
        return entry is None or now >= entry[1]

    def failed(self, key: Any, now: float) -> None:
        count = self._failures.get(key, (0, 0.0))[0] + 1
        touch(self._failures, key, (count, now + min(self.cap, self.base * 2 ** (count - 1))), self.keys)

    def succeeded(self, key: Any) -> None:
        self._failures.pop(key, None)
