"""``--config FILE`` of both plugins (option parsing, no sockets), and docs/operations.md's example files
and systemd units: they parse, and their command lines start a tracker and a peer that registers."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from p2pshare.tap import PeerOptions, TrackerOptions, listening_port
from tests.test_system import TWISTD, Daemon, free_port, peer_status, poll

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def block(first_line: str) -> str:
    """The fenced block of docs/operations.md whose first line is *first_line*."""
    for body in re.findall(r"^```[a-z]*\n(.*?)^```$", OPERATIONS.read_text(encoding="utf-8"), re.M | re.S):
        if body.startswith(first_line + "\n"):
            return str(body)
    raise AssertionError(f"no block starting with {first_line!r} in {OPERATIONS}")


def parsed(options: Any, tmp_path: Path, text: str, *argv: str) -> Any:
    config = tmp_path / "options.toml"
    config.write_text(text)
    options.parseOptions(["--config", str(config), *argv])
    return options


def test_the_file_sets_options_by_their_long_names_with_their_types(tmp_path: Path) -> None:
    o = parsed(TrackerOptions(), tmp_path, 'port = 8123\nmax_peers = 7\ninterval = 5\nregistry-prefix = "n2"\n')
    assert (o["port"], o["max-peers"], o["interval"], o["registry-prefix"]) == (listening_port("8123"), 7, 5.0, "n2")
    (tmp_path / "files").mkdir()
    o = parsed(PeerOptions(), tmp_path, f'tracker = ["a:1", "b:2"]\npeer = "127.0.0.1:9"\ndir = "{tmp_path / "files"}"\n'
                                        'neighbours = 3\nrefresh = 2.5\n')
    assert (o["tracker"], o["peers"], o["neighbours"], o["refresh"]) == (["a:1", "b:2"], [("127.0.0.1", 9)], 3, 2.5)


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    o = parsed(TrackerOptions(), tmp_path, "port = 8123\nmax-peers = 7\ninterval = 5\n", "--port", "9000", "-m", "3")
    assert (o["port"], o["max-peers"], o["interval"]) == (listening_port("9000"), 3, 5.0)
    (tmp_path / "files").mkdir()
    o = parsed(PeerOptions(), tmp_path, f'tracker = ["a:1", "b:2"]\ndir = "{tmp_path / "files"}"\n', "-t", "c:3")
    assert o["tracker"] == ["c:3"]  # the command line's list replaces the file's


@pytest.mark.parametrize(("text", "message"), [
    ("prot = 8000\n", "prot: no such option"),
    ('max-peers = "ten"\n', "max-peers: expected an integer, got 'ten'"),
    ("max-peers = true\n", "max-peers: expected a number, got a boolean"),
    ('interval = "5s"\n', "interval: expected a number"),
    ("registry = 5.5\n", "registry: expected a string"),
    ('config = "other.toml"\n', "config: no such option"),
    ("port = [\n", "not valid TOML"),
])
def test_a_bad_file_is_a_usage_error_naming_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(usage.UsageError) as error:
        parsed(TrackerOptions(), tmp_path, text)
    assert str(error.value).startswith(f"--config {tmp_path / 'options.toml'}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_bad_list_for_a_repeatable_option_and_a_missing_file_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="tracker: expected a string or a list of strings"):
        parsed(PeerOptions(), tmp_path, "tracker = [1, 2]\n")
    with pytest.raises(usage.UsageError, match="nope.toml: No such file"):
        TrackerOptions().parseOptions(["--config", str(tmp_path / "nope.toml")])


def test_twistd_stops_before_starting_with_one_line_about_the_file(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text('max-peers = "many"\n')
    done = subprocess.run([TWISTD, "-n", "p2ptracker", "--config", "t.toml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "t.toml" in line]
    assert len(lines) == 1 and lines[0].endswith(": --config t.toml: max-peers: expected an integer, got 'many'")
    assert "Traceback" not in done.stdout + done.stderr


def test_the_documented_example_files_hold_only_options(tmp_path: Path) -> None:
    tracker = parsed(TrackerOptions(), tmp_path, block("# /etc/p2pshare/tracker.toml"))
    assert (tracker["port"], tracker["registry"]) == ("tcp:8000", "memory")
    text = block("# /etc/p2pshare/peer.toml").replace("/srv/p2pshare/files", str(tmp_path))
    peer = parsed(PeerOptions(), tmp_path, text)
    assert peer["tracker"] == ["tracker-a.example:8000", "tracker-b.example:8000"] and peer["port"] == 6881


def units() -> dict[str, str]:
    return {name: block(f"# /etc/systemd/system/{name}.service") for name in ("p2ptracker", "p2ppeer")}


def test_the_units_run_as_an_unprivileged_user_in_the_foreground_and_restart_on_failure() -> None:
    for name, text in units().items():
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string(text)
        service = unit["Service"]
        assert service["User"] not in ("", "root") and service["Restart"] == "on-failure"
        assert f"twistd --nodaemon --pidfile= {name} --config" in service["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for name, text in units().items():
        # verify checks that the command exists: point it at this venv's twistd
        path = tmp_path / f"{name}.service"
        path.write_text(text.replace("/opt/p2pshare/bin/twistd", TWISTD))
        done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (done.stdout + done.stderr).splitlines() if str(path) in line]
        assert done.returncode == 0 and problems == [], done.stdout + done.stderr


def exec_start(name: str, configs: dict[str, Path]) -> list[str]:
    """The unit's command line, with this venv's twistd and the test's config files."""
    line = next(line for line in units()[name].splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(line.split("=", 1)[1])
    argv[0] = TWISTD
    return [str(configs[a]) if a in configs else a for a in argv]


def test_the_units_command_lines_start_a_tracker_and_a_peer_that_registers(tmp_path: Path) -> None:
    port, control = free_port(), free_port()
    shared = tmp_path / "files"
    shared.mkdir()
    (shared / "x.txt").write_text("x")
    tracker_toml, peer_toml = tmp_path / "tracker.toml", tmp_path / "peer.toml"
    tracker_toml.write_text(block("# /etc/p2pshare/tracker.toml").replace('"tcp:8000"',
                                                                        f'"tcp:{port}:interface=127.0.0.1"'))
    peer_toml.write_text(block("# /etc/p2pshare/peer.toml")
                         .replace('["tracker-a.example:8000", "tracker-b.example:8000"]', f'["127.0.0.1:{port}"]')
                         .replace("/srv/p2pshare/files", str(shared)).replace("6881", "0")
                         .replace('"0.0.0.0"', '"127.0.0.1"').replace('"7878"', f'"{control}"'))
    configs = {"/etc/p2pshare/tracker.toml": tracker_toml, "/etc/p2pshare/peer.toml": peer_toml}
    daemons = []
    try:
        for name in ("p2ptracker", "p2ppeer"):
            argv = exec_start(name, configs)
            assert argv[1:3] == ["--nodaemon", "--pidfile="]
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                daemons.append(Daemon(name, subprocess.Popen(argv, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out,
                                                             stderr=subprocess.STDOUT), log))
        status = poll(lambda: (lambda s: s if s and s["tracker"]["connected"] and s["files"] == 1 else None)(
            peer_status(tmp_path, shared)), "the peer of the unit registered", tuple(daemons))
        assert status["dir"] == str(shared)
    finally:
        for d in daemons:
            d.stop()
