"""The shared folder: safe name -> path, and the index of sizes and SHA-256 hashes.

Walking and hashing run in a thread (``deferToThread``); the index cache in the
state folder is keyed by name, size and mtime, so a restart does not rehash
files that did not change.  Every path handed out is checked by resolving real
paths and comparing them component-wise with the root, never by string prefix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import IO, Any, Iterable, Optional

from attrs import frozen
from blake3 import blake3
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2pshare.errors import AlreadyExists, InvalidName, NotFound, PlaceFailed
from p2pshare.wire import STATE_DIR, validate_name

SPARE_FILES = 4  # empty files kept ready for the next downloads
_RESUMABLE = re.compile(r"[0-9a-f]{64}\.(part|have)")
HASH_CHUNK = 1024 * 1024
CACHE_FILE = "index.json"
MIN_PIECE = 1024 * 1024
MAX_PIECES = 2048  # a manifest is at most 64 KiB of digests
BLAKE3_ROOT = "b3:"  # how a download names the root of a BLAKE3 manifest (a SHA-256 one's is bare hex)


def piece_size_for(size: int) -> int:
    """Pieces of 1 MiB, doubled until a file has at most MAX_PIECES of them."""
    piece = MIN_PIECE
    while piece * MAX_PIECES < size:
        piece *= 2
    return piece


@frozen
class Entry:
    """One shared file as indexed: its SHA-256, and its manifests (a digest per piece, in SHA-256 and
    in BLAKE3; see docs/protocol.md section 4.4)."""

    name: str
    size: int
    mtime_ns: int
    sha256: str
    piece_size: int = 0
    pieces: bytes = b""  # the SHA-256 digests, 32 bytes a piece; empty when not (yet) computed
    pieces3: bytes = b""  # the BLAKE3 digests, 32 bytes a piece; only for files of more than one piece

    @property
    def root(self) -> str:
        """The SHA-256 manifest's own hash: what an offer names so a requester can check the manifest."""
        return hashlib.sha256(self.pieces).hexdigest() if self.pieces else ""

    @property
    def root3(self) -> str:
        """The BLAKE3 manifest's own (BLAKE3) hash, offered beside ``root``."""
        return blake3(self.pieces3).hexdigest() if self.pieces3 else ""

    def manifest(self, kind: str) -> bytes:
        """The manifest of *kind* (``sha256`` or ``blake3``), or b"" without one."""
        return self.pieces3 if kind == "blake3" else self.pieces


def root_kind(root: str) -> str:
    """Which hash a download's manifest root (``HEX``, or ``b3:HEX`` for a BLAKE3 one) names."""
    return "blake3" if root.startswith(BLAKE3_ROOT) else "sha256"


_HASHES: dict[str, Any] = {"sha256": hashlib.sha256, "blake3": blake3}


def piece_hasher(root: str) -> Any:
    """A new hash object of the kind the manifest named by *root* uses for its pieces (and for itself)."""
    return _HASHES[root_kind(root)]()


def root_matches(pieces: bytes, root: str) -> bool:
    """Does manifest *pieces* hash to *root* (a download's: ``HEX`` for SHA-256, ``b3:HEX`` for BLAKE3)?"""
    h = piece_hasher(root)
    h.update(pieces)
    return bool(h.hexdigest() == root.removeprefix(BLAKE3_ROOT))


def within(root: Path, candidate: Path) -> bool:
    """True when real path *candidate* is *root* or below it (both already resolved)."""
    try:
        return os.path.commonpath([root, candidate]) == str(root)
    except ValueError:
        return False


def sha256_file(path: Path) -> str:
    return hash_file(path)[0]


