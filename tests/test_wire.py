"""Codecs: round trips, limits, and every kind of bad input raising MalformedMessage only."""

from __future__ import annotations

import json

import pytest

from p2pshare.errors import InvalidName, MalformedMessage, MessageTooLarge, UnsupportedVersion
from p2pshare.wire import (MAX_DATAGRAM, MAX_FRAME, MAX_NAME, Frame, Hit, PeerInfo, Query, TrackerReply,
                           TrackerRequest, decode_datagram, validate_name)

RID = "0123456789abcdef" * 2
PEER = "fedcba9876543210" * 2
SHA = "ab" * 32


def test_query_round_trip() -> None:
    q = Query(RID, "dir/file.txt", ("10.0.0.1", 4000), ("10.0.0.1", 4000), 7, 2, True)
    assert decode_datagram(q.encode()) == q


def test_hit_round_trip() -> None:
    h = Hit(RID, "a.bin", 12, SHA, ("", 4001), PEER, 3)
    assert decode_datagram(h.encode()) == h


def test_forwarded_query_spends_one_ttl_and_counts_a_hop() -> None:
    q = Query(RID, "a", ("", 1), ("", 1), 3, 0).forwarded()
    assert (q.ttl, q.hops) == (2, 1)


def test_empty_requester_host_is_filled_from_the_sender() -> None:
    q = Query(RID, "a", ("", 5), ("", 6), 3).with_sender("192.0.2.9")
    assert (q.udp, q.tcp) == (("192.0.2.9", 5), ("192.0.2.9", 6))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        b'{"v":1}',
        b'{"v":1,"t":"bogus"}',
        b'{"v":1,"t":"query","id":"short","name":"a","udp":["",1],"tcp":["",1],"ttl":1,"hops":0,"fetch":false}',
        json.dumps({"v": 1, "t": "query", "id": RID, "name": "../etc/passwd", "udp": ["", 1], "tcp": ["", 1],
                    "ttl": 1, "hops": 0, "fetch": False}).encode(),
        json.dumps({"v": 1, "t": "query", "id": RID, "name": "a", "udp": ["", 1], "tcp": ["", 1],
                    "ttl": True, "hops": 0, "fetch": False}).encode(),
        json.dumps({"v": 1, "t": "query", "id": RID, "name": "a", "udp": ["", 70000], "tcp": ["", 1],
                    "ttl": 1, "hops": 0, "fetch": False}).encode(),
        json.dumps({"v": 1, "t": "hit", "id": RID, "name": "a", "size": -1, "sha256": SHA, "tcp": ["", 1],
                    "peer": PEER, "hops": 0}).encode(),
        b'{"v":1,"t":"query","ttl":NaN}',
        b"[" * 100000,
    ],
)
def test_malformed_datagrams_raise_malformed_message(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_datagram(data)


def test_unknown_version_is_its_own_error() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_datagram(b'{"v":2,"t":"query"}')


def test_oversized_datagram_is_refused_before_parsing() -> None:
    with pytest.raises(MessageTooLarge):
        decode_datagram(b" " * (MAX_DATAGRAM + 1))


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a/", "a\\b", "a\x00b", "a\nb", "x" * (MAX_NAME + 1),
     ".p2pshare/peer_id", "a\u202eb", "e\u0301"],
)
def test_unacceptable_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize("name", ["a.txt", "sub/dir/file.bin", ".hidden", "caf\u00e9.txt", "..a", "a..b"])
def test_acceptable_names(name: str) -> None:
    assert validate_name(name) == name


def test_tracker_request_round_trips() -> None:
    for req in [TrackerRequest("register", 1, peer=PEER, udp=4000, tcp=4000, host="192.0.2.80"),
                TrackerRequest("heartbeat", 2, peer=PEER), TrackerRequest("leave", 3, peer=PEER),
                TrackerRequest("peers", 4, max=5)]:
        assert TrackerRequest.decode(req.encode()) == req


@pytest.mark.parametrize("line", [
    b'{"v":1,"op":"register","id":1}',
    b'{"v":1,"op":"register","id":1,"peer":"' + PEER.encode() + b'","udp":0,"tcp":1}',
    b'{"v":1,"op":"dance","id":1}',
    b'{"v":1,"op":"peers","id":-1}',
    b'{"v":1,"op":"peers","id":1,"max":1000}',
])
def test_bad_tracker_requests(line: bytes) -> None:
    with pytest.raises(MalformedMessage):
        TrackerRequest.decode(line)


def test_tracker_reply_with_peers_round_trips() -> None:
    reply = TrackerReply(7, True, peers=(PeerInfo(PEER, "192.0.2.1", 1, 2),))
    assert TrackerReply.decode(reply.encode()) == reply


