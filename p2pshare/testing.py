"""Fakes for tests of code that uses p2pshare, and for p2pshare's own tests.

``MemoryReactor`` has no ``listenUDP``; ``UDPMemoryReactorClock`` adds one.
``DatagramNetwork`` joins several datagram protocols in memory, with optional
loss, so flooding can be tested without sockets or real time.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Optional

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock

Address = tuple[str, int]


@define
class FakeUDPPort:
    """The transport a datagram protocol writes to; it only records or forwards."""

    host: Address
    protocol: DatagramProtocol
    network: Optional["DatagramNetwork"] = None
    written: list[tuple[bytes, Address]] = field(factory=list)
    maxPacketSize: int = 8192
    listening: bool = True

    def write(self, datagram: bytes, addr: Address) -> None:
        self.written.append((datagram, addr))
        if self.network is not None:
            self.network.send(datagram, self.host, addr)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self.host)

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            self.protocol.doStop()
            if self.network is not None:
                self.network.ports.pop(self.host, None)

    loseConnection = stopListening


class UDPMemoryReactorClock(MemoryReactorClock):
    """A ``MemoryReactorClock`` that also accepts ``listenUDP`` and records the ports."""

    def __init__(self, network: Optional["DatagramNetwork"] = None, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.network = network
        self.host = host
        self.udpPorts: dict[int, FakeUDPPort] = {}
        self._next_port = 40000

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "",
                  maxPacketSize: int = 8192) -> FakeUDPPort:
        if port == 0:
            port, self._next_port = self._next_port, self._next_port + 1
        udp = FakeUDPPort((interface or self.host, port), protocol, self.network, maxPacketSize=maxPacketSize)
        self.udpPorts[port] = udp
        if self.network is not None:
            self.network.ports[udp.host] = udp
        protocol.makeConnection(udp)  # type: ignore[arg-type]
        return udp


@define
class DatagramNetwork:
    """Datagrams between in-memory ports, delivered in order by ``run``.

    *loss* is the probability that a datagram is dropped (drawn from *rng*);
    ``sent`` and ``dropped`` count what happened, ``log`` keeps (src, dst, bytes).
    """

    loss: float = 0.0
    rng: random.Random = field(factory=lambda: random.Random(1))
    ports: dict[Address, FakeUDPPort] = field(factory=dict)
    queue: deque[tuple[bytes, Address, Address]] = field(factory=deque)
    sent: int = 0
    dropped: int = 0
    log: list[tuple[Address, Address, bytes]] = field(factory=list)
    filter: Callable[[bytes, Address, Address], bool] = lambda data, src, dst: True

    def attach(self, protocol: DatagramProtocol, host: Address) -> FakeUDPPort:
        """Give *protocol* a port at *host* on this network."""
        port = FakeUDPPort(host, protocol, self)
        self.ports[host] = port
        protocol.makeConnection(port)  # type: ignore[arg-type]
        return port

    def send(self, data: bytes, src: Address, dst: Address) -> None:
        self.sent += 1
        self.log.append((src, dst, data))
        if (self.loss and self.rng.random() < self.loss) or not self.filter(data, src, dst):
            self.dropped += 1
            return
        self.queue.append((data, src, dst))

    def run(self, limit: int = 1_000_000) -> int:
        """Deliver queued datagrams (and those they cause) until none are left; return how many."""
        delivered = 0
        while self.queue and delivered < limit:
            data, src, dst = self.queue.popleft()
            port = self.ports.get(dst)
            if port is None or not port.listening:
                continue
            port.protocol.datagramReceived(data[: port.maxPacketSize], src)
            delivered += 1
        return delivered


def by_name(files: dict[str, Any]) -> Callable[[str, str], Any]:
    """A ``SearchCore`` lookup over a plain dict of entries by name (the hash is not consulted)."""
    return lambda name, sha256="": files.get(name)
