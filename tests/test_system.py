"""System tests: the ``p2ptracker`` and ``p2ppeer`` plugins under ``twistd``, driven by ``p2pshare``.

Everything runs as the README shows it, as subprocesses of the installed commands
(the ``twistd`` and ``p2pshare`` beside this interpreter), on 127.0.0.1 only.  One
tracker and three peers are shared by the module; each test uses its own file names.
Readiness is polled with deadlines; every daemon is stopped in the fixtures' teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import pytest

from tests.netns import TestNetwork, requires_netns

pytestmark = pytest.mark.system

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
P2PSHARE = str(BIN / "p2pshare")
DEADLINE = 20.0  # seconds for anything to become ready
T = TypeVar("T")


def free_port() -> int:
    """A port number free for both TCP and UDP on 127.0.0.1 right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            try:
                udp.bind(("127.0.0.1", tcp.getsockname()[1]))
            except OSError:
                continue
            return int(tcp.getsockname()[1])


@dataclass
class Daemon:
    """A ``twistd -n`` subprocess whose output goes to a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], cwd: Path) -> "Daemon":
        log = cwd / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT)
        return cls(name, proc, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cli(*args: str, cwd: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([P2PSHARE, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def poll(check: Callable[[], Optional[T]], what: str, daemons: tuple[Daemon, ...] = (),
         deadline: float = DEADLINE) -> T:
    """Call *check* until it returns something other than None; fail with the daemons' logs at the deadline."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result is not None:
            return result
        for d in daemons:
            assert d.proc.poll() is None, f"{d.name} exited ({d.proc.returncode}) while waiting for {what}:\n" \
                                          f"{d.output()[-3000:]}"
        if time.monotonic() > end:
            logs = "\n".join(f"--- {d.name}\n{d.output()[-2000:]}" for d in daemons)
            pytest.fail(f"not ready within {deadline:g}s: {what}\n{logs}")
        time.sleep(0.1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Peer:
    name: str
    dir: Path
    daemon: Daemon
    status: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.status['tcp']}"

    def control_url(self) -> str:
        return str(json.loads((self.dir / ".p2pshare" / "control.json").read_text())["url"])

    def control_token(self) -> str:
        return (self.dir / ".p2pshare" / "control.token").read_text().strip()


