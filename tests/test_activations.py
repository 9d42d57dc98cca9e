"""Activations chosen by name (`activation(x, hidden_act)`, the table `ops.ACTIVATIONS`): every entry computes what
transformers' ACT2FN computes, the fused Triton path (forward and derived backward, the name a tl.constexpr) equals
the PyTorch path, the gated MLP stays one fused region, and a name outside the table is refused by `dslc check`
and by the generated config class."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dslc.codegen.activations import render_activations_module, render_torch_backward_helper
from dslc.codegen.triton_region import render_kernels_module, render_region_torch_backward
from dslc.ir import ops
from dslc.ir.regions import RegionInput, RegionOp, RowRegion
from dslc.resources import templates_dir

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(ops.ACTIVATIONS)

# the gated MLP's pointwise part, as the fusion pass makes it: activation(gate, act) * up
GATED = RowRegion(
    "gated",
    (RegionInput("gate"), RegionInput("act", "choice", False), RegionInput("up")),
    (RegionOp("activation", ("gate",), "a", (("name", "act"),)), RegionOp("mul", ("a", "up"), "y")),
    ("y",),
)


@pytest.fixture(scope="module")
def K(tmp_path_factory):
    """The region rendered into a package (kernels.py, kernels_runtime.py, activations.py) and imported; its
    calls may also launch in pairs (`gated_x2_triton`), each call with its own activation."""
    root = tmp_path_factory.mktemp("acts")
    pkg = root / "genacts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(templates_dir() / "package" / "kernels_runtime.py", pkg / "kernels_runtime.py")
    (pkg / "activations.py").write_text(render_activations_module())
    text = render_kernels_module([GATED], grouped=frozenset({"gated"}))
    text += "\n\n" + render_torch_backward_helper() + "\n\n" + render_region_torch_backward(GATED)
    (pkg / "kernels.py").write_text(text)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("genacts.kernels")
    finally:
        sys.path.remove(str(root))


def _inputs(seed: int = 0, shape=(2, 3, 40)):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(*shape, generator=g) * 2.5  # both sides of every kink and saturation
    up = torch.randn(*shape, generator=g)
    return gate, up


def _run(fn, gate, up, name):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = fn(gate, name, up)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    return y.detach(), dgate, dup


@pytest.mark.parametrize("name", NAMES)
def test_the_torch_path_is_transformers_act2fn(K, name):
    """The package's ACT2FN entry against transformers' own, values and gradients."""
    from transformers.activations import ACT2FN

    x = (torch.randn(4, 33, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3).requires_grad_()
    ours = K.activation(x, name)
    theirs = ACT2FN[name](x)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_triton_matches_torch_forward_and_backward(K, name):
    """TRITON_INTERPRET=1 on CPU: the kernel specialized for `name` (forward and derived backward) against the
    PyTorch path and autograd."""
    if K.triton is None:
        pytest.skip("triton is not installed")
    gate, up = _inputs()
    want = _run(K.gated_torch, gate, up, name)
    got = _run(K.gated_triton, gate, up, name)
    for w, o, what in zip(want, got, ("y", "d_gate", "d_up")):
        torch.testing.assert_close(o, w, rtol=2e-5, atol=2e-5, msg=lambda m, what=what: f"{name} {what}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_derived_torch_backward_is_autograd(K, name):
    """The derivative rules the kernels use (`activation_bwd`), spelled in PyTorch, against autograd."""
    gate, up = _inputs(2)
    _, dgate, dup = _run(K.gated_torch, gate, up, name)
    dy = torch.randn(gate.shape, generator=torch.Generator().manual_seed(9))
    rules = K.gated_torch_bwd(gate, name, up, dy)
    torch.testing.assert_close(rules[0], dgate, rtol=1e-5, atol=1e-5)
    assert rules[1] is None  # the name has no gradient
    torch.testing.assert_close(rules[2], dup, rtol=1e-5, atol=1e-5)


def test_paired_calls_take_their_own_activations(K):
    """Two calls in one launch (`gated_x2_triton`), one silu and one gelu: each problem its own constexpr."""
    if K.triton is None:
        pytest.skip("triton is not installed")
    (ga, ua), (gb, ub) = _inputs(3), _inputs(4)
    ya, yb = K.gated_x2_triton(ga, "silu", ua, gb, "gelu", ub)
    torch.testing.assert_close(ya, K.gated_torch(ga, "silu", ua), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(yb, K.gated_torch(gb, "gelu", ub), rtol=2e-5, atol=2e-5)


def test_each_activation_compiles_its_own_kernel_and_tile():
    """The name is a constexpr launch keyword, so it is in the autotuner's key (a tile tuned for one activation
    is not reused for another)."""
    from dslc.codegen.triton_region import render_region_triton

    text = render_region_triton(GATED)
    assert "act: tl.constexpr" in text and "act=act," in text
    assert 'if ACT == "silu":' in render_kernels_module([GATED])


def test_gated_mlp_is_one_region_with_its_activation(tmp_path):
    """llama's `down(activation(gate(x), hidden_act) * up(x))`: the activation and the product fuse into one
    region whose kernels take the name; the model passes `self.act` (the config's hidden_act)."""
    from dslc.build import build

    pkg = build(ROOT / "models" / "llama.model", tmp_path)
    modeling = (pkg / "modeling.py").read_text()
    kernels = (pkg / "kernels.py").read_text()
    assert "kernels.gated_mlp_pointwise(gate_proj, self.act, up_proj)" in modeling
    assert "act=config.hidden_act" in modeling
    assert "t2 = activation(gate_proj, act)" in kernels and "t4 = t2 * up_proj" in kernels
    assert "activation_fwd(gate_proj, act)" in (pkg / "kernels_triton.py").read_text()


def test_check_refuses_a_name_outside_the_table():
    from dslc.api import check_file
    from dslc.diagnostics import DslcError

    with pytest.raises(DslcError) as e:
        check_file(str(ROOT / "models" / "qwen2.model"), None, {"hidden_act": "gelu_tanh"})
    (d,) = e.value.diagnostics
    assert d.code == "E041" and "no activation is named 'gelu_tanh'" in d.message
    assert any("gelu_pytorch_tanh" in h for h in d.help) or any("did you mean" in h for h in d.help)
    assert any("activations: silu" in h for h in d.help)


def test_config_search_tries_every_activation():
    """`dslc check`'s config search offers every name of the table for a field read as an activation's name."""
    from dslc.api import check_file
    from dslc.check.configs import activation_fields, compared_strings

    checked = check_file(str(ROOT / "models" / "gpt_neox.model"), None, {}, variants=0)
    assert activation_fields(checked.program) == {"hidden_act": "MLP"}
    assert compared_strings(checked.program)["hidden_act"] >= set(ops.ACTIVATIONS)


def test_generated_config_refuses_a_name_outside_the_table(tmp_path):
    from dslc.build import build

    pkg = build(ROOT / "models" / "qwen2.model", tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        config = importlib.import_module(f"{pkg.name}.config")
    finally:
        sys.path.remove(str(tmp_path))
    assert config.Qwen2Config(hidden_act="relu").hidden_act == "relu"
    with pytest.raises(config.ConfigError, match=r"config key `hidden_act` must name an activation, one of silu"):
        config.Qwen2Config(hidden_act="gelu_tanh")
