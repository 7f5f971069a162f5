"""The transfer protocol on in-memory transports: both roles, ranges, verification, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import IO, Optional

import pytest
from blake3 import blake3
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from p2pshare.errors import NotFound, TransferFailed, VerificationFailed
from p2pshare.shares import Entry, Shares, scan
from p2pshare.download import RANGE, Download, synchronously
from p2pshare.pieces import WINDOW_BYTES
from p2pshare.transfer import MAX_GET, ITransferNode, TransferFactory, TransferProtocol, manifest_root
from p2pshare.wire import MAX_FRAME, Frame

PEER = "b" * 32
RID = "d" * 32


@implementer(ITransferNode)
class Node:
    """A node backed by a real shared folder; offers are accepted into ``self.download``."""

    peer_id = PEER

    def __init__(self, shares: Shares, accept: bool = True) -> None:
        self.shares, self.accept = shares, accept
        self.download: Optional[Download] = None
        self.tracked: set[TransferProtocol] = set()
        self.bytes_sent = 0
        self.suspects: list[str] = []

    def open_for_sending(self, frame: Frame) -> tuple[Entry, IO[bytes], Optional[Download]]:
        return (*self.shares.open_for_reading(frame.name), None)

    def sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes

    def suspect(self, entry: Entry) -> None:
        self.suspects.append(entry.name)

    def accept_offer(self, frame: Frame, proto: TransferProtocol) -> Optional[Download]:
        if not self.accept:
            return None
        self.download = Download(self.shares, frame.name, frame.size, frame.sha256, executor=synchronously,
                                 piece_size=frame.piece, root=manifest_root(frame))
        return self.download

    def track(self, proto: TransferProtocol, alive: bool) -> None:
        (self.tracked.add if alive else self.tracked.discard)(proto)


def connect(node: Node, proto: Optional[TransferProtocol] = None,
            clock: Optional[Clock] = None) -> tuple[TransferProtocol, StringTransport]:
    if proto is None:
        proto = TransferFactory(node, clock=clock or Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    else:
        proto.callLater = (clock or Clock()).callLater  # type: ignore[method-assign]  # idle timer
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def frames(transport: StringTransport) -> list[dict]:
    out = []
    for line in transport.value().split(b"\n"):
        if line.startswith(b"{"):
            out.append(json.loads(line))
    return out


def holder(share: Path, payload: bytes, name: str = "blob.bin") -> Node:
    (share / name).write_bytes(payload)
    s = Shares(share)
    s.entries = scan(share, {})
    return Node(s)


def drain(transport: StringTransport) -> None:
    """Act as the consumer's event loop: resume the producer until it unregisters."""
    while transport.producer is not None:
        transport.producer.resumeProducing()


# -- the holder's side ------------------------------------------------------------------


def test_open_is_answered_with_an_offer(share: Path) -> None:
    payload = b"x" * 1000
    proto, transport = connect(holder(share, payload))
    proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
    (offer,) = frames(transport)
    piece = hashlib.sha256(payload).digest()
    assert offer == {"v": 1, "t": "offer", "name": "blob.bin", "size": 1000,
                     "sha256": hashlib.sha256(payload).hexdigest(), "peer": PEER, "id": RID,
                     "piece": 1024 * 1024, "root": hashlib.sha256(piece).hexdigest(), "window": 64}


