"""The helper of benchmark 3 that runs inside each peer's namespace (``python -m benchmarks.swarm ...``).

``status`` prints the peer's ``/v1/status``; ``wait`` polls it until the peer
shares ``--files`` files (and, with ``--connected``, is registered with the
tracker); ``fetch`` says it is ready, reads one wall-clock instant on stdin and
at that instant sends ``POST /v1/get``, then prints the ``done`` event with the
wall-clock times it started and ended.  The last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.daemons import STATE, ControlClient

FETCH_TIMEOUT = 600.0
READY_DEADLINE = 60.0


def _control(directory: str) -> ControlClient:
    """A client of the control API of the peer sharing *directory* (with its token, when it keeps one)."""
    state = Path(directory) / STATE
    url = json.loads((state / "control.json").read_text())["url"]
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    token = state / "control.token"
    return ControlClient(host, int(port), *([token.read_text().strip()] if token.exists() else []))


def helper(argv: Sequence[str]) -> int:
    """``status``, ``wait`` (until the peer shares --files files) or ``fetch`` (at the time.time() read
    from stdin, once it has said it is ready)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.swarm")
    p.add_argument("command", choices=("status", "wait", "fetch"))
    p.add_argument("--dir", required=True)
    p.add_argument("--files", type=int)
    p.add_argument("--connected", action="store_true", help="wait: also registered with the tracker")
    p.add_argument("--deadline", type=float, default=READY_DEADLINE)
    p.add_argument("--name")
    p.add_argument("--timeout", type=float, default=FETCH_TIMEOUT)
    args = p.parse_args(argv)
    if args.command == "fetch":
        client = _control(args.dir)
        if client.status().get("counters") is None:  # the peer answers (and the imports are done)
            print(json.dumps({"event": "error", "message": "the control API does not answer"}))
            return 0
        client.close()  # get() opens its own connection, with the fetch's timeout
        print(json.dumps({"ready": time.time()}), flush=True)
        at = float(sys.stdin.readline())  # the instant, once every helper is ready
        time.sleep(max(0.0, at - time.time()))
        out: dict[str, Any] = {"started_wall": time.time()}
        try:
            out.update(event="done", done=client.get(args.name, args.timeout))
        except Exception as e:
            out.update(event="error", message=f"{type(e).__name__}: {e}")
        out["ended_wall"] = time.time()
        print(json.dumps(out))
        return 0
    end = time.monotonic() + args.deadline
    status: dict[str, Any] = {}
    while True:
        try:
            status = _control(args.dir).status()
        except (OSError, ValueError, KeyError):
            status = {"files": None}  # not started yet
        if args.command == "status" and status.get("counters") is not None:
            break
        if args.command == "wait" and status.get("files") == args.files and (
                not args.connected or (status.get("tracker") or {}).get("connected")):
            break
        if time.monotonic() > end:
            print(f"not within {args.deadline:g}s: {args.command} {argv}; last status {status}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(json.dumps(status))
    return 0