def test_tracker_error_reply_round_trips() -> None:
    reply = TrackerReply(7, False, "unknown_peer", "register first")
    assert TrackerReply.decode(reply.encode()) == reply


@pytest.mark.parametrize("frame", [
    Frame("open", id=RID, name="a/b"),
    Frame("offer", id=RID, name="a", size=0, sha256=SHA, peer=PEER),
    Frame("get", offset=10, length=20),
    Frame("data", offset=10, length=20),
    Frame("decline"), Frame("bye"), Frame("error", code="not_found", message="nope"),
])
def test_transfer_frames_round_trip(frame: Frame) -> None:
    assert Frame.decode(frame.encode()) == frame


@pytest.mark.parametrize("line", [
    b'{"v":1,"t":"get","offset":0}',
    b'{"v":1,"t":"get","offset":0,"length":999999999999}',
    b'{"v":1,"t":"offer","name":"a","size":1,"sha256":"zz","peer":"' + PEER.encode() + b'"}',
    b'{"v":1,"t":"open","name":"/etc/passwd"}',
    b'{"v":1,"t":"launch"}',
    b"x" * (MAX_FRAME + 1),
])
def test_bad_transfer_frames(line: bytes) -> None:
    with pytest.raises(MalformedMessage):
        Frame.decode(line)


@pytest.mark.parametrize("version", [b"1.0", b"true", b'"1"'])
def test_the_version_must_be_the_integer_1(version: bytes) -> None:
    with pytest.raises(UnsupportedVersion):
        decode_datagram(b'{"v":' + version + b',"t":"ack","id":"' + RID.encode() + b'","kind":"hit"}')


@pytest.mark.parametrize("host", ["example.org", "", "1.2.3", "::g"])
def test_addresses_in_messages_are_ip_literals(host: str) -> None:
    data = json.dumps({"v": 1, "t": "hello", "peer": PEER, "peers": [[host, 5]]}).encode()
    with pytest.raises(MalformedMessage):
        decode_datagram(data)


def test_the_longest_valid_name_fits_in_a_query_even_when_escaped() -> None:
    name = "/".join(['"' * 255] * 4)
    q = Query(RID, validate_name(name), ("fd00::1", 65535), ("fd00::1", 65535), 255, 255, True)
    assert len(q.encode()) <= MAX_DATAGRAM
    assert decode_datagram(q.encode()) == q


def test_error_messages_are_bounded_text() -> None:
    with pytest.raises(ValueError):
        Frame("error", code="x", message=["not", "text"])  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        Frame.decode(b'{"v":1,"t":"error","code":"x","message":"' + b"m" * 600 + b'"}')


def test_heartbeats_decode_the_same_whether_written_as_this_implementation_does_or_otherwise() -> None:
    peer = "ab" * 16
    canonical = TrackerRequest("heartbeat", 7, peer=peer).encode()
    spaced = b'{ "v": 1, "op": "heartbeat", "peer": "%s", "id": 7 }' % peer.encode()
    assert TrackerRequest.decode(canonical) == TrackerRequest.decode(spaced) == TrackerRequest("heartbeat", 7, peer=peer)
    for bad in (canonical.replace(b'"id":7', b'"id":2147483648'), canonical.replace(b'"id":7', b'"id":07'),
                canonical.replace(peer.encode(), b"AB" * 16)):
        with pytest.raises(MalformedMessage):
            TrackerRequest.decode(bad)


def test_a_peer_info_is_encoded_once_and_replies_encode_as_json_would() -> None:
    info = PeerInfo("cd" * 16, "10.0.0.9", 4000, 4001)
    assert info.encode() is info.encode()
    entry = {"peer": "cd" * 16, "host": "10.0.0.9", "udp": 4000, "tcp": 4001}
    for reply, expected in (
            (TrackerReply(3, True), {"v": 1, "id": 3, "ok": True}),
            (TrackerReply(4, True, peers=(info,)), {"v": 1, "id": 4, "ok": True, "peers": [entry]}),
            (TrackerReply(5, True, peers=()), {"v": 1, "id": 5, "ok": True, "peers": []}),
            (TrackerReply(6, False, "unknown_peer", "register first"),
             {"v": 1, "id": 6, "ok": False, "error": "unknown_peer", "message": "register first"}),
            (TrackerReply(7, True, host="10.0.0.9", interval=10.0),
             {"v": 1, "id": 7, "ok": True, "host": "10.0.0.9", "interval": 10.0})):
        assert json.loads(reply.encode()) == expected
        assert TrackerReply.decode(reply.encode()) == reply