def hash_file(path: Path) -> tuple[str, int, bytes, bytes]:
    """(SHA-256 of the whole, piece size, SHA-256 piece digests, BLAKE3 piece digests), in one read.

    The file is read HASH_CHUNK at a time into one buffer that feeds every hash, so memory
    stays flat whatever the piece size (512 MiB pieces for a 1 TiB file).  A file of one piece
    has its SHA-256 as its only piece digest, and no BLAKE3 manifest."""
    whole = hashlib.sha256()
    size = os.stat(path).st_size
    piece = piece_size_for(size)
    digests, digests3 = [], []
    # No larger than the file (a buffer is zeroed when it is made: 1 MiB per small file adds up).
    buffer = memoryview(bytearray(max(4096, min(HASH_CHUNK, piece, size))))
    one_piece = size <= piece  # then the piece's digest is the whole's: one hash is enough
    current, current3, filled = hashlib.sha256(), blake3(), 0  # the piece being read, and how much of it is in
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer[:min(len(buffer), piece - filled)]):
            chunk = buffer[:n]
            whole.update(chunk)
            filled += n
            if one_piece:
                continue
            current.update(chunk)
            current3.update(chunk)
            if filled == piece:
                digests.append(current.digest())
                digests3.append(current3.digest())
                current, current3, filled = hashlib.sha256(), blake3(), 0
    if one_piece:
        return whole.hexdigest(), piece, whole.digest() if filled else b"", b""
    if filled:
        digests.append(current.digest())
        digests3.append(current3.digest())
    return whole.hexdigest(), piece, b"".join(digests), b"".join(digests3)


def scan(root: Path, cache: dict[str, Entry], names: Optional[Iterable[str]] = None) -> dict[str, Entry]:
    """Walk *root* (blocking: run it in a thread) and return the index; with *names*, index only
    those files instead of walking.

    Skips the state folder, anything that is not a regular file, names that are
    not valid share names, and symlinks whose target lies outside *root*.
    """
    root = root.resolve()
    entries: dict[str, Entry] = {}
    if names is not None:
        for name in sorted(names):
            entry = _index_one(root, name, cache)
            if entry is not None:
                entries[name] = entry
        return entries
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        if base == root:
            dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        dirnames.sort()
        for fn in sorted(filenames):
            name = (base / fn).relative_to(root).as_posix()
            entry = _index_one(root, name, cache)
            if entry is not None:
                entries[name] = entry
    return entries


# The link(2) errors that mean "no hard links here": vfat and exfat say EPERM, FUSE filesystems
# without link support ENOSYS or EOPNOTSUPP (ENOTSUP, the same number on Linux), and EMLINK is a
# filesystem that takes no more links to the file.  A rename works there.  Anything else (EACCES,
# EROFS, ENOSPC, EIO, and EXDEV: a folder on another filesystem, where a rename fails too) is a
# real failure.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK})


