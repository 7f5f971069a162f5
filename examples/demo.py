"""``make demo``: a tracker and four peers on 127.0.0.1; peer A fetches a file two hops away.

The peers form a chain A -> B -> C -> D (each names the next with ``--peer`` and asks
the tracker for no neighbours), so a query from A reaches C, the only holder of
``big.bin``, through B.  Everything runs as it would for a user: ``twistd`` plugins as
subprocesses and the ``p2pshare`` command.  The demo stops every process it started and
removes its working folder, also when it fails or is interrupted; it exits 0 only if
the fetched file is byte-identical to C's.

Standard library only.  ``python examples/demo.py --keep`` leaves the folder (and the
daemons' logs) behind.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

BIG_NAME = "big.bin"
BIG_SIZE = 64 * 1024 * 1024
NAMES = ("A", "B", "C", "D")
STARTUP_DEADLINE = 30.0
GET_DEADLINE = 300.0


class DemoFailed(Exception):
    """Something went wrong; the message says what, the logs of *suspects* (daemon labels) say why."""

    def __init__(self, message: str, *suspects: str) -> None:
        super().__init__(message)
        self.suspects = suspects


def tool(name: str) -> str:
    """The command next to this interpreter (the project's .venv), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoFailed(f"{name} is not installed; run `make demo`, which installs it into .venv")
    return found


def free_ports(count: int) -> list[int]:
    """Port numbers free for both TCP and UDP on 127.0.0.1 (held together, so all distinct)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            held.append(tcp)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind(("127.0.0.1", tcp.getsockname()[1]))
            except OSError:
                continue
            ports.append(tcp.getsockname()[1])
    finally:
        for s in held:
            s.close()
    return ports


def write_random(path: Path, size: int) -> str:
    """A file of *size* random bytes, written a MiB at a time; returns its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_folders(work: Path) -> dict[str, list[str]]:
    """Each peer's shared folder with a few sample files; only C gets big.bin."""
    shared: dict[str, list[str]] = {}
    for name in NAMES:
        root = work / name
        (root / "notes").mkdir(parents=True)
        (root / f"hello-from-{name}.txt").write_text(f"Hello from peer {name}.\n")
        (root / "notes" / f"{name.lower()}-todo.md").write_text(f"# {name}'s list\n\n- share files\n")
        (root / f"sample-{name}.dat").write_bytes(os.urandom(4096))
        shared[name] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    write_random(work / "C" / BIG_NAME, BIG_SIZE)
    shared["C"].append(BIG_NAME)
    return shared


class Daemon:
    """One ``twistd -n`` subprocess, its output in a log file."""

    def __init__(self, label: str, args: list[str], cwd: Path, log: Path) -> None:
        self.label, self.log = label, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise DemoFailed(f"{self.label} exited with status {self.proc.returncode}", self.label)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])


def run(args: list[str], cwd: Path, timeout: float = 30.0, stderr_to_terminal: bool = False
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=None if stderr_to_terminal else subprocess.PIPE, text=True, timeout=timeout)


def wait_ready(p2pshare: str, work: Path, peers: dict[str, Daemon]) -> dict[str, dict]:
    """Poll ``p2pshare --dir X status --json`` until every peer answers and is registered."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    status: dict[str, dict] = {}
    while True:
        for daemon in peers.values():
            daemon.check_alive()
        asking = {name: subprocess.Popen([p2pshare, "--dir", name, "status", "--json"], cwd=work,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
                  for name in peers
                  if name not in status and (work / name / ".p2pshare" / "control.json").exists()}
        for name, proc in asking.items():
            out, _ = proc.communicate(timeout=15)
            if proc.returncode == 0:
                reply = json.loads(out)
                if reply["tracker"] and reply["tracker"]["connected"]:
                    status[name] = reply
        if len(status) == len(peers):
            return status
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(set(peers) - set(status)))
            raise DemoFailed(f"peer(s) {missing} not ready within {STARTUP_DEADLINE:g}s",
                             *(f"peer {name}" for name in sorted(set(peers) - set(status))))
        time.sleep(0.2)


def wait_tracker(port: int, tracker: Daemon) -> None:
    """Poll until the tracker accepts connections, so the peers register at once (no retry backoff)."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            tracker.check_alive()
            if time.monotonic() > deadline:
                raise DemoFailed(f"the tracker did not listen on port {port} within {STARTUP_DEADLINE:g}s",
                                 "tracker") from None
            time.sleep(0.1)


