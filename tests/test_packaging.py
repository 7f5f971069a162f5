"""Packaging: the wheel installs into a fresh virtual environment and twistd finds both plugins there.

``twisted/`` and ``twisted/plugins/`` must ship without ``__init__.py`` (one would shadow
Twisted's own package), and a plain ``pip install`` must make ``p2ptracker`` and
``p2ppeer`` visible to ``twistd`` from any folder.  The build writes nothing into the
source tree: setuptools' build and egg-info folders go to the test's temporary folder
(through ``DIST_EXTRA_CONFIG``), so stale files from an old ``build/`` cannot slip in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

PROJECT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """The wheel, a fresh venv with it installed, and the environment to run that venv's commands in."""
    tmp = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    extra = tmp / "setuptools.cfg"
    extra.write_text(f"[build]\nbuild_base = {tmp / 'build'}\n[egg_info]\negg_base = {tmp}\n")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
         str(PROJECT)], cwd=tmp, env=env | {"DIST_EXTRA_CONFIG": str(extra)})
    [wheel] = (tmp / "dist").glob("p2pshare-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], cwd=tmp, env=env)
    return wheel, venv, env


def test_wheel_ships_the_drop_in_without_package_markers(built: tuple[Path, Path, dict[str, str]]) -> None:
    wheel, _, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/p2pshare_plugins.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert {"p2pshare/__init__.py", "p2pshare/tap.py", "p2pshare/cli.py"} <= names
    # the dashboard's files, which the control API reads from the installed package
    assert {f"p2pshare/dashboard/{f}" for f in ("index.html", "app.js", "style.css", "icon.svg")} <= names


def test_installed_twistd_lists_both_plugins_from_another_folder(built: tuple[Path, Path, dict[str, str]],
                                                                 tmp_path: Path) -> None:
    _, venv, env = built
    result = run([str(venv / "bin" / "twistd"), "--help"], cwd=tmp_path, env=env, timeout=60)
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert {"p2ptracker", "p2ppeer"} <= listed


def test_installed_plugins_load_their_options(built: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, venv, env = built
    for plugin, option in (("p2ptracker", "--max-peers"), ("p2ppeer", "--tracker")):
        result = run([str(venv / "bin" / "twistd"), plugin, "--help"], cwd=tmp_path, env=env, timeout=60)
        assert option in result.stdout


def test_installed_p2pshare_command_runs(built: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, venv, env = built
    result = run([str(venv / "bin" / "p2pshare"), "--help"], cwd=tmp_path, env=env, timeout=60)
    assert "usage: p2pshare" in result.stdout
    assert {"status", "search", "get", "peers", "ui"} <= set(result.stdout.replace(",", " ").replace("{", " ")
                                                        .replace("}", " ").split())


def test_the_venv_imports_the_installed_copy(built: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """What the checks above ran is the wheel's code, not this source tree."""
    _, venv, env = built
    result = run([str(venv / "bin" / "python"), "-c", "import p2pshare; print(p2pshare.__file__)"], cwd=tmp_path,
                 env=env, timeout=60)
    assert Path(result.stdout.strip()).resolve().is_relative_to(venv.resolve())


def test_a_tracker_process_loads_none_of_the_peers_modules() -> None:
    """``twistd p2ptracker`` builds its service without importing the peer's side (the download, the
    disk worker, the search: memory a tracker holding a connection per peer does not spend), nor,
    without ``--metrics``, ``twisted.web`` or ``prometheus_client``; while ``from p2pshare import Peer``
    still works, and with ``--metrics`` the registry is there."""
    code = (
        "import sys, p2pshare.tap\n"
        "options = p2pshare.tap.TrackerOptions()\n"
        "options.parseOptions(['--port', 'tcp:0:interface=127.0.0.1'])\n"
        "p2pshare.tap.makeTrackerService(options)\n"
        "print(sorted(m for m in sys.modules if m in ('p2pshare.peer', 'p2pshare.transfer', 'p2pshare.store',\n"
        "                                            'p2pshare.search', 'p2pshare.download', 'blake3',\n"
        "                                            'twisted.web.server', 'prometheus_client')))\n"
        "from p2pshare import Peer, TrackerService\n"
        "print(Peer.__module__, TrackerService.__module__)\n"
        "options = p2pshare.tap.TrackerOptions()\n"
        "options.parseOptions(['--port', 'tcp:0:interface=127.0.0.1', '--metrics', 'tcp:0:interface=127.0.0.1'])\n"
        "p2pshare.tap.makeTrackerService(options)\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "p2pshare.peer p2pshare.tracker", "True"]


_TLS_MODULES = ("import sys\n"
                "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('OpenSSL', 'cryptography')"
                " and sys.modules[m] is not None}))\n")


@pytest.mark.parametrize("private", [False, True], ids=["open", "private"])
def test_a_tracker_of_an_open_network_loads_no_tls_library(private: bool, tmp_path: Path) -> None:
    """As twistd runs it (options parsed before the reactor is imported), a tracker without --key
    never loads pyOpenSSL or cryptography (13 MB it would never use), and still listens and
    answers; with --key it loads them, as its TLS needs them."""
    args = ["--port", "tcp:0:interface=127.0.0.1"]
    if private:
        from p2pshare.cli import main as cli_main

        assert cli_main(["keygen", "--out", str(tmp_path / "net.key")]) == 0
        args += ["--key", str(tmp_path / "net.key")]
    code = (
        "import json, socket, p2pshare.tap\n"
        "options = p2pshare.tap.TrackerOptions()\n"
        f"options.parseOptions({args!r})\n"
        "service = p2pshare.tap.makeTrackerService(options)\n"
        "from twisted.internet import reactor\n"
        "service.startService()\n"
        "tracker = service.services[0]\n"
        "def ask():\n"
        "    port = tracker.port.getHost().port\n"
        "    s = socket.create_connection(('127.0.0.1', port)); s.close()\n"
        "    reactor.stop()\n"
        "reactor.callLater(0.2, ask)\n"
        "reactor.run()\n"
        "print('listened on', type(tracker.port).__module__)\n"
        + _TLS_MODULES
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    expected = "['OpenSSL', 'cryptography']" if private else "[]"
    assert out.stdout.splitlines() == ["listened on twisted.internet.tcp", expected]
