"""The ``p2pshare`` command: talks to a running peer's control API, or runs a peer for one fetch.

Exit codes: 0 success, 1 the operation failed (not found, transfer failed,
daemon unreachable), 2 usage error, 130 interrupted (Ctrl-C).  Expected failures
and interruptions print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from p2pshare.errors import ControlError, P2PError, describe
from p2pshare.wire import STATE_DIR, is_sha256

DEFAULT_CONTROL = "127.0.0.1:7878"
INTERRUPT_STATUS = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
KEPT = "any verified pieces are kept for the next get"


class Progress:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, name: str, stream: TextIO = sys.stderr) -> None:
        self.name, self.stream = name, stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self.shown = False

    def update(self, got: int, size: int) -> None:
        if not self.enabled:
            return
        fraction = got / size if size else 1.0
        width = 30
        bar = "#" * int(fraction * width) + "." * (width - int(fraction * width))
        rate = got / max(time.monotonic() - self.started, 1e-6) / 1e6
        self.stream.write(f"\r{self.name[:30]} [{bar}] {fraction:6.1%} {got / 1e6:9.1f} MB {rate:8.1f} MB/s")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.shown = False
            self.stream.write("\n")
            self.stream.flush()


def control_address(args: argparse.Namespace) -> tuple[str, int]:
    """--control, else the URL a daemon sharing --dir wrote in its state folder, else the default."""
    value = args.control
    if value is None and args.dir is not None:
        try:
            url = json.loads((Path(args.dir) / STATE_DIR / "control.json").read_text())["url"]
            value = urllib.parse.urlsplit(url).netloc
        except (OSError, ValueError, KeyError) as e:
            raise ControlError(f"no running peer found for {args.dir} ({describe(e)})") from None
    host, _, port = (value or DEFAULT_CONTROL).rpartition(":")
    if not host or not port.isdigit():
        raise ControlError(f"--control: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


TOKEN_FILE = "control.token"  # p2pshare.control.TOKEN_FILE (not imported: the CLI starts without Twisted)


def control_token(args: argparse.Namespace) -> Optional[str]:
    """The control API's token: from --token-file, else from the state folder of --dir, else of the
    peer's default folder (``files``) or the current one if either has it; None when there is none to try."""
    if args.token_file is not None:
        path, why = Path(args.token_file), "--token-file"
    elif args.dir is not None:
        path, why = Path(args.dir) / STATE_DIR / TOKEN_FILE, f"the peer sharing {args.dir}"
    else:
        found = [p for p in (Path("files") / STATE_DIR / TOKEN_FILE, Path(STATE_DIR) / TOKEN_FILE) if p.exists()]
        if not found:
            return None  # the peer will answer 401, and _json_reply says what to do
        path, why = found[0], "the peer's folder"
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, ValueError) as e:
        raise ControlError(f"cannot read the control token of {why}, {path} ({describe(e)}); only the user "
                           f"running the peer can use its control API") from None
    if not token:
        raise ControlError(f"the control token file {path} is empty")
    return token


