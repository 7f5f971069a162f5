"""Bandwidth limits: the token bucket and the limiter (pure, on a Clock), then real transfers over
loopback held to a limit, shared fairly, and changed while they run; search and control stay quick."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from p2pshare.bandwidth import MIN_BURST, Limiter, TokenBucket, parse_rate, rate_text
from p2pshare.errors import TransferFailed
from tests.loopback import Network, eventually, reactor

MB = 1_000_000


# -- pure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "rate"), [
    ("0", 0), ("none", 0), ("500", 500), ("500k", 500_000), ("10M", 10_000_000), ("1.5MiB", 1_572_864),
    ("2G", 2_000_000_000), ("64KiB/s", 65_536), ("10 MB", 10_000_000),
])
def test_rates_take_si_and_binary_suffixes(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-1M", "10X", "1e6"])
def test_a_rate_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(text)


def test_rate_text() -> None:
    assert (rate_text(0), rate_text(10 * MB), rate_text(1500)) == ("unlimited", "10 MB/s", "1.5 kB/s")


def test_a_bucket_refills_at_its_rate_up_to_its_depth_and_carries_a_debt() -> None:
    bucket = TokenBucket(1 * MB, now=0.0)
    assert not bucket.in_debt(0.0) or bucket.level == 0  # starts empty: the first bytes wait a little
    bucket.charge(300_000, 0.0)  # a large read: a debt of 0.3 s
    assert bucket.in_debt(0.1) and bucket.until_positive(0.1) == pytest.approx(0.2, abs=1e-5)
    assert not bucket.in_debt(0.31)
    assert bucket.level == pytest.approx(10_000, rel=0.01)
    bucket.refill(100.0)
    assert bucket.level == max(MIN_BURST, 0.05 * MB)  # never more saved up than its depth


def test_an_unlimited_bucket_never_blocks() -> None:
    bucket = TokenBucket(0, now=0.0)
    bucket.charge(10 ** 12, 0.0)
    assert not bucket.in_debt(0.0) and bucket.until_positive(0.0) == 0.0


def test_the_limiter_moves_its_rate_and_turns_round_robin() -> None:
    """Three connections that always want more, one of them in bites three times larger: over 10 s
    they move rate * 10 s between them, in equal shares (deficit round robin)."""
    clock = Clock()
    limiter = Limiter(clock, 1 * MB)
    moved = {"a": 0, "b": 0, "c": 0}

    def turn(name: str) -> None:
        while not limiter.blocked():
            n = limiter.slice(256 * 1024) * (3 if name == "a" else 1)  # a takes bigger bites
            limiter.charge(n, name)
            moved[name] += n
        limiter.wait(name, lambda: turn(name))

    for name in moved:
        turn(name)
    for _ in range(10_000):
        clock.advance(0.001)
    total = sum(moved.values())
    assert total == pytest.approx(10 * MB, rel=0.02)
    assert max(moved.values()) - min(moved.values()) <= 0.05 * total / 3


def test_a_new_rate_applies_at_once_and_unlimited_resumes_everyone() -> None:
    clock = Clock()
    limiter = Limiter(clock, 1000)
    limiter.charge(10_000)  # ten seconds of debt at this rate
    resumed: list[str] = []
    limiter.wait("x", lambda: resumed.append("x"))
    clock.advance(1.0)
    assert resumed == []
    limiter.set_rate(0)
    clock.advance(0.0)
    assert resumed == ["x"]


def test_a_connection_that_went_away_is_not_resumed() -> None:
    clock = Clock()
    limiter = Limiter(clock, 1000)
    limiter.charge(5000)
    resumed: list[str] = []
    limiter.wait("gone", lambda: resumed.append("gone"))
    limiter.forget("gone")
    clock.advance(10.0)
    assert resumed == [] and not clock.getDelayedCalls()


# -- real transfers over loopback ----------------------------------------------------------------

def payload(size: int) -> bytes:
    block = hashlib.sha256(b"bandwidth").digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


async def received_over(peers: list[Any], seconds: float, warmup: float = 1.0) -> list[int]:
    """Bytes each peer's download received over *seconds*, after *warmup*."""
    def got(p: Any) -> int:
        return sum(f.download.received for f in p.fetcher.fetches.values() if f.download is not None)

    await task.deferLater(reactor(), warmup, lambda: None)
    before = [got(p) for p in peers]
    await task.deferLater(reactor(), seconds, lambda: None)
    return [got(p) - b for p, b in zip(peers, before)]


