"""Runs inside one host namespace and drives that host's peer through its control API
(with the token the peer keeps in ``<dir>/.p2pshare/control.token``).

    ip netns exec NS .venv/bin/python tests/netns_driver.py search --dir D --name N --count 200 --deadline 5

One process performs many operations (a CLI process per search would cost more than the
search), then prints one JSON line with the results.  Subcommands:

``status``   the peer's ``/v1/status``.
``search``   N searches, each ``GET /v1/search?timeout=DEADLINE``.  A search answers only at
             its timeout (it collects every holder), so "found within the deadline" is exact:
             the answer lists a hit.  Its latency is measured by watching the peer's
             ``hits_received`` counter (polled every ``--poll`` s) from the moment the
             search is sent; the next search starts as soon as this one has a hit (or its
             deadline passes), so answered searches overlap while they wait for their
             timeout.  A hit for an older search that re-queried could be taken for the
             newer one's: latencies are approximate to that extent, found counts are not.
``fetch``    N fetches, one after the other (``POST /v1/get``); ``--remove`` deletes the
             file after each; ``--progress`` also prints each progress event as a line.
``peers-watch``  polls ``p2pshare peers --tracker`` (the CLI's own code, in this process)
             every 20 ms until the tracker lists every ``--expect`` peer id; wall-clock times.

Times in the output: ``*_wall`` are ``time.time()`` (comparable across namespaces),
latencies and durations are seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional


Control = tuple[str, int, str]  # host, port, token


def control(directory: str) -> Control:
    """The peer's control API address (``control.json``) and token (``control.token``, mode 0600)."""
    state = Path(directory) / ".p2pshare"
    url = json.loads((state / "control.json").read_text())["url"]
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, (state / "control.token").read_text().strip()


def request(address: Control, method: str, path: str, body: Optional[dict[str, Any]] = None,
            timeout: float = 30.0) -> http.client.HTTPResponse:
    host, port, token = address
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request(method, path, json.dumps(body).encode() if body is not None else None,
                 {"content-type": "application/json", "authorization": f"Bearer {token}"})
    return conn.getresponse()


def status(address: Control) -> dict[str, Any]:
    response = request(address, "GET", "/v1/status", timeout=10)
    data = json.loads(response.read())
    response.close()
    return data


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stats(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    v = sorted(values)

    def pct(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))], 4)

    return {"n": len(v), "min": round(v[0], 4), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "max": round(v[-1], 4), "mean": round(sum(v) / len(v), 4)}


# -- search ---------------------------------------------------------------------------------------


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    address = control(args.dir)
    query = urllib.parse.urlencode({"name": args.name, "timeout": args.deadline})
    before = status(address)
    results: list[dict[str, Any]] = [{} for _ in range(args.count)]

    def one(i: int, started: float) -> None:
        try:
            response = request(address, "GET", f"/v1/search?{query}", timeout=args.deadline + 60)
            reply = json.loads(response.read())
            response.close()
            hits = reply.get("hits", [])
            results[i].update(found=bool(hits), hops=min((h["hops"] for h in hits), default=None),
                              holders=sorted(h["tcp"] for h in hits), error=reply.get("message"))
        except Exception as e:  # a broken control connection is a failed search, with its reason
            results[i].update(found=False, hops=None, holders=[], error=repr(e))
        results[i]["duration"] = time.monotonic() - started

    threads = []
    first_wall = time.time()
    for i in range(args.count):
        base = status(address)["counters"].get("hits_received", 0)
        started = time.monotonic()
        results[i]["started_wall"] = time.time()
        thread = threading.Thread(target=one, args=(i, started), daemon=True)
        thread.start()
        threads.append(thread)
        latency = None
        while thread.is_alive() and time.monotonic() - started < args.deadline + 30:
            if status(address)["counters"].get("hits_received", 0) > base:
                latency = time.monotonic() - started
                break
            time.sleep(args.poll)
        results[i]["latency"] = latency
    for thread in threads:
        thread.join(args.deadline + 90)
    after = status(address)
    found = [r for r in results if r.get("found")]
    return {
        "op": "search", "name": args.name, "count": args.count, "deadline": args.deadline,
        "found": len(found),
        "latency": stats([r["latency"] for r in found if r.get("latency") is not None]),
        "latency_unmeasured": sum(1 for r in found if r.get("latency") is None),
        "duration": stats([r["duration"] for r in results if "duration" in r]),
        "unfinished": sum(1 for r in results if "duration" not in r),
        "hops": sorted({r["hops"] for r in found}),
        "holders": sorted({h for r in found for h in r["holders"]}),
        "errors": sorted({r["error"] for r in results if r.get("error")})[:5],
        "first_wall": first_wall, "last_wall": time.time(),
        "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "holders"}
                    for r in results] if args.details else None,
        "counters_before": before["counters"], "counters_after": after["counters"],
    }


