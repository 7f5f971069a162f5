"""Benchmark 3, swarm distribution: the Kumar-Ross figure of issue 5.

One file of F bytes, one holder, N peers that all ask for it at the same moment.
With the holder's upload u_s, the peers' uploads u_i and the slowest download
d_min, no schedule can give every peer the whole file before (Kumar and Ross)

    T_min = max(F / u_s, F / d_min, N F / (u_s + sum u_i)).

The network: one Linux network namespace per host (tests/netns.py: a bridge in
a switch namespace, 10.213.0.0/24), a tracker on host 0, the holder on host 1,
peers on hosts 2 .. N + 1, each a ``twistd -n p2ppeer`` daemon as in
tests/test_multihost.py.  Every host's link is limited to the same rate R in
both directions (``Host.rate_limit``: a ``tc tbf`` on the host's eth0 and one on
its bridge port, or nftables policing where tbf is missing; the figures' notes
say which ran), so u_s = u_i = d_min = R and T_min = F / R (F in bits).  tbf
counts whole frames, so TCP/IP headers alone keep T / T_min above about 1.05.

Each round: every peer's file is deleted (and gone from its index), then a
helper process starts in each peer's namespace (``python -m benchmarks.swarm
fetch``, this module), checks that its peer answers and says it is ready; once
all are, the benchmark hands them one wall-clock instant (on their stdin), at
which each sends ``POST /v1/get`` to its peer's control API.  T runs from that
instant to the last peer's ``done`` line (its file verified and in place);
afterwards the benchmark checks the SHA-256 of every copy and that no partial
download is left.

Baseline, in the same run on the same network: the N peers fetch the file one
after another, each alone (the others' copies deleted, so the holder is the
only source); its total is the sum of the N fetch times.  It runs first and
stands in for this benchmark's warm-up round (``--warmup N`` adds N - 1 swarm
rounds before the repeats).  Also reported: the holder's upload during the
swarm round as a multiple of F, from its ``bytes_sent`` counter (file bytes;
"n/a" while the peer has no such counter) and from the kernel's count of bytes
its eth0 sent (what used its link); and the CPU time of all the daemons
during T as a share of the machine, to show whether CPU rather than the links
limited T.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

from benchmarks.daemons import STATE, BenchmarkError, ControlClient
from benchmarks.harness import Context, Figure, Goal, link_into

BENCH = "3 swarm"
NAME = "swarm.bin"
REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PORT = 7000  # every peer's UDP and TCP port (each host has its own address)
TRACKER_PORT = 8000
FETCH_TIMEOUT = 600.0
START_MARGIN = 0.2  # seconds from "all the fetch helpers are ready" to the instant they all ask
READY_DEADLINE = 60.0


def kumar_ross(size: int, server_up: float, peer_ups: Sequence[float], min_down: float) -> float:
    """T_min in seconds for *size* bytes, rates in bits per second (Kumar and Ross)."""
    bits = 8 * size
    return max(bits / server_up, bits / min_down, len(peer_ups) * bits / (server_up + sum(peer_ups)))


def _netns() -> ModuleType:
    """tests/netns.py, the namespace harness the multi-host tests use."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import netns

    return netns


