"""The control API over loopback HTTP, the plugins' option parsing, and the CLI's own behaviour."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python import usage
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from p2pshare import cli, start_peer
from p2pshare.control import ControlService
from p2pshare.tap import PeerOptions, TrackerOptions, control_endpoint_string


def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[str, Any, Any]]:
    """A holder and a requester linked directly; the requester's control API on a free port."""
    (tmp_path / "h").mkdir()
    (tmp_path / "r").mkdir()
    (tmp_path / "h" / "doc.txt").write_bytes(b"contents " * 1000)
    holder = await start_peer(reactor(), tmp_path / "h", interface="127.0.0.1", dial_wait=0.2)
    requester = await start_peer(reactor(), tmp_path / "r", interface="127.0.0.1",
                                 peers=(("127.0.0.1", holder.udp_port),), dial_wait=0.2)
    control = ControlService(TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1"), requester)
    control.startService()
    while control.port is None:
        from twisted.internet import task

        await task.deferLater(reactor(), 0.01, lambda: None)
    TOKENS[control.url] = control.token
    yield control.url, requester, holder
    TOKENS.pop(control.url, None)
    await control.stopService()
    await requester.stopService()
    await holder.stopService()


TOKENS: dict[str, str] = {}  # control URL -> its token, while the api fixture runs
OWN = object()


async def call(url: str, method: bytes = b"GET", body: bytes | None = None,
               host: bytes | None = None, token: Any = OWN, **extra: bytes) -> tuple[int, bytes]:
    """A request to the API at *url*, with the token of that API (or *token*; None: no Authorization)."""
    from twisted.web.client import FileBodyProducer

    headers = Headers({b"content-type": [b"application/json"]})
    if token is OWN:
        token = next((t for u, t in TOKENS.items() if url.startswith(u)), None)
    if token is not None:
        headers.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    if host:
        headers.setRawHeaders(b"host", [host])
    for name, value in extra.items():
        headers.setRawHeaders(name.replace("_", "-").encode(), [value])
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    response = await Agent(reactor()).request(method, url.encode(), headers, producer)
    return response.code, await readBody(response)


@pytest_twisted.ensureDeferred
async def test_status_reports_identity_addresses_and_counters(api: Any) -> None:
    url, requester, _ = api
    code, body = await call(url + "/v1/status")
    status = json.loads(body)
    assert code == 200
    assert (status["peer"], status["udp"], status["tcp"]) == (requester.peer_id, requester.udp_port,
                                                               requester.tcp_port)
    assert status["neighbours"] and status["files"] == 0 and isinstance(status["counters"], dict)
    written = json.loads((requester.shares.state / "control.json").read_text())
    assert written == {"url": url}


@pytest_twisted.ensureDeferred
async def test_api_calls_leave_no_access_log_line(api: Any) -> None:
    """Twisted's ``Site`` logs a line per request; a local API that a script may call thousands of
    times (a fetch of each small file is one call) logs only what goes wrong."""
    from twisted.logger import globalLogPublisher

    url, _, _ = api
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(3):
            code, _body = await call(url + "/v1/status")
            assert code == 200
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not [line for line in seen if "/v1/status" in line], seen


@pytest_twisted.ensureDeferred
async def test_search_lists_the_holders(api: Any) -> None:
    url, _, holder = api
    code, body = await call(url + "/v1/search?name=doc.txt&timeout=0.5")
    hits = json.loads(body)["hits"]
    assert code == 200
    assert [(h["name"], h["size"], h["peer"]) for h in hits] == [("doc.txt", 9000, holder.peer_id)]


@pytest_twisted.ensureDeferred
async def test_get_streams_progress_then_done(api: Any) -> None:
    url, requester, _ = api
    code, body = await call(url + "/v1/get", b"POST", json.dumps({"name": "doc.txt", "timeout": 5}).encode())
    events = [json.loads(line) for line in body.splitlines()]
    assert code == 200
    assert events[0] == {"event": "searching", "name": "doc.txt", "sha256": ""}
    assert events[-2] == {"event": "progress", "received": 9000, "size": 9000}
    assert events[-1]["event"] == "done" and events[-1]["size"] == 9000
    assert (requester.shares.root / "doc.txt").read_bytes() == b"contents " * 1000


@pytest_twisted.ensureDeferred
async def test_get_of_a_missing_name_ends_with_an_error_event(api: Any) -> None:
    url, _, _ = api
    _, body = await call(url + "/v1/get", b"POST", json.dumps({"name": "nope", "timeout": 0.3}).encode())
    last = json.loads(body.splitlines()[-1])
    assert last["event"] == "error" and "nope" in last["message"]


@pytest_twisted.ensureDeferred
async def test_bad_requests_are_answered_400(api: Any) -> None:
    url, _, _ = api
    assert (await call(url + "/v1/search?timeout=1"))[0] == 400
    assert (await call(url + "/v1/search?name=x&timeout=-4"))[0] == 400
    assert (await call(url + "/v1/get", b"POST", b"not json"))[0] == 400


@pytest_twisted.ensureDeferred
async def test_a_body_labelled_as_a_form_is_refused_by_the_api_not_parsed(api: Any) -> None:
    """The API reads JSON bodies only and says so (415) for any other content type; Twisted does not
    parse a POST body as a MIME form first (work on every POST, and its own 400 and a closed
    connection for a body that is not a well-formed form)."""
    url, _, _ = api
    code, body = await call(url + "/v1/get", b"POST", json.dumps({"name": "doc.txt", "timeout": 5}).encode(),
                            content_type=b"multipart/form-data; boundary=xyz")
    assert code == 415 and b"application/json" in body


@pytest_twisted.ensureDeferred
async def test_a_foreign_host_header_is_refused(api: Any) -> None:
    url, _, _ = api
    code, body = await call(url + "/v1/status", host=b"evil.example:7878")
    assert code == 403


@pytest_twisted.ensureDeferred
async def test_cross_site_requests_are_refused(api: Any) -> None:
    url, _, _ = api
    assert (await call(url + "/v1/status", origin=b"https://evil.example"))[0] == 403
    assert (await call(url + "/v1/status", origin=b"http://127.0.0.1:7878"))[0] == 200
    form = {"content_type": b"application/x-www-form-urlencoded"}
    assert (await call(url + "/v1/get", b"POST", b"name=x", **form))[0] == 415


@pytest_twisted.ensureDeferred
async def test_rescan_finds_files_added_later(api: Any) -> None:
    url, requester, _ = api
    (requester.shares.root / "new.txt").write_bytes(b"n")
    code, body = await call(url + "/v1/rescan", b"POST")
    assert (code, json.loads(body)) == (200, {"files": 1})


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("7878", "tcp:7878:interface=127.0.0.1"),
    ("tcp:0", "tcp:0:interface=127.0.0.1"),
    ("tcp:9000:interface=\\:\\:1", "tcp:9000:interface=\\:\\:1"),
    ("none", None),
])
def test_control_endpoints_stay_on_loopback(value: str, expected: str | None) -> None:
    assert control_endpoint_string(value) == expected


