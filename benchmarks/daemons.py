"""Running p2pshare as a user would: ``twistd`` peers and trackers as subprocesses.

Peers are driven through their control API (``POST /v1/get``, ``GET
/v1/status``), exactly what the ``p2pshare`` command does; memory is read from
``/proc/PID/status``, CPU time from ``/proc/PID/stat``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from attrs import define

from benchmarks.harness import Context

STATE = ".p2pshare"
START_DEADLINE = 60.0


class BenchmarkError(Exception):
    """A benchmark could not produce its figure (a daemon died, a fetch failed, ...)."""


def tool(name: str) -> str:
    """The console script beside this interpreter (the project's .venv)."""
    beside = Path(sys.executable).parent / name
    if not beside.exists():
        raise BenchmarkError(f"{beside} is missing: run `make bench`, which installs the project into .venv")
    return str(beside)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Port numbers free for both TCP and UDP on *host* (all held at once, so all distinct)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind((host, 0))
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind((host, tcp.getsockname()[1]))
            except OSError:
                continue
            ports.append(tcp.getsockname()[1])
    finally:
        for s in held:
            s.close()
    return ports


def wait_for(check: Any, what: str, deadline: float = START_DEADLINE, proc: Optional[subprocess.Popen[bytes]] = None,
             every: float = 0.005) -> Any:
    """Poll *check* until it returns something truthy; fail if *proc* dies or time runs out."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise BenchmarkError(f"{what}: the process exited with status {proc.returncode}")
        if time.monotonic() > end:
            raise BenchmarkError(f"{what}: not within {deadline:g}s")
        time.sleep(every)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/PID/status, in KiB (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"no {field} for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def thread_cpu_seconds() -> float:
    """User + system CPU time of the calling thread (of the whole process where Linux's
    ``RUSAGE_THREAD`` is missing)."""
    import resource

    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux 4.0+: ``5`` to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@define
class PeerDaemon:
    """A ``twistd p2ppeer`` subprocess and how to reach it."""

    proc: subprocess.Popen[bytes]
    folder: Path
    port: int  # UDP and TCP
    started: float  # time.monotonic() just before it was spawned

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> Optional["ControlClient"]:
        """A control client once the peer has listened, indexed its folder and said so (peer.json)."""
        try:
            info = json.loads((self.folder / STATE / "peer.json").read_text())
            url = json.loads((self.folder / STATE / "control.json").read_text())["url"]
            token = (self.folder / STATE / "control.token").read_text().strip()
        except (OSError, ValueError, KeyError):
            return None
        if info.get("pid") != self.pid:
            return None
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        return ControlClient(host, int(port), token)


def start_peer(ctx: Context, folder: Path, port: int, peers: Sequence[int] = (), label: str = "peer",
               extra: Sequence[str] = (), key: Optional[Path] = None) -> PeerDaemon:
    """Start ``twistd -n p2ppeer`` sharing *folder* on 127.0.0.1:*port*, knowing *peers* (ports);
    with *key* (a file from :func:`keygen`), a member of that private network."""
    for stale in ("peer.json", "control.json"):
        (folder / STATE / stale).unlink(missing_ok=True)
    args = [tool("twistd"), "-n", "--pidfile=", "p2ppeer", "--dir", str(folder), "--port", str(port),
            "--interface", "127.0.0.1", "--control", "tcp:0:interface=127.0.0.1", "--rescan", "3600"]
    for p in peers or (9,):  # a peer needs a neighbour or a tracker; port 9 (discard) is never asked
        args += ["--peer", f"127.0.0.1:{p}"]
    if key is not None:
        args += ["--key", str(key)]
    started = time.monotonic()
    proc = ctx.procs.start([*args, *extra], ctx.folder("logs") / f"{label}.log", cwd=ctx.folder("logs"))
    return PeerDaemon(proc, folder, port, started)


def keygen(ctx: Context, name: str = "network.key") -> Path:
    """A new private network's key file, made by ``p2pshare keygen`` as a user would."""
    path = ctx.folder("keys") / name
    if not path.exists():
        done = subprocess.run([tool("p2pshare"), "keygen", "--out", str(path)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BenchmarkError(f"p2pshare keygen failed: {done.stderr.strip()}")
    return path


def wait_ready(peer: PeerDaemon, files: Optional[int] = None, deadline: float = START_DEADLINE) -> "ControlClient":
    """Wait until *peer* is ready (and, if given, its status shows *files* shared files)."""
    client: ControlClient = wait_for(peer.ready, f"peer in {peer.folder}", deadline, peer.proc)
    if files is not None:
        wait_for(lambda: client.status()["files"] == files, f"{files} files indexed", deadline, peer.proc)
    return client


def start_tracker(ctx: Context, port: int, interval: float, label: str = "tracker",
                  registry: str = "memory") -> subprocess.Popen[bytes]:
    """``twistd -n p2ptracker`` on 127.0.0.1:*port*; returns once it accepts connections."""
    args = [tool("twistd"), "-n", "--pidfile=", "p2ptracker", "--port", f"tcp:{port}:interface=127.0.0.1",
            "--max-peers", "20", "--interval", f"{interval:g}", "--registry", registry,
            # every benchmark client connects from 127.0.0.1: lift the per-address limit
            "--max-per-address", "1000000"]
    proc = ctx.procs.start(args, ctx.folder("logs") / f"{label}.log", cwd=ctx.folder("logs"))
    wait_for(lambda: can_connect("127.0.0.1", port), "the tracker to listen", proc=proc)
    return proc


def can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False


class ControlClient:
    """The control API of one peer over one kept-alive HTTP connection, with the peer's token."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.address = (host, port)
        self.headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
        self._conn: Optional[http.client.HTTPConnection] = None

    def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None,
                 timeout: float = 600.0) -> http.client.HTTPResponse:
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(*self.address, timeout=timeout)
            try:
                payload = json.dumps(body).encode() if body is not None else None
                self._conn.request(method, path, payload, self.headers)
                return self._conn.getresponse()
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def status(self) -> dict[str, Any]:
        try:
            response = self._request("GET", "/v1/status", timeout=10.0)
            return json.loads(response.read())  # type: ignore[no-any-return]
        except (OSError, http.client.HTTPException, ValueError):
            self.close()
            return {"files": None}

    def get(self, name: str, timeout: float = 600.0) -> dict[str, Any]:
        """``POST /v1/get``; returns the ``done`` event once the file is verified and in place."""
        response = self._request("POST", "/v1/get", {"name": name, "timeout": timeout}, timeout)
        last: dict[str, Any] = {}
        for raw in response:
            if raw.strip():
                last = json.loads(raw)
        if last.get("event") != "done":
            raise BenchmarkError(f"fetching {name} failed: {last}")
        return last

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def remove_fetched(folder: Path, names: Sequence[str]) -> None:
    """Delete downloaded files so that the next repeat fetches them again."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    for leftover in (folder / STATE / "tmp").glob("*"):
        leftover.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