@dataclass
class Network:
    root: Path
    tracker: Daemon
    tracker_address: str
    peers: dict[str, Peer]

    def p2pshare(self, peer: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``p2pshare --dir PEER_DIR ARGS`` run from the network's folder."""
        return cli("--dir", str(self.peers[peer].dir), *args, cwd=self.root, timeout=timeout)

    def daemons(self) -> tuple[Daemon, ...]:
        return (self.tracker, *(p.daemon for p in self.peers.values()))

    def logs(self) -> str:
        """The end of every daemon's log, for an assertion message."""
        return "".join(f"\n--- {d.name}\n{d.output()[-1500:]}" for d in self.daemons())


def start_tracker(cwd: Path, port_arg: str, name: str = "tracker") -> Daemon:
    return Daemon.start(name, ["p2ptracker", "--port", port_arg], cwd)


def start_peer(cwd: Path, name: str, tracker_address: str, *extra: str) -> Daemon:
    return Daemon.start(name, ["p2ppeer", "--tracker", tracker_address, "--dir", name, "--interface", "127.0.0.1",
                               "--control", "tcp:0:interface=127.0.0.1", *extra], cwd)


def accepts(address: str) -> Optional[bool]:
    """True when something accepts TCP connections at *address*, else None (for ``poll``)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return None
    return True


def peer_status(root: Path, directory: Path) -> Optional[dict]:
    """``p2pshare --dir DIRECTORY status --json``, or None while no peer answers for it."""
    if not (directory / ".p2pshare" / "control.json").exists():
        return None  # not listening yet: spare a subprocess
    result = cli("--dir", str(directory), "status", "--json", cwd=root, timeout=15)
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A tracker and peers alice, bob and carol, each knowing the other two.

    alice rescans only when asked (``--rescan 3600``); carol rescans every half second.
    """
    root = tmp_path_factory.mktemp("network")
    files = {
        "alice": {"alice.txt": b"alice's notes\n"},
        "bob": {"bob.txt": b"bob's notes\n", "docs/guide.md": b"# a guide in a subfolder\n",
                "shared-by-two.txt": b"same\n"},
        "carol": {"carol.bin": os.urandom(300_000), "shared-by-two.txt": b"same\n"},
    }
    for peer, contents in files.items():
        for name, data in contents.items():
            (root / peer / name).parent.mkdir(parents=True, exist_ok=True)
            (root / peer / name).write_bytes(data)
    daemons: list[Daemon] = []
    try:
        address = f"127.0.0.1:{free_port()}"
        tracker = start_tracker(root, f"tcp:{address.split(':')[1]}:interface=127.0.0.1")
        daemons.append(tracker)
        poll(lambda: accepts(address), "the tracker listening", (tracker,))
        rescan = {"alice": "3600", "bob": "30", "carol": "0.5"}
        peers = {}
        for name in files:
            daemon = start_peer(root, name, address, "--refresh", "0.5", "--rescan", rescan[name])
            daemons.append(daemon)
            peers[name] = Peer(name, root / name, daemon)
        net = Network(root, tracker, address, peers)
        for peer in peers.values():
            def ready(peer: Peer = peer) -> Optional[dict]:
                status = peer_status(root, peer.dir)
                if status and status["tracker"]["connected"] and len(status["neighbours"]) == len(peers) - 1:
                    return status
                return None

            peer.status = poll(ready, f"{peer.name} registered with two neighbours", net.daemons())
        yield net
    finally:
        for daemon in daemons:
            daemon.stop()


# -- status -------------------------------------------------------------------------------------


def settled_status(network: Network, peer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``p2pshare status`` once *peer* has exactly the other daemons as neighbours.

    A peer that sent a query or a hello (such as the temporary peer of a daemon-less
    get) stays a neighbour for a few refresh intervals; this waits for it to expire.
    """
    others = {("127.0.0.1", p.status["udp"]) for name, p in network.peers.items() if name != peer}

    def check() -> Optional[subprocess.CompletedProcess[str]]:
        status = peer_status(network.root, network.peers[peer].dir)
        if status is None or {tuple(n) for n in status["neighbours"]} != others:
            return None
        result = network.p2pshare(peer, "status", *args)
        assert result.returncode == 0, result.stderr + network.logs()
        return result

    return poll(check, f"{peer} with exactly the other daemons as neighbours", network.daemons())


def test_status_shows_id_neighbour_count_and_file_count(network: Network) -> None:
    bob = network.peers["bob"]
    result = settled_status(network, "bob")
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if not line.startswith(" "))
    assert lines["peer"].strip() == bob.status["peer"]
    assert lines["neighbours"].strip() == "2"
    assert lines["files"].strip() == "3"
    assert lines["tracker"].strip() == "connected"
    assert f"tcp {bob.status['tcp']}" in lines["address"]


def test_status_json_has_id_addresses_neighbours_files_and_counters(network: Network) -> None:
    status = json.loads(settled_status(network, "bob", "--json").stdout)
    others = {("127.0.0.1", network.peers[p].status["udp"]) for p in ("alice", "carol")}
    assert status["peer"] == network.peers["bob"].status["peer"] and len(status["peer"]) == 32
    assert status["host"] == "127.0.0.1" and status["udp"] == status["tcp"] > 0
    assert {tuple(n) for n in status["neighbours"]} == others
    assert status["files"] == 3
    assert Path(status["dir"]).resolve() == network.peers["bob"].dir.resolve()
    assert isinstance(status["counters"], dict)


# -- search -------------------------------------------------------------------------------------


def test_search_lists_the_holder_with_size_hash_prefix_and_address(network: Network) -> None:
    bob_guide = network.peers["bob"].dir / "docs" / "guide.md"
    result = network.p2pshare("alice", "search", "docs/guide.md", "--timeout", "1")
    assert result.returncode == 0, result.stderr + network.logs()
    [line] = result.stdout.splitlines()
    name, size, prefix, address, hops = line.split("\t")
    assert (name, int(size), address) == ("docs/guide.md", bob_guide.stat().st_size, network.peers["bob"].address)
    assert sha256(bob_guide).startswith(prefix) and len(prefix) >= 8
    # Alice asks bob directly and through carol; bob answers whichever copy arrives first.
    assert hops in ("1 hop(s)", "2 hop(s)")


def test_search_lists_every_holder(network: Network) -> None:
    result = network.p2pshare("alice", "search", "shared-by-two.txt", "--timeout", "1")
    assert result.returncode == 0, result.stderr + network.logs()
    addresses = {line.split("\t")[3] for line in result.stdout.splitlines()}
    assert addresses == {network.peers["bob"].address, network.peers["carol"].address}


def test_search_for_a_missing_name_exits_1(network: Network) -> None:
    result = network.p2pshare("alice", "search", "nobody-has-this.txt", "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["nobody-has-this.txt: no peer has it"]


# -- get ----------------------------------------------------------------------------------------


def test_get_fetches_a_file_from_another_peer_into_dir(network: Network) -> None:
    alice, carol = network.peers["alice"], network.peers["carol"]
    assert not (alice.dir / "carol.bin").exists()
    result = network.p2pshare("alice", "get", "carol.bin")
    assert result.returncode == 0, result.stderr + network.logs()
    fetched = alice.dir / "carol.bin"
    assert fetched.read_bytes() == (carol.dir / "carol.bin").read_bytes()
    assert f"from {carol.address}" in result.stdout and "verified" in result.stdout
    assert list((alice.dir / ".p2pshare" / "tmp").iterdir()) == []
    assert result.stderr == ""  # not a terminal: no progress bar


def test_get_of_a_missing_name_exits_1_with_one_line_naming_it(network: Network) -> None:
    result = network.p2pshare("alice", "get", "missing-file.iso", "--timeout", "1")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "missing-file.iso" in line and "Traceback" not in result.stderr
    assert not (network.peers["alice"].dir / "missing-file.iso").exists()
    assert list((network.peers["alice"].dir / ".p2pshare" / "tmp").iterdir()) == []


def test_get_without_a_daemon_runs_a_peer_for_one_fetch(network: Network, tmp_path: Path) -> None:
    target = tmp_path / "downloads"
    target.mkdir()
    result = cli("get", "bob.txt", "--tracker", network.tracker_address, "--dir", str(target), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + network.logs()
    assert (target / "bob.txt").read_bytes() == (network.peers["bob"].dir / "bob.txt").read_bytes()
    assert list((target / ".p2pshare" / "tmp").iterdir()) == []


def test_a_get_without_a_daemon_shares_only_the_file_it_fetches(network: Network, tmp_path: Path) -> None:
    here = tmp_path / "here"  # no --dir: the current folder, which holds files of the user's own
    (here / "sub").mkdir(parents=True)
    (here / "private.txt").write_bytes(b"not for the network\n")
    (here / "sub" / "diary.txt").write_bytes(b"nor this\n")
    result = cli("get", "bob.txt", "--tracker", network.tracker_address, cwd=here)
    assert result.returncode == 0, result.stderr + network.logs()
    assert (here / "bob.txt").read_bytes() == (network.peers["bob"].dir / "bob.txt").read_bytes()
    assert (here / "private.txt").read_bytes() == b"not for the network\n"
    assert not (here / ".p2pshare" / "index.json").exists()  # nothing of the folder was hashed or indexed


BIG = 128 * 1024 * 1024  # bytes: a download that a test can interrupt part-way


@contextmanager
def holder_of_big_file(root: Path) -> Iterator[tuple[str, str, list[Daemon]]]:
    """A tracker and a peer daemon "holder" sharing big.bin (BIG random bytes), in *root*.

    Yields (the tracker's HOST:PORT, big.bin's SHA-256, the daemons; more may be appended).
    Every daemon is resumed (it may have been stopped with SIGSTOP) and stopped at the end.
    """
    data = os.urandom(BIG)
    (root / "holder").mkdir()
    (root / "holder" / "big.bin").write_bytes(data)
    address = f"127.0.0.1:{free_port()}"
    daemons = [start_tracker(root, f"tcp:{address.split(':')[1]}:interface=127.0.0.1")]
    try:
        poll(lambda: accepts(address), "the tracker listening", tuple(daemons))
        daemons.append(start_peer(root, "holder", address, "--refresh", "0.5"))
        poll(lambda: peer_status(root, root / "holder"), "the holder's control API", tuple(daemons))
        yield address, hashlib.sha256(data).hexdigest(), daemons
    finally:
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGCONT)
            daemon.stop()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def ctrl_c_part_way(argv: list[str], cwd: Path, have: Path, holder: Daemon) -> subprocess.CompletedProcess[str]:
    """Run ``p2pshare ARGV``; once the record *have* shows a verified piece, hang *holder*
    (SIGSTOP), so the download cannot finish, and press Ctrl-C (SIGINT)."""
    # As a terminal would start it: SIGINT at its default, even when these tests run in a background job
    # (whose shell ignores SIGINT, and the child would inherit that).
    get = subprocess.Popen([P2PSHARE, *argv], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + DEADLINE
        while not have.exists():  # written as soon as the first piece is verified
            assert get.poll() is None and time.monotonic() < deadline, get.communicate()
            time.sleep(0.002)
        holder.proc.send_signal(signal.SIGSTOP)
        get.send_signal(signal.SIGINT)
        try:
            out, err = get.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            signals = [line for line in Path(f"/proc/{get.pid}/status").read_text().splitlines()
                       if line.startswith(("SigBlk", "SigIgn", "SigCgt", "State"))]
            get.kill()
            out, err = get.communicate()
            pytest.fail(f"p2pshare {' '.join(argv)} did not end within {DEADLINE:g}s of Ctrl-C ({signals}); it "
                        f"printed:\n{out}\n{err}")
    finally:
        if get.poll() is None:
            get.kill()
            get.wait()
    return subprocess.CompletedProcess(argv, get.returncode, out, err)


def verified_pieces(have: Path) -> bytes:
    """The record's bitmap of verified pieces, once complete (the worker may still be writing it)."""
    def record() -> Optional[bytes]:
        fields = have.read_text().split()
        return bytes.fromhex(fields[4]) if len(fields) == 5 and fields[4].strip("0") else None

    return poll(record, f"a record of verified pieces in {have}")


def test_ctrl_c_on_get_stops_the_daemons_download_and_keeps_its_verified_pieces(tmp_path: Path) -> None:
    """The holder hangs part-way; the user presses Ctrl-C.  Pass: the command exits 130 with
    one line, the requester's daemon has no fetch left, and the verified pieces stay in its
    state folder for the next get."""
    with holder_of_big_file(tmp_path) as (address, digest, daemons):
        requester = tmp_path / "requester"
        requester.mkdir()
        daemons.append(start_peer(tmp_path, "requester", address, "--refresh", "0.5"))
        poll(lambda: True if (s := peer_status(tmp_path, requester)) and s["neighbours"] else None,
             "the requester with a neighbour", tuple(daemons))
        have = requester / ".p2pshare" / "tmp" / f"{digest}.have"
        result = ctrl_c_part_way(["--dir", "requester", "get", "big.bin"], tmp_path, have, daemons[1])
        assert result.returncode == 130, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "interrupted" in result.stderr
        assert "Traceback" not in result.stderr

        status = poll(lambda: s if (s := peer_status(tmp_path, requester)) and not s["fetching"] else None,
                      "the requester's fetch stopped", (daemons[0], daemons[2]))
        assert status["counters"]["fetches_cancelled"] == 1
        assert {p.name for p in have.parent.iterdir()} == {f"{digest}.part", f"{digest}.have"}
        verified = verified_pieces(have)
        assert 0 < sum(verified) < len(verified)  # some pieces, not all: a resume has work left
        assert not (requester / "big.bin").exists()


def test_ctrl_c_on_get_without_a_daemon_exits_130_and_keeps_the_verified_pieces(tmp_path: Path) -> None:
    with holder_of_big_file(tmp_path) as (address, digest, daemons):
        here = tmp_path / "here"
        here.mkdir()
        have = here / ".p2pshare" / "tmp" / f"{digest}.have"
        result = ctrl_c_part_way(["get", "big.bin", "--tracker", address], here, have, daemons[1])
        assert result.returncode == 130, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "interrupted" in result.stderr
        assert "Traceback" not in result.stderr
        assert {p.name for p in have.parent.iterdir()} == {f"{digest}.part", f"{digest}.have"}
        verified = verified_pieces(have)
        assert 0 < sum(verified) < len(verified)
        assert not (here / "big.bin").exists()


# -- the control API's token ----------------------------------------------------------------------


def test_the_control_api_answers_only_requests_with_the_token_kept_0600_in_the_state_folder(
        network: Network) -> None:
    import urllib.error

    bob = network.peers["bob"]
    token_file = bob.dir / ".p2pshare" / "control.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    for headers in ({}, {"authorization": "Bearer " + "0" * 64}):
        request = urllib.request.Request(bob.control_url() + "/v1/status", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["error"] == "Unauthorized"
    request = urllib.request.Request(bob.control_url() + "/v1/status",
                                     headers={"authorization": f"Bearer {bob.control_token()}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert json.load(reply)["peer"] == bob.status["peer"]


def test_the_cli_finds_the_token_with_dir_or_token_file_and_says_when_it_has_none(
        network: Network, tmp_path: Path) -> None:
    bob = network.peers["bob"]
    address = bob.control_url().split("//", 1)[1]
    by_dir = network.p2pshare("bob", "status", "--json")
    assert by_dir.returncode == 0, by_dir.stderr + network.logs()
    assert json.loads(by_dir.stdout)["peer"] == bob.status["peer"]
    by_file = cli("--control", address, "--token-file", str(bob.dir / ".p2pshare" / "control.token"), "status",
                  cwd=tmp_path)
    assert by_file.returncode == 0 and bob.status["peer"] in by_file.stdout, by_file.stderr
    without = cli("--control", address, "status", cwd=tmp_path)
    assert without.returncode == 1 and len(without.stderr.strip().splitlines()) == 1
    assert "--token-file" in without.stderr and "Traceback" not in without.stderr
    missing = cli("--control", address, "--token-file", str(tmp_path / "absent"), "status", cwd=tmp_path)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "cannot read the control token" in missing.stderr


# -- the tracker --------------------------------------------------------------------------------


def test_peers_lists_the_registered_peers_one_a_line(network: Network) -> None:
    expected = {p.status["peer"]: p.status["tcp"] for p in network.peers.values()}

    def listed() -> Optional[dict[str, int]]:
        # A temporary peer (the daemon-less get) may still be leaving: wait for exactly the daemons.
        result = cli("peers", "--tracker", network.tracker_address, cwd=network.root)
        assert result.returncode == 0, result.stderr + network.logs()
        rows = [line.split("\t") for line in result.stdout.splitlines()]
        assert all(len(row) == 4 and row[1] == "127.0.0.1" for row in rows), result.stdout
        found = {row[0]: int(row[3].removeprefix("tcp ")) for row in rows}
        return found if found == expected else None

    assert poll(listed, "the tracker listing exactly the three daemons") == expected


def test_tracker_accepts_a_plain_port_number(tmp_path: Path) -> None:
    port = free_port()
    tracker = start_tracker(tmp_path, str(port))
    try:
        def answers() -> Optional[str]:
            result = cli("peers", "--tracker", f"127.0.0.1:{port}", cwd=tmp_path, timeout=15)
            return result.stdout if result.returncode == 0 else None

        assert poll(answers, f"a tracker on port {port}", (tracker,)) == ""
    finally:
        tracker.stop()


# -- failures the user sees -----------------------------------------------------------------------


def test_status_against_a_dead_control_address_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = cli("--control", f"127.0.0.1:{free_port()}", "status", cwd=tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "no peer answers" in result.stderr


def test_status_for_a_folder_without_a_running_peer_is_one_line(tmp_path: Path) -> None:
    result = cli("--dir", str(tmp_path), "status", cwd=tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert str(tmp_path) in result.stderr


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["search"],
    ["get", "x.txt", "--timeout", "0"],
    ["get", "x.txt", "--timeout", "soon"],
    ["peers"],
    ["status", "--bogus-flag"],
], ids=lambda args: " ".join(args) or "nothing")
def test_bad_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--dir", "no-such-folder"], "--dir: no-such-folder is not a folder"),
    (["--dir", ".", "--control", "tcp:7000:interface=0.0.0.0"], "loopback only"),
    (["--dir", ".", "--control", "unix:/tmp/x"], "only tcp and tcp6 endpoints"),
    (["--dir", ".", "--port", "70000"], "--port"),
], ids=["missing dir", "control not on loopback", "control not tcp", "port out of range"])
def test_peer_with_bad_options_exits_nonzero_with_a_clear_message(tmp_path: Path, args: list[str],
                                                                   message: str) -> None:
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "p2ppeer", "--tracker", "127.0.0.1:9", *args],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr  # twistd prints usage errors after the usage text, on stdout
    assert result.returncode != 0
    assert message in output.strip().splitlines()[-1]
    assert "Traceback" not in output


@pytest.mark.parametrize("plugin", ["p2ptracker", "p2ppeer"])
def test_a_daemon_whose_port_is_taken_stops_and_says_why(tmp_path: Path, plugin: str) -> None:
    (tmp_path / "files").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        args = ["p2ptracker", "--port", endpoint] if plugin == "p2ptracker" else \
            ["p2ppeer", "--tracker", "127.0.0.1:9", "--dir", "files", "--interface", "127.0.0.1",
             "--control", endpoint]
        daemon = Daemon.start(plugin, args, tmp_path)
        try:
            daemon.proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{plugin} kept running without its port:\n{daemon.output()[-2000:]}")
        finally:
            daemon.stop()
    assert "Address already in use" in daemon.output()
    assert daemon.proc.returncode == 1  # supervisors see the failure


# -- files added after start ---------------------------------------------------------------------


def test_a_file_added_later_is_found_after_post_rescan(network: Network) -> None:
    alice = network.peers["alice"]  # --rescan 3600: only the request can find it
    (alice.dir / "added-later.txt").write_bytes(b"new\n")
    request = urllib.request.Request(alice.control_url() + "/v1/rescan", method="POST", data=b"",
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {alice.control_token()}"})
    on_disk = [p for p in alice.dir.rglob("*") if p.is_file() and ".p2pshare" not in p.parts]
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert json.load(reply) == {"files": len(on_disk)}
    result = network.p2pshare("bob", "search", "added-later.txt", "--timeout", "1")
    assert result.returncode == 0, result.stderr + network.logs()
    assert result.stdout.split("\t")[3] == alice.address


def test_a_file_added_later_is_found_by_the_rescan_timer(network: Network) -> None:
    carol = network.peers["carol"]  # --rescan 0.5
    (carol.dir / "sub").mkdir()
    (carol.dir / "sub" / "timer.txt").write_bytes(b"found by the timer\n")

    def indexed() -> Optional[bool]:
        status = peer_status(network.root, carol.dir)
        return True if status and status["files"] == 3 else None

    poll(indexed, "carol's rescan timer indexing sub/timer.txt", network.daemons())
    result = network.p2pshare("alice", "search", "sub/timer.txt", "--timeout", "1")
    assert result.returncode == 0, result.stderr + network.logs()
    assert result.stdout.split("\t")[3] == carol.address


@requires_netns
def test_the_readmes_two_lines_run_side_by_side_in_one_folder(tmp_path: Path) -> None:
    """``twistd -n p2ptracker --port 8000`` then ``twistd -n p2ppeer --tracker localhost:8000 --dir files``, in
    one folder, exactly as typed: no pid file is claimed under --nodaemon.  In a host of its own (a network
    namespace), because the peer, on every interface with LAN discovery on, announces itself on the link."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.txt").write_text("a")
    with TestNetwork(1, tmp_path / "net") as net:
        host = net.hosts[0]
        logs = {}
        for name, line in (("tracker", "twistd -n p2ptracker --port 8000"),
                           ("peer", "twistd -n p2ppeer --tracker localhost:8000 --dir files")):
            logs[name] = tmp_path / f"{name}.log"
            with logs[name].open("wb") as out:
                host.popen(TWISTD, *line.split()[1:], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)

        def registered() -> Optional[bool]:
            done = host.run(P2PSHARE, "--dir", "files", "status", "--json", cwd=tmp_path)
            return True if done.returncode == 0 and json.loads(done.stdout)["tracker"]["connected"] else None

        try:
            poll(registered, "the peer registered with the tracker")
        finally:
            output = "".join(f"--- {n}\n{p.read_text(errors='replace')}" for n, p in logs.items())
        assert not (tmp_path / "twistd.pid").exists(), output
    assert "Another twistd server is running" not in output


def _answers(port: int) -> Optional[bool]:
    """True once a tracker on *port* answers a request: its event loop runs (and with it twistd's
    signal handlers, installed once the services have started)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b'{"v":1,"id":1,"op":"peers","max":1}\n')
            return True if s.makefile("rb").readline().startswith(b'{"v":1') else None
    except OSError:
        return None


def test_daemonized_plugins_take_a_pid_file_each_unless_one_is_given(tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    control = free_port()
    (tmp_path / "files").mkdir()
    for args in (["p2ptracker", "--port", f"tcp:{port}:interface=127.0.0.1"],
                 ["p2ppeer", "--tracker", f"127.0.0.1:{port}", "--dir", "files", "--interface", "127.0.0.1",
                  "--control", f"tcp:{control}:interface=127.0.0.1"],
                 ["--pidfile", "mine.pid", "p2ptracker", "--port", f"tcp:{other}:interface=127.0.0.1"]):
        done = subprocess.run([TWISTD, "--logfile", f"{args[0]}.log", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
    pidfiles = {name: tmp_path / name for name in ("p2ptracker.pid", "p2ppeer.pid", "mine.pid")}
    try:
        poll(lambda: True if all(p.exists() for p in pidfiles.values()) else None, "three pid files")
        assert not (tmp_path / "twistd.pid").exists()
        # A pid file is written before the reactor runs; a SIGTERM before twistd installs its handlers
        # would end a daemon without removing it.  Each answering a request means each is running.
        poll(lambda: _answers(port) and _answers(other), "both trackers to answer")
        poll(lambda: True if "registered with the tracker" in (tmp_path / "p2ppeer.log").read_text() else None,
             "the peer to register")
    finally:
        for path in pidfiles.values():
            if path.exists():
                os.kill(int(path.read_text()), signal.SIGTERM)
        poll(lambda: True if not any(p.exists() for p in pidfiles.values()) else None, "the daemons to stop")
