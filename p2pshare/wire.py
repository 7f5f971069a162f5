"""Every message p2pshare puts on the wire: attrs classes, encode/decode, limits.

Pure: no I/O, no Twisted.  All three protocols carry JSON objects with a
version field ``"v": 1``; unknown fields are ignored so later versions can add
some.  ``docs/protocol.md`` is the specification; the limits below are its
numbers.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import unicodedata
from typing import Any, Callable, ClassVar, Optional, Union

from attrs import Attribute, evolve, field, frozen

from p2pshare.errors import InvalidName, MalformedMessage, MessageTooLarge, UnsupportedVersion

VERSION = 1
MAX_DATAGRAM = 4096  # bytes of one search datagram (a query with the longest name fits)
MAX_FRAME = 4096  # bytes of one transfer control line, newline excluded
MAX_TRACKER_LINE = 16384  # bytes of one tracker line, newline excluded (100 peers fit)
MAX_NAME = 1024  # bytes of a file name in UTF-8
MAX_COMPONENT = 255  # bytes of one path component
MAX_TTL = 16  # the most a peer may be configured to forward (--ttl); larger TTLs on the wire are clamped
MAX_PEERS_ANSWER = 100  # peers in one tracker answer
MAX_RANGE = 64 * 1024 * 1024  # bytes asked for by one "get"
MAX_SIZE = 2**63 - 1
MIN_QUERY = 512  # bytes a query is padded to, at least ...
QUERY_HEADROOM = 320  # ... and at least this many more than its fields: room for an ack and a hit back
STATE_DIR = ".p2pshare"  # hidden per-peer state folder, never shared

Address = tuple[str, int]

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
def is_ip(host: object) -> bool:
    """An IPv4 or IPv6 address literal (datagrams and peer lists carry addresses, never names)."""
    return type(host) is str and 2 <= len(host) <= 45 and _parses_as_ip(host)


@functools.lru_cache(maxsize=4096)  # every datagram carries addresses, mostly the same few hundred
def _parses_as_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def plain_host(host: str) -> str:
    """An address as peers name it: an IPv4 address that reached a dual-stack (IPv6) socket as
    ``::ffff:a.b.c.d`` is ``a.b.c.d`` again; IPv6 addresses in their compressed form."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def is_ipv6(host: str) -> bool:
    return ":" in host


def mapped(host: str) -> str:
    """*host* as a dual-stack IPv6 socket addresses it: IPv4 as ``::ffff:a.b.c.d``."""
    return host if ":" in host else f"::ffff:{host}"


def is_sha256(value: object) -> bool:
    return type(value) is str and _HEX64.match(value) is not None


def validate_name(name: object) -> str:
    """Return *name* if it is an acceptable shared-file name, else raise InvalidName.

    A name is a relative path with ``/`` separators: no empty, ``.`` or ``..``
    component, no backslash, no NUL or other control character, NFC-normalised,
    at most MAX_NAME bytes, and not inside the state folder.
    """
    if not isinstance(name, str) or not name:
        raise InvalidName("the file name is empty")
    problem = _name_problem(name)  # a flood carries one name to every peer many times: cache
    if problem is not None:
        raise InvalidName(problem)
    return name


@functools.lru_cache(maxsize=4096)
def _name_problem(name: str) -> Optional[str]:
    try:
        _check_name(name)
    except InvalidName as e:
        return str(e)
    return None


