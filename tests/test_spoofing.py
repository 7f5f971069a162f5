"""Spoofing with raw sockets, in network namespaces.

The security issue asks for "live tests with raw sockets: garbage, oversized and replayed
datagrams; forged source addresses (in network namespaces, where raw sockets can spoof)".

The network (tests/netns.py): four hosts on one bridge, in 10.213.0.0/24, which exists only
inside the namespaces:

- host 0, the **holder** (10.213.0.10): ``twistd p2ppeer --port 7000`` sharing ``target.bin``;
- host 1, the **searcher** (10.213.0.11): ``twistd p2ppeer --port 7000``, linked to the holder
  (``--peer``, both ways; no tracker);
- host 2, the **attacker** (10.213.0.12): no daemon; it sends hand-built IPv4 + UDP packets
  from a raw socket (``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)``: the kernel sends the IP header
  as given, source address included), with a small sender script run inside its namespace
  (``ip netns exec``); datagrams larger than the link's MTU are fragmented by hand;
- host 3, the **victim** (10.213.0.13): no daemon, nothing listening on the port the forged
  queries name (so its kernel answers a SYN with a reset, as most hosts would).

Counting is done by nftables counters in the hosts' namespaces (named counters in a table
``inet p2pt_spoof``; bytes are IP packet lengths, headers included) and by the peers' own
counters (``/v1/status`` through tests/netns_driver.py).  Each test states its pass criteria;
the figures are printed (also without ``-s``) and in every assertion message.  The whole
file takes about half a minute.
"""

from __future__ import annotations

import base64
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from p2pshare.peer import MAX_OFFERS
from p2pshare.reliable import Retransmitter
from p2pshare.wire import MAX_DATAGRAM, Query
from netns import Daemon, Host, TestNetwork, requires_netns

pytestmark = [pytest.mark.netns, requires_netns]

PORT = 7000  # the peers' UDP and TCP port
VICTIM_PORT = 9999  # named by the forged queries, closed on the victim
TARGET = "target.bin"
PYTHON = sys.executable
DRIVER = str(Path(__file__).with_name("netns_driver.py"))
TABLE = "p2pt_spoof"
READY = 30.0

# The sender, run inside the attacker's namespace.  Reads {"rate": per second or 0, "datagrams":
# [[src, sport, dst, dport, base64 payload], ...]} on stdin; prints what it sent as one JSON line.
SENDER = r'''
import base64, json, os, socket, struct, sys, time

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def packets(src, sport, dst, dport, payload, ident, mtu=1500):
    """An IPv4 + UDP datagram from src:sport (whatever address that is), in fragments when it
    does not fit the MTU: a raw socket with a hand-made header is never fragmented by the kernel."""
    length = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)
    csum = checksum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, length, csum) + payload
    room = (mtu - 20) // 8 * 8
    out = []
    for offset in range(0, len(udp), room):
        part = udp[offset:offset + room]
        flags = (0x2000 if offset + room < len(udp) else 0) | (offset // 8)
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(part), ident, flags, 64, 17, 0,
                             socket.inet_aton(src), socket.inet_aton(dst))
        out.append(header[:10] + struct.pack("!H", checksum(header)) + header[12:] + part)
    return out

spec = json.load(sys.stdin)
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
interval = 1.0 / spec["rate"] if spec.get("rate") else 0.0
ident = struct.unpack("!H", os.urandom(2))[0]
sent = size = 0
start = time.monotonic()
for n, (src, sport, dst, dport, payload) in enumerate(spec["datagrams"]):
    delay = start + n * interval - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    ident = ident % 0xFFFF + 1
    for packet in packets(src, sport, dst, dport, base64.b64decode(payload), ident):
        sock.sendto(packet, (dst, 0))
        sent += 1
        size += len(packet)
print(json.dumps({"datagrams": len(spec["datagrams"]), "packets": sent, "bytes": size,
                  "seconds": time.monotonic() - start}))
'''


# -- the network -----------------------------------------------------------------------------------