def _request(address: tuple[str, int], method: str, path: str, body: Optional[dict[str, Any]] = None,
             timeout: float = 30.0, token: Optional[str] = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        conn.request(method, path, payload, headers)
        return conn.getresponse()
    except OSError as e:
        raise ControlError(f"no peer answers at {address[0]}:{address[1]} ({describe(e)}); is p2ppeer running?")


def _control(args: argparse.Namespace, method: str, path: str, body: Optional[dict[str, Any]] = None,
             timeout: float = 30.0) -> http.client.HTTPResponse:
    """A request to the control API that *args* designate (--control, --dir, --token-file)."""
    address = control_address(args)
    return _request(address, method, path, body, timeout, control_token(args))


def _json_reply(response: http.client.HTTPResponse) -> dict[str, Any]:
    try:
        data = json.loads(response.read())
    except ValueError:
        raise ControlError(f"the peer answered HTTP {response.status} with something that is not JSON") from None
    if response.status == 401:
        raise ControlError("the peer refused the request without its control token: give --dir DIR (the peer's "
                           "folder) or --token-file FILE (DIR/.p2pshare/control.token)")
    if response.status != 200:
        raise ControlError(data.get("message") or f"the peer answered HTTP {response.status}")
    return data


def _lines(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    for raw in response:
        if raw.strip():
            yield json.loads(raw)


def cmd_status(args: argparse.Namespace) -> int:
    status = _json_reply(_control(args, "GET", "/v1/status", timeout=args.timeout))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    tracker = status.get("tracker")
    print(f"peer:       {status['peer']}")
    print(f"address:    {status['host'] or '(unknown)'} udp {status['udp']} tcp {status['tcp']}")
    print(f"folder:     {status['dir']}")
    print(f"tracker:    {'connected' if tracker and tracker['connected'] else 'not connected' if tracker else 'none'}")
    print(f"neighbours: {len(status['neighbours'])}")
    print(f"files:      {status['files']}")
    for key, value in status["counters"].items():
        print(f"  {key}: {value}")
    return 0


def what(args: argparse.Namespace) -> tuple[str, str]:
    """(name, sha256) from NAME, ``sha256:HEX`` and ``--hash HEX``."""
    name, sha256 = args.name, getattr(args, "hash", None) or ""
    if name.startswith("sha256:"):
        name, sha256 = "", name[len("sha256:"):]
    sha256 = sha256.lower()
    if sha256 and not is_sha256(sha256):
        raise P2PError(f"{sha256!r} is not a SHA-256: 64 hexadecimal digits")
    return name, sha256


def cmd_search(args: argparse.Namespace) -> int:
    name, sha256 = what(args)
    query = urllib.parse.urlencode({"name": name, "sha256": sha256, "timeout": args.timeout})
    reply = _json_reply(_control(args, "GET", f"/v1/search?{query}", timeout=args.timeout + 30))
    if args.json:
        print(json.dumps(reply, indent=2))
    for hit in reply["hits"]:
        if not args.json:
            print(f"{hit['name']}\t{hit['size']}\t{hit['sha256'][:12]}\t{hit['tcp']}\t{hit['hops']} hop(s)")
    if not reply["hits"]:
        print(f"{args.name}: no peer has it", file=sys.stderr)
        return 1
    return 0


def _report(result: dict[str, Any]) -> None:
    print(f"{result['name']}: {result['size']} bytes from {result['holder']} in {result['seconds']:.2f}s, "
          f"SHA-256 {result['sha256'][:16]}... verified -> {result['path']}")


def cmd_get(args: argparse.Namespace) -> int:
    if args.tracker:
        return _get_with_own_peer(args)
    name, sha256 = what(args)
    response = _control(args, "POST", "/v1/get", {"name": name, "sha256": sha256, "timeout": args.timeout},
                        timeout=args.timeout + 60)
    if response.status != 200:
        _json_reply(response)
    bar = Progress(args.name)
    try:
        for event in _lines(response):
            if event["event"] == "progress":
                bar.update(event["received"], event["size"])
            elif event["event"] == "done":
                bar.close()
                _report(event)
                return 0
            elif event["event"] == "error":
                bar.close()
                print(f"p2pshare: {event['message']}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        bar.close()
        response.close()  # the peer sees us go and stops the download unless another fetch waits for it
        print(f"p2pshare: {args.name}: interrupted; the peer stops the download unless another fetch waits for "
              f"it; {KEPT}", file=sys.stderr)
        return INTERRUPT_STATUS
    finally:
        bar.close()
    raise ControlError(f"{args.name}: the peer closed the connection before the fetch ended")


def _get_with_own_peer(args: argparse.Namespace) -> int:
    """Run a temporary peer in this process for one fetch.

    The peer shares only what it downloads (``only_placed``): not the other files of the folder
    it writes into, which it neither hashes nor serves.  Ctrl-C stops the fetch, keeping its
    verified pieces, and exits with INTERRUPT_STATUS.
    """
    from twisted.internet import defer
    from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
    from twisted.internet.task import react
    from twisted.python.usage import UsageError

    from p2pshare.peer import Peer
    from p2pshare.tap import tracker_endpoint

    directory = Path(args.dir or ".")
    if not directory.is_dir():
        raise P2PError(f"--dir: {directory} is not a folder")

    async def run(reactor: Any) -> None:
        try:
            tracker = tracker_endpoint(reactor, args.tracker)
        except UsageError as e:
            print(f"p2pshare: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        peer = Peer(directory, tracker=tracker, interface="0.0.0.0", only_placed=True, reactor=reactor)
        bar = Progress(args.name)
        try:
            peer.startService()
            await peer.when_ready()
            assert peer.tracker is not None
            wait = min(args.timeout, 10.0)
            try:
                await peer.tracker.when_peers().addTimeout(wait, reactor)
            except (TimeoutError, defer.TimeoutError):
                raise P2PError(f"the tracker at {args.tracker} did not answer within {wait:g}s") from None
            name, sha256 = what(args)
            result = await peer.fetch(name, args.timeout, bar.update, sha256)
        except CancelledError:
            bar.close()
            print(f"p2pshare: {args.name}: interrupted; {KEPT}", file=sys.stderr)
            raise SystemExit(INTERRUPT_STATUS) from None
        except Exception as e:
            bar.close()
            print(f"p2pshare: {describe(e)}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            await peer.stopService()
        bar.close()
        _report({"name": result.name, "size": result.size, "holder": result.holder, "seconds": result.seconds,
                 "sha256": result.sha256, "path": result.path})

    def main(reactor: Any) -> Deferred[None]:
        running = ensureDeferred(run(reactor))
        over: Deferred[None] = Deferred()
        running.addBoth(lambda result: (over.callback(None), result)[1])

        def interrupted() -> Deferred[None]:
            """Ctrl-C (SIGINT) stops the reactor: first cancel the fetch and stop the peer."""
            running.cancel()  # does nothing once run has ended
            return over

        reactor.addSystemEventTrigger("before", "shutdown", interrupted)
        return running

    react(main)  # exits the process with run's status
    return 0  # not reached


def cmd_peers(args: argparse.Namespace) -> int:
    import socket

    from p2pshare.tap import host_port
    from p2pshare.wire import TrackerReply, TrackerRequest

    try:
        trackers = [host_port(t, "--tracker") for t in args.tracker]
    except Exception as e:
        raise P2PError(str(e)) from None
    failures = []
    for host, port in trackers:  # the first that answers
        try:
            with socket.create_connection((host, port), timeout=args.timeout) as sock:
                sock.sendall(TrackerRequest("peers", 1, max=args.max).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            break
        except OSError as e:
            failures.append(f"{host}:{port} ({describe(e)})")
    else:
        raise P2PError(f"no tracker answers at {', '.join(failures)}")
    reply = TrackerReply.decode(data.strip())
    if not reply.ok:
        raise P2PError(f"the tracker refused: {reply.message}")
    for p in reply.peers or ():
        print(f"{p.peer}\t{p.host}\tudp {p.udp}\ttcp {p.tcp}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A new network key: into a new file of mode 0600 (--out), or on stdout, made 0600 if it is a file."""
    import os
    import stat

    from p2pshare.netkey import NetworkKey, write_key

    key = NetworkKey.generate()
    if args.out is not None:
        write_key(args.out, key)  # refuses to overwrite
        return 0
    try:
        fd: Optional[int] = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):  # `keygen > net.key`: the shell made it 0644
        os.fchmod(fd, 0o600)
    sys.stdout.write(key.encode())
    sys.stdout.flush()
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    """Show the peer's bandwidth limits, or change them (--upload / --download RATE)."""
    body = {k: v for k, v in (("upload", args.upload), ("download", args.download)) if v is not None}
    if body:
        limits = _json_reply(_control(args, "POST", "/v1/limits", body, timeout=args.timeout))
    else:
        limits = _json_reply(_control(args, "GET", "/v1/limits", timeout=args.timeout))
    for direction in ("upload", "download"):
        rate = limits[direction]
        print(f"{direction}:{' ' * (9 - len(direction))}{f'{rate} bytes/s' if rate else 'unlimited'}")
    return 0


def dashboard_url(address: tuple[str, int], token: str) -> str:
    """The dashboard's address: the token rides in the fragment, which the browser never sends."""
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"http://{host}:{address[1]}/#token={token}"


def _can_open_browser() -> bool:
    """A graphical browser can show the page (not a text one taking over this terminal)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_ui(args: argparse.Namespace) -> int:
    address = control_address(args)
    token = control_token(args)
    if token is None:
        raise ControlError("no control token found: give --dir DIR (the peer's folder) or --token-file FILE")
    _json_reply(_request(address, "GET", "/v1/status", token=token, timeout=args.timeout))  # it runs, and takes it
    url = dashboard_url(address, token)
    print(url)
    print("(the address holds the peer's control token: keep it to yourself)", file=sys.stderr)
    if not args.no_browser and _can_open_browser():
        import webbrowser

        webbrowser.open(url)
    return 0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", default=argparse.SUPPRESS,
                        help=f"the peer's control API, HOST:PORT (default {DEFAULT_CONTROL})")
    common.add_argument("--dir", default=argparse.SUPPRESS,
                        help="the peer's shared folder (finds its control API and token; with get --tracker, "
                             "the target)")
    common.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                        help="the control API's token (default: DIR/.p2pshare/control.token with --dir)")
    p = argparse.ArgumentParser(prog="p2pshare", description="Search and fetch files on a p2pshare network.",
                                parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", parents=[common], help="show the running peer's state")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("search", parents=[common], help="list the peers that have NAME (or sha256:HEX)")
    s.add_argument("name", help="a file name, or sha256:HEX")
    s.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for answers (default 3)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)
    s = sub.add_parser("get", parents=[common], help="fetch NAME (or sha256:HEX) into the peer's folder")
    s.add_argument("name", help="a file name, or sha256:HEX for that content under whatever name it has")
    s.add_argument("--hash", metavar="HEX", help="the SHA-256 to fetch when holders of NAME disagree")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to find a holder (default 10)")
    s.add_argument("--tracker", help="run a temporary peer on this tracker instead of using a daemon")
    s.set_defaults(func=cmd_get)
    s = sub.add_parser("peers", help="ask a tracker for peers")
    s.add_argument("--tracker", required=True, action="append", help="HOST:PORT (repeatable: the first that answers)")
    s.add_argument("--max", type=int, default=20, choices=range(1, 101), metavar="1..100")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(func=cmd_peers)
    s = sub.add_parser("limits", parents=[common], help="show or change the running peer's bandwidth limits")
    s.add_argument("--upload", metavar="RATE", help="bytes a second for all uploads: 500k, 10M, 1.5MiB, 0 for none")
    s.add_argument("--download", metavar="RATE", help="bytes a second for all downloads")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_limits)
    s = sub.add_parser("ui", parents=[common], help="print the dashboard's address, and open it in a browser")
    s.add_argument("--no-browser", action="store_true", help="only print the address")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_ui)
    s = sub.add_parser("keygen", help="create a private network's key (give the file to --key)")
    s.add_argument("--out", metavar="FILE", help="create FILE (mode 0600, never overwritten) instead of printing")
    s.set_defaults(func=cmd_keygen)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("control", "dir", "token_file"):
        setattr(args, name, getattr(args, name, None))
    if getattr(args, "timeout", 1.0) <= 0:
        p.error("--timeout must be positive")
    try:
        return args.func(args)
    except (P2PError, ValueError) as e:
        print(f"p2pshare: {describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("p2pshare: interrupted", file=sys.stderr)
        return INTERRUPT_STATUS


def run() -> None:
    sys.exit(main())
