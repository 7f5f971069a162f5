"""The documentation's runnable example: docs/library.md's Python block runs and succeeds as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

LIBRARY_MD = Path(__file__).resolve().parent.parent / "docs" / "library.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[str]:
    return FENCE.findall(LIBRARY_MD.read_text(encoding="utf-8"))


def test_library_md_has_exactly_one_python_example() -> None:
    assert len(python_blocks()) == 1


def test_library_example_runs_and_fetches_the_file(tmp_path: Path) -> None:
    script = tmp_path / "library_example.py"
    script.write_text(python_blocks()[0], encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = (r"^fetched notes\.txt: 1048576 bytes from 127\.0\.0\.1:\d+, "
               r"dialled by the (holder|requester), SHA-256 verified$")
    assert re.search(printed, done.stdout, re.MULTILINE), done.stdout + done.stderr
    assert "as expected: missing.txt: no peer answered within 1s" in done.stdout
