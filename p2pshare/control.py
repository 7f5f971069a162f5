"""The local control API of a running peer: HTTP + JSON on loopback, for the ``p2pshare`` CLI.

``GET /v1/status``, ``GET /v1/search?name=N&timeout=S``, ``POST /v1/get``
(answers a stream of JSON lines: progress, then ``done`` or ``error``; a client
that disconnects first withdraws from the fetch, which stops unless others wait for it) and
``POST /v1/rescan``.  Requests whose Host header is not a loopback name are
refused, so a web page cannot reach the API through DNS rebinding; every request
must carry ``Authorization: Bearer TOKEN``, the token the service keeps in
``<dir>/.p2pshare/control.token`` (mode 0600), so only the peer's user can drive it.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Optional

from attrs import asdict

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from p2pshare.bandwidth import parse_rate
from p2pshare.errors import AlreadyExists, InvalidName, NotFound, P2PError, describe
from p2pshare.metrics_web import MetricsPage
from p2pshare.peer import FetchResult, Peer, hit_json
from p2pshare.wire import STATE_DIR

MAX_BODY = 64 * 1024
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
STATUS_OF = {InvalidName: 400, NotFound: 404, AlreadyExists: 409}
TOKEN_FILE = "control.token"  # in the state folder, mode 0600: read by the CLI of the peer's user
TOKEN_BYTES = 32  # 256 random bits, 64 hex digits


def _read_own_token(path: Path) -> Optional[str]:
    """The token in *path* if it is safe to reuse: a regular file (not a link) of ours, mode 0600, well formed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or (hasattr(os, "geteuid")
                                                                   and st.st_uid != os.geteuid()):
            return None
        token = f.read(4 * TOKEN_BYTES).decode("ascii", "replace").strip()
    return token if len(token) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in token) else None


def ensure_token(path: Path) -> str:
    """Reuse the token in *path*, or write a new random one there: created 0600, then renamed into place,
    so it is never readable by others, not even for a moment."""
    token = _read_own_token(path)
    if token is not None:
        return token
    token = secrets.token_hex(TOKEN_BYTES)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return token