class SlowTransport(StringTransport):
    """A transport whose buffer is full after every write: it pauses its producer each time."""

    def __init__(self) -> None:
        super().__init__()
        self.registrations: list[bool] = []

    def registerProducer(self, producer: object, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        self.registrations.append(streaming)

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()


def test_ranges_are_streamed_through_a_registered_push_producer(share: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    node = holder(share, payload)
    proto = TransferFactory(node, clock=Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = SlowTransport()
    proto.makeConnection(transport)
    proto.dataReceived(Frame("open", name="blob.bin").encode() + b"\n")
    transport.clear()
    proto.dataReceived(Frame("get", offset=100, length=700_000).encode() + b"\n")
    assert transport.registrations == [True]
    drain(transport)
    header, _, body = transport.value().partition(b"\n")
    assert json.loads(header) == {"v": 1, "t": "data", "offset": 100, "length": 700_000}
    assert body == payload[100:700_100]


def test_a_paused_producer_stops_reading_the_file(share: Path) -> None:
    payload = b"y" * (4 * 1024 * 1024)
    proto = TransferFactory(holder(share, payload), clock=Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = SlowTransport()
    proto.makeConnection(transport)
    proto.dataReceived(Frame("open", name="blob.bin").encode() + b"\n")
    transport.clear()
    proto.dataReceived(Frame("get", offset=0, length=len(payload)).encode() + b"\n")
    sent_before = len(transport.value())
    assert sent_before <= 1024 * 1024 + 100  # the data line and one chunk, then paused
    transport.producer.resumeProducing()
    assert sent_before < len(transport.value()) <= 2 * 1024 * 1024 + 100


def test_a_range_outside_the_file_closes_the_connection(share: Path) -> None:
    proto, transport = connect(holder(share, b"z" * 10))
    proto.dataReceived(Frame("open", name="blob.bin").encode() + b"\n")
    transport.clear()
    proto.dataReceived(Frame("get", offset=5, length=6).encode() + b"\n")
    assert frames(transport)[0]["code"] == "bad_range"
    assert transport.disconnecting


def test_opening_a_file_that_is_not_shared_is_refused(share: Path) -> None:
    proto, transport = connect(holder(share, b"z"))
    proto.dataReceived(Frame("open", name="other.bin").encode() + b"\n")
    assert frames(transport)[0]["code"] == "not_found"
    assert transport.disconnecting


def test_get_before_open_is_refused(share: Path) -> None:
    proto, transport = connect(holder(share, b"z"))
    proto.dataReceived(Frame("get", offset=0, length=1).encode() + b"\n")
    assert frames(transport)[0]["code"] == "unexpected"
    assert transport.disconnecting


@pytest.mark.parametrize("line", [b"garbage", b'{"v":1,"t":"open","name":"../../etc/passwd"}', b"{}"])
def test_malformed_lines_close_the_connection(share: Path, line: bytes) -> None:
    proto, transport = connect(holder(share, b"z"))
    proto.dataReceived(line + b"\n")
    assert frames(transport)[0]["code"] == "malformed"
    assert transport.disconnecting


def test_an_oversized_line_closes_the_connection(share: Path) -> None:
    proto, transport = connect(holder(share, b"z"))
    proto.dataReceived(b"x" * (MAX_FRAME + 10))
    assert frames(transport)[0]["code"] == "too_long"
    assert transport.disconnecting


def test_an_idle_connection_times_out(share: Path) -> None:
    clock = Clock()
    proto, transport = connect(holder(share, b"z"), clock=clock)
    clock.advance(29)
    assert not transport.disconnecting
    proto.dataReceived(Frame("open", name="blob.bin").encode() + b"\n")
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    proto.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_a_trickle_of_bytes_does_not_hold_the_connection_open(share: Path) -> None:
    clock = Clock()
    proto, transport = connect(holder(share, b"z"), clock=clock)
    for byte in b'{"v":1,"t":"op':  # never a whole line
        proto.dataReceived(bytes([byte]))
        clock.advance(3)
    assert transport.disconnecting  # 30 s after connecting, whatever trickled in
    proto.connectionLost(None)


def test_a_range_that_fails_on_its_first_read_is_reported(share: Path) -> None:
    node = holder(share, b"w" * 100_000)
    proto, transport = connect(node)
    proto.dataReceived(Frame("open", name="blob.bin").encode() + b"\n")
    (share / "blob.bin").write_bytes(b"")  # the file shrinks after it was opened
    transport.clear()
    proto.dataReceived(Frame("get", offset=0, length=100_000).encode() + b"\n")
    assert frames(transport)[-1]["code"] == "unavailable"
    assert transport.disconnecting


# -- the requester's side ---------------------------------------------------------------


def offer_for(payload: bytes, name: str = "got.bin", sha: Optional[str] = None) -> bytes:
    sha = sha or hashlib.sha256(payload).hexdigest()
    return Frame("offer", id=RID, name=name, size=len(payload), sha256=sha, peer=PEER).encode() + b"\n"


def serve(proto: TransferProtocol, transport: StringTransport, payload: bytes) -> None:
    """Play the holder: answer every 'get' the requester sent, in order."""
    done = 0
    while True:
        gets = [f for f in frames(transport) if f["t"] == "get"]
        if done == len(gets):
            return
        for g in gets[done:]:
            chunk = payload[g["offset"]: g["offset"] + g["length"]]
            header = Frame("data", offset=g["offset"], length=g["length"]).encode() + b"\n"
            data = header + chunk
            for i in range(0, len(data), 65536):  # arrive in TCP-sized pieces
                proto.dataReceived(data[i: i + 65536])
        done = len(gets)


def test_an_accepted_offer_is_fetched_by_ranges_verified_and_placed(share: Path) -> None:
    payload = bytes(range(256)) * (RANGE // 256 * 2 + 10)  # more than two ranges
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(payload))
    first = [f for f in frames(transport) if f["t"] == "get"]
    # Without a manifest the pieces are RANGE bytes, asked for in gets of at most MAX_GET, up to
    # the window of bytes in flight.
    assert all(g["length"] <= MAX_GET and g["offset"] % MAX_GET == 0 for g in first)
    assert WINDOW_BYTES <= sum(g["length"] for g in first) < WINDOW_BYTES + MAX_GET
    placed: list[Path] = []
    assert node.download is not None
    node.download.done.addCallback(placed.append)
    serve(proto, transport, payload)
    assert placed == [share / "got.bin"]
    assert (share / "got.bin").read_bytes() == payload
    assert frames(transport)[-1]["t"] == "bye"
    assert list((share / ".p2pshare" / "tmp").iterdir()) == []


def test_an_empty_file_needs_no_ranges(share: Path) -> None:
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(b"", name="empty"))
    assert (share / "empty").read_bytes() == b""


def test_content_that_does_not_match_the_hash_is_never_placed(share: Path) -> None:
    payload = b"p" * 5000
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(payload, sha="0" * 64))
    failures: list = []
    assert node.download is not None
    node.download.done.addErrback(failures.append)
    serve(proto, transport, payload)
    assert failures and failures[0].check(VerificationFailed)
    assert not (share / "got.bin").exists()
    assert list((share / ".p2pshare" / "tmp").iterdir()) == []


def test_a_connection_lost_mid_transfer_gives_its_claims_back(share: Path) -> None:
    payload = b"q" * 100_000
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(payload))
    proto.dataReceived(Frame("data", offset=0, length=len(payload)).encode() + b"\n" + payload[:5000])
    download = node.download
    assert download is not None and download.sources == {proto.requester}
    assert download.picker.claims == {0: {proto.requester}}
    proto.connectionLost(None)
    assert download.sources == set() and download.picker.claims == {}  # free for another source
    assert not (share / "got.bin").exists()


def test_data_that_was_not_asked_for_closes_the_connection(share: Path) -> None:
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(b"r" * 100))
    transport.clear()
    proto.dataReceived(Frame("data", offset=50, length=50).encode() + b"\n")
    assert frames(transport)[0]["code"] == "bad_range"
    assert transport.disconnecting


