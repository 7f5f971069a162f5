"""A throw-away multi-host network in Linux network namespaces, for tests/test_multihost.py.

Not a test module: a harness.  ``TestNetwork(...)`` is a context manager that
builds, and always tears down (also when the body raises):

- one namespace per host, named ``p2pt-<pid>-<N>`` (N = 0, 1, ...), with ``lo`` up and
  one interface ``eth0`` holding ``10.213.0.<10 + N>/24``;
- a "switch" namespace ``p2pt-<pid>-sw`` holding a Linux bridge ``br0`` and, for host
  N, the port ``p<N>``: the other end of host N's ``eth0`` (a veth pair).

The address range **10.213.0.0/24** exists only inside these namespaces: nothing in the root
namespace (where the tests themselves run) has a route to it or a port on the bridge, so
no test datagram or segment can leave them.  Several runs at once do not collide: each
has its own switch namespace, so the same addresses live on separate bridges.

Faults, all with nftables (the kernel here has no netem):

- **loss**: ``host.set_loss(N)`` (or ``net.set_loss(N)`` for every host) drops N % of the UDP
  datagrams arriving at the host (``meta l4proto udp numgen random mod 100 < N drop`` in an
  ``inet`` input-hook chain of its namespace; 100 drops all, 0 clears); TCP (transfers, the
  tracker, the control API on loopback) is untouched.
- **partition**: ``net.partition(side_a, side_b)`` drops every frame the bridge would forward
  between the two sets of ports (an ``nft`` table of the ``bridge`` family in the switch
  namespace, forward hook, matching ``iifname``/``oifname``).  Bridge rules rather than
  ``ip link set pN down``: a downed port cuts a host off from *everyone*, so it cannot split
  a network into two halves that still talk among themselves; and it is visible to the
  host (carrier loss), whereas a real partition is silent: frames just vanish, TCP
  connections hang instead of being reset, which is the case the peers must survive.
  ``net.heal()`` deletes the table; ARP and every connection carry on.
- **throttle**: ``host.throttle_tcp(rate, sources)`` polices TCP arriving at *host* above a byte
  rate (used to keep a large transfer in flight long enough to kill its holder).

Link rates (not a fault: a slower network), for the swarm benchmark and tests/test_swarm_netns.py:
``host.rate_limit(bits_per_second)`` limits the host's link to that rate in both directions, with
a ``tc`` token bucket (``tbf``) on the egress of the host's ``eth0`` (what it uploads) and one on the
egress of its bridge port ``p<N>`` in the switch namespace (what it downloads: its ingress).  Where
``tc``/``sch_tbf`` is missing it falls back to nftables policing of the same two directions
(``limit rate over ... drop``, coarser: TCP sees drops instead of a queue, and the bucket holds a
second's worth of bytes); it returns which of ``"tbf"`` and ``"nft"`` it used.

``cleanup_leftovers()`` (run by ``TestNetwork`` on entry) removes namespaces named
``p2pt-<pid>-*`` whose creating process is gone (a run killed before its teardown),
killing by PID the processes still inside them.  ``requires_netns`` skips a test, with the
reason, when not root, when ``ip``, ``bridge``, ``ss`` (iproute2) or ``nft`` (nftables) is
missing, or when this kernel cannot build the namespaces, veths, bridge and rules used here.
Processes: ``host.run(...)``/``host.popen(...)`` (``ip netns exec``), ``host.start_daemon(name,
twistd_args, cwd)`` (``twistd -n --pidfile= ...``, output to ``cwd/<name>.log``), ``daemon.kill()``
(SIGKILL) and ``daemon.stop()`` (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pytest

PREFIX = "p2pt-"
SUBNET = "10.213.0"  # 10.213.0.0/24, test-only, never present in the root namespace
SUBNET2 = "10.213.1"  # the second link of a routed network (second_link_from)
FIRST_HOST = 10  # host N is 10.213.0.(10 + N)
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
LOSS_TABLE = "p2pt_loss"
THROTTLE_TABLE = "p2pt_throttle"
PARTITION_TABLE = "p2pt_partition"
SHAPE_TABLE = "p2pt_shape"  # the nft fallback of Host.rate_limit (one per bridge port in the switch)
TBF_LATENCY = 0.1  # seconds: the most a packet may wait in a tbf queue before it is dropped


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _nft_script(namespace: str, script: str) -> None:
    result = subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=script,
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"nft in {namespace} failed: {result.stderr.strip()}\n{script}")


def _replace_table(family: str, table: str, body: str) -> str:
    """An nft script that atomically replaces *table* (created empty first, so deleting never fails)."""
    script = f"table {family} {table} {{}}\ndelete table {family} {table}\n"
    return script + (f"table {family} {table} {{\n{body}\n}}\n" if body else "")


def _link_bytes(namespace: str, dev: str, direction: str) -> int:
    """The kernel's byte counter of *dev* in *namespace*, ``"tx"`` or ``"rx"``."""
    shown = _ip("-n", namespace, "-s", "-j", "link", "show", "dev", dev).stdout
    stats = json.loads(shown)[0]["stats64"]
    return int(stats[direction]["bytes"])