def _json(request: Request, obj: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(obj).encode() + b"\n"


def _error(request: Request, error: BaseException) -> bytes:
    code = next((c for cls, c in STATUS_OF.items() if isinstance(error, cls)), 500 if not isinstance(
        error, P2PError) else 502)
    return _json(request, {"error": type(error).__name__, "message": describe(error)}, code)


def _float_arg(request: Request, name: str, default: float, lo: float = 0.1, hi: float = 3600.0) -> float:
    raw = request.args.get(name.encode(), [None])[0]
    if raw is None:
        return default
    value = float(raw)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return value


def _answer_later(request: Request, d: Deferred[Any]) -> Any:
    """Answer with what *d* fires (JSON) or its error, unless the client has gone."""

    def answer(result: Any) -> None:
        if request.finished or request._disconnected:  # type: ignore[attr-defined]
            return
        request.write(_error(request, result.value) if isinstance(result, Failure) else _json(request, result))
        request.finish()

    d.addBoth(answer)
    return NOT_DONE_YET


def _body(request: Request) -> dict[str, Any]:
    """The request's JSON object; ValueError when it is not one."""
    body = json.loads(request.content.read(MAX_BODY + 1)[:MAX_BODY])
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def _fetch_request(request: Request) -> tuple[str, str, float]:
    """(name, sha256, timeout) of a ``/v1/get`` or ``/v1/fetches`` body; ValueError or TypeError when bad."""
    body = _body(request)
    name, sha256 = body.get("name", ""), body.get("sha256", "")
    timeout = float(body.get("timeout", 10.0))
    if not isinstance(name, str) or not isinstance(sha256, str) or not (name or sha256) or not 0.1 <= timeout <= 3600:
        raise ValueError("need a name or a sha256 (strings), and a timeout within [0.1, 3600]")
    return name, sha256, timeout


def _loopback_only(request: Request) -> Optional[bytes]:
    """A 403 answer for a request addressed to a non-loopback host name (DNS rebinding) or from
    another site; None when it may go on."""
    host = (request.getHeader("host") or "").rsplit(":", 1)[0] if request.getHeader("host") else ""
    if host not in LOOPBACK_HOSTS:
        return _json(request, {"error": "Forbidden", "message": "the control API answers loopback only"}, 403)
    origin = request.getHeader("origin")
    if origin is not None and urlsplit(origin).hostname not in LOOPBACK_HOSTS:
        return _json(request, {"error": "Forbidden", "message": "cross-site requests are refused"}, 403)
    return None


class _Guarded(Resource):
    """Refuses requests addressed to a non-loopback host name (DNS rebinding), cross-site requests,
    and requests without the control token."""

    def __init__(self, peer: Peer, token: str) -> None:
        super().__init__()
        if not token:
            raise ValueError("the control API needs a token")
        self.peer = peer
        self._expected = token.encode("ascii")

    def _authorized(self, request: Request) -> bool:
        scheme, _, given = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
        # compare_digest: the time taken does not reveal how much of a guess was right.
        return hmac.compare_digest(given.strip(), self._expected) and scheme.lower() == b"bearer"

    def render(self, request: Request) -> Any:
        refused = _loopback_only(request)
        if refused is not None:
            return refused
        if not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="p2pshare"')
            return _json(request, {"error": "Unauthorized", "message": "send Authorization: Bearer TOKEN, the token "
                                   f"in {STATE_DIR}/{TOKEN_FILE} of the peer's folder"}, 401)
        if request.method == b"POST" and not (request.getHeader("content-type") or "").startswith(
                "application/json"):
            # A web page can POST a form to any address without asking; it cannot send JSON so.
            return _json(request, {"error": "UnsupportedMediaType", "message": "send application/json"}, 415)
        return super().render(request)


class StatusResource(_Guarded):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.peer.status())


class SearchResource(_Guarded):
    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        try:
            name = request.args.get(b"name", [b""])[0].decode("utf-8")
            sha256 = request.args.get(b"sha256", [b""])[0].decode("ascii")
            timeout = _float_arg(request, "timeout", 3.0)
            if not name and not sha256:
                raise ValueError("no name")
        except (UnicodeDecodeError, ValueError) as e:
            return _json(request, {"error": "BadRequest",
                                   "message": f"need name= or sha256=, and a valid timeout= ({e})"}, 400)

        d = self.peer.search(name, timeout, sha256)
        d.addCallback(lambda hits: {"name": name, "sha256": sha256, "hits": [hit_json(h) for h in hits]})
        return _answer_later(request, d)


class GetResource(_Guarded):
    """Streams one JSON object a line: ``progress`` events, then ``done`` or ``error``.

    A client that disconnects before the end cancels its fetch (``Peer.fetch``)."""

    isLeaf = True

    def render_POST(self, request: Request) -> Any:
        try:
            name, sha256, timeout = _fetch_request(request)
        except (ValueError, TypeError) as e:
            return _json(request, {"error": "BadRequest", "message": f"bad request body: {e}"}, 400)
        request.setHeader(b"content-type", b"application/x-ndjson")
        last = [-1]

        def line(obj: dict[str, Any]) -> None:
            if not request.finished and not request._disconnected:  # type: ignore[attr-defined]
                request.write(json.dumps(obj).encode() + b"\n")

        def progress(got: int, size: int) -> None:
            step = size // 100 or 1  # at most ~100 progress lines per file
            if got // step != last[0] or got == size:
                last[0] = got // step
                line({"event": "progress", "received": got, "size": size})

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                line({"event": "error", "error": type(result.value).__name__, "message": describe(result.value)})
            else:
                assert isinstance(result, FetchResult)
                line({"event": "done", **asdict(result)})
            if not request.finished and not request._disconnected:  # type: ignore[attr-defined]
                request.finish()

        line({"event": "searching", "name": name, "sha256": sha256})
        fetching = self.peer.fetch(name, timeout, progress, sha256)
        fetching.addBoth(done)
        # A client that goes away (Ctrl-C) no longer waits: withdraw it, which stops the download
        # when nobody else waits for it.
        request.notifyFinish().addErrback(lambda _: fetching.cancel())
        return NOT_DONE_YET


