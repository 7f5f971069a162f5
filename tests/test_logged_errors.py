"""The autouse ``no_leaks`` fixture fails a test for any failure or error it logs, unless flushed.

Each case runs in a pytest of its own (``pytester``), under this folder's conftest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CASES = '''
import gc

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python import log as legacy_log

log = Logger()


class Raises(Protocol):
    def dataReceived(self, data):
        raise ZeroDivisionError("raised in dataReceived")


class Closed(Protocol):
    def __init__(self):
        self.closed = Deferred()

    def connectionLost(self, reason):
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_exception_in_data_received():
    from twisted.internet import reactor
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Raises))
    try:
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await ep.connect(Factory.forProtocol(Closed))
        client.transport.write(b"x")
        await client.closed
    finally:
        await port.stopListening()


def test_log_failure():
    try:
        {}["missing"]
    except KeyError:
        log.failure("lookup failed")


def test_error_message():
    log.error("something went wrong: {what}", what="marker-message")


def test_legacy_log_err():
    legacy_log.err(OverflowError("legacy marker"), "legacy")


def test_unhandled_error_in_collected_deferred():
    fail(LookupError("collected marker"))
    gc.collect()


def test_flushed_error_passes(logged_errors):
    try:
        raise ValueError("expected")
    except ValueError:
        log.failure("expected failure")
    assert len(logged_errors.flush(ValueError)) == 1


def test_flushing_another_type_leaves_the_error(logged_errors):
    try:
        raise ArithmeticError("unexpected marker")
    except ArithmeticError:
        log.failure("unexpected failure")
    assert logged_errors.flush(KeyError) == []


def test_flushed_message_passes(logged_errors):
    log.error("expected trouble with {what}", what="disk")
    assert logged_errors.flush_messages("expected trouble") == ["expected trouble with disk"]


def test_flushed_error_of_a_collected_deferred_passes(logged_errors):
    fail(LookupError("expected"))
    gc.collect()
    assert len(logged_errors.flush(LookupError)) == 1


def test_warnings_and_info_pass():
    log.warn("a warning")
    log.info("some info")
'''


def test_each_unflushed_logged_error_fails_its_test_with_its_traceback(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_cases=CASES)
    outcome = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE")
    outcome.assert_outcomes(passed=10, errors=6)  # the fixture's teardown fails: an error in pytest's terms
    for name in ["test_exception_in_data_received", "test_log_failure", "test_error_message",
                 "test_legacy_log_err", "test_unhandled_error_in_collected_deferred",
                 "test_flushing_another_type_leaves_the_error"]:
        outcome.stdout.fnmatch_lines([f"ERROR test_cases.py::{name} - Failed: *"])
    text = outcome.stdout.str()
    for shown in ["ZeroDivisionError: raised in dataReceived", "KeyError: 'missing'", "marker-message",
                  "OverflowError: legacy marker", "LookupError: collected marker",
                  "ArithmeticError: unexpected marker"]:
        assert shown in text


def test_flush_needs_the_expected_types(logged_errors) -> None:
    with pytest.raises(TypeError):
        logged_errors.flush()