# -- availability ---------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why namespace tests cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespace tests need root (CI runs them as root)"
    for tool, package in (("ip", "iproute2"), ("bridge", "iproute2"), ("ss", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {package}; .ci/run does it)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("-n", probe, "link", "add", "br0", "type", "bridge")
            _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
            for family, table, hook, rule in (
                    ("inet", LOSS_TABLE, "input", "meta l4proto udp numgen random mod 100 < 1 drop"),
                    ("bridge", PARTITION_TABLE, "forward", 'iifname { "v0" } oifname { "v1" } drop')):
                _nft_script(probe, _replace_table(family, table, (
                    f"  chain c {{\n    type filter hook {hook} priority filter; policy accept;\n    {rule}\n  }}")))
        finally:
            _ip("netns", "del", probe, check=False)
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"cannot build a namespace with veths, a bridge and the nftables rules used here: {detail.strip()}"
    return None


def _requires_netns() -> pytest.MarkDecorator:
    reason = unavailable_reason()
    return pytest.mark.skipif(reason is not None, reason=f"multi-host namespace tests skipped: {reason}")


requires_netns = _requires_netns()


# -- leftovers ------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_namespace(name: str) -> None:
    """Kill (by PID) whatever still runs in namespace *name*, then delete it (and its veths with it)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


def cleanup_leftovers() -> list[str]:
    """Delete ``p2pt-<pid>-*`` namespaces of runs that are no longer alive; returns their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-[\w-]+", name)
        if match is None:
            continue
        owner = int(match.group(1))
        if owner != os.getpid() and _alive(owner):
            continue  # another run, still going
        remove_namespace(name)
        removed.append(name)
    return removed


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """A process started in a host namespace (``ip netns exec`` execs in place: same PID), logging to a file."""

    name: str
    host: "Host"
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send *sig* (SIGKILL by default: a crash, nothing gets to clean up) and reap the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (a clean twistd shutdown), SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@dataclass
class Host:
    index: int
    namespace: str
    ip: str
    port: str  # the bridge port in the switch namespace
    net: "TestNetwork"

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, *argv: str, timeout: float = 60.0, check: bool = False,
            input: Optional[str] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside this host and wait for it."""
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout, check=check,
                              input=input, cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, *argv: str, cwd: Optional[Path] = None, **kwargs: object) -> subprocess.Popen[str]:
        """Start *argv* inside this host; the caller reads its pipes and waits for it."""
        proc = subprocess.Popen(self.command(*argv), cwd=cwd, stdin=subprocess.DEVNULL, text=True,
                                **kwargs)  # type: ignore[call-overload]
        self.net.processes.append(proc)
        return proc

    def start_daemon(self, name: str, args: Sequence[str], cwd: Path) -> Daemon:
        """``twistd -n --pidfile= ARGS`` in this host, output to ``cwd/<name>.log``."""
        log = cwd / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(self.command(TWISTD, "-n", "--pidfile=", *args), cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        daemon = Daemon(name, self, list(args), log, proc)
        self.net.daemons.append(daemon)
        return daemon

    def restart(self, daemon: Daemon) -> Daemon:
        """Start *daemon*'s command again (after a kill), appending to its log."""
        daemon.kill()
        return self.start_daemon(daemon.name, daemon.args, daemon.log.parent)

    # -- faults on this host ---------------------------------------------------------------------

    def set_loss(self, percent: int) -> None:
        """Drop *percent* % of incoming UDP datagrams at random (0 clears)."""
        if not 0 <= percent <= 100:
            raise ValueError(percent)
        body = "" if percent == 0 else (
            "  chain input {\n    type filter hook input priority filter; policy accept;\n"
            f"    meta l4proto udp {'' if percent == 100 else f'numgen random mod 100 < {percent} '}drop\n  }}")
        _nft_script(self.namespace, _replace_table("inet", LOSS_TABLE, body))

    def clear_loss(self) -> None:
        self.set_loss(0)

    def throttle_tcp(self, bytes_per_second: Optional[int], sources: Iterable[str] = ()) -> None:
        """Police incoming TCP from *sources* (all when empty) to *bytes_per_second*; None clears."""
        body = ""
        if bytes_per_second is not None:
            match = f"ip saddr {{ {', '.join(sources)} }} " if sources else ""
            body = ("  chain input {\n    type filter hook input priority filter; policy accept;\n"
                    f"    {match}meta l4proto tcp limit rate over {int(bytes_per_second)} bytes/second "
                    f"burst {int(bytes_per_second) // 10} bytes drop\n  }}")
        _nft_script(self.namespace, _replace_table("inet", THROTTLE_TABLE, body))

    def rate_limit(self, bits_per_second: Optional[int], burst_bytes: Optional[int] = None,
                   method: Optional[str] = None, latency: float = TBF_LATENCY) -> str:
        """Limit this host's link to *bits_per_second* both ways (None removes the limit).

        Upload: a ``tbf`` root qdisc on the host's ``eth0``; download: the same on the egress of its
        bridge port ``p<N>`` in the switch namespace (the host's ingress).  The bucket holds
        *burst_bytes* (default: 2 ms at the rate, at least 64 KiB), and a packet waits at most
        *latency* seconds in its queue (default 100 ms: a buffer of 0.1 s at the rate; with 50 ms,
        8 TCP flows through one link lost 2 % of their packets).  tbf counts every frame with its
        Ethernet, IP and TCP headers, so one TCP flow gets about 96 % of the rate as payload.

        When ``tc`` is missing or the kernel has no tbf (or *method* is ``"nft"``), nftables polices
        the same two directions instead: an output-hook rule in the host's namespace for what it
        sends on eth0 and a bridge forward-hook rule in the switch for what the bridge forwards to
        port ``p<N>``, dropping what exceeds the rate (TCP backs off on the drops; coarser than a
        queue).  Beware: nftables' byte-rate bucket holds a whole second at the rate on top of the
        burst, so a flow's first second passes unlimited (measured: 16 MiB at 54 Mbit/s through a
        40 Mbit/s policer).  Returns the method used: ``"tbf"`` or ``"nft"``.
        """
        switch = self.net.switch
        if bits_per_second is None:
            for namespace, dev in ((self.namespace, "eth0"), (switch, self.port)):
                subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True, timeout=30)
            _nft_script(self.namespace, _replace_table("inet", SHAPE_TABLE, ""))
            _nft_script(switch, _replace_table("bridge", f"{SHAPE_TABLE}_{self.port}", ""))
            return "none"
        rate = int(bits_per_second)
        burst = int(burst_bytes) if burst_bytes else max(64 * 1024, rate // 8 // 500)
        if method in (None, "tbf") and shutil.which("tc") is not None:
            failed = ""
            for namespace, dev in ((self.namespace, "eth0"), (switch, self.port)):
                result = subprocess.run(
                    ["ip", "netns", "exec", namespace, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                     "rate", f"{rate}bit", "burst", str(burst), "latency", f"{latency * 1000:g}ms"],
                    capture_output=True, text=True, timeout=30)
                if result.returncode != 0:
                    failed = result.stderr.strip()
                    break
            if not failed:
                return "tbf"
            if method == "tbf":
                raise RuntimeError(f"tc tbf on {self.namespace}: {failed}")
            for namespace, dev in ((self.namespace, "eth0"), (switch, self.port)):
                subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True, timeout=30)
        per_second = rate // 8
        police = f"limit rate over {per_second} bytes/second burst {burst} bytes drop"
        _nft_script(self.namespace, _replace_table("inet", SHAPE_TABLE, (
            "  chain output {\n    type filter hook output priority filter; policy accept;\n"
            f'    oifname "eth0" {police}\n  }}')))
        _nft_script(switch, _replace_table("bridge", f"{SHAPE_TABLE}_{self.port}", (
            "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
            f'    oifname "{self.port}" {police}\n  }}')))
        return "nft"

    def tx_bytes(self) -> int:
        """Bytes this host has sent on eth0: the veth's count, with headers once per GSO packet (a few
        percent under what tbf counts for the same traffic)."""
        return _link_bytes(self.namespace, "eth0", "tx")

    def ruleset(self) -> str:
        return self.run("nft", "list", "ruleset").stdout