@dataclass
class Lan:
    net: TestNetwork
    root: Path
    holder: Daemon
    searcher: Daemon

    def host(self, k: int) -> Host:
        return self.net.hosts[k]

    @property
    def holder_ip(self) -> str:
        return self.host(0).ip

    @property
    def searcher_ip(self) -> str:
        return self.host(1).ip

    @property
    def attacker(self) -> Host:
        return self.host(2)

    @property
    def victim(self) -> Host:
        return self.host(3)

    def logs(self) -> str:
        return "".join(f"\n--- {d.name} ({'alive' if d.alive() else f'exited {d.proc.returncode}'})\n"
                       f"{d.output(2000)}" for d in (self.holder, self.searcher))

    def status(self, k: int) -> Optional[dict[str, Any]]:
        result = self.host(k).run(PYTHON, DRIVER, "status", "--dir", str(self.root / f"p{k}"), timeout=30)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def counters(self, k: int) -> dict[str, int]:
        status = self.status(k)
        assert status is not None, f"peer {k} does not answer{self.logs()}"
        return dict(status["counters"])

    def send(self, datagrams: list[tuple[str, int, str, int, bytes]], rate: float = 0.0) -> dict[str, Any]:
        """Send *datagrams* (src, sport, dst, dport, payload) from the attacker's raw socket."""
        spec = {"rate": rate, "datagrams": [[s, sp, d, dp, base64.b64encode(p).decode()]
                                            for s, sp, d, dp, p in datagrams]}
        result = self.attacker.run(PYTHON, str(self.root / "sender.py"), input=json.dumps(spec), timeout=120)
        assert result.returncode == 0, f"the raw-socket sender failed: {result.stderr[-2000:]}"
        return json.loads(result.stdout)


def count_in(host: Host, rules: dict[str, str], hook: str = "input") -> None:
    """(Re)create table inet p2pt_spoof in *host*: one named counter per rule, counting what matches."""
    counters = "".join(f"  counter {name} {{}}\n" for name in rules)
    chain = "".join(f"    {match} counter name \"{name}\"\n" for name, match in rules.items())
    script = (f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{counters}"
              f"  chain c {{\n    type filter hook {hook} priority -50; policy accept;\n{chain}  }}\n}}\n")
    result = host.run("nft", "-f", "-", input=script)
    assert result.returncode == 0, f"nft in {host.namespace}: {result.stderr}\n{script}"


def read_counters(host: Host) -> dict[str, dict[str, int]]:
    shown = host.run("nft", "-j", "list", "counters", "table", "inet", TABLE, check=True).stdout
    return {c["counter"]["name"]: {"packets": c["counter"]["packets"], "bytes": c["counter"]["bytes"]}
            for c in json.loads(shown)["nftables"] if "counter" in c}


def wait_for(check: Callable[[], Any], what: str, lan: Lan, deadline: float = READY) -> Any:
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline:g}s: {what}{lan.logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    root = tmp_path_factory.mktemp("spoofing")
    (root / "sender.py").write_text(SENDER)
    for k in (0, 1):
        (root / f"p{k}").mkdir()
    (root / "p0" / TARGET).write_bytes(os.urandom(64 * 1024))
    with TestNetwork(4, root) as net:
        daemons = []
        for k, other in ((0, 1), (1, 0)):
            daemons.append(net.hosts[k].start_daemon(
                "holder" if k == 0 else "searcher",
                ["p2ppeer", "--peer", f"{net.hosts[other].ip}:{PORT}", "--dir", f"p{k}", "--port", str(PORT),
                 "--control", "tcp:0:interface=127.0.0.1", "--rescan", "3600", "--refresh", "1", "--no-lan"], root))
        lan = Lan(net, root, *daemons)

        def ready() -> bool:
            holder, searcher = lan.status(0), lan.status(1)
            return bool(holder and searcher and holder["files"] == 1
                        and [lan.searcher_ip, PORT] in holder["neighbours"]
                        and [lan.holder_ip, PORT] in searcher["neighbours"])

        wait_for(ready, "the holder and the searcher up, indexed and linked", lan)
        yield lan


def report(capsys: pytest.CaptureFixture[str], text: str) -> str:
    with capsys.disabled():
        print(f"\n{text}", flush=True)
    return text


def query(request_id: int, requester: tuple[str, int], fetch: bool = True, name: str = TARGET) -> bytes:
    return Query(f"{request_id:032x}", name, requester, requester, 7, 0, fetch).encode()


# -- (a) forged requester addresses ----------------------------------------------------------------

FORGED = 300  # forged queries
FORGED_RATE = 150  # a second


@dataclass
class Attack:
    """What one forged-query attack sent and caused (see ``forged_attack``)."""

    sent: dict[str, Any]
    at_victim: dict[str, dict[str, int]]
    at_holder: dict[str, dict[str, int]]
    at_attacker: dict[str, dict[str, int]]
    delta: dict[str, int]
    hit_bytes: int  # the IP size of one hit the holder sends for a forged query
    figures: str

    @property
    def udp_bytes(self) -> int:
        return self.at_victim["udp_from_holder"]["bytes"]

    @property
    def attack_bytes(self) -> int:
        return self.at_attacker["attack_out"]["bytes"]


@pytest.fixture(scope="module")
def forged_attack(lan: Lan) -> Attack:
    """The attacker sends ``FORGED`` queries for ``target.bin`` (fetch: true), ``FORGED_RATE`` a second,
    each with a new request ID, from a raw socket: IP source forged to the victim's address and
    source port, ``udp`` and ``tcp`` fields naming the victim too.  The holder answers each (it
    cannot tell); then every retransmission is waited for (7 sends over 7.75 s, reliable.py)."""
    victim = (lan.victim.ip, VICTIM_PORT)
    count_in(lan.victim, {"udp_from_holder": f"ip saddr {lan.holder_ip} meta l4proto udp",
                          "syn_from_holder": f"ip saddr {lan.holder_ip} tcp flags & (syn | ack) == syn"})
    count_in(lan.host(0), {"forged_in": f"ip saddr {lan.victim.ip} udp dport {PORT}"})
    count_in(lan.attacker, {"attack_out": f"ip daddr {lan.holder_ip} meta l4proto udp"}, hook="output")
    before = lan.counters(0)
    base = int.from_bytes(os.urandom(8), "big") << 64
    sent = lan.send([(*victim, lan.holder_ip, PORT, query(base + n, victim)) for n in range(FORGED)],
                    rate=FORGED_RATE)
    r = Retransmitter()
    time.sleep(sum(min(r.max_timeout, r.first_timeout * 2 ** n) for n in range(r.tries - 1)) + 1.5)
    after = lan.counters(0)
    at_victim, at_holder, at_attacker = (read_counters(h) for h in (lan.victim, lan.host(0), lan.attacker))
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in
             ("queries_received", "hits_sent", "retries_hit", "gave_up_hit", "offers_dialled", "offers_backed_off",
              "offers_skipped", "dropped_rate_limited", "dropped_duplicate")}
    hit_bytes = 28 + len(json.dumps({"v": 1, "t": "hit", "id": "0" * 32, "name": TARGET, "size": 64 * 1024,
                                     "sha256": "0" * 64, "tcp": [lan.holder_ip, PORT], "peer": "0" * 32,
                                     "hops": 1}, separators=(",", ":")))  # IP + UDP headers: 28 bytes
    udp_bytes, attack_bytes = at_victim["udp_from_holder"]["bytes"], at_attacker["attack_out"]["bytes"]
    figures = (
        f"[forged queries] attacker sent {sent['datagrams']} queries ({sent['bytes']} bytes at IP level, nft "
        f"counted {attack_bytes}) in {sent['seconds']:.2f} s from {victim[0]}:{victim[1]} (forged)\n"
        f"  holder: nft saw {at_holder['forged_in']['packets']} datagrams from the victim's address; its counters "
        f"moved {delta}\n"
        f"  victim: {at_victim['syn_from_holder']['packets']} SYNs from the holder; "
        f"{at_victim['udp_from_holder']['packets']} UDP datagrams, {udp_bytes} bytes from the holder "
        f"(attacker sent {attack_bytes}: ratio {udp_bytes / max(1, attack_bytes):.2f}; a query is "
        f"{attack_bytes // max(1, sent['datagrams'])} bytes, a hit about {hit_bytes})")
    return Attack(sent, at_victim, at_holder, at_attacker, delta, hit_bytes, figures)


