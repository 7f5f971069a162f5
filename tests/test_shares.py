"""The shared folder: what is indexed, what is served, where downloads may land."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from blake3 import blake3

from p2pshare import shares as shares_module
from p2pshare.errors import AlreadyExists, InvalidName, NotFound, PlaceFailed
from p2pshare.shares import MAX_PIECES, MIN_PIECE, SPARE_FILES, Entry, Shares, piece_size_for, scan, sha256_file, within


def test_scan_indexes_files_in_subfolders_with_posix_names(share: Path) -> None:
    (share / "a.txt").write_bytes(b"a")
    (share / "sub" / "deeper").mkdir(parents=True)
    (share / "sub" / "deeper" / "b.bin").write_bytes(b"bb")
    entries = scan(share, {})
    assert sorted(entries) == ["a.txt", "sub/deeper/b.bin"]
    assert entries["sub/deeper/b.bin"].size == 2
    assert entries["a.txt"].sha256 == sha256_file(share / "a.txt")


def test_the_state_folder_is_never_indexed(share: Path) -> None:
    Shares(share)
    (share / ".p2pshare" / "secret").write_bytes(b"x")
    assert scan(share, {}) == {}


def test_symlinks_outside_the_root_are_not_listed_and_inside_ones_are(tmp_path: Path, share: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    (share / "inside.txt").write_bytes(b"ok")
    (share / "escape").symlink_to(outside)
    (share / "alias").symlink_to(share / "inside.txt")
    (share / "dir-escape").symlink_to(tmp_path)
    assert sorted(scan(share, {})) == ["alias", "inside.txt"]


def test_names_that_are_not_valid_share_names_are_skipped(share: Path) -> None:
    (share / "ok.txt").write_bytes(b"1")
    (share / "bad\nname").write_bytes(b"1")
    assert sorted(scan(share, {})) == ["ok.txt"]


def test_unchanged_files_are_not_hashed_again(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (share / "a.txt").write_bytes(b"a")
    first = scan(share, {})
    calls: list[Path] = []
    monkeypatch.setattr(shares_module, "hash_file", lambda p: calls.append(p) or ("0" * 64, 1 << 20, b""))
    assert scan(share, first) == first
    assert calls == []
    os.utime(share / "a.txt", ns=(1, 1))
    scan(share, first)
    assert len(calls) == 1


@pytest_twisted.ensureDeferred
async def test_rescan_runs_in_a_thread_and_saves_the_cache(share: Path) -> None:
    (share / "a.txt").write_bytes(b"a")
    s = Shares(share)
    entries = await s.rescan()
    assert list(entries) == ["a.txt"]
    assert list(Shares(share).entries) == ["a.txt"]  # loaded from the cache on the next start


@pytest_twisted.ensureDeferred
async def test_a_download_gets_an_empty_file_made_ahead_in_a_thread(share: Path) -> None:
    """Creating a file costs up to 0.4 ms on some file systems: the next downloads' files are made
    ahead, off the reactor thread, and renamed into place."""
    from loopback import eventually

    s = Shares(share)
    first = s.temporary(s.tmp / ("a" * 64 + ".part"))  # none ready yet: made now, and spares after it
    first.close()
    await eventually(lambda: len(list(s.spare.iterdir())) == SPARE_FILES)
    spares = {p.stat().st_ino for p in s.spare.iterdir()}
    (s.tmp / ("b" * 64 + ".part")).write_bytes(b"an earlier attempt's bytes")
    with s.temporary(s.tmp / ("b" * 64 + ".part")) as f:
        st = os.fstat(f.fileno())
        assert st.st_ino in spares and st.st_size == 0  # a spare, replacing what was there
        f.write(b"new")
    assert (s.tmp / ("b" * 64 + ".part")).read_bytes() == b"new"
    await eventually(lambda: len(list(s.spare.iterdir())) == SPARE_FILES)  # made again
    assert sorted(p.name for p in s.tmp.iterdir()) == ["a" * 64 + ".part", "b" * 64 + ".part"]
    assert list(Shares(share).spare.iterdir()) == []  # a new start does not trust what it finds there


def test_open_for_reading_refuses_unindexed_and_changed_files(share: Path) -> None:
    (share / "a.txt").write_bytes(b"abc")
    s = Shares(share)
    s.entries = scan(share, {})
    entry, f = s.open_for_reading("a.txt")
    assert f.read() == b"abc"
    f.close()
    with pytest.raises(NotFound):
        s.open_for_reading("b.txt")
    (share / "a.txt").write_bytes(b"abcd")
    with pytest.raises(NotFound):
        s.open_for_reading("a.txt")


def test_a_file_swapped_for_a_symlink_after_indexing_is_not_served(tmp_path: Path, share: Path) -> None:
    (share / "a.txt").write_bytes(b"abc")
    s = Shares(share)
    s.entries = scan(share, {})
    (tmp_path / "secret").write_bytes(b"xyz")
    (share / "a.txt").unlink()
    (share / "a.txt").symlink_to(tmp_path / "secret")
    with pytest.raises((NotFound, OSError)):
        s.open_for_reading("a.txt")


def test_destination_refuses_existing_files_and_escapes(tmp_path: Path, share: Path) -> None:
    s = Shares(share)
    (share / "there.txt").write_bytes(b"x")
    with pytest.raises(AlreadyExists):
        s.destination("there.txt")
    with pytest.raises(InvalidName):
        s.destination("../x")
    (share / "link").symlink_to(tmp_path)
    with pytest.raises(InvalidName):
        s.destination("link/x")
    assert s.destination("new/dir/file.txt") == share / "new" / "dir" / "file.txt"


def test_place_moves_the_file_and_never_overwrites(share: Path) -> None:
    s = Shares(share)
    tmp, f = s.new_temporary()
    f.write(b"data")
    f.close()
    assert s.place(tmp, "got.txt", "0" * 64) == share / "got.txt"
    assert (share / "got.txt").read_bytes() == b"data"
    assert not tmp.exists()
    assert s.lookup("got.txt") == Entry("got.txt", 4, (share / "got.txt").stat().st_mtime_ns, "0" * 64)
    tmp2, f2 = s.new_temporary()
    f2.close()
    with pytest.raises(AlreadyExists):
        s.place(tmp2, "got.txt", "0" * 64)
    assert (share / "got.txt").read_bytes() == b"data"
    assert not tmp2.exists()


def test_stale_partial_downloads_are_removed_on_start(share: Path) -> None:
    s = Shares(share)
    tmp, f = s.new_temporary()
    f.close()
    Shares(share)
    assert not tmp.exists()


def test_the_index_holds_a_manifest_of_piece_digests(share: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    (share / "big.bin").write_bytes(data)
    entry = scan(share, {})["big.bin"]
    assert entry.piece_size == 1024 * 1024
    mib = 1024 * 1024
    assert entry.pieces == b"".join(hashlib.sha256(data[i: i + mib]).digest() for i in range(0, len(data), mib))
    assert entry.root == hashlib.sha256(entry.pieces).hexdigest()


def test_piece_sizes_keep_manifests_small() -> None:
    assert piece_size_for(0) == piece_size_for(1024) == 1024 * 1024
    assert piece_size_for(4 * 1024**3) == 2 * 1024 * 1024  # 4 GiB: 2048 pieces of 2 MiB
    assert 4 * 1024**4 // piece_size_for(4 * 1024**4) <= MAX_PIECES


def test_within_compares_components_not_string_prefixes(tmp_path: Path) -> None:
    assert within(tmp_path / "share", tmp_path / "share" / "a")
    assert not within(tmp_path / "share", tmp_path / "share-evil" / "a")
    assert within(tmp_path / "share", tmp_path / "share")


def test_a_download_through_a_symlinked_folder_creates_nothing_outside(tmp_path: Path, share: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (share / "door").symlink_to(outside)
    s = Shares(share)
    with pytest.raises(InvalidName):
        s.destination("door/new/sub/file.txt")
    assert list(outside.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_file_placed_during_a_scan_stays_in_the_index(share: Path) -> None:
    s = Shares(share)
    scanning = s.rescan()  # the walk runs in a thread; place before it reports
    tmp, f = s.new_temporary()
    f.write(b"x")
    f.close()
    s.place(tmp, "arrived.txt", "0" * 64)
    await scanning
    assert s.lookup("arrived.txt") is not None


def test_lookup_by_name_by_content_and_by_both(share: Path) -> None:
    (share / "a.txt").write_bytes(b"same")
    (share / "b.txt").write_bytes(b"same")
    (share / "c.txt").write_bytes(b"other")
    s = Shares(share)
    s.entries = scan(share, {})
    same = hashlib.sha256(b"same").hexdigest()
    assert s.lookup("c.txt").name == "c.txt"  # type: ignore[union-attr]
    assert s.lookup("", same).name in ("a.txt", "b.txt")  # type: ignore[union-attr]
    assert s.lookup("b.txt", same).name == "b.txt"  # type: ignore[union-attr]
    # That name with other content: any file with the content asked for (docs/protocol.md 3.8).
    assert s.lookup("c.txt", same).name in ("a.txt", "b.txt")  # type: ignore[union-attr]
    assert s.lookup("d.txt", same).name in ("a.txt", "b.txt")  # type: ignore[union-attr]
    assert s.lookup("c.txt", "0" * 64) is None  # no file has that content


def test_a_folder_swapped_for_a_symlink_between_resolving_and_opening_is_not_followed(
        tmp_path: Path, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race that checking the resolved path cannot catch: a folder on the way is replaced by a
    symlink to outside after the name was resolved, and the outside file has the indexed size and
    mtime (whoever can write to the shared folder can set both), so only the open itself can
    tell: every component is opened without following links."""
    (share / "sub").mkdir()
    (share / "sub" / "a.txt").write_bytes(b"abc")
    s = Shares(share)
    s.entries = scan(share, {})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_bytes(b"xyz")
    mtime = s.entries["sub/a.txt"].mtime_ns
    os.utime(outside / "a.txt", ns=(mtime, mtime))
    resolve = Path.resolve

    def resolve_then_swap(self: Path, strict: bool = False) -> Path:
        resolved = resolve(self, strict)
        if self == share / "sub" / "a.txt" and not (share / "sub").is_symlink():
            (share / "sub").rename(tmp_path / "moved-away")
            (share / "sub").symlink_to(outside)
        return resolved

    monkeypatch.setattr(Path, "resolve", resolve_then_swap)
    try:
        entry, f = s.open_for_reading("sub/a.txt")
    except (NotFound, OSError):
        return
    served = f.read()
    f.close()
    pytest.fail(f"served {served!r} from {outside} through a swapped folder")


