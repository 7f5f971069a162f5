"""The loss tests of tests/test_multihost.py once more, on IPv6 only: the same ring of ten peers and a
tracker in network namespaces, each host holding a ULA address (fd00:213::/64) and no IPv4 address, the
peers dual-stack (``--interface ::``), the tracker on ``tcp6``.  A module of its own, so that its network
is built after the IPv4 ring's is gone (the harness holds one network per process at a time)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.test_multihost import Ring, build_ring, loss_scenario, pytestmark, report  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def summary_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The IPv4 ring's summary, continued."""
    path = tmp_path_factory.getbasetemp() / "multihost-summary.txt"
    with path.open("a") as f:
        f.write("-- the same ring on IPv6 only\n")
    return path


@pytest.fixture(scope="module")
def ring6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ring]:
    yield from build_ring(tmp_path_factory, ipv6=True)


def test_a6_20_percent_udp_loss_on_ipv6_99_percent_of_200_searches_find_within_5s(
        ring6: Ring, report: Callable[[str], str]) -> None:  # noqa: F811
    loss_scenario(ring6, report, loss=20, count=200, deadline=5.0, need=0.99, end_within=5.0 + 1.0)


def test_b6_40_percent_udp_loss_on_ipv6_95_percent_of_100_searches_find_within_15s_all_end_within_30s(
        ring6: Ring, report: Callable[[str], str]) -> None:  # noqa: F811
    loss_scenario(ring6, report, loss=40, count=100, deadline=15.0, need=0.95, end_within=30.0)
