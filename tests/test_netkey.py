"""Private networks, pure parts: the key file, derivations, the network CA, sealed datagrams.

No sockets and no real time; the last section runs keyed search protocols on an
in-memory datagram network.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from p2pshare.netkey import (INFO_CA, INFO_DATAGRAM, KEY_HEADER, SEAL_OVERHEAD, TLS_BATCH, DatagramSeal,
                             NetworkKey, NetworkKeyError, NetworkTLS, NonceCache, Replayed, Stale, Unauthentic,
                             _TLSFactory, leaf_certificate, load_key, network_ca, tls_options, write_key)
from p2pshare.search import Reaction, SearchCore, SearchProtocol
from p2pshare.shares import Entry
from p2pshare.testing import DatagramNetwork, by_name
from p2pshare.wire import MAX_DATAGRAM, Hit, Query

KEY = NetworkKey(bytes(range(32)))
OTHER = NetworkKey(bytes(range(1, 33)))
NOW = 1_700_000_000.0


# -- the key and what is derived from it -----------------------------------------------------------


def test_a_key_encodes_as_one_line_and_decodes_back() -> None:
    text = KEY.encode()
    assert text.endswith("\n") and text.count("\n") == 1 and text.startswith(KEY_HEADER + " ")
    assert NetworkKey.decode(text) == KEY


def test_the_repr_of_a_key_does_not_show_the_secret() -> None:
    assert KEY.secret.hex() not in repr(KEY) and repr(KEY.secret) not in repr(KEY)


def test_generated_keys_are_32_random_bytes() -> None:
    a, b = NetworkKey.generate(), NetworkKey.generate()
    assert len(a.secret) == 32 and a != b


def test_derived_keys_depend_on_the_key_and_the_use() -> None:
    assert NetworkKey(KEY.secret).derive(INFO_CA) == KEY.derive(INFO_CA)  # every holder derives the same
    assert KEY.derive(INFO_CA) != KEY.derive(INFO_DATAGRAM)  # no key material shared between uses
    assert KEY.derive(INFO_CA) != OTHER.derive(INFO_CA)
    assert KEY.secret not in (KEY.derive(INFO_CA), KEY.derive(INFO_DATAGRAM))


def test_every_holder_derives_the_same_ca_certificate_byte_for_byte() -> None:
    first = network_ca(KEY)[1].public_bytes(Encoding.DER)
    again = network_ca(NetworkKey(bytes(KEY.secret)))[1].public_bytes(Encoding.DER)
    assert first == again
    assert network_ca(OTHER)[1].public_bytes(Encoding.DER) != first


def test_the_ca_is_a_self_signed_ed25519_ca() -> None:
    _, ca = network_ca(KEY)
    assert ca.issuer == ca.subject and isinstance(ca.public_key(), Ed25519PublicKey)
    ca.verify_directly_issued_by(ca)
    from cryptography.x509 import BasicConstraints

    assert ca.extensions.get_extension_for_class(BasicConstraints).value.ca


def test_a_leaf_chains_to_its_networks_ca_only() -> None:
    leaf = leaf_certificate(KEY, Ed25519PrivateKey.generate())
    leaf.verify_directly_issued_by(network_ca(KEY)[1])
    with pytest.raises(Exception):
        leaf.verify_directly_issued_by(network_ca(OTHER)[1])


def test_each_process_gets_its_own_leaf() -> None:
    a, b = tls_options(KEY), tls_options(KEY)
    assert a.certificate.public_key() != b.certificate.public_key()


def test_tls_options_require_a_certificate_from_the_other_side() -> None:
    context = tls_options(KEY).getContext()
    required = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    assert context.get_verify_mode() & required == required


# -- key files -------------------------------------------------------------------------------------


def key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "net.key"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_write_key_creates_a_0600_file_that_loads(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        write_key(tmp_path / "net.key", KEY)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "net.key").stat().st_mode) == 0o600
    assert load_key(tmp_path / "net.key") == KEY


def test_write_key_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "net.key").write_text("precious")
    with pytest.raises(NetworkKeyError, match="exists"):
        write_key(tmp_path / "net.key", KEY)
    assert (tmp_path / "net.key").read_text() == "precious"


def test_a_key_file_others_may_read_or_write_is_refused(tmp_path: Path) -> None:
    path = key_file(tmp_path, KEY.encode())
    for mode in (0o644, 0o640, 0o604, 0o620, 0o601):
        path.chmod(mode)
        with pytest.raises(NetworkKeyError, match=f"mode {mode:04o}.*chmod 600"):
            load_key(path)


@pytest.mark.parametrize(("text", "message"), [
    ("", "not a p2pshare network key"),
    ("hello world\n", "not a p2pshare network key"),
    (f"{KEY_HEADER} !!!notbase64!!!\n", "not valid base64"),
    (f"{KEY_HEADER} AAAA\n", "3 bytes, not 32"),
    (KEY.encode() * 2, "not a p2pshare network key"),
], ids=["empty", "other text", "bad base64", "short key", "two keys"])
def test_malformed_key_files_are_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(NetworkKeyError, match=message) as info:
        load_key(key_file(tmp_path, text))
    assert "\n" not in str(info.value) and str(tmp_path / "net.key") in str(info.value)


def test_a_missing_key_file_or_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NetworkKeyError, match="No such file"):
        load_key(tmp_path / "absent.key")
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(NetworkKeyError, match="not a regular file"):
        load_key(tmp_path / "dir.key")


def test_key_options_load_the_key_or_fail_with_one_line(tmp_path: Path) -> None:
    from twisted.python import usage

    from p2pshare.tap import PeerOptions, TrackerOptions

    good = key_file(tmp_path, KEY.encode())
    tracker = TrackerOptions()
    tracker.parseOptions(["--key", str(good)])
    assert tracker["key"] == KEY
    peer = PeerOptions()
    peer.parseOptions(["--tracker", "127.0.0.1:9", "--dir", str(tmp_path), "--key", str(good)])
    assert peer["key"] == KEY
    assert TrackerOptions().parseOptions([]) is None  # no --key: an open network, as before
    with pytest.raises(usage.UsageError, match="^--key: .*absent.key: No such file"):
        TrackerOptions().parseOptions(["--key", str(tmp_path / "absent.key")])
    with pytest.raises(usage.UsageError, match="with --key, give HOST:PORT"):
        PeerOptions().parseOptions(["--tracker", "tls:127.0.0.1:9", "--dir", str(tmp_path), "--key", str(good)])


# -- sealing datagrams -----------------------------------------------------------------------------


def seal(key: NetworkKey = KEY, **kwargs: float) -> DatagramSeal:
    return DatagramSeal(key, **kwargs)  # type: ignore[arg-type]


def test_a_sealed_datagram_opens_to_the_original_and_hides_it() -> None:
    data = b'{"v":1,"t":"query","name":"secret-plans.txt"}'
    sealed = seal().seal(data, NOW)
    assert b"secret-plans" not in sealed
    assert len(sealed) == len(data) + SEAL_OVERHEAD
    assert seal().open(sealed, NOW) == data


def test_the_largest_datagram_fits_the_sealed_limit() -> None:
    sealed = seal().seal(b"x" * MAX_DATAGRAM, NOW)
    assert len(sealed) == DatagramSeal.max_sealed
    assert seal().open(sealed, NOW) == b"x" * MAX_DATAGRAM


def test_two_seals_of_the_same_datagram_differ() -> None:
    s = seal()
    assert s.seal(b"same", NOW) != s.seal(b"same", NOW)  # fresh nonces: equal datagrams are not linkable


def test_any_altered_byte_is_refused() -> None:
    original = seal().seal(b"hello", NOW)
    for position in range(len(original)):  # version, nonce, timestamp, datagram and tag alike
        altered = bytearray(original)
        altered[position] ^= 0x01
        with pytest.raises(Unauthentic):
            seal().open(bytes(altered), NOW)
    with pytest.raises(Unauthentic):
        seal().open(original[:-1], NOW)  # and a shortened one


def test_unsealed_or_random_datagrams_are_refused() -> None:
    for data in (b"", b"x", b'{"v":1,"t":"ack","id":"' + b"1" * 32 + b'","kind":"query"}', b"\x01" + bytes(60)):
        with pytest.raises(Unauthentic):
            seal().open(data, NOW)


def test_a_datagram_sealed_with_another_key_is_refused() -> None:
    with pytest.raises(Unauthentic):
        seal(KEY).open(seal(OTHER).seal(b"hello", NOW), NOW)


def test_a_replayed_datagram_is_refused() -> None:
    receiver = seal()
    sealed = seal().seal(b"hello", NOW)
    assert receiver.open(sealed, NOW) == b"hello"
    with pytest.raises(Replayed):
        receiver.open(sealed, NOW + 1)


def test_only_datagrams_stamped_within_the_window_are_accepted() -> None:
    receiver = seal()
    for skew in (-59.0, 59.0):  # the sender's clock is off, or the copy waited
        assert receiver.open(seal().seal(b"hello", NOW + skew), NOW) == b"hello"
    for skew in (-61.0, 61.0):
        with pytest.raises(Stale):
            receiver.open(seal().seal(b"hello", NOW + skew), NOW)


def test_a_replay_after_the_window_is_refused_as_stale() -> None:
    receiver = seal()
    sealed = seal().seal(b"hello", NOW)
    receiver.open(sealed, NOW)
    with pytest.raises(Stale):
        receiver.open(sealed, NOW + 61)


def test_the_nonce_cache_is_bounded_and_a_forgotten_nonce_still_cannot_be_replayed() -> None:
    receiver = seal(entries=4)
    sent = [seal().seal(b"%d" % i, NOW + i / 10) for i in range(6)]
    for i, sealed in enumerate(sent):
        receiver.open(sealed, NOW + 1)
    assert len(receiver.nonces) == 4
    for forgotten in sent[:2]:  # pushed out of the cache: refused by the floor rather than accepted
        with pytest.raises(Stale):
            receiver.open(forgotten, NOW + 1)
    with pytest.raises(Replayed):
        receiver.open(sent[-1], NOW + 1)
    assert receiver.open(seal().seal(b"new", NOW + 1), NOW + 1) == b"new"  # fresh datagrams still pass


def test_the_nonce_cache_forgets_what_left_the_window() -> None:
    cache = NonceCache(entries=100, window=60.0)
    for i in range(10):
        cache.check_and_add(bytes([i]) * 12, NOW, NOW)
    cache.check_and_add(b"n" * 12, NOW + 61, NOW + 61)
    assert len(cache) == 1 and cache.floor == float("-inf")


# -- the seal in the search protocol (in memory) ---------------------------------------------------


def peer_at(net: DatagramNetwork, clock: Clock, addr: tuple[str, int], key: NetworkKey | None,
            files: dict[str, Entry], neighbours: list[tuple[str, int]]) -> SearchProtocol:
    core = SearchCore(by_name(files), lambda: neighbours, lambda: ("a" * 32, ("", addr[1])), max_ttl=7)
    proto = SearchProtocol(core, clock, seal=DatagramSeal(key) if key else None)
    net.attach(proto, addr)
    return proto


A, OUTSIDER, C = ("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.0.0.3", 7000)


def three_peers(key_b: NetworkKey | None) -> tuple[DatagramNetwork, Clock, list[SearchProtocol]]:
    """A (keyed) asks B, which forwards to C (keyed, holds f.txt)."""
    net, clock = DatagramNetwork(), Clock()
    clock.advance(NOW)
    a, b, c = A, OUTSIDER, C
    entry = Entry("f.txt", 5, 1, "c" * 64)
    protos = [peer_at(net, clock, a, KEY, {}, [b]), peer_at(net, clock, b, key_b, {}, [c]),
              peer_at(net, clock, c, KEY, {"f.txt": entry}, [])]
    return net, clock, protos


def ask(net: DatagramNetwork, proto: SearchProtocol, clock: Clock) -> list[Hit]:
    hits: list[Hit] = []
    addr = ("10.0.0.1", 7000)
    _, reaction = proto.core.start_query("f.txt", addr, addr, False, clock.seconds(), hits.append)
    proto.send_all(reaction)
    net.run()
    return hits


def stop(protos: list[SearchProtocol], clock: Clock) -> None:
    for p in protos:
        p.stopProtocol()
    assert not clock.getDelayedCalls()


def test_keyed_peers_search_through_sealed_datagrams_only() -> None:
    net, clock, protos = three_peers(KEY)
    assert len(ask(net, protos[0], clock)) == 1
    assert all(b"f.txt" not in data for _, _, data in net.log)  # nothing in clear on the wire
    stop(protos, clock)


@pytest.mark.parametrize("key_b", [None, OTHER], ids=["no key", "another key"])
def test_a_peer_without_the_key_learns_nothing_and_its_datagrams_are_counted(key_b: NetworkKey | None) -> None:
    net, clock, protos = three_peers(key_b)
    a, outsider, c = protos
    assert ask(net, a, clock) == []  # the outsider in the middle could not read or forward the query
    assert outsider.counters["queries_received"] == 0
    assert outsider.counters["outsider_datagrams" if key_b else "dropped_malformed"] >= 1
    before = len(net.log)
    query = Query("2" * 32, "f.txt", OUTSIDER, OUTSIDER, 3)
    outsider.send_all(Reaction([(query.encode(), C)]))  # its own query, straight to the holder
    net.run()
    assert c.counters["outsider_datagrams"] == 1 and c.counters["queries_received"] == 0
    assert [src for src, _, _ in net.log[before:]] == [OUTSIDER]  # the holder answered nothing
    stop(protos, clock)


def test_a_replayed_query_is_dropped_and_counted() -> None:
    net, clock, protos = three_peers(KEY)
    ask(net, protos[0], clock)
    captured = next(data for _, dst, data in net.log if dst == C)
    protos[2].datagramReceived(captured, ("10.0.0.66", 1))  # an eavesdropper sends a captured query again
    assert protos[2].counters["dropped_replayed"] == 1
    assert protos[2].counters["queries_received"] == 1
    stop(protos, clock)


def test_a_sealed_datagram_longer_than_the_limit_is_counted_as_oversized() -> None:
    net, clock, protos = three_peers(KEY)
    protos[2].datagramReceived(b"\x01" * (DatagramSeal.max_sealed + 1), ("10.0.0.1", 7000))
    assert protos[2].counters["dropped_oversized"] == 1 and protos[2].counters["outsider_datagrams"] == 0
    stop(protos, clock)


# -- the TLS layer moves bytes in batches ------------------------------------------------------------


class _CountingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class _Sink(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: list[str] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(f"lost after {sum(map(len, self.chunks))} bytes")


def _tls_pair(clock: Clock) -> tuple[Any, _CountingTransport, _Sink, Any, _CountingTransport, _Sink]:
    """A client and a server TLS layer of a private network on in-memory transports, handshake done."""
    tls = NetworkTLS(KEY)
    sides: list[Any] = []
    for is_client in (True, False):
        app = _Sink()
        factory = _TLSFactory(tls.options, is_client, Factory.forProtocol(lambda app=app: app),
                              lambda host, why: pytest.fail(f"TLS refused: {why}"))
        factory._clock = clock  # Twisted's TLS layer gathers small writes until the next turn of this clock
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = _CountingTransport()
        proto.makeConnection(transport)
        sides += [proto, transport, app]
    client, client_t, client_app, server, server_t, server_app = sides
    for _ in range(10):
        pump(client_t, server)
        pump(server_t, client)
    assert client._handshakeDone and server._handshakeDone
    return client, client_t, client_app, server, server_t, server_app


def pump(transport: StringTransport, to: Any) -> None:
    data = transport.value()
    transport.clear()
    if data:
        to.dataReceived(data)


def test_a_large_write_leaves_in_few_transport_writes_and_arrives_in_few_deliveries() -> None:
    client, client_t, _, server, _, server_app = _tls_pair(Clock())
    data = os.urandom(4 * TLS_BATCH + 12345)
    client_t.writes = 0
    client.write(data)
    # Twisted's TLS layer writes each 16 KiB record to the transport on its own: 257 writes here.
    assert client_t.writes <= 8
    pump(client_t, server)
    assert b"".join(server_app.chunks) == data
    # ... and hands each decrypted record to the application on its own: 257 calls.
    assert len(server_app.chunks) <= 6
    assert all(len(c) <= TLS_BATCH + 16 * 1024 for c in server_app.chunks)


def test_small_writes_and_a_close_arrive_whole_and_in_order() -> None:
    clock = Clock()
    client, client_t, _, server, server_t, server_app = _tls_pair(clock)
    lines = [b"line %d\n" % i for i in range(100)]
    for line in lines:
        client.write(line)
    clock.advance(0)
    client.loseConnection()
    for _ in range(5):
        pump(client_t, server)
        pump(server_t, client)
    assert server_t.disconnecting  # the close_notify made the server close the connection under it
    server.connectionLost(Failure(ConnectionDone()))
    assert b"".join(server_app.chunks) == b"".join(lines)
    assert server_app.lost == [f"lost after {len(b''.join(lines))} bytes"]


def test_the_process_keeps_freed_heap_memory_for_the_next_megabyte_buffer() -> None:
    """A 1 MiB buffer filled and freed again and again (socket reads, file reads, TLS batches) is
    served from memory the process already has, not faulted in afresh every time."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    script = (
        "import resource\n"
        "from p2pshare.tap import return_freed_memory\n"
        "assert return_freed_memory()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(200):\n"
        "    data = b'x' * (1024 * 1024)\n"
        "    del data\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    # Each fresh megabyte is 256 page faults: 51,200 for the loop if the heap gave it back every time.
    assert faults < 5_000
