"""Finding peers on the local link without a tracker: multicast announcements.

Every peer listening on a LAN address joins the group ``239.192.72.69`` (organization-local scope)
on UDP port 7771, with a time-to-live of 1 so that no router forwards what it sends, and announces
itself there: three times in its first two seconds, then every ``period`` seconds (30, with 20%
jitter).  An announcement is ``{"v": 1, "t": "lan", "peer": ID, "udp": PORT}`` (docs/protocol.md
section 3.15); in a private network it is sealed like every other datagram, so outsiders neither
learn who is there nor inject anyone.

A peer that hears an announcement takes its sender (the source address, and the announced port) as
a LAN neighbour and says hello to it (section 3.13), so the link works both ways at once.  Bounded:
at most ``MAX_LAN`` LAN neighbours (the least recently heard go first), announcements processed at
most 20 a second in all and one a second per source, anything else dropped and counted.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import struct
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from p2pshare.ratelimit import RateLimitedLog, TokenBuckets
from p2pshare.wire import Address, is_ip, plain_host

GROUP = "239.192.72.69"
GROUP6 = "ff02::7771"  # link-local scope: never past the link
PORT = 7771
PERIOD = 30.0
JITTER = 0.2
FIRST = (0.0, 0.7, 2.0)  # seconds after start: a newcomer is found at once, even if a datagram is lost
MAX_LAN = 16  # LAN neighbours kept at once
MAX_ANNOUNCEMENT = 256  # bytes; a longer datagram on the group is not ours (sealed ones: plus the seal)
RATE, BURST = 20.0, 40.0  # announcements processed a second, in all
PER_SOURCE, PER_SOURCE_BURST = 1.0, 3.0


def encode(peer: str, udp: int, host: str = "") -> bytes:
    msg: dict[str, Any] = {"v": 1, "t": "lan", "peer": peer, "udp": udp}
    if host:
        msg["host"] = host
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(data: bytes) -> tuple[str, int, str]:
    """(peer id, UDP port, host or "") of an announcement; ValueError when it is not one."""
    msg = json.loads(data)
    if not isinstance(msg, dict) or not {"v", "t", "peer", "udp"} <= set(msg) <= {"v", "t", "peer", "udp", "host"} \
            or msg["v"] != 1 or msg["t"] != "lan":
        raise ValueError("not an announcement")
    peer, udp, host = msg["peer"], msg["udp"], msg.get("host", "")
    if not isinstance(peer, str) or len(peer) != 32 or any(c not in "0123456789abcdef" for c in peer):
        raise ValueError("bad peer id")
    if not isinstance(udp, int) or isinstance(udp, bool) or not 0 < udp < 65536:
        raise ValueError("bad port")
    if host and not (isinstance(host, str) and is_ip(host) and ":" in host and not _link_local(host)):
        raise ValueError("bad host: an IPv6 address that is not link-local")
    return peer, udp, host


def _link_local(host: str) -> bool:
    return ipaddress.ip_address(host).is_link_local


def own_ipv6_addresses(path: str = "/proc/net/if_inet6") -> dict[int, str]:
    """Interface index -> one IPv6 address of this host on it that others can use (global or unique
    local, not link-local nor loopback), from Linux's table; empty elsewhere."""
    found: dict[int, str] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[3] != "00":  # scope: 00 global (unique local included)
            continue
        flags = int(fields[4], 16)
        if flags & 0x20 or flags & 0x40:  # tentative (still checking for duplicates) or deprecated
            continue
        text = ":".join(fields[0][i:i + 4] for i in range(0, 32, 4))
        found.setdefault(int(fields[1], 16), str(ipaddress.ip_address(text)))
    return found


def ipv6_multicast() -> bool:
    """Has this Python the socket options IPv6 multicast needs (Linux, the BSDs, macOS do)?"""
    return all(hasattr(socket, name) for name in ("IPV6_JOIN_GROUP", "IPV6_MULTICAST_IF", "IPV6_MULTICAST_HOPS",
                                                  "IPV6_MULTICAST_LOOP"))


def is_loopback(interface: str) -> bool:
    try:
        return socket.inet_aton(interface)[0] == 127
    except OSError:
        return interface == "localhost"


