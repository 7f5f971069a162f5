"""The metrics the documentation names are the metrics p2pshare exports.

docs/grafana-dashboard.json's queries and docs/operations.md's alert rules may use only names that a
live tracker and live peers export; operations.md's tables must list every family they export (with
the label values seen), and nothing that cannot be exported. The scrapes come from a tracker and two
peers over loopback, after a search and a fetch, so that every histogram and the fetch's families
have samples. They also back security.md's claim that a scrape names no file and no address.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from p2pshare.metrics import PREFIX, counter_families
from tests.loopback import Network, eventually

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
NAME = re.compile(r"\bp2pshare_[a-z_]+")
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```$", re.MULTILINE | re.DOTALL)
FILE_NAME = "quarterly-report.pdf"
FILE_DATA = b"figures for the board " * 20_000


@dataclass
class Scrape:
    text: str
    families: list[Any]

    @property
    def sample_names(self) -> set[str]:
        return {s.name for f in self.families for s in f.samples}


@dataclass
class Live:
    """What a tracker and two peers (a holder and a requester) exported after a search and a fetch."""

    tracker: Scrape
    holder: Scrape
    requester: Scrape
    secrets: dict[str, str]  # what no scrape may hold: what -> its text
    ids: dict[str, str]  # the peers' ids: "holder", "requester" -> id

    @property
    def exported(self) -> set[str]:
        """Every sample name exposed, suffixes included (``_total``, ``_bucket``, ``_sum``, ``_count``)."""
        return self.tracker.sample_names | self.holder.sample_names | self.requester.sample_names


_live: Optional[Live] = None


def scrape(registry: Any) -> Scrape:
    text = generate_latest(registry).decode()
    return Scrape(text, list(text_string_to_metric_families(text)))


async def live(tmp_path_factory: pytest.TempPathFactory) -> Live:
    """The scrapes, taken once per test session (starting a network for each test would only repeat them)."""
    global _live
    if _live is None:
        network = Network(tmp_path_factory.mktemp("metrics-docs"))
        try:
            address = await network.start_tracker()
            holder = await network.add({FILE_NAME: FILE_DATA}, tracker=address)
            requester = await network.add(tracker=address)
            await eventually(lambda: holder.tracker.registered and requester.tracker.registered
                             and requester.neighbours())
            hits = await requester.search(FILE_NAME, timeout=2.0)
            assert hits, "the search found nothing: the histograms would have no samples"
            result = await requester.fetch(FILE_NAME, timeout=10.0)
            secrets = {"file name": FILE_NAME, "content hash": result.sha256, "address": "127.0.0.1"}
            _live = Live(scrape(network.tracker.factory.metrics.registry), scrape(holder.metrics.registry),
                         scrape(requester.metrics.registry), secrets,
                         {"holder": holder.peer_id, "requester": requester.peer_id})
        finally:
            await network.stop()
    return _live


def unknown(names: Iterable[str], exported: set[str]) -> list[str]:
    """The *names* that no scrape exposes."""
    return sorted(set(names) - exported)


def exposed_name(family: Any) -> str:
    """A family's name as a reader sees it in the scrape: ``_total`` for a counter, ``_bucket`` for a
    histogram (whose ``_sum`` and ``_count`` go with it), the name itself for a gauge."""
    names = {s.name for s in family.samples} - {family.name + "_sum", family.name + "_count",
                                                 family.name + "_created"}
    assert len(names) == 1, (family.name, names)
    return names.pop()


# -- the documents ----------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def dashboard_names(board: dict[str, Any]) -> set[str]:
    """The metric names in every panel query and in the template variables' queries."""
    texts = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        query = var.get("query")
        texts.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
        texts.append(var.get("definition", ""))
    return {n for text in texts for n in NAME.findall(text)}


def section(text: str, heading: str) -> str:
    """The text under *heading* (a whole line), up to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = text.index("\n" + heading + "\n") + len(heading) + 2
    ends = [m.start() for m in re.finditer(r"^#{1,%d} " % len(level), text[start:], re.MULTILINE)]
    return text[start:start + ends[0]] if ends else text[start:]


def metrics_section() -> str:
    return section(OPERATIONS.read_text(encoding="utf-8"), "## Metrics")


def alert_rules() -> str:
    blocks = [b for b in YAML_BLOCK.findall(metrics_section()) if "alert:" in b]
    assert len(blocks) == 1, "operations.md's Metrics section should have one block of alert rules"
    return blocks[0]


def table(heading: str) -> dict[str, str]:
    """The rows of the metrics table under *heading*: the metric's exposed name -> the whole row."""
    rows = {}
    for line in section(metrics_section(), heading).splitlines():
        match = re.match(r"\| `(p2pshare_[a-z_]+)`", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is listed twice"
            rows[match.group(1)] = line
    assert rows, f"no metrics table under {heading}"
    return rows


PEER_TABLE = "### What a peer exports"
TRACKER_TABLE = "### What a tracker exports"


# -- the checker itself -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_name_that_is_not_exported_is_reported(tmp_path_factory: pytest.TempPathFactory) -> None:
    exported = (await live(tmp_path_factory)).exported
    assert unknown({"p2pshare_neighbours", "p2pshare_no_such_thing_total", "p2pshare_neighbours_total"},
                   exported) == ["p2pshare_neighbours_total", "p2pshare_no_such_thing_total"]
    assert {"p2pshare_transfer_bytes_total", "p2pshare_tracker_request_duration_seconds_bucket",
            "p2pshare_search_first_hit_seconds_count", "p2pshare_fetch_duration_seconds_sum"} <= exported


# -- (a) the Grafana dashboard ------------------------------------------------------------------------

def test_the_dashboard_imports_with_a_prometheus_input_and_an_instance_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]] == \
        [("DS_PROMETHEUS", "datasource", "prometheus")]
    assert "instance" in [v["name"] for v in board["templating"]["list"]]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels(board) if p["type"] != "row"]
    assert graphs and {p["type"] for p in graphs} <= {"timeseries", "stat"}
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["refId"], p["title"]
            assert '$instance' in t["expr"], f"{p['title']}: {t['expr']} ignores the instance variable"


