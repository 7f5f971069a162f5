"""Benchmark 7, watching a peer: a Prometheus scrape, and the dashboard left open.

* A ``twistd p2ppeer`` shares 10,000 small files; ``GET /metrics`` through its control API (with
  its token, as a local Prometheus scrapes it) is timed over many requests on one kept-alive
  connection, and its size recorded.  Baseline in the same repeat, on the same connection:
  ``GET /v1/status``, the API's cheapest request.
* The same peer, idle, with the dashboard open in headless Chromium (Debian's, driven by
  Playwright) for 60 s: the peer's CPU time over that minute, from ``/proc``, as a share of one
  core.  Baseline: the same minute with no page open.  Without Chromium or Playwright the two
  figures are reported n/a.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from typing import Any, Optional

from benchmarks.daemons import ControlClient, cpu_seconds, free_ports, start_peer, wait_ready
from benchmarks.harness import Context, Figure, Goal

BENCH = "7 observe"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def timed_get(client: ControlClient, path: str) -> tuple[float, int]:
    """Seconds for one GET (request to last byte of the answer) and the answer's size."""
    started = time.perf_counter()
    response = client._request("GET", path, timeout=30.0)
    body = response.read()
    if response.status != 200:
        raise AssertionError(f"GET {path}: HTTP {response.status}")
    return time.perf_counter() - started, len(body)


def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core process *pid* used over the next *seconds*."""
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - t0)


def browser() -> Optional[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright if os.path.exists(CHROMIUM) else None


def run(ctx: Context) -> list[Figure]:
    count = ctx.size(10_000, 2_000, 50)
    requests = ctx.size(200, 50, 5)
    idle = ctx.size(60.0, 15.0, 2.0)
    folder = ctx.folder("observe", "peer")
    for i in range(count):
        sub = folder / f"d{i // 1000:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:05d}.txt").write_bytes(b"%d\n" % i)
    (port,) = free_ports(1)
    peer = start_peer(ctx, folder, port, label="observe-peer")
    control: Optional[ControlClient] = None
    try:
        control = wait_ready(peer, files=count, deadline=300.0)

        def once(i: int) -> tuple[float, float, float]:
            assert control is not None
            scrapes, statuses, size = [], [], 0
            for _ in range(requests):
                seconds, size = timed_get(control, "/metrics")
                scrapes.append(seconds)
                statuses.append(timed_get(control, "/v1/status")[0])
            return statistics.median(scrapes) * 1000, statistics.median(statuses) * 1000, float(size)

        rounds = ctx.repeat(once)
        scrape, status, size = ([r[k] for r in rounds] for k in range(3))
        figures = [
            Figure(BENCH, f"GET /metrics with {count:,} shared files, median", "ms", scrape, Goal("<=", 25)),
            Figure(BENCH, "scrape size", "bytes", size),
            Figure(BENCH, "GET /v1/status baseline, median", "ms", status),
            Figure(BENCH, "scrape / status", "x", [a / b for a, b in zip(scrape, status)]),
        ]
        figures += dashboard_cpu(ctx, peer.pid, control, idle)
        return figures
    finally:
        if control is not None:
            control.close()
        ctx.procs.stop(peer.proc)


def dashboard_cpu(ctx: Context, pid: int, control: ControlClient, idle: float) -> list[Figure]:
    """The peer's share of a core over *idle* seconds without, then with, the dashboard open."""
    label = f"peer CPU over {idle:g} s idle"
    playwright = browser()
    if playwright is None:
        return [Figure(BENCH, f"{label}, dashboard open", "% of a core", [], Goal("<", 1.0), status="n/a",
                       note="needs Chromium and Playwright")]
    token = control.headers["authorization"].split()[1]
    url = f"http://{control.address[0]}:{control.address[1]}/#token={token}"
    ctx.say(f"the peer idle for {idle:g} s, no page open")
    without = cpu_share(pid, idle) * 100
    with playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page()
            polls: list[str] = []  # the page's status requests, as the browser saw them leave
            page.on("request", lambda request: polls.append(request.url) if "/v1/status" in request.url else None)
            page.goto(url)
            page.wait_for_selector("#conn[data-state=connected]", timeout=30_000)
            page.wait_for_selector("#file-rows tr", timeout=60_000)  # the file list drawn: the page is idle now
            ctx.say(f"the peer idle for {idle:g} s, the dashboard open")
            page.wait_for_timeout(1)  # (events reach the handler when the page is next called)
            before = len(polls)
            opened = cpu_share(pid, idle) * 100
            page.wait_for_timeout(1)
            polled = len(polls) - before
            if not page.is_visible("#main") or polled == 0:
                raise AssertionError(f"the dashboard stopped polling the peer ({polled} requests)")
        finally:
            chromium.close()
    return [
        Figure(BENCH, f"{label}, dashboard open", "% of a core", [opened], Goal("<", 1.0)),
        Figure(BENCH, "status requests from the page in that time", "requests", [float(polled)]),
        Figure(BENCH, f"{label}, no page (baseline)", "% of a core", [without]),
        Figure(BENCH, "the open dashboard's own cost", "% of a core", [opened - without]),
    ]
