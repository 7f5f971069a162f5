"""What every benchmark shares: figures and goals, repeats, the run's folder and processes.

A benchmark module exposes ``run(ctx) -> list[Figure]``.  A figure holds one
sample per repeat; the table shows its median and range, and its goal is judged
on the median (or on the worst sample, for goals such as "no misses").  Sizes
come in three modes: ``full`` (``make bench``), ``quick`` (development) and
``smoke`` (the tests' tiny version of each benchmark).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence, TypeVar

from attrs import define, field

T = TypeVar("T")
MODES = ("full", "quick", "smoke")


def quantile(values: Sequence[float], q: float) -> float:
    """The nearest-rank *q* quantile (0 < q <= 1) of *values*."""
    ordered = sorted(values)
    rank = max(1, math.ceil(round(q * len(ordered), 9)))  # round: 0.95 * 20 must give 19, not 19.000000001
    return ordered[min(rank, len(ordered)) - 1]


@define(frozen=True)
class Goal:
    """``value OP limit``; *on* says which statistic of the samples is judged."""

    op: str  # ">=", "<=" or "<"
    limit: float
    on: str = "median"  # or "max" (the worst repeat must meet it)

    def met(self, value: float) -> bool:
        return {">=": value >= self.limit, "<=": value <= self.limit, "<": value < self.limit}[self.op]

    def text(self) -> str:
        limit = f"{self.limit:g}"
        return f"{self.op} {limit}" + (" (every repeat)" if self.on == "max" else "")


@define
class Figure:
    """One reported number: its samples (one per repeat), unit and goal."""

    benchmark: str
    name: str
    unit: str
    samples: list[float]
    goal: Optional[Goal] = None
    note: str = ""
    status: str = ""  # overrides the verdict, e.g. "n/a" for a figure that cannot be measured yet

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def low(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def high(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def judged(self) -> float:
        if self.goal is not None and self.goal.on == "max":
            # the worst sample: the largest for an upper bound, the smallest for a lower one
            return self.high if self.goal.op in ("<", "<=") else self.low
        return self.median

    @property
    def verdict(self) -> str:
        if self.status:
            return self.status
        if self.goal is None or not self.samples:
            return "-"
        return "pass" if self.goal.met(self.judged()) else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark, "figure": self.name, "unit": self.unit, "median": self.median,
            "min": self.low, "max": self.high, "samples": self.samples,
            "goal": self.goal.text() if self.goal else None, "verdict": self.verdict, "note": self.note,
        }


class Processes:
    """Every subprocess a run starts, so that all of them end however the run ends."""

    def __init__(self) -> None:
        self._running: dict[int, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}

    def start(self, args: Sequence[str], log: Path, cwd: Optional[Path] = None,
              stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        """Start *args* with stderr (and stdout unless piped) appended to *log*."""
        out = open(log, "ab")
        proc = subprocess.Popen(list(args), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if stdout_pipe else out, stderr=out, cwd=cwd)
        self._running[proc.pid] = (proc, out)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after *timeout*; always reaps the process."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _, out = self._running.pop(proc.pid, (None, None))
        if out is not None:
            out.close()
        if proc.stdout is not None:
            proc.stdout.close()

    def stop_all(self) -> None:
        for proc, _ in list(self._running.values()):
            self.stop(proc, timeout=5.0)


@define
class Context:
    """One run: its mode, repeats, temporary folder, processes and the figures so far."""

    mode: str
    root: Path
    repeats: int
    warmup: int
    procs: Processes = field(factory=Processes)
    results: dict[str, list[Figure]] = field(factory=dict)
    verbose: bool = True
    _data: dict[int, Path] = field(factory=dict)

    def size(self, full: T, quick: T, smoke: T) -> T:
        """The value for this run's mode."""
        return {"full": full, "quick": quick, "smoke": smoke}[self.mode]

    def folder(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def say(self, message: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def random_file(self, size: int) -> Path:
        """A file of *size* random bytes, written once per run; link it where it is needed."""
        path = self._data.get(size)
        if path is None:
            path = self.folder("data") / f"random-{size}.bin"
            write_random(path, size)
            self._data[size] = path
        return path

    def repeat(self, once: Callable[[int], T]) -> list[T]:
        """Run ``once(i)`` for the warm-up rounds (results dropped), then for each repeat."""
        for i in range(self.warmup):
            self.say(f"warm-up {i + 1}/{self.warmup}")
            once(-1 - i)
        out = []
        for i in range(self.repeats):
            self.say(f"repeat {i + 1}/{self.repeats}")
            out.append(once(i))
        return out


def size_text(size: int) -> str:
    """*size* bytes as the tables name it: "1 GiB", "64 MiB", "16 KiB"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def write_random(path: Path, size: int, chunk: int = 8 * 1024 * 1024) -> None:
    """*size* bytes from ``os.urandom``: incompressible and with no holes."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def link_into(source: Path, folder: Path, name: str) -> Path:
    """Hard-link *source* as *folder*/*name* (same bytes, same page cache, no copy)."""
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.link(source, target)
    return target


def columns(figures: Sequence[Figure]) -> list[tuple[str, ...]]:
    """The table's rows: benchmark, figure, median, range, goal, verdict."""
    rows = [("benchmark", "figure", "median", "range", "goal", "pass/fail")]
    for f in figures:
        unit = f" {f.unit}" if f.unit else ""
        rows.append((f.benchmark, f.name, f"{_fmt(f.median)}{unit}",
                     f"{_fmt(f.low)} - {_fmt(f.high)}" if len(f.samples) > 1 else "(1 sample)",
                     f.goal.text() if f.goal else "-", f.verdict))
    return rows


def table(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table (readable as plain text too), then their notes."""
    rows = columns(figures)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"- {f.benchmark} / {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"