def test_forged_queries_aimed_at_a_victim_cause_a_bounded_number_of_dials(
        forged_attack: Attack, capsys: pytest.CaptureFixture[str]) -> None:
    """Pass criteria (the attack is ``forged_attack``'s: 300 forged queries in 2 s):

    1. the forgery works: the holder's namespace counts all 300 datagrams arriving from the
       victim's address (nft), and its peer counts 300 more ``queries_received``;
    2. bounded dials: the connection attempts (TCP SYNs) the victim receives from the holder are at
       most ``MAX_OFFERS`` x (2 + log2(attack seconds)), whatever the number of forged queries:
       after a failed dial the holder backs off from that address (1 s, doubling with each
       failure, up to 5 min), so at most 2 + log2(T) dial windows open in T seconds, and in each
       at most ``MAX_OFFERS`` (16) offers can be in flight before a failure comes back; here 32 for
       300 queries (48 if sending them took over 2 s; measured: 2 to 17 SYNs);
    3. bounded datagrams: the victim receives at most ``tries`` (7) hits and one ack per forged
       query: the holder sends each hit until acknowledged or given up (reliable.py), and no more.
    """
    attack = forged_attack
    duration = attack.sent["seconds"]
    syn_bound = MAX_OFFERS * (2 + math.floor(math.log2(max(1.0, duration))))
    figures = report(capsys, attack.figures + f"\n  SYN bound {syn_bound}")
    assert attack.at_holder["forged_in"]["packets"] == FORGED, figures
    assert attack.delta["queries_received"] == FORGED, figures
    assert attack.at_victim["syn_from_holder"]["packets"] <= syn_bound, figures
    assert attack.delta["offers_dialled"] + attack.delta["offers_backed_off"] + attack.delta["offers_skipped"] \
        == FORGED, figures
    assert attack.at_victim["udp_from_holder"]["packets"] <= FORGED * (Retransmitter().tries + 1), figures


