"""The requester's side of a fetch: query, collect hits, accept an offer or dial a holder.

Whoever dialled, one ``Download`` per fetch receives the file; when a holder
fails, the next holder that answered is dialled; the fetch ends verified and in
place, or with NotFound / TransferFailed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable, Optional, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pshare.download import Download, in_thread
from p2pshare.errors import (AlreadyExists, AmbiguousName, InvalidName, NotFound, P2PError, TransferFailed,
                             VerificationFailed, describe)
from p2pshare.ratelimit import Counters
from p2pshare.shares import Entry, Shares
from p2pshare.transfer import ITransferNode, TransferProtocol, dial, manifest_root
from p2pshare.wire import Address, Frame, Hit, is_sha256, validate_name

MAX_SOURCES = 8  # holders one download draws on at once
FIRST_SWARM_QUERY = 0.5  # seconds after a download starts: who else holds or fetches it?
RETRY_SOURCE = 5.0  # seconds before a holder that was tried may be dialled again in one download
KEEP_QUERIES = 2  # re-queries of a download in progress still waiting for hits
HISTORY = 50  # finished fetches remembered for the status (the dashboard's list)


class FetchHost(Protocol):
    """What a ``Fetcher`` needs of the peer it works for, and all it uses (``Peer`` provides it)."""

    reactor: Any  # IReactorTime and IReactorThreads: timers, and the pool that writes downloads
    shares: Shares
    counters: Counters
    metrics: Any  # metrics.PeerMetrics: the histograms a fetch observes
    peer_id: str
    dial_wait: float  # seconds to wait for holders to dial before dialling them
    requery: float  # seconds between queries while nobody answered, or while a download lacks sources
    idle: float  # a transfer connection's idle timeout

    def query(self, name: str, fetch: bool, on_hit: Callable[[Hit], None], sha256: str = "") -> str: ...

    def finish_query(self, request_id: str) -> None: ...

    def endpoint_to(self, address: Address) -> IStreamClientEndpoint: ...

    def track(self, proto: TransferProtocol, alive: bool) -> None: ...


@frozen
class FetchResult:
    """What ``Peer.fetch`` fires with: the verified file in place, and how it came."""

    name: str
    path: str
    size: int
    sha256: str
    holder: str  # host:port of the holder's transfer socket (of each, comma-separated, when several)
    holder_peer: str
    dialled_by: str  # "holder" (the original design) or "requester" (dial-back)
    seconds: float
    resumed: int = 0  # bytes verified by an earlier attempt and not fetched again
    sources: int = 1  # holders that sent pieces


class _Fetch:
    serials = itertools.count(1)

    def __init__(self, name: str, sha256: str, timeout: float, started: float) -> None:
        self.id = next(self.serials)  # names this fetch in the status and to cancel it
        self.name, self.sha256, self.timeout = name, sha256, timeout  # name "" until an offer names it
        self.key = f"{name}\0{sha256}"  # by name, by content, or both: joined only when both agree
        self.ids: list[str] = []  # one per query sent: the first, then re-queries
        self.active = True
        self.requery: Optional[IDelayedCall] = None
        self.waiters: list[Deferred[FetchResult]] = []
        self.progress: list[Callable[[int, int], None]] = []
        self.hits: list[Hit] = []
        self.tried: dict[Address, float] = {}  # holder -> when it was last dialled or taken on
        self.banned: set[Address] = set()  # holders that sent bad pieces: never again in this fetch
        self.bad_roots: set[str] = set()  # manifests whose pieces made a file that is not the content
        self.other_roots: set[Address] = set()  # holders that offered the content with another manifest
        self.swarm_ids: list[str] = []  # re-queries while downloading (for more holders, partial ones too)
        self.download: Optional[Download] = None
        self.sources: dict[TransferProtocol, tuple[Address, str]] = {}  # connection -> (holder, dialled by)
        self.source_peers: dict[TransferProtocol, str] = {}  # connection -> the holder's peer id
        self.dialing: set[TransferProtocol] = set()
        self.timer: Optional[IDelayedCall] = None
        self.dial_timer: Optional[IDelayedCall] = None
        self.expired = False
        self.all_sources: list[tuple[Address, str]] = []  # sources that have come and gone
        self.error: Optional[BaseException] = None
        self.started = started  # on the peer's clock

    def report(self, got: int, size: int) -> None:
        for listener in self.progress:
            listener(got, size)

    @property
    def label(self) -> str:
        return self.name or f"sha256:{self.sha256}"

    def wants(self, name: str, sha256: str) -> bool:
        """Is content *sha256* named *name* what this fetch asked for?"""
        return (not self.sha256 or sha256 == self.sha256) and (not self.name or name == self.name)

    def disagreement(self) -> Optional[str]:
        """Asked for by name only, and holders answered with different contents: describe them."""
        if self.sha256:
            return None
        versions: dict[str, int] = {}
        for hit in self.hits:
            versions[hit.sha256] = versions.get(hit.sha256, 0) + 1
        if len(versions) < 2:
            return None
        listed = ", ".join(f"sha256:{h[:16]}… ({n} holder{'s' if n > 1 else ''})" for h, n in versions.items())
        return f"holders disagree about {self.name}: {listed}; pick one with --hash"


@implementer(ITransferNode)
class _Dialer:
    """The node for a connection a requester dialled to a holder it heard from."""

    def __init__(self, fetcher: "Fetcher", fetch: _Fetch, hit: Hit) -> None:
        self.fetcher, self.fetch, self.hit = fetcher, fetch, hit
        self.peer_id = fetcher.host.peer_id
        self.limits = getattr(fetcher.host, "limits", None)  # the peer's bandwidth limits

    def open_for_sending(self, frame: Frame) -> tuple[Entry, IO[bytes], Optional[Download]]:
        raise NotFound("this connection only receives")

    def sent(self, nbytes: int) -> None:
        pass  # this connection only receives

    def suspect(self, entry: Entry) -> None:
        pass  # this connection only receives

    def accept_offer(self, frame: Frame, proto: TransferProtocol) -> Optional[Download]:
        if frame.name != self.hit.name or frame.sha256 != self.hit.sha256 or frame.size != self.hit.size:
            return None
        return self.fetcher._accept(self.fetch, frame, proto, "requester")

    def track(self, proto: TransferProtocol, alive: bool) -> None:
        self.fetcher.host.track(proto, alive)


class Fetcher:
    """All fetches of one peer, by name (two fetches of one name share a download) and by request ID."""

    log = Logger()

    def __init__(self, host: FetchHost) -> None:
        self.host = host
        self.fetches: dict[str, _Fetch] = {}
        self.by_id: dict[str, _Fetch] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)  # finished fetches, the latest last
        self.detached: dict[int, Deferred[FetchResult]] = {}  # fetches started by start(), by id

    def accept_offer(self, frame: Frame, proto: TransferProtocol) -> Optional[Download]:
        """A holder dialled us with an offer: the download it is for, or None to decline."""
        f = self.by_id.get(frame.id)
        if f is None or not f.wants(frame.name, frame.sha256):
            self.host.counters.add("offers_declined")
            return None
        return self._accept(f, frame, proto, "holder")

    def serving(self, name: str = "", sha256: str = "") -> Optional[Download]:
        """The download in progress of *name* and/or content *sha256* whose verified pieces we can
        serve: one that has its manifest."""
        for f in self.fetches.values():
            d = f.download
            if (d is not None and d.pieces is not None and not d.done.called and (not name or d.name == name)
                    and (not sha256 or d.sha256 == sha256)):
                return d
        return None

    def stop(self) -> Deferred[Any]:
        """End every fetch; fires once no worker thread writes a temporary file any more."""
        downloads = [f.download for f in self.fetches.values() if f.download is not None]
        for f in list(self.fetches.values()):
            self._finish(f, Failure(TransferFailed(f"{f.label}: the peer is shutting down")))
        return DeferredList([d.settled for d in downloads])

    def status(self) -> dict[str, Any]:
        """The fetches in progress by label: bytes, sources and pieces (a download's, once one started)."""
        out = {}
        now = self.host.reactor.seconds()
        for f in self.fetches.values():
            d = f.download
            out[f.label] = {"id": f.id, "name": f.name or (d.name if d else ""),
                            "sha256": f.sha256 or (d.sha256 if d else ""),
                            "state": "downloading" if d else "searching", "received": d.received if d else 0,
                            "size": d.size if d else None, "sources": len(f.sources),
                            "pieces": d.count if d else 0, "verified": d.count - d.missing if d else 0,
                            "seconds": round(now - f.started, 3)}
        return out

    def start(self, name: str = "", sha256: str = "", timeout: float = 10.0) -> int:
        """A fetch that runs on its own, not tied to a caller (the dashboard's): its id, to follow it in the
        status and to ``cancel`` it.  Raises what ``fetch`` would fail with at once (a bad name...)."""
        d = self.fetch(name, timeout, None, sha256)
        refused: list[Failure] = []
        d.addErrback(refused.append)  # fires now only when the request is refused outright
        if refused:
            refused[0].raiseException()
        fid = next(f.id for f in self.fetches.values() if d in f.waiters)
        self.detached[fid] = d
        d.addBoth(lambda _: (self.detached.pop(fid, None), None)[1])  # its end is in the history
        return fid

    def cancel(self, fid: int) -> bool:
        """End fetch *fid* for every caller, keeping its verified pieces; False when no such fetch runs."""
        f = next((f for f in self.fetches.values() if f.id == fid), None)
        if f is None:
            return False
        self.host.counters.add("fetches_cancelled")
        self._finish(f, Failure(TransferFailed(f"{f.label}: cancelled")), "cancelled")
        return True

    def fetch(self, name: str = "", timeout: float = 10.0, progress: Optional[Callable[[int, int], None]] = None,
              sha256: str = "") -> Deferred[FetchResult]:
        """Find *name* (or content *sha256*, or both), download it, verify it, put it in the shared folder.

        Callers asking for the same thing at once share one fetch; cancelling the returned Deferred
        withdraws one caller, and the last one to withdraw ends the fetch (see ``_cancel``)."""
        try:
            if sha256 and not is_sha256(sha256):
                raise InvalidName(f"{sha256!r} is not a SHA-256 in hex")
            if name or not sha256:
                validate_name(name)
                if os.path.lexists(self.host.shares.root / name):
                    raise AlreadyExists(f"{name} already exists in {self.host.shares.root}")
            else:
                here = self.host.shares.lookup("", sha256)
                if here is not None:
                    raise AlreadyExists(f"sha256:{sha256} is already here as {here.name}")
        except P2PError as e:
            return fail(e)
        key = f"{name}\0{sha256}"
        f = self.fetches.get(key)
        if f is None:
            f = self.fetches[key] = _Fetch(name, sha256, timeout, self.host.reactor.seconds())
            self._fetch_query(f)
            f.timer = self.host.reactor.callLater(timeout, self._fetch_expired, f)
        if progress is not None:
            f.progress.append(progress)
        d: Deferred[FetchResult] = Deferred(lambda d: self._cancel(f, d, progress))
        f.waiters.append(d)
        return d

    def _cancel(self, f: _Fetch, d: Deferred[FetchResult], progress: Optional[Callable[[int, int], None]]) -> None:
        """A waiter's Deferred was cancelled (its caller went away): drop that waiter; when it was the
        last, end the fetch, keeping the verified pieces of its download for a later resume."""
        if d in f.waiters:
            f.waiters.remove(d)
        if progress is not None and progress in f.progress:
            f.progress.remove(progress)
        if f.active and not f.waiters:
            self.host.counters.add("fetches_cancelled")
            self._finish(f, Failure(TransferFailed(f"{f.label}: cancelled")))

    def _fetch_query(self, f: _Fetch) -> None:
        """Query (again, with a new request ID, while no holder has answered; and while
        downloading, to find more holders: peers downloading the same content answer too)."""
        f.requery = None
        if not f.active:
            return
        if f.download is not None:
            self._swarm_query(f)
            return
        if any(h.tcp not in f.banned for h in f.hits):
            return
        rid = self.host.query(f.name, True, lambda hit: self._fetch_hit(f, hit), f.sha256)
        f.ids.append(rid)
        self.by_id[rid] = f
        if self.host.requery < f.timeout - (self.host.reactor.seconds() - f.started):
            f.requery = self.host.reactor.callLater(self.host.requery, self._fetch_query, f)

    def _swarm_query(self, f: _Fetch) -> None:
        """While a download lacks sources, ask (without asking to be dialled) who else has it."""
        assert f.download is not None
        if f.download.complete:
            return
        if len(f.sources) + len(f.dialing) < MAX_SOURCES:
            rid = self.host.query("", False, lambda hit: self._fetch_hit(f, hit), f.download.sha256)
            f.swarm_ids.append(rid)
            while len(f.swarm_ids) > KEEP_QUERIES:
                self.host.finish_query(f.swarm_ids.pop(0))
        f.requery = self.host.reactor.callLater(self.host.requery, self._fetch_query, f)

    def _fetch_hit(self, f: _Fetch, hit: Hit) -> None:
        if not f.wants(hit.name, hit.sha256):
            return
        if any(h.peer == hit.peer and h.tcp == hit.tcp and h.sha256 == hit.sha256 for h in f.hits):
            return  # the same holder again, answering a re-query
        if not f.hits and f.download is None:
            self.host.metrics.first_hit.observe("fetch", self.host.reactor.seconds() - f.started)
        f.hits.append(hit)
        for proto, peer in f.source_peers.items():
            if peer == hit.peer:  # it dialled us before its hit came: now we know its listening address
                f.sources[proto] = (hit.tcp, f.sources[proto][1])
        if f.download is not None and any(h.peer != hit.peer and h.sha256 == hit.sha256 for h in f.hits):
            f.download.swarming = True  # several peers have it: take pieces in an order others will not
        disagreement = f.disagreement()
        if disagreement is not None:  # refuse to guess, even mid-download
            self._finish(f, Failure(AmbiguousName(disagreement)))
            return
        if f.download is not None:
            self._dial_more(f)  # a further holder for a download in progress
        elif not f.sources and not f.dialing and f.dial_timer is None:
            # Holders dial us with offers; if none has connected after dial_wait (we may be
            # unreachable from outside), connect to them ourselves.
            f.dial_timer = self.host.reactor.callLater(self.host.dial_wait, self._dial_more, f)

    def _dial_more(self, f: _Fetch) -> None:
        """Connect to holders that answered, up to MAX_SOURCES connections in all."""
        f.dial_timer = None
        while f.active and len(f.sources) + len(f.dialing) < MAX_SOURCES:
            now = self.host.reactor.seconds()
            busy = {holder for holder, _ in f.sources.values()} | f.banned
            busy |= {holder for holder, when in f.tried.items() if now - when < RETRY_SOURCE}
            connected = set(f.source_peers.values())  # a holder that dialled us has no hit address
            sha = f.download.sha256 if f.download is not None else None
            hit = next((h for h in f.hits if h.tcp not in busy and h.peer not in connected
                        and (sha is None or h.sha256 == sha)), None)
            if hit is None:
                break
            self._dial(f, hit)
        self._check_stalled(f)

    def _dial(self, f: _Fetch, hit: Hit) -> None:
        f.tried[hit.tcp] = self.host.reactor.seconds()
        self.host.counters.add("dials_to_holders")
        greeting = Frame("open", id=hit.id, name=hit.name, sha256=hit.sha256)
        proto = TransferProtocol(_Dialer(self, f, hit), greeting=greeting, idle=self.host.idle,
                                 clock=self.host.reactor)
        f.dialing.add(proto)

        def ended(result: Any) -> None:
            f.dialing.discard(proto)
            if isinstance(result, Failure):
                f.error = TransferFailed(f"{f.label}: could not connect to {hit.tcp[0]}:{hit.tcp[1]}")
            elif proto.error is not None and proto not in f.sources:
                f.error = TransferFailed(f"{f.label}: {proto.error}")
            if proto not in f.sources:
                self._dial_more(f)

        dial(self.host.endpoint_to(hit.tcp), proto).addCallbacks(lambda p: p.closed.addBoth(ended), ended)

    def _accept(self, f: _Fetch, frame: Frame, proto: TransferProtocol, dialled_by: str) -> Optional[Download]:
        """Take *proto* on as a source of this fetch's download (creating the download first)."""
        if not f.active or not f.wants(frame.name, frame.sha256) or len(f.sources) >= MAX_SOURCES:
            self.host.counters.add("offers_declined")
            return None
        if not f.sha256 and any(h.sha256 != frame.sha256 for h in f.hits):
            self.host.counters.add("offers_declined")  # the hits disagree; _fetch_hit has ended the fetch
            return None
        holder = proto.transport.getPeer()
        address = next((h.tcp for h in f.hits if h.peer == frame.peer), (holder.host, holder.port))
        if (any(a == address for a, _ in f.sources.values()) or frame.peer in f.source_peers.values()
                or address in f.banned):
            self.host.counters.add("offers_declined")  # one connection per holder and download
            return None
        root = manifest_root(frame)
        if root and root in f.bad_roots:
            f.banned.add(address)  # a manifest that already made a file that is not the content
            self.host.counters.add("offers_declined")
            return None
        if f.download is None:
            if not self._start_download(f, frame, root):
                return None
        elif (frame.sha256, frame.size) == (f.download.sha256, f.download.size) and root != f.download.root:
            # The same content under another manifest: one of the two is a lie.  The pieces only
            # prove that the file matches its manifest, so the whole file is checked at the end,
            # and this holder is kept in reserve for the other manifest.
            f.download.verify_whole = True
            f.other_roots.add(address)
            self.host.counters.add("offers_other_manifest")
            return None
        elif (frame.sha256, root, frame.size) != (f.download.sha256, f.download.root, f.download.size):
            self.host.counters.add("offers_declined")  # another content
            return None
        assert f.download is not None
        f.sources[proto] = (address, dialled_by)
        f.source_peers[proto] = frame.peer
        if len(f.sources) > 1 or frame.have:
            f.download.swarming = True
        f.tried[address] = self.host.reactor.seconds()
        self.host.counters.add(f"sources_dialled_by_{dialled_by}")
        if f.dial_timer is not None:
            f.dial_timer.cancel()
            f.dial_timer = None
        proto.on_bad_piece = lambda p: self._bad_source(f, p)
        proto.closed.addBoth(lambda _: self._source_gone(f, proto))
        return f.download

    def _start_download(self, f: _Fetch, frame: Frame, root: str) -> bool:
        if os.path.lexists(self.host.shares.root / frame.name):  # asked by hash: the name came with the offer
            self._finish(f, Failure(AlreadyExists(f"{frame.name} already exists in {self.host.shares.root}")))
            return False
        short = self._space_short_of(frame)
        if short:
            self._finish(f, Failure(TransferFailed(f"{frame.name}: {frame.size} bytes do not fit in "
                                                   f"{self.host.shares.tmp} ({short} bytes short)")))
            return False
        download = Download(self.host.shares, frame.name, frame.size, frame.sha256, f.report,
                            in_thread(self.host.reactor), frame.piece, root, verify_whole=bool(f.sha256))
        f.download = download
        if f.requery is not None and f.requery.active():
            f.requery.cancel()
        f.requery = self.host.reactor.callLater(min(FIRST_SWARM_QUERY, self.host.requery), self._fetch_query, f)

        def done(path: Path) -> None:
            sources = f.all_sources + list(f.sources.values())
            holders = list(dict.fromkeys("%s:%d" % holder for holder, _ in sources))
            dialled_by = sources[0][1] if sources else "holder"
            result = FetchResult(frame.name, str(path), frame.size, frame.sha256, ", ".join(holders), frame.peer,
                                 dialled_by, round(self.host.reactor.seconds() - f.started, 3), download.resumed_from,
                                 len(holders))
            self.host.counters.add("downloads_completed")
            self.host.counters.add("download_pauses", download.pauses)  # the disk fell behind the network
            self._finish(f, result)

        def failed(failure: Failure) -> None:
            if f.active and f.download is download and failure.check(VerificationFailed) and download.root:
                self._bad_manifest(f, download, failure.value)
            elif f.active and f.download is download:
                self.host.counters.add("downloads_failed")
                self._finish(f, failure)

        download.done.addCallbacks(done, failed)
        return True

    def _bad_manifest(self, f: _Fetch, download: Download, error: BaseException) -> None:
        """Every piece matched the manifest, and the file is not the content: the manifest is a lie.
        Its holders are dropped, and the fetch starts again from holders of another manifest."""
        self.host.counters.add("bad_manifests")
        self.log.warn("{name}: the manifest {root} describes other content; dropping its holders",
                      name=f.label, root=download.root[:16])
        f.bad_roots.add(download.root)
        f.error = error
        for proto, (address, _) in list(f.sources.items()):
            f.banned.add(address)
            if proto.transport is not None:
                proto.transport.loseConnection()
        f.banned.update(address for address, _ in f.all_sources)
        f.all_sources.clear()
        self._retire(download)
        f.download = None
        for address in f.other_roots - f.banned:
            f.tried.pop(address, None)  # may be dialled again at once
        self._dial_more(f)
        if not f.dialing and f.dial_timer is None:  # nobody else answered yet: ask again
            if f.requery is not None and f.requery.active():
                f.requery.cancel()
            self._fetch_query(f)

    def _bad_source(self, f: _Fetch, proto: TransferProtocol) -> None:
        self.host.counters.add("bad_pieces")  # that holder is not asked again in this fetch
        if proto in f.sources:
            f.banned.add(f.sources[proto][0])
        f.error = TransferFailed(f"{f.label}: a holder sent pieces that do not match the manifest")

    def _source_gone(self, f: _Fetch, proto: TransferProtocol) -> None:
        source = f.sources.pop(proto, None)
        f.source_peers.pop(proto, None)
        if source is not None and source[0] not in f.banned:
            f.all_sources.append(source)
            if proto.error is not None:
                f.error = TransferFailed(f"{f.label}: {proto.error}")
        if f.active and f.download is not None and not f.download.complete:
            self._dial_more(f)

    def _check_stalled(self, f: _Fetch) -> None:
        """No source, no dial in flight, nobody left to dial: end the fetch once its time is up."""
        if f.active and not f.sources and not f.dialing and f.dial_timer is None and f.expired:
            self._give_up(f)

    def _space_short_of(self, frame: Frame) -> int:
        """How many bytes the file system lacks for this download (0 when it fits)."""
        tmp = self.host.shares.tmp
        try:
            have = os.path.getsize(tmp / f"{frame.sha256}.part")
        except OSError:
            have = 0
        return max(0, frame.size - have - shutil.disk_usage(tmp).free)

    def _fetch_expired(self, f: _Fetch) -> None:
        f.timer = None
        f.expired = True
        self._check_stalled(f)

    def _give_up(self, f: _Fetch) -> None:
        if f.error is not None:
            error: BaseException = f.error
        elif f.hits:
            error = TransferFailed(f"{f.label}: {len(f.hits)} holder(s) answered but none delivered the file")
        else:
            error = NotFound(f"{f.label}: no peer answered within {f.timeout:g}s")
        self._finish(f, Failure(error))

    def _retire(self, download: Download) -> None:
        """A download leaves its fetch: the bytes it took off the wire join the peer's count."""
        self.host.counters.add("bytes_received", download.wire_bytes)

    def _finish(self, f: _Fetch, result: Any, outcome: str = "") -> None:
        if self.fetches.get(f.key) is f:
            del self.fetches[f.key]
        if f.active:
            outcome = outcome or ("completed" if not isinstance(result, Failure) else
                                  "cancelled" if not f.waiters else "failed")  # the last waiter withdrew
            seconds = self.host.reactor.seconds() - f.started
            self.host.metrics.fetch.observe(outcome, seconds)
            d = f.download
            self.history.append({
                "id": f.id, "name": f.name or (d.name if d else ""), "sha256": f.sha256 or (d.sha256 if d else ""),
                "outcome": outcome, "size": d.size if d else None, "seconds": round(seconds, 3),
                "sources": len(f.all_sources) + len(f.sources), "ended": round(time.time(), 3),
                "error": "" if outcome == "completed" else describe(result.value)})
            if d is not None:
                self._retire(d)
        f.active = False
        for proto in list(f.sources) + list(f.dialing):
            if proto.transport is not None:
                proto.transport.loseConnection()
        for rid in f.ids:
            self.by_id.pop(rid, None)
            self.host.finish_query(rid)
        for rid in f.swarm_ids:
            self.host.finish_query(rid)
        for call in (f.timer, f.dial_timer, f.requery):
            if call is not None and call.active():
                call.cancel()
        f.timer = f.dial_timer = f.requery = None
        if f.download is not None and not f.download.done.called:
            f.download.fail(TransferFailed(f"{f.label}: cancelled"), keep=True)
        waiters, f.waiters = f.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
