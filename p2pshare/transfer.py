"""The transfer protocol: one TCP connection carries one file, driven by the requester.

Whoever dialled, the first frame says who is who: a holder that dialled sends
``offer``; a requester that dialled sends ``open`` and the holder answers with
``offer``.  From there the requester asks for byte ranges (``get``) and the
holder answers each with a ``data`` line followed by exactly that many raw
bytes.  ``TransferProtocol`` only frames the connection (control lines, raw
bytes handed on as slices of what was received, never copied) and hands each
frame to the side this connection plays:

* ``Holder`` serves ranges of a file.  On plain TCP the bytes go from the page
  cache to the socket with ``sendfile`` (``SendfileProducer``: no copy through
  Python at all); under TLS a push producer reads them into memory first.
  Either way a slow reader stops the disk reads instead of filling memory.
* ``Requester`` feeds a ``Download``: it asks for the ranges the download's
  piece policy hands it, keeping up to a window of bytes in flight, and passes
  the bytes on as they arrive.

A peer that is still downloading a file serves the pieces it has verified
(swarming): its offer carries a ``have`` bitmap, it announces each piece it
verifies later with a ``have`` frame, and it refuses a ``get`` for a piece it
does not have.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import Counter, deque
from typing import IO, Any, Callable, Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from p2pshare.bandwidth import Limiter
from p2pshare.download import Download
from p2pshare.errors import MalformedMessage, NotFound, TransferFailed
from p2pshare.pieces import choice_for, window_bytes
from p2pshare.shares import BLAKE3_ROOT, MAX_PIECES, Entry, piece_size_for, root_kind
from p2pshare.wire import MAX_FRAME, Frame, have_bits, pack_have

MAX_GETS = 64  # ranges a holder accepts waiting behind the one being sent (the offer's "window")
LEGACY_GETS = 5  # what a holder whose offer names no window accepts
MAX_GET = 8 * 1024 * 1024  # the longest range the requester asks for in one get
CHUNK = 1024 * 1024  # bytes read from disk at a time where sendfile cannot be used
SMALL_RANGE = 64 * 1024  # ranges up to this size are read and written with their data line, in one write
SENDFILE_SLICE = 16 * 1024 * 1024  # bytes sent before the reactor gets a turn
IDLE_TIMEOUT = 30.0
PROGRESS = 64 * 1024  # bytes of file data that count as progress for the idle timer
MAX_CONNECTIONS = 256  # incoming transfer connections at once
MAX_PER_ADDRESS = 32  # of those, from one address
RECEIVE_BUFFER = 1024 * 1024  # bytes read from the socket at once


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


def socket_transport(transport: Any) -> Optional[tcp.Connection]:
    """The TCP connection under *transport* (itself, or under a TLS wrapper), or None."""
    for _ in range(4):
        if isinstance(transport, tcp.Connection):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def read_range(file: IO[bytes], offset: int, length: int) -> bytes:
    """*length* bytes of *file* at *offset*; TransferFailed if reading fails or the file is shorter."""
    try:
        data = os.pread(file.fileno(), length, offset)
    except OSError as e:
        raise TransferFailed(f"reading the file failed: {e.strerror}") from e
    if len(data) < length:
        raise TransferFailed("the file shrank while it was being sent")
    return data


def pieces_of(offset: int, length: int, piece: int) -> range:
    """The indexes of the pieces a range touches."""
    return range(offset // piece, -(-(offset + length) // piece))


@implementer(IPushProducer)
class RangeProducer:
    """Streams ``length`` bytes of a file from ``offset`` into a consumer, pausing with it (reads into
    memory: for consumers that are not a plain socket, such as TLS)."""

    def __init__(self, file: IO[bytes], offset: int, length: int, consumer: IConsumer,
                 on_chunk: Callable[[], None] = lambda: None, limiter: Optional[Limiter] = None) -> None:
        self.file, self.offset, self.remaining, self.consumer = file, offset, length, consumer
        self.on_chunk = on_chunk
        self.limiter = limiter if limiter is not None and limiter.limited else None  # the peer's upload limit
        self.finished: Deferred[None] = Deferred()
        self._paused = False

    def start(self) -> Deferred[None]:
        d = self.finished  # taken first: a range that ends at once replaces it while producing
        self.consumer.registerProducer(self, True)
        self.resumeProducing()
        return d

    def resumeProducing(self) -> None:
        self._paused = False
        limiter = self.limiter
        chunk = CHUNK if limiter is None else limiter.slice(CHUNK)
        while not self._paused and self.remaining > 0:
            if limiter is not None and limiter.blocked():
                self._paused = True
                limiter.wait(self, self.resumeProducing)
                return
            try:
                data = read_range(self.file, self.offset, min(chunk, self.remaining))
            except TransferFailed as e:
                self._end(e)
                return
            self.offset += len(data)
            self.remaining -= len(data)
            self.on_chunk()
            if limiter is not None:
                limiter.charge(len(data), self)
            self.consumer.write(data)
        if self.remaining == 0 and not self.finished.called:
            self._end(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._paused = True
        if self.limiter is not None:
            self.limiter.forget(self)
        if not self.finished.called:
            self.remaining = 0
            d, self.finished = self.finished, Deferred()
            d.errback(TransferFailed("the connection closed during the transfer"))

    def cancel(self) -> None:
        """Stop sending this range now (the connection is closing): the consumer lets go of us."""
        self._paused = True
        if not self.finished.called:
            self.remaining = 0
            self._end(TransferFailed("the range was cancelled"))

    def _end(self, error: Optional[Exception]) -> None:
        if self.limiter is not None:
            self.limiter.forget(self)
        self.consumer.unregisterProducer()
        d, self.finished = self.finished, Deferred()
        self.finished.callback(None)  # later stopProducing calls find it fired
        if error is None:
            d.callback(None)
        else:
            d.errback(error)


class SendfileProducer(RangeProducer):
    """The same, from the file to a plain TCP socket with ``os.sendfile``: the bytes never enter Python.

    Twisted has no public sendfile, so this drives the transport's own producer
    machinery: registered as a streaming producer and marked paused, it is
    resumed by the transport once everything written before it (the ``data``
    line) has left; then it sends until the socket is full, marks itself paused
    again and asks the transport to watch for writability, which resumes it.
    """

    consumer: tcp.Connection

    def start(self) -> Deferred[None]:
        d = self.finished
        self.consumer.registerProducer(self, True)
        self._wait()
        return d

    def _wait(self) -> None:
        self.consumer.producerPaused = True
        self.consumer.startWriting()

    def resumeProducing(self) -> None:
        self._paused = False
        sock, fd = self.consumer.fileno(), self.file.fileno()
        limiter = self.limiter
        budget = SENDFILE_SLICE if limiter is None else limiter.slice(SENDFILE_SLICE)
        while self.remaining > 0 and not self._paused:
            if budget <= 0:
                return self._wait()  # others get a turn; the socket is still writable
            if limiter is not None and limiter.blocked():
                # Over the peer's upload limit: neither send nor watch the socket until the bucket
                # refills; then wait for writability as after any pause.
                self._paused = self.consumer.producerPaused = True
                return limiter.wait(self, self._wait)
            try:
                n = os.sendfile(sock, fd, self.offset, min(self.remaining, budget))
            except BlockingIOError:
                return self._wait()
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    return self.stopProducing()
                return self._end(TransferFailed(f"reading the file failed: {e.strerror}"))
            if n == 0:
                return self._end(TransferFailed("the file shrank while it was being sent"))
            self.offset += n
            self.remaining -= n
            budget -= n
            if limiter is not None:
                limiter.charge(n, self)
            self.on_chunk()
        if self.remaining == 0 and not self.finished.called:
            self._end(None)


SEED_BATCH = 4  # pieces a super-seeding holder offers a later requester at a time
END_DELAY = 1.0  # seconds a super-seeding holder leaves the last pieces to the requesters' trading


class SuperSeed:
    """A complete holder serving one file to several requesters at once (super-seeding, as BitTorrent
    clients call it): the first connection is offered the whole file; each later one is offered, as
    a partial holder's bitmap, a few pieces no connection has been sent or offered yet, and more
    with ``have`` frames once those have gone out.  Each piece then leaves the holder about once, and
    the requesters trade the rest.  Once every piece has gone out, the striped connections are
    offered nothing more for ``END_DELAY`` seconds, while the requesters trade the last pieces among
    themselves, then everything (for a requester whose only other source of a piece went away)."""

    def __init__(self, count: int, clock: Optional[IReactorTime] = None) -> None:
        self.count = count
        self.clock = clock
        self.sent = bytearray(count)  # pieces sent whole on some connection
        self.plain: list["Holder"] = []  # connections offered the whole file
        self.striped: list["Holder"] = []  # connections offered stripes
        self.opened = False  # the end: every striped connection is offered everything
        self._end: Optional[IDelayedCall] = None

    def join(self, holder: "Holder") -> Optional[bytearray]:
        """What *holder*'s offer advertises: None (the whole file) or a bitmap."""
        if not self.plain and not self.striped:
            self.plain.append(holder)
            return None
        self.striped.append(holder)
        return self._stripe(holder, bytearray(self.count))

    def leave(self, holder: "Holder") -> bool:
        """*holder*'s connection is gone; True when no connection is left."""
        for group in (self.plain, self.striped):
            if holder in group:
                group.remove(holder)
        self.refill()
        done = not self.plain and not self.striped
        if done and self._end is not None and self._end.active():
            self._end.cancel()
        return done

    def _stripe(self, holder: "Holder", advertised: bytearray) -> bytearray:
        """*advertised* plus the next SEED_BATCH unsent pieces no other connection was offered; nothing
        more while every unsent piece is offered elsewhere (a piece offered twice would be sent twice);
        everything at the end."""
        if self.opened:
            return bytearray([1]) * self.count
        unsent = [i for i in range(self.count) if not self.sent[i] and not advertised[i]]
        elsewhere = bytearray(self.count)
        for other in self.striped:
            if other is not holder and other.advertised is not None:
                elsewhere = bytearray(a | b for a, b in zip(elsewhere, other.advertised))
        bits = bytearray(advertised)
        for i in [i for i in unsent if not elsewhere[i]][:SEED_BATCH]:
            bits[i] = 1
        return bits

    def _ending(self) -> None:
        """Every piece has been sent: offer everything after END_DELAY (at once without a clock)."""
        if self._end is not None or self.opened:
            return
        if self.clock is None:
            self._open()
        else:
            self._end = self.clock.callLater(END_DELAY, self._open)

    def _open(self) -> None:
        self.opened = True
        self.refill()

    def sent_range(self, offset: int, length: int, piece: int, size: int) -> None:
        """A range went out whole: the pieces it covers entirely are sent."""
        end, i = offset + length, -(-offset // piece)
        while i < self.count and min((i + 1) * piece, size) <= end:
            self.sent[i] = 1
            i += 1
        if all(self.sent):
            self._ending()
        self.refill()

    def refill(self) -> None:
        """Give more pieces to each striped connection whose advertised pieces have all gone out
        (to every one, at the end)."""
        for holder in list(self.striped):
            advertised = holder.advertised
            if advertised is None or all(advertised):
                continue
            if not self.opened and any(a and not s for a, s in zip(advertised, self.sent)):
                continue
            more = self._stripe(holder, advertised)
            for i in range(self.count):
                if more[i] and not advertised[i]:
                    advertised[i] = 1
                    holder.piece_verified(i)


class Holder:
    """The holder's side of a connection: the file, the ranges asked for, the one being sent."""

    def __init__(self, conn: "TransferProtocol", entry: Entry, file: IO[bytes],
                 partial: Optional[Download] = None) -> None:
        self.conn, self.entry, self.file = conn, entry, file
        self.partial: Optional[Download] = None  # the download whose verified pieces we serve
        self.gets: deque[Frame] = deque()
        self.producer: Optional[RangeProducer] = None
        self._sending_offset = self._sending_length = 0
        self._haves: list[int] = []  # pieces verified while a range was being sent: announced after it
        self.seed: Optional[SuperSeed] = None
        self.advertised: Optional[bytearray] = None  # a super-seeding holder's stripe (None: everything)
        if partial is not None and not partial.complete:
            self.partial = partial
            partial.watchers.add(self)

    def _join_seed(self) -> None:
        """Take part in the super-seeding of this content, when the node does it (at the offer: a
        connection that never opens never counts)."""
        seeds = getattr(self.conn.node, "seeds", None)  # a node that super-seeds keeps them by content
        count = len(self.entry.pieces or self.entry.pieces3) // 32
        if self.partial is None and self.seed is None and seeds is not None and count > 1 and self.entry.piece_size:
            self.seed = seeds.setdefault(self.entry.sha256, SuperSeed(count, self.conn.clock))
            self.advertised = self.seed.join(self)

    def offer(self, request_id: str) -> Frame:
        self._join_seed()
        have = pack_have(self.partial.have) if self.partial is not None else ""
        if self.advertised is not None:
            have = pack_have(self.advertised)
        return offer_for(self.entry, request_id, self.conn.node.peer_id, have)

    def close(self) -> None:
        self.file.close()
        if self.seed is not None:
            seeds = getattr(self.conn.node, "seeds", {})
            if self.seed.leave(self) and seeds.get(self.entry.sha256) is self.seed:
                del seeds[self.entry.sha256]
            self.seed = None
        if self.partial is not None:
            self.partial.watchers.discard(self)
            self.partial = None

    def piece_verified(self, index: int) -> None:
        """The download we serve from has verified one more piece: tell the requester (between
        ranges: never inside the raw bytes of one)."""
        self._haves.append(index)
        if self.producer is None:
            self._send_haves()

    def _send_haves(self) -> None:
        haves, self._haves = self._haves, []
        if haves and self.conn.open:
            self.conn.resetTimeout()  # announcing pieces is progress too
            for index in haves:
                self.conn.send(Frame("have", piece=index))

    def on_get(self, frame: Frame) -> None:
        conn = self.conn
        if frame.length == 0 or frame.offset + frame.length > self.entry.size:
            return conn.refuse("bad_range", f"range {frame.offset}+{frame.length} is outside the file")
        pieces = pieces_of(frame.offset, frame.length, self.entry.piece_size or 1)
        if self.partial is not None and not self.partial.complete and not all(self.partial.have[i] for i in pieces):
            return conn.refuse("not_have", f"range {frame.offset}+{frame.length} is not all here yet")
        if self.advertised is not None and not all(self.advertised[i] for i in pieces):
            return conn.refuse("not_have", f"range {frame.offset}+{frame.length} was not offered on this connection")
        if len(self.gets) >= MAX_GETS:
            return conn.refuse("too_many", f"at most {MAX_GETS} ranges may wait")
        self.gets.append(frame)
        if self.producer is None:
            self._send_next_range()

    def _send_next_range(self) -> None:
        # One range at a time: a range waiting for the upload limit may be started by a get that came
        # meanwhile, and its wait then ends while that range is still streaming (its data line and
        # bytes would land inside the other's).  The range streaming starts the next when it ends.
        if not self.gets or not self.conn.open or self.producer is not None:
            return
        limiter = self.conn.upload_limiter
        if limiter is not None and not limiter.limited:
            limiter = None  # (no clock reading per range without a limit)
        if limiter is not None and limiter.blocked():
            return limiter.wait(self, self._send_next_range)
        frame = self.gets.popleft()
        self._sending_offset, self._sending_length = frame.offset, frame.length
        transport = self.conn.transport
        header = Frame("data", offset=frame.offset, length=frame.length).encode() + b"\n"
        if frame.length <= SMALL_RANGE:  # one write, header and bytes: one segment, no producer
            try:
                data = read_range(self.file, frame.offset, frame.length)
            except TransferFailed as e:
                return self._range_failed(Failure(e))
            self.conn.resetTimeout()
            if limiter is not None:
                limiter.charge(len(data))
            transport.write(header + data)
            return self._range_sent(None)
        transport.write(header)
        kind = SendfileProducer if isinstance(transport, tcp.Connection) and hasattr(os, "sendfile") \
            else RangeProducer
        self.producer = kind(self.file, frame.offset, frame.length, transport, on_chunk=self.conn.resetTimeout,
                             limiter=limiter)
        self.producer.start().addCallbacks(self._range_sent, self._range_failed)

    def _range_sent(self, _: None) -> None:
        self.producer = None
        self.conn.node.sent(self._sending_length)
        if self.seed is not None:
            self.seed.sent_range(self._sending_offset, self._sending_length, self.entry.piece_size, self.entry.size)
        self._send_haves()
        self._send_next_range()

    def _range_failed(self, f: Failure) -> None:
        self.producer = None
        if self.conn.open:
            self.conn.refuse("unavailable", str(f.value))

    def on_manifest(self, frame: Frame) -> None:
        conn = self.conn
        if self.producer is not None or self.gets:
            return conn.refuse("unexpected", "'manifest' while ranges are being sent")
        kind = frame.hash or "sha256"
        pieces = self.entry.manifest(kind)
        if not pieces:
            return conn.refuse("no_manifest", f"this file has no {kind} manifest")
        conn.resetTimeout()
        conn.send(Frame("pieces", length=len(pieces)))
        conn.transport.write(pieces)  # at most 64 KiB

    def on_error(self, frame: Frame) -> None:
        if frame.code == "bad_piece":
            self.conn.node.suspect(self.entry)


class Requester:
    """The requester's side of a connection: one source of a ``Download``."""

    def __init__(self, conn: "TransferProtocol", download: Download, remote_have: Optional[bytearray],
                 remote_peer: str, holder_gets: int) -> None:
        self.conn, self.download = conn, download
        self.remote_have = remote_have  # a partial holder's pieces (None: it has them all)
        self.remote_peer = remote_peer  # the holder's peer id, from its offer
        self.holder_gets = holder_gets
        # The window starts at two gets and doubles with each one answered (slow start), up to
        # WINDOW_BYTES, or bandwidth x delay where that is more.  A download that is swarming keeps
        # only bandwidth x delay (at least two gets): what the first holder is asked for and has
        # not sent yet is what its peers cannot trade among themselves.
        self.start_window = self.window = 2 * min(download.piece_size, MAX_GET)
        self.outstanding: deque[tuple[int, int]] = deque()  # gets sent and not fully received
        self.claimed: deque[tuple[int, int]] = deque()  # claimed ranges not asked for yet
        self.in_flight = 0  # bytes asked for and not received yet
        # The window follows bandwidth x delay: the round trip is the wait for the first data line,
        # the bandwidth what this connection has delivered since.
        self.rtt = 0.0
        self._first_get_at: Optional[float] = None
        self._receiving_since: Optional[float] = None
        self._received = 0
        self.awaiting_manifest = False
        self.dropped = False  # a source that sent a bad piece: ignore the rest of what it sends

    def start(self) -> None:
        download = self.download
        download.attach(self)
        if download.complete:  # empty, or every piece verified in an earlier attempt
            download.start()
            return self.download_finished()
        if download.needs_manifest:
            self.awaiting_manifest = True
            kind = root_kind(download.root)
            self.conn.send(Frame("manifest", hash="" if kind == "sha256" else kind))
            return
        self.ask()

    def ask(self) -> None:
        """Ask for ranges until the window is full or the download has nothing for this source."""
        download, conn = self.download, self.conn
        if self.dropped or self.awaiting_manifest or conn.receiving_manifest or not conn.open:
            return
        partial = [(s.remote_have, s.remote_peer) for s in download.sources
                   if s is not self and getattr(s, "remote_have", None) is not None]
        choice = choice_for(conn.node.peer_id, self.remote_have, partial, download.missing)
        # One range at a time from a complete holder shared with partial ones: fewer of its pieces
        # in flight, unknown to the other peers, which might ask for the same ones.
        limit = 1 if choice.one_at_a_time else self.holder_gets
        while len(self.outstanding) < limit and (self.in_flight < self.window or not self.outstanding):
            if not self.claimed:
                rng = download.claim(self, choice.has, choice.rank)
                if rng is None:
                    return
                self.claimed.append(rng)
            offset, length = self.claimed.popleft()
            if length > MAX_GET:  # a large piece, or a run: asked for in parts
                self.claimed.appendleft((offset + MAX_GET, length - MAX_GET))
                length = MAX_GET
            if self._first_get_at is None:
                self._first_get_at = conn.clock.seconds()
            self.outstanding.append((offset, length))
            self.in_flight += length
            conn.send(Frame("get", offset=offset, length=length))

    def on_pieces(self, frame: Frame) -> None:
        if not self.awaiting_manifest:
            return self.conn.refuse("unexpected", "'pieces' that were not asked for")
        if frame.length > 32 * MAX_PIECES:
            return self.conn.refuse("bad_manifest", f"a manifest of {frame.length} bytes is too long")
        self.awaiting_manifest = False
        self.conn.receive_manifest(frame.length)

    def manifest_received(self, pieces: bytes) -> None:
        download = self.download
        if download.pieces is None and not download.set_manifest(pieces):
            return self.conn.refuse("bad_manifest", "the manifest does not match the offer's root")
        if download.pieces != pieces:
            return self.conn.refuse("bad_manifest", "the manifest differs from another holder's")
        self.ask()

    def on_have(self, frame: Frame) -> None:
        if self.remote_have is None:
            return self.conn.refuse("unexpected", "'have' from a holder that has the whole file")
        if frame.piece >= len(self.remote_have):
            return self.conn.refuse("bad_have", f"piece {frame.piece} is outside the file")
        self.remote_have[frame.piece] = 1
        self.ask()

    def on_data(self, frame: Frame) -> None:
        if not self.outstanding:
            return self.conn.refuse("unexpected", "'data' that was not asked for")
        if (frame.offset, frame.length) != self.outstanding[0]:
            return self.conn.refuse("bad_range", f"data {frame.offset}+{frame.length} is not the range asked for")
        if self._receiving_since is None and self._first_get_at is not None:
            self._receiving_since = self.conn.clock.seconds()
            self.rtt = self._receiving_since - self._first_get_at
        self.conn.receive_raw(frame.length)

    def data(self, chunk: memoryview, left: int) -> None:
        """Bytes of the oldest range asked for; *left* of it still to come."""
        if self.dropped:
            return
        offset, length = self.outstanding[0]
        self.in_flight -= len(chunk)
        self._received += len(chunk)
        self.download.receive(self, offset + length - left - len(chunk), chunk)
        if not left and self.outstanding:
            self.outstanding.popleft()
            self._adapt_window()
            self.ask()

    def _adapt_window(self) -> None:
        if self._receiving_since is None:
            return
        elapsed = self.conn.clock.seconds() - self._receiving_since
        rate = self._received / elapsed if elapsed > 0 else 0.0
        if self.download.swarming:
            self.window = window_bytes(rate, self.rtt, floor=self.start_window)
        else:
            self.window = min(2 * self.window, window_bytes(rate, self.rtt))

    # -- what the download calls --------------------------------------------------------

    def more(self) -> None:
        """The download's pieces changed hands: ask for more if this connection has room."""
        self.ask()

    def pauseProducing(self) -> None:
        self.conn.pause("disk")

    def resumeProducing(self) -> None:
        self.conn.resume("disk")

    def download_finished(self) -> None:
        """The download has every piece (from us or others): goodbye."""
        if self.conn.open:
            self.conn.send(Frame("bye"))
            self.conn.transport.loseConnection()

    def bad_piece(self, index: int) -> None:
        """A piece from this holder did not match the manifest: it is not asked again, and it is
        told (its file may have changed on disk behind an unchanged size and mtime)."""
        conn = self.conn
        conn.log.warn("piece {index} of {name} from {peer} is corrupt; dropping that holder", index=index,
                      name=self.download.name, peer=conn.transport.getPeer())
        conn.on_bad_piece(conn)
        self.dropped = True  # nothing more is read from it
        self.download.detach(self)
        conn.transport.pauseProducing()
        conn.refuse("bad_piece", f"piece {index} does not match the manifest")

    def close(self) -> None:
        self.download.detach(self)  # what this source had claimed goes back to the pool


class TransferProtocol(Protocol, TimeoutMixin):
    """One transfer connection: frames in and out, and the side (``Holder`` or ``Requester``) it plays."""

    log = Logger()

    def __init__(self, node: ITransferNode, greeting: Optional[Frame] = None,
                 sending: Optional[tuple[Entry, IO[bytes]]] = None, idle: float = IDLE_TIMEOUT,
                 clock: Optional[IReactorTime] = None) -> None:
        self.node, self.greeting, self.idle = node, greeting, idle
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.callLater = clock.callLater  # the idle timer runs on the injected clock
        self.holder: Optional[Holder] = Holder(self, *sending) if sending is not None else None
        self.requester: Optional[Requester] = None
        self.on_bad_piece: Callable[["TransferProtocol"], None] = lambda proto: None
        self.error: Optional[Exception] = None  # what the holder said when it refused
        self.closed: Deferred[None] = Deferred()  # fires when the connection is gone
        self.on_close: Callable[[], None] = lambda: None
        self.answered = False  # the other side sent a valid frame (it speaks this protocol)
        self._line = bytearray()  # a control line arriving in parts
        self._raw_left = 0  # raw bytes still to come after a data or pieces line
        self._manifest: Optional[list[bytes]] = None  # the manifest's bytes while they arrive
        self._unreset = 0  # raw bytes received since the idle timer was last reset
        self._stopped = False  # refused or dropped: read nothing more
        self._small_reads = False  # reads made smaller by a download limit
        self._pauses: set[str] = set()  # why reading is paused: "disk" (the download fell behind), "rate"
        limits = getattr(node, "limits", None)  # bandwidth.Limits of the peer, if it has limits
        self.upload_limiter: Optional[Limiter] = limits.upload if limits is not None else None
        self.download_limiter: Optional[Limiter] = limits.download if limits is not None else None

    # -- what other modules read ------------------------------------------------------------

    @property
    def download(self) -> Optional[Download]:
        return self.requester.download if self.requester is not None else None

    @property
    def remote_have(self) -> Optional[bytearray]:
        return self.requester.remote_have if self.requester is not None else None

    @property
    def remote_peer(self) -> str:
        return self.requester.remote_peer if self.requester is not None else ""

    @property
    def open(self) -> bool:
        return bool(self.connected) and not self.transport.disconnecting

    @property
    def receiving_manifest(self) -> bool:
        return self._manifest is not None

    # -- plumbing ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        sock = socket_transport(self.transport)
        if sock is not None:
            sock.bufferSize = RECEIVE_BUFFER  # fewer, larger reads (under TLS too)
            # Control lines are small and answered: none should wait for the ACK of the last segment.
            sock.setTcpNoDelay(True)
        self.setTimeout(self.idle)
        self.node.track(self, True)
        if self.greeting is not None:
            if self.greeting.t == "offer" and self.holder is not None:  # with what this connection may ask
                self.greeting = self.holder.offer(self.greeting.id)
            self.send(self.greeting)

    def send(self, frame: Frame) -> None:
        self.transport.write(frame.encode() + b"\n")

    def pause(self, reason: str) -> None:
        """Stop reading for *reason*; reading goes on once every reason is gone."""
        if not self._pauses:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self.connected:
                self.transport.resumeProducing()

    def _read_size(self, size: int) -> None:
        """Read at most *size* bytes at a time: under a download limit, about the bucket's depth, so that
        one read does not take seconds of the limit at once."""
        sock = socket_transport(self.transport)
        if sock is not None and sock.bufferSize != size:
            sock.bufferSize = size
        self._small_reads = size < RECEIVE_BUFFER

    def _downloaded(self, nbytes: int) -> None:
        """Charge the peer's download limit; over it, read nothing more until it refills."""
        limiter = self.download_limiter
        assert limiter is not None
        self._read_size(limiter.slice(RECEIVE_BUFFER))
        limiter.charge(nbytes, self)
        if limiter.blocked() and "rate" not in self._pauses:
            self.pause("rate")
            limiter.wait(self, lambda: self.resume("rate"))

    def refuse(self, code: str, message: str) -> None:
        self.log.info("closing transfer connection with {peer}: {message}", peer=self.transport.getPeer(),
                      message=message)
        self._stopped = True
        producer = self.holder.producer if self.holder is not None else None
        if producer is None:  # (inside a range the error line would be taken for its bytes: just close)
            self.send(Frame("error", code=code, message=message[:512]))
        self._close()

    def _close(self) -> None:
        """Close once what was written has gone out; a range being sent stops where it is."""
        self.transport.loseConnection()
        if self.holder is not None and self.holder.producer is not None:
            self.holder.producer.cancel()

    def timeoutConnection(self) -> None:
        self.log.info("transfer connection with {peer} idle for {idle}s", peer=self.transport.getPeer(),
                      idle=self.idle)
        self.transport.abortConnection()

    def receive_raw(self, length: int) -> None:
        """The next *length* bytes are file data for the requester."""
        self._raw_left = length

    def receive_manifest(self, length: int) -> None:
        self._raw_left, self._manifest = length, []
        if not length:
            self._manifest_done()

    def dataReceived(self, data: bytes) -> None:
        limiter = self.download_limiter
        if limiter is not None:
            if limiter.limited:
                self._downloaded(len(data))
            elif self._small_reads:
                self._read_size(RECEIVE_BUFFER)  # the limit was lifted: large reads again
        view, pos, end = memoryview(data), 0, len(data)
        while pos < end and not self._stopped:
            if self._raw_left:
                n = min(self._raw_left, end - pos)
                self._raw_left -= n
                self._raw(view[pos: pos + n])
                pos += n
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += view[pos:]
                if len(self._line) > MAX_FRAME:
                    self.refuse("too_long", f"a control line may hold at most {MAX_FRAME} bytes")
                return
            if self._line:
                self._line += view[pos:newline]
                line, self._line = bytes(self._line), bytearray()
            else:
                line = data[pos:newline]
            pos = newline + 1
            if len(line) > MAX_FRAME:
                return self.refuse("too_long", f"a control line may hold at most {MAX_FRAME} bytes")
            self._line_received(line)
            if not self.open:
                return

    def _raw(self, chunk: memoryview) -> None:
        # Only whole frames and real progress (PROGRESS bytes of file data) reset the idle
        # timer, so a peer trickling a byte at a time cannot hold the connection open.
        self._unreset += len(chunk)
        if self._unreset >= PROGRESS:
            self._unreset = 0
            self.resetTimeout()
        if self._manifest is not None:
            self._manifest.append(bytes(chunk))
            if not self._raw_left:
                self._manifest_done()
            return
        assert self.requester is not None
        self.requester.data(chunk, self._raw_left)

    def _manifest_done(self) -> None:
        assert self.requester is not None and self._manifest is not None
        pieces, self._manifest = b"".join(self._manifest), None
        self.requester.manifest_received(pieces)

    def _line_received(self, line: bytes) -> None:
        self.resetTimeout()
        try:
            frame = Frame.decode(line)
        except MalformedMessage as e:
            return self.refuse("malformed", str(e))
        self.answered = True
        getattr(self, f"_on_{frame.t}")(frame)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self.node.track(self, False)
        for limiter in (self.download_limiter, self.upload_limiter):
            if limiter is not None:
                limiter.forget(self)
                if self.holder is not None:
                    limiter.forget(self.holder)
        if self.holder is not None:
            self.holder.close()
        if self.requester is not None:
            self.requester.close()
        self.on_close()
        d, self.closed = self.closed, Deferred()
        d.callback(None)

    # -- frames ----------------------------------------------------------------------------

    def _holder_or_refuse(self, frame: Frame) -> Optional[Holder]:
        if self.holder is None:
            self.refuse("unexpected", f"{frame.t!r} before an offer")
        return self.holder

    def _requester_or_refuse(self, frame: Frame) -> Optional[Requester]:
        if self.requester is None:
            self.refuse("unexpected", f"{frame.t!r} that was not asked for")
        return self.requester

    def _on_open(self, frame: Frame) -> None:
        if self.holder is not None or self.requester is not None:
            return self.refuse("unexpected", "'open' after the transfer started")
        try:
            entry, f, partial = self.node.open_for_sending(frame)
        except NotFound as e:
            return self.refuse("not_found", str(e))
        except OSError as e:
            return self.refuse("unavailable", f"{frame.name}: {e.strerror}")
        self.holder = Holder(self, entry, f, partial)
        self.send(self.holder.offer(frame.id))

    def _on_get(self, frame: Frame) -> None:
        holder = self._holder_or_refuse(frame)
        if holder is not None:
            holder.on_get(frame)

    def _on_manifest(self, frame: Frame) -> None:
        holder = self._holder_or_refuse(frame)
        if holder is not None:
            holder.on_manifest(frame)

    def _on_decline(self, frame: Frame) -> None:
        self._close()

    def _on_bye(self, frame: Frame) -> None:
        self._close()

    def _on_offer(self, frame: Frame) -> None:
        if self.holder is not None or self.requester is not None:
            return self.refuse("unexpected", "'offer' after the transfer started")
        problem = offer_problem(frame)
        if problem is not None:
            return self.refuse("bad_offer", problem)
        download = self.node.accept_offer(frame, self)
        if download is None:
            self.send(Frame("decline"))
            self.transport.loseConnection()
            return
        remote_have = None
        if frame.have:  # a partial holder
            remote_have = have_bits(frame.have, download.count) if download.root else None
            if remote_have is None:
                download.detach(self)
                return self.refuse("bad_have", "the offer's piece bitmap does not fit the file")
        self.requester = Requester(self, download, remote_have, frame.peer, frame.window or LEGACY_GETS)
        self.requester.start()

    def _on_pieces(self, frame: Frame) -> None:
        requester = self._requester_or_refuse(frame)
        if requester is not None:
            requester.on_pieces(frame)

    def _on_have(self, frame: Frame) -> None:
        requester = self._requester_or_refuse(frame)
        if requester is not None:
            requester.on_have(frame)

    def _on_data(self, frame: Frame) -> None:
        requester = self._requester_or_refuse(frame)
        if requester is not None:
            requester.on_data(frame)

    def _on_error(self, frame: Frame) -> None:
        if self.holder is not None:
            self.holder.on_error(frame)
        self.error = TransferFailed(f"the holder said {frame.code}: {frame.message}")
        self._stopped = True
        self._close()


def manifest_root(frame: Frame) -> str:
    """The manifest a download from this offer checks its pieces against: the BLAKE3 one when the offer
    names it (``b3:HEX``; files of more than one piece only), else the SHA-256 one (``HEX``), else none."""
    if frame.root3 and frame.piece and frame.size > frame.piece:
        return BLAKE3_ROOT + frame.root3
    return frame.root


def offer_problem(frame: Frame) -> Optional[str]:
    """Why an offer cannot be taken as it is (its pieces are not the protocol's), or None."""
    if not frame.piece or not (frame.root or frame.root3):
        return None
    if frame.piece != piece_size_for(frame.size):
        return f"piece size {frame.piece} is not the one for {frame.size} bytes ({piece_size_for(frame.size)})"
    if -(-frame.size // frame.piece) > MAX_PIECES:
        return f"more than {MAX_PIECES} pieces"
    if frame.size <= frame.piece and frame.root and hashlib.sha256(bytes.fromhex(frame.sha256)).hexdigest() != frame.root:
        return "the root of a one-piece file must be the SHA-256 of its SHA-256"
    return None


def offer_for(entry: Entry, request_id: str, peer_id: str, have: str = "") -> Frame:
    """The offer of a shared file, with its manifest's root when it has one, and (from a peer
    still downloading it) the bitmap of the pieces it has."""
    return Frame("offer", id=request_id, name=entry.name, size=entry.size, sha256=entry.sha256, peer=peer_id,
                 piece=entry.piece_size if entry.pieces or entry.pieces3 else 0, root=entry.root, root3=entry.root3,
                 have=have, window=MAX_GETS)


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


__all__ = ["ITransferNode", "TransferProtocol", "TransferFactory", "Holder", "Requester", "RangeProducer",
           "SendfileProducer", "offer_for", "offer_problem", "dial", "MAX_GETS", "IDLE_TIMEOUT"]
