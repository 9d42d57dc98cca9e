"""Pass-level properties of the optimization pipeline (verified IR after every pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslc.api import check_file
from dslc.passes.pipeline import optimize

ROOT = Path(__file__).resolve().parents[1]


def _regions(spec: str):
    return optimize(check_file(ROOT / "models" / spec).program, verify=True).report.regions


@pytest.mark.parametrize("spec,module,activation", [
    ("gpt2.model", "MLP", "gelu_tanh"),
    ("bert.model", "BertIntermediate", "gelu"),
    ("bert.model", "BertPooler", "tanh"),
])
def test_linear_bias_fuses_into_the_activation(spec, module, activation):
    """bias + activation: the Linear's bias add runs in the activation's kernel, not as the matmul's epilogue."""
    found = [r for m, _, r, _ in _regions(spec) if m == module]
    assert found, f"no region in {module}"
    (region,) = found
    assert [o.op for o in region.ops] == ["add", activation]
    assert "bias" in [i.name for i in region.inputs]


def test_every_spec_optimizes_with_verified_ir():
    for spec in ("qwen2.model", "llama.model", "gpt2.model", "bert.model"):
        assert _regions(spec), spec
