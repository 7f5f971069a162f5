"""A tracker and several peers in one reactor, over real loopback sockets."""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from loopback import Network, eventually, reactor
from p2pshare import NotFound, start_peer, start_tracker
from p2pshare.errors import AlreadyExists, AmbiguousName, TransferFailed
from p2pshare.wire import MAX_DATAGRAM, Query


def payload(size: int) -> bytes:
    return os.urandom(size)


@pytest_twisted.ensureDeferred
async def test_a_file_three_hops_away_is_found_and_fetched_with_a_tracker(net: Network) -> None:
    address = await net.start_tracker()
    data = payload(3_000_000)
    peers = await net.chain(4, {"deep/data.bin": data}, tracker=address)
    for _ in range(3):
        peers.append(await net.add(tracker=address, want=0))  # bystanders: six peers and more
    await eventually(lambda: len(net.tracker.factory.registry) == 7)
    hits = await peers[0].search("deep/data.bin", timeout=1.0)
    assert [(h.name, h.size, h.hops) for h in hits] == [("deep/data.bin", len(data), 3)]
    result = await peers[0].fetch("deep/data.bin", timeout=5.0)
    assert (peers[0].shares.root / "deep" / "data.bin").read_bytes() == data
    assert result.dialled_by == "holder"
    assert result.holder_peer == peers[3].peer_id
    assert list((peers[0].shares.root / ".p2pshare" / "tmp").iterdir()) == []
    assert peers[0].shares.lookup("deep/data.bin") is not None  # and now it shares it


@pytest_twisted.ensureDeferred
async def test_a_requester_the_holder_cannot_reach_dials_the_holder_itself(net: Network) -> None:
    data = payload(1_000_000)
    peers = await net.chain(3, {"f.bin": data})
    requester = peers[0]
    await requester._ports[0].stopListening()  # its TCP port is closed: offers cannot reach it
    result = await requester.fetch("f.bin", timeout=5.0)
    assert result.dialled_by == "requester"
    assert (requester.shares.root / "f.bin").read_bytes() == data
    assert peers[2].counters["offers_dialled"] == 1
    assert requester.counters["dials_to_holders"] == 1


@pytest_twisted.ensureDeferred
async def test_neighbours_from_the_tracker_are_enough_to_find_a_file(net: Network) -> None:
    address = await net.start_tracker()
    data = payload(10_000)
    holder = await net.add({"x.txt": data}, tracker=address)
    others = [await net.add(tracker=address) for _ in range(3)]
    await eventually(lambda: all(len(p.neighbours()) == 3 for p in others))
    assert ("127.0.0.1", holder.udp_port) in others[0].neighbours()
    result = await others[0].fetch("x.txt", timeout=5.0)
    assert result.size == len(data)


@pytest_twisted.ensureDeferred
async def test_a_missing_file_fails_with_not_found_after_the_timeout(net: Network) -> None:
    peers = await net.chain(2, {})
    with pytest.raises(NotFound, match="nothing.bin"):
        await peers[0].fetch("nothing.bin", timeout=0.5)


@pytest_twisted.ensureDeferred
async def test_a_file_that_exists_is_not_fetched_again(net: Network) -> None:
    peers = await net.chain(2, {"a": b"1"})
    (peers[0].shares.root / "a").write_bytes(b"mine")
    with pytest.raises(AlreadyExists):
        await peers[0].fetch("a", timeout=0.5)
    assert (peers[0].shares.root / "a").read_bytes() == b"mine"


@pytest_twisted.ensureDeferred
async def test_two_fetches_of_one_name_share_one_download(net: Network) -> None:
    data = payload(2_000_000)
    peers = await net.chain(2, {"same.bin": data})
    first, second = peers[0].fetch("same.bin", 5.0), peers[0].fetch("same.bin", 5.0)
    a, b = await defer.gatherResults([first, second])
    assert a == b
    assert peers[0].counters["downloads_completed"] == 1