class RescanResource(_Guarded):
    isLeaf = True

    def render_POST(self, request: Request) -> Any:
        return _answer_later(request, self.peer.shares.rescan().addCallback(lambda files: {"files": len(files)}))


class FilesResource(_Guarded):
    """``GET /v1/files``: every shared file (name, size, sha256), and the version of that list."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        files = [{"name": e.name, "size": e.size, "sha256": e.sha256}
                 for e in sorted(self.peer.shares.entries.values(), key=lambda e: e.name)]
        return _json(request, {"version": self.peer.shares.generation, "files": files})


class FetchesResource(_Guarded):
    """``POST /v1/fetches`` ``{"name", "sha256", "timeout"}``: start a fetch that runs on its own (not tied
    to this request), answered 202 with its ``id``; it shows in ``/v1/status`` under ``fetching``, then
    ``fetched``."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        try:
            name, sha256, timeout = _fetch_request(request)
        except (ValueError, TypeError) as e:
            return _json(request, {"error": "BadRequest", "message": f"bad request body: {e}"}, 400)
        try:
            fid = self.peer.fetcher.start(name, sha256, timeout)
        except P2PError as e:
            return _error(request, e)
        return _json(request, {"id": fid}, 202)


class CancelResource(_Guarded):
    """``POST /v1/cancel`` ``{"id": N}``: end fetch N for every caller, keeping its verified pieces."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        try:
            fid = _body(request).get("id")
            if not isinstance(fid, int) or isinstance(fid, bool):
                raise ValueError("id must be a fetch's number")
        except ValueError as e:
            return _json(request, {"error": "BadRequest", "message": f"bad request body: {e}"}, 400)
        if not self.peer.fetcher.cancel(fid):
            return _json(request, {"error": "NotFound", "message": f"no fetch {fid} in progress"}, 404)
        return _json(request, {"cancelled": fid})


class LimitsResource(_Guarded):
    """``GET /v1/limits``: the peer's bandwidth limits, bytes a second (0: none).  ``POST`` ``{"upload": R,
    "download": R}`` (either or both; a number, or a string such as ``"10M"`` or ``"none"``) changes them
    at once, for the transfers under way too, and answers the new limits."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.peer.limits.status())

    def render_POST(self, request: Request) -> bytes:
        try:
            body = _body(request)
            rates = {}
            for direction in ("upload", "download"):
                if direction in body:
                    value = body[direction]
                    if isinstance(value, bool) or not isinstance(value, (int, str)):
                        raise ValueError(f"{direction}: give bytes a second, as a number or a string such as '10M'")
                    rates[direction] = parse_rate(str(value))
            if set(body) - {"upload", "download"} or not rates:
                raise ValueError('give "upload" and/or "download"')
        except ValueError as e:
            return _json(request, {"error": "BadRequest", "message": f"bad request body: {e}"}, 400)
        for direction, rate in rates.items():
            getattr(self.peer.limits, direction).set_rate(rate)
        return _json(request, self.peer.limits.status())


