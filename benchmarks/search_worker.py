"""The search benchmark's worker: many peers in one reactor, and a naive flood beside them.

Run by ``benchmarks.search`` as ``python -m benchmarks.search_worker ...``; it
prints one JSON object with a record per search.  Each p2pshare peer is started
with the public API (``start_tracker``, then ``start_peer`` with default options) on its
own loopback address (127.0.0.2, 127.0.0.3, ...) with real UDP sockets; the
tracker hands each one five random neighbours.  The naive flood is the
baseline: plain ``DatagramProtocol`` nodes on the same addresses, each with five
random neighbours, forwarding every first sighting to all of them with TTL - 1.
Searches alternate: a naive one, then a p2pshare one, each for a file held by
one peer at least three hops from the searcher.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater, react

from p2pshare import Peer, start_peer, start_tracker

Address = tuple[str, int]
NAME = "wanted/file.bin"
FANOUT = 5
TTL = 7  # p2pshare's default; the naive flood uses the same


def bfs(graph: dict[Address, list[Address]], start: Address, stop_at: frozenset[Address] = frozenset(),
        max_depth: int = 1 << 30) -> dict[Address, int]:
    """Hop counts from *start*; nodes in *stop_at* and at *max_depth* are reached but not expanded."""
    depth = {start: 0}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        if (node in stop_at and node != start) or depth[node] >= max_depth:
            continue
        for nxt in graph.get(node, ()):
            if nxt not in depth:
                depth[nxt] = depth[node] + 1
                todo.append(nxt)
    return depth


def pick_searcher(graph: dict[Address, list[Address]], holder: Address, rng: random.Random) -> tuple[Address, int]:
    """A node at least 3 hops from *holder* (else the farthest one), and its distance."""
    best: tuple[Address, int] = (holder, 0)
    nodes = [n for n in graph if n != holder]
    rng.shuffle(nodes)
    for node in nodes:
        hops = bfs(graph, node).get(holder, 0)
        if hops >= 3:
            return node, hops
        if hops > best[1]:
            best = (node, hops)
    return best


async def settle(reactor: Any, sent: Callable[[], int], quiet: float = 0.05, limit: float = 5.0) -> None:
    """Wait until the count of datagrams sent has not moved for *quiet* seconds (the flood is over)."""
    end = time.monotonic() + limit
    last, since = sent(), time.monotonic()
    while time.monotonic() < end:
        await deferLater(reactor, 0.01, lambda: None)
        now = sent()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


# -- the naive flood ----------------------------------------------------------------------


class NaiveNode(DatagramProtocol):
    """Forwards the first copy of each query to all its neighbours; the holder answers instead."""

    noisy = False

    def __init__(self, flood: "NaiveFlood") -> None:
        self.flood = flood
        self.neighbours: list[Address] = []
        self.seen: set[bytes] = set()
        self.holder = False
        self.sent = self.received = 0

    def send(self, data: bytes, to: Address) -> None:
        self.transport.write(data, to)
        self.sent += 1

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        kind, rid = data[:1], data[1:17]
        if kind == b"H":
            self.flood.hit(rid)
            return
        self.received += 1
        if rid in self.seen:
            return
        self.seen.add(rid)
        ttl, origin = data[17], (data[18:].decode().rsplit(":", 1))
        if self.holder:
            self.send(b"H" + rid, (origin[0], int(origin[1])))
        elif ttl > 0:
            forwarded = data[:17] + bytes([ttl - 1]) + data[18:]
            for n in self.neighbours:
                self.send(forwarded, n)


class NaiveFlood:
    """Nodes on the given hosts, each with FANOUT random neighbours (a fixed random graph)."""

    def __init__(self, reactor: Any, hosts: list[str], rng: random.Random) -> None:
        self.nodes: dict[Address, NaiveNode] = {}
        self.ports = []
        for host in hosts:
            node = NaiveNode(self)
            port = reactor.listenUDP(0, node, interface=host)
            self.ports.append(port)
            self.nodes[(host, port.getHost().port)] = node
        addresses = list(self.nodes)
        for addr, node in self.nodes.items():
            node.neighbours = rng.sample([a for a in addresses if a != addr], FANOUT)
        self.graph = {a: n.neighbours for a, n in self.nodes.items()}
        self._hit_at: Optional[float] = None
        self._rid = b""

    def hit(self, rid: bytes) -> None:
        if rid == self._rid and self._hit_at is None:
            self._hit_at = time.perf_counter()

    async def search(self, reactor: Any, rng: random.Random) -> dict[str, Any]:
        holder = rng.choice(list(self.nodes))
        searcher, hops = pick_searcher(self.graph, holder, rng)
        for addr, node in self.nodes.items():
            node.holder = addr == holder
        before = {a: (n.sent, n.received) for a, n in self.nodes.items()}
        self._rid, self._hit_at = os.urandom(16), None
        origin = self.nodes[searcher]
        origin.seen.add(self._rid)
        message = b"Q" + self._rid + bytes([TTL]) + f"{searcher[0]}:{searcher[1]}".encode()
        started = time.perf_counter()
        for n in origin.neighbours:
            origin.send(message, n)
        await settle(reactor, lambda: sum(n.sent for n in self.nodes.values()))
        reached = {a for a, n in self.nodes.items() if n.received > before[a][1] and a != searcher}
        reachable = set(bfs(self.graph, searcher, frozenset([holder]), TTL + 1)) - {searcher}
        return {
            "first_hit_ms": None if self._hit_at is None else (self._hit_at - started) * 1000,
            "datagrams": sum(n.sent - before[a][0] for a, n in self.nodes.items()),
            "reached": len(reached), "reachable": len(reachable), "others": len(self.nodes) - 1,
            "misses": len(reachable - reached), "hops": hops,
        }

    def stop(self) -> list[Any]:
        return [p.stopListening() for p in self.ports]


# -- p2pshare ------------------------------------------------------------------------------


async def start_network(reactor: Any, base: Path, hosts: list[str], holder: int, size: int) -> tuple[Any, list[Peer]]:
    """A tracker on 127.0.0.1 and one peer per host with the default neighbour count (``--neighbours``)."""
    # all 200 peers connect to the tracker from 127.0.0.1: lift the per-address limit
    tracker = await start_tracker(reactor, "tcp:0:interface=127.0.0.1", max_peers=20, interval=600.0,
                                  max_per_address=1000)
    address = f"127.0.0.1:{tracker.port.getHost().port}"  # type: ignore[union-attr]
    peers: list[Peer] = []
    for i, host in enumerate(hosts):
        folder = base / f"peer{i}"
        folder.mkdir(parents=True)
        if i == holder:
            (folder / NAME).parent.mkdir(parents=True)
            (folder / NAME).write_bytes(os.urandom(size))
        # advertise: the tracker sees every peer connect from 127.0.0.1, but each listens on its own address
        peers.append(await start_peer(reactor, folder, tracker=address, interface=host, advertise=host,
                                      refresh=3600.0, rescan=3600.0))
    while not all(p.tracker is not None and p.tracker.registered for p in peers):
        await deferLater(reactor, 0.05, lambda: None)
    # the first peers registered when few others had: ask again now that all 200 are in the table
    await DeferredList([p.tracker.refresh_now() for p in peers if p.tracker is not None])
    return tracker, peers


def p2p_graph(peers: list[Peer]) -> dict[Address, list[Address]]:
    return {(p.host_for_others, p.udp_port): list(p.neighbours()) for p in peers}


class FirstHit:
    """Notes when the searcher's ``hits_received`` counter first moves after ``arm``."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.at: Optional[float] = None
        self._base = 0
        original = peer.search_proto.datagramReceived

        def observed(data: bytes, addr: Address) -> None:
            original(data, addr)
            if self.at is None and self.peer.counters["hits_received"] > self._base:
                self.at = time.perf_counter()

        peer.search_proto.datagramReceived = observed  # type: ignore[method-assign]

    def arm(self) -> None:
        self.at, self._base = None, self.peer.counters["hits_received"]


