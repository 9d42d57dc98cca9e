"""Build-time conditionals in forward bodies: `a if c else b` whose test reads config values or parameters and
whose sides are tensors lowers to an IR Branch; only the taken side runs (the other may divide by a none field
or call an absent module), the checker checks the side each config takes, the IR text reads it back, and the
generated code is a plain `if` / `elif` / `else`."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from packages import built_packages

from dslc.api import check_file, check_source
from dslc.diagnostics import DslcError
from dslc.ir import nodes as N
from dslc.ir.printer import print_program
from dslc.ir.reader import read_program

SPEC = Path(__file__).resolve().parent / "specs" / "branches.model"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("build"), (SPEC, None)):
        yield importlib.import_module("branches")


def _reference(model, ids: torch.Tensor) -> torch.Tensor:
    """The spec's forward written out by hand."""
    c = model.config
    x = F.embedding(ids, model.embed_tokens.weight)
    h = F.linear(x, model.mlp.up.weight)
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}
    x = x + F.linear(act[c.hidden_act](h), model.mlp.down.weight)
    if c.use_norm:
        x = model.norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.norm.eps))
    logits = F.linear(x, model.lm_head.weight)
    return torch.tanh(logits / c.cap) * c.cap if c.cap is not None else logits


@pytest.mark.parametrize(
    "overrides",
    [{}, {"cap": 5.0, "hidden_act": "gelu", "use_norm": False}, {"hidden_act": "gelu_pytorch_tanh", "cap": 2.0}],
    ids=["defaults", "capped-gelu-no-norm", "tanh-gelu"],
)
def test_only_the_taken_side_runs_and_each_config_is_right(pkg, overrides):
    torch.manual_seed(0)
    model = pkg.M(pkg.C(**overrides))
    assert (model.norm is None) == (overrides.get("use_norm") is False)  # the untaken side would call None
    ids = torch.randint(0, 64, (2, 7))
    model.eval()
    out = model(input_ids=ids, labels=ids)
    reference = _reference(model, ids)
    torch.testing.assert_close(out.logits, reference)
    model.train()  # training takes the fused loss, the soft-cap (when set) inside its chunks: no logits out
    loss = model(input_ids=ids, labels=ids).loss
    expected = F.cross_entropy(reference[:, :-1].reshape(-1, reference.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(out.loss, expected)
    loss.backward()  # autograd through the taken side
    assert model.lm_head.weight.grad is not None and model.mlp.up.weight.grad is not None


def test_generated_code_is_plain_if_elif_else(pkg):
    source = Path(pkg.__file__).with_name("modeling.py").read_text()
    assert 'if self.config.hidden_act == "silu":' in source
    assert 'elif self.config.hidden_act == "gelu_pytorch_tanh":' in source
    assert "if self.config.cap is not None:" in source
    # `x = norm(x) if use_norm else x`: no empty else side
    assert re.search(r"if self.config.use_norm:  # branches.model:\d+\n +x = self.norm\(x\)\n +logits =", source)


def test_ir_text_reads_branches_back():
    checked = check_file(SPEC)
    text = print_program(checked.program, checked.types)
    assert 'if (hidden_act == "silu") {' in text and "} else {" in text
    back = read_program(text)
    assert back == checked.program
    branches = [st for m in back.modules if m.forward for st in m.forward.body if isinstance(st, N.Branch)]
    assert len(branches) == 3  # the activation (its elif nests inside), the norm and the soft-cap


def test_the_checker_checks_the_side_each_config_takes():
    text = SPEC.read_text().replace("tanh(logits / cap) * cap if", "logits + x if")  # [B, T, V] + [B, T, H]
    check_source(text, "t.model")  # cap = none: the broken side is not taken, so this config is fine
    with pytest.raises(DslcError) as e:
        check_source(text, "t.model", None, {"cap": "30.0"})
    assert [d.code for d in e.value.diagnostics] == ["E030"]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("if cap != none else logits", "if x else logits", "needs a build-time condition"),
        ("if cap != none else logits", "if cap != none else 0.0", "needs a tensor on the other"),
    ],
)
def test_branch_refusals(old, new, message):
    with pytest.raises(DslcError) as e:
        check_source(SPEC.read_text().replace(old, new), "t.model")
    (diag,) = e.value.diagnostics
    assert diag.code == "E041" and message in diag.message, diag.message