class ScrapeResource(_Guarded):
    """``GET /metrics``: the peer's Prometheus metrics, for a scraper given the token
    (Prometheus: ``authorization: {credentials_file: .../control.token}``)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return MetricsPage(self.peer.metrics.registry).render_GET(request)


# The dashboard's page: its own files only, no inline script or style, nothing from elsewhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
UI_FILES = {b"": ("index.html", b"text/html; charset=utf-8"), b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
            b"style.css": ("style.css", b"text/css; charset=utf-8"), b"icon.svg": ("icon.svg", b"image/svg+xml")}


class UIFile(Resource):
    """One file of the dashboard (``p2pshare/dashboard/``), served to loopback names only. The page holds
    no secret: it asks for the token, which it keeps in the browser's session storage."""

    isLeaf = True

    def __init__(self, filename: str, content_type: bytes) -> None:
        super().__init__()
        self.body = (Path(__file__).parent / "dashboard" / filename).read_bytes()
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        refused = _loopback_only(request)
        if refused is not None:
            return refused
        for name, value in ((b"content-type", self.content_type), (b"content-security-policy", CSP.encode()),
                            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY"), (b"cache-control", b"no-cache")):
            request.setHeader(name, value)
        return self.body


def dashboard(root: Resource) -> None:
    """The dashboard at ``/`` (``/ui/app.js``, ``/ui/style.css`` beside it)."""
    ui = Resource()
    for path, (filename, content_type) in UI_FILES.items():
        (root if path == b"" else ui).putChild(path, UIFile(filename, content_type))
    root.putChild(b"ui", ui)


def control_site(peer: Peer, token: str) -> Site:
    """The API's resources; every request must carry ``Authorization: Bearer`` *token*."""
    root = Resource()
    root.putChild(b"metrics", ScrapeResource(peer, token))
    dashboard(root)
    v1 = Resource()
    root.putChild(b"v1", v1)
    for name, cls in ((b"status", StatusResource), (b"search", SearchResource), (b"get", GetResource),
                      (b"rescan", RescanResource), (b"files", FilesResource), (b"fetches", FetchesResource),
                      (b"cancel", CancelResource), (b"limits", LimitsResource)):
        v1.putChild(name, cls(peer, token))
    try:  # bodies are JSON: no MIME form parsing of every POST (Twisted >= 24.7)
        site = Site(root, parsePOSTFormSubmission=False)
    except TypeError:
        site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    # No access log: a line in the daemon's log for every local API call (each fetch of a small file
    # is one) cost 4 % of a requester's CPU; what goes wrong is logged where it happens.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


class ControlService(Service):
    """Serves the control API and writes its URL to ``<state>/control.json`` for the CLI.

    At start it makes (or reuses) the token in ``token_path`` (``<state>/control.token``, mode 0600);
    ``token`` is its value, which every request must send as ``Authorization: Bearer TOKEN``.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, peer: Peer) -> None:
        self.endpoint, self.peer = endpoint, peer
        self.port: Optional[IListeningPort] = None
        self.url = ""
        self.token_path = peer.shares.state / TOKEN_FILE
        self.token = ""
        self._listening: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        try:
            self.token = ensure_token(self.token_path)
        except OSError as e:
            self.log.critical("cannot write the control API's token {path}: {error}", path=self.token_path,
                              error=describe(e))
            self._listening.errback(Failure(e))
            return

        def listening(port: IListeningPort) -> None:
            self.port = port
            host = port.getHost()
            self.url = f"http://[{host.host}]:{host.port}" if ":" in host.host else f"http://{host.host}:{host.port}"
            (self.peer.shares.state / "control.json").write_text(json.dumps({"url": self.url}) + "\n")
            self.log.info("control API on {url}", url=self.url)
            self._listening.callback(None)  # last: whoever waits sees the URL set

        def failed(f: Failure) -> None:
            self.log.critical("the control API could not listen ({error}). Use --control to pick another "
                              "port, or --control none.", error=f.getErrorMessage())
            self._listening.errback(f)

        self.endpoint.listen(control_site(self.peer, self.token)).addCallbacks(listening, failed)

    def when_listening(self) -> Deferred[None]:
        """Fires when the API listens, or fails when it cannot."""
        d: Deferred[None] = Deferred()
        self._listening.addBoth(lambda r: (d.errback(r) if isinstance(r, Failure) else d.callback(None), None)[1])
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()
        (self.peer.shares.state / "control.json").unlink(missing_ok=True)
        if self.port is None:
            return succeed(None)
        port, self.port = self.port, None
        return port.stopListening()  # type: ignore[return-value]