async def p2p_search(peers: list[Peer], watchers: dict[Address, FirstHit], holder: Peer, rng: random.Random,
                     window: float) -> dict[str, Any]:
    graph = p2p_graph(peers)
    holder_addr = (holder.host_for_others, holder.udp_port)
    searcher_addr, hops = pick_searcher(graph, holder_addr, rng)
    by_addr = {(p.host_for_others, p.udp_port): p for p in peers}
    searcher = by_addr[searcher_addr]
    seen = ("queries_received", "dropped_duplicate")
    before = {a: (p.counters["datagrams_sent"], sum(p.counters[k] for k in seen)) for a, p in by_addr.items()}
    totals_before = sum((p.counters for p in peers), Counter())
    watcher = watchers[searcher_addr]
    watcher.arm()
    started = time.perf_counter()
    hits = await searcher.search(NAME, timeout=window)
    await settle(searcher.reactor, lambda: sum(p.counters["datagrams_sent"] for p in peers))
    reached = {a for a, p in by_addr.items() if sum(p.counters[k] for k in seen) > before[a][1]} - {searcher_addr}
    reachable = set(bfs(graph, searcher_addr, frozenset([holder_addr]), TTL + 1)) - {searcher_addr}
    return {
        "first_hit_ms": None if watcher.at is None else (watcher.at - started) * 1000,
        "datagrams": sum(p.counters["datagrams_sent"] - before[a][0] for a, p in by_addr.items()),
        "reached": len(reached), "reachable": len(reachable), "others": len(peers) - 1,
        "misses": len(reachable - reached), "hops": hops, "hit_hops": [h.hops for h in hits],
        "degree": sum(len(v) for v in graph.values()) / len(graph),
        "counters": dict(sum((p.counters for p in peers), Counter()) - totals_before),  # all peers, this search
    }


async def run(reactor: Any, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    hosts = [f"127.0.0.{2 + i}" for i in range(args.peers)]
    holder_index = rng.randrange(args.peers)
    tracker, peers = await start_network(reactor, Path(args.base), hosts, holder_index, 4096)
    flood = NaiveFlood(reactor, hosts, rng)
    watchers = {(p.host_for_others, p.udp_port): FirstHit(p) for p in peers}
    out: dict[str, Any] = {"p2p": [], "naive": [], "warmup": args.warmup}
    try:
        for i in range(args.warmup + args.searches):
            naive = await flood.search(reactor, rng)
            p2p = await p2p_search(peers, watchers, peers[holder_index], rng, args.window)
            if i >= args.warmup:
                out["naive"].append(naive)
                out["p2p"].append(p2p)
    finally:
        await DeferredList([d for d in flood.stop() if isinstance(d, Deferred)])
        for p in peers:
            await p.stopService()
        await tracker.stopService()
    json.dump(out, sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="an empty folder for the peers' shared folders")
    parser.add_argument("--peers", type=int, default=200)
    parser.add_argument("--searches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=float, default=1.0, help="the timeout of each p2pshare search (s)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
