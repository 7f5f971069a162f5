"""docs/protocol.md against the daemons: the document's own example lines, as raw bytes, to real
``twistd`` processes.

Nothing here uses ``p2pshare.wire``: requests are the example lines copied out of the document
(with the document's example addresses replaced by loopback ones where the daemon must see its
own), and replies are compared with the document's lines as JSON.  When the text and the daemon
drift apart, one of these fails.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from test_system import Daemon, accepts, cli, free_port, peer_status, poll, start_peer, start_tracker

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
EXAMPLE_A = "1b3f5e7a9c2d4f6081a3c5e7092b4d6f"  # peer A of the examples
NOTES = b"hello world\n"  # docs/notes.txt of the examples


def section(title: str) -> str:
    """The text of the section whose heading is *title*, up to the next heading of its level."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    level = title.split(" ")[0]
    end = text.find(f"\n{level} ", start + len(title) + 2)
    return text[start: end if end > 0 else len(text)]


def text_blocks(title: str) -> list[list[str]]:
    """The ```text blocks of a section, as lists of lines."""
    return [block.strip("\n").splitlines() for block in re.findall(r"```text\n(.*?)```", section(title), re.S)]


def json_of(line: str) -> dict:
    """The JSON object on an example line (after any "A → tracker"-style prefix)."""
    return json.loads(line[line.index("{"):])


class LineClient:
    """A raw TCP connection speaking newline-delimited lines."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.buffer = b""

    @classmethod
    def accepted(cls, sock: socket.socket) -> "LineClient":
        """A connection the other side opened to us."""
        client = cls.__new__(cls)
        client.sock, client.buffer = sock, b""
        sock.settimeout(10)
        return client

    def send(self, line: str | bytes) -> None:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\n")

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; unterminated: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def raw(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict]]:
    """A tracker and a peer sharing docs/notes.txt, started as the README shows; yields the
    tracker's HOST:PORT, the root folder and the peer's status."""
    root = tmp_path_factory.mktemp("conformance")
    (root / "holder" / "docs").mkdir(parents=True)
    (root / "holder" / "docs" / "notes.txt").write_bytes(NOTES)
    port = free_port()
    address = f"127.0.0.1:{port}"
    started: list[Daemon] = [start_tracker(root, f"tcp:{port}:interface=127.0.0.1")]
    try:
        poll(lambda: accepts(address), "the tracker listening", tuple(started))
        started.append(start_peer(root, "holder", address))
        status = poll(lambda: s if (s := peer_status(root, root / "holder")) and s["files"] else None,
                      "the holder indexing docs/notes.txt", tuple(started))
        yield address, root, status
    finally:
        for d in started:
            d.stop()


def tracker(address: str) -> LineClient:
    host, _, port = address.rpartition(":")
    return LineClient((host, int(port)))


def test_the_tracker_examples_of_section_2_8(daemons: tuple[str, Path, dict]) -> None:
    address = daemons[0]
    first = text_blocks("### 2.8 Examples")[0]
    exchanges = [(a, b) for a, b in zip(first[::2], first[1::2])]
    assert [a.split("  ")[0] for a, _ in exchanges] == ["A → tracker"] * 4
    client = tracker(address)
    for request, reply in exchanges:
        client.send(request[request.index("{"):])
        got, expected = json.loads(client.line()), json_of(reply)
        if expected.get("host") == "192.0.2.10":  # the address A connects from, in the document
            expected["host"] = "127.0.0.1"
        if "peers" in expected:  # C and B of the document are not registered here
            assert got["ok"] is True and got["id"] == expected["id"] and isinstance(got["peers"], list)
            continue
        assert got == expected
    client.sock.close()


def test_the_peers_request_of_an_empty_table_and_the_refusals(daemons: tuple[str, Path, dict]) -> None:
    blocks = text_blocks("### 2.8 Examples")
    peers_request, peers_reply = blocks[2]
    refusals = [json_of(line) for line in blocks[3]]
    client = tracker(daemons[0])
    client.send(peers_request)
    got = json.loads(client.line())
    # The holder of the fixture is registered, so the table is not empty: the shape must match.
    assert got.keys() == json_of(peers_reply).keys() and got["id"] == 1 and got["ok"] is True
    client.send('{"v":1,"op":"heartbeat","id":3,"peer":"%s"}' % ("e" * 32))
    assert json.loads(client.line()) == refusals[0]  # unknown_peer, the connection stays open
    client.send('{"v":2,"op":"peers","id":5}')
    assert json.loads(client.line()) == refusals[1]  # malformed: version 2, then closed
    assert client.closed()


def test_register_with_an_empty_host_records_the_source_address(daemons: tuple[str, Path, dict]) -> None:
    """Section 2.2: `host` absent or "" means the source address of the connection."""
    client = tracker(daemons[0])
    client.send('{"v":1,"op":"register","id":1,"peer":"%s","udp":40001,"tcp":40001,"host":""}' % EXAMPLE_A)
    got = json.loads(client.line())
    assert got["ok"] is True and got["host"] == "127.0.0.1"
    client.send('{"v":1,"op":"leave","id":2,"peer":"%s"}' % EXAMPLE_A)
    assert json.loads(client.line()) == {"v": 1, "id": 2, "ok": True}
    client.sock.close()


def padded(query: str) -> bytes:
    """Section 3.2's padding rule, applied to an example query."""
    body = query.rstrip("}")
    unpadded = len(query.encode())
    rule = re.search(r"P = max\((\d+) - U, (\d+)\)", section("### 3.2 `query`"))
    assert rule, "section 3.2 states the padding rule"
    spaces = max(int(rule.group(1)) - unpadded, int(rule.group(2)))
    return (body + ',"pad":"' + " " * spaces + '"}').encode()


