"""A small swarm in network namespaces: the correctness version of benchmark 3 (benchmarks/swarm.py).

The same scenario as the benchmark, smaller: a tracker, one holder of an 8 MiB file and four
peers, each a ``twistd p2ppeer`` daemon in its own namespace (tests/netns.py), every host's
link limited to 40 Mbit/s both ways (``Host.rate_limit``: tc tbf, or nftables policing where
tbf is missing).  The four peers ask for the file at the same moment, through their control
APIs.  Nothing here is timed (the benchmark measures T / T_min); the tests check that

- every peer ends with a byte-identical copy (SHA-256) and nothing partial or stray is left in
  its shared folder or its state folder;
- the holder uploaded less than N copies of the file (its ``bytes_sent`` counter), i.e. the
  peers served each other pieces.  Without swarming every peer downloads from the holder
  alone and the holder uploads N copies.

One swarm round serves both tests (module fixture, about 15 s including the namespaces).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from benchmarks.daemons import BenchmarkError
from benchmarks.swarm import Swarm
from netns import requires_netns

pytestmark = [pytest.mark.netns, requires_netns]

PEERS = 4
SIZE = 8 * 1024 * 1024
RATE = 40_000_000  # bits/s, every link, both ways
FETCH_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def swarm_round(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Build the network, let every peer fetch the file at once; the round's outcome (or its error)."""
    root = tmp_path_factory.mktemp("swarm")
    source = root / "source.bin"
    data = os.urandom(SIZE)
    source.write_bytes(data)
    with Swarm(root / "net", PEERS, RATE, source, fetch_timeout=FETCH_TIMEOUT) as swarm:
        try:
            outcome: dict[str, Any] = swarm.swarm_round()
        except BenchmarkError as e:
            outcome = {"error": str(e)}
        outcome.update(swarm=swarm, sha256=hashlib.sha256(data).hexdigest(), logs=swarm.logs())
        yield outcome


def test_swarm_every_peer_ends_with_an_identical_file_and_nothing_partial(swarm_round: dict[str, Any]) -> None:
    assert "error" not in swarm_round, swarm_round["error"]
    swarm: Swarm = swarm_round["swarm"]
    assert swarm_round["problems"] == [], f"{swarm_round['problems']}{swarm_round['logs']}"
    for k in range(1, PEERS + 1):
        done = swarm_round["results"][k]["done"]
        assert done["sha256"] == swarm_round["sha256"] and done["size"] == SIZE, done
        path = Path(done["path"])
        assert path == swarm.dir(k) / swarm.name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == swarm_round["sha256"]


def test_swarm_holder_uploads_less_than_n_copies(swarm_round: dict[str, Any]) -> None:
    assert "error" not in swarm_round, swarm_round["error"]
    sent = swarm_round["bytes_sent"]
    assert sent is not None, "the holder's /v1/status has no bytes_sent counter"
    on_wire = swarm_round["tx_bytes"]
    assert sent < PEERS * SIZE, (
        f"the holder sent {sent / SIZE:.2f} copies of the file ({on_wire / SIZE:.2f} on the wire) to {PEERS} "
        f"peers: they did not serve each other; sources per download: {swarm_round['sources']}")