class LanDiscovery(DatagramProtocol):
    """Announces *peer_id* (listening on UDP *udp()*) on the group, and calls *found(address)* for
    each other peer heard there.  *seal*: a private network's ``DatagramSeal``."""

    log = Logger()

    def __init__(self, peer_id: str, udp: Callable[[], int], found: Callable[[Address], None], clock: Any,
                 counters: Any, seal: Any = None, group: str = GROUP, port: int = PORT,
                 interface: str = "", period: float = PERIOD, rng: Optional[random.Random] = None) -> None:
        self.peer_id, self.udp, self.found, self.clock, self.counters = peer_id, udp, found, clock, counters
        self.seal, self.group, self.port, self.interface, self.period = seal, group, port, interface, period
        self.rng = rng or random.Random()
        self._all = TokenBuckets(RATE, BURST, keys=1)
        self._per_source = TokenBuckets(PER_SOURCE, PER_SOURCE_BURST, keys=4096)
        self._calls: list[IDelayedCall] = []
        self._bad = RateLimitedLog(self.log, clock)
        self._send_failed = RateLimitedLog(self.log, clock, period=600.0, burst=1)

    def startProtocol(self) -> None:
        self._join_group()
        for delay in FIRST:
            self._calls.append(self.clock.callLater(delay, self.announce, delay == FIRST[-1]))

    def _join_group(self) -> None:
        t = self.transport
        t.setTTL(1)  # never past a router
        t.setLoopbackMode(True)  # several peers on one machine find each other too
        if self.interface:
            t.setOutgoingInterface(self.interface)
        d = t.joinGroup(self.group, self.interface or "")
        d.addErrback(lambda f: self.log.warn("LAN discovery could not join {group}: {error}", group=self.group,
                                             error=f.getErrorMessage()))

    def stopProtocol(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []

    def announce(self, keep_going: bool = False) -> None:
        self._announce()
        if keep_going:
            delay = self.period * (1 + self.rng.uniform(-JITTER, JITTER))
            self._calls = [c for c in self._calls if c.active()]
            self._calls.append(self.clock.callLater(delay, self.announce, True))

    def _announce(self) -> None:
        self._send(encode(self.peer_id, self.udp()), "send")

    def _send(self, data: bytes, key: Any) -> None:
        """One announcement to the group, sealed in a private network; a refusal counted and logged
        (rarely: no route for multicast, say, on a host without a default route)."""
        if self.seal is not None:
            data = self.seal.seal(data)
        try:
            self.transport.write(data, (self.group, self.port))
            self.counters.add("lan_announcements_sent")
        except OSError as e:
            self.counters.add("lan_send_errors")
            self._send_failed.warn(key, "LAN discovery cannot send to {group}: {error}", group=self.group,
                                   error=e.strerror or e)

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        now = self.clock.seconds()
        if not self._all.allow(None, now) or not self._per_source.allow(addr[0], now):
            self.counters.add("lan_dropped_rate_limited")
            return
        try:
            if self.seal is not None:
                if len(data) > MAX_ANNOUNCEMENT + self.seal.max_sealed:
                    raise ValueError("too long")
                data = self.seal.open(data, now)
            elif len(data) > MAX_ANNOUNCEMENT:
                raise ValueError("too long")
            peer, udp, host = decode(data)
        except Exception as e:  # anything on the group that is not an announcement of ours
            self.counters.add("lan_dropped_bad")
            self._bad.warn(addr[0], "dropped a datagram on the LAN group from {host}: {error}", host=addr[0],
                           error=str(e) or type(e).__name__)
            return
        if peer == self.peer_id:
            return  # our own, looped back
        source = plain_host(addr[0])  # a dual-stack socket hears IPv4 as ::ffff:a.b.c.d
        if ":" in source and _link_local(source):
            if not host:
                self.counters.add("lan_dropped_bad")  # a link-local source names no host we can reach
                return
            source = host
        self.counters.add("lan_announcements_received")
        self.found((source, udp))


class LanDiscovery6(LanDiscovery):
    """The same on IPv6: the link-local group ``ff02::7771``, joined on every interface with an address
    others can use; an announcement names that address (``host``), since its source is link-local."""

    def __init__(self, *args: Any, addresses: Callable[[], dict[int, str]] = own_ipv6_addresses,
                 **kwargs: Any) -> None:
        kwargs.setdefault("group", GROUP6)
        super().__init__(*args, **kwargs)
        self.addresses = addresses
        self._joined: set[int] = set()

    def _join_group(self) -> None:
        sock = self.transport.socket
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)
        self._join(self.addresses())

    def _join(self, addresses: dict[int, str]) -> None:
        group = socket.inet_pton(socket.AF_INET6, self.group)
        for index in addresses:
            if index in self._joined:
                continue
            try:
                self.transport.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                                                 group + struct.pack("@I", index))
                self._joined.add(index)
            except OSError as e:
                self._send_failed.warn(("join", index), "LAN discovery could not join {group} on interface "
                                       "{index}: {error}", group=self.group, index=index, error=e.strerror or e)

    def _announce(self) -> None:
        """Once on each interface that has an address others can use, naming that address."""
        addresses = self.addresses()
        self._join(addresses)  # an interface that came up since
        for index, host in addresses.items():
            try:
                self.transport.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            except OSError:  # the interface went away meanwhile
                continue
            self._send(encode(self.peer_id, self.udp(), host), ("send", index))
