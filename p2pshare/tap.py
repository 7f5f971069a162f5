"""Options and service makers for the ``p2ptracker`` and ``p2ppeer`` twistd plugins.

Only parsing and wiring: everything that runs lives in tracker.py, peer.py and
control.py.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python import usage

from p2pshare.bandwidth import parse_rate
from p2pshare.lan import is_loopback
from p2pshare.wire import MAX_PEERS_ANSWER, MAX_TTL

DEFAULT_CONTROL = "7878"
CONFIG_HELP = ("A TOML file of options, keys named as the long options (port = 8000, tracker = [\"a:8000\"]); "
               "the command line wins over it.")
METRICS_HELP = ("Serve Prometheus metrics at /metrics on this port or endpoint (e.g. tcp:9101), without a token, "
                "for a scraper on the network (default: off; the control API has /metrics with its token).")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "\\:\\:1")


def server_endpoint_string(value: str, what: str) -> str:
    """A bare port number becomes ``tcp:N``; anything else must be a server endpoint string."""
    if value.isdigit():
        if not 0 <= int(value) < 65536:
            raise usage.UsageError(f"{what}: port {value} is out of range")
        return f"tcp:{value}"
    if ":" not in value:
        raise usage.UsageError(f"{what}: expected a port number or an endpoint string such as tcp:8000, "
                               f"got {value!r}")
    return value


def dual_stack() -> bool:
    """Does an IPv6 socket bound to ``::`` take IPv4 too on this system (IPv6 present, and
    ``net.ipv6.bindv6only`` off, as Linux has it by default)?"""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            if s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                return False
            s.bind(("::", 0))
    except (OSError, AttributeError):
        return False
    return True


def listening_port(value: str) -> str:
    """``--port`` of the tracker: a bare number listens on both families where the system has them
    (one dual-stack socket), else on IPv4; an endpoint string as it says."""
    desc = server_endpoint_string(value, "--port")
    if value.isdigit() and dual_stack():
        return f"tcp6:{value}:interface=\\:\\:"
    return desc


def control_endpoint_string(value: str) -> Optional[str]:
    """The control API's endpoint, always on loopback; None for ``none``.  ``HOST:PORT`` and
    ``[::1]:PORT`` are taken too."""
    if value.lower() == "none":
        return None
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([0-9.]+|localhost):(\d+)", value)
    if match is not None:
        host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        kind = "tcp6" if ":" in host else "tcp"
        value = f"{kind}:{port}:interface={host.replace(':', chr(92) + ':')}"
    desc = server_endpoint_string(value, "--control")
    if not desc.startswith(("tcp:", "tcp6:")):
        raise usage.UsageError("--control: only tcp and tcp6 endpoints are supported")
    match = re.search(r":interface=((?:\\:|[^:])+)", desc)
    if match is None:
        return desc + (":interface=\\:\\:1" if desc.startswith("tcp6:") else ":interface=127.0.0.1")
    if match.group(1) not in LOOPBACK:
        raise usage.UsageError(f"--control: the control API listens on loopback only, not {match.group(1)}")
    return desc


def metrics_endpoint_string(value: Optional[str]) -> Optional[str]:
    return None if value is None or value.lower() == "none" else server_endpoint_string(value, "--metrics")


def with_metrics(reactor: Any, options: usage.Options, metrics: Any, services: list[IService],
                 ready: list[Callable[[], Deferred[Any]]]) -> None:
    """Add the ``--metrics`` listener, when asked for, to *services* (and its start to *ready*); *metrics*
    is a ``PeerMetrics`` or ``TrackerMetrics``, whose registry is made only then."""
    if options["metrics"] is None:
        return
    from twisted.internet.endpoints import serverFromString

    from p2pshare.metrics_web import MetricsService

    service = MetricsService(serverFromString(reactor, options["metrics"]), metrics.registry)
    services.append(service)
    ready.append(service.when_listening)


def host_port(value: str, what: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` too)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"{what}: expected HOST:PORT, got {value!r}")
    return host, int(port)


def network_key(value: Optional[str]) -> Any:
    """``--key FILE``: the loaded ``netkey.NetworkKey``, or None for an open network."""
    if value is None:
        return None
    from p2pshare.netkey import NetworkKeyError, load_key

    try:
        return load_key(value)
    except NetworkKeyError as e:
        raise usage.UsageError(f"--key: {e}") from None


def trackers_endpoint(reactor: Any, values: list[str]) -> Any:
    """One endpoint for the ``--tracker`` values: the first that connects, starting from the last that did."""
    from p2pshare.tracker import FailoverEndpoint

    endpoints = [tracker_endpoint(reactor, v) for v in values]
    return endpoints[0] if len(endpoints) == 1 else FailoverEndpoint(endpoints, values)


def tracker_endpoint(reactor: Any, value: str) -> Any:
    """``HOST:PORT`` or a client endpoint string (``tcp:host=...:port=...``)."""
    from twisted.internet.endpoints import HostnameEndpoint, clientFromString

    if value.startswith(("tcp:", "unix:", "tls:")):
        try:
            return clientFromString(reactor, value)
        except (ValueError, TypeError) as e:
            raise usage.UsageError(f"--tracker: {e}") from None
    host, port = host_port(value, "--tracker")
    return HostnameEndpoint(reactor, host, port, timeout=10)


class ConfigFileOptions(usage.Options):
    """Options that ``--config FILE`` (TOML) can give too, with the long options' names as keys; the command
    line wins over the file.  An unknown key, or a value of the wrong type, is a usage error naming the
    key and the file, before anything starts."""

    REPEATABLE: dict[str, Callable[[Any, str], None]] = {}  # key -> the opt_ method a list's items go to

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        args = sys.argv[1:] if options is None else list(options)
        path = _config_path(args)
        if path is not None:
            self._apply_file(path, args)
        super().parseOptions(args)

    def _apply_file(self, path: str, args: list[str]) -> None:
        table = read_toml(path)
        params = {p[0]: (p[4] if len(p) > 4 else None) for p in self.optParameters}
        flags = {f[0] for f in getattr(self, "optFlags", [])}
        known = sorted((set(params) | flags | set(self.REPEATABLE)) - {"config"})
        for raw, value in table.items():
            key = raw.replace("_", "-")
            where = f"--config {path}: {raw}"
            if key == "config" or key not in known:
                raise usage.UsageError(f"{where}: no such option (the keys are: {', '.join(known)})")
            if _given(args, key, self):
                continue  # the command line wins
            if key in self.REPEATABLE:
                items = value if isinstance(value, list) else [value]
                if not items or not all(isinstance(v, str) for v in items):
                    raise usage.UsageError(f"{where}: expected a string or a list of strings")
                for item in items:
                    self.REPEATABLE[key](self, item)
            elif key in flags:
                if not isinstance(value, bool):
                    raise usage.UsageError(f"{where}: expected true or false")
                self[key] = value
            else:
                self[key] = _typed(value, params[key], where)


def _config_path(args: list[str]) -> Optional[str]:
    """The value of ``--config`` among *args* (``--config F``, ``--config=F``, or a prefix getopt takes)."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--config", "--confi", "--conf"):
            if eq:
                return value
            if i + 1 < len(args):
                return args[i + 1]
    return None