def test_a_file_swapped_for_a_fifo_after_indexing_is_refused_without_blocking(share: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes; the reactor must never wait on that."""
    import threading

    (share / "a.txt").write_bytes(b"abc")
    s = Shares(share)
    s.entries = scan(share, {})
    (share / "a.txt").unlink()
    os.mkfifo(share / "a.txt")
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            s.open_for_reading("a.txt")[1].close()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        os.close(os.open(share / "a.txt", os.O_WRONLY | os.O_NONBLOCK))  # release it
        thread.join(5)
        pytest.fail("open_for_reading blocked on a FIFO")
    assert outcome and isinstance(outcome[0], (NotFound, OSError)), outcome


def test_names_that_differ_only_by_unicode_normalisation_are_refused_not_confused(share: Path) -> None:
    """An NFC name ("café.txt", é one code point) and its NFD twin (e + combining accent) are the
    same text to a reader and different names to most file systems.  Only NFC names exist on
    the network: a request for the NFD form of a shared NFC name finds nothing (it is not even a
    valid name on the wire), a file stored under an NFD name is not shared (so it can never be
    served for, or confused with, its NFC twin), and a download cannot create an NFD name."""
    import unicodedata

    from p2pshare.errors import MalformedMessage
    from p2pshare.wire import Query, decode_datagram

    nfc, nfd = "caf\u00e9.txt", "cafe\u0301.txt"
    assert unicodedata.normalize("NFC", nfd) == nfc and nfc != nfd
    (share / nfc).write_bytes(b"composed")
    (share / "other").mkdir()
    (share / "other" / nfd).write_bytes(b"decomposed")
    s = Shares(share)
    s.entries = scan(share, {})
    assert sorted(s.entries) == [nfc]  # the NFD-named file is not shared
    assert s.lookup(nfd) is None and s.lookup("other/" + nfc) is None
    with pytest.raises(NotFound):
        s.open_for_reading(nfd)
    entry, f = s.open_for_reading(nfc)
    assert f.read() == b"composed"
    f.close()
    with pytest.raises(InvalidName):
        s.destination("new-" + nfd)
    ok = Query("1" * 32, nfc, ("10.0.0.1", 1), ("10.0.0.1", 1), 3).encode()
    assert decode_datagram(ok).name == nfc  # type: ignore[union-attr]
    with pytest.raises(MalformedMessage):
        decode_datagram(ok.replace(nfc.encode(), nfd.encode()))


def test_names_that_differ_only_by_case_are_distinct_and_never_overwrite_each_other(
        share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are compared exactly: "notes.txt" and "NOTES.txt" are two files here, each served with its
    own content, and a third spelling ("Notes.txt") finds neither.  On a case-insensitive file
    system the two names are one file: a download asks the file system whether the name exists
    (``lexists``) and places with ``link()``, which fails if it does, so it never overwrites the
    other spelling; simulated here by a file system that folds case."""
    (share / "notes.txt").write_bytes(b"lower")
    (share / "NOTES.txt").write_bytes(b"UPPER")
    s = Shares(share)
    s.entries = scan(share, {})
    assert sorted(s.entries) == ["NOTES.txt", "notes.txt"]
    for name, content in (("notes.txt", b"lower"), ("NOTES.txt", b"UPPER")):
        entry, f = s.open_for_reading(name)
        assert f.read() == content and entry.name == name
        f.close()
    assert s.lookup("Notes.txt") is None
    with pytest.raises(NotFound):
        s.open_for_reading("Notes.txt")

    # A case-insensitive file system: every name that exists in some case exists in every case.
    (share / "NOTES.txt").unlink()
    existing = {p.name.lower() for p in share.iterdir()}
    lexists = os.path.lexists

    def folded_lexists(path: str | os.PathLike[str]) -> bool:
        return lexists(path) or Path(path).name.lower() in existing

    monkeypatch.setattr(shares_module.os.path, "lexists", folded_lexists)
    with pytest.raises(AlreadyExists):
        s.destination("NOTES.TXT")
    tmp, f = s.new_temporary()
    f.write(b"would overwrite")
    f.close()
    with pytest.raises(AlreadyExists):
        s.place(tmp, "Notes.txt", "0" * 64)
    assert (share / "notes.txt").read_bytes() == b"lower" and not tmp.exists()


def downloaded(s: Shares, data: bytes = b"data") -> Path:
    tmp, f = s.new_temporary()
    f.write(data)
    f.close()
    return tmp


def failing(code: int):  # type: ignore[no-untyped-def]
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK])
def test_without_hard_links_the_file_is_placed_by_rename(share: Path, monkeypatch: pytest.MonkeyPatch,
                                                         code: int) -> None:
    """vfat and exfat refuse link() with EPERM, FUSE filesystems without links with ENOSYS or EOPNOTSUPP."""
    s = Shares(share)
    tmp = downloaded(s)
    monkeypatch.setattr(shares_module.os, "link", failing(code))
    assert s.place(tmp, "got.txt", "0" * 64) == share / "got.txt"
    assert (share / "got.txt").read_bytes() == b"data"
    assert not tmp.exists()
    assert s.lookup("got.txt") is not None


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EIO, errno.EXDEV])
def test_other_link_errors_fail_the_placing_and_create_nothing(share: Path, monkeypatch: pytest.MonkeyPatch,
                                                               code: int) -> None:
    s = Shares(share)
    tmp = downloaded(s)
    monkeypatch.setattr(shares_module.os, "link", failing(code))
    with pytest.raises(PlaceFailed, match=os.strerror(code)) as raised:
        s.place(tmp, "got.txt", "0" * 64)
    assert isinstance(raised.value.__cause__, OSError) and raised.value.__cause__.errno == code
    assert not os.path.lexists(share / "got.txt")
    assert not tmp.exists()
    assert s.lookup("got.txt") is None


