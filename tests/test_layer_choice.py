"""A member that is one module or another, chosen at build time per instance:
`mlp = GatedMLP(dim, hidden) if gated else SquaredReluMLP(2 * hidden)` (tests/specs/mlp_choice.model, whose layers
in `gated_layers` take the gated MLP through `repeat(n, Block(i in gated_layers))`).

Each layer holds its own side's weights under one path (`layers.1.mlp.gate_proj.weight`, `layers.0.mlp.fc_in.weight`),
the generated `__init__` is the conditional expression itself, the model computes what a hand-written PyTorch
evaluation of the same weights does, forward and backward, on the PyTorch path and through the Triton kernels of both
sides (TRITON_INTERPRET=1 on CPU), with activation checkpointing, and saves and loads per layer. The qwen2_moe /
qwen3_moe specs use the same choice for transformers' dense layers: tests/test_parity_moe.py."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the Triton path runs on the CPU

import torch.nn.functional as F  # noqa: E402
from packages import built_packages  # noqa: E402

from dslc.api import check_file, check_source  # noqa: E402
from dslc.diagnostics import DslcError  # noqa: E402
from dslc.ir import nodes as N  # noqa: E402
from dslc.ir.printer import print_program  # noqa: E402
from dslc.ir.reader import read_program  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "mlp_choice.model"
PKG = "mlp_choice_pkg"


def _errors(text: str, **overrides) -> list:
    with pytest.raises(DslcError) as info:
        check_source(text, "t.model", None, {k: str(v) for k, v in overrides.items()} or None)
    return [(d.code, d.message) for d in info.value.diagnostics if d.is_error]


# ---- the front end ------------------------------------------------------------------------------------
def test_each_layer_holds_the_weights_of_its_side():
    p = check_file(SPEC).program
    names = {w.name: w.shape for w in p.weights}
    for i in (1, 3):  # gated_layers
        assert names[f"layers.{i}.mlp.gate_proj.weight"] == (48, 32)
        assert f"layers.{i}.mlp.fc_in.weight" not in names
    for i in (0, 2):
        assert names[f"layers.{i}.mlp.fc_in.weight"] == (96, 32) and names[f"layers.{i}.mlp.fc_in.bias"] == (96,)
        assert f"layers.{i}.mlp.gate_proj.weight" not in names
    (block,) = [m for m in p.modules if m.name == "Block"]
    (mlp,) = [s for s in block.submodules if s.name == "mlp"]
    assert N.modules_of(mlp) == ("GatedMLP", "SquaredReluMLP")
    # a config changes which layers are gated, and with them the parameter count
    every = check_file(SPEC, overrides={"gated_layers": "[0, 1, 2, 3]"}).program
    assert not any(".fc_in." in w.name for w in every.weights)


def test_chains_and_an_optional_tail():
    text = SPEC.read_text().replace(
        "    mlp = GatedMLP(dim, hidden) if gated else SquaredReluMLP(2 * hidden)",
        "    mlp = GatedMLP(dim, hidden) if gated else SquaredReluMLP(2 * hidden) if wide else SquaredReluMLP(hidden)",
    )
    text = text.replace("module Block(gated: bool):", "module Block(gated: bool, wide: bool = true):")
    p = check_source(text, "t.model").program
    assert {w.name: w.shape for w in p.weights}["layers.0.mlp.fc_in.weight"] == (96, 32)
    p = check_source(text.replace("wide: bool = true", "wide: bool = false"), "t.model").program
    assert {w.name: w.shape for w in p.weights}["layers.0.mlp.fc_in.weight"] == (48, 32)
    # without a final `else` no side may be taken: the member is absent, and calling it is an error there
    optional = text.replace(" if wide else SquaredReluMLP(hidden)", " if wide")
    assert check_source(optional, "t.model").program
    errors = _errors(optional.replace("wide: bool = true", "wide: bool = false"))
    assert ("E041", "submodule `mlp` is absent here (its condition is false)") in errors


def test_calls_are_checked_against_the_side_each_layer_takes():
    """The squared-ReLU side made to return a wider tensor: only the layers that take it break the carried
    shape, so a config gating every layer is fine and the default is refused."""
    bad = SPEC.read_text().replace(
        "    fc_out = Linear(width, dim, bias = true)", "    fc_out = Linear(width, 2 * dim)"
    )
    bad = bad.replace(
        "forward(x: [B, T, dim]) -> [B, T, dim]:\n        r = relu", "forward(x: [B, T, dim]):\n        r = relu"
    )
    assert check_source(bad, "t.model", None, {"gated_layers": "[0, 1, 2, 3]"}).program
    codes = [c for c, _ in _errors(bad)]
    assert "E030" in codes


@pytest.mark.parametrize(
    "member, code, words",
    [
        ("GatedMLP(dim, hidden) if gated else 3", "E041", "each side must be a call of a module"),
        ("GatedMLP(dim, hidden) if gated else repeat(2, GatedMLP(dim, hidden))", "E041", "`repeat` stack"),
        ("GatedMLP(dim, hidden) if gated else Missing()", "E010", "unknown module `Missing`"),
        ("GatedMLP(dim, hidden) if norm.weight else SquaredReluMLP(2)", "E016", "known at build time"),
        ("GatedMLP(dim, hidden) if x else SquaredReluMLP(2)", "E010", "unknown name `x`"),
        ("GatedMLP(dim, hidden) if gated else SquaredReluMLP(2, 3)", "E040", "takes 1 argument(s)"),
    ],
)
def test_bad_choices_are_located_errors(member, code, words):
    text = SPEC.read_text().replace("GatedMLP(dim, hidden) if gated else SquaredReluMLP(2 * hidden)", member)
    errors = _errors(text)
    assert any(c == code and words in m for c, m in errors), errors


def test_ir_text_reads_a_choice_back():
    checked = check_file(SPEC)
    text = print_program(checked.program, checked.types)
    assert "sub mlp = GatedMLP(dim, hidden) if $gated" in text and "else SquaredReluMLP(2 * hidden)" in text
    assert read_program(text) == checked.program


# ---- the package ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("choice"), (SPEC, PKG)):
        yield importlib.import_module(PKG)


@pytest.fixture()
def model(pkg):
    torch.manual_seed(0)
    m = pkg.M(pkg.C()).eval()
    for name, p in m.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.2)
    return m


def test_generated_init_is_the_conditional_expression(pkg):
    source = (Path(pkg.__file__).parent / "modeling.py").read_text()
    assert "self.mlp = GatedMLP(config.dim, config.hidden) if gated else SquaredReluMLP(config, 2 * config.hidden)" in (
        source
    )
    assert "nn.ModuleList(Block(config, i in config.gated_layers) for i in range(config.n))" in source
    kernels = (Path(pkg.__file__).parent / "kernels.py").read_text()  # both sides' fused regions
    assert "def gated_mlp_pointwise(" in kernels and "def squared_relu_mlp_pointwise(" in kernels


def _rms(x, w):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _reference(model, ids):
    """The spec written out by hand: layer i's MLP is gated when i is in gated_layers, squared ReLU otherwise."""
    cfg = model.config
    x = model.embed.weight[ids]
    for i, layer in enumerate(model.layers):
        q, k, v = F.linear(_rms(x, layer.norm.weight), layer.qkv.weight).chunk(3, dim=-1)
        q, k, v = (t.reshape(*t.shape[:2], cfg.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(y.transpose(1, 2).reshape(*x.shape), layer.out.weight)
        h = _rms(x, layer.mlp_norm.weight)
        mlp = layer.mlp
        if i in cfg.gated_layers:
            h = F.linear(
                F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight
            )
        else:
            h = F.linear(F.relu(F.linear(h, mlp.fc_in.weight, mlp.fc_in.bias)) ** 2, mlp.fc_out.weight, mlp.fc_out.bias)
        x = x + h
    return F.linear(_rms(x, model.norm.weight), model.head.weight)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    return ids, ids.clone()


def _run(model, kernels, backend, checkpointing=False):
    ids, labels = _batch()
    kernels.set_backend(backend)
    model.zero_grad(set_to_none=True)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    try:
        out = model(ids, labels=labels)
        out.loss.backward()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        kernels.set_backend("auto")
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_the_model_computes_each_layers_own_mlp(pkg, model):
    assert [type(layer.mlp).__name__ for layer in model.layers] == [
        "SquaredReluMLP",
        "GatedMLP",
        "SquaredReluMLP",
        "GatedMLP",
    ]
    kernels = importlib.import_module(f"{PKG}.kernels")
    loss, grads = _run(model, kernels, "torch")
    ids, labels = _batch()
    ref = _reference(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    params = dict(model.named_parameters())
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-4, atol=1e-4)
    for (name, _), g in zip(params.items(), ref_grads):
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_triton_kernels_of_both_sides_match_the_torch_path(pkg, model):
    pytest.importorskip("triton", reason="triton is not installed")
    kernels = importlib.import_module(f"{PKG}.kernels")
    t_loss, t_grads = _run(model, kernels, "torch")
    k_loss, k_grads = _run(model, kernels, "triton")
    assert sys.modules.get(f"{PKG}.kernels_triton") is not None, "the Triton path did not run"
    torch.testing.assert_close(k_loss, t_loss)
    assert set(k_grads) == set(t_grads)
    for name, g in t_grads.items():  # the gated layers' and the squared-ReLU layers' weights alike
        torch.testing.assert_close(k_grads[name], g, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_activation_checkpointing_gives_the_same_gradients(pkg, model):
    kernels = importlib.import_module(f"{PKG}.kernels")
    loss, grads = _run(model, kernels, "torch")
    c_loss, c_grads = _run(model, kernels, "torch", checkpointing=True)
    torch.testing.assert_close(c_loss, loss)
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_save_and_load_per_layer(pkg, model, tmp_path):
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "layers.1.mlp.gate_proj.weight" in saved and "layers.0.mlp.fc_in.bias" in saved
    assert "layers.0.mlp.gate_proj.weight" not in saved and "layers.1.mlp.fc_in.weight" not in saved
    back = pkg.M.from_pretrained(tmp_path).eval()
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
