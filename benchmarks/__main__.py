"""``python -m benchmarks [--quick] [--only NAME] [--repeats N]``: run, print the table, write JSON.

Everything runs under one temporary folder in /tmp, removed at the end with
every process the run started, also when a benchmark fails or the run is
interrupted.  A benchmark that fails is reported as such and the others still
run; the exit status is 1 if any failed (a goal not reached is not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import import_module
from pathlib import Path
from typing import Any

import twisted

from benchmarks import BENCHMARKS
from benchmarks.harness import Context, Figure, table

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "twisted": twisted.__version__, "kernel": platform.release(), "code": code_version()}


def code_version() -> str:
    """The commit measured, and the files of p2pshare/ that differed from it (others edit the same tree).

    The code measured is the ``p2pshare`` that imports (a snapshot on PYTHONPATH takes precedence).
    """
    import p2pshare

    here = Path(p2pshare.__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return f"p2pshare from {here}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "p2pshare"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return commit + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and one repeat, for development")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--repeats", type=int, help="measured repeats (default 3, --quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds before the repeats (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"the JSON file (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, files)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    mode = "quick" if args.quick else "full"
    names = args.only or list(BENCHMARKS)
    root = Path(tempfile.mkdtemp(prefix="p2pshare-bench-", dir="/tmp"))
    ctx = Context(mode, root, args.repeats or (1 if args.quick else 3), max(0, args.warmup))
    figures: list[Figure] = []
    failed: dict[str, str] = {}
    started = time.monotonic()
    print(f"p2pshare benchmarks ({mode}: {ctx.repeats} repeat(s) after {ctx.warmup} warm-up) in {root}",
          file=sys.stderr)
    try:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                got = import_module(BENCHMARKS[name]).run(ctx)
            except Exception as e:  # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                failed[name] = f"{type(e).__name__}: {e}"
                ctx.procs.stop_all()
                continue
            ctx.results[name] = got
            figures += got
            print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        ctx.procs.stop_all()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    info = machine()
    print()
    print(f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, Twisted {info['twisted']}; "
          f"{mode} run, {ctx.repeats} repeat(s), {elapsed:.0f} s; code: {info['code']}")
    print()
    print(table(figures))
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "mode": mode, "repeats": ctx.repeats, "warmup": ctx.warmup, "seconds": round(elapsed, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "figures": [f.to_json() for f in figures], "failed": failed,
    }, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
