#!/usr/bin/env python3
"""Regenerate the golden `tests/ui/*.stderr` files from what `dslc check` prints today.

    python3 scripts/bless_ui.py            # every case
    python3 scripts/bless_ui.py e010 w001  # cases whose name contains one of the words

Each `tests/ui/<name>.model` is checked as `dslc check tests/ui/<name>.model [ARGS]` from the repo root,
where ARGS come from an optional `# dslc-args: ...` line. Read the diff before committing: a changed
.stderr is a changed user-facing message. `tests/test_diagnostics.py` imports `run_case` from here,
so the test and the blessing can never disagree on how a case runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "tests" / "ui"
ARGS_RE = re.compile(r"#\s*dslc-args:\s*(.*?)\s*$")
ANNOTATION_RE = re.compile(r"\b(ERROR|WARNING) ([EW]\d{3})\b")


def case_text(path: Path) -> str:
    """The case's source as the CLI shows it (undecodable bytes replaced, as the renderer does)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def case_args(path: Path) -> list[str]:
    for line in case_text(path).splitlines():
        m = ARGS_RE.search(line)
        if m:
            return shlex.split(m.group(1))
    return []


def annotations(path: Path) -> set[tuple[str, int]]:
    """(code, line) for every `# ERROR E0xx` / `# WARNING W00x` in the case."""
    out = set()
    for lineno, line in enumerate(case_text(path).split("\n"), 1):
        if "#" not in line:
            continue
        for _, code in ANNOTATION_RE.findall(line[line.index("#") :]):
            out.add((code, lineno))
    return out


def _main(argv: list[str]) -> tuple[int, str, str]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from dslc.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse and --set errors exit
                rc = e.code if isinstance(e.code, int) else 2
                if not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(cwd)
    return rc, out.getvalue(), err.getvalue()


def run_case(path: Path) -> tuple[int, str, list[dict]]:
    """(exit code, stderr of `dslc check`, diagnostics of `dslc check --json`) for one case."""
    rel = path.resolve().relative_to(ROOT).as_posix()
    args = case_args(path)
    rc, _, stderr = _main(["check", rel, *args])
    _, stdout, _ = _main(["check", rel, *args, "--json"])
    return rc, stderr, json.loads(stdout) if stdout.strip() else []


def main(argv: list[str]) -> int:
    cases = sorted(UI.glob("*.model"))
    if argv:
        cases = [c for c in cases if any(word in c.stem for word in argv)]
    changed = 0
    for case in cases:
        _, stderr, _ = run_case(case)
        golden = case.with_suffix(".stderr")
        if not golden.exists() or golden.read_text() != stderr:
            golden.write_text(stderr)
            changed += 1
            print(f"blessed {golden.relative_to(ROOT)}")
    print(f"{len(cases)} case(s), {changed} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