@pytest.mark.parametrize("value", ["tcp:9000:interface=0.0.0.0", "unix:/tmp/x", "banana", "99999"])
def test_control_endpoints_off_loopback_are_usage_errors(value: str) -> None:
    with pytest.raises(usage.UsageError):
        control_endpoint_string(value)


def test_tracker_port_accepts_numbers_and_endpoint_strings() -> None:
    from p2pshare.tap import dual_stack

    both = "tcp6:8000:interface=\\:\\:" if dual_stack() else "tcp:8000"  # a number: every family there is
    for value, expected in (("8000", both), ("tcp:8000:interface=127.0.0.1", "tcp:8000:interface=127.0.0.1")):
        opts = TrackerOptions()
        opts.parseOptions(["--port", value])
        assert opts["port"] == expected


def test_peer_options_need_a_tracker_or_a_peer_and_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="tracker"):
        PeerOptions().parseOptions(["--dir", str(tmp_path), "--no-lan"])
    with pytest.raises(usage.UsageError, match="loopback"):  # no LAN to find others on
        PeerOptions().parseOptions(["--dir", str(tmp_path), "--interface", "127.0.0.1"])
    lan_only = PeerOptions()
    lan_only.parseOptions(["--dir", str(tmp_path)])  # on a LAN, neither is needed
    assert (lan_only["tracker"], lan_only["peers"], lan_only["no-lan"]) == ([], [], 0)
    with pytest.raises(usage.UsageError, match="not a folder"):
        PeerOptions().parseOptions(["--tracker", "localhost:8000", "--dir", str(tmp_path / "missing")])
    opts = PeerOptions()
    opts.parseOptions(["--tracker", "localhost:8000", "--dir", str(tmp_path), "--peer", "10.0.0.1:5000",
                       "--peer", "[::1]:6000"])
    assert opts["peers"] == [("10.0.0.1", 5000), ("::1", 6000)]
    assert opts["control"] == "tcp:7878:interface=127.0.0.1"


