"""Helper for tests (not a test file): build generated packages into a folder kept on sys.path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dslc.build import build

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


@contextmanager
def built_packages(out: Path, *specs: tuple[Path, str | None], target: str = "standalone") -> Iterator[Path]:
    """Build each (spec, package name or None for the spec's stem) into `out` for `target`; `out` is on sys.path
    inside."""
    for spec, name in specs:
        build(spec, out, name=name, target=target)
    sys.path.insert(0, str(out))
    try:
        yield out
    finally:
        sys.path.remove(str(out))
