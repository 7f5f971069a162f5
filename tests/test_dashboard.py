"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright.

A tracker and three peers run under ``twistd`` as the README shows; the dashboard of peer ``a`` is
opened at the address ``p2pshare ui`` prints.  ``a`` knows only ``b`` and ``c`` knows only ``b``
(static neighbours, none from the tracker), so what ``c`` holds is two hops from ``a``.  Every step
leaves a screenshot in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.test_system import Daemon, cli, free_port, poll

pytestmark = [pytest.mark.browser, pytest.mark.system]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root, without a sandbox; and nothing of Google's background traffic (the machine may have no network).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
HOSTILE = "<img src=x onerror=alert(1)>.txt"
RTL = "report-\u05e9\u05dc\u05d5\u05dd-fdp.exe"  # Hebrew letters: shown left to right as stored, isolated from the rest
BIG = 2 * 1024 ** 3  # a sparse file: slow enough over loopback to cancel its fetch half-way


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is missing (Debian: apt-get install chromium; .ci/run installs it)")
    return sync_playwright


class Shots:
    """Screenshots of each step, numbered, under the test's temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.n = folder, 0
        folder.mkdir()

    def take(self, page: Any, step: str) -> None:
        self.n += 1
        page.screenshot(path=str(self.folder / f"{self.n:02d}-{step}.png"), full_page=True)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[dict[str, Any]]:
    tracker_port, b_port, c_port, a_control = free_port(), free_port(), free_port(), free_port()
    for name in "abc":
        (tmp_path / name).mkdir()
    (tmp_path / "c" / "report.txt").write_bytes(b"quarterly figures\n" * 200_000)  # 3.6 MB
    (tmp_path / "c" / HOSTILE).write_bytes(b"not a picture")
    with open(tmp_path / "c" / "big.iso", "wb") as f:
        f.truncate(BIG)
    (tmp_path / "a" / RTL).write_bytes(b"right to left")
    (tmp_path / "a" / HOSTILE).write_bytes(b"mine too")
    tracker_address = f"127.0.0.1:{tracker_port}"
    common = ["--tracker", tracker_address, "--interface", "127.0.0.1", "--neighbours", "0", "--refresh", "1"]
    daemons = {"tracker": Daemon.start("tracker", ["p2ptracker", "--port", f"tcp:{tracker_port}:interface=127.0.0.1"],
                                       tmp_path)}
    daemons["b"] = Daemon.start("b", ["p2ppeer", *common, "--dir", "b", "--port", str(b_port), "--control", "none"],
                                tmp_path)
    daemons["c"] = Daemon.start("c", ["p2ppeer", *common, "--dir", "c", "--port", str(c_port), "--control",
                                      f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"127.0.0.1:{b_port}"],
                                tmp_path)
    a_args = ["p2ppeer", *common, "--dir", "a", "--control", str(a_control), "--peer", f"127.0.0.1:{b_port}"]
    daemons["a"] = Daemon.start("a", a_args, tmp_path)
    net = {"root": tmp_path, "daemons": daemons, "a_args": a_args, "control": a_control}
    try:
        poll(lambda: _files(tmp_path, "a") == 2 or None, "peer a's control API", tuple(daemons.values()))
        poll(lambda: _files(tmp_path, "c") == 3 or None, "peer c to index its files", tuple(daemons.values()))
        yield net
    finally:
        for d in net["daemons"].values():
            d.stop()


def _files(root: Path, peer: str) -> int:
    done = cli("--dir", peer, "status", "--json", cwd=root)
    return json.loads(done.stdout)["files"] if done.returncode == 0 else -1


def _open(browser: Any) -> tuple[Any, list[str]]:
    """A page of its own, and what it reports: console errors, uncaught exceptions, dialogs."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    trouble: list[str] = []
    page.on("console", lambda m: trouble.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: trouble.append(f"page error: {e}"))

    def dialog(d: Any) -> None:
        trouble.append(f"dialog: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)
    return page, trouble


def _ui_address(root: Path) -> str:
    done = cli("--dir", "a", "ui", "--no-browser", cwd=root)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_search_fetch_cancel_and_hostile_names_in_a_real_browser(network: dict[str, Any]) -> None:
    sync_playwright = _playwright()
    root: Path = network["root"]
    shots = Shots(root / "screenshots")
    url = _ui_address(root)
    assert "#token=" in url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, trouble = _open(browser)
            page.goto(url)
            page.wait_for_selector("#conn[data-state=connected]")
            assert "token" not in page.url  # out of the address bar (and history) once kept
            assert page.text_content("#peer-tracker") == "registered"
            shots.take(page, "connected")

            # Search for a file two hops away and fetch it.
            page.fill("#search-input", "report.txt")
            page.click("#search-go")
            page.wait_for_selector("#searches .hit button.fetch", timeout=15_000)
            shots.take(page, "search-hit")
            page.click("#searches .hit button.fetch")
            page.wait_for_selector("#fetched li:has-text('report.txt') .outcome-completed", timeout=30_000)
            assert page.get_attribute("#fetched li:has-text('report.txt') .bar", "aria-valuenow") == "100"
            page.wait_for_selector("#file-rows td:has-text('report.txt')", timeout=10_000)
            assert (root / "a" / "report.txt").read_bytes() == (root / "c" / "report.txt").read_bytes()
            shots.take(page, "fetched")

            # A large fetch, cancelled half-way: it stops, and nothing unverified appears in the folder.
            page.fill("#search-input", "big.iso")
            page.click("#search-go")
            page.wait_for_selector("#searches li:has-text('big.iso') .hit button.fetch", timeout=15_000)
            page.click("#searches li:has-text('big.iso') .hit button.fetch")
            row = "#fetching li:has-text('big.iso')"
            page.wait_for_function(
                "() => { const li = [...document.querySelectorAll('#fetching li')].find("
                "l => l.textContent.includes('big.iso')); const b = li && li.querySelector('.bar');"
                " return b && +b.getAttribute('aria-valuenow') > 0 && +b.getAttribute('aria-valuenow') < 100; }",
                timeout=30_000)
            shots.take(page, "big-in-progress")
            page.click(f"{row} button.cancel")
            page.wait_for_selector("#fetched li:has-text('big.iso') .outcome-cancelled", timeout=10_000)
            page.wait_for_selector(row, state="detached", timeout=5_000)
            shots.take(page, "big-cancelled")
            assert not (root / "a" / "big.iso").exists()
            status = cli("--dir", "a", "status", "--json", cwd=root)
            assert '"fetching": {}' in status.stdout

            # Names from other peers, and our own, are text: the DOM holds them as they are, no dialog opened.
            page.fill("#search-input", HOSTILE)
            page.click("#search-go")
            page.wait_for_selector("#searches li:first-child[data-state=done] .hit", timeout=15_000)
            hit = page.eval_on_selector_all("#searches li:first-child .hit [data-name]", "els => els.map(e => e.textContent)")
            assert hit == [HOSTILE]  # c's file, named by c
            shown = page.eval_on_selector_all("#file-rows [data-name]", "els => els.map(e => e.textContent)")
            assert HOSTILE in shown and RTL in shown  # a's own
            assert page.eval_on_selector_all("img", "els => els.length") == 0
            isolation = page.eval_on_selector(f"#file-rows [data-name][title='{RTL}']",
                                              "e => getComputedStyle(e).unicodeBidi")
            assert isolation == "isolate"
            page.fill("#filter-hash", "0" * 64)  # filters: nothing matches this prefix...
            assert page.eval_on_selector_all("#file-rows tr", "els => els.length") == 0
            page.fill("#filter-hash", "")
            page.fill("#filter-name", "report.")  # ... and by name, only what it names
            assert page.eval_on_selector_all("#file-rows [data-name]", "els => els.map(e => e.textContent)") \
                == ["report.txt"]
            shots.take(page, "hostile-names")
            page.wait_for_timeout(1500)  # the next polls draw the same names again
            assert trouble == []

            # A daemon restart: the page says so, then carries on with the same token.
            daemons = network["daemons"]
            daemons["a"].stop()
            page.wait_for_selector("#conn[data-state=reconnecting]", timeout=10_000)
            shots.take(page, "peer-stopped")
            daemons["a"] = Daemon.start("a-again", network["a_args"], root)
            page.wait_for_selector("#conn[data-state=connected]", timeout=30_000)
            assert page.is_visible("#main")
            shots.take(page, "peer-restarted")

            # A phone-sized window: everything fits its width.
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(300)
            assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
            shots.take(page, "phone")
        finally:
            browser.close()


def test_without_the_token_the_page_asks_for_it_and_the_api_stays_closed(network: dict[str, Any]) -> None:
    sync_playwright = _playwright()
    root: Path = network["root"]
    shots = Shots(root / "screenshots")
    base = _ui_address(root).split("#")[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page, trouble = _open(browser)
            page.goto(base)
            page.wait_for_selector("#login", state="visible")
            assert page.is_hidden("#main")
            assert "needs the peer's control token" in page.text_content("#login")
            code = page.evaluate("() => fetch('/v1/status').then(r => r.status)")
            assert code == 401
            shots.take(page, "no-token")

            page.goto(base + "#token=" + "0" * 64)  # a wrong one
            page.reload()
            page.wait_for_selector("#conn[data-state=refused]")
            assert "refused this token" in page.text_content("#login-why")
            shots.take(page, "wrong-token")
            assert [t for t in trouble if "401 (Unauthorized)" not in t] == []  # only the refusals themselves
        finally:
            browser.close()


def test_the_page_is_served_with_a_policy_that_forbids_inline_script(network: dict[str, Any]) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{network['control']}/", timeout=5) as r:
        policy = r.headers["content-security-policy"]
        body = r.read().decode()
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert "<script>" not in body and "style=" not in body  # everything the page runs comes from its own files


def test_ui_prints_the_address_with_the_token_in_the_fragment(network: dict[str, Any]) -> None:
    root: Path = network["root"]
    token = (root / "a" / ".p2pshare" / "control.token").read_text().strip()
    done = cli("--dir", "a", "ui", "--no-browser", cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == f"http://127.0.0.1:{network['control']}/#token={token}"
    assert "keep it to yourself" in done.stderr