@dataclass
class TestNetwork:
    """*hosts* namespaces on one bridge (see the module docstring); use it as a context manager."""

    hosts_wanted: int
    workdir: Path
    # Hosts from this index on sit on a second link (bridge br1, 10.213.1.0/24); the switch namespace
    # routes between the two (10.213.0.1 and 10.213.1.1, each host's default route), unicast only:
    # nothing forwards multicast from one link to the other.
    second_link_from: Optional[int] = None
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    hosts: list[Host] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    __test__ = False  # not a pytest test class, despite the name

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def __enter__(self) -> "TestNetwork":
        cleanup_leftovers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        if self.hosts_wanted > 200:
            raise ValueError("at most 200 hosts fit the /24")
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        routed = self.second_link_from is not None
        if routed:
            _ip("-n", self.switch, "link", "add", "br1", "type", "bridge", "stp_state", "0", "forward_delay", "0")
            _ip("-n", self.switch, "link", "set", "br1", "up")
            for bridge, net in (("br0", SUBNET), ("br1", SUBNET2)):
                _ip("-n", self.switch, "addr", "add", f"{net}.1/24", "dev", bridge)
            subprocess.run(["ip", "netns", "exec", self.switch, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
                           check=True, capture_output=True)
        for n in range(self.hosts_wanted):
            second = routed and n >= self.second_link_from  # type: ignore[operator]
            net = SUBNET2 if second else SUBNET
            namespace, port, ip = f"{self.tag}-{n}", f"p{n}", f"{net}.{FIRST_HOST + n}"
            self._add_namespace(namespace)
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("-n", self.switch, "link", "set", port, "master", "br1" if second else "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", namespace, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            if routed:
                _ip("-n", namespace, "route", "add", "default", "via", f"{net}.1")
            self.hosts.append(Host(n, namespace, ip, port, self))
        self._wait_for_links()

    def _wait_for_links(self, deadline: float = 10.0) -> None:
        """Until every bridge port forwards (STP is off, so at once; the wait only covers carrier)."""
        end = time.monotonic() + deadline
        while True:
            shown = subprocess.run(["bridge", "-n", self.switch, "link", "show"], capture_output=True,
                                   text=True, timeout=30).stdout
            forwarding = {line.split(":")[1].strip().split("@")[0] for line in shown.splitlines()
                          if "state forwarding" in line}
            if all(h.port in forwarding for h in self.hosts):
                return
            if time.monotonic() > end:
                raise RuntimeError(f"bridge ports not forwarding after {deadline:g}s:\n{shown}")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop every daemon and helper process, then delete every namespace this network created."""
        for daemon in self.daemons:
            try:
                daemon.stop()
            except Exception:  # keep tearing down
                pass
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for name in reversed(self.created):
            remove_namespace(name)
        self.created.clear()

    # -- faults across hosts ---------------------------------------------------------------------

    def set_loss(self, percent: int, hosts: Optional[Iterable[Host]] = None) -> None:
        for host in self.hosts if hosts is None else hosts:
            host.set_loss(percent)

    def clear_loss(self) -> None:
        self.set_loss(0)

    def partition(self, side_a: Iterable[Host], side_b: Iterable[Host]) -> None:
        """Drop every frame between the two sides at the bridge; each side still talks among itself."""
        a = ", ".join(f'"{h.port}"' for h in side_a)
        b = ", ".join(f'"{h.port}"' for h in side_b)
        body = ("  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
                f"    iifname {{ {a} }} oifname {{ {b} }} drop\n"
                f"    iifname {{ {b} }} oifname {{ {a} }} drop\n  }}")
        _nft_script(self.switch, _replace_table("bridge", PARTITION_TABLE, body))

    def heal(self) -> None:
        _nft_script(self.switch, _replace_table("bridge", PARTITION_TABLE, ""))