# -- fetch ----------------------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> dict[str, Any]:
    address = control(args.dir)
    before = status(address)
    results = []
    for _ in range(args.count):
        started = time.monotonic()
        outcome: dict[str, Any] = {"started_wall": time.time()}
        try:
            response = request(address, "POST", "/v1/get", {"name": args.name, "timeout": args.timeout},
                               timeout=args.timeout + 120)
            for raw in response:
                if not raw.strip():
                    continue
                event = json.loads(raw)
                if event["event"] == "progress" and args.progress:
                    emit({"event": "progress", "received": event["received"], "size": event["size"],
                          "wall": time.time()})
                elif event["event"] in ("done", "error"):
                    outcome.update(event)
            response.close()
        except Exception as e:
            outcome.update(event="error", message=repr(e))
        outcome["duration"] = time.monotonic() - started
        outcome["ended_wall"] = time.time()
        results.append(outcome)
        if args.remove and outcome.get("event") == "done":
            Path(outcome["path"]).unlink(missing_ok=True)
    after = status(address)
    done = [r for r in results if r.get("event") == "done"]
    return {
        "op": "fetch", "name": args.name, "count": args.count, "timeout": args.timeout, "done": len(done),
        "latency": stats([r["duration"] for r in done]),
        "duration": stats([r["duration"] for r in results]),
        "errors": sorted({r.get("message", "") for r in results if r.get("event") != "done"})[:5],
        "results": results,
        "counters_before": before["counters"], "counters_after": after["counters"],
    }


# -- the tracker ----------------------------------------------------------------------------------


def cmd_peers_watch(args: argparse.Namespace) -> dict[str, Any]:
    from p2pshare.cli import main as p2pshare

    expected = set(args.expect)
    first_answer = last_refusal = complete = None
    growth: list[tuple[float, int]] = []
    end = time.monotonic() + args.timeout
    while time.monotonic() < end:
        out, err = io.StringIO(), io.StringIO()
        asked = time.time()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = p2pshare(["peers", "--tracker", args.tracker, "--max", "100", "--timeout", "1"])
        now = time.time()
        if code != 0:
            if first_answer is None:
                last_refusal = asked
        else:
            if first_answer is None:
                first_answer = now
            listed = {line.split("\t")[0] for line in out.getvalue().splitlines() if line.strip()}
            count = len(listed & expected)
            if not growth or growth[-1][1] != count:
                growth.append((now, count))
            if count == len(expected):
                complete = now
                break
        time.sleep(0.02)
    return {"op": "peers-watch", "expected": len(expected), "last_refusal_wall": last_refusal,
            "first_answer_wall": first_answer, "complete_wall": complete, "growth": growth}


def main() -> None:
    p = argparse.ArgumentParser(prog="netns_driver")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status")
    s.add_argument("--dir", required=True)
    s = sub.add_parser("search")
    s.add_argument("--dir", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--deadline", type=float, default=5.0, help="each search's timeout, seconds")
    s.add_argument("--poll", type=float, default=0.005)
    s.add_argument("--details", action="store_true", help="include every search's result")
    s = sub.add_parser("fetch")
    s.add_argument("--dir", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--remove", action="store_true")
    s.add_argument("--progress", action="store_true")
    s = sub.add_parser("peers-watch")
    s.add_argument("--tracker", required=True)
    s.add_argument("--dir", help="ignored (accepted so every subcommand takes it)")
    s.add_argument("--expect", action="append", default=[])
    s.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    if args.command == "status":
        emit(status(control(args.dir)))
    elif args.command == "search":
        emit(cmd_search(args))
    elif args.command == "fetch":
        emit(cmd_fetch(args))
    else:
        emit(cmd_peers_watch(args))


if __name__ == "__main__":
    main()