@pytest_twisted.ensureDeferred
async def test_one_download_draws_on_both_holders(net: Network) -> None:
    data = payload(64 * 1024 * 1024)
    h1 = await net.add({"dup.bin": data})
    h2 = await net.add({"dup.bin": data})
    requester = await net.add(peers=(("127.0.0.1", h1.udp_port), ("127.0.0.1", h2.udp_port)))
    result = await requester.fetch("dup.bin", timeout=5.0)
    assert result.sources == 2 and requester.counters["sources_dialled_by_holder"] == 2
    assert (requester.shares.root / "dup.bin").read_bytes() == data
    assert requester.counters["downloads_completed"] == 1


@pytest_twisted.ensureDeferred
async def test_a_holder_that_vanishes_mid_transfer_leaves_nothing_behind(net: Network) -> None:
    data = payload(40_000_000)
    peers = await net.chain(2, {"big.bin": data})
    requester, holder = peers
    started: list[int] = []

    def progress(got: int, size: int) -> None:
        if not started:
            started.append(got)
            for conn in list(holder._connections):
                conn.transport.abortConnection()

    with pytest.raises(TransferFailed):
        await requester.fetch("big.bin", timeout=2.0, progress=progress)
    assert started
    assert not (requester.shares.root / "big.bin").exists()
    kept = {p.suffix for p in (requester.shares.root / ".p2pshare" / "tmp").iterdir()}
    assert kept <= {".part", ".have"}  # at most the verified pieces, for a later resume


@pytest_twisted.ensureDeferred
async def test_a_source_that_disappears_costs_only_its_pieces(net: Network) -> None:
    data = payload(64 * 1024 * 1024)
    h1 = await net.add({"dup.bin": data})
    h2 = await net.add({"dup.bin": data})
    requester = await net.add(peers=(("127.0.0.1", h1.udp_port), ("127.0.0.1", h2.udp_port)))
    dropped: list[int] = []

    def progress(got: int, size: int) -> None:
        if got > 8 * 1024 * 1024 and not dropped and len(h1._connections) and len(h2._connections):
            dropped.append(got)
            for conn in list(h1._connections):
                conn.transport.abortConnection()

    result = await requester.fetch("dup.bin", timeout=5.0, progress=progress)
    assert dropped and (requester.shares.root / "dup.bin").read_bytes() == data
    assert result.sources == 2


@pytest_twisted.ensureDeferred
async def test_bad_datagrams_on_a_real_socket_are_counted_and_dropped(net: Network) -> None:
    peer = await net.add()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in (b"", b"junk", b'{"v":7}', b"{" * (MAX_DATAGRAM + 500)):
            s.sendto(data, ("127.0.0.1", peer.udp_port))
    await eventually(lambda: sum(peer.counters[k] for k in (
        "dropped_malformed", "dropped_unsupported_version", "dropped_oversized")) == 4)
    assert peer.counters["dropped_oversized"] == 1
    assert peer.counters["dropped_unsupported_version"] == 1