def test_forged_queries_aimed_at_a_victim_cause_no_udp_amplification(
        forged_attack: Attack, capsys: pytest.CaptureFixture[str]) -> None:
    """Pass criterion: the UDP bytes the victim receives from the holder (nft, IP lengths) are at most
    the bytes the attacker sent (nft on the attacker's output, IP lengths).  The defence is the
    return budget (search.ReturnBudget): to an address that has not proven it receives, a peer
    sends no more than it received from it.  The measured ratio is printed.
    """
    attack = forged_attack
    figures = report(capsys, f"[amplification] victim received {attack.udp_bytes} UDP bytes, attacker sent "
                             f"{attack.attack_bytes}: ratio {attack.udp_bytes / max(1, attack.attack_bytes):.2f}")
    assert attack.udp_bytes <= attack.attack_bytes, figures


# -- (b) garbage, oversized and replayed datagrams -------------------------------------------------


def test_garbage_oversized_and_replayed_datagrams_are_counted_dropped_and_the_peer_keeps_serving(
        lan: Lan, capsys: pytest.CaptureFixture[str]) -> None:
    """From the attacker's raw socket, at the holder's search port:

    - 200 datagrams of random bytes (never JSON: the first byte is 0xff), from the attacker's address;
    - 50 oversized datagrams of 6,000 bytes (a query padded past ``MAX_DATAGRAM`` = 4,096 bytes, sent
      as IP fragments), from the attacker's address;
    - 20 datagrams of a later protocol version (``"v": 2``);
    - one query as the searcher would send it (a search by name, IP source forged to the searcher's
      address), then 300 replays of that very datagram, as a host that captured it could send them.

    Pass criteria: the holder's counters grow by exactly 200 ``dropped_malformed``, 50
    ``dropped_oversized``, 20 ``dropped_unsupported_version``; the first copy of the replayed
    query counts as one ``queries_received`` and each of the 300 replays as a
    ``dropped_duplicate`` (no replay is processed again: one ``hits_sent``); nothing is rate
    limited (all of it is under 1,000 datagrams a second a source); the holder is still running,
    and afterwards a search by the searcher (through its control API) finds ``target.bin`` at the
    holder, twice in a row.
    """
    attacker, holder = lan.attacker.ip, lan.holder_ip
    before = lan.counters(0)
    garbage = [(attacker, 40000, holder, PORT, b"\xff" + os.urandom(n % 900 + 10)) for n in range(200)]
    padded = json.loads(query(1, (attacker, 40000)))
    padded["pad"] = "x" * 6000
    oversized = [(attacker, 40001, holder, PORT, json.dumps(padded).encode()[:6000]) for _ in range(50)]
    assert len(oversized[0][4]) > MAX_DATAGRAM
    version = json.loads(query(2, (attacker, 40002)))
    version["v"] = 2
    future = [(attacker, 40002, holder, PORT, json.dumps(version).encode()) for _ in range(20)]
    searcher = (lan.searcher_ip, PORT)
    captured = query(int.from_bytes(os.urandom(16), "big"), searcher, fetch=False)
    replays = [(*searcher, holder, PORT, captured)] * 301
    sent = [lan.send(garbage + oversized + future, rate=500), lan.send(replays, rate=300)]
    time.sleep(1.0)
    after = lan.counters(0)
    names = ("dropped_malformed", "dropped_oversized", "dropped_unsupported_version", "dropped_duplicate",
             "queries_received", "hits_sent", "dropped_rate_limited")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in names}
    search = lan.host(1).run(PYTHON, DRIVER, "search", "--dir", str(lan.root / "p1"), "--name", TARGET, "--count",
                             "2", "--deadline", "2", timeout=60)
    result = json.loads(search.stdout.strip().splitlines()[-1]) if search.returncode == 0 else {}
    figures = report(capsys, (
        f"[garbage, oversized, replayed] sent {[s['datagrams'] for s in sent]} datagrams "
        f"({[s['packets'] for s in sent]} IP packets, {sum(s['bytes'] for s in sent)} bytes)\n"
        f"  holder counters moved {delta}; holder {'alive' if lan.holder.alive() else 'DEAD'}\n"
        f"  then a search from the searcher: found {result.get('found')}/2 at {result.get('holders')} "
        f"(errors {result.get('errors')}; driver exit {search.returncode})"))
    assert lan.holder.alive(), figures + lan.logs()
    assert delta["dropped_malformed"] == 200, figures
    assert delta["dropped_oversized"] == 50, figures
    assert delta["dropped_unsupported_version"] == 20, figures
    assert delta["dropped_duplicate"] == 300, figures
    assert delta["queries_received"] == 1 and delta["hits_sent"] == 1, figures
    assert delta["dropped_rate_limited"] == 0, figures
    assert result.get("found") == 2 and result.get("holders") == [f"{holder}:{PORT}"], figures + search.stderr
