"""Generated Python, formatted: `ruff check --fix` (import order) and `ruff format` over the rendered files.

Templates and the body renderer produce correct code; the layout a reviewer expects (wrapped long calls,
sorted imports) is ruff's, under templates/ruff.toml, so every generated package passes `ruff check` and
`ruff format --check`. Deterministic for one ruff version, so builds stay byte-identical.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from dslc.resources import templates_dir


class StyleError(Exception):
    """ruff is missing or failed on generated code (a compiler bug when the code itself is at fault)."""


def format_python(files: dict[str, str]) -> dict[str, str]:
    """The same files, every `.py` one fixed and formatted by ruff (one process for each step)."""
    config = str(templates_dir() / "ruff.toml")
    names = sorted(n for n in files if n.endswith(".py"))
    with tempfile.TemporaryDirectory(prefix="dslc-style-") as tmp:
        root = Path(tmp)
        for n in names:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_text(files[n], encoding="utf-8")
        for step in (["check", "--fix-only", "--exit-zero", "--quiet"], ["format", "--quiet"]):
            cmd = [sys.executable, "-m", "ruff", *step, "--config", config, "--no-cache", "."]
            try:
                done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
            except FileNotFoundError as e:  # pragma: no cover - sys.executable always exists
                raise StyleError(f"cannot run ruff: {e}") from None
            if done.returncode != 0:
                why = (done.stderr or done.stdout).strip()
                if "No module named ruff" in why:
                    raise StyleError("ruff is not installed: `pip install ruff` (a dependency of dslc)")
                raise StyleError(f"ruff {step[0]} failed on the generated code:\n{why}")
        out = dict(files)
        for n in names:
            out[n] = (root / n).read_text(encoding="utf-8")
    return out
