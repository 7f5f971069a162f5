"""Shared fixtures.

pytest-twisted lets a leaked DelayedCall or a logged error pass silently
(trial would fail the test); the autouse fixture below fails them instead.  A
test that provokes a logged error on purpose takes the ``logged_errors``
fixture and flushes what it expects, as trial's ``flushLoggedErrors`` does.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Optional

import pytest
import pytest_twisted
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from tests.loopback import Network

_ERROR_LEVELS = (LogLevel.error, LogLevel.critical)
_DEFERRED_HEADER = "Unhandled error in Deferred:"


class LoggedErrors:
    """The log observer behind ``no_leaks``: every event that carries a failure or is logged at
    error level or above, in the order logged.  Thread-safe enough: events from the threadpool are
    only appended."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_format") == _DEFERRED_HEADER and event.get("log_namespace") == "twisted.internet.defer":
            return  # the failure follows in an event of its own
        if _failure_of(event) is not None or event.get("log_level") in _ERROR_LEVELS:
            self.events.append(event)

    def flush(self, *types: type[BaseException]) -> list[Failure]:
        """Remove and return the logged failures of any of *types* (at least one: say what is
        expected); the test should assert on what it gets back."""
        if not types:
            raise TypeError("flush() needs the exception types the test expects")
        flushed = [e for e in self.events if (f := _failure_of(e)) is not None and f.check(*types)]
        self.events = [e for e in self.events if not any(e is f for f in flushed)]
        return [_failure_of(e) for e in flushed]  # type: ignore[misc]

    def flush_messages(self, fragment: str) -> list[str]:
        """Remove and return the error-level events without a failure whose text contains
        *fragment* (for errors logged as a message, not an exception)."""
        texts = [(e, formatEvent(e)) for e in self.events if _failure_of(e) is None]
        flushed = [(e, t) for e, t in texts if fragment in t]
        self.events = [e for e in self.events if not any(e is f for f, _ in flushed)]
        return [t for _, t in flushed]

    def report(self) -> str:
        """Each event's text and the traceback of its failure."""
        return "\n".join(_text(e) for e in self.events)


def _text(event: LogEvent) -> str:
    failure = _failure_of(event)
    text = f"[{event.get('log_namespace', '-')}] {formatEvent(event)}"
    if failure is None or "Traceback" in text:  # a legacy event's text has the traceback already
        return text
    return f"{text}\n{failure.getTraceback()}"


def _failure_of(event: LogEvent) -> Optional[Failure]:
    """The failure a new-style (``log_failure``) or legacy (``log.err``: ``failure``) event carries."""
    failure = event.get("log_failure", event.get("failure"))
    return failure if isinstance(failure, Failure) else None


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[LoggedErrors]:
    """Fail a test that leaves a DelayedCall on the global reactor, or that logs a failure (an
    exception in ``dataReceived``, an unhandled error in a collected Deferred, ``log.failure``) or
    an error-level event it did not flush through ``logged_errors``."""
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())
    logged = LoggedErrors()
    globalLogPublisher.addObserver(logged)
    try:
        yield logged
        gc.collect()  # unhandled Deferred errors are logged when the Deferred is collected
        leaked = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
        for call in leaked:
            call.cancel()
        assert not leaked, f"test left delayed calls behind: {leaked}"
        if logged.events:
            pytest.fail(f"errors were logged during the test:\n{logged.report()}", pytrace=False)
    finally:
        globalLogPublisher.removeObserver(logged)


@pytest.fixture
def logged_errors(no_leaks: LoggedErrors) -> LoggedErrors:
    """The errors logged so far in this test, for a test that provokes some on purpose: flush the
    expected ones (``logged_errors.flush(SomeError)``); any left fail the test."""
    return no_leaks


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    return root


@pytest_twisted.async_yield_fixture
async def net(tmp_path: Path) -> AsyncIterator["Network"]:
    """A tracker and peers over loopback (tests/loopback.py), each stopped at the end of the test."""
    from tests.loopback import Network

    network = Network(tmp_path)
    yield network
    await network.stop()
