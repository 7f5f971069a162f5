"""Private networks: the network key, sealed datagrams and mutually authenticated TLS.

A network is private when every process is started with the same 32-byte key.
Two things are derived from it (HKDF-SHA256, one ``info`` string each, so the
uses never share key material):

- ``p2pshare datagram v1``: the ChaCha20-Poly1305 key that seals every search
  datagram (``DatagramSeal``);
- ``p2pshare ca v1``: the Ed25519 key of a *network CA* whose self-signed
  certificate is deterministic (fixed name, serial and validity; Ed25519
  signatures are deterministic), so every holder derives the same one without
  exchanging anything.  Each process signs an ephemeral leaf certificate with
  it at start; both ends of every TCP connection present their leaf and require
  the other's to chain to the CA, over TLS 1.3 only (``NetworkTLS``).

Everything above ``NetworkTLS`` is pure: time and randomness are arguments.
See docs/security.md, "Private networks", for the reasoning and the limits.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import os
import stat
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

from attrs import field, frozen
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pshare.errors import MalformedMessage, P2PError
from p2pshare.ratelimit import Counters, RateLimitedLog
from p2pshare.wire import MAX_DATAGRAM

KEY_HEADER = "p2pshare-net-key-v1"
KEY_BYTES = 32
MAX_KEY_FILE = 4096  # bytes read from a key file: it is one short line

SEAL_VERSION = b"\x01"
NONCE_BYTES = 12
_STAMP = struct.Struct(">Q")  # sender's clock, milliseconds since the epoch, inside the ciphertext
TAG_BYTES = 16
SEAL_OVERHEAD = len(SEAL_VERSION) + NONCE_BYTES + _STAMP.size + TAG_BYTES  # 37 bytes
WINDOW = 60.0  # seconds a datagram's timestamp may differ from the receiver's clock, either way
NONCES = 65536  # nonces remembered to refuse replays within the window
TLS_RECORD = 16 * 1024  # the largest TLS record's plaintext: what one SSL_read returns at most
TLS_BATCH = 1024 * 1024  # decrypted bytes handed to the application at once
TLS_DRAIN = TLS_BATCH + 64 * 1024  # ciphertext read out of the memory BIO at once (a batch and its records' overhead)
HANDSHAKE_TIMEOUT = 10.0  # seconds a dialled connection has to prove membership (as long as a TCP connect)

INFO_DATAGRAM = b"p2pshare datagram v1"
INFO_CA = b"p2pshare ca v1"
INFO_FINGERPRINT = b"p2pshare fingerprint v1"


class NetworkKeyError(P2PError):
    """The network key file is missing, malformed or readable by other users."""


class SealError(MalformedMessage):
    """A datagram is not sealed with this network's key."""

    counter = "outsider_datagrams"  # the peer's counter for datagrams refused this way


class Unauthentic(SealError):
    """The datagram was not sealed with this network's key (no key, another key, or altered)."""


class Stale(SealError):
    """The datagram's timestamp is outside the accepted window (an old copy, or a clock far off)."""

    counter = "dropped_stale"


class Replayed(SealError):
    """The datagram was accepted once already."""

    counter = "dropped_replayed"


# -- the key -------------------------------------------------------------------------------------