def test_a_declined_offer_is_answered_with_decline(share: Path) -> None:
    proto, transport = connect(Node(Shares(share), accept=False))
    proto.dataReceived(offer_for(b"s"))
    assert frames(transport) == [{"v": 1, "t": "decline"}]
    assert transport.disconnecting


def test_the_greeting_is_sent_on_connect(share: Path) -> None:
    node = Node(Shares(share))
    proto = TransferProtocol(node, greeting=Frame("open", id=RID, name="x"))
    _, transport = connect(node, proto)
    assert frames(transport) == [{"v": 1, "t": "open", "name": "x", "id": RID, "sha256": ""}]
    assert node.tracked == {proto}


def test_the_holders_error_is_kept_and_closes_the_connection(share: Path) -> None:
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(b"t" * 10))
    proto.dataReceived(Frame("error", code="unavailable", message="disk on fire").encode() + b"\n")
    assert "disk on fire" in str(proto.error) and transport.disconnecting


def test_a_manifest_is_asked_for_and_checked_against_the_root(share: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    pieces = b"".join(hashlib.sha256(payload[i: i + 1024 * 1024]).digest() for i in range(0, len(payload), 1 << 20))
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(Frame("offer", id=RID, name="got.bin", size=len(payload),
                             sha256=hashlib.sha256(payload).hexdigest(), peer=PEER, piece=1024 * 1024,
                             root=hashlib.sha256(pieces).hexdigest()).encode() + b"\n")
    assert frames(transport)[-1] == {"v": 1, "t": "manifest"}
    transport.clear()
    proto.dataReceived(Frame("pieces", length=len(pieces)).encode() + b"\n" + pieces)
    asked = [(f["offset"], f["length"]) for f in frames(transport)]
    # The window starts at two gets (slow start), here two pieces.
    assert len(asked) == 2 and all(length == 1 << 20 and offset % (1 << 20) == 0 for offset, length in asked)


def test_a_manifest_that_does_not_hash_to_the_root_closes_the_connection(share: Path) -> None:
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(Frame("offer", id=RID, name="got.bin", size=3 * MIB, sha256="a" * 64, peer=PEER,
                             piece=MIB, root="b" * 64).encode() + b"\n")
    transport.clear()
    proto.dataReceived(Frame("pieces", length=96).encode() + b"\n" + b"x" * 96)
    assert frames(transport)[0]["code"] == "bad_manifest" and transport.disconnecting


def test_a_holder_offering_a_name_outside_the_folder_is_refused(share: Path) -> None:
    node = Node(Shares(share))
    proto, transport = connect(node)
    for name in ("../../.bashrc", "/etc/x", "..\\x"):
        line = json.dumps({"v": 1, "t": "offer", "name": name, "size": 1, "sha256": "a" * 64, "peer": PEER})
        proto, transport = connect(node)
        proto.dataReceived(line.encode() + b"\n")
        assert frames(transport)[0]["code"] == "malformed" and transport.disconnecting
    assert node.download is None and list(share.parent.iterdir()) == [share]


def test_open_for_reading_raises_not_found_through_the_node(share: Path) -> None:
    with pytest.raises(NotFound):
        holder(share, b"u").open_for_sending(Frame("open", name="missing"))


def test_a_one_piece_file_needs_no_manifest_round_trip(share: Path) -> None:
    payload = b"small" * 1000
    digest = hashlib.sha256(payload).digest()
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(Frame("offer", id=RID, name="got.bin", size=len(payload), sha256=digest.hex(), peer=PEER,
                             piece=1024 * 1024, root=hashlib.sha256(digest).hexdigest()).encode() + b"\n")
    assert [f["t"] for f in frames(transport)] == ["get"]  # straight to the data


# -- BLAKE3 manifests ---------------------------------------------------------------------


def _b3(payload: bytes) -> bytes:
    return b"".join(blake3(payload[i: i + 1024 * 1024]).digest() for i in range(0, len(payload), 1 << 20))


def test_a_holder_offers_both_manifests_and_sends_the_blake3_one_when_asked(share: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 5)
    node = holder(share, payload)
    proto, transport = connect(node)
    proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
    (offer,) = frames(transport)
    sha_pieces = b"".join(hashlib.sha256(payload[i: i + (1 << 20)]).digest() for i in range(0, len(payload), 1 << 20))
    assert offer["root"] == hashlib.sha256(sha_pieces).hexdigest()
    assert offer["root3"] == blake3(_b3(payload)).hexdigest()
    transport.clear()
    proto.dataReceived(Frame("manifest", hash="blake3").encode() + b"\n")
    line, pieces = transport.value().split(b"\n", 1)
    assert json.loads(line) == {"v": 1, "t": "pieces", "length": 4 * 32} and pieces == _b3(payload)
    transport.clear()
    proto.dataReceived(Frame("manifest").encode() + b"\n")  # and the SHA-256 one to a requester without BLAKE3
    assert transport.value().split(b"\n", 1)[1] == sha_pieces


def test_a_one_piece_file_is_offered_without_a_blake3_manifest(share: Path) -> None:
    proto, transport = connect(holder(share, b"small" * 100))
    proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
    (offer,) = frames(transport)
    assert "root3" not in offer and offer["root"]


def test_a_requester_verifies_pieces_with_the_blake3_manifest_when_offered(share: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 5)
    b3 = _b3(payload)
    sha_pieces = b"".join(hashlib.sha256(payload[i: i + (1 << 20)]).digest() for i in range(0, len(payload), 1 << 20))
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(Frame("offer", id=RID, name="got.bin", size=len(payload),
                             sha256=hashlib.sha256(payload).hexdigest(), peer=PEER, piece=1 << 20,
                             root=hashlib.sha256(sha_pieces).hexdigest(),
                             root3=blake3(b3).hexdigest()).encode() + b"\n")
    assert frames(transport)[-1] == {"v": 1, "t": "manifest", "hash": "blake3"}
    transport.clear()
    proto.dataReceived(Frame("pieces", length=len(b3)).encode() + b"\n" + b3)
    d = node.download
    assert d is not None and d.pieces == b3
    sent: set[tuple[int, int]] = set()
    while not d.done.called and proto.open:
        for f in frames(transport):
            if f["t"] == "get" and (f["offset"], f["length"]) not in sent and proto.open:
                sent.add((f["offset"], f["length"]))
                body = bytearray(payload[f["offset"]: f["offset"] + f["length"]])
                if len(sent) == 2:
                    body[-1] ^= 1  # the second range asked for arrives corrupted, the others whole
                proto.dataReceived(Frame("data", offset=f["offset"], length=f["length"]).encode() + b"\n" + body)
    # The corrupted piece is caught by its BLAKE3 digest: that holder is dropped, nothing placed.
    assert proto.requester.dropped and not (share / "got.bin").exists()
    abandon(d)


def test_a_download_from_a_blake3_manifest_is_shared_with_it(share: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024 + 7)
    b3 = _b3(payload)
    shares = Shares(share)
    d = Download(shares, "got.bin", len(payload), hashlib.sha256(payload).hexdigest(), executor=synchronously,
                 piece_size=1 << 20, root="b3:" + blake3(b3).hexdigest())
    assert not d.set_manifest(b3[:-1] + bytes([b3[-1] ^ 1]))  # a manifest that is not the root's
    assert d.set_manifest(b3)
    source = object()
    while (rng := d.claim(source)) is not None:
        d.receive(source, rng[0], memoryview(payload[rng[0]: rng[0] + rng[1]]))
    assert d.done.called and (share / "got.bin").read_bytes() == payload
    entry = shares.lookup("got.bin")
    assert entry is not None and entry.pieces3 == b3 and entry.root3 == blake3(b3).hexdigest() and not entry.pieces


# -- swarming: serving the verified pieces of a download in progress -----------------------

MIB = 1024 * 1024


def _manifest(payload: bytes) -> tuple[bytes, str]:
    pieces = b"".join(hashlib.sha256(payload[i: i + MIB]).digest() for i in range(0, len(payload), MIB))
    return pieces, hashlib.sha256(pieces).hexdigest()


def manifest_offer(payload: bytes, **fields: str) -> tuple[bytes, bytes]:
    """The line of an offer of *payload* with a manifest of 1 MiB pieces, and that manifest."""
    pieces, root = _manifest(payload)
    frame = Frame("offer", id=RID, name="got.bin", size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                  peer=PEER, piece=MIB, root=root, **fields)
    return frame.encode() + b"\n", pieces


def abandon(download: Optional[Download]) -> None:
    """End a download a test leaves unfinished."""
    assert download is not None
    download.fail(TransferFailed("test over"))
    download.done.addErrback(lambda f: None)


class PartialNode(Node):
    """A peer part-way through downloading a file: it serves the pieces it has verified."""

    def __init__(self, shares: Shares, download: Download) -> None:
        super().__init__(shares)
        self.partial = download

    def open_for_sending(self, frame: Frame) -> tuple[Entry, IO[bytes], Optional[Download]]:
        d = self.partial
        return Entry(d.name, d.size, 0, d.sha256, d.piece_size, d.pieces or b""), open(d.tmp_path, "rb"), d


def deliver(d: Download, index: int, payload: bytes) -> None:
    """Piece *index* of *payload* arrives whole from a source of its own."""
    source = object()
    assert d.claim(source, has=lambda i: i == index) == (index * MIB, MIB)
    d.receive(source, index * MIB, memoryview(payload[index * MIB: (index + 1) * MIB]))


def partial_download(share: Path, payload: bytes, verified: list[int]) -> Download:
    pieces, root = _manifest(payload)
    d = Download(Shares(share), "blob.bin", len(payload), hashlib.sha256(payload).hexdigest(),
                 executor=synchronously, piece_size=MIB, root=root)
    assert d.set_manifest(pieces)
    for i in verified:
        deliver(d, i, payload)
    return d


def test_a_partial_holder_offers_its_bitmap_refuses_missing_pieces_and_announces_new_ones(share: Path) -> None:
    payload = os.urandom(4 * MIB)
    d = partial_download(share, payload, [1, 3])
    node = PartialNode(Shares(share), d)
    proto, transport = connect(node)
    proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
    (offer,) = frames(transport)
    assert offer["have"] == "50"  # 0101 0000: pieces 1 and 3
    transport.clear()
    proto.dataReceived(Frame("get", offset=MIB, length=MIB).encode() + b"\n")  # a piece it has
    drain(transport)
    assert transport.value().split(b"\n", 1)[1] == payload[MIB: 2 * MIB]
    assert node.bytes_sent == MIB
    transport.clear()
    deliver(d, 0, payload)  # the download verifies piece 0: the requester hears of it
    assert frames(transport)[-1] == {"v": 1, "t": "have", "piece": 0}
    transport.clear()
    proto.dataReceived(Frame("get", offset=2 * MIB, length=MIB).encode() + b"\n")  # one it lacks
    assert frames(transport)[0]["code"] == "not_have" and transport.disconnecting
    proto.connectionLost(None)
    assert proto not in d.watchers
    abandon(d)


def test_a_requester_asks_a_partial_holder_only_for_what_it_has_and_more_after_have(share: Path) -> None:
    offer, pieces = manifest_offer(os.urandom(4 * MIB), have="20")  # 0010 0000: piece 2 only
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer)
    assert frames(transport)[-1] == {"v": 1, "t": "manifest"}
    transport.clear()
    proto.dataReceived(Frame("pieces", length=len(pieces)).encode() + b"\n" + pieces)
    assert [(f["t"], f["offset"]) for f in frames(transport)] == [("get", 2 * MIB)]
    transport.clear()
    proto.dataReceived(Frame("have", piece=0).encode() + b"\n")
    assert [(f["t"], f["offset"]) for f in frames(transport)] == [("get", 0)]
    proto.dataReceived(Frame("have", piece=9).encode() + b"\n")  # outside the file
    assert frames(transport)[-1]["code"] == "bad_have" and transport.disconnecting
    proto.connectionLost(None)
    assert node.download is not None
    abandon(node.download)


