"""Bandwidth limits for a whole peer: one token bucket per direction, shared by every transfer connection.

A connection charges the bucket with what it moved (``charge``) and, while the bucket is in debt,
waits (``wait``): an upload's producer stops sending, a download's transport stops reading (so TCP's
own flow control slows the sender).  When the bucket refills, the waiting connections are resumed
in the order they started waiting, each once, so connections that all want more than their share
move about equally.  Nothing sleeps: the wake-up is one ``callLater`` for the whole bucket.

Rates are bytes a second; 0 means unlimited.  The bucket holds at most ``BURST_SECONDS`` of
traffic, so a long transfer keeps within a few percent of the rate over any few seconds.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

BURST_SECONDS = 0.05  # the bucket's depth, in seconds of traffic at its rate
MIN_BURST = 16 * 1024  # bytes: at very low rates, still a useful amount a turn
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(?:b|b/s|bps)?\s*$", re.IGNORECASE)


def parse_rate(text: str) -> int:
    """``"10M"`` -> 10,000,000 bytes/s; ``"1.5MiB"`` -> 1,572,864; ``"0"`` or ``"none"``: unlimited (0).

    k, M, G, T are powers of 1000; Ki, Mi, Gi, Ti powers of 1024; a trailing B or B/s is allowed."""
    if text.strip().lower() in ("none", "unlimited", "off"):
        return 0
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate: bytes a second, such as 500k, 10M, 1.5MiB or 0 for none")
    number, prefix, binary = match.groups()
    power = " kmgt".index(prefix.lower() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def rate_text(rate: int) -> str:
    """A rate as a person reads it: ``10 MB/s``, or ``unlimited``."""
    if not rate:
        return "unlimited"
    for unit, size in (("GB/s", 10 ** 9), ("MB/s", 10 ** 6), ("kB/s", 10 ** 3)):
        if rate >= size:
            return f"{rate / size:g} {unit}"
    return f"{rate} B/s"


class TokenBucket:
    """Pure: *rate* bytes a second, at most ``burst`` saved up; the level may go below zero (a debt)
    when a transfer moved more than it had, which the next refills pay back.  Time is an argument."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate = 0
        self.level = 0.0
        self.updated = now
        self.set_rate(rate, now)

    def set_rate(self, rate: int, now: float) -> None:
        self.refill(now)
        self.rate = max(0, int(rate))
        self.burst = max(MIN_BURST, self.rate * BURST_SECONDS)
        self.level = min(self.level, self.burst) if self.rate else 0.0

    def refill(self, now: float) -> None:
        if self.rate:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def charge(self, nbytes: int, now: float) -> None:
        self.refill(now)
        if self.rate:
            self.level -= nbytes

    def in_debt(self, now: float) -> bool:
        self.refill(now)
        return bool(self.rate) and self.level <= 0

    def until_positive(self, now: float) -> float:
        """Seconds until the level is above zero again (0 when it is)."""
        self.refill(now)
        if not self.rate or self.level > 0:
            return 0.0
        return (-self.level + 1) / self.rate


class Limiter:
    """A ``TokenBucket`` on a clock, and the connections waiting for it to refill."""

    def __init__(self, clock: IReactorTime, rate: int = 0) -> None:
        self.clock = clock
        self.bucket = TokenBucket(rate, clock.seconds())
        self._waiting: OrderedDict[Any, Callable[[], None]] = OrderedDict()
        # Deficit round robin: what each connection may still move before the others have had as
        # much.  Reads come in whatever sizes the kernel has, so turns alone would not be fair.
        self._credit: dict[Any, float] = {}
        self._wake: Optional[IDelayedCall] = None

    @property
    def rate(self) -> int:
        return self.bucket.rate

    @property
    def limited(self) -> bool:
        return self.bucket.rate > 0

    def set_rate(self, rate: int) -> None:
        """A new rate, at once (0: unlimited); whoever waits is resumed as soon as it allows."""
        self.bucket.set_rate(rate, self.clock.seconds())
        self._schedule()

    def slice(self, default: int) -> int:
        """How many bytes to move in one go: *default*, or less under a low limit, so that one
        connection's turn does not take much more than the bucket's depth."""
        return min(default, max(MIN_BURST, int(self.bucket.burst))) if self.limited else default

    def charge(self, nbytes: int, who: Any = None) -> None:
        """*who* moved *nbytes*: the bucket pays, and so does *who*'s share."""
        self.bucket.charge(nbytes, self.clock.seconds())
        if who is not None and self.limited:
            self._credit[who] = max(self._credit.get(who, 0.0) - nbytes, -self.bucket.rate)

    def blocked(self) -> bool:
        return self.bucket.in_debt(self.clock.seconds())

    def wait(self, who: Any, resume: Callable[[], None]) -> None:
        """Call *resume* once the bucket has refilled (in turn with the others waiting)."""
        self._waiting[who] = resume
        self._schedule()

    def forget(self, who: Any) -> None:
        """*who* no longer waits (its connection closed)."""
        self._credit.pop(who, None)
        if self._waiting.pop(who, None) is not None and not self._waiting:
            self._schedule()  # nobody left to wake

    def _schedule(self) -> None:
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        if self._waiting:
            self._wake = self.clock.callLater(self.bucket.until_positive(self.clock.seconds()), self._resume)

    def _resume(self) -> None:
        """Resume, in the order they came, the waiting connections that have not had more than
        their share; those that have wait for a later turn, while the others catch up."""
        self._wake = None
        if self.blocked():
            return self._schedule()
        if not self.limited:
            waiting, self._waiting = self._waiting, OrderedDict()
            self._credit.clear()
            for resume in waiting.values():
                resume()
            return
        quantum = self.bucket.burst
        credit = self._credit
        best = max(credit.get(who, 0.0) for who in self._waiting)
        # A new round when nobody waiting has credit left: the same top-up to each, so that the one
        # that moved least since it began waiting may move a quantum.
        grant = 0.0 if best > 0 else quantum - best
        for who in self._waiting:
            credit[who] = min(credit.get(who, 0.0) + grant, quantum)
        for who in [w for w in self._waiting if credit[w] > 0]:
            if self.blocked():
                break  # the others keep their place at the front
            self._waiting.pop(who)()
        self._schedule()


class Limits:
    """A peer's two limiters."""

    def __init__(self, clock: IReactorTime, upload: int = 0, download: int = 0) -> None:
        self.upload = Limiter(clock, upload)
        self.download = Limiter(clock, download)

    def status(self) -> dict[str, int]:
        return {"upload": self.upload.rate, "download": self.download.rate}
