"""Pass-level properties of the optimization pipeline (verified IR after every pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslc.api import check_file
from dslc.passes.pipeline import optimize

ROOT = Path(__file__).resolve().parents[1]


def _regions(spec: str):
    return optimize(check_file(ROOT / "models" / spec).program, verify=True).report.regions


@pytest.mark.parametrize(
    "spec,module",
    [
        ("gpt2.model", "MLP"),
        ("bert.model", "BertIntermediate"),
        ("bert.model", "BertPooler"),
    ],
)
def test_a_linear_keeps_its_bias(spec, module):
    """A Linear is called through its forward, bias included (cuBLAS adds it in the matmul's epilogue): nothing
    reaches past the module to its `.weight` or `.bias`."""
    program = optimize(check_file(ROOT / "models" / spec).program, verify=True).program
    body = program.module(module).forward.body
    assert not any(op.op == "linear" for op in body)
    assert [op.op for op in body if op.op == "call"], f"{module} calls no submodule"


@pytest.mark.parametrize(
    "spec,norm,users",
    [
        ("qwen2.model", "RMSNorm", {"DecoderLayer": 1}),  # post_attention_layernorm(x + attn)
        ("gpt2.model", "LayerNorm", {"Block": 1}),  # ln_2(x + attn)
        ("bert.model", "LayerNorm", {"BertEmbeddings": 1, "BertSelfOutput": 1, "BertOutput": 1}),  # post-norm
    ],
)
def test_residual_add_moves_into_the_norm(spec, norm, users):
    program = optimize(check_file(ROOT / "models" / spec).program, verify=True).program
    assert program.module(norm).residual is not None
    for module, n in users.items():
        calls = [
            op
            for op in program.module(module).forward.body
            if op.op == "call" and dict(op.kwargs).get("residual") is not None
        ]
        assert len(calls) == n and all(len(op.results) == 2 for op in calls), module


def test_every_spec_optimizes_with_verified_ir():
    for spec in ("qwen2.model", "llama.model", "gpt2.model", "bert.model"):
        assert _regions(spec), spec