@pytest_twisted.ensureDeferred
async def test_an_upload_limit_holds_a_transfer_within_10_percent_over_10_seconds(net: Network) -> None:
    limit = 2 * MB
    holder = await net.add({"big.bin": payload(40 * MB)}, max_upload_rate=limit)
    requester = await net.add(peers=(("127.0.0.1", holder.udp_port),))
    fetching = requester.fetch("big.bin", timeout=60.0)
    (moved,) = await received_over([requester], 10.0)
    assert moved == pytest.approx(limit * 10, rel=0.10)
    fetching.addErrback(lambda f: f.trap(CancelledError))
    fetching.cancel()
    await eventually(lambda: not requester.fetcher.fetches)


@pytest_twisted.ensureDeferred
async def test_two_downloads_under_one_download_limit_share_it_and_search_and_control_are_not_starved(
        net: Network) -> None:
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from p2pshare.control import ControlService
    from tests.test_control_and_options import TOKENS, call

    limit = 3 * MB
    h1 = await net.add({"one.bin": payload(40 * MB), "small.txt": b"found"})
    h2 = await net.add({"two.bin": payload(40 * MB) + b"2"})
    requester = await net.add(peers=(("127.0.0.1", h1.udp_port), ("127.0.0.1", h2.udp_port)),
                              max_download_rate=limit)
    control = ControlService(TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1"), requester)
    control.startService()
    await control.when_listening()
    TOKENS[control.url] = control.token
    try:
        one, two = requester.fetch("one.bin", timeout=60.0), requester.fetch("two.bin", timeout=60.0)
        moved = await received_over([requester], 10.0)
        assert moved[0] == pytest.approx(limit * 10, rel=0.10)
        shares = [f.download.received for f in requester.fetcher.fetches.values()]
        assert len(shares) == 2 and min(shares) >= 0.8 * max(shares)
        # While both saturate the limit, a search and the control API answer at once.
        started = time.monotonic()
        hits = await requester.search("small.txt", timeout=2.0)
        code, body = await call(control.url + "/v1/status")
        assert hits and code == 200 and json.loads(body)["limits"] == {"upload": 0, "download": limit}
        assert time.monotonic() - started < 2.5  # the search's own timeout, plus the status
        for d in (one, two):
            d.addErrback(lambda f: f.trap(CancelledError))
            d.cancel()
        await eventually(lambda: not requester.fetcher.fetches)
    finally:
        TOKENS.pop(control.url, None)
        await control.stopService()


@pytest_twisted.ensureDeferred
async def test_a_limit_changed_through_the_control_api_applies_to_transfers_under_way(net: Network) -> None:
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from p2pshare.control import ControlService
    from tests.test_control_and_options import TOKENS, call

    holder = await net.add({"big.bin": payload(30 * MB)})
    requester = await net.add(peers=(("127.0.0.1", holder.udp_port),), max_download_rate=1 * MB)
    control = ControlService(TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1"), requester)
    control.startService()
    await control.when_listening()
    TOKENS[control.url] = control.token
    try:
        fetching = requester.fetch("big.bin", timeout=60.0)
        fetching.addErrback(lambda f: f.trap(TransferFailed))  # should an assertion below end the test first
        (slow,) = await received_over([requester], 2.0)
        assert slow == pytest.approx(2 * MB, rel=0.15)
        code, body = await call(control.url + "/v1/limits", b"POST", b'{"download": "none", "upload": "5M"}')
        assert (code, json.loads(body)) == (200, {"upload": 5 * MB, "download": 0})
        result = await fetching
        assert result is not None and result.size == 30 * MB  # the rest came unlimited
        code, body = await call(control.url + "/v1/limits", b"POST", b'{"download": "fast"}')
        assert code == 400 and b"is not a rate" in body
        assert requester.limits.status() == {"upload": 5 * MB, "download": 0}
    finally:
        TOKENS.pop(control.url, None)
        await control.stopService()