@frozen
class NetworkKey:
    """The secret shared by every member of a private network; its repr never shows it."""

    secret: bytes = field(repr=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_BYTES:
            raise NetworkKeyError(f"a network key is {KEY_BYTES} bytes")

    @classmethod
    def generate(cls, random: Callable[[int], bytes] = os.urandom) -> "NetworkKey":
        return cls(random(KEY_BYTES))

    def derive(self, info: bytes, length: int = 32) -> bytes:
        """Key material for one use, independent of every other *info*'s."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(self.secret)

    @property
    def fingerprint(self) -> str:
        """A short public name of the key for logs (says which network, reveals nothing of the key)."""
        return self.derive(INFO_FINGERPRINT, 6).hex()

    def encode(self) -> str:
        """The key file's contents: one line."""
        return f"{KEY_HEADER} {base64.b64encode(self.secret).decode()}\n"

    @classmethod
    def decode(cls, text: str) -> "NetworkKey":
        parts = text.split()
        if len(parts) != 2 or parts[0] != KEY_HEADER:
            raise NetworkKeyError(f"not a p2pshare network key (expected one line '{KEY_HEADER} BASE64')")
        try:
            secret = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raise NetworkKeyError("the key is not valid base64") from None
        if len(secret) != KEY_BYTES:
            raise NetworkKeyError(f"the key is {len(secret)} bytes, not {KEY_BYTES}")
        return cls(secret)


def load_key(path: str | Path) -> NetworkKey:
    """Read a key file, refusing one that the group or others may read or write."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise NetworkKeyError(f"{path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NetworkKeyError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise NetworkKeyError(f"{path}: group or others may read it (mode {stat.S_IMODE(info.st_mode):04o}); "
                                  f"run: chmod 600 {path}")
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise NetworkKeyError(f"{path}: too long for a network key file")
    try:
        return NetworkKey.decode(data.decode("ascii"))
    except UnicodeDecodeError:
        raise NetworkKeyError(f"{path}: not a p2pshare network key (not text)") from None
    except NetworkKeyError as e:
        raise NetworkKeyError(f"{path}: {e}") from None


def write_key(path: str | Path, key: NetworkKey) -> None:
    """Create *path* with mode 0600 holding *key*; never overwrites an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise NetworkKeyError(f"{path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, key.encode().encode())
    finally:
        os.close(fd)


# -- sealed datagrams ----------------------------------------------------------------------------


class NonceCache:
    """Nonces accepted recently, bounded in entries.

    Each nonce is kept with its datagram's timestamp while that timestamp is inside
    the window.  When the cache is full, the oldest entry is forgotten and ``floor``
    rises to its timestamp: from then on nothing stamped at or before ``floor`` is
    accepted, so a forgotten nonce can never be replayed.  Under a load beyond
    ``entries / (2 * window)`` datagrams a second the window into the past narrows
    to about ``entries / rate`` seconds, instead of memory growing.
    """

    def __init__(self, entries: int = NONCES, window: float = WINDOW) -> None:
        self.entries, self.window = entries, window
        self.floor = float("-inf")
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # in order of arrival

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, nonce: bytes, stamp: float, now: float) -> None:
        """Remember *nonce*; raise Replayed if it was seen, Stale if it may have been forgotten."""
        seen = self._seen
        while seen:  # entries whose timestamps left the window need no remembering
            oldest, when = next(iter(seen.items()))
            if when >= now - self.window:
                break
            seen.popitem(last=False)
        if nonce in seen:
            raise Replayed()
        if stamp <= self.floor:
            raise Stale("too old for the replay cache under the current load")
        seen[nonce] = stamp
        while len(seen) > self.entries:
            _, when = seen.popitem(last=False)
            self.floor = max(self.floor, when)


class DatagramSeal:
    """Seals and opens datagrams: ``version || nonce || ChaCha20-Poly1305(timestamp || datagram)``.

    The version byte is authenticated as associated data.  ``open`` accepts a
    datagram once, and only when its timestamp is within ``window`` seconds of
    the receiver's clock.
    """

    max_sealed = MAX_DATAGRAM + SEAL_OVERHEAD  # the longest sealed datagram a peer accepts

    def __init__(self, key: NetworkKey, window: float = WINDOW, entries: int = NONCES,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self._aead = ChaCha20Poly1305(key.derive(INFO_DATAGRAM))
        self.window = window
        self.nonces = NonceCache(entries, window)
        self._random = random

    def seal(self, data: bytes, now: Optional[float] = None) -> bytes:
        stamp = time.time() if now is None else now
        nonce = self._random(NONCE_BYTES)
        return SEAL_VERSION + nonce + self._aead.encrypt(nonce, _STAMP.pack(int(stamp * 1000)) + data,
                                                         SEAL_VERSION)

    def open(self, data: bytes, now: float) -> bytes:
        """The datagram inside *data*; raises Unauthentic, Stale or Replayed."""
        if len(data) < SEAL_OVERHEAD or data[:1] != SEAL_VERSION:
            raise Unauthentic("not a sealed datagram")
        nonce = data[1:1 + NONCE_BYTES]
        try:
            plain = self._aead.decrypt(nonce, data[1 + NONCE_BYTES:], SEAL_VERSION)
        except InvalidTag:
            raise Unauthentic() from None
        stamp = _STAMP.unpack_from(plain)[0] / 1000
        if abs(stamp - now) > self.window:
            raise Stale(f"timestamp {stamp - now:+.0f}s from this peer's clock")
        self.nonces.check_and_add(nonce, stamp, now)
        return plain[_STAMP.size:]


# -- TLS -----------------------------------------------------------------------------------------

_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_END = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


def network_ca(key: NetworkKey) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """The network CA: the same key and the same certificate, byte for byte, for every holder."""
    ca_key = Ed25519PrivateKey.from_private_bytes(key.derive(INFO_CA))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pshare network {key.fingerprint}")])
    public = ca_key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(1).not_valid_before(_EPOCH).not_valid_after(_END)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(ca_key, None))
    return ca_key, cert


def leaf_certificate(key: NetworkKey, leaf_key: Ed25519PrivateKey) -> x509.Certificate:
    """A certificate for *leaf_key*, signed by the network CA: "this process holds the key"."""
    ca_key, ca_cert = network_ca(key)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pshare member")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(ca_cert.subject)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_EPOCH).not_valid_after(_END)  # no revocation: validity would add nothing
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, None))


