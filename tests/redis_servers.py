"""Real Redis servers for the tests (a harness, not tests): standalone, and a Redis Cluster.

Each server runs from ``redis-server`` on a free port at or below 55535 (a cluster node's bus
listens on port + 10000), in a folder of its own, without persistence, and is stopped at the
end.  Without ``redis-server`` (``.ci/run`` installs it) or the redis package, ``requires_redis``
skips with the reason.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import pytest

MAX_PORT = 55535  # the cluster bus listens on port + 10000


def unavailable_reason() -> Optional[str]:
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt install redis-server redis-tools; .ci/run does)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'p2pshare[redis]')"
    return None


requires_redis = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def free_port() -> int:
    """A free TCP port at or below MAX_PORT whose bus port (+ 10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > MAX_PORT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port at or below 55535")


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 (and a unix socket), in *folder*."""

    def __init__(self, folder: Path, cluster: bool = False, port: Optional[int] = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.unix = str(folder / "redis.sock")
        self.cluster = cluster
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", self.unix,
                "--save", "", "--appendonly", "no", "--dir", str(self.folder), "--logfile",
                str(self.folder / "redis.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.folder / "nodes.conf"),
                     # a replica may take over however long ago it last heard from its master
                     "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=timeout)
        return done.stdout.strip()

    def wait_ready(self, deadline: float = 10.0) -> None:
        end = time.monotonic() + deadline
        while self.cli("ping", timeout=2) != "PONG":
            if time.monotonic() > end or (self.proc is not None and self.proc.poll() is not None):
                log = (self.folder / "redis.log").read_text() if (self.folder / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server on {self.port} did not start: {log[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def memory_used(self) -> int:
        for line in self.cli("info", "memory").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise RuntimeError("no used_memory in INFO")


class RedisCluster:
    """Three masters with a replica each, made with ``redis-cli --cluster create``."""

    def __init__(self, folder: Path) -> None:
        self.nodes = [RedisServer(folder / f"node{i}", cluster=True) for i in range(6)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> "RedisCluster":
        for node in self.nodes:
            node.start()
        done = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                               "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        self.wait_ok()
        return self

    def wait_ok(self, deadline: float = 30.0) -> None:
        """Until every live node sees the cluster ok, and every live replica is in sync with its master."""
        end = time.monotonic() + deadline
        while True:
            alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            replication = [n.cli("info", "replication", timeout=2) for n in alive]
            if (all("cluster_state:ok" in n.cli("cluster", "info", timeout=2) for n in alive)
                    and all("master_link_status:up" in r for r in replication if "role:slave" in r)):
                return
            if time.monotonic() > end:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def masters(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None
                and "role:master" in n.cli("info", "replication", timeout=2)]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def keys_per_node(nodes: list[RedisServer], pattern: str) -> dict[int, int]:
    """How many keys match *pattern* on each node (``DBSIZE`` would count other tests' keys too)."""
    counts = {}
    for n in nodes:
        out = subprocess.run(["redis-cli", "-p", str(n.port), "eval",
                              "return #redis.call('keys', ARGV[1])", "0", pattern], capture_output=True, timeout=10)
        counts[n.port] = int(out.stdout.strip() or 0)
    return counts


def client(url: str) -> Any:
    from p2pshare.redis_registry import redis_client

    return redis_client(url)