def test_a_query_by_name_and_content_from_section_3_13_gets_an_ack_and_a_hit(
        daemons: tuple[str, Path, dict]) -> None:
    """The name-and-content query of section 3.13, sent straight to the holder from a fresh
    address (so unproven: it relies on the padding rule), asking for another name with that
    content: step 4 of section 3.8 answers with the file that has it."""
    _, _, status = daemons
    lines = text_blocks("### 3.13 Examples")
    query = json_of(lines[2][1])  # name and sha256, fetch false
    assert query["sha256"] == hashlib.sha256(NOTES).hexdigest() and query["fetch"] is False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        me = ["127.0.0.1", s.getsockname()[1]]
        query.update(udp=me, tcp=me, name="other.txt")
        line = json.dumps(query, separators=(",", ":"))
        s.sendto(padded(line), ("127.0.0.1", status["udp"]))
        replies = []
        while len(replies) < 2:
            data, _ = s.recvfrom(65536)
            replies.append(json.loads(data))
    ack = next(r for r in replies if r["t"] == "ack")
    hit = next(r for r in replies if r["t"] == "hit")
    assert ack == json_of(lines[3][0])  # B's ack of the section, same request id
    doc_hit = json_of(lines[4][0])
    assert hit == {**doc_hit, "tcp": ["127.0.0.1", status["tcp"]], "peer": status["peer"], "hops": 1}