def _index_one(root: Path, name: str, cache: dict[str, Entry]) -> Optional[Entry]:
    """The entry of file *name* under *root*: from *cache* when its size and mtime are unchanged,
    else hashed; None when it is not a shareable file."""
    try:
        validate_name(name)
        real = (root / name).resolve(strict=True)
        if not within(root, real) or within(root / STATE_DIR, real):
            return None
        st = real.stat()
        if not stat.S_ISREG(st.st_mode):
            return None
        old = cache.get(name)
        if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns and old.piece_size:
            return old
        return Entry(name, st.st_size, st.st_mtime_ns, *hash_file(real))
    except (InvalidName, OSError, RuntimeError):
        return None  # unreadable, vanished, a link loop or an unshareable name


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO never waits for a writer
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _open_beneath(root: Path, real: Path) -> int:
    """Open *real* (resolved, inside *root*) for reading, walking down from *root* one component at a
    time with ``O_NOFOLLOW``: a component that is a link now, whatever it was when *real* was
    resolved, fails the open (ELOOP or ENOTDIR).  Where ``dir_fd`` is not supported, only the
    final component is protected."""
    if os.open not in os.supports_dir_fd or not _NOFOLLOW:
        return os.open(real, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    parts = real.relative_to(root).parts
    fd = os.open(root, os.O_RDONLY | _DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


class Shares:
    """The index of one shared folder and the only way to turn a name into a path.

    With *only_placed*, only the files this object placed (finished downloads) are indexed and
    served: the other files of the folder are never hashed, and no index cache is read or written.
    """

    log = Logger()

    def __init__(self, root: Path | str, threadpool: Any = None, reactor: Any = None,
                 only_placed: bool = False) -> None:
        self.root = Path(root).resolve(strict=True)
        self.state = self.root / STATE_DIR
        self.tmp = self.state / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.spare = self.state / "spare"  # empty files made ahead, renamed into tmp when a download starts
        self.spare.mkdir(exist_ok=True)
        for old in self.spare.iterdir():
            old.unlink(missing_ok=True)
        self._spares: list[Path] = []
        self._making_spares = False
        self.downloading: set[str] = set()  # contents whose <sha256>.part a download holds
        for stale in self.tmp.iterdir():  # a previous run's leftovers, but for resumable downloads
            if not _RESUMABLE.fullmatch(stale.name) or not stale.with_suffix(
                    ".have" if stale.suffix == ".part" else ".part").exists():
                stale.unlink(missing_ok=True)
        self._entries: dict[str, Entry] = {}
        self._by_hash: dict[str, Entry] = {}
        self.generation = 0  # changes whenever the index does (the dashboard fetches the list again)
        self.only_placed = only_placed
        self._own: set[str] = set()  # with only_placed: the names placed here, the only ones indexed
        self.entries = {} if only_placed else self._load_cache()
        self._reactor = reactor
        self._threadpool = threadpool
        self._scanning: Optional[Deferred[dict[str, Entry]]] = None
        self._placed: dict[str, Entry] = {}  # downloads placed while a scan runs
        self._suspects: set[str] = set()  # files to hash again whatever their size and mtime say

    def _reactor_and_pool(self) -> tuple[Any, Any]:
        """The reactor and the thread pool blocking work goes to (the global reactor's unless given)."""
        from twisted.internet import reactor as default_reactor

        reactor = self._reactor or default_reactor
        return reactor, self._threadpool or reactor.getThreadPool()

    def _load_cache(self) -> dict[str, Entry]:
        try:
            raw = json.loads((self.state / CACHE_FILE).read_text())
            return {e["name"]: Entry(e["name"], e["size"], e["mtime_ns"], e["sha256"], e.get("piece", 0),
                                     bytes.fromhex(e.get("pieces", "")), bytes.fromhex(e.get("pieces3", "")))
                    for e in raw["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _save_cache(self, entries: list[Entry]) -> None:
        """Write the index cache (blocking, megabytes for a large folder: run it in a thread)."""
        tmp = self.state / (CACHE_FILE + ".new")
        files = [{"name": e.name, "size": e.size, "mtime_ns": e.mtime_ns, "sha256": e.sha256,
                  "piece": e.piece_size, "pieces": e.pieces.hex(), "pieces3": e.pieces3.hex()} for e in entries]
        tmp.write_text(json.dumps({"v": 1, "files": files}))
        os.replace(tmp, self.state / CACHE_FILE)

    def rescan(self) -> Deferred[dict[str, Entry]]:
        """Re-index in a thread; concurrent calls share one scan."""
        if self._scanning is not None:
            d: Deferred[dict[str, Entry]] = Deferred()
            self._scanning.addBoth(lambda r: (d.callback(r), r)[1])
            return d
        reactor, pool = self._reactor_and_pool()
        suspects = set(self._suspects)
        cache = {name: e for name, e in self.entries.items() if name not in suspects}
        names = sorted(self._own) if self.only_placed else None
        self._scanning = deferToThreadPool(reactor, pool, scan, self.root, cache, names)

        def done(entries: dict[str, Entry]) -> Any:
            self._scanning = None
            self._suspects -= suspects
            late = set(self._suspects)  # suspected while this scan ran on the old entries
            for name in late:
                entries.pop(name, None)
            if late:
                reactor.callLater(0, self.rescan)
            placed, self._placed = self._placed, {}
            for name, entry in placed.items():  # placed after the walk passed their folder
                entries.setdefault(name, entry)
            changed = entries != self.entries
            self.entries = entries
            if not changed or self.only_placed:  # the folder's cache is for a peer that shares all of it
                return entries
            saved = deferToThreadPool(reactor, pool, self._save_cache, list(entries.values()))
            saved.addErrback(lambda f: self.log.warn("could not save the index cache: {error}",
                                                     error=f.getErrorMessage()))
            return saved.addCallback(lambda _: entries)

        def failed(f: Any) -> Any:
            self._scanning = None
            return f

        return self._scanning.addCallbacks(done, failed)

    def suspect(self, name: str) -> Deferred[dict[str, Entry]]:
        """A requester found pieces of *name* that do not match its manifest: the file changed
        behind an unchanged size and mtime.  Stop offering it at once, and index it again from
        its bytes."""
        if name in self._entries:
            self._suspects.add(name)
            entries = dict(self._entries)
            del entries[name]
            self.entries = entries
        return self.rescan()

    @property
    def entries(self) -> dict[str, Entry]:
        """The index by name (replace it whole, or use ``place``, so the hash index follows)."""
        return self._entries

    @entries.setter
    def entries(self, entries: dict[str, Entry]) -> None:
        if entries != self._entries:
            self.generation += 1
        self._entries = entries
        self._by_hash = {e.sha256: e for e in sorted(entries.values(), key=lambda e: e.name, reverse=True)}

    def lookup(self, name: str, sha256: str = "") -> Optional[Entry]:
        """The file named *name*; with *sha256* too, that file if it has that content, else any file with
        that content (docs/protocol.md section 3.8); *sha256* alone: any file with that content."""
        if not sha256:
            return self._entries.get(name)
        entry = self._entries.get(name) if name else None
        if entry is not None and entry.sha256 == sha256:
            return entry
        return self._by_hash.get(sha256)

    def open_for_reading(self, name: str) -> tuple[Entry, IO[bytes]]:
        """Open an indexed file for serving; raise NotFound unless it is still the indexed file.

        The resolved path is opened one component at a time from the root, following
        no link (a folder or file swapped for a link after resolving is refused), without
        blocking (a FIFO swapped in would wait for a writer), and the *opened* file is
        checked (regular, same size and mtime), so a swap after indexing is caught.
        """
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"{name!r} is not shared here")
        path = self.root / name
        real = path.resolve()
        if not within(self.root, real) or within(self.state, real):
            raise NotFound(f"{name!r} is not shared here")
        try:
            fd = _open_beneath(self.root, real)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):  # a link, or not what was indexed
                raise NotFound(f"{name!r} changed since it was indexed") from None
            raise
        f = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
            f.close()
            raise NotFound(f"{name!r} changed since it was indexed")
        if _NONBLOCK:
            os.set_blocking(fd, True)  # a regular file: reads as usual
        return entry, f

    def destination(self, name: str) -> Path:
        """Where a download of *name* goes; raise unless it is a new file inside the root."""
        validate_name(name)
        parent = self.root
        for part in name.split("/")[:-1]:  # check each folder before creating the next one in it
            parent = parent / part
            if not os.path.lexists(parent):
                parent.mkdir()
            real = parent.resolve(strict=True)
            if not real.is_dir() or not within(self.root, real) or within(self.state, real):
                raise InvalidName(f"{name!r} would be written outside the shared folder")
            parent = real
        target = parent / name.rsplit("/", 1)[-1]
        if os.path.lexists(target):
            raise AlreadyExists(f"{name} already exists in {self.root}")
        return target

    def new_temporary(self) -> tuple[Path, IO[bytes]]:
        fd_path = self.tmp / f"{os.urandom(8).hex()}.part"
        return fd_path, self.temporary(fd_path)

    def temporary(self, path: Path) -> IO[bytes]:
        """An empty file at *path* in the temporary folder (replacing any there), open for reading and writing.

        Creating a file costs 0.1 to 0.4 ms on some file systems (ext4 on a virtual disk here), which a
        fetch of a small file would wait for: a few empty files are made ahead in a thread, and one is
        renamed into place (10 us).
        """
        while self._spares:
            spare = self._spares.pop()
            try:
                os.replace(spare, path)
                f = open(path, "r+b")
            except OSError:  # gone meanwhile: take the next, or make one
                continue
            if os.fstat(f.fileno()).st_size:
                f.truncate()
            self._make_spares()
            return f
        self._make_spares()
        return open(path, "w+b")

    def _make_spares(self) -> None:
        if self._making_spares or len(self._spares) >= SPARE_FILES:
            return
        reactor, pool = self._reactor_and_pool()
        self._making_spares = True

        def make(count: int) -> list[Path]:
            made = []
            for _ in range(count):
                path = self.spare / os.urandom(8).hex()
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))  # as open() would
                made.append(path)
            return made

        def done(made: list[Path]) -> None:
            self._making_spares = False
            self._spares.extend(made)

        def failed(f: Failure) -> None:
            self._making_spares = False
            self.log.warn("could not make spare temporary files in {path}: {error}", path=self.spare,
                          error=f.getErrorMessage())

        made = deferToThreadPool(reactor, pool, make, SPARE_FILES - len(self._spares))
        made.addCallbacks(done, failed)

    def place(self, tmp_path: Path, name: str, sha256: str, piece_size: int = 0, pieces: bytes = b"",
              pieces3: bytes = b"") -> Path:
        """Move a verified temporary file into place without overwriting anything.

        The temporary file is gone afterwards, whether or not it was placed; raises
        AlreadyExists, InvalidName or PlaceFailed when it was not.
        """
        try:
            target = self.destination(name)
            try:
                os.link(tmp_path, target)  # atomic, and fails if the target appeared meanwhile
            except FileExistsError:
                raise AlreadyExists(f"{name} already exists in {self.root}") from None
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise PlaceFailed(f"could not move {name} into {self.root}: {e.strerror}") from e
                self._place_without_links(tmp_path, target, name)
        finally:
            tmp_path.unlink(missing_ok=True)
        st = target.stat()
        self._own.add(name)
        entry = self._entries[name] = Entry(name, st.st_size, st.st_mtime_ns, sha256, piece_size, pieces, pieces3)
        self.generation += 1
        self._by_hash.setdefault(sha256, entry)
        if self._scanning is not None:
            self._placed[name] = entry
        return target

    def _place_without_links(self, tmp_path: Path, target: Path, name: str) -> None:
        """Claim *target* with an exclusive create, then replace that empty placeholder by the file,
        so a file that appeared meanwhile is never overwritten.  When the replace fails the
        placeholder is removed, if it is still ours and still empty: no empty file is left to share."""
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise AlreadyExists(f"{name} already exists in {self.root}") from None
        except OSError as e:
            raise PlaceFailed(f"could not create {name} in {self.root}: {e.strerror}") from e
        try:
            mine = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp_path, target)
        except OSError as e:
            self._remove_placeholder(target, mine)
            raise PlaceFailed(f"could not move {name} into {self.root}: {e.strerror}") from e

    def _remove_placeholder(self, target: Path, mine: os.stat_result) -> None:
        try:
            st = os.lstat(target)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and stat.S_ISREG(st.st_mode) and not st.st_size:
                os.unlink(target)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warn("could not remove the empty placeholder {path}: {error}", path=target, error=e.strerror)