def test_have_from_a_complete_holder_and_a_bitmap_of_the_wrong_size_are_refused(share: Path) -> None:
    payload = os.urandom(2 * MIB)
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(manifest_offer(payload)[0])
    proto.dataReceived(Frame("have", piece=0).encode() + b"\n")
    assert frames(transport)[-1]["code"] == "unexpected" and transport.disconnecting
    proto.connectionLost(None)
    abandon(node.download)

    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(manifest_offer(payload, have="ffff")[0])  # 16 pieces, not 2
    assert frames(transport)[-1]["code"] == "bad_have" and transport.disconnecting
    proto.connectionLost(None)
    abandon(node.download)


def test_a_requester_tells_the_holder_of_a_bad_piece_and_the_holder_suspects_its_file(share: Path) -> None:
    payload = os.urandom(2 * MIB)
    offer, pieces = manifest_offer(payload)
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer)
    proto.dataReceived(Frame("pieces", length=len(pieces)).encode() + b"\n" + pieces)
    (first, _second) = [f for f in frames(transport) if f["t"] == "get"]
    transport.clear()
    proto.dataReceived(Frame("data", offset=first["offset"], length=MIB).encode() + b"\n" + b"\0" * MIB)
    assert frames(transport)[-1]["code"] == "bad_piece" and transport.disconnecting
    proto.connectionLost(None)
    abandon(node.download)

    (share / "h").mkdir()
    holding = holder(share / "h", payload)
    proto, transport = connect(holding)
    proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
    proto.dataReceived(Frame("error", code="bad_piece", message="piece 0").encode() + b"\n")
    assert holding.suspects == ["blob.bin"] and transport.disconnecting


