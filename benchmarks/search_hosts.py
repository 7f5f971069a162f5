"""Benchmark 4, search on separate hosts: ten peers in network namespaces, the holder five hops away.

The network is the multi-host tests' (tests/netns.py): one namespace per host on a
bridge, no loss, no shaping.  Host 0 runs ``twistd -n p2ptracker``; hosts 2-10 run
``twistd -n p2ppeer --neighbours 0`` with static ``--peer`` links to the previous and
the next host, a ring, so that peer 6, which holds the file, is five hops from peer 1
whichever way round.  Peer 1, the searcher, is a library peer (``start_peer``, the
same options) inside this module's helper process in host 1: the time to the first hit
is taken when its hit datagram is handled, with no control API or polling in between.
Searches run one after the other, 100 ms apart, each for up to a second.

    python -m benchmarks --only search_hosts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.daemons import BenchmarkError, wait_for
from benchmarks.harness import Context, Figure, Goal, quantile
from benchmarks.swarm import PORT, REPO, TESTS, TRACKER_PORT, _netns, unavailable_reason

BENCH = "4 search"
PEERS = 10
SEARCHER, HOLDER = 1, 6  # antipodes on the ring: five hops either way
NAME = "ring/far.bin"
WINDOW = 1.0  # seconds a search waits for its first hit
DRIVER = TESTS / "netns_driver.py"


def ring_neighbours(k: int) -> tuple[int, int]:
    return (k - 2) % PEERS + 1, k % PEERS + 1


def run(ctx: Context) -> list[Figure]:
    searches = ctx.size(100, 40, 5)
    warmup = ctx.size(5, 3, 1) if ctx.warmup else 0
    title = "first hit on separate hosts"
    reason = unavailable_reason()
    if reason is not None:
        return [Figure(BENCH, f"{title}, p95", "ms", [], Goal("<=", 25), status="skipped",
                       note=f"not measured: {reason}")]
    samples: dict[str, list[float]] = {"med": [], "p95": [], "hops": []}
    for i in range(ctx.repeats):
        ctx.say(f"separate hosts, repeat {i + 1}/{ctx.repeats}: {PEERS} namespaces, {warmup} + {searches} searches")
        r = _one_network(ctx, ctx.folder(f"search-hosts-{i + 1}"), searches, warmup)
        hits = [x["ms"] if x["ms"] is not None else WINDOW * 1000 for x in r["searches"]]
        samples["med"].append(statistics.median(hits))
        samples["p95"].append(quantile(hits, 0.95))
        samples["hops"].append(statistics.median(x["hops"] for x in r["searches"] if x["hops"] is not None))
        ctx.say(f"median {samples['med'][-1]:.1f} ms, p95 {samples['p95'][-1]:.1f} ms, "
                f"no hit {sum(x['ms'] is None for x in r['searches'])}")
    note = f"{PEERS} peers in namespaces on a ring, the holder 5 hops away, no loss; {searches} searches per repeat"
    return [
        Figure(BENCH, f"{title}, median", "ms", samples["med"], note=note),
        Figure(BENCH, f"{title}, p95", "ms", samples["p95"], Goal("<=", 25)),
        Figure(BENCH, "separate hosts: hops searcher -> holder", "", samples["hops"],
               note="the hits' hops field: 5 when the ring has no shortcut"),
    ]


def _one_network(ctx: Context, root: Path, searches: int, warmup: int) -> dict[str, Any]:
    netns = _netns()
    for k in range(1, PEERS + 1):
        (root / f"p{k}").mkdir(parents=True, exist_ok=True)
    (root / f"p{HOLDER}" / NAME).parent.mkdir(parents=True)
    (root / f"p{HOLDER}" / NAME).write_bytes(os.urandom(64 * 1024))
    with netns.TestNetwork(PEERS + 1, root) as net:
        tracker = f"{net.hosts[0].ip}:{TRACKER_PORT}"

        def address(k: int) -> str:
            return f"{net.hosts[k].ip}:{PORT}"

        def links(k: int) -> list[str]:
            return [a for n in ring_neighbours(k) for a in ("--peer", address(n))]

        net.hosts[0].start_daemon("tracker", ["p2ptracker", "--port", f"tcp:{TRACKER_PORT}", "--interval", "1"], root)
        cli = str(Path(sys.executable).parent / "p2pshare")
        wait_for(lambda: net.hosts[0].run(cli, "peers", "--tracker", tracker, timeout=10).returncode == 0,
                 f"the tracker answering (logs in {root})", deadline=30, every=0.2)
        # Started with all UDP dropped until every peer is registered: hellos sent before that go to
        # peers learned by peer exchange and would give the ring chords (see tests/test_multihost.py).
        net.set_loss(100)
        for k in range(2, PEERS + 1):
            net.hosts[k].start_daemon(f"p{k}", [
                "p2ppeer", "--tracker", tracker, "--dir", f"p{k}", "--port", str(PORT), "--control",
                "tcp:0:interface=127.0.0.1", "--refresh", "1", "--rescan", "3600", "--neighbours", "0", "--no-lan", *links(k)],
                root)
        go = root / "go"
        helper = net.hosts[SEARCHER].popen(
            sys.executable, "-m", "benchmarks.search_hosts", "--dir", str(root / f"p{SEARCHER}"), "--tracker",
            tracker, "--port", str(PORT), *links(SEARCHER), "--go", str(go), "--searches", str(searches),
            "--warmup", str(warmup), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: all(_registered(net.hosts[k], root / f"p{k}") for k in range(2, PEERS + 1)),
                     f"every daemon registered with the tracker (logs in {root})", deadline=30, every=0.2)
            net.clear_loss()
            go.write_text("go\n")
            try:
                out, err = helper.communicate(timeout=120 + searches * 2 * WINDOW)
            except subprocess.TimeoutExpired:
                raise BenchmarkError("the search helper did not finish in time") from None
            if helper.returncode != 0 or not out.strip():
                raise BenchmarkError(f"the search helper failed ({helper.returncode}): {err[-2000:]}")
            result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            return result
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.communicate()


def _status(host: Any, folder: Path) -> Optional[dict[str, Any]]:
    done = host.run(sys.executable, str(DRIVER), "status", "--dir", str(folder), timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _registered(host: Any, folder: Path) -> bool:
    status = _status(host, folder)
    return bool(status and status.get("tracker") and status["tracker"]["connected"])


# -- the helper, inside the searcher's namespace ------------------------------------------------


async def _helper(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    from p2pshare import start_peer

    def pause(seconds: float) -> Deferred[None]:
        return deferLater(reactor, seconds, lambda: None)

    peers = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in args.peer)]
    peer = await start_peer(reactor, args.dir, tracker=args.tracker, port=args.port, peers=peers, want=0,
                            refresh=1.0, rescan=3600.0)
    try:
        go = Path(args.go)
        while not go.exists():
            await pause(0.1)
        await pause(1.5)  # hellos both ways, so every daemon forwards to its two ring neighbours again
        records = []
        for i in range(args.warmup + args.searches):
            first: Deferred[Any] = Deferred()
            started = time.perf_counter()

            def on_hit(hit: Any, first: Deferred[Any] = first) -> None:
                if not first.called:
                    first.callback((time.perf_counter(), hit.hops))

            rid = peer.query(NAME, False, on_hit)
            timer = reactor.callLater(WINDOW, lambda d=first: d.called or d.callback(None))
            got = await first
            if timer.active():
                timer.cancel()
            peer.finish_query(rid)
            if i >= args.warmup:
                records.append({"ms": None if got is None else (got[0] - started) * 1000,
                                "hops": None if got is None else got[1]})
            await pause(0.1)
        print(json.dumps({"searches": records}), flush=True)
    finally:
        await peer.stopService()


def main() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    parser = argparse.ArgumentParser(description="the searcher of the separate-hosts search benchmark")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--tracker", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--go", required=True, help="a file whose appearance starts the searches")
    parser.add_argument("--searches", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(_helper(reactor, args)))


if __name__ == "__main__":
    main()
