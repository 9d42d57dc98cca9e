"""Locate the data files shipped with dslc: grammar/, templates/, the standard library.

In a wheel they live in `dslc/_data/` (see pyproject.toml); in a source checkout, at the repo root.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    installed = _PKG / "_data" / name
    if installed.is_dir():
        return installed
    return _PKG.parent / name


def grammar_path(name: str) -> Path:
    return _data_dir("grammar") / name


def templates_dir() -> Path:
    return _data_dir("templates")


def std_path() -> Path:
    return _PKG / "std" / "std.model"
