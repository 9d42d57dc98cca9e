"""Shared pytest hooks: tests marked `cuda` run only where torch sees a CUDA device (`pytest -m cuda` selects them)."""

from __future__ import annotations

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("cuda") for item in items) or _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