def _check_name(name: str) -> str:
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName("the file name is not valid UTF-8") from None
    if len(encoded) > MAX_NAME:
        raise InvalidName(f"the file name is longer than {MAX_NAME} bytes")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise InvalidName(f"the file name {name[:80]!r} contains a control character")
    if "\\" in name:
        raise InvalidName(f"the file name {name!r} contains a backslash")
    if name.startswith("/"):
        raise InvalidName(f"the file name {name!r} is absolute")
    if unicodedata.normalize("NFC", name) != name:
        raise InvalidName(f"the file name {name!r} is not in Unicode normal form C")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidName(f"the file name {name!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            raise InvalidName(f"a component of {name[:80]!r} is longer than {MAX_COMPONENT} bytes")
    if parts[0] == STATE_DIR:
        raise InvalidName(f"the file name {name!r} is inside the state folder")
    return name


# -- attrs validators: exact types (a bool is not an int), bounded values ------------------


def _int(lo: int, hi: int) -> Callable[[Any, Attribute, Any], None]:
    def check(_: Any, a: Attribute, v: Any) -> None:
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"{a.name} must be an integer in [{lo}, {hi}]")

    return check


def _match(pattern: re.Pattern[str]) -> Callable[[Any, Attribute, Any], None]:
    def check(_: Any, a: Attribute, v: Any) -> None:
        if type(v) is not str or not pattern.match(v):
            raise ValueError(f"{a.name} is not well formed")

    return check


def _name(_: Any, a: Attribute, v: Any) -> None:
    try:
        validate_name(v)
    except InvalidName as e:
        raise ValueError(str(e)) from None


def _bool(_: Any, a: Attribute, v: Any) -> None:
    if type(v) is not bool:
        raise ValueError(f"{a.name} must be true or false")


def _address(_: Any, a: Attribute, v: Any) -> None:
    if (
        type(v) is not tuple
        or len(v) != 2
        or not is_ip(v[0])
        or type(v[1]) is not int
        or not 0 < v[1] < 65536
    ):
        raise ValueError(f"{a.name} must be [host, port]")