def _given(args: list[str], key: str, options: usage.Options) -> bool:
    """Does the command line set option *key* (long form, a prefix of it, or its short letter)?"""
    shorts = {p[1] for p in options.optParameters if p[0] == key and p[1]}
    shorts |= {name[4:] for name in dir(options) if name.startswith("opt_") and len(name) == 5
               and getattr(options, name) == getattr(options, f"opt_{key}", None)}
    for arg in args:
        name = arg.partition("=")[0]
        if name.startswith("--") and len(name) > 3 and f"--{key}".startswith(name) and name not in ("--con",):
            return True
        if name[:1] == "-" and name[1:2] in shorts:
            return True
    return False


def _typed(value: Any, coerce: Any, where: str) -> Any:
    """*value* as an option of type *coerce* (int, float, or None for a string) would hold it."""
    if isinstance(value, bool):
        raise usage.UsageError(f"{where}: expected {'a number' if coerce else 'a string'}, got a boolean")
    if coerce is int:
        if not isinstance(value, int):
            raise usage.UsageError(f"{where}: expected an integer, got {value!r}")
        return value
    if coerce is float:
        if not isinstance(value, (int, float)):
            raise usage.UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(value, int):
        return str(value)  # port = 8000 for an option that also takes endpoint strings
    if not isinstance(value, str):
        raise usage.UsageError(f"{where}: expected a string, got {value!r}")
    return value


