"""Shared fixtures.

pytest-twisted lets a leaked DelayedCall or an unhandled error in a Deferred
pass silently (trial would fail the test); the autouse fixture below fails
them instead.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a DelayedCall on the global reactor or an unhandled Deferred error."""
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())
    errors: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "twisted.internet.defer" and event.get("log_level").name == "critical":
            errors.append(str(event.get("log_failure") or event.get("debugInfo") or event))

    globalLogPublisher.addObserver(observe)
    try:
        yield
        gc.collect()  # unhandled Deferred errors are reported when the Deferred is collected
        leaked = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
        for call in leaked:
            call.cancel()
        assert not leaked, f"test left delayed calls behind: {leaked}"
        assert not errors, f"unhandled errors in Deferreds: {errors}"
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    return root
