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
The same network runs at two rates, 40 and 100 Mbit/s: each repeat has one
round at each, in rotating order, the links reshaped in between.

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
only source); its total is the sum of the N fetch times.  It runs first, at
the first rate, and stands in for this benchmark's warm-up round (``--warmup N`` adds N - 1 swarm
rounds before the repeats).  Also reported: the holder's upload during the
swarm round as a multiple of F, from its ``bytes_sent`` counter (file bytes;
"n/a" while the peer has no such counter) and from the kernel's count of bytes
its eth0 sent (what used its link); and the CPU share: the CPU time of all
the daemons from the instant the peers ask to the last ``done``, divided by
that wall time and by ``os.cpu_count()``, to show whether CPU rather than the
links limited T.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

from benchmarks.daemons import STATE, BenchmarkError, cpu_seconds
from benchmarks.harness import Context, Figure, Goal, link_into
from benchmarks.swarm_helper import FETCH_TIMEOUT, READY_DEADLINE

BENCH = "3 swarm"
NAME = "swarm.bin"
REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PORT = 7000  # every peer's UDP and TCP port (each host has its own address)
TRACKER_PORT = 8000
START_MARGIN = 0.2  # seconds from "all the fetch helpers are ready" to the instant they all ask


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

    def set_rate(self, rate: int) -> None:
        """Shape every host's link to *rate* bits/s both ways (again, for a new rate)."""
        methods = {h.rate_limit(rate) for h in self.net.hosts}
        self.rate, self.shaping = rate, "/".join(sorted(methods))
        self.say(f"{len(self.net.hosts)} namespaces, every link {rate / 1e6:g} Mbit/s both ways ({self.shaping})")

    def _start(self) -> None:
        self.set_rate(self.rate)
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
                 "--port", str(PORT), "--control", "tcp:0:interface=127.0.0.1", "--refresh", "2", "--no-lan",
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

    def fetch(self, peers: Sequence[int], at_instant: Optional[Callable[[], None]] = None,
              ) -> tuple[float, dict[int, dict[str, Any]]]:
        """*peers* all ask for the file at one instant; (that instant, each helper's result).

        Each helper starts, checks that its peer answers, says so and waits for the instant on its
        stdin; the instant is set once all are ready (slow starts on a busy machine do not count).
        *at_instant* is called at that instant, here.
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
        if at_instant is not None:
            time.sleep(max(0.0, at - time.time()))
            at_instant()
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
        """The CPU time of every daemon (tracker, holder, peers) so far."""
        return sum(cpu_seconds(d.proc.pid) for d in self.net.daemons)

    # -- one measurement ----------------------------------------------------------------------

    def swarm_round(self) -> dict[str, Any]:
        """Every peer asks at once; T, the holder's upload and the daemons' CPU over the round.

        The CPU share is the daemons' CPU time from the instant the peers ask until every helper has
        reported, over that wall time and every core.
        """
        peers = list(range(1, self.peers + 1))
        self.clear(peers)
        before = self.status(0)["counters"]
        tx0 = self.host(0).tx_bytes()
        start: list[float] = []
        at, results = self.fetch(peers, lambda: start.extend((time.monotonic(), self.cpu_seconds())))
        cpu, wall = self.cpu_seconds() - start[1], time.monotonic() - start[0]
        ended = max(r["ended_wall"] for r in results.values())
        tx = self.host(0).tx_bytes() - tx0
        after = self.status(0)["counters"]
        problems = self.problems(peers)
        sent = (after["bytes_sent"] - before.get("bytes_sent", 0)) if "bytes_sent" in after else None
        seconds = ended - at
        return {"T": seconds, "late": max(r["started_wall"] - at for r in results.values()),
                "load": os.getloadavg()[0],
                "problems": problems, "results": results,
                "bytes_sent": sent, "tx_bytes": tx, "cpu": cpu, "cpu_share": cpu / (wall * (os.cpu_count() or 1)),
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


RATES = (40_000_000, 100_000_000)  # bits/s, every link, both ways; the first also runs the sequential baseline


def _mbit(rate: int) -> str:
    return f"{rate / 1e6:g} Mbit/s"


def run(ctx: Context) -> list[Figure]:
    peers = ctx.size(8, 4, 2)
    size = ctx.size(64 << 20, 16 << 20, 2 << 20)
    label = f"{peers} peers x {size >> 20} MiB"
    reason = unavailable_reason()
    if reason is not None:
        return [Figure(BENCH, f"T / T_min at {_mbit(rate)}, {label}", "", [], Goal("<=", 1.3), status="skipped",
                       note=f"not measured: {reason}") for rate in RATES]
    source = ctx.random_file(size)
    with Swarm(ctx.folder("swarm"), peers, RATES[0], source, say=ctx.say) as swarm:
        ctx.say(f"baseline: {peers} sequential single-source downloads at {_mbit(RATES[0])} (also the warm-up)")
        seq = swarm.sequential()
        ctx.say(f"sequential total {seq['total']:.1f} s: {seq['each']}")

        def once(i: int) -> dict[int, dict[str, Any]]:
            order = list(RATES[i % len(RATES):] + RATES[: i % len(RATES)])  # rotate, so no rate always goes first
            out = {}
            for rate in order:
                if swarm.rate != rate:
                    swarm.set_rate(rate)
                out[rate] = _round(ctx, swarm, kumar_ross(size, rate, [rate] * peers, rate))
            return out

        warmups = ctx.warmup
        ctx.warmup = max(0, warmups - 1)  # the sequential baseline was the first warm-up round
        try:
            rounds = ctx.repeat(once)
        finally:
            ctx.warmup = warmups
        shaping = swarm.shaping
    figures = []
    for rate in RATES:
        figures += _figures(peers, size, rate, [r[rate] for r in rounds], shaping)
        if rate == RATES[0]:
            ts = [r[rate]["T"] for r in rounds]
            figures += [
                Figure(BENCH, f"{peers} sequential single-source downloads at {_mbit(rate)}, total", "s",
                       [seq["total"]], note=f"each fetch alone from the holder (s): {seq['each']}"),
                Figure(BENCH, f"speed-up at {_mbit(rate)}: sequential / T", "x", [seq["total"] / t for t in ts]),
            ]
    return figures


def _figures(peers: int, size: int, rate: int, rounds: list[dict[str, Any]], shaping: str) -> list[Figure]:
    """The figures of the swarm rounds at one *rate*."""
    at = f"at {_mbit(rate)}"
    t_min = kumar_ross(size, rate, [rate] * peers, rate)
    ts = [r["T"] for r in rounds]
    shaped = f"holder + {peers} peers + tracker in network namespaces, every link {_mbit(rate)} both ways, " \
             f"shaped by {shaping}"
    sent = [r["bytes_sent"] / size for r in rounds if r["bytes_sent"] is not None]
    sources = sorted({s for r in rounds for s in r["sources"].values()})
    upload_goal = Goal("<=", 1.15) if rate == 40_000_000 else None
    figures = [
        Figure(BENCH, f"T: {peers} peers get {size >> 20} MiB at once {at}", "s", ts,
               note=f"{shaped}; sources per download: {sources}; per peer (last repeat): {rounds[-1]['each']}; "
                    f"load average after each round: {[round(r['load'], 1) for r in rounds]}"),
        Figure(BENCH, f"T_min (Kumar-Ross bound) {at}", "s", [t_min] * len(ts),
               note="max(F/u_s, F/d_min, N F/(u_s + sum u_i)) with every rate R: F/R"),
        Figure(BENCH, f"T / T_min {at}", "x", [t / t_min for t in ts], Goal("<=", 1.3)),
    ]
    if sent:
        figures.append(Figure(BENCH, f"holder upload (bytes_sent) / F {at}", "x", sent, upload_goal))
    else:
        figures.append(Figure(BENCH, f"holder upload (bytes_sent) / F {at}", "", [], upload_goal, status="n/a",
                              note="the peer has no bytes_sent counter in /v1/status yet"))
    figures += [
        Figure(BENCH, f"holder eth0 bytes sent / F {at}", "x", [r["tx_bytes"] / size for r in rounds],
               note="the kernel's count of what left the holder's eth0 (IP packets, headers once per GSO packet; "
                    "searches and acknowledgements included): what used its link; bytes_sent counts a range once it "
                    "is handed to the connection, also if the connection then closes before sending it all"),
        Figure(BENCH, f"daemons' CPU share {at}", "%", [100 * r["cpu_share"] for r in rounds],
               note=f"user + system time of the {peers + 2} daemons from the instant the peers ask to the last "
                    f"done, over that wall time x {os.cpu_count()} cores: near 100 % means CPU, not the links, "
                    "limited T"),
    ]
    return figures


def _round(ctx: Context, swarm: Swarm, t_min: float) -> dict[str, Any]:
    r = swarm.swarm_round()
    if r["problems"]:
        raise BenchmarkError("; ".join(r["problems"]))
    sent = "n/a" if r["bytes_sent"] is None else f"{r['bytes_sent'] / swarm.size:.2f} F"
    ctx.say(f"{_mbit(swarm.rate)}: T {r['T']:.2f} s = {r['T'] / t_min:.2f} T_min; holder sent {sent} "
            f"({r['tx_bytes'] / swarm.size:.2f} F on the wire); CPU share {100 * r['cpu_share']:.0f} %; "
            f"start spread {r['late'] * 1000:.0f} ms")
    return r


if __name__ == "__main__":  # the helper inside each namespace: python -m benchmarks.swarm fetch|wait|status
    from benchmarks.swarm_helper import helper

    sys.exit(helper(sys.argv[1:]))