def read_toml(path: str) -> dict[str, Any]:
    """The TOML file *path*, or a usage error in one line saying why not."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover (Python 3.10)
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise usage.UsageError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"--config {path}: not valid TOML ({e})") from None


def own_pidfile(options: usage.Options, plugin: str) -> None:
    """twistd's pid file when the user chose none: none under ``--nodaemon``, else ``<plugin>.pid``, so
    that a tracker and a peer started in one folder do not both claim ``twistd.pid``.  An explicit
    ``--pidfile`` (before the plugin's name, where twistd reads it) always wins."""
    parent = getattr(options, "parent", None)
    if parent is None or "pidfile" not in parent:
        return  # parsed on its own (a library, a test): no twistd to tell
    args = sys.argv[1:]
    before = args[:args.index(plugin)] if plugin in args else args
    if any(a.startswith("--pid") for a in before):  # getopt takes any unambiguous prefix of --pidfile
        return
    parent["pidfile"] = "" if parent["nodaemon"] else f"{plugin}.pid"


class TrackerOptions(ConfigFileOptions):
    synopsis = "[--port 8000] [--max-peers 20] [--interval 10] [--registry memory|URL]"
    longdesc = "Run a p2pshare tracker: peers register with it and ask it for a random subset of the others."
    optParameters = [
        ["port", "p", "8000", "TCP port (on IPv4 and IPv6 where the system has both) or endpoint string to listen "
         "on (e.g. tcp:8000:interface=127.0.0.1)."],
        ["max-peers", "m", 20, f"Most peers in one answer (at most {MAX_PEERS_ANSWER}).", int],
        ["interval", "i", 10.0, "Heartbeat interval in seconds; silent peers go after three.", float],
        ["max-per-address", None, 32, "Most registrations, and most open connections, from one address.", int],
        ["key", None, None, "Private network: the key file (p2pshare keygen); only its holders may connect."],
        ["registry", None, "memory", "Where the peer table lives: memory (this process), or shared by several "
         "trackers: redis://HOST:PORT/DB, rediss://..., unix:///PATH?db=N, redis+cluster://HOST:PORT,HOST:PORT,... "
         "(needs pip install 'p2pshare[redis]')."],
        ["registry-prefix", None, "p2pshare", "Prefix of the table's Redis keys: one per network sharing a Redis."],
        ["metrics", None, None, METRICS_HELP],
        ["config", None, None, CONFIG_HELP],
    ]

    def postOptions(self) -> None:
        if self["key"] is None:  # under twistd this comes first, before anything imports the reactor
            without_pyopenssl()
        own_pidfile(self, "p2ptracker")
        self["registry"] = registry_url(self["registry"])
        if not self["registry-prefix"] or not self["registry-prefix"].isprintable():
            raise usage.UsageError("--registry-prefix must be a non-empty printable string")
        self["port"] = listening_port(self["port"])
        self["metrics"] = metrics_endpoint_string(self["metrics"])
        self["key"] = network_key(self["key"])
        if not 1 <= self["max-peers"] <= MAX_PEERS_ANSWER:
            raise usage.UsageError(f"--max-peers must be between 1 and {MAX_PEERS_ANSWER}")
        if not 0.05 <= self["interval"] <= 3600:
            raise usage.UsageError("--interval must be between 0.05 and 3600 seconds")
        if self["max-per-address"] < 1:
            raise usage.UsageError("--max-per-address must be at least 1")


class _StopOnFailure(MultiService):
    """Under twistd, a service that cannot start (port taken, folder unreadable) ends the process."""

    log = Logger()

    def __init__(self, reactor: Any, *ready: Callable[[], Deferred[Any]]) -> None:
        super().__init__()
        self.reactor, self.ready = reactor, ready
        self.failed = False

    def startService(self) -> None:
        super().startService()
        for ready in self.ready:
            ready().addErrback(self._failed)

    def _failed(self, f: Failure) -> None:
        if self.failed:
            return
        self.failed = True
        self.log.critical("could not start: {error}", error=f.getErrorMessage())
        stop_when_running(self.reactor)
        atexit.register(_exit_status_1)  # twistd itself exits 0 once the reactor stops


def _exit_status_1() -> None:
    """At interpreter exit, after twistd's own clean-up: make the failure visible to supervisors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def stop_when_running(reactor: Any) -> None:
    """Stop *reactor*, also when called before it runs (twistd starts services before ``run()``)."""

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(stop)


M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def return_freed_memory() -> bool:
    """Fix the sizes at which glibc maps memory directly and gives its heap back (True when it could be asked).

    Left alone, glibc raises the mapping size each time a large mapped buffer is
    freed, and buffers of every size then come from its heap, which fragments and
    is never returned: a 4 GiB download grew the process by well over 100 MiB.  A
    fixed threshold (setting it also stops the raising) keeps memory flat.  It is
    set above the transfer's 1 MiB buffers (socket reads, file reads under TLS, TLS
    batches): those are all of one size, so the heap reuses their memory (bounded by
    the download's backpressure) instead of mapping a new megabyte for every read.
    Fixing the mapping size also drops the size above which free memory at the top
    of the heap is given back to 128 KiB, so each freed megabyte would be returned
    and faulted in again by the next (256 page faults a megabyte: two thirds of a
    TLS holder's CPU time); the heap now keeps up to 64 MiB of it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def registry_url(value: str) -> str:
    """``memory``, or a Redis URL whose client is installed (a UsageError says what to install)."""
    if value == "memory":
        return value
    from p2pshare.redis_registry import check_url

    try:
        check_url(value)
    except ValueError as e:
        raise usage.UsageError(f"--registry {e}") from None
    from p2pshare.redis_registry import native_url

    try:  # a standalone Redis is spoken to with hiredis alone (redis-py would cost memory for nothing)
        if native_url(value):
            import hiredis  # noqa: F401
        else:
            import redis  # noqa: F401
    except ImportError:
        raise usage.UsageError("--registry redis://... needs the redis and hiredis packages: "
                               "pip install 'p2pshare[redis]'") from None
    return value


def without_pyopenssl() -> None:
    """Keep pyOpenSSL (and cryptography under it) out of this process.

    A tracker of an open network does no TLS, yet Twisted's ``tcp`` and ``endpoints`` modules
    import pyOpenSSL to offer it, and go without it when that import fails: 13 MB of a 53 MB idle
    tracker.  Possible only before anything imports Twisted's ``tcp``, as twistd parses the
    plugin's options before it imports the reactor; a process that has it already (a test run,
    an application) is left alone.
    """
    if "OpenSSL" not in sys.modules and "twisted.internet.tcp" not in sys.modules:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # imports of it fail with ImportError


def makeTrackerService(options: TrackerOptions, reactor: Any = None) -> IService:
    from twisted.internet.endpoints import serverFromString

    from p2pshare.tracker import TrackerFactory, TrackerService

    if reactor is None:
        from twisted.internet import reactor
    registry = None
    if options["registry"] != "memory":
        from p2pshare.redis_registry import RedisRegistry
        from p2pshare.tracker import EXPIRE_AFTER

        url = options["registry"]
        registry = RedisRegistry.for_url(url, reactor, timeout=options["interval"] * EXPIRE_AFTER,
                                         max_per_source=options["max-per-address"],
                                         prefix=options["registry-prefix"], refresh=min(1.0, options["interval"] / 2))
    factory = TrackerFactory(reactor, registry=registry, max_peers=options["max-peers"], interval=options["interval"],
                             max_per_address=options["max-per-address"])
    tracker = TrackerService(serverFromString(reactor, options["port"]), factory, key=options["key"])
    services: list[IService] = [tracker]
    ready: list[Callable[[], Deferred[Any]]] = [tracker.when_listening]
    with_metrics(reactor, options, factory.metrics, services, ready)
    top = _StopOnFailure(reactor, *ready)
    for service in services:
        service.setServiceParent(top)
    return top


class PeerOptions(ConfigFileOptions):
    synopsis = "--tracker HOST:PORT --dir DIR [--port N] [--control 7878|ENDPOINT|none]"
    longdesc = ("Run a p2pshare peer sharing every file under --dir. UDP (search) and TCP (transfer) use the "
                "same port number; 0 picks a free one.")
    optParameters = [
        ["dir", "d", "files", "The shared folder; downloads land here too."],
        ["port", "p", 0, "Port for both UDP and TCP (0: any free port).", int],
        ["interface", None, None, "Address to listen on (default: :: for IPv4 and IPv6 where the system has "
         "both, else 0.0.0.0)."],
        ["control", "c", DEFAULT_CONTROL, "Control API port or endpoint (loopback only), or 'none'."],
        ["advertise", None, None, "Host other peers should use, when the tracker's observed one is wrong."],
        ["neighbours", "n", 4, "How many neighbours to keep from the tracker (others link back: about twice as many in all).", int],
        ["refresh", None, 30.0, "Seconds between neighbour refreshes.", float],
        ["rescan", None, 30.0, "Seconds between rescans of the shared folder.", float],
        ["ttl", None, 7, f"Hops a query may travel (at most {MAX_TTL}).", int],
        ["key", None, None, "Private network: the key file (p2pshare keygen); talk only to its holders."],
        ["metrics", None, None, METRICS_HELP],
        ["config", None, None, CONFIG_HELP],
        ["max-upload-rate", None, "0", "Most bytes a second the peer sends, across all its transfers (k, M, G: "
         "thousands; Ki, Mi, Gi: 1024s; 0: no limit). p2pshare limits changes it while the peer runs."],
        ["max-download-rate", None, "0", "Most bytes a second the peer receives, across all its transfers."],
    ]
    optFlags = [
        ["no-lan", None, "Do not announce this peer on the local link, nor take the peers announced there as "
         "neighbours (LAN discovery: multicast 239.192.72.69:7771, never on a loopback --interface)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peers"] = []
        self["tracker"] = []

    def opt_tracker(self, value: str) -> None:
        """A tracker, HOST:PORT or a client endpoint string (repeatable: the peer uses one, and moves to the next when it fails; a host name with several addresses counts as several)."""  # noqa: E501 (usage text)
        self["tracker"].append(value)

    opt_t = opt_tracker

    def opt_peer(self, value: str) -> None:
        """A neighbour to use besides the tracker's, HOST:PORT (repeatable)."""
        self["peers"].append(host_port(value, "--peer"))

    REPEATABLE = {"tracker": opt_tracker, "peer": opt_peer}

    def postOptions(self) -> None:
        own_pidfile(self, "p2ppeer")
        if self["interface"] is None:
            self["interface"] = "::" if dual_stack() else "0.0.0.0"
        if not self["tracker"] and not self["peers"] and (self["no-lan"] or is_loopback(self["interface"])):
            raise usage.UsageError("give --tracker HOST:PORT or at least one --peer HOST:PORT (without them, the "
                                   "peer can only find others on the local link: not with --no-lan, nor on a "
                                   "loopback --interface)")
        directory = Path(self["dir"])
        if not directory.is_dir():
            raise usage.UsageError(f"--dir: {directory} is not a folder")
        if not 0 <= self["port"] < 65536:
            raise usage.UsageError("--port must be between 0 and 65535")
        if not 0 <= self["neighbours"] <= MAX_PEERS_ANSWER:
            raise usage.UsageError(f"--neighbours must be between 0 and {MAX_PEERS_ANSWER}")
        if not 1 <= self["ttl"] <= MAX_TTL:
            raise usage.UsageError(f"--ttl must be between 1 and {MAX_TTL}")
        for name in ("refresh", "rescan"):
            if not 0.05 <= self[name] <= 86400:
                raise usage.UsageError(f"--{name} must be between 0.05 and 86400 seconds")
        self["control"] = control_endpoint_string(self["control"])
        self["metrics"] = metrics_endpoint_string(self["metrics"])
        for name in ("max-upload-rate", "max-download-rate"):
            try:
                self[name] = parse_rate(str(self[name]))
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}") from None
        self["key"] = network_key(self["key"])
        if self["key"] is not None and any(t.startswith("tls:") for t in self["tracker"]):
            raise usage.UsageError("--tracker: with --key, give HOST:PORT or a tcp: endpoint (the key brings TLS)")


def makePeerService(options: PeerOptions, reactor: Any = None) -> IService:
    return_freed_memory()
    from twisted.internet.endpoints import serverFromString

    from p2pshare.control import ControlService
    from p2pshare.peer import Peer

    if reactor is None:
        from twisted.internet import reactor
    tracker = trackers_endpoint(reactor, options["tracker"]) if options["tracker"] else None
    peer = Peer(options["dir"], tracker=tracker, port=options["port"], interface=options["interface"],
                advertise=options["advertise"], peers=tuple(options["peers"]), want=options["neighbours"],
                refresh=options["refresh"], rescan=options["rescan"], ttl=options["ttl"], reactor=reactor,
                key=options["key"], max_upload_rate=options["max-upload-rate"],
                max_download_rate=options["max-download-rate"], lan=not options["no-lan"])
    ready: list[Callable[[], Deferred[Any]]] = [peer.when_ready]
    services: list[IService] = [peer]
    with_metrics(reactor, options, peer.metrics, services, ready)
    if options["control"] is not None:
        control = ControlService(serverFromString(reactor, options["control"]), peer)
        ready.append(control.when_listening)
        services.append(control)
    top = _StopOnFailure(reactor, *ready)
    for service in services:
        service.setServiceParent(top)
    return top