def test_a_piece_verified_while_a_range_streams_is_announced_after_the_range(share: Path) -> None:
    """A ``have`` line inside a range's raw bytes would corrupt the stream."""
    payload = os.urandom(4 * MIB)
    d = partial_download(share, payload, [1])
    node = PartialNode(Shares(share), d)
    proto, transport = connect(node)
    proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
    transport.clear()
    reset = proto.resetTimeout

    def chunk_sent() -> None:  # the download verifies piece 2 while the range is going out
        reset()
        if proto.holder is not None and proto.holder.producer is not None and not d.have[2]:
            deliver(d, 2, payload)

    proto.resetTimeout = chunk_sent  # type: ignore[method-assign]
    proto.dataReceived(Frame("get", offset=MIB, length=MIB).encode() + b"\n")
    drain(transport)
    assert d.have[2]
    head, rest = transport.value().split(b"\n", 1)
    assert json.loads(head)["t"] == "data" and rest[:MIB] == payload[MIB: 2 * MIB]
    assert rest[MIB:] == Frame("have", piece=2).encode() + b"\n"
    proto.connectionLost(None)
    abandon(d)


class SharedDownloadNode(Node):
    """Every offer joins one download, as a fetch's sources do."""

    def accept_offer(self, frame: Frame, proto: TransferProtocol) -> Optional[Download]:
        if self.download is None:
            super().accept_offer(frame, proto)
            assert self.download is not None
            self.download.swarming = True
        return self.download


