"""Pass-level properties of the optimization pipeline (verified IR after every pass)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dslc.api import check_file
from dslc.ir import nodes as N
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


def test_rope_of_q_and_k_is_one_grouped_region_op():
    """The region-group pass: q's and k's rotary calls become one `region` op with group = 2, at q's place."""
    program = optimize(check_file(ROOT / "models" / "qwen2.model").program, verify=True).program
    body = program.module("Attention").forward.body
    ropes = [op for op in body if getattr(op, "op", "") == "region" and "rope" in op.target]
    assert len(ropes) == 1 and N.group_size(ropes[0]) == 2
    assert len(ropes[0].args) == 6 and len(ropes[0].results) == 2


def test_a_region_call_reading_the_other_is_not_grouped():
    from dslc.passes.grouping import group_regions

    program = optimize(check_file(ROOT / "models" / "qwen2.model").program).program
    region = next(r for r in program.regions if "rope" in r.name)
    span = program.module("Attention").forward.body[0].span

    def call(args, result):
        return N.Op("region", tuple(N.Ref("value", a) for a in args), (), (result,), ("",), region.name, span)

    first = call(["cos", "q", "sin"], "q2")
    chained = call(["cos", "q2", "sin"], "q3")  # reads the first call's result: must stay a second launch
    other = call(["cos", "k", "sin"], "k2")
    module = program.module("Attention")
    body = (first, chained, other)
    program = replace(
        program,
        modules=tuple(replace(m, forward=replace(m.forward, body=body)) if m is module else m for m in program.modules),
    )
    grouped = group_regions(program).module("Attention").forward.body
    assert [N.group_size(op) for op in grouped] == [2, 1]
    assert grouped[0].results == ("q2", "k2") and grouped[1].results == ("q3",)


GEMMA2_RETURN = """        return final_logit_softcapping * tanh(logits / final_logit_softcapping) if final_logit_softcapping != none \\
            else logits
"""


@pytest.mark.parametrize(
    "tail,found",
    [
        (None, "branch"),  # gemma2.model as shipped: the build-time branch `... if cap != none else logits`
        (
            "return logits if final_logit_softcapping == none else \\\n"
            "            final_logit_softcapping * tanh(logits / final_logit_softcapping)",
            "negated",
        ),
        ("return tanh(logits / 30.0) * 30.0", "always"),  # unconditional, the cap on either side of the mul
        ("return 30.0 * tanh(logits / 20.0)", None),  # two different numbers: not a soft-cap
        ("return 30.0 * tanh(logits)", None),
        ("return logits * 2.0", None),
    ],
)
def test_loss_head_pass_finds_the_final_softcap(tmp_path, tail, found):
    """The loss-head pass records the final soft-cap after the LM head in its three written forms (and nothing
    else); the package's training loss then takes the fused path with the cap (`logit_softcap`)."""
    from dslc.build import render

    text = (ROOT / "models" / "gemma2.model").read_text()
    assert GEMMA2_RETURN in text
    if tail is not None:
        text = text.replace(GEMMA2_RETURN, f"        {tail}\n")
    spec = tmp_path / "capped.model"
    spec.write_text(text)
    # (not verify=True: the verifier refuses gemma2's per-layer `layer_types[i]` argument after `inline`)
    program = optimize(check_file(spec).program).program
    cap = program.module("Gemma2ForCausalLM").head_softcap
    _, files, _ = render(spec, None, {}, None)
    modeling = files["modeling.py"]
    if found is None:
        assert cap is None
        assert "loss_head = None" in modeling and "def logit_softcap" not in modeling
        return
    assert cap is not None and cap.logits == "logits"
    assert {"branch": True, "negated": True, "always": False}[found] == (cap.test is not None)
    assert 'loss_head = ("lm_head", "weight", "bias")' in modeling and "def logit_softcap(self):" in modeling
    wanted = {"always": "return 30.0", "negated": "if self.config.final_logit_softcapping is not None else None"}
    assert wanted.get(found, "return self.config.final_logit_softcapping\n") in modeling
