"""A tracker and peers in the test's reactor, over real loopback sockets (a harness, not tests).

Used by tests/test_integration.py and tests/test_private_network.py: ``Network`` starts a tracker
(private with a key) and peers in folders of its own, and stops every one at teardown;
``eventually`` waits for a condition with a deadline instead of sleeping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import task

from p2pshare import Peer, start_peer, start_tracker


def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until *check* holds, polling the real reactor (a deadline, not a sleep-as-assertion)."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await task.deferLater(reactor(), 0.02, lambda: None)
    assert check()


class Network:
    """A tracker and peers on 127.0.0.1; every one still running is stopped at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.tracker: Any = None
        self.address = ""  # the tracker's HOST:PORT once started
        self.peers: list[Peer] = []

    async def start_tracker(self, key: Any = None, interval: float = 1.0) -> str:
        self.tracker = await start_tracker(reactor(), "tcp:0:interface=127.0.0.1", interval=interval, key=key)
        self.address = f"127.0.0.1:{self.tracker.port.getHost().port}"
        return self.address

    async def add(self, files: Optional[dict[str, bytes]] = None, **options: Any) -> Peer:
        """A peer sharing *files* in a new folder; *options* go to ``start_peer`` (``key``, ``tracker``...)."""
        folder = self.base / f"peer{len(self.peers)}"
        folder.mkdir()
        for name, data in (files or {}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        options.setdefault("interface", "127.0.0.1")
        options.setdefault("refresh", 0.5)
        options.setdefault("dial_wait", 0.3)
        peer = await start_peer(reactor(), folder, **options)
        self.peers.append(peer)
        return peer

    async def chain(self, n: int, holder_files: dict[str, bytes], tracker: Optional[str] = None) -> list[Peer]:
        """Peers 0..n-1 where peer i knows only peer i+1; the last one holds *holder_files*."""
        peers: list[Peer] = []
        for i in reversed(range(n)):
            nxt = [("127.0.0.1", peers[0].udp_port)] if peers else []
            files = holder_files if i == n - 1 else {}
            peers.insert(0, await self.add(files, peers=tuple(nxt), tracker=tracker, want=0))
        return peers

    async def stop(self) -> None:
        for p in self.peers:
            if p.running:
                await p.stopService()
        if self.tracker is not None:
            await self.tracker.stopService()