def _to_address(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


_peer_id = _match(_HEX32)
_request_id = _match(_HEX32)
_sha256 = _match(_HEX64)


def _host(_: Any, a: Attribute, v: Any) -> None:
    if not is_ip(v):
        raise ValueError(f"{a.name} must be an IP address")

_port = _int(1, 65535)
_size = _int(0, MAX_SIZE)


def _loads(data: bytes, limit: int) -> dict[str, Any]:
    """Parse one JSON object of at most *limit* bytes and check its version."""
    if len(data) > limit:
        raise MessageTooLarge(f"{len(data)} bytes, limit {limit}")
    try:
        obj = _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise MalformedMessage(f"not JSON: {data[:64]!r}") from e
    if not isinstance(obj, dict):
        raise MalformedMessage("not a JSON object")
    if type(obj.get("v")) is not int or obj["v"] != VERSION:
        raise UnsupportedVersion(f"version {obj.get('v')!r}, this peer speaks {VERSION}")
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _build(cls: type, obj: dict[str, Any], names: tuple[str, ...], optional: tuple[str, ...] = ()) -> Any:
    """Construct *cls* from the named keys of *obj*; attrs validators do the checking."""
    try:
        kwargs = {n: obj[n] for n in names}
        kwargs.update({n: obj[n] for n in optional if n in obj})
        return cls(**kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise MalformedMessage(f"bad {obj.get('t') or obj.get('op')!r} message: {e}") from e


# -- search datagrams (UDP) -------------------------------------------------------------


def _maybe_empty_host(_: Any, a: Attribute, v: Any) -> None:
    """An address whose host may be empty: "the host this datagram came from"."""
    if type(v) is tuple and len(v) == 2 and v[0] == "":
        _address(_, a, ("0.0.0.0", v[1]))
    else:
        _address(_, a, v)



@frozen
class Query:
    """Who has *name* (or, with ``sha256``, that content under any name)?

    Sent to neighbours, forwarded with ttl - 1 and hops + 1.  ``name`` may be
    empty only when ``sha256`` is given.
    """

    id: str = field(validator=_request_id)
    name: str = field(validator=lambda _, a, v: v == "" or _name(_, a, v))
    udp: Address = field(converter=_to_address, validator=_maybe_empty_host)
    tcp: Address = field(converter=_to_address, validator=_maybe_empty_host)
    ttl: int = field(validator=_int(0, 255))
    hops: int = field(default=0, validator=_int(0, 255))
    fetch: bool = field(default=False, validator=_bool)
    sha256: str = field(default="", validator=lambda _, a, v: v == "" or _sha256(_, a, v))
    TYPE: ClassVar[str] = "query"

    def __attrs_post_init__(self) -> None:
        if not self.name and not self.sha256:
            raise ValueError("a query needs a name or a sha256")

    def encode(self, ttl: Optional[int] = None, hops: Optional[int] = None) -> bytes:
        """The datagram; with *ttl* and *hops*, a copy of it that differs only in those."""
        obj = {"v": VERSION, "t": "query", "id": self.id, "name": self.name, "udp": list(self.udp),
               "tcp": list(self.tcp), "ttl": self.ttl if ttl is None else ttl,
               "hops": self.hops if hops is None else hops, "fetch": self.fetch}
        if self.sha256:
            obj["sha256"] = self.sha256
        bare = _dumps(obj)
        # Padding: a query brings its sender the credit for the ack and the hit it may get back
        # (search.ReturnBudget); never longer than a datagram may be.
        room = QUERY_HEADROOM + (0 if self.name else MAX_NAME)  # asked by content: the hit names the file
        pad = min(max(MIN_QUERY - len(bare), room), MAX_DATAGRAM - len(bare) - 10)
        if pad <= 0:
            return bare
        return b'%s,"pad":"%s"}' % (bare[:-1], b" " * pad)  # as _dumps would put it, last

    def forwarded(self, ttl: Optional[int] = None) -> "Query":
        """The copy to forward: *ttl* (default: ours) minus one, one hop more."""
        ttl = self.ttl if ttl is None else ttl
        return evolve(self, ttl=max(ttl - 1, 0), hops=min(self.hops + 1, 255))

    def with_sender(self, host: str) -> "Query":
        """Fill in an empty requester host with the address the datagram came from."""
        if self.udp[0] and self.tcp[0]:
            return self
        return evolve(self, udp=(self.udp[0] or host, self.udp[1]), tcp=(self.tcp[0] or host, self.tcp[1]))


@frozen
class Hit:
    """I have *name*: sent straight to the requester's UDP address."""

    id: str = field(validator=_request_id)
    name: str = field(validator=_name)
    size: int = field(validator=_size)
    sha256: str = field(validator=_sha256)
    tcp: Address = field(converter=_to_address, validator=_maybe_empty_host)
    peer: str = field(validator=_peer_id)
    hops: int = field(default=0, validator=_int(0, 255))
    TYPE: ClassVar[str] = "hit"

    def encode(self) -> bytes:
        return _dumps(
            {"v": VERSION, "t": "hit", "id": self.id, "name": self.name, "size": self.size,
             "sha256": self.sha256, "tcp": list(self.tcp), "peer": self.peer, "hops": self.hops}
        )

    def with_sender(self, host: str) -> "Hit":
        if self.tcp[0]:
            return self
        return Hit(self.id, self.name, self.size, self.sha256, (host, self.tcp[1]), self.peer, self.hops)


@frozen
class Ack:
    """Received: stops the sender retransmitting the ``kind`` datagram with this ``id``."""

    id: str = field(validator=_request_id)
    kind: str = field(validator=lambda _, a, v: _check_ack_kind(v))
    TYPE: ClassVar[str] = "ack"

    def encode(self) -> bytes:
        # Both fields are plain ASCII (hex and a fixed word): no JSON escaping is ever needed.
        return b'{"v":1,"t":"ack","id":"%s","kind":"%s"}' % (self.id.encode(), self.kind.encode())


def _check_ack_kind(v: Any) -> None:
    if v not in ("query", "hit"):
        raise ValueError("kind must be 'query' or 'hit'")


MAX_HELLO_PEERS = 16


def _peer_addresses(_: Any, a: Attribute, v: Any) -> None:
    if type(v) is not tuple or len(v) > MAX_HELLO_PEERS:
        raise ValueError(f"{a.name} must be a list of at most {MAX_HELLO_PEERS} addresses")
    for addr in v:
        _address(_, a, addr)


@frozen
class Hello:
    """I am your neighbour (keeps links two-way), and here are some of mine (peer exchange)."""

    peer: str = field(validator=_peer_id)
    peers: tuple[Address, ...] = field(converter=lambda v: tuple(_to_address(x) for x in v) if isinstance(
        v, (list, tuple)) else v, validator=_peer_addresses)
    TYPE: ClassVar[str] = "hello"

    def encode(self) -> bytes:
        return _dumps({"v": VERSION, "t": "hello", "peer": self.peer, "peers": [list(p) for p in self.peers]})


Datagram = Union[Query, Hit, Ack, Hello]


def decode_datagram(data: bytes) -> Datagram:
    """Decode one search datagram; raise MalformedMessage (or a subclass) for anything else."""
    obj = _loads(data, MAX_DATAGRAM)
    t = obj.get("t")
    if t == "query":
        return _build(Query, obj, ("id", "name", "udp", "tcp", "ttl", "hops", "fetch"), ("sha256",))
    if t == "hit":
        return _build(Hit, obj, ("id", "name", "size", "sha256", "tcp", "peer", "hops"))
    if t == "ack":
        return _build(Ack, obj, ("id", "kind"))
    if t == "hello":
        return _build(Hello, obj, ("peer", "peers"))
    raise MalformedMessage(f"unknown datagram type {t!r}")


# -- tracker (TCP, one JSON object a line) --------------------------------------------


@frozen
class PeerInfo:
    """One peer as the tracker knows it: id and the addresses others reach it at."""

    peer: str = field(validator=_peer_id)
    host: str = field(validator=_host)
    udp: int = field(validator=_port)
    tcp: int = field(validator=_port)

    def encode(self) -> bytes:
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        # Hex id and IP literal: nothing to escape, so no JSON encoder on the tracker's hot path; and
        # once per peer, since a tracker puts the same entries in answer after answer.
        return b'{"peer":"%s","host":"%s","udp":%d,"tcp":%d}' % (
            self.peer.encode(), self.host.encode(), self.udp, self.tcp)


TRACKER_OPS = ("register", "heartbeat", "leave", "peers")


@frozen
class TrackerRequest:
    """A request to the tracker; ``id`` pairs it with its reply (requests may be pipelined)."""

    op: str = field(validator=lambda _, a, v: _check_op(v))
    id: int = field(validator=_int(0, 2**31 - 1))
    peer: Optional[str] = field(default=None)
    udp: int = field(default=0, validator=_int(0, 65535))
    tcp: int = field(default=0, validator=_int(0, 65535))
    host: Optional[str] = field(default=None)
    max: int = field(default=20, validator=_int(0, MAX_PEERS_ANSWER))

    def __attrs_post_init__(self) -> None:
        if self.op in ("register", "heartbeat", "leave"):
            _peer_id(None, TrackerRequest.__attrs_attrs__.peer, self.peer)
        elif self.peer is not None:
            _peer_id(None, TrackerRequest.__attrs_attrs__.peer, self.peer)
        if self.op == "register":
            _port(None, TrackerRequest.__attrs_attrs__.udp, self.udp)
            _port(None, TrackerRequest.__attrs_attrs__.tcp, self.tcp)
        if self.host is not None and self.host != "":  # "" (like no host): the connection's source address
            _host(None, TrackerRequest.__attrs_attrs__.host, self.host)

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"v": VERSION, "op": self.op, "id": self.id}
        if self.peer is not None:
            obj["peer"] = self.peer
        if self.op == "register":
            obj.update(udp=self.udp, tcp=self.tcp)
            if self.host:
                obj["host"] = self.host
        if self.op == "peers":
            obj["max"] = self.max
        return _dumps(obj)

    @classmethod
    def decode(cls, data: bytes) -> "TrackerRequest":
        beat = _HEARTBEAT.fullmatch(data)  # most requests, as this implementation writes them
        if beat is not None and int(beat[1]) < 2**31:
            return cls("heartbeat", int(beat[1]), beat[2].decode())
        obj = _loads(data, MAX_TRACKER_LINE)
        return _build(cls, obj, ("op", "id"), ("peer", "udp", "tcp", "host", "max"))


_HEARTBEAT = re.compile(rb'\{"v":1,"op":"heartbeat","id":(0|[1-9][0-9]{0,9}),"peer":"([0-9a-f]{32})"\}')


def _check_op(op: Any) -> None:
    if not isinstance(op, str) or op not in TRACKER_OPS:
        raise ValueError(f"unknown op {op!r}")


@frozen
class TrackerReply:
    """The tracker's answer: ``ok`` with op-specific fields, or an error code and message."""

    id: int = field(validator=_int(0, 2**31 - 1))
    ok: bool = field(validator=_bool)
    error: str = ""
    message: str = ""
    host: str = ""
    interval: float = 0.0
    peers: Optional[tuple[PeerInfo, ...]] = None  # present in every answer to "peers"

    def encode(self) -> bytes:
        if self.ok and not self.host and not self.interval:  # heartbeats and peers: most replies
            head = b'{"v":%d,"id":%d,"ok":true' % (VERSION, self.id)
            if self.peers is None:
                return head + b"}"
            return head + b',"peers":[' + b",".join(p.encode() for p in self.peers) + b"]}"
        obj: dict[str, Any] = {"v": VERSION, "id": self.id, "ok": self.ok}
        if not self.ok:
            obj.update(error=self.error, message=self.message)
        if self.host:
            obj["host"] = self.host
        if self.interval:
            obj["interval"] = self.interval
        if self.peers is None:
            return _dumps(obj)
        head = _dumps(obj)[:-1]  # without the closing brace
        return head + b',"peers":[' + b",".join(p.encode() for p in self.peers) + b"]}"

    @classmethod
    def decode(cls, data: bytes) -> "TrackerReply":
        obj = _loads(data, MAX_TRACKER_LINE)
        try:
            raw = obj.get("peers")
            peers = None
            if raw is not None:
                if not isinstance(raw, list) or len(raw) > MAX_PEERS_ANSWER:
                    raise ValueError(f"peers must be a list of at most {MAX_PEERS_ANSWER}")
                peers = tuple(PeerInfo(p["peer"], p["host"], p["udp"], p["tcp"]) for p in raw)
            interval = obj.get("interval", 0.0)
            if type(interval) not in (int, float) or not 0 <= interval <= 3600:
                raise ValueError("interval out of range")
            texts = [obj.get(k, "") for k in ("error", "message", "host")]
            if any(type(t) is not str or len(t) > 512 for t in texts):
                raise ValueError("error, message and host must be short strings")
            return cls(obj["id"], obj["ok"], *texts, float(interval), peers)
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedMessage(f"bad tracker reply: {e}") from e


# -- transfer (TCP: JSON control lines, raw bytes after a "data" line) -------------------


# A partial holder's verified pieces: one bit a piece (piece 0 is the high bit of the first
# byte), in hex; at most 2048 pieces (a manifest's limit).
MAX_HAVE_BYTES = 256
_HAVE = re.compile(r"(?:[0-9a-f]{2}){0,%d}\Z" % MAX_HAVE_BYTES)


def have_bits(have: str, count: int) -> Optional[bytearray]:
    """The pieces a ``have`` bitmap marks, one byte (0/1) a piece; None unless it has *count* pieces."""
    packed = bytes.fromhex(have)
    if len(packed) != -(-count // 8) or (count % 8 and packed and packed[-1] & (0xFF >> (count % 8))):
        return None
    return bytearray((packed[i // 8] >> (7 - i % 8)) & 1 for i in range(count))


def pack_have(have: bytes | bytearray) -> str:
    """The bitmap ``have_bits`` reads, of one byte (0/1) a piece."""
    packed = bytearray(-(-len(have) // 8))
    for i, bit in enumerate(have):
        if bit:
            packed[i // 8] |= 0x80 >> (i % 8)
    return packed.hex()


@frozen
class Frame:
    """One transfer control line.  ``t`` is one of FRAME_FIELDS; unused fields keep defaults."""

    t: str = field(validator=lambda _, a, v: _check_frame(v))
    id: str = field(default="", validator=lambda _, a, v: v == "" or _request_id(_, a, v))
    name: str = field(default="", validator=lambda _, a, v: v == "" or _name(_, a, v))
    size: int = field(default=0, validator=_size)
    sha256: str = field(default="", validator=lambda _, a, v: v == "" or _sha256(_, a, v))
    offset: int = field(default=0, validator=_size)
    length: int = field(default=0, validator=_int(0, MAX_RANGE))
    peer: str = field(default="", validator=lambda _, a, v: v == "" or _peer_id(_, a, v))
    piece: int = field(default=0, validator=_int(0, MAX_SIZE))
    root: str = field(default="", validator=lambda _, a, v: v == "" or _sha256(_, a, v))
    root3: str = field(default="", validator=lambda _, a, v: v == "" or _sha256(_, a, v))  # 64 hex digits too
    hash: str = field(default="", validator=_match(re.compile(r"(sha256|blake3)?\Z")))
    code: str = field(default="", validator=_match(re.compile(r"[a-z_]{0,32}\Z")))
    message: str = field(default="", validator=lambda _, a, v: _short_text(a, v))
    have: str = field(default="", validator=_match(_HAVE))
    window: int = field(default=0, validator=_int(0, 65535))

    def __attrs_post_init__(self) -> None:
        for required in FRAME_FIELDS[self.t]:
            if getattr(self, required) == "":
                raise ValueError(f"{self.t!r} frame needs {required!r}")

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"v": VERSION, "t": self.t}
        for name in FRAME_FIELDS[self.t] + FRAME_OPTIONAL[self.t]:
            obj[name] = getattr(self, name)
        for name in _LEFT_OUT_WHEN_EMPTY:
            if not obj.get(name, True):
                del obj[name]
        return _dumps(obj)

    @classmethod
    def decode(cls, data: bytes) -> "Frame":
        obj = _loads(data, MAX_FRAME)
        t = obj.get("t")
        if not isinstance(t, str) or t not in FRAME_FIELDS:
            raise MalformedMessage(f"unknown frame type {t!r}")
        return _build(cls, obj, ("t",) + FRAME_FIELDS[t], FRAME_OPTIONAL[t])


# Optional fields written only when they have a value: a complete holder's offer has no ``have``, one
# without a BLAKE3 manifest no ``root3``; ``manifest`` asks for the SHA-256 one without ``hash``.
_LEFT_OUT_WHEN_EMPTY = ("have", "window", "root3", "hash")

# Required and optional fields of each frame type.
FRAME_FIELDS: dict[str, tuple[str, ...]] = {
    "open": ("name",),
    "offer": ("name", "size", "sha256", "peer"),
    "get": ("offset", "length"),
    "data": ("offset", "length"),
    "decline": (),
    "bye": (),
    "error": ("code",),
    "manifest": (),
    "pieces": ("length",),
    "have": ("piece",),
}
FRAME_OPTIONAL: dict[str, tuple[str, ...]] = {
    "open": ("id", "sha256"),
    "offer": ("id", "piece", "root", "root3", "have", "window"),
    "get": (),
    "data": (),
    "decline": (),
    "bye": (),
    "error": ("message",),
    "manifest": ("hash",),
    "pieces": (),
    "have": (),
}


def _short_text(a: Attribute, v: Any) -> None:
    if type(v) is not str or len(v) > 512:
        raise ValueError(f"{a.name} must be a string of at most 512 characters")


def _check_frame(t: Any) -> None:
    if not isinstance(t, str) or t not in FRAME_FIELDS:
        raise ValueError(f"unknown frame type {t!r}")