def unavailable_reason() -> Optional[str]:
    """Why the namespaces cannot be built here (not root, tools missing, ...), or None."""
    try:
        netns = _netns()
    except ImportError as e:  # tests/netns.py needs pytest (the [test] extra)
        return f"cannot import tests/netns.py: {e}"
    reason: Optional[str] = netns.unavailable_reason()
    return reason


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Swarm:
    """A tracker, a holder of one file and *peers* peers, each in its own rate-limited namespace.

    Use it as a context manager: the namespaces and every process in them go at the end,
    also when the body raises.  Peer k (1 .. peers) shares ``root/p<k>``, the holder ``root/holder``.
    """

    def __init__(self, root: Path, peers: int, rate: int, source: Path, name: str = NAME,
                 say: Callable[[str], None] = lambda _: None, fetch_timeout: float = FETCH_TIMEOUT) -> None:
        self.root, self.peers, self.rate, self.source, self.name, self.say = root, peers, rate, source, name, say
        self.fetch_timeout = fetch_timeout
        self.size = source.stat().st_size
        self.sha256 = ""
        self.shaping = ""
        self.net: Any = None

    # -- the network --------------------------------------------------------------------------

    def __enter__(self) -> "Swarm":
        netns = _netns()
        self.root.mkdir(parents=True, exist_ok=True)
        self.net = netns.TestNetwork(self.peers + 2, self.root)
        self.net.__enter__()
        try:
            self._start()
        except BaseException:
            self.net.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.net.close()

    def dir(self, k: int) -> Path:
        """The shared folder of peer *k* (0: the holder)."""
        return self.root / ("holder" if k == 0 else f"p{k}")

    def host(self, k: int) -> Any:
        """The namespace host of peer *k* (0: the holder); the tracker is on host 0."""
        return self.net.hosts[k + 1]

    @property
    def holder_address(self) -> str:
        return f"{self.host(0).ip}:{PORT}"

    def _start(self) -> None:
        methods = {h.rate_limit(self.rate) for h in self.net.hosts}
        self.shaping = "/".join(sorted(methods))
        self.say(f"{len(self.net.hosts)} namespaces, every link {self.rate / 1e6:g} Mbit/s both ways ({self.shaping})")
        self.sha256 = _sha256(self.source)
        for k in range(self.peers + 1):
            self.dir(k).mkdir(parents=True, exist_ok=True)
        link_into(self.source, self.dir(0), self.name)
        tracker = self.net.hosts[0]
        tracker.start_daemon("tracker", ["p2ptracker", "--port", f"tcp:{TRACKER_PORT}", "--interval", "2"],
                             self.root)
        for k in range(self.peers + 1):
            self.host(k).start_daemon(
                "holder" if k == 0 else f"p{k}",
                ["p2ppeer", "--tracker", f"{tracker.ip}:{TRACKER_PORT}", "--dir", str(self.dir(k)),
                 "--port", str(PORT), "--control", "tcp:0:interface=127.0.0.1", "--refresh", "2",
                 # deleted copies must leave the index quickly, between rounds
                 "--rescan", "1"], self.root)
        self.wait_all(lambda k: 1 if k == 0 else 0, connected=True)

    def logs(self, tail: int = 1500) -> str:
        return "".join(f"\n--- {d.name} ({'alive' if d.alive() else f'exited {d.proc.returncode}'})\n"
                       f"{d.output(tail)}" for d in self.net.daemons)

    # -- helpers inside the namespaces --------------------------------------------------------

    def _helper(self, k: int, *args: str) -> subprocess.Popen[str]:
        return self.host(k).popen(sys.executable, "-m", "benchmarks.swarm", *args, "--dir", str(self.dir(k)),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def _collect(self, procs: dict[int, subprocess.Popen[str]], timeout: float) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        end = time.monotonic() + timeout
        for k, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise BenchmarkError(f"the helper of peer {k} did not finish within {timeout:g}s{self.logs()}")
            lines = stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                raise BenchmarkError(f"the helper of peer {k} failed ({proc.returncode}): "
                                     f"{(stdout + stderr)[-2000:]}{self.logs()}")
            out[k] = json.loads(lines[-1])
        return out

    def status(self, k: int) -> dict[str, Any]:
        return self._collect({k: self._helper(k, "status")}, 30.0)[k]

    def wait_all(self, files: Callable[[int], int], connected: bool = False,
                 peers: Optional[Sequence[int]] = None) -> None:
        """Until each peer (of *peers*; default all and the holder) shares files(k) files."""
        ks = range(self.peers + 1) if peers is None else peers
        procs = {k: self._helper(k, "wait", "--files", str(files(k)), "--deadline", str(READY_DEADLINE),
                                 *(["--connected"] if connected else [])) for k in ks}
        self._collect(procs, READY_DEADLINE + 30)

    def clear(self, peers: Optional[Sequence[int]] = None) -> None:
        """Delete the peers' copies and wait until their indexes no longer list them."""
        ks = [k for k in (range(1, self.peers + 1) if peers is None else peers)
              if (self.dir(k) / self.name).exists()]
        for k in ks:
            (self.dir(k) / self.name).unlink()
        if ks:
            self.wait_all(lambda k: 0, peers=ks)

    def fetch(self, peers: Sequence[int]) -> tuple[float, dict[int, dict[str, Any]]]:
        """*peers* all ask for the file at one instant; (that instant, each helper's result).

        Each helper starts, checks that its peer answers, says so and waits for the instant on its
        stdin; the instant is set once all are ready (slow starts on a busy machine do not count).
        """
        timeout = self.fetch_timeout
        procs: dict[int, subprocess.Popen[str]] = {}
        for k in peers:
            proc = subprocess.Popen(
                self.host(k).command(sys.executable, "-m", "benchmarks.swarm", "fetch", "--name", self.name,
                                     "--timeout", str(timeout), "--dir", str(self.dir(k))),
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.net.processes.append(proc)  # killed at the end whatever happens
            procs[k] = proc
        for k, proc in procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the helper writes nothing more until it has the instant
            if not line.startswith("{") or "ready" not in json.loads(line):
                raise BenchmarkError(f"the fetch helper of p{k} did not start: {line}{self.logs()}")
        at = time.time() + START_MARGIN
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write(f"{at!r}\n")
            proc.stdin.flush()
        results = self._collect(procs, timeout + 60)
        failed = {k: r for k, r in results.items() if r.get("event") != "done"}
        if failed:
            raise BenchmarkError(f"fetches failed: {failed}{self.logs()}")
        return at, results

    def problems(self, peers: Optional[Sequence[int]] = None, settle: float = 5.0) -> list[str]:
        """What is wrong with the peers' copies: missing, different bytes, anything else in their
        folders, partial downloads left in their state folders (given *settle* seconds to go)."""
        ks = list(range(1, self.peers + 1) if peers is None else peers)
        found = []
        for k in ks:
            path = self.dir(k) / self.name
            if not path.is_file():
                found.append(f"p{k}: no {self.name}")
            elif path.stat().st_size != self.size or _sha256(path) != self.sha256:
                found.append(f"p{k}: {self.name} differs from the original")
        end = time.monotonic() + settle
        while True:
            left = {k: sorted([p.name for p in (self.dir(k) / STATE / "tmp").glob("*")]
                              + [p.name for p in self.dir(k).iterdir() if p.name not in (self.name, STATE)])
                    for k in ks}
            left = {k: names for k, names in left.items() if names}
            if not left or time.monotonic() > end:
                break
            time.sleep(0.1)
        return found + [f"p{k}: partial or stray files left: {names}" for k, names in left.items()]

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(d.proc.pid) for d in self.net.daemons)

    # -- one measurement ----------------------------------------------------------------------

    def swarm_round(self) -> dict[str, Any]:
        """Every peer asks at once; T, the holder's upload and the daemons' CPU over the round."""
        peers = list(range(1, self.peers + 1))
        self.clear(peers)
        before = self.status(0)["counters"]
        tx0, cpu0 = self.host(0).tx_bytes(), self.cpu_seconds()
        at, results = self.fetch(peers)
        ended = max(r["ended_wall"] for r in results.values())
        cpu = self.cpu_seconds() - cpu0
        tx = self.host(0).tx_bytes() - tx0
        after = self.status(0)["counters"]
        problems = self.problems(peers)
        sent = (after["bytes_sent"] - before.get("bytes_sent", 0)) if "bytes_sent" in after else None
        seconds = ended - at
        return {"T": seconds, "late": max(r["started_wall"] - at for r in results.values()),
                "load": os.getloadavg()[0],
                "problems": problems, "results": results,
                "bytes_sent": sent, "tx_bytes": tx, "cpu": cpu,
                "sources": {k: r["done"].get("sources", 1) for k, r in results.items()},
                "each": {k: round(r["ended_wall"] - at, 3) for k, r in results.items()}}

    def sequential(self) -> dict[str, Any]:
        """The peers fetch the file one after another, each from the holder alone."""
        peers = list(range(1, self.peers + 1))
        self.clear(peers)
        times: list[float] = []
        for k in peers:
            at, results = self.fetch([k])
            done = results[k]["done"]
            if done.get("holder") != self.holder_address:
                raise BenchmarkError(f"p{k} fetched from {done.get('holder')}, not the holder alone")
            times.append(results[k]["ended_wall"] - at)
            problems = self.problems([k])
            if problems:
                raise BenchmarkError("; ".join(problems))
            self.clear([k])
        return {"total": sum(times), "each": [round(t, 3) for t in times]}


# -- the benchmark ----------------------------------------------------------------------------------


def run(ctx: Context) -> list[Figure]:
    peers = ctx.size(8, 4, 2)
    size = ctx.size(64 << 20, 16 << 20, 2 << 20)
    # bits/s, every link, both ways: slow enough that the links, not the 2 cores running 9 daemons, limit T
    rate = ctx.size(40_000_000, 100_000_000, 100_000_000)
    t_min = kumar_ross(size, rate, [rate] * peers, rate)
    label = f"{peers} peers x {size >> 20} MiB at {rate / 1e6:g} Mbit/s"
    reason = unavailable_reason()
    if reason is not None:
        return [Figure(BENCH, f"T / T_min, {label}", "", [], Goal("<=", 1.5), status="skipped",
                       note=f"not measured: {reason}")]
    source = ctx.random_file(size)
    with Swarm(ctx.folder("swarm"), peers, rate, source, say=ctx.say) as swarm:
        ctx.say(f"baseline: {peers} sequential single-source downloads (also the warm-up)")
        seq = swarm.sequential()
        ctx.say(f"sequential total {seq['total']:.1f} s: {seq['each']}")
        warmups = ctx.warmup
        ctx.warmup = max(0, warmups - 1)  # the sequential baseline was the first warm-up round
        try:
            rounds = ctx.repeat(lambda i: _round(ctx, swarm, t_min))
        finally:
            ctx.warmup = warmups
        shaping = swarm.shaping
    ts = [r["T"] for r in rounds]
    shaped = f"{label}, holder + {peers} peers + tracker in network namespaces, links shaped by {shaping}"
    sent = [r["bytes_sent"] / size for r in rounds if r["bytes_sent"] is not None]
    sources = sorted({s for r in rounds for s in r["sources"].values()})
    figures = [
        Figure(BENCH, f"T: {peers} peers get {size >> 20} MiB at once", "s", ts,
               note=f"{shaped}; sources per download: {sources}; per peer (last repeat): {rounds[-1]['each']}; "
                    f"load average after each round: {[round(r['load'], 1) for r in rounds]}"),
        Figure(BENCH, "T_min (Kumar-Ross bound)", "s", [t_min] * len(ts),
               note="max(F/u_s, F/d_min, N F/(u_s + sum u_i)) with every rate R: F/R"),
        Figure(BENCH, "T / T_min", "x", [t / t_min for t in ts], Goal("<=", 1.5)),
        Figure(BENCH, f"{peers} sequential single-source downloads, total", "s", [seq["total"]],
               note=f"each fetch alone from the holder (s): {seq['each']}"),
        Figure(BENCH, "speed-up: sequential / T", "x", [seq["total"] / t for t in ts]),
    ]
    if sent:
        figures.append(Figure(BENCH, "holder upload (bytes_sent) / F", "x", sent))
    else:
        figures.append(Figure(BENCH, "holder upload (bytes_sent) / F", "", [], status="n/a",
                              note="the peer has no bytes_sent counter in /v1/status yet"))
    figures += [
        Figure(BENCH, "holder eth0 bytes sent / F", "x", [r["tx_bytes"] / size for r in rounds],
               note="the kernel's count of what left the holder's eth0 (IP packets, headers once per GSO packet; "
                    "searches and acknowledgements included): what used its link; bytes_sent counts a range once it "
                    "is handed to the connection, also if the connection then closes before sending it all"),
        Figure(BENCH, "daemons' CPU during T, share of all cores", "%",
               [100 * r["cpu"] / (r["T"] * (os.cpu_count() or 1)) for r in rounds],
               note=f"user + system time of the {peers + 2} daemons over {os.cpu_count()} cores: "
                    "near 100 % means CPU, not the links, limited T"),
    ]
    return figures


def _round(ctx: Context, swarm: Swarm, t_min: float) -> dict[str, Any]:
    r = swarm.swarm_round()
    if r["problems"]:
        raise BenchmarkError("; ".join(r["problems"]))
    sent = "n/a" if r["bytes_sent"] is None else f"{r['bytes_sent'] / swarm.size:.2f} F"
    ctx.say(f"T {r['T']:.2f} s = {r['T'] / t_min:.2f} T_min; holder sent {sent} "
            f"({r['tx_bytes'] / swarm.size:.2f} F on the wire); start spread {r['late'] * 1000:.0f} ms")
    return r


# -- the helper run inside each namespace (python -m benchmarks.swarm ...) --------------------------


def _control(directory: str) -> ControlClient:
    """A client of the control API of the peer sharing *directory* (with its token, when it keeps one)."""
    state = Path(directory) / STATE
    url = json.loads((state / "control.json").read_text())["url"]
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    token = state / "control.token"
    return ControlClient(host, int(port), *([token.read_text().strip()] if token.exists() else []))


def helper(argv: Sequence[str]) -> int:
    """``status``, ``wait`` (until the peer shares --files files) or ``fetch`` (at the time.time() read
    from stdin, once it has said it is ready)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.swarm")
    p.add_argument("command", choices=("status", "wait", "fetch"))
    p.add_argument("--dir", required=True)
    p.add_argument("--files", type=int)
    p.add_argument("--connected", action="store_true", help="wait: also registered with the tracker")
    p.add_argument("--deadline", type=float, default=READY_DEADLINE)
    p.add_argument("--name")
    p.add_argument("--timeout", type=float, default=FETCH_TIMEOUT)
    args = p.parse_args(argv)
    if args.command == "fetch":
        client = _control(args.dir)
        if client.status().get("counters") is None:  # the peer answers (and the imports are done)
            print(json.dumps({"event": "error", "message": "the control API does not answer"}))
            return 0
        client.close()  # get() opens its own connection, with the fetch's timeout
        print(json.dumps({"ready": time.time()}), flush=True)
        at = float(sys.stdin.readline())  # the instant, once every helper is ready
        time.sleep(max(0.0, at - time.time()))
        out: dict[str, Any] = {"started_wall": time.time()}
        try:
            out.update(event="done", done=client.get(args.name, args.timeout))
        except Exception as e:
            out.update(event="error", message=f"{type(e).__name__}: {e}")
        out["ended_wall"] = time.time()
        print(json.dumps(out))
        return 0
    end = time.monotonic() + args.deadline
    status: dict[str, Any] = {}
    while True:
        try:
            status = _control(args.dir).status()
        except (OSError, ValueError, KeyError):
            status = {"files": None}  # not started yet
        if args.command == "status" and status.get("counters") is not None:
            break
        if args.command == "wait" and status.get("files") == args.files and (
                not args.connected or (status.get("tracker") or {}).get("connected")):
            break
        if time.monotonic() > end:
            print(f"not within {args.deadline:g}s: {args.command} {argv}; last status {status}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(json.dumps(status))
    return 0


if __name__ == "__main__":
    sys.exit(helper(sys.argv[1:]))