def test_a_complete_holder_beside_partial_ones_is_asked_for_rare_pieces_one_at_a_time(share: Path) -> None:
    """Its upload is the swarm's scarcest: it is asked only for what no partial source has (the
    others can trade the rest), the pieces of our stripe first, one get at a time; when a partial
    source goes away, its pieces are rare again and the holder is asked for them."""
    payload = os.urandom(16 * MIB)
    node = SharedDownloadNode(Shares(share))
    node.peer_id = "a" * 32  # sorts before the holders' PEER: stripe 0 of 2, the even pieces
    offer, pieces = manifest_offer(payload, have="ff00")  # a partial holder with pieces 0-7
    partial, partial_transport = connect(node)
    partial.dataReceived(offer)
    partial.dataReceived(Frame("pieces", length=len(pieces)).encode() + b"\n" + pieces)
    complete, transport = connect(node)
    complete.dataReceived(manifest_offer(payload)[0])
    asked = [f for f in frames(transport) if f["t"] == "get"]
    assert len(asked) == 1 and asked[0]["offset"] // MIB >= 8  # rare, and one at a time
    assert (asked[0]["offset"] // MIB) % 2 == 0  # our stripe
    transport.clear()
    partial.connectionLost(None)  # pieces 0-7 are rare again: the download asks its other sources
    complete.dataReceived(Frame("data", offset=asked[0]["offset"], length=MIB).encode() + b"\n"
                          + payload[asked[0]["offset"]: asked[0]["offset"] + MIB])
    assert [f for f in frames(transport) if f["t"] == "get"]  # asked again, as a lone complete holder
    assert len([f for f in frames(transport) if f["t"] == "get"]) == 2  # the swarm's window once alone
    complete.connectionLost(None)
    abandon(node.download)


# -- offers that cannot be taken as they are ----------------------------------------------------


@pytest.mark.parametrize("size, piece, why", [
    (10 * MIB, 4 * MIB, "piece size"),  # not the protocol's piece size for 10 MiB (1 MiB)
    (3000 * MIB, 1 * MIB, "piece size"),  # 3,000 pieces: more than a manifest may hold
    (5000, 1 * MIB, "one-piece"),  # a one-piece file whose root is not the hash of its hash
])
def test_an_offer_whose_pieces_are_not_the_protocols_is_refused(share: Path, size: int, piece: int, why: str) -> None:
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(Frame("offer", id=RID, name="got.bin", size=size, sha256="ab" * 32, peer=PEER,
                             piece=piece, root="cd" * 32).encode() + b"\n")
    (error,) = frames(transport)
    assert error["t"] == "error" and error["code"] == "bad_offer" and why in error["message"]
    assert transport.disconnecting and node.download is None


def test_a_piece_larger_than_one_get_is_asked_for_in_parts_with_bounded_memory(share: Path) -> None:
    """A 200 GiB file has 128 MiB pieces, more than one get may carry: the requester asks for each
    piece in parts of at most MAX_GET, hashes them as they come, and holds no piece in memory.
    The file is sparse: every piece but the last is resumed as verified."""
    import tracemalloc

    from p2pshare.shares import piece_size_for

    size = 200 * 1024 ** 3 + 12345
    piece = piece_size_for(size)
    count = -(-size // piece)
    assert piece > MAX_GET and count <= 2048
    zero = hashlib.sha256(bytes(piece)).digest()
    last = size - (count - 1) * piece
    pieces = zero * (count - 1) + hashlib.sha256(bytes(last)).digest()
    root = hashlib.sha256(pieces).hexdigest()
    sha = "ee" * 32  # the whole file's hash is not read back for a fetch by name
    shares = Shares(share)
    part = shares.tmp / f"{sha}.part"
    try:
        with open(part, "wb") as f:
            f.truncate(size)
    except OSError as e:
        pytest.skip(f"this file system cannot hold a sparse {size}-byte file: {e.strerror}")
    if os.stat(part).st_blocks * 512 > 1024 ** 3:
        pytest.skip("this file system does not keep files sparse")
    bits = bytes([1] * (count - 1) + [0]).hex()
    (shares.tmp / f"{sha}.have").write_text(f"{size} {piece} {root} {pieces.hex()} {bits}\n")
    node = Node(shares)
    proto, transport = connect(node)
    proto.dataReceived(Frame("offer", id=RID, name="huge.bin", size=size, sha256=sha, peer=PEER,
                             piece=piece, root=root, window=64).encode() + b"\n")
    assert node.download is not None and node.download.resumed_from == (count - 1) * piece
    chunk = bytes(MIB)
    asked: list[tuple[int, int]] = []
    tracemalloc.start()
    try:
        while True:
            gets = [(f["offset"], f["length"]) for f in frames(transport) if f["t"] == "get"]
            transport.clear()
            if not gets:
                break
            for offset, length in gets:
                asked.append((offset, length))
                proto.dataReceived(Frame("data", offset=offset, length=length).encode() + b"\n")
                for at in range(0, length, MIB):
                    proto.dataReceived(chunk[: min(MIB, length - at)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(length <= MAX_GET for _, length in asked)
    assert sorted(asked)[0][0] == (count - 1) * piece and sum(n for _, n in asked) == last
    assert peak < 4 * MAX_GET  # a window of gets at most, never a whole 128 MiB piece
    placed = share / "huge.bin"
    assert placed.stat().st_size == size and node.download.done.called


def test_the_window_grows_to_bandwidth_times_delay_on_a_long_fat_link(share: Path) -> None:
    """16 MiB in flight is enough on a LAN; over a link of 300 ms at 80 MiB/s it is not.  The
    requester measures the round trip (first get to first data line) and the rate, and keeps
    about twice their product in flight."""
    size = 256 * MIB
    digest = hashlib.sha256(bytes(MIB)).digest()
    pieces = digest * (size // MIB)
    clock = Clock()
    node = Node(Shares(share))
    proto, transport = connect(node, clock=clock)
    proto.dataReceived(Frame("offer", id=RID, name="zeros.bin", size=size, sha256="ee" * 32, peer=PEER, piece=MIB,
                             root=hashlib.sha256(pieces).hexdigest(), window=64).encode() + b"\n")
    proto.dataReceived(Frame("pieces", length=len(pieces)).encode() + b"\n" + pieces)

    def in_flight() -> list[tuple[int, int]]:
        return list(proto.requester.outstanding) if proto.requester is not None else []

    assert sum(n for _, n in in_flight()) == 2 * MIB  # two gets before anything is measured
    clock.advance(0.3)  # the first data line comes a round trip later
    for _ in range(8):  # then 80 MiB/s: 8 MiB each 0.1 s; the window doubles with each get answered
        offset, length = in_flight()[0]
        proto.dataReceived(Frame("data", offset=offset, length=length).encode() + b"\n")
        for at in range(0, length, MIB):
            clock.advance(0.1 * MIB / (8 * MIB))
            proto.dataReceived(bytes(MIB))
    assert proto.requester is not None and proto.requester.rtt == pytest.approx(0.3)
    assert proto.requester.window > 2 * WINDOW_BYTES
    assert sum(n for _, n in in_flight()) >= 2 * WINDOW_BYTES  # about 2 x 80 MiB/s x 0.3 s asked for
    abandon(node.download)


def test_a_single_holder_is_never_asked_for_the_same_bytes_twice(share: Path) -> None:
    """An endgame copy goes to another connection, never the one already fetching the piece: a
    file without a manifest from a single holder costs exactly its size in upload."""
    payload = os.urandom(20_000_000)
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(payload))
    serve(proto, transport, payload)
    asked = [(f["offset"], f["length"]) for f in frames(transport) if f["t"] == "get"]
    assert sum(n for _, n in asked) == len(payload) and len(set(asked)) == len(asked)
    assert (share / "got.bin").read_bytes() == payload


def test_an_empty_file_is_answered_with_bye_right_after_the_offer(share: Path) -> None:
    """Section 4.5: nothing to ask for, so the requester says goodbye at once (a holder that sees a
    connection close without a frame counts a failed offer)."""
    node = Node(Shares(share))
    proto, transport = connect(node)
    proto.dataReceived(offer_for(b"", name="empty"))
    assert [f["t"] for f in frames(transport)] == ["bye"] and transport.disconnecting


def test_too_many_gets_during_a_range_close_the_connection_without_an_error_inside_the_bytes(
        share: Path) -> None:
    """Section 4.6: an error line is never written inside a range's raw bytes; a requester over the
    holder's limit while a range streams sees the connection close, the range cut short."""
    from p2pshare.transfer import MAX_GETS

    payload = os.urandom(4 * MIB)
    proto = TransferFactory(holder(share, payload), clock=Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = SlowTransport()
    proto.makeConnection(transport)
    proto.dataReceived(Frame("open", name="blob.bin").encode() + b"\n")
    transport.clear()
    gets = b"".join(Frame("get", offset=0, length=len(payload)).encode() + b"\n" for _ in range(MAX_GETS + 2))
    proto.dataReceived(gets)  # the first streams (paused after a chunk), 64 wait, one is too many
    head, rest = transport.value().split(b"\n", 1)
    assert json.loads(head) == {"v": 1, "t": "data", "offset": 0, "length": len(payload)}
    assert b'"t":"error"' not in rest and len(rest) < len(payload)  # cut short, nothing spliced in
    assert transport.disconnecting and transport.producer is None


def test_a_range_that_waited_for_the_upload_limit_never_starts_inside_another(share: Path) -> None:
    """Under an upload limit a range waits for the bucket; a get that comes once the bucket has
    refilled, before that wait ends, starts the range at once.  When the wait then ends, nothing more
    starts until that range is out: each range's data line and bytes follow the last one whole (two
    at once put a data line inside the other's bytes: a bad piece at the requester, 1 fetch in 7 in
    the limits benchmark)."""
    from p2pshare.bandwidth import Limits

    payload = os.urandom(3 * MIB)
    clock = Clock()
    node = holder(share, payload)
    node.limits = Limits(clock, upload=1 * MIB)  # type: ignore[attr-defined]
    proto = TransferFactory(node, clock=clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = SlowTransport()
    proto.makeConnection(transport)
    proto.dataReceived(Frame("open", name="blob.bin").encode() + b"\n")
    transport.clear()
    limiter = node.limits.upload  # type: ignore[attr-defined]
    limiter.charge(2 * MIB)  # in debt: the first get waits for the bucket
    proto.dataReceived(Frame("get", offset=0, length=MIB).encode() + b"\n")
    assert transport.value() == b"" and transport.producer is None
    limiter.bucket.level = float(limiter.bucket.burst)  # refilled, and the wait has not ended yet
    proto.dataReceived(Frame("get", offset=MIB, length=MIB).encode() + b"\n")  # starts the first range
    assert transport.producer is not None
    clock.advance(10)  # the wait ends while that range streams: nothing else may start
    sent = b""
    while transport.producer is not None or proto.holder.gets:  # type: ignore[union-attr]
        if transport.producer is not None:
            transport.producer.resumeProducing()
        clock.advance(1)
    sent = transport.value()
    expected = b"".join(Frame("data", offset=o, length=MIB).encode() + b"\n" + payload[o:o + MIB]
                        for o in (0, MIB))
    assert sent == expected


class SeedingNode(Node):
    """A node that super-seeds, as a Peer does."""

    def __init__(self, shares: Shares) -> None:
        super().__init__(shares)
        self.seeds: dict = {}


def test_a_holder_serving_several_requesters_offers_the_later_ones_stripes_of_unsent_pieces(share: Path) -> None:
    """Super-seeding: the first requester is offered the whole file; the next ones a stripe each of
    the pieces nobody has been sent, more once their stripe has gone out, and everything once every
    piece has left; a get outside what was offered is refused."""
    payload = b"s" * (8 * MIB)
    (share / "blob.bin").write_bytes(payload)
    shares = Shares(share)
    shares.entries = scan(share, {})
    node = SeedingNode(shares)
    conns = [connect(node) for _ in range(3)]
    offers = []
    for proto, transport in conns:
        proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
        offers.append(frames(transport)[0])
        transport.clear()
    assert "have" not in offers[0]  # the first: the whole file
    stripes = [bytes.fromhex(o["have"]) for o in offers[1:]]
    assert stripes == [bytes([0b11110000]), bytes([0b00001111])]  # pieces 0-3 and 4-7: a few each, disjoint
    second, t2 = conns[1]
    second.dataReceived(Frame("get", offset=5 * MIB, length=MIB).encode() + b"\n")  # not offered to it
    assert frames(t2)[0]["code"] == "not_have" and t2.disconnecting
    second.connectionLost(None)
    third, t3 = conns[2]
    for i in (4, 5, 6, 7):  # the third's pieces go out
        third.dataReceived(Frame("get", offset=i * MIB, length=MIB).encode() + b"\n")
        drain(t3)
    haves = re.findall(rb'\{"v":1,"t":"have","piece":(\d+)\}', t3.value())  # (after the raw bytes of a range)
    assert [int(h) for h in haves] == [0, 1, 2, 3]  # then the unsent ones
    seed = node.seeds[hashlib.sha256(payload).hexdigest()]
    assert seed.sent == bytearray([0, 0, 0, 0, 1, 1, 1, 1])
    for proto, _ in conns:
        proto.connectionLost(None)
    assert node.seeds == {}


def test_a_seeding_holder_never_offers_one_unsent_piece_twice_and_waits_before_offering_everything(
        share: Path) -> None:
    """Stripes stay disjoint while pieces are unsent (a piece offered twice would be sent twice);
    once every piece has gone out the requesters trade the last ones among themselves, and only
    END_DELAY later is every striped connection offered everything."""
    from p2pshare.transfer import END_DELAY

    payload = os.urandom(3 * MIB)
    (share / "blob.bin").write_bytes(payload)
    shares = Shares(share)
    shares.entries = scan(share, {})
    node = SeedingNode(shares)
    clock = Clock()
    conns = [connect(node, clock=clock) for _ in range(3)]
    offers = []
    for proto, transport in conns:
        proto.dataReceived(Frame("open", id=RID, name="blob.bin").encode() + b"\n")
        offers.append(frames(transport)[0])
        transport.clear()
    assert "have" not in offers[0]
    assert [o["have"] for o in offers[1:]] == ["e0", "00"]  # pieces 0-2 to the second, none left for the third
    second, t2 = conns[1]
    for i in range(3):
        second.dataReceived(Frame("get", offset=i * MIB, length=MIB).encode() + b"\n")
        drain(t2)
    third, t3 = conns[2]
    assert b'"have"' not in t3.value()  # every piece has left: the third trades with the second first
    clock.advance(END_DELAY)
    assert [f["piece"] for f in frames(t3) if f["t"] == "have"] == [0, 1, 2]  # then it may ask the holder
    for proto, _ in conns:
        proto.connectionLost(None)
    assert node.seeds == {} and not clock.getDelayedCalls()