@pytest_twisted.ensureDeferred
async def test_every_metric_in_the_dashboard_is_exported(tmp_path_factory: pytest.TempPathFactory) -> None:
    names = dashboard_names(dashboard())
    assert len(names) >= 15, names  # the queries were read, not skipped
    assert unknown(names, (await live(tmp_path_factory)).exported) == []


# -- (b) the alert rules --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_every_metric_in_the_alert_rules_is_exported(tmp_path_factory: pytest.TempPathFactory) -> None:
    names = set(NAME.findall(alert_rules()))
    assert {"p2pshare_tracker_connected", "p2pshare_datagrams_dropped_total", "p2pshare_bad_pieces_total",
            "p2pshare_downloads_total", "p2pshare_tracker_request_duration_seconds_bucket",
            "p2pshare_tracker_events_total"} <= names
    assert unknown(names, (await live(tmp_path_factory)).exported) == []


# -- (c) the tables of operations.md ---------------------------------------------------------------------

def check_table(rows: dict[str, str], scrapes: Iterable[Scrape]) -> None:
    """Every family of *scrapes* has its row, naming every label and every label value seen."""
    missing, labels = set(), []
    for s in scrapes:
        for family in s.families:
            name = exposed_name(family)
            row = rows.get(name)
            if row is None:
                missing.add(name)
                continue
            for sample in family.samples:
                for label, value in sample.labels.items():
                    if label == "le":
                        continue
                    if f"`{label}`" not in row:
                        labels.append(f"{name}: label {label}")
                    if label not in ("peer_id", "version") and f"`{value}`" not in row:
                        labels.append(f"{name}: {label}={value}")
    assert sorted(missing) == [], "exported, but not in operations.md's table"
    assert sorted(set(labels)) == [], "exported, but not in the family's row of operations.md's table"


@pytest_twisted.ensureDeferred
async def test_every_family_a_peer_exports_is_in_the_peer_table(tmp_path_factory: pytest.TempPathFactory) -> None:
    got = await live(tmp_path_factory)
    check_table(table(PEER_TABLE), (got.holder, got.requester))


@pytest_twisted.ensureDeferred
async def test_every_family_a_tracker_exports_is_in_the_tracker_table(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    got = await live(tmp_path_factory)
    check_table(table(TRACKER_TABLE), (got.tracker,))


@pytest_twisted.ensureDeferred
async def test_the_tables_list_nothing_that_cannot_be_exported(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A row the live scrapes did not show is a counter of its own that the code does count (a rare
    event: an oversized send, an outsider, a full queue...), exported under that name."""
    got = await live(tmp_path_factory)
    seen = {exposed_name(f) for s in (got.tracker, got.holder, got.requester) for f in s.families}
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "p2pshare").glob("*.py"))
                       if p.name != "metrics.py")
    wrong = []
    for name in [*table(PEER_TABLE), *table(TRACKER_TABLE)]:
        if name in seen:
            continue
        counter = name[len(PREFIX):-len("_total")] if name.endswith("_total") else ""
        families = [f.name for f in counter_families({counter: 1})] if counter else []
        if families != [PREFIX + counter] or f'"{counter}"' not in source:
            wrong.append(name)
    assert wrong == []


# -- what a scrape reveals (security.md) ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_scrape_holds_no_file_name_hash_or_address(tmp_path_factory: pytest.TempPathFactory) -> None:
    got = await live(tmp_path_factory)
    scrapes = {"tracker": got.tracker.text, "holder": got.holder.text, "requester": got.requester.text}
    found = [f"{what} in the {who}'s scrape" for who, text in scrapes.items()
             for what, secret in got.secrets.items() if secret in text]
    # A peer names itself (p2pshare_peer_info), and no other peer; a tracker names none.
    found += [f"the {whose} id in the {who}'s scrape" for who, text in scrapes.items()
              for whose, peer_id in got.ids.items() if whose != who and peer_id in text]
    assert found == []
    for who in ("holder", "requester"):
        assert f'peer_id="{got.ids[who]}"' in scrapes[who] and scrapes[who].count("peer_id=") == 1