@pytest_twisted.ensureDeferred
async def test_an_idle_transfer_connection_is_closed(net: Network) -> None:
    peer = await net.add(idle=0.3)
    lost: defer.Deferred[None] = defer.Deferred()

    class Silent(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            lost.callback(None)

    endpoint = TCP4ClientEndpoint(reactor(), "127.0.0.1", peer.tcp_port)
    await endpoint.connect(Factory.forProtocol(Silent))
    await lost.addTimeout(3, reactor())


@pytest_twisted.ensureDeferred
async def test_stopping_a_peer_leaves_the_tracker_table(net: Network) -> None:
    address = await net.start_tracker()
    a = await net.add(tracker=address)
    await net.add(tracker=address)
    await eventually(lambda: len(net.tracker.factory.registry) == 2)
    await a.stopService()
    net.peers.remove(a)
    await eventually(lambda: len(net.tracker.factory.registry) == 1)


@pytest_twisted.ensureDeferred
async def test_peers_register_again_with_a_restarted_tracker(net: Network) -> None:
    address = await net.start_tracker()
    port = net.tracker.port.getHost().port
    a = await net.add(tracker=address)
    b = await net.add(tracker=address)
    await eventually(lambda: len(net.tracker.factory.registry) == 2)
    await net.tracker.stopService()
    await eventually(lambda: not a.tracker.registered and not b.tracker.registered)
    net.tracker = await start_tracker(reactor(), f"tcp:{port}:interface=127.0.0.1", interval=1.0)
    await eventually(lambda: len(net.tracker.factory.registry) == 2, timeout=10.0)
    await eventually(lambda: ("127.0.0.1", b.udp_port) in a.neighbours())


@pytest_twisted.ensureDeferred
async def test_two_files_of_one_name_are_told_apart_by_hash(net: Network) -> None:
    one, other = payload(20_000_000), payload(20_000_000)
    h1 = await net.add({"same.bin": one})
    h2 = await net.add({"same.bin": other})
    requester = await net.add(peers=(("127.0.0.1", h1.udp_port), ("127.0.0.1", h2.udp_port)))
    hits = await requester.search("same.bin", timeout=0.5)
    wanted = hashlib.sha256(other).hexdigest()
    assert sorted(h.sha256 for h in hits) == sorted([hashlib.sha256(one).hexdigest(), wanted])
    with pytest.raises(AmbiguousName, match="pick one with --hash"):
        await requester.fetch("same.bin", timeout=5.0)
    assert not (requester.shares.root / "same.bin").exists()
    result = await requester.fetch("same.bin", timeout=5.0, sha256=wanted)
    assert result.sha256 == wanted and (requester.shares.root / "same.bin").read_bytes() == other


@pytest_twisted.ensureDeferred
async def test_content_is_fetched_by_hash_under_the_holders_name(net: Network) -> None:
    data = payload(100_000)
    peers = await net.chain(2, {"docs/report.pdf": data})
    result = await peers[0].fetch(sha256=hashlib.sha256(data).hexdigest(), timeout=5.0)
    assert result.name == "docs/report.pdf"
    assert (peers[0].shares.root / "docs" / "report.pdf").read_bytes() == data
    with pytest.raises(AlreadyExists, match="already here as docs/report.pdf"):
        await peers[0].fetch(sha256=hashlib.sha256(data).hexdigest(), timeout=1.0)


@pytest_twisted.ensureDeferred
async def test_a_requester_restarted_mid_download_resumes_from_its_verified_pieces(net: Network) -> None:
    data = payload(48 * 1024 * 1024)
    peers = await net.chain(2, {"big.bin": data})
    requester, holder = peers
    stopped: defer.Deferred[None] = defer.Deferred()

    def progress(got: int, size: int) -> None:
        if got > 20 * 1024 * 1024 and not stopped.called:
            stopped.callback(None)

    first = requester.fetch("big.bin", timeout=5.0, progress=progress)
    first.addErrback(lambda f: f.trap(TransferFailed))
    await stopped
    await requester.stopService()  # as good as a crash: nothing is placed, the verified part stays
    net.peers.remove(requester)
    await first
    assert not (requester.shares.root / "big.bin").exists()
    again = await start_peer(reactor(), requester.shares.root, peers=(("127.0.0.1", holder.udp_port),),
                             interface="127.0.0.1", dial_wait=0.3)
    net.peers.append(again)
    result = await again.fetch("big.bin", timeout=5.0)
    assert result.resumed >= 1024 * 1024 and result.resumed % (1024 * 1024) == 0  # whole verified pieces
    assert (again.shares.root / "big.bin").read_bytes() == data
    assert list((again.shares.root / ".p2pshare" / "tmp").iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, as CI has); skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and the mount command")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest_twisted.ensureDeferred
async def test_a_file_that_cannot_fit_is_refused_up_front(net: Network, small_disk: Path) -> None:
    holder = await net.add({"big.bin": payload(8 * 1024 * 1024)})
    requester = await start_peer(reactor(), small_disk, peers=(("127.0.0.1", holder.udp_port),),
                                 interface="127.0.0.1", dial_wait=0.3)
    net.peers.append(requester)
    with pytest.raises(TransferFailed, match="do not fit"):
        await requester.fetch("big.bin", timeout=5.0)
    assert not (small_disk / "big.bin").exists()
    assert list((small_disk / ".p2pshare" / "tmp").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_disk_that_fills_up_mid_way_fails_cleanly_and_the_peer_keeps_serving(
        net: Network, small_disk: Path) -> None:
    holder = await net.add({"big.bin": payload(3 * 1024 * 1024), "small.txt": b"still here"})
    requester = await start_peer(reactor(), small_disk, peers=(("127.0.0.1", holder.udp_port),),
                                 interface="127.0.0.1", dial_wait=0.3)
    net.peers.append(requester)
    (small_disk / "filler").write_bytes(b"f" * (2 * 1024 * 1024))
    # As if another program filled the disk after the up-front check passed:
    requester.fetcher._space_short_of = lambda frame: 0  # type: ignore[method-assign]
    with pytest.raises(TransferFailed, match="No space left"):
        await requester.fetch("big.bin", timeout=5.0)
    assert not (small_disk / "big.bin").exists()
    assert list((small_disk / ".p2pshare" / "tmp").iterdir()) == []
    (small_disk / "filler").unlink()
    assert (await requester.fetch("small.txt", timeout=5.0)).size == len(b"still here")


@pytest_twisted.ensureDeferred
async def test_a_holder_stops_dialling_an_address_that_does_not_answer(net: Network) -> None:
    holder = await net.add({"f.txt": b"x"})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for n in range(3):  # forged requests naming a third party's address (a closed port here)
            q = Query(f"{n:032x}", "f.txt", ("127.0.0.1", 9), ("127.0.0.1", 9), 1, 0, True)
            s.sendto(q.encode(), ("127.0.0.1", holder.udp_port))
            await eventually(lambda: holder.counters["hits_sent"] == n + 1)
            await task.deferLater(reactor(), 0.1, lambda: None)
    assert holder.counters["offers_dialled"] == 1  # then it backs off
    assert holder.counters["offers_backed_off"] == 2


@pytest_twisted.ensureDeferred
async def test_a_source_sending_bad_pieces_is_dropped_and_the_pieces_come_from_another(net: Network) -> None:
    data = payload(32 * 1024 * 1024)
    liar = await net.add({"f.bin": data})
    honest = await net.add({"f.bin": data})
    path = liar.shares.root / "f.bin"
    st = path.stat()
    corrupt = bytearray(data)
    for i in range(0, len(corrupt), 1024 * 1024):
        corrupt[i] ^= 0xFF  # every piece differs, size and mtime as indexed: only the pieces tell
    path.write_bytes(bytes(corrupt))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    requester = await net.add(peers=(("127.0.0.1", liar.udp_port), ("127.0.0.1", honest.udp_port)))
    result = await requester.fetch("f.bin", timeout=5.0)
    assert (requester.shares.root / "f.bin").read_bytes() == data
    assert requester.counters["bad_pieces"] >= 1
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    # The liar learns that its file changed and indexes it again: it never offers the old content.
    await eventually(lambda: liar.counters["files_rechecked"] == 1)
    await eventually(lambda: liar.shares.lookup("f.bin") is not None)
    assert liar.shares.lookup("f.bin").sha256 == hashlib.sha256(corrupt).hexdigest()
    assert liar.shares.lookup("", hashlib.sha256(data).hexdigest()) is None


@pytest_twisted.ensureDeferred
async def test_a_peer_still_downloading_serves_its_verified_pieces_to_another(net: Network) -> None:
    """Swarming: A's download stalls part-way (its holder goes away).  B, fetching the same file,
    finds A (a partial holder) and takes the pieces A has verified; when a holder is back, both
    finish, B with the rest from the holder or from A once A has it all (which of the two is a race).
    Pass: both files are identical to the original, B verified at least the pieces A had before any
    holder was back, and A counted a partial upload of at least those pieces."""
    mib = 1024 * 1024
    data = payload(24 * mib)
    sha = hashlib.sha256(data).hexdigest()
    h = await net.add({"s.bin": data})
    a = await net.add(peers=(("127.0.0.1", h.udp_port),), requery=0.2)
    b = await net.add(peers=(("127.0.0.1", a.udp_port),), requery=0.2)
    stopped: list[Any] = []

    def progress(got: int, size: int) -> None:
        if got >= 6 * mib and not stopped:
            stopped.append(h.stopService())

    fetch_a = a.fetch("s.bin", timeout=30.0, progress=progress)
    await eventually(lambda: bool(stopped))
    await stopped[0]
    partial = a.fetcher.serving(sha256=sha)
    assert partial is not None and not partial.complete
    await eventually(lambda: partial.verified >= 4 * mib)
    had = partial.verified

    fetch_b = b.fetch("s.bin", timeout=30.0)
    await eventually(lambda: a.counters["uploads_opened_partial"] >= 1, timeout=10.0)
    await eventually(lambda: b.fetcher.serving(sha256=sha) is not None
                     and b.fetcher.serving(sha256=sha).verified >= had, timeout=10.0)

    await net.add({"s.bin": data}, peers=(("127.0.0.1", a.udp_port),))  # a holder again
    result_a, result_b = await fetch_a, await fetch_b
    assert (a.shares.root / "s.bin").read_bytes() == data and (b.shares.root / "s.bin").read_bytes() == data
    assert a.counters["bytes_sent"] >= had
    assert result_a.sha256 == result_b.sha256 == sha


@pytest_twisted.ensureDeferred
async def test_a_fetch_cancelled_by_one_of_two_callers_goes_on_for_the_other(net: Network) -> None:
    data = payload(2_000_000)
    peers = await net.chain(2, {"shared.bin": data})
    first, second = peers[0].fetch("shared.bin", 5.0), peers[0].fetch("shared.bin", 5.0)
    first.cancel()
    with pytest.raises(defer.CancelledError):
        await first
    result = await second
    assert (peers[0].shares.root / "shared.bin").read_bytes() == data and result.size == len(data)
    assert peers[0].counters["fetches_cancelled"] == 0


@pytest_twisted.ensureDeferred
async def test_a_fetch_cancelled_by_its_last_caller_stops_and_keeps_its_verified_pieces(net: Network) -> None:
    """The holder hangs part-way (it stops reading its connections); the only caller cancels.
    Pass: the fetch is over at once (no fetch in the status, no connection to the holder), the
    verified pieces stay in the state folder's tmp, and the next fetch resumes from them."""
    mib = 1024 * 1024
    data = payload(16 * mib)
    sha = hashlib.sha256(data).hexdigest()
    requester, holder = await net.chain(2, {"big.bin": data})
    hung: list[int] = []

    def progress(got: int, size: int) -> None:
        if got >= 2 * mib and not hung:
            hung.append(got)
            for conn in list(holder._connections):
                conn.transport.pauseProducing()

    fetching = requester.fetch("big.bin", timeout=5.0, progress=progress)
    await eventually(lambda: bool(hung))
    download = requester.fetcher.serving(sha256=sha)
    assert download is not None
    await eventually(lambda: download.verified >= 2 * mib)
    fetching.cancel()
    with pytest.raises(defer.CancelledError):
        await fetching
    assert requester.status()["fetching"] == {} and requester.counters["fetches_cancelled"] == 1
    await download.settled
    tmp = requester.shares.tmp
    assert {p.name for p in tmp.iterdir()} == {f"{sha}.part", f"{sha}.have"}
    assert not (requester.shares.root / "big.bin").exists()
    assert requester.counters["downloads_failed"] == 0  # withdrawn, not failed

    for conn in list(holder._connections):
        conn.transport.resumeProducing()
    result = await requester.fetch("big.bin", timeout=5.0)
    assert result.resumed >= 2 * mib and (requester.shares.root / "big.bin").read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_a_peer_sharing_only_what_it_placed_never_hashes_the_rest_of_its_folder(
        net: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    """``only_placed`` (the CLI's one-shot peer): the folder's own files are never hashed, indexed,
    found or served; the file the peer downloads is."""
    from p2pshare import shares

    hashed: list[str] = []
    hash_file = shares.hash_file
    monkeypatch.setattr(shares, "hash_file", lambda path: (hashed.append(Path(path).name), hash_file(path))[1])
    holder = await net.add({"wanted.bin": payload(3_000_000)})
    requester = await net.add({"private.txt": b"mine\n", "sub/notes.txt": b"mine too\n"},
                              peers=(("127.0.0.1", holder.udp_port),), only_placed=True)
    asker = await net.add(peers=(("127.0.0.1", requester.udp_port),))
    assert requester.shares.entries == {}
    assert await asker.search("private.txt", 0.5) == []

    await requester.fetch("wanted.bin", timeout=5.0)
    await requester.shares.rescan()  # a rescan too indexes only what the peer placed
    assert set(requester.shares.entries) == {"wanted.bin"}
    assert requester.peer_id in {hit.peer for hit in await asker.search("wanted.bin", 1.0)}
    assert await asker.search("sub/notes.txt", 0.5) == []
    assert "private.txt" not in hashed and "notes.txt" not in hashed
    assert not (requester.shares.state / "index.json").exists()  # nor a cache a daemon of this folder would read


@pytest_twisted.ensureDeferred
async def test_a_holder_with_a_manifest_of_other_content_is_dropped_and_the_fetch_goes_on(net: Network) -> None:
    """A liar offers the content's SHA-256 with the manifest of another file of the same size: every
    piece matches that manifest, and only the whole file's hash (a fetch by content checks it)
    shows the lie.  The fetch drops the liar and its manifest and takes the file from an honest
    holder that appears afterwards."""
    import attrs

    data, fake = payload(8 * 1024 * 1024), os.urandom(8 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    liar = await net.add({"f.bin": fake})
    liar.shares.entries = {"f.bin": attrs.evolve(liar.shares.entries["f.bin"], sha256=sha)}
    honest = await net.add()
    requester = await net.add(peers=(("127.0.0.1", liar.udp_port), ("127.0.0.1", honest.udp_port)), requery=0.2)
    fetch = requester.fetch(sha256=sha, timeout=20.0)
    await eventually(lambda: requester.counters["bad_manifests"] == 1)
    assert not fetch.called and not (requester.shares.root / "f.bin").exists()
    (honest.shares.root / "f.bin").write_bytes(data)
    await honest.shares.rescan()
    result = await fetch
    assert (requester.shares.root / "f.bin").read_bytes() == data
    assert str(liar.tcp_port) not in result.holder
    assert list((requester.shares.root / ".p2pshare" / "tmp").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_transfer_connections_send_without_waiting_for_acks_and_read_a_mebibyte_at_a_time(
        net: Network) -> None:
    """Control lines are small and answered: a `data` line followed by its bytes must not wait for the
    ACK of the line (Nagle), and reads are 1 MiB (fewer trips through the reactor)."""
    holder = await net.add({"f.txt": b"x"})
    with socket.create_connection(("127.0.0.1", holder.tcp_port)) as s:
        await eventually(lambda: len(holder._connections) == 1)
        (proto,) = holder._connections
        sock = proto.transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert proto.transport.bufferSize == 1024 * 1024
        s.close()


_HOLD_CLIENT = """
import socket, sys
held = []
for i in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b'{"v":1,"id":1,"op":"register","peer":"%032x","udp":4000,"tcp":4000}\\n' % i)
    held.append(s)
for s in held:
    assert b'"ok":true' in s.recv(1000)
print("registered", flush=True)
sys.stdin.read()
"""


@pytest_twisted.ensureDeferred
async def test_a_tracker_holds_a_real_connection_per_peer_in_under_1450_bytes() -> None:
    """Peers hold a TCP connection each: 300 real ones (each registering a peer) cost the tracker's
    process under 1,450 bytes each, Twisted's transport included (about 1,340; 1,510 with the log
    prefix and repr strings Twisted makes for each transport, which tracker connections share; more
    when each protocol's attributes end up in a dictionary of its own, and 2,600 when each
    transport's do too, which TrackerServerProtocol avoids by giving them their starting values
    before any I/O)."""
    count = 300
    tracker = await start_tracker(reactor(), "tcp:0:interface=127.0.0.1", max_per_address=10_000)
    client = None
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        client = subprocess.Popen([sys.executable, "-c", _HOLD_CLIENT, str(tracker.port.getHost().port), str(count)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert await deferToThread(client.stdout.readline) == b"registered\n"
        await eventually(lambda: len(tracker.factory.open) == count)
        gc.collect()
        per = (tracemalloc.get_traced_memory()[0] - before) / count
        tracemalloc.stop()
        assert per < 1_450, f"{per:.0f} bytes per connection"
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        if client is not None:
            client.stdin.close()
            client.wait(30)
        await tracker.stopService()
