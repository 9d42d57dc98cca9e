"""The project's own code is ruff-clean and ruff-formatted under pyproject.toml (as generated packages are)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = [
    "dslc",
    "tests",
    "bench",
    "scripts",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "templates").rglob("*.py")),
]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_check():
    done = _ruff("check")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


def test_ruff_format():
    done = _ruff("format", "--check")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