def tls_options(key: NetworkKey, leaf_key: Optional[Ed25519PrivateKey] = None) -> CertificateOptions:
    """TLS 1.3 only, our leaf presented, the other side's required to chain to the network CA.

    No host name is checked: peers are addressed by IP, and the CA speaks for the
    whole network, not for a host.  Serves both sides of a connection.
    """
    leaf_key = leaf_key or Ed25519PrivateKey.generate()
    # pyOpenSSL (>= 24.3) takes the leaf as cryptography objects (its own X509 and PKey are deprecated
    # there); the trust store still wants an X509.
    return CertificateOptions(privateKey=leaf_key,  # type: ignore[arg-type]
                              certificate=leaf_certificate(key, leaf_key),  # type: ignore[arg-type]
                              raiseMinimumTo=TLSVersion.TLSv1_3, verify=True, requireCertificate=True,
                              caCerts=[crypto.X509.from_cryptography(network_ca(key)[1])])


def tls_error(reason: Failure) -> str:
    """One line for a failed handshake, from OpenSSL's error queue."""
    if reason.check(SSL.Error):
        queue = reason.value.args[0] if reason.value.args else None
        if isinstance(queue, list) and queue:
            return ", ".join(str(entry[-1]) for entry in queue if entry)
    return reason.getErrorMessage()


Report = Callable[[str, str], None]  # (host, why)


class _WatchedTLS(TLSMemoryBIOFactory.protocol):  # type: ignore[name-defined,misc]
    """Reports a connection that did not become a private one (TLS refused or never completed).

    It also moves bytes in large batches where Twisted's ``TLSMemoryBIOProtocol`` works one
    16 KiB record at a time: a write is encrypted record by record without a trip through the
    transport after each, and the ciphertext leaves in one ``write``; the records decrypted
    from one read reach the application as one ``dataReceived`` of up to ``TLS_BATCH`` bytes
    (a 1 MiB write was 64 writes to the socket's transport, and 64 calls into the transfer
    protocol on the other side).
    """

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view, sent, end = memoryview(data), 0, len(data)
        try:
            while sent < end:  # pyOpenSSL sets partial writes: each call takes at least one whole record
                sent += self._tlsConnection.send(view[sent:])
        except SSL.WantReadError:  # (renegotiation-like states only; the rest goes with the next read)
            self._bufferedWrite(bytes(view[sent:]))
        except SSL.Error:
            self._tlsShutdownFinished(Failure())
            return
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        while True:  # everything the memory BIO holds, in writes of up to TLS_DRAIN bytes
            try:
                data = self._tlsConnection.bio_read(TLS_DRAIN)
            except SSL.WantReadError:
                return
            self.transport.write(data)
            if len(data) < TLS_DRAIN:
                return

    def _flushReceiveBIO(self) -> None:
        parts: list[bytes] = []
        size = 0

        def deliver() -> None:
            nonlocal parts, size
            if parts and not self._aborted:
                ProtocolWrapper.dataReceived(self, parts[0] if len(parts) == 1 else b"".join(parts))
            parts, size = [], 0

        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(TLS_RECORD)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # the other side closed TLS: what came before it first
                deliver()
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()
                deliver()
                self._tlsShutdownFinished(failure)
            else:
                parts.append(data)
                size += len(data)
                if size >= TLS_BATCH:
                    deliver()
        deliver()
        self._flushSendBIO()  # a read may have produced bytes to send (handshake, key update)

    def connectionLost(self, reason: Failure) -> None:
        actual = self._reason or reason
        peer = self.transport.getPeer() if self.transport is not None else None
        failed_tls = actual is not None and actual.check(SSL.Error) is not None
        if self.factory.is_client:  # we dialled: a TLS error, or they hung up before the handshake
            refused = failed_tls or not self._handshakeDone and not actual.check(ConnectionAborted)
        else:  # they dialled and did not prove membership
            refused = failed_tls and not self._handshakeDone
        try:
            if refused:
                self.factory.report(str(getattr(peer, "host", "?")), tls_error(actual))
        finally:
            super().connectionLost(reason)


