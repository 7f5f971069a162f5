"""The shared folder: what is indexed, what is served, where downloads may land."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted

from p2pshare import shares as shares_module
from p2pshare.errors import AlreadyExists, InvalidName, NotFound
from p2pshare.shares import MAX_PIECES, Entry, Shares, piece_size_for, scan, sha256_file, within


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
    assert s.lookup("c.txt", same) is None  # that name, but not that content