def test_a_failed_rename_leaves_no_empty_placeholder(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Shares(share)
    tmp = downloaded(s)
    monkeypatch.setattr(shares_module.os, "link", failing(errno.EPERM))
    monkeypatch.setattr(shares_module.os, "replace", failing(errno.EIO))
    with pytest.raises(PlaceFailed):
        s.place(tmp, "got.txt", "0" * 64)
    assert not os.path.lexists(share / "got.txt")
    assert not tmp.exists()
    assert s.lookup("got.txt") is None
    assert scan(share, {}) == {}


def test_a_file_that_took_the_placeholders_place_is_kept(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Shares(share)
    tmp = downloaded(s)
    target = share / "got.txt"

    def swapped_then_failed(src: object, dst: object) -> None:
        target.unlink()  # someone else's file now holds the name
        target.write_bytes(b"theirs")
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(shares_module.os, "link", failing(errno.EPERM))
    monkeypatch.setattr(shares_module.os, "replace", swapped_then_failed)
    with pytest.raises(PlaceFailed):
        s.place(tmp, "got.txt", "0" * 64)
    assert target.read_bytes() == b"theirs"
    assert not tmp.exists()


def test_without_hard_links_a_file_that_appeared_meanwhile_is_not_overwritten(
        share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Shares(share)
    tmp = downloaded(s)
    target = share / "got.txt"

    def appeared_then_refused(src: object, dst: object) -> None:
        target.write_bytes(b"theirs")
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(shares_module.os, "link", appeared_then_refused)
    with pytest.raises(AlreadyExists):
        s.place(tmp, "got.txt", "0" * 64)
    assert target.read_bytes() == b"theirs"
    assert not tmp.exists()


def hashed_by_whole_pieces(path: Path, piece: int) -> tuple[str, int, bytes, bytes]:
    """The reference: each piece read whole; one piece's only digest is its SHA-256, and it has no BLAKE3 one."""
    data = path.read_bytes()
    digests = b"".join(hashlib.sha256(data[i:i + piece]).digest() for i in range(0, len(data), piece))
    digests3 = b"".join(blake3(data[i:i + piece]).digest() for i in range(0, len(data), piece))
    return hashlib.sha256(data).hexdigest(), piece, digests, digests3 if len(data) > piece else b""


@pytest.mark.parametrize("chunk", [1000, 4096, 10_000])
@pytest.mark.parametrize("size", [0, 1, 999, 1000, 4095, 4096, 4097, 8192, 3 * 4096 - 1, 3 * 4096 + 1000])
def test_hashing_in_chunks_gives_the_digests_of_whole_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            size: int, chunk: int) -> None:
    monkeypatch.setattr(shares_module, "piece_size_for", lambda size: 4096)
    monkeypatch.setattr(shares_module, "HASH_CHUNK", chunk)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    assert shares_module.hash_file(path) == hashed_by_whole_pieces(path, 4096)


@pytest.mark.parametrize("size", [MIN_PIECE - 1, MIN_PIECE, MIN_PIECE + 1, 2 * MIN_PIECE + 12345])
def test_hashing_real_piece_sizes_gives_the_digests_of_whole_pieces(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    assert shares_module.hash_file(path) == hashed_by_whole_pieces(path, MIN_PIECE)


def test_hashing_a_file_of_64_mib_pieces_takes_a_few_mib_of_memory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    piece = 64 * MIN_PIECE
    monkeypatch.setattr(shares_module, "piece_size_for", lambda size: piece)
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(piece + MIN_PIECE)  # sparse: zeros, and no disk
    tracemalloc.start()
    try:
        digest, _, pieces, pieces3 = shares_module.hash_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    zeros = hashlib.sha256()
    for _ in range(65):
        zeros.update(bytes(MIN_PIECE))
    assert digest == zeros.hexdigest()
    assert pieces[32:] == hashlib.sha256(bytes(MIN_PIECE)).digest()
    assert pieces3[32:] == blake3(bytes(MIN_PIECE)).digest()
    assert peak < 4 * MIN_PIECE