def show(command: list[str], result: subprocess.CompletedProcess[str]) -> None:
    print(f"\n$ {' '.join(command)}")
    for line in (result.stdout or "").splitlines():
        print(f"  {line}")
    for line in (result.stderr or "").splitlines():
        print(f"  {line}")


def demo(work: Path, daemons: list[Daemon]) -> int:
    twistd, p2pshare = tool("twistd"), tool("p2pshare")
    tracker_port, *peer_ports = free_ports(1 + len(NAMES))
    port_of = dict(zip(NAMES, peer_ports))
    name_of_port = {p: n for n, p in port_of.items()}
    tracker_address = f"127.0.0.1:{tracker_port}"
    logs = work / "logs"
    logs.mkdir()

    print(f"p2pshare demo: a tracker and four peers on 127.0.0.1 (working folder {work})")
    print(f"  writing sample files and a {BIG_SIZE // (1 << 20)} MiB random {BIG_NAME} for peer C ...")
    shared = make_folders(work)

    tracker = Daemon("tracker", [twistd, "-n", "--pidfile=", "p2ptracker", "--port",
                                 f"tcp:{tracker_port}:interface=127.0.0.1"], work, logs / "tracker.log")
    daemons.append(tracker)
    print(f"  tracker   {tracker_address}")
    wait_tracker(tracker_port, tracker)

    peers: dict[str, Daemon] = {}
    for i, name in enumerate(NAMES):
        args = [twistd, "-n", "--pidfile=", "p2ppeer", "--tracker", tracker_address, "--dir", name,
                "--port", str(port_of[name]), "--interface", "127.0.0.1",
                "--control", "tcp:0:interface=127.0.0.1", "--neighbours", "0"]
        nxt = NAMES[i + 1] if i + 1 < len(NAMES) else None
        if nxt is not None:
            args += ["--peer", f"127.0.0.1:{port_of[nxt]}"]
        peers[name] = Daemon(f"peer {name}", args, work, logs / f"peer-{name}.log")
        daemons.append(peers[name])
        link = f"--peer {nxt}" if nxt else "(end of the chain)"
        print(f"  peer {name}    127.0.0.1:{port_of[name]:<5}  {link:<18}  shares {', '.join(shared[name])}")

    started = time.monotonic()
    status = wait_ready(p2pshare, work, peers)
    print(f"  all four peers answer on their control API and are registered "
          f"({time.monotonic() - started:.1f}s)")
    id_to_name = {s["peer"]: n for n, s in status.items()}

    command = ["p2pshare", "peers", "--tracker", tracker_address]
    result = run([p2pshare, *command[1:]], work)
    show(command, result)
    if result.returncode != 0:
        raise DemoFailed("the tracker did not list its peers", "tracker")
    listed = [id_to_name.get(line.split("\t")[0], "?") for line in result.stdout.splitlines() if line.strip()]
    print(f"  -> {len(listed)} peers registered: {', '.join(sorted(listed))}")
    if sorted(listed) != sorted(NAMES):
        raise DemoFailed(f"expected the tracker to list {', '.join(NAMES)}, it listed {listed}", "tracker")

    command = ["p2pshare", "--dir", "A", "search", BIG_NAME]
    result = run([p2pshare, *command[1:]], work)
    show(command, result)
    if result.returncode != 0:
        raise DemoFailed(f"A's search found no holder of {BIG_NAME}", "peer A", "peer B", "peer C")
    holders = []
    for line in result.stdout.splitlines():
        _, size, _, address, hops = line.split("\t")
        holder = name_of_port.get(int(address.rpartition(":")[2]), "an unknown peer")
        holders.append((holder, address, hops.split()[0]))
        print(f"  -> held by peer {holder} at {address}, {hops.split()[0]} hops from A")

    command = ["p2pshare", "--dir", "A", "get", BIG_NAME]
    print(f"\n$ {' '.join(command)}")
    if not sys.stderr.isatty():
        print("  (the progress bar shows only when stderr is a terminal)")
    sys.stdout.flush()
    started = time.monotonic()
    result = run([p2pshare, *command[1:]], work, timeout=GET_DEADLINE, stderr_to_terminal=True)
    wall = time.monotonic() - started
    for line in result.stdout.splitlines():
        print(f"  {line}")
    if result.returncode != 0:
        raise DemoFailed(f"p2pshare get exited with status {result.returncode}", "peer A", "peer C")

    # "big.bin: N bytes from HOST:PORT in S.SSs, SHA-256 PREFIX... verified -> PATH"
    summary = result.stdout.strip().splitlines()[-1]
    holder_address = summary.split(" from ", 1)[1].split(" ", 1)[0]
    seconds = float(summary.split(" in ", 1)[1].split("s,", 1)[0])
    holder = name_of_port.get(int(holder_address.rpartition(":")[2]), "an unknown peer")
    hops = next((h for n, _, h in holders if n == holder), "?")
    fetched, original = work / "A" / BIG_NAME, work / "C" / BIG_NAME
    counters = json.loads(run([p2pshare, "--dir", "A", "status", "--json"], work).stdout)["counters"]
    if counters.get("sources_dialled_by_holder"):
        dialled = f"{holder} connected to A and offered the file (the original design)"
    elif counters.get("sources_dialled_by_requester"):
        dialled = f"A connected to {holder} (dial-back)"
    else:
        dialled = "unknown"

    size = fetched.stat().st_size if fetched.exists() else 0
    identical = fetched.exists() and filecmp.cmp(fetched, original, shallow=False)
    digest = sha256_of(fetched) if fetched.exists() else ""
    print("\nWhat happened")
    route = " (A -> B -> C)" if holder == "C" and hops == "2" else ""
    print(f"  who had it:  peer {holder} at {holder_address}, {hops} hops from A{route}")
    print(f"  bytes:       {size:,} ({size / (1 << 20):.1f} MiB)")
    print(f"  time:        {seconds:.2f}s for the fetch as the peer measured it "
          f"({size / max(seconds, 1e-6) / 1e6:.0f} MB/s); {wall:.2f}s for the whole command")
    print(f"  connection:  {dialled}")
    print(f"  hash:        SHA-256 {digest[:16]}... verified by peer A before it moved the file into place; "
          f"recomputed here: {'same' if digest == sha256_of(original) else 'DIFFERENT'} as C's")
    print(f"  comparison:  A/{BIG_NAME} and C/{BIG_NAME} are "
          f"{'byte-identical' if identical else 'NOT identical'}")
    if not identical:
        raise DemoFailed(f"the fetched {BIG_NAME} differs from C's", "peer A", "peer C")
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the working folder and logs")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="p2pshare-demo-"))
    daemons: list[Daemon] = []
    status = 1
    try:
        status = demo(work, daemons)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ninterrupted", file=sys.stderr)
        status = 130
    except (DemoFailed, OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as e:
        sys.stdout.flush()
        print(f"\ndemo failed: {e}", file=sys.stderr)
        suspects = set(getattr(e, "suspects", ())) or {"peer A"}
        for daemon in daemons:
            if daemon.label in suspects or daemon.proc.poll() is not None:
                print(f"  last lines of {daemon.label}'s log:\n{daemon.tail()}", file=sys.stderr)
    finally:
        if daemons:
            print(f"\nstopping the {len(daemons)} processes the demo started ...", end=" ", flush=True)
        for daemon in daemons:
            try:
                daemon.stop()
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting politely
                daemon.proc.kill()
                daemon.proc.wait()
        if daemons:
            print("done")
        if options.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("demo passed: the file two hops away arrived intact" if status == 0 else f"demo exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