# -- CLI ----------------------------------------------------------------------------------


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_an_unreachable_daemon_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--control", "127.0.0.1:1", "status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no peer answers" in err and "Traceback" not in err


def test_a_folder_without_a_running_peer_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--dir", str(tmp_path), "status"]) == 1
    assert "no running peer" in capsys.readouterr().err


def test_the_progress_bar_is_quiet_when_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = cli.Progress("f", stream)
    bar.update(50, 100)
    bar.close()
    assert stream.getvalue() == ""


def test_the_progress_bar_draws_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = cli.Progress("file.bin", stream)
    bar.update(50, 100)
    bar.close()
    assert "file.bin" in stream.getvalue() and "50.0%" in stream.getvalue()
    assert stream.getvalue().endswith("\n")


def test_peers_against_a_dead_tracker_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["peers", "--tracker", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert "no tracker answers" in capsys.readouterr().err




@pytest.mark.parametrize("argv,expected", [
    (["get", "a.txt"], ("a.txt", "")),
    (["get", "sha256:" + "AB" * 32], ("", "ab" * 32)),
    (["get", "a.txt", "--hash", "cd" * 32], ("a.txt", "cd" * 32)),
])
def test_names_and_hashes_on_the_command_line(argv: list[str], expected: tuple[str, str]) -> None:
    assert cli.what(cli.parser().parse_args(argv)) == expected


def test_a_malformed_hash_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--control", "127.0.0.1:1", "get", "sha256:xyz"]) == 1
    assert "not a SHA-256" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_a_get_body_that_is_not_an_object_is_a_bad_request(api: Any) -> None:
    url, _, _ = api
    assert (await call(url + "/v1/get", b"POST", b"[1, 2]"))[0] == 400


# -- the token ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_without_the_token_are_refused_401(api: Any) -> None:
    url, _, _ = api
    for method, path, body in ((b"GET", "/v1/status", None), (b"GET", "/v1/search?name=doc.txt&timeout=0.2", None),
                               (b"POST", "/v1/get", b'{"name": "doc.txt"}'), (b"POST", "/v1/rescan", None)):
        code, reply = await call(url + path, method, body, token=None)
        assert code == 401, (path, reply)
        assert json.loads(reply)["error"] == "Unauthorized"
        assert "control.token" in json.loads(reply)["message"]


@pytest.mark.parametrize("header", [
    b"Bearer " + b"0" * 64,  # well formed, wrong
    b"Bearer ",
    b"Bearer",
    b"Basic dXNlcjpwYXNz",
    b"",
])
@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_refused_401(api: Any, header: bytes) -> None:
    url, _, _ = api
    assert (await call(url + "/v1/status", token=None, authorization=header))[0] == 401


@pytest_twisted.ensureDeferred
async def test_the_right_token_is_accepted_and_the_scheme_is_case_insensitive(api: Any) -> None:
    url, _, _ = api
    token = TOKENS[url]
    assert (await call(url + "/v1/status", token=token))[0] == 200
    assert (await call(url + "/v1/status", token=None, authorization=f"bearer {token}".encode()))[0] == 200
    assert (await call(url + "/v1/status", token=token[:-1]))[0] == 401
    assert (await call(url + "/v1/status", token=token + "0"))[0] == 401


@pytest_twisted.ensureDeferred
async def test_the_token_does_not_lift_the_host_and_origin_checks(api: Any) -> None:
    url, _, _ = api
    assert (await call(url + "/v1/status", host=b"evil.example:7878"))[0] == 403
    assert (await call(url + "/v1/status", origin=b"https://evil.example"))[0] == 403


@pytest_twisted.ensureDeferred
async def test_the_token_file_is_0600_in_the_state_folder_and_matches_the_service(api: Any) -> None:
    import stat

    url, requester, _ = api
    path = requester.shares.state / "control.token"
    mode = stat.S_IMODE(path.lstat().st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_ISREG(path.lstat().st_mode)
    assert path.read_text().strip() == TOKENS[url]
    assert len(TOKENS[url]) == 64 and int(TOKENS[url], 16) >= 0
    assert [p.name for p in requester.shares.state.iterdir() if p.name.startswith("control.token")] == \
        ["control.token"]  # no temporary file left behind


@pytest_twisted.ensureDeferred
async def test_a_library_control_service_makes_its_own_token_and_reuses_only_a_safe_one(tmp_path: Path) -> None:
    import os

    from p2pshare.control import ControlService, ensure_token

    peer = await start_peer(reactor(), tmp_path, interface="127.0.0.1", peers=(("127.0.0.1", 9),))
    try:
        control = ControlService(TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1"), peer)
        assert control.token_path == peer.shares.state / "control.token"
        control.startService()
        await control.when_listening()
        first = control.token
        assert first and control.token_path.read_text().strip() == first
        await control.stopService()
        assert control.token_path.exists()  # kept: a CLI holding it keeps working after a restart
        control = ControlService(TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1"), peer)
        control.startService()
        await control.when_listening()
        assert control.token == first
        code, _ = await call(control.url + "/v1/status", token=first)
        assert code == 200
        await control.stopService()
        # A token others could have read (or written) is replaced, not reused.
        os.chmod(control.token_path, 0o644)
        second = ensure_token(control.token_path)
        assert second != first and (control.token_path.stat().st_mode & 0o777) == 0o600
        # So is a symlink planted in its place (its target is left alone).
        target = tmp_path / "planted"
        target.write_text("a" * 64 + "\n")
        os.chmod(target, 0o600)
        control.token_path.unlink()
        control.token_path.symlink_to(target)
        third = ensure_token(control.token_path)
        assert third != "a" * 64 and not control.token_path.is_symlink()
        assert target.read_text() == "a" * 64 + "\n"
    finally:
        await peer.stopService()


async def _cli(*argv: str) -> int:
    """``p2pshare ARGV`` in a thread: it blocks on HTTP while the reactor serves the API."""
    from twisted.internet.threads import deferToThread

    return await deferToThread(cli.main, list(argv))


@pytest_twisted.ensureDeferred
async def test_the_cli_reads_the_token_of_the_peer_it_finds_with_dir(api: Any,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, requester, _ = api
    assert await _cli("--dir", str(requester.shares.root), "status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["peer"] == requester.peer_id
    assert await _cli("--dir", str(requester.shares.root), "search", "doc.txt", "--timeout", "0.3") == 0
    assert capsys.readouterr().out.startswith("doc.txt\t9000\t")


@pytest_twisted.ensureDeferred
async def test_the_cli_takes_a_token_file(api: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url, requester, _ = api
    monkeypatch.chdir(tmp_path)  # no token to be found around the current folder
    address = url.split("//", 1)[1]
    token_file = str(requester.shares.state / "control.token")
    assert await _cli("--control", address, "--token-file", token_file, "status") == 0
    assert requester.peer_id in capsys.readouterr().out
    # Without one: the peer refuses, and the CLI says what to give it.
    assert await _cli("--control", address, "status") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token-file" in err and "Traceback" not in err
    # A wrong one: refused too.
    wrong = tmp_path / "wrong.token"
    wrong.write_text("0" * 64 + "\n")
    assert await _cli("--control", address, "--token-file", str(wrong), "status") == 1
    assert "control token" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_a_missing_token_file_is_one_line_and_exit_1(api: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    url, requester, _ = api
    assert await _cli("--control", url.split("//", 1)[1], "--token-file", str(tmp_path / "nope"), "status") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the control token" in err and "nope" in err
    (requester.shares.state / "control.token").unlink()
    assert await _cli("--dir", str(requester.shares.root), "status") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the control token" in err and "Traceback" not in err


async def _status(url: str) -> dict[str, Any]:
    code, body = await call(url + "/v1/status")
    assert code == 200
    return json.loads(body)


@pytest_twisted.ensureDeferred
async def test_a_fetch_started_for_the_dashboard_runs_on_its_own_and_lists_the_new_file(api: Any) -> None:
    from tests.loopback import eventually

    url, requester, _ = api
    code, body = await call(url + "/v1/files")
    assert code == 200 and json.loads(body) == {"version": requester.shares.generation, "files": []}
    before = (await _status(url))["files_version"]

    code, body = await call(url + "/v1/fetches", b"POST", json.dumps({"name": "doc.txt"}).encode())
    assert code == 202
    fid = json.loads(body)["id"]
    await eventually(lambda: any(f["id"] == fid for f in requester.fetcher.history))
    status = await _status(url)
    assert status["fetching"] == {}
    done = status["fetched"][0]
    assert (done["id"], done["name"], done["outcome"], done["error"], done["size"]) == (fid, "doc.txt", "completed",
                                                                                     "", 9000)
    assert status["files_version"] != before
    code, body = await call(url + "/v1/files")
    assert json.loads(body)["files"] == [{"name": "doc.txt", "size": 9000,
                                          "sha256": requester.shares.entries["doc.txt"].sha256}]
    code, body = await call(url + "/v1/fetches", b"POST", json.dumps({"name": "doc.txt"}).encode())
    assert code == 409 and json.loads(body)["error"] == "AlreadyExists"


@pytest_twisted.ensureDeferred
async def test_cancel_ends_a_fetch_in_progress_and_says_why(api: Any) -> None:
    url, requester, _ = api
    code, body = await call(url + "/v1/fetches", b"POST", json.dumps({"name": "nobody-has.txt", "timeout": 60}).encode())
    assert code == 202
    fid = json.loads(body)["id"]
    fetching = (await _status(url))["fetching"]["nobody-has.txt"]
    assert (fetching["id"], fetching["state"], fetching["received"]) == (fid, "searching", 0)
    code, body = await call(url + "/v1/cancel", b"POST", json.dumps({"id": fid}).encode())
    assert (code, json.loads(body)) == (200, {"cancelled": fid})
    status = await _status(url)
    assert status["fetching"] == {}
    assert (status["fetched"][0]["outcome"], status["fetched"][0]["error"]) == ("cancelled", "nobody-has.txt: cancelled")
    assert status["counters"]["fetches_cancelled"] == 1
    code, _ = await call(url + "/v1/cancel", b"POST", json.dumps({"id": fid}).encode())
    assert code == 404


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/fetches", b"[]"), ("/v1/fetches", b'{"name": 5}'), ("/v1/fetches", b'{"name": "../x"}'),
    ("/v1/fetches", b'{"name": "a", "timeout": 0}'), ("/v1/cancel", b'{"id": "1"}'), ("/v1/cancel", b'{"id": true}'),
    ("/v1/cancel", b"not json"),
])
@pytest_twisted.ensureDeferred
async def test_bad_fetch_and_cancel_bodies_are_answered_400(api: Any, path: str, body: bytes) -> None:
    code, answer = await call(api[0] + path, b"POST", body)
    assert code == 400, answer


@pytest_twisted.ensureDeferred
async def test_ui_prints_the_dashboard_address_and_opens_a_browser_only_on_a_desktop(
        api: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import webbrowser

    url, requester, _ = api
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    token = (requester.shares.state / "control.token").read_text().strip()
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert await _cli("--dir", str(requester.shares.root), "ui") == 0
    assert capsys.readouterr().out == f"{url}/#token={token}\n" and opened == []
    monkeypatch.setenv("DISPLAY", ":0")
    assert await _cli("--dir", str(requester.shares.root), "ui") == 0
    assert opened == [f"{url}/#token={token}"]
    assert await _cli("--dir", str(requester.shares.root), "ui", "--no-browser") == 0
    assert len(opened) == 1


def test_ui_without_a_running_peer_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "t"
    token.write_text("ab" * 32)
    assert cli.main(["--control", "127.0.0.1:1", "--token-file", str(token), "ui", "--no-browser"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no peer answers" in err
    assert cli.dashboard_url(("::1", 7878), "ab") == "http://[::1]:7878/#token=ab"


@pytest_twisted.ensureDeferred
async def test_limits_shows_and_changes_the_running_peers_bandwidth_limits(
        api: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _, requester, _ = api
    folder = str(requester.shares.root)
    assert await _cli("--dir", folder, "limits") == 0
    assert capsys.readouterr().out == "upload:   unlimited\ndownload: unlimited\n"
    assert await _cli("--dir", folder, "limits", "--upload", "1.5M") == 0
    assert capsys.readouterr().out == "upload:   1500000 bytes/s\ndownload: unlimited\n"
    assert requester.limits.upload.rate == 1_500_000
    assert await _cli("--dir", folder, "limits", "--download", "lots") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a rate" in err


def test_rate_options_take_suffixes_and_refuse_nonsense(tmp_path: Path) -> None:
    options = PeerOptions()
    options.parseOptions(["--peer", "127.0.0.1:9", "--dir", str(tmp_path), "--max-upload-rate", "10M",
                          "--max-download-rate", "512KiB"])
    assert (options["max-upload-rate"], options["max-download-rate"]) == (10_000_000, 524_288)
    with pytest.raises(usage.UsageError, match="--max-upload-rate: 'fast' is not a rate"):
        PeerOptions().parseOptions(["--peer", "127.0.0.1:9", "--dir", str(tmp_path), "--max-upload-rate", "fast"])