class _TLSFactory(TLSMemoryBIOFactory):
    protocol = _WatchedTLS

    def __init__(self, options: CertificateOptions, is_client: bool, wrapped: Factory, report: Report) -> None:
        super().__init__(options, is_client, wrapped)
        self.is_client, self.report = is_client, report

    def buildProtocol(self, addr: Any) -> Optional[_WatchedTLS]:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:  # the wrapped factory refused it (too many connections)
            return None
        return self.protocol(self, inner)


@implementer(IHandshakeListener)
class _AwaitHandshake(Protocol):
    """Stands in for the application's protocol until the other side has proved membership.

    Only then is the real protocol built and connected, and the endpoint's Deferred
    fired: a refused handshake is a failed connection attempt, never a connection
    that the application saw open and then lose (``ClientService`` cannot take a
    connection lost while it prepares one).
    """

    def __init__(self, factory: Factory, addr: Any, done: Deferred[Any], report: Report, clock: IReactorTime,
                 timeout: float) -> None:
        self.factory, self.addr, self.done, self.report = factory, addr, done, report
        self._timer = clock.callLater(timeout, self._too_slow, timeout)
        self._timed_out: Optional[Failure] = None

    def _too_slow(self, timeout: float) -> None:
        self.report(str(getattr(self.addr, "host", "?")), f"no TLS handshake within {timeout:g}s")
        self._timed_out = Failure(TimeoutError(f"no TLS handshake within {timeout:g}s"))
        self.transport.abortConnection()  # connectionLost fails the attempt once the socket is closed

    def handshakeCompleted(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        tls = self.transport
        real = self.factory.buildProtocol(self.addr)
        if real is None or self.done.called:
            tls.abortConnection()
            self._fail(Failure(ConnectionAborted("the protocol factory refused the connection")))
            return
        tls.wrappedProtocol = real  # from now on the TLS layer delivers to the application's protocol
        real.makeConnection(tls)
        self.done.callback(real)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer.active():
            self._timer.cancel()
        self._fail(self._timed_out or reason)

    def _fail(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.errback(reason)


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """Like ``wrapClientTLS``, but ``connect`` fires once the TLS handshake has succeeded."""

    def __init__(self, options: CertificateOptions, endpoint: IStreamClientEndpoint, report: Report,
                 clock: IReactorTime, timeout: float) -> None:
        self._options, self._endpoint, self._report = options, endpoint, report
        self._clock, self._timeout = clock, timeout

    def __repr__(self) -> str:
        return f"<TLS 1.3 to {self._endpoint!r}>"

    def connect(self, factory: Factory) -> Deferred[Any]:
        waiters: list[_AwaitHandshake] = []

        def cancel(d: Deferred[Any]) -> None:
            if waiters:
                waiters[0].transport.abortConnection()
            else:
                tcp.cancel()

        done: Deferred[Any] = Deferred(cancel)

        def build(addr: Any) -> _AwaitHandshake:
            waiters.append(_AwaitHandshake(factory, addr, done, self._report, self._clock, self._timeout))
            return waiters[0]

        inner = Factory()
        inner.buildProtocol = build  # type: ignore[method-assign]
        tcp = self._endpoint.connect(_TLSFactory(self._options, True, inner, self._report))
        tcp.addErrback(lambda f: None if done.called else done.errback(f))
        return done


class NetworkTLS:
    """One process's TLS identity in a private network: an ephemeral leaf under the network CA."""

    def __init__(self, key: NetworkKey) -> None:
        self.key = key
        self.options = tls_options(key)

    @classmethod
    @functools.lru_cache(maxsize=16)
    def for_key(cls, key: NetworkKey) -> "NetworkTLS":
        """The process's identity for *key* (one leaf per key and process)."""
        return cls(key)

    def server(self, factory: Factory, report: Report) -> Factory:
        """*factory* behind TLS; *report(host, why)* for each connection that fails to prove membership."""
        return _TLSFactory(self.options, False, factory, report)

    def client(self, endpoint: IStreamClientEndpoint, report: Report, clock: Optional[IReactorTime] = None,
               timeout: float = HANDSHAKE_TIMEOUT) -> IStreamClientEndpoint:
        """*endpoint* with TLS; *report(host, why)* when the other side is not a member, or not ours.

        ``connect`` fires with the application's protocol only once the other side has
        proved it holds the key, and fails if it has not within *timeout* seconds.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        return _TLSClientEndpoint(self.options, endpoint, report, clock, timeout)


def reporter(counters: Counters, name: str, log: RateLimitedLog, template: str) -> Report:
    """A ``Report`` that counts *name* and logs *template* (with ``{host}`` and ``{why}``) per host, rate-limited."""

    def report(host: str, why: str) -> None:
        counters.add(name)
        log.warn((name, host), template, host=host, why=why)

    return report