def test_a_hello_from_section_3_13_makes_the_sender_a_neighbour_that_gets_queries(
        daemons: tuple[str, Path, dict]) -> None:
    """The hello of section 3.13, sent from a fresh address: section 3.12 makes its sender a
    learned neighbour, so the peer's next search reaches it as a query of section 3.2."""
    _, root, status = daemons
    hello = text_blocks("### 3.13 Examples")[-1][0]
    assert json_of(hello)["t"] == "hello"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(hello.encode(), ("127.0.0.1", status["udp"]))
        poll(lambda: [s.getsockname()[0], s.getsockname()[1]] in (peer_status(root, root / "holder") or {}).get(
            "neighbours", []) or None, "the hello's sender among the neighbours")
        searched = cli("--dir", str(root / "holder"), "search", "nobody/has-this.txt", "--timeout", "0.5", cwd=root)
        assert searched.returncode == 1
        data, sender = s.recvfrom(65536)
    query = json.loads(data)
    assert sender[1] == status["udp"]
    assert {k: query[k] for k in ("v", "t", "name", "hops", "fetch")} == {
        "v": 1, "t": "query", "name": "nobody/has-this.txt", "hops": 0, "fetch": False}
    assert re.fullmatch(r"[0-9a-f]{32}", query["id"]) and query["ttl"] >= 1
    unpadded = len(json.dumps({k: v for k, v in query.items() if k != "pad"}, separators=(",", ":")).encode())
    assert len(data) >= max(512 - unpadded, 320) + unpadded  # padded as section 3.2 says


def play_requester(client: LineClient, lines: list[str], offer: dict) -> None:
    """Play A's lines of a transcript ("A → C") and check C's ("C → A", "C ⇒ A": raw bytes of
    NOTES); *offer* holds the offer's fields that differ from the document here.  Then the holder
    must close on ``bye``."""
    for line in lines:
        body = line[line.index("{"):] if "{" in line else ""
        if "A → C" in line:
            client.send(body)
        elif "C → A" in line:
            expected = json_of(body)
            if expected["t"] == "offer":
                expected.update(offer)
            assert json.loads(client.line()) == expected
        elif "C ⇒ A" in line:
            n = int(re.search(r"(\d+) bytes", line).group(1))  # type: ignore[union-attr]
            assert client.raw(n) == NOTES[:n]
    deadline = time.monotonic() + 5
    while not client.closed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.closed()  # the holder closes on bye


def test_the_one_piece_fetch_of_section_5_2(daemons: tuple[str, Path, dict]) -> None:
    """The requester-dials transcript: open, offer, get, data, bye, byte for byte."""
    _, _, status = daemons
    lines = [line for line in text_blocks("### 5.2 The requester dials the holder")[0] if "{" in line or "⇒" in line]
    play_requester(LineClient(("127.0.0.1", status["tcp"])), lines, {"peer": status["peer"]})


def test_the_holder_dials_transcript_of_section_5_1(daemons: tuple[str, Path, dict]) -> None:
    """A's part of section 5.1, played by this test: the query (padded by section 3.2's rule) goes
    straight to the holder, which acknowledges it, sends the hit, dials A's TCP address and offers
    the file; then the get, the data and bye, as the transcript shows."""
    _, _, status = daemons
    lines = text_blocks("### 5.1 The holder dials the requester")[0]
    query = json_of(lines[0])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, listener:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        query.update(udp=["127.0.0.1", s.getsockname()[1]], tcp=["127.0.0.1", listener.getsockname()[1]],
                     id="6" * 32)
        s.sendto(padded(json.dumps(query, separators=(",", ":"))), ("127.0.0.1", status["udp"]))
        replies = [json.loads(s.recvfrom(65536)[0]) for _ in range(2)]
        hit = next(r for r in replies if r["t"] == "hit")
        assert next(r for r in replies if r["t"] == "ack") == {**json_of(lines[1]), "id": query["id"]}
        assert hit == {**json_of(lines[4]), "id": query["id"], "tcp": ["127.0.0.1", status["tcp"]],
                       "peer": status["peer"], "hops": 1}
        s.sendto(json.dumps({**json_of(lines[5]), "id": query["id"]}, separators=(",", ":")).encode(),
                 ("127.0.0.1", status["udp"]))  # A's ack of the hit
        client = LineClient.accepted(listener.accept()[0])
    play_requester(client, lines[7:], {"id": query["id"], "peer": status["peer"]})  # this query, this holder
