"""Per-hop retransmission of datagrams until the next hop acknowledges them.

Pure: times are arguments.  Every query a peer sends or forwards, and every
hit, is kept here until an ``ack`` for it comes back from the address it went
to, and is resent with exponential backoff otherwise.  The receiver
acknowledges duplicates too (it has seen the request ID, but its ack may be the
one that was lost) and processes only the first copy, so a retry never floods
further.  The bound: a datagram is sent at most ``tries`` times.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Optional

from attrs import define, field

from p2pshare.ratelimit import Counters

Address = tuple[str, int]
Key = tuple[str, str, Address]  # (kind, request id, destination)


@define
class _Pending:
    payload: bytes
    sent: int
    timeout: float
    deadline: float
    first_sent: float


@define
class Retransmitter:
    """Datagrams awaiting an ack; ``due`` returns the ones to send again.

    The first timeout adapts to the acknowledgement times seen, as TCP's does
    (smoothed round trip plus four deviations, Karn's rule: only datagrams sent
    once are measured), between ``min_timeout`` and ``max_timeout``.
    """

    counters: Counters = field(factory=Counters)
    first_timeout: float = 0.25
    max_timeout: float = 2.0
    min_timeout: float = 0.1
    tries: int = 7  # sends in all, the first included
    max_pending: int = 8192
    on_give_up: Callable[[str, str, Address], None] = lambda kind, request_id, dest: None
    _pending: dict[Key, _Pending] = field(factory=dict)
    _heap: list[tuple[float, int, Key]] = field(factory=list)
    _seq: itertools.count = field(factory=itertools.count)
    _srtt: Optional[float] = None
    _rttvar: float = 0.0

    def track(self, kind: str, request_id: str, payload: bytes, dest: Address, now: float) -> None:
        """Remember a datagram just sent, to be resent until acknowledged."""
        key = (kind, request_id, dest)
        if key in self._pending or self.tries <= 1:
            return
        if len(self._pending) >= self.max_pending:
            self.counters.add("retransmit_queue_full")
            return
        deadline = now + self.first_timeout
        self._pending[key] = _Pending(payload, 1, self.first_timeout, deadline, now)
        heapq.heappush(self._heap, (deadline, next(self._seq), key))

    def ack(self, kind: str, request_id: str, sender: Address, now: Optional[float] = None,
            implicit: bool = False) -> bool:
        """The datagram reached *sender*; True if it was still waiting.

        *implicit*: not an ack datagram but other proof (a copy of the same query from
        *sender*); not finding anything pending is then no anomaly, so it is not counted.
        """
        p = self._pending.pop((kind, request_id, sender), None)
        if not implicit:
            self.counters.add("acks_received" if p is not None else "acks_unmatched")
        if p is not None and p.sent == 1 and now is not None:
            self._measure(now - p.first_sent)
        return p is not None

    def _measure(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self.first_timeout = min(max(self._srtt + 4 * self._rttvar, self.min_timeout), self.max_timeout)

    def pending_to(self, kind: str, request_id: str, dest: Address) -> bool:
        return (kind, request_id, dest) in self._pending

    def due(self, now: float) -> list[tuple[str, bytes, Address]]:
        """Datagrams whose ack is late: send them again now."""
        resend = []
        while self._heap and self._heap[0][0] <= now:
            deadline, _, key = heapq.heappop(self._heap)
            p = self._pending.get(key)
            if p is None or p.deadline != deadline:
                continue  # acknowledged, or rescheduled
            if p.sent >= self.tries:
                del self._pending[key]
                self.counters.add(f"gave_up_{key[0]}")
                self.on_give_up(*key)
                continue
            p.sent += 1
            p.timeout = min(p.timeout * 2, self.max_timeout)
            p.deadline = now + p.timeout
            heapq.heappush(self._heap, (p.deadline, next(self._seq), key))
            self.counters.add(f"retries_{key[0]}")
            resend.append((key[0], p.payload, key[2]))
        return resend

    def next_deadline(self) -> Optional[float]:
        while self._heap and self._heap[0][2] not in self._pending:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def forget(self, request_id: str) -> None:
        """Stop retransmitting everything about *request_id* (the search is over)."""
        for key in [k for k in self._pending if k[1] == request_id]:
            del self._pending[key]

    def __len__(self) -> int:
        return len(self._pending)
