"""The transfer protocol: one TCP connection carries one file, driven by the requester.

Whoever dialled, the first frame says who is who: a holder that dialled sends
``offer``; a requester that dialled sends ``open`` and the holder answers with
``offer``.  From there the requester asks for byte ranges (``get``) and the
holder answers each with a ``data`` line followed by exactly that many raw
bytes, read from disk by a push producer so that a slow reader stops the disk
reads instead of filling memory.  The requester writes into a temporary file
in the state folder and hashes as it goes; the file is renamed into place only
when size and SHA-256 match the offer.

A peer that is still downloading a file serves the pieces it has verified
(swarming): its offer carries a ``have`` bitmap, it announces each piece it
verifies later with a ``have`` frame, and it refuses a ``get`` for a piece it
does not have.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from typing import IO, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from p2pshare.download import Download
from p2pshare.errors import MalformedMessage, NotFound, TransferFailed
from p2pshare.shares import MAX_PIECES, Entry
from p2pshare.wire import MAX_FRAME, Frame, have_bits, pack_have

WINDOW = 2  # ranges asked for ahead of the one being received
ENDGAME_ZONE = 2  # pieces missing below which a complete holder may be asked for any piece
CHUNK = 512 * 1024  # bytes the producer reads from disk at a time
IDLE_TIMEOUT = 30.0
PROGRESS = 64 * 1024  # bytes of file data that count as progress for the idle timer
MAX_CONNECTIONS = 256  # incoming transfer connections at once
MAX_PER_ADDRESS = 32  # of those, from one address


class ITransferNode(Interface):
    """What a transfer connection needs from the peer it belongs to."""

    peer_id: str  # type: ignore[misc]

    def open_for_sending(frame: Frame) -> tuple[Entry, IO[bytes], Optional[Download]]:
        """Open the file an ``open`` frame asks for; raise NotFound if it is not shared.

        The third item is the download when the file is still arriving: only its
        verified pieces may be sent.
        """

    def accept_offer(frame: Frame, proto: "TransferProtocol") -> Optional["Download"]:
        """The download an ``offer`` frame is for, or None to decline it."""

    def track(proto: "TransferProtocol", alive: bool) -> None:
        """Note a connection opening or closing, so that stopping the peer can close it."""

    def sent(nbytes: int) -> None:
        """A range of *nbytes* of file data went out."""

    def suspect(entry: Entry) -> None:
        """A requester says a piece of *entry* we sent does not match its manifest."""


@implementer(IPushProducer)
class RangeProducer:
    """Streams ``length`` bytes of a file from ``offset`` into a consumer, pausing with it."""

    def __init__(self, file: IO[bytes], offset: int, length: int, consumer: IConsumer,
                 on_chunk: Callable[[], None] = lambda: None) -> None:
        self.file, self.offset, self.remaining, self.consumer = file, offset, length, consumer
        self.on_chunk = on_chunk
        self.finished: Deferred[None] = Deferred()
        self._paused = False

    def start(self) -> Deferred[None]:
        d = self.finished  # taken first: a range that ends at once replaces it while producing
        self.consumer.registerProducer(self, True)
        self.resumeProducing()
        return d

    def resumeProducing(self) -> None:
        self._paused = False
        fd = self.file.fileno()
        while not self._paused and self.remaining > 0:
            data = os.pread(fd, min(CHUNK, self.remaining), self.offset)
            if not data:
                self._end(TransferFailed("the file shrank while it was being sent"))
                return
            self.offset += len(data)
            self.remaining -= len(data)
            self.on_chunk()
            self.consumer.write(data)
        if self.remaining == 0 and not self.finished.called:
            self._end(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._paused = True
        if not self.finished.called:
            self.remaining = 0
            d, self.finished = self.finished, Deferred()
            d.errback(TransferFailed("the connection closed during the transfer"))

    def _end(self, error: Optional[Exception]) -> None:
        self.consumer.unregisterProducer()
        d, self.finished = self.finished, Deferred()
        self.finished.callback(None)  # later stopProducing calls find it fired
        if error is None:
            d.callback(None)
        else:
            d.errback(error)


class TransferProtocol(LineReceiver, TimeoutMixin):
    """One transfer connection, in either role, whichever side dialled."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_FRAME
    log = Logger()

    def __init__(self, node: ITransferNode, greeting: Optional[Frame] = None,
                 sending: Optional[tuple[Entry, IO[bytes]]] = None, idle: float = IDLE_TIMEOUT,
                 clock: Optional[IReactorTime] = None) -> None:
        self.node, self.greeting, self.idle = node, greeting, idle
        if clock is not None:
            self.callLater = clock.callLater  # the idle timer runs on the injected clock
        self._unreset = 0  # raw bytes received since the idle timer was last reset
        self.download: Optional[Download] = None
        self._sending = sending  # (entry, open file) once we are the holder
        self._partial: Optional[Download] = None  # the download whose verified pieces we serve
        self.remote_have: Optional[bytearray] = None  # a partial holder's pieces (None: it has them all)
        self.remote_peer = ""  # the holder's peer id, from its offer
        self._gets: deque[Frame] = deque()
        self._producer: Optional[RangeProducer] = None
        self._sending_length = 0
        self._dropped = False  # a source that sent a bad piece: ignore the rest of what it sends
        self._haves: list[int] = []  # pieces verified while a range was being sent: announced after it
        self._raw_left = 0
        self._outstanding: deque[tuple[int, int]] = deque()
        self._awaiting_pieces = False
        self._manifest: Optional[list[bytes]] = None  # the manifest's bytes while they arrive
        self._chunks: list[bytes] = []  # the piece being received
        self.on_bad_piece: Callable[["TransferProtocol"], None] = lambda proto: None
        self.error: Optional[Exception] = None  # what the holder said when it refused
        self.closed: Deferred[None] = Deferred()  # fires when the connection is gone
        self.on_close: Callable[[], None] = lambda: None
        self.answered = False  # the other side sent a valid frame (it speaks this protocol)

    # -- plumbing ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = 1024 * 1024  # fewer, larger reads
        self.setTimeout(self.idle)
        self.node.track(self, True)
        if self.greeting is not None:
            self.send(self.greeting)

    def send(self, frame: Frame) -> None:
        self.sendLine(frame.encode())

    def refuse(self, code: str, message: str) -> None:
        self.log.info("closing transfer connection with {peer}: {message}", peer=self.transport.getPeer(),
                      message=message)
        self.send(Frame("error", code=code, message=message[:512]))
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse("too_long", f"a control line may hold at most {MAX_FRAME} bytes")

    def timeoutConnection(self) -> None:
        self.log.info("transfer connection with {peer} idle for {idle}s", peer=self.transport.getPeer(),
                      idle=self.idle)
        self.transport.abortConnection()

    def lineReceived(self, line: bytes) -> None:
        # Only whole frames and real progress (PROGRESS bytes of file data) reset the idle
        # timer, so a peer trickling a byte at a time cannot hold the connection open.
        self.resetTimeout()
        if self._dropped:
            return
        try:
            frame = Frame.decode(line)
        except MalformedMessage as e:
            self.refuse("malformed", str(e))
            return
        self.answered = True
        handler = getattr(self, f"_on_{frame.t}")
        handler(frame)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self.node.track(self, False)
        if self._sending is not None:
            self._sending[1].close()
            self._sending = None
        if self._partial is not None:
            self._partial.watchers.discard(self)
            self._partial = None
        if self.download is not None:
            self.download.detach(self)  # what this source had claimed goes back to the pool
        self.on_close()
        d, self.closed = self.closed, Deferred()
        d.callback(None)

    # -- holder's side ------------------------------------------------------------------

    def _on_open(self, frame: Frame) -> None:
        if self._sending is not None or self.download is not None:
            return self.refuse("unexpected", "'open' after the transfer started")
        try:
            entry, f, partial = self.node.open_for_sending(frame)
        except NotFound as e:
            return self.refuse("not_found", str(e))
        except OSError as e:
            return self.refuse("unavailable", f"{frame.name}: {e.strerror}")
        self._sending = (entry, f)
        have = ""
        if partial is not None and not partial.complete:
            self._partial = partial
            partial.watchers.add(self)
            have = pack_have(partial.have)
        self.send(offer_for(entry, frame.id, self.node.peer_id, have))

    def piece_verified(self, index: int) -> None:
        """The download we serve from has verified one more piece: tell the requester (between
        ranges: never inside the raw bytes of one)."""
        self._haves.append(index)
        if self._producer is None:
            self._send_haves()

    def _send_haves(self) -> None:
        haves, self._haves = self._haves, []
        if haves and self.connected and not self.transport.disconnecting:
            self.resetTimeout()  # announcing pieces is progress too
            for index in haves:
                self.send(Frame("have", piece=index))

    def _on_get(self, frame: Frame) -> None:
        if self._sending is None:
            return self.refuse("unexpected", "'get' before an offer")
        if frame.length == 0 or frame.offset + frame.length > self._sending[0].size:
            return self.refuse("bad_range", f"range {frame.offset}+{frame.length} is outside the file")
        if self._partial is not None and not self._partial.complete:
            piece = self._partial.piece_size
            if not all(self._partial.have[i] for i in range(frame.offset // piece,
                                                             -(-(frame.offset + frame.length) // piece))):
                return self.refuse("not_have", f"range {frame.offset}+{frame.length} is not all here yet")
        if len(self._gets) >= WINDOW * 2:
            return self.refuse("too_many", "too many ranges asked for ahead")
        self._gets.append(frame)
        if self._producer is None:
            self._send_next_range()

    def _send_next_range(self) -> None:
        if not self._gets or self._sending is None:
            return
        frame = self._gets.popleft()
        self._sending_length = frame.length
        self.send(Frame("data", offset=frame.offset, length=frame.length))
        self._producer = RangeProducer(self._sending[1], frame.offset, frame.length, self.transport,
                                       on_chunk=self.resetTimeout)
        self._producer.start().addCallbacks(self._range_sent, self._range_failed)

    def _range_sent(self, _: None) -> None:
        self._producer = None
        self.node.sent(self._sending_length)
        self._send_haves()
        self._send_next_range()

    def _range_failed(self, f: Failure) -> None:
        self._producer = None
        if self.transport.connected:
            self.refuse("unavailable", str(f.value))

    def _on_manifest(self, frame: Frame) -> None:
        if self._sending is None:
            return self.refuse("unexpected", "'manifest' before an offer")
        if self._producer is not None or self._gets:
            return self.refuse("unexpected", "'manifest' while ranges are being sent")
        pieces = self._sending[0].pieces
        if not pieces:
            return self.refuse("no_manifest", "this file has no manifest")
        self.resetTimeout()
        self.send(Frame("pieces", length=len(pieces)))
        self.transport.write(pieces)  # at most 64 KiB

    def _on_decline(self, frame: Frame) -> None:
        self.transport.loseConnection()

    def _on_bye(self, frame: Frame) -> None:
        self.transport.loseConnection()

    # -- requester's side: a source for a Download ---------------------------------------

    def _on_offer(self, frame: Frame) -> None:
        if self._sending is not None or self.download is not None:
            return self.refuse("unexpected", "'offer' after the transfer started")
        download = self.node.accept_offer(frame, self)
        if download is None:
            self.send(Frame("decline"))
            self.transport.loseConnection()
            return
        if frame.have:  # a partial holder
            self.remote_have = have_bits(frame.have, download.count) if download.root else None
            if self.remote_have is None:
                return self.refuse("bad_have", "the offer's piece bitmap does not fit the file")
        self.download = download
        self.remote_peer = frame.peer
        download.attach(self)
        if download.complete:  # empty, or every piece verified in an earlier attempt
            download.start()
            return self.download_finished()
        if download.needs_manifest:
            self._awaiting_pieces = True
            self.send(Frame("manifest"))
            return
        self._ask()

    def _on_pieces(self, frame: Frame) -> None:
        if self.download is None or not self._awaiting_pieces:
            return self.refuse("unexpected", "'pieces' that were not asked for")
        if frame.length > 32 * MAX_PIECES:
            return self.refuse("bad_manifest", f"a manifest of {frame.length} bytes is too long")
        self._awaiting_pieces = False
        self._raw_left, self._manifest = frame.length, []
        self.setRawMode()

    def _manifest_received(self, rest: bytes) -> None:
        assert self.download is not None and self._manifest is not None
        pieces, self._manifest = b"".join(self._manifest), None
        if self.download.pieces is None and not self.download.set_manifest(pieces):
            self.refuse("bad_manifest", "the manifest does not match the offer's root")
            return
        if self.download.pieces != pieces:
            self.refuse("bad_manifest", "the manifest differs from another holder's")
            return
        self._ask()
        self.setLineMode(rest)

    def _ask(self) -> None:
        assert self.download is not None
        download = self.download
        if self._dropped:
            return
        has: Callable[[int], bool] = lambda i: True
        rank: Callable[[int], int] = lambda i: 0
        others = [s for s in download.sources if getattr(s, "remote_have", None) is not None]
        partial = [s.remote_have for s in others]
        if self.remote_have is not None:  # a partial holder: the pieces fewest of our sources have first
            has = self.remote_have.__getitem__
            rank = lambda i: sum(h[i] for h in partial)  # noqa: E731
        elif others:  # a complete holder: what no partial source of ours has

            def rare(i: int) -> bool:
                return not any(h[i] for h in partial)

            # Peers fetching together split the rare pieces by stripes (piece index modulo
            # their number, in order of peer id), so the holder sends each about once.
            ids = sorted({self.node.peer_id} | {s.remote_peer for s in others})
            stripes, mine = len(ids), ids.index(self.node.peer_id)
            rank = lambda i: 0 if i % stripes == mine else 1  # noqa: E731
            if download.missing > ENDGAME_ZONE:
                # Only rare ones, until the end: the holder's upload is the swarm's
                # scarcest, and what a partial source has, the others can trade.
                has = rare
        # A complete holder shared with partial sources: one piece at a time, so that fewer of its
        # pieces are in flight, unknown to the other peers, which might ask for the same ones.
        window = 1 if self.remote_have is None and others else WINDOW
        while len(self._outstanding) < window and self.connected:
            rng = download.claim(self, has, rank)
            if rng is None:
                return
            self._outstanding.append(rng)
            self.send(Frame("get", offset=rng[0], length=rng[1]))

    def _on_have(self, frame: Frame) -> None:
        if self.download is None or self.remote_have is None:
            return self.refuse("unexpected", "'have' from a holder that has the whole file")
        if frame.piece >= len(self.remote_have):
            return self.refuse("bad_have", f"piece {frame.piece} is outside the file")
        self.remote_have[frame.piece] = 1
        if self._manifest is None and not self._awaiting_pieces:
            self._ask()

    def _on_data(self, frame: Frame) -> None:
        if self.download is None or not self._outstanding:
            return self.refuse("unexpected", "'data' that was not asked for")
        if (frame.offset, frame.length) != self._outstanding[0]:
            return self.refuse("bad_range", f"data {frame.offset}+{frame.length} is not the range asked for")
        self._raw_left = frame.length
        self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        assert self.download is not None
        if self._dropped:
            return
        self._unreset += len(data)
        if self._unreset >= PROGRESS:
            self._unreset = 0
            self.resetTimeout()
        take = data[: self._raw_left] if len(data) > self._raw_left else data
        self._raw_left -= len(take)
        if self._manifest is not None:
            self._manifest.append(take)
            if not self._raw_left:
                self._manifest_received(data[len(take):])
            return
        self._take_piece_data(take)
        if self._raw_left:
            return
        self._outstanding.popleft()
        if self.transport.disconnecting:
            return
        self._ask()
        self.setLineMode(data[len(take):])

    def _take_piece_data(self, data: bytes) -> None:
        """Collect a range's bytes and hand each piece over as soon as it is whole."""
        assert self.download is not None
        piece, size = self.download.piece_size, self.download.size
        start, length = self._outstanding[0]
        position = start + length - self._raw_left - len(data)  # of data's first byte in the file
        while data:
            room = min(piece - position % piece, size - position)
            take, data = data[:room], data[room:]
            self._chunks.append(take)
            position += len(take)
            if position % piece == 0 or position == size:
                chunks, self._chunks = self._chunks, []
                self.download.deliver(self, (position - 1) // piece * piece, chunks)

    def more(self) -> None:
        """The download's pieces changed hands: ask for more if this connection has room."""
        if (self.download is not None and self._manifest is None and not self._awaiting_pieces
                and self.connected and not self.transport.disconnecting):
            self._ask()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def download_finished(self) -> None:
        """The download has every piece (from us or others): goodbye."""
        if self.connected and not self.transport.disconnecting:
            self.send(Frame("bye"))
            self.transport.loseConnection()

    def bad_piece(self, index: int) -> None:
        """A piece from this holder did not match the manifest: it is not asked again, and it is
        told (its file may have changed on disk behind an unchanged size and mtime)."""
        self.log.warn("piece {index} of {name} from {peer} is corrupt; dropping that holder", index=index,
                      name=self.download.name if self.download else "?", peer=self.transport.getPeer())
        self.on_bad_piece(self)
        self._dropped = True  # nothing more is read from it
        if self.download is not None:
            self.download.detach(self)
        self.transport.pauseProducing()
        self.send(Frame("error", code="bad_piece", message=f"piece {index} does not match the manifest"))
        self.transport.loseConnection()

    def _on_error(self, frame: Frame) -> None:
        if self._sending is not None and frame.code == "bad_piece":
            self.node.suspect(self._sending[0])
        self.error = TransferFailed(f"the holder said {frame.code}: {frame.message}")
        self.transport.loseConnection()


def offer_for(entry: Entry, request_id: str, peer_id: str, have: str = "") -> Frame:
    """The offer of a shared file, with its manifest's root when it has one, and (from a peer
    still downloading it) the bitmap of the pieces it has."""
    return Frame("offer", id=request_id, name=entry.name, size=entry.size, sha256=entry.sha256, peer=peer_id,
                 piece=entry.piece_size if entry.pieces else 0, root=entry.root, have=have)


class TransferFactory(Factory):
    """Accepts connections from holders offering files and requesters opening them."""

    noisy = False
    log = Logger()

    def __init__(self, node: ITransferNode, idle: float = IDLE_TIMEOUT, clock: Optional[IReactorTime] = None,
                 max_connections: int = MAX_CONNECTIONS, max_per_address: int = MAX_PER_ADDRESS) -> None:
        self.node, self.idle, self.clock = node, idle, clock
        self.max_connections, self.max_per_address = max_connections, max_per_address
        self.per_address: Counter[str] = Counter()
        self.refused = 0

    def buildProtocol(self, addr: object) -> Optional[TransferProtocol]:
        host = str(getattr(addr, "host", ""))
        if sum(self.per_address.values()) >= self.max_connections or self.per_address[host] >= self.max_per_address:
            self.refused += 1
            self.log.debug("refusing a transfer connection from {host}", host=host)
            return None  # Twisted closes it
        self.per_address[host] += 1
        p = TransferProtocol(self.node, idle=self.idle, clock=self.clock)
        p.factory = self
        p.on_close = lambda: self._closed(host)
        return p

    def _closed(self, host: str) -> None:
        self.per_address[host] -= 1
        if self.per_address[host] <= 0:
            del self.per_address[host]


class _OneShot(Factory):
    noisy = False

    def __init__(self, proto: TransferProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> TransferProtocol:
        return self.proto


def dial(endpoint: IStreamClientEndpoint, proto: TransferProtocol) -> Deferred[TransferProtocol]:
    """Connect *proto* through *endpoint* (``connectProtocol`` without its log lines)."""
    return endpoint.connect(_OneShot(proto))
