"""p2pshare: peer-to-peer file sharing on Twisted.

Start a tracker and peers inside any reactor::

    tracker = await start_tracker(reactor, "tcp:0:interface=127.0.0.1")
    peer = await start_peer(reactor, "files", tracker=f"127.0.0.1:{tracker.port.getHost().port}")
    hits = await peer.search("notes.txt")
    result = await peer.fetch("notes.txt")   # a FetchResult; the file is in "files/"
    await peer.stopService()
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from p2pshare.errors import (AlreadyExists, AmbiguousName, InvalidName, NotFound, P2PError, TrackerError,
                             TransferFailed, VerificationFailed)

if TYPE_CHECKING:
    from p2pshare.peer import FetchResult, Peer
    from p2pshare.tracker import TrackerService
    from p2pshare.wire import Hit

# Imported when first used: a tracker process never loads the peer's modules (the download, the disk
# worker, the search), nor a peer the tracker's.
_LAZY = {"FetchResult": "p2pshare.peer", "Peer": "p2pshare.peer", "TrackerFactory": "p2pshare.tracker",
         "TrackerService": "p2pshare.tracker", "Hit": "p2pshare.wire"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pshare' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "AmbiguousName", "FetchResult", "Hit", "InvalidName", "NotFound", "P2PError", "Peer",
    "TrackerError",
    "TrackerService", "TransferFailed", "VerificationFailed", "start_peer", "start_tracker",
]


async def start_tracker(reactor: Any, endpoint: str = "tcp:0:interface=127.0.0.1", max_peers: int = 20,
                        interval: float = 10.0, max_per_address: int = 32, key: Any = None) -> TrackerService:
    """Start a tracker listening on a server endpoint string; returns the running service.

    With *key* (a :class:`p2pshare.netkey.NetworkKey`), only holders of that key can use it.
    """
    from twisted.internet.endpoints import serverFromString

    from p2pshare.tracker import TrackerFactory, TrackerService

    service = TrackerService(serverFromString(reactor, endpoint),
                             TrackerFactory(reactor, max_peers=max_peers, interval=interval,
                                            max_per_address=max_per_address), key=key)
    service.startService()
    await service.when_listening()
    return service


async def start_peer(reactor: Any, directory: Union[str, Path], tracker: Union[str, Sequence[str], None] = None,
                     **options: Any) -> Peer:
    """Start a peer sharing *directory*; *tracker* is ``HOST:PORT`` or a client endpoint string, or a
    list of them (the peer uses one, and moves to the next when it fails).

    Other keyword arguments go to :class:`Peer` (``port``, ``interface``, ``peers``, ``want``, ...).
    Returns once its sockets listen and its folder is indexed.
    """
    from p2pshare.peer import Peer
    from p2pshare.tap import trackers_endpoint

    endpoint = trackers_endpoint(reactor, [tracker] if isinstance(tracker, str) else list(tracker)) if tracker else None
    peer = Peer(directory, tracker=endpoint, reactor=reactor, **options)
    peer.startService()
    await peer.when_ready()
    return peer