def test_a_branch_in_a_repeat_layer_reads_the_layer_parameter(tmp_path):
    text = """use std

config C:
    vocab_size: int = 32
    hidden_size: int = 16
    num_hidden_layers: int = 3

module Block(scaled: bool):
    proj = Linear(hidden_size, hidden_size)

    forward(x: [B, T, hidden_size]) -> [B, T, hidden_size]:
        return x + (proj(x) * 0.5 if scaled else proj(x))

model M(C): base
    embed_tokens = Embedding(vocab_size, hidden_size)
    layers = repeat(num_hidden_layers, Block(i % 2 == 0))

    forward(input_ids: [B, T] i64) -> [B, T, hidden_size]:
        x = embed_tokens(input_ids)
        for layer in layers:
            x = layer(x)
        return x
"""
    spec = tmp_path / "perlayer_branch.model"
    spec.write_text(text)
    with built_packages(tmp_path / "build", (spec, None)):
        mod = importlib.import_module("perlayer_branch")
        model = mod.M(mod.C())
        ids = torch.randint(0, 32, (1, 4))
        x = model.embed_tokens(ids)
        for i, layer in enumerate(model.layers):
            y = layer.proj(x)
            x = x + (y * 0.5 if i % 2 == 0 else y)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, x)
    sys.modules.pop("perlayer_branch", None)


LOOP_SPEC = Path(__file__).resolve().parent / "specs" / "layer_index_loop.model"


@pytest.mark.parametrize("active", [None, 2, 0])
def test_for_i_layer_in_layers_reads_the_layer_index(tmp_path, active):
    with built_packages(tmp_path / "build", (LOOP_SPEC, None)):
        mod = importlib.import_module("layer_index_loop")
        source = Path(mod.__file__).with_name("modeling.py").read_text()
        assert "for i, layer in enumerate(self.layers):" in source
        model = mod.M(mod.C(active_layers=active))
        ids = torch.randint(0, 32, (2, 3))
        x = model.embed_tokens(ids)
        for i, layer in enumerate(model.layers):
            if active is None or i < active:
                x = x + layer.proj(x)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, x)
    sys.modules.pop("layer_index_loop", None)


def test_loop_index_round_trips_and_is_checked_per_layer():
    checked = check_file(LOOP_SPEC)
    text = print_program(checked.program)
    assert "for i, layer in layers (" in text
    assert read_program(text) == checked.program
    # a type error in the side only layers >= 2 take is found: the checker makes one pass per layer
    broken = LOOP_SPEC.read_text().replace("if active_layers == none or i < active_layers else x", "if i < 2 else x")
    broken = broken.replace("x = layer(x) if i < 2 else x", "x = layer(x) if i < 2 else mean(x, dim = -1)")
    with pytest.raises(DslcError) as e:
        check_source(broken, "t.model")
    assert {d.code for d in e.value.diagnostics} == {"E030"}


def test_loop_index_name_must_be_free():
    text = LOOP_SPEC.read_text().replace("for i, layer in layers:", "for x, layer in layers:")
    with pytest.raises(DslcError) as e:
        check_source(text.replace("i < active_layers", "x < active_layers"), "t.model")
    (diag,) = e.value.diagnostics
    assert diag.code == "E011" and "`x` already names something here" in diag.message


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])
def test_shipped_specs_branch_on_config(tmp_path, family):
    """gemma2's final soft-cap may be null (no cap) and gpt_neox's residual sequential: each a build-time branch in
    the shipped spec, held against transformers with that config."""
    import json

    import hf_oracle

    folder = hf_oracle.make_hf_model(family, tmp_path / "hf", seed=2)
    config = json.loads((folder / "config.json").read_text())
    key = "final_logit_softcapping" if family == "gemma2" else "use_parallel_residual"
    assert config[key] not in (None, False)
    config[key] = None if family == "gemma2" else False
    (folder / "config.json").write_text(json.dumps(config))
    spec = Path(__file__).resolve().parents[1] / "models" / f"{family}.model"
    with built_packages(tmp_path / "build", (spec, f"branch_{family}")):
        mod = importlib.import_module(f"branch_{family}")
        cls = next(getattr(mod, n) for n in mod.__all__ if n.endswith("ForCausalLM"))
        ours = cls.from_pretrained(folder)
        ids = torch.randint(3, hf_oracle.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, hf_oracle.load_hf(folder)(input_ids=ids).logits)
    sys.modules.pop(f"branch_{family}", None)
