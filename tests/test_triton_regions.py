"""Generated row-region kernels: the Triton forward and the derived backward against the PyTorch rendering.

Runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
Regions are built by hand here (no fusion pass involved): norms, activations, softcap, softmax, rope,
and one region that uses every op, so each derivative rule is checked against torch.autograd.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib
import json
import shutil
import sys
import time
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed (the kernels run under its interpreter)")

from dslc.codegen.activations import render_activations_module, render_torch_backward_helper  # noqa: E402
from dslc.codegen.autodiff import RegionError  # noqa: E402
from dslc.codegen.triton_region import (  # noqa: E402
    render_kernels_module,
    render_region_torch,
    render_region_torch_backward,
    render_region_triton,
)
from dslc.ir.regions import REGION_OPS, RegionInput, RegionOp, RowRegion  # noqa: E402
from dslc.passes.grouping import groupable  # noqa: E402
from dslc.resources import templates_dir  # noqa: E402

F = torch.nn.functional


def T(name, needs_grad=True):
    return RegionInput(name, "tensor", needs_grad)


def W(name):
    """A weight [N], the same in every row: the backward sums its gradient in place (partial rows)."""
    return RegionInput(name, "tensor", True, row_invariant=True)


def S(name):
    return RegionInput(name, "scalar", False)


def ops(*lines: str) -> tuple[RegionOp, ...]:
    """`"y = mul(x, w)"`, `"xf = cast(x, f32)"`; numbers are constants."""
    out = []
    for line in lines:
        result, call = (p.strip() for p in line.split("="))
        op, rest = call.split("(", 1)
        args = [a.strip() for a in rest.rstrip(")").split(",")]
        attrs = ()
        if op == "cast":
            attrs = (("dtype", args.pop()),)

        def val(a):
            try:
                return float(a)
            except ValueError:
                return a

        out.append(RegionOp(op, tuple(val(a) for a in args), result, attrs))
    return tuple(out)


RMS_BODY = (
    "xf = cast(x, f32)",
    "sq = mul(xf, xf)",
    "var = mean(sq)",
    "var_eps = add(var, eps)",
    "rstd = rsqrt(var_eps)",
    "normed = mul(xf, rstd)",
    "normed_x = cast(normed, input:x)",
    "y = mul(weight, normed_x)",
)

REGIONS = {
    "rmsnorm": RowRegion(
        "rmsnorm", (T("x"), W("weight"), S("eps")), ops(*RMS_BODY), ("y",), ("input:x",), "test.model:1-3"
    ),
    "gemma_rmsnorm": RowRegion(
        "gemma_rmsnorm",
        (T("x"), W("weight"), S("eps")),
        ops(
            "xf = cast(x, f32)",
            "sq = mul(xf, xf)",
            "var = mean(sq)",
            "var_eps = add(var, eps)",
            "rstd = rsqrt(var_eps)",
            "normed = mul(xf, rstd)",
            "wf = cast(weight, f32)",
            "scale = add(1.0, wf)",
            "y32 = mul(normed, scale)",
            "y = cast(y32, input:x)",
        ),
        ("y",),
        ("input:x",),
    ),
    "layernorm": RowRegion(
        "layernorm",
        (T("x"), W("weight"), W("bias"), S("eps")),
        ops(
            "xf = cast(x, f32)",
            "mu = mean(xf)",
            "xc = sub(xf, mu)",
            "sq = mul(xc, xc)",
            "var = mean(sq)",
            "var_eps = add(var, eps)",
            "rstd = rsqrt(var_eps)",
            "normed = mul(xc, rstd)",
            "scaled = mul(normed, weight)",
            "shifted = add(scaled, bias)",
            "y = cast(shifted, input:x)",
        ),
        ("y",),
        ("input:x",),
    ),
    "add_rmsnorm": RowRegion(
        "add_rmsnorm",
        (T("x"), T("residual"), W("weight"), S("eps")),
        ops("h = add(x, residual)", "xf = cast(h, f32)", *RMS_BODY[1:]),
        ("h", "y"),
        ("input:x", "input:x"),
    ),
    "swiglu": RowRegion("swiglu", (T("gate"), T("up")), ops("act = silu(gate)", "y = mul(act, up)"), ("y",)),
    "gelu_bias": RowRegion("gelu_bias", (T("x"), W("b")), ops("xb = add(x, b)", "y = gelu_tanh(xb)"), ("y",)),
    "softcap": RowRegion(
        "softcap", (T("x"), S("cap")), ops("xs = div(x, cap)", "t = tanh(xs)", "y = mul(cap, t)"), ("y",)
    ),
    "softmax": RowRegion(
        "softmax", (T("x"),), ops("m = amax(x)", "z = sub(x, m)", "e = exp(z)", "s = sum(e)", "y = div(e, s)"), ("y",)
    ),
    "rope": RowRegion(
        "rope",
        (T("x"), T("cos"), T("sin", needs_grad=False)),
        ops("xc = mul(x, cos)", "xr = rotate_half(x)", "xs = mul(xr, sin)", "y = add(xc, xs)"),
        ("y",),
    ),
    # every op at least once; p is a per-row tensor [..., 1]; two outputs, one full-row and one per-row
    "all_ops": RowRegion(
        "all_ops",
        (T("a"), T("b"), T("p"), S("s")),
        ops(
            "t1 = tanh(a)",
            "t2 = sigmoid(b)",
            "t3 = silu(a)",
            "t4 = gelu(b)",
            "t5 = gelu_tanh(a)",
            "t6 = relu(b)",
            "t7 = cos(a)",
            "t8 = sin(b)",
            "t9 = abs(a)",
            "t10 = neg(b)",
            "t11 = identity(a)",
            "t30 = erf(b)",
            "ab = abs(b)",
            "ab1 = add(ab, 1.0)",
            "t12 = log(ab1)",
            "t13 = sqrt(ab1)",
            "t14 = rsqrt(ab1)",
            "t15 = pow(ab1, 2.5)",
            "t16 = pow(a, 3.0)",
            "t17 = pow(a, 5.0)",
            "t18 = maximum(a, b)",
            "t19 = minimum(a, 0.25)",
            "t20 = div(t1, ab1)",
            "t21 = exp(t2)",
            "t22 = mul(p, t3)",
            "t23 = cast(t4, input:a)",
            "t24 = cast(t5, f32)",
            "t25 = sub(t6, t7)",
            "rs = sqrt(s)",
            "t26 = mul(rs, t8)",
            "t27 = rotate_half(a)",
            "t28 = mul(t27, t9)",
            "m = amax(t1)",
            "t29 = sub(t1, m)",
            "r1 = sum(t16)",
            "r2 = mean(t17)",
            "r3 = mul(r1, r2)",
            "r4 = div(r3, 64.0)",
            "u1 = add(t1, t2)",
            "u2 = add(u1, t3)",
            "u3 = add(u2, t23)",
            "u4 = add(u3, t24)",
            "u5 = add(u4, t25)",
            "u6 = add(u5, t26)",
            "u7 = add(u6, t28)",
            "u8 = add(u7, t29)",
            "u9 = add(u8, t10)",
            "u10 = mul(u9, t11)",
            "u10e = add(u10, t30)",
            "u11 = add(u10e, t12)",
            "u12 = add(u11, t13)",
            "u13 = add(u12, t14)",
            "u14 = add(u13, t15)",
            "u15 = add(u14, t18)",
            "u16 = add(u15, t19)",
            "u17 = add(u16, t20)",
            "u18 = add(u17, t21)",
            "u19 = add(u18, t22)",
            "u20 = mul(u19, r4)",
            "out = add(u20, t1)",
            "ssum = sum(u19)",
            "row_out = add(ssum, m)",
        ),
        ("out", "row_out"),
    ),
    # an activation chosen by name (a choice input: a tl.constexpr of the kernels), gating a second input
    "named_gate": RowRegion(
        "named_gate",
        (T("gate"), RegionInput("act", "choice", False), T("up")),
        (RegionOp("activation", ("gate",), "a", (("name", "act"),)), RegionOp("mul", ("a", "up"), "y")),
        ("y",),
    ),
    # a row sum of an input that may be per-row: fine when p is full-width, refused when p is [..., 1]
    "rowsum": RowRegion("rowsum", (T("x"), T("p")), ops("q = sum(p)", "y = mul(x, q)"), ("y",)),
    # names that shadow builtins, an input passed through as an output, the same output twice
    "edge_names": RowRegion(
        "edge_names", (T("input"), T("max")), ops("sum = add(input, max)", "y = mul(sum, 2.0)"), ("input", "y", "y")
    ),
}


@pytest.fixture(scope="module")
def K(tmp_path_factory):
    """The regions rendered into a package (kernels.py + kernels_runtime.py) and imported."""
    root = tmp_path_factory.mktemp("gen")
    pkg = root / "genregions"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(templates_dir() / "package" / "kernels_runtime.py", pkg / "kernels_runtime.py")
    regions = list(REGIONS.values())
    grouped = frozenset(r.name for r in regions if groupable(r))  # these also get the two-call `_x2` launch
    (pkg / "activations.py").write_text(render_activations_module())
    text = render_kernels_module(regions, grouped=grouped)
    text += "\n\n" + render_torch_backward_helper()
    text += "\n\n" + "\n\n".join(render_region_torch_backward(r) for r in regions)
    (pkg / "kernels.py").write_text(text)
    sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module("genregions.kernels")
    finally:
        sys.path.remove(str(root))
    return mod


# ---- inputs ---------------------------------------------------------------------------------------------------


def make_inputs(name: str, shape: tuple[int, ...], dtype, seed: int = 0) -> list:
    """Inputs for region `name` with output shape `shape`."""
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]

    def rn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    if name in ("rmsnorm", "gemma_rmsnorm"):
        return [rn(*shape), rn(N), 1e-6]
    if name == "layernorm":
        return [rn(*shape) + 0.5, rn(N), rn(N), 1e-5]
    if name == "add_rmsnorm":
        return [rn(*shape), rn(*shape), rn(N), 1e-6]
    if name == "swiglu":
        return [rn(*shape), rn(*shape)]
    if name == "gelu_bias":
        return [rn(*shape), rn(N)]
    if name == "softcap":
        return [rn(*shape, scale=20.0), 30.0]
    if name == "softmax":
        return [rn(*shape, scale=3.0)]
    if name == "rope":  # x [B, H, T, D]; cos, sin [B, 1, T, D] broadcast over heads
        B, H, T_, D = shape
        ang = torch.rand(B, 1, T_, D // 2, generator=g) * 6.0
        ang = torch.cat((ang, ang), -1)
        return [rn(*shape), ang.cos().to(dtype), ang.sin().to(dtype)]
    if name == "all_ops":
        return [rn(*shape), rn(*shape), rn(*shape[:-1], 1), 2.0]
    if name == "rowsum":
        return [rn(*shape), rn(*shape)]
    if name == "named_gate":
        return [rn(*shape, scale=2.0), "gelu_pytorch_tanh", rn(*shape)]
    if name == "edge_names":
        return [rn(*shape), rn(N)]
    raise KeyError(name)


def _needs(name: str) -> list[bool]:
    return [i.kind == "tensor" and i.needs_grad for i in REGIONS[name].inputs]


def run(fn, inputs, needs, grads=None):
    """Call `fn` on fresh leaves; return (outputs, input grads for the given output grads)."""
    leaves = [x.detach().clone().requires_grad_(n) if isinstance(x, torch.Tensor) else x for x, n in zip(inputs, needs)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grads is None:
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    wrt = [x for x, n in zip(leaves, needs) if n]
    gin = torch.autograd.grad(outs, wrt, grads)
    return outs, gin, grads


def close(a, b, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}")
    else:  # bf16: both sides round differently (and the interpreter truncates on casts): a relative tolerance
        assert a.dtype == b.dtype, what
        scale = b.float().abs().max().item() + 1e-6
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=2e-2 * scale, msg=lambda m: f"{what}: {m}")


def check_region(K, name, shape, dtype=torch.float32):
    inputs = make_inputs(name, shape, dtype)
    needs = _needs(name)
    ref_out, ref_grads, grads = run(getattr(K, f"{name}_torch"), inputs, needs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow on masked lanes (interpreter only)
        out, gin, _ = run(getattr(K, f"{name}_triton"), inputs, needs, grads)
    assert len(out) == len(ref_out)
    got, want = list(out) + list(gin), list(ref_out) + list(ref_grads)
    what = [f"{name} output {i} {shape} {dtype}" for i in range(len(out))]
    what += [f"{name} grad {i} {shape} {dtype}" for i in range(len(gin))]
    for a, b, w in zip(got, want, what):
        assert a.shape == b.shape and a.dtype == b.dtype, (w, a.shape, b.shape, a.dtype, b.dtype)
    if dtype != torch.float32:
        for a, b, w in zip(got, want, what):
            close(a, b, dtype, w)
        return
    # fp32: close to PyTorch (assert_close defaults) or, where summation order shows (long chains with
    # cancellation, weight gradients summed over many rows), at least as accurate as PyTorch's own fp32
    # against a float64 evaluation
    exact = None
    for k, (a, b, w) in enumerate(zip(got, want, what)):
        try:
            torch.testing.assert_close(a, b)
            continue
        except AssertionError:
            if exact is None:
                x64 = [x.double() if isinstance(x, torch.Tensor) else x for x in inputs]
                o64, g64, _ = run(getattr(K, f"{name}_torch"), x64, needs, [g.double() for g in grads])
                exact = list(o64) + list(g64)
        c = exact[k]
        err, ref_err = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
        assert err <= 3 * ref_err + 1e-6 * c.abs().max().item(), f"{w}: error {err:.3g}, PyTorch fp32 {ref_err:.3g}"


# ---- Triton against the PyTorch rendering -----------------------------------------------------------------------

ROW_REGIONS = [n for n in REGIONS if n != "rope"]
CASES = [
    ((37, 781), torch.float32),
    ((1, 781), torch.float32),
    ((2, 3, 5, 100), torch.float32),
    ((16, 200), torch.bfloat16),
]


@pytest.mark.parametrize("name", ROW_REGIONS)
@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda v: str(v).replace(" ", "").replace("torch.", ""))
def test_triton_matches_torch(K, name, shape, dtype):
    if name == "all_ops":  # it holds a rotate_half: an even row
        shape = shape[:-1] + (shape[-1] + shape[-1] % 2,)
    check_region(K, name, shape, dtype)


@pytest.mark.parametrize(
    "name,shape", [("rmsnorm", (1823, 781)), ("softmax", (1823, 781)), ("all_ops", (1823, 64)), ("swiglu", (1823, 64))]
)
def test_triton_many_rows(K, name, shape):
    t = time.perf_counter()
    check_region(K, name, shape)
    assert time.perf_counter() - t < 30  # the interpreter is slow; a regression here makes the suite crawl


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((2, 4, 37, 94), torch.float32),
        ((1, 1, 1, 94), torch.float32),
        ((3, 2, 5, 64), torch.float32),
        ((2, 4, 9, 64), torch.bfloat16),
    ],
)
def test_triton_rope_broadcast_tables(K, shape, dtype):
    check_region(K, "rope", shape, dtype)


def test_noncontiguous_and_unused_output(K):
    """Strided inputs load in place; an output left out of the loss gets no gradient (None -> zeros)."""
    x = torch.randn(20, 300)[:, ::2].requires_grad_()  # [20, 150] with stride 2 on the last dim
    r = torch.randn(150, 20).t().requires_grad_()  # transposed
    w = torch.randn(150, requires_grad=True)
    h, y = K.add_rmsnorm_triton(x, r, w, 1e-6)
    gx, gr, gw = torch.autograd.grad(y.sum(), (x, r, w))
    h2, y2 = K.add_rmsnorm_torch(x, r, w, 1e-6)
    ex, er, ew = torch.autograd.grad(y2.sum(), (x, r, w))
    for a, b in ((h, h2), (y, y2), (gx, ex), (gr, er), (gw, ew)):
        torch.testing.assert_close(a, b)


def test_frozen_weight_gets_no_grad(K):
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33)  # requires_grad False: the kernel skips its gradient store
    y = K.rmsnorm_triton(x, w, 1e-6)
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    y2 = K.rmsnorm_torch(x, w, 1e-6)
    (ex,) = torch.autograd.grad(y2.sum(), (x,))
    torch.testing.assert_close(gx, ex)


def _recording(K, monkeypatch):
    """Record the shape of every gradient buffer the launchers allocate for row-invariant inputs."""
    shapes = []
    real = K.partial_grad_buffer

    def spy(t, lay, wanted):
        buf = real(t, lay, wanted)
        shapes.append((tuple(buf.shape) if buf is not None else None, lay.R, lay.N, lay.programs))
        return buf

    monkeypatch.setattr(K, "partial_grad_buffer", spy)
    return shapes


def test_weight_gradient_is_reduced_in_the_kernel(K, monkeypatch):
    """A weight [N] gets [programs, N] partial sums (programs walk several row blocks each), not a [R, N]
    buffer: for 1823 rows the buffer is 4 rows under the interpreter."""
    shapes = _recording(K, monkeypatch)
    x = torch.randn(1823, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    y = K.layernorm_triton(x, w, b, 1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(K.layernorm_torch(x, w, b, 1e-5), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert [s[0] for s in shapes] == [(4, 96), (4, 96)], shapes
    assert all(R > programs for _, R, _, programs in shapes)


@pytest.mark.parametrize("weight_shape", [(1, 1, 40), (40,)])
def test_partial_sums_reach_a_weight_with_leading_ones(K, monkeypatch, weight_shape):
    shapes = _recording(K, monkeypatch)
    x = torch.randn(3, 70, 40, requires_grad=True)
    w = torch.randn(weight_shape, requires_grad=True)
    y = K.rmsnorm_triton(x, w, 1e-6)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ex, ew = torch.autograd.grad(K.rmsnorm_torch(x, w, 1e-6), (x, w), g)
    assert gw.shape == w.shape
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew, rtol=1e-4, atol=1e-4)
    assert shapes[0][0] == (shapes[0][3], 40)


def test_row_invariant_input_given_per_row_values_falls_back(K, monkeypatch):
    """The fusion pass marks b [N] as row-invariant; called with a full [R, N] b, the launcher sees it is not
    and the kernel stores the per-element gradient instead of summing rows."""
    shapes = _recording(K, monkeypatch)
    x = torch.randn(300, 48, requires_grad=True)
    b = torch.randn(300, 48, requires_grad=True)
    y = K.gelu_bias_triton(x, b)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b), g)
    want = torch.autograd.grad(K.gelu_bias_torch(x, b), (x, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert shapes[0][0] == (300, 48)


# ---- the PyTorch rendering and the derived rules ---------------------------------------------------------------


def _rms_ref(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


HAND_REFERENCES = {
    "rmsnorm": _rms_ref,
    "gemma_rmsnorm": lambda x, w, eps: (
        x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())
    ).to(x.dtype),
    "layernorm": lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
    "add_rmsnorm": lambda x, r, w, eps: (x + r, _rms_ref(x + r, w, eps)),
    "swiglu": lambda g, u: F.silu(g) * u,
    "gelu_bias": lambda x, b: F.gelu(x + b, approximate="tanh"),
    "softcap": lambda x, c: c * torch.tanh(x / c),
    "softmax": lambda x: torch.softmax(x, -1),
    "rope": lambda x, cos, sin: x * cos + _rotate_half(x) * sin,
}


@pytest.mark.parametrize("name", list(HAND_REFERENCES))
def test_torch_rendering_matches_hand_reference(K, name):
    shape = (2, 3, 7, 64) if name == "rope" else (7, 50)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(name, shape, dtype)
        got = getattr(K, f"{name}_torch")(*inputs)
        want = HAND_REFERENCES[name](*inputs)
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        for a, b in zip(got, want):
            if dtype == torch.float32:
                torch.testing.assert_close(a, b)
            else:
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", list(REGIONS))
def test_derived_backward_as_torch_matches_autograd(K, name):
    """The reverse-mode rules, rendered as torch ops, against torch.autograd on the PyTorch rendering."""
    shape = (2, 3, 7, 64) if name == "rope" else (9, 64)
    inputs = make_inputs(name, shape, torch.float32)
    needs = _needs(name)
    _, ref, grads = run(getattr(K, f"{name}_torch"), inputs, needs)
    got = getattr(K, f"{name}_torch_bwd")(*inputs, *grads)
    got = [g for g, n in zip(got, needs) if n]
    assert all(g is None for g, n in zip(getattr(K, f"{name}_torch_bwd")(*inputs, *grads), needs) if not n)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_every_op_is_covered():
    used = {o.op for r in REGIONS.values() for o in r.ops}
    assert used == set(REGION_OPS), set(REGION_OPS) - used


# ---- errors and the generated text ------------------------------------------------------------------------------


def test_row_too_long_is_a_clear_error(K):
    x = torch.randn(2, 70000)
    with pytest.raises(ValueError, match=r"region rmsnorm: row length N=70000 is above the limit 65536"):
        K.rmsnorm_triton(x, torch.ones(70000), 1e-6)


def test_rotate_half_needs_even_rows(K):
    x = torch.randn(1, 2, 3, 7)
    with pytest.raises(ValueError, match="rotate_half needs an even row length, got N=7"):
        K.rope_triton(x, torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7))


def test_per_row_only_sum_is_refused(K):
    """sum over the row of a [..., 1] tensor is the tensor itself in PyTorch; the row kernel refuses it."""
    x, p = torch.randn(4, 10), torch.randn(4, 1)
    with pytest.raises(ValueError, match=r"region rowsum: sum\(p\) depends on the row only through per-row"):
        K.rowsum_triton(x, p)
    torch.testing.assert_close(K.rowsum_torch(x, p), x * p)


def test_empty_rows_and_rank_limit(K):
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = K.rmsnorm_triton(x, w, 1e-6)
    assert y.shape == (0, 16)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == (0, 16) and torch.equal(gw, torch.zeros(16))
    with pytest.raises(ValueError, match="region rmsnorm: inputs broadcast to \\[1, 2, 3, 4, 5\\]"):
        K.rmsnorm_triton(torch.randn(1, 2, 3, 4, 5), torch.randn(5), 1e-6)
    with pytest.raises(ValueError, match="region add_rmsnorm: the tensor inputs do not broadcast to one shape"):
        K.add_rmsnorm_triton(torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(8), 1e-6)


@pytest.mark.parametrize(
    "region,message",
    [
        (RowRegion("bad", (T("x"),), ops("y = frob(x)"), ("y",)), "unknown op"),
        (RowRegion("bad", (T("x"), T("e")), ops("y = pow(x, e)"), ("y",)), "exponent must be a constant"),
        (RowRegion("bad", (T("x"),), ops("h = neg(x)", "y = rotate_half(h)"), ("y",)), "must be a region tensor input"),
        (RowRegion("bad", (T("x"),), ops("y = mul(x, z)"), ("y",)), "neither a region input"),
        (RowRegion("bad", (T("x"),), ops("y = cast(x, f8)"), ("y",)), "dtype 'f8'"),
        (RowRegion("bad", (S("e"),), ops("y = neg(e)"), ("y",)), "at least one tensor input"),
    ],
)
def test_bad_regions_are_refused(region, message):
    with pytest.raises(RegionError, match=message):
        render_region_triton(region)


def test_generated_text_is_readable():
    text = render_region_triton(REGIONS["rmsnorm"])
    assert "def rmsnorm_fwd_kernel(" in text and "def rmsnorm_bwd_kernel(" in text
    assert "class RmsnormFunction(torch.autograd.Function):" in text
    assert "test.model:1-3" in text
    assert "    x_ptr,  # input x" in text  # one argument per line, with a comment
    assert text.count("tl.load(") == 5  # x, weight forward; x, weight, d_y backward: all masked
    assert all("mask=" in line for line in text.splitlines() if "tl.load(" in line or "tl.store(" in line)
    assert "ctx.save_for_backward(x, weight)" in text
    torch_text = render_region_torch(REGIONS["rmsnorm"])
    assert "def rmsnorm_torch(x, weight, eps):" in torch_text and ".to(x.dtype)" in torch_text
    compile(text, "<rmsnorm>", "exec")


def test_kernels_module_dispatches_to_torch_on_cpu(K):
    x, w = torch.randn(3, 40), torch.randn(40)
    torch.testing.assert_close(K.rmsnorm(x, w, 1e-6), K.rmsnorm_torch(x, w, 1e-6))


# ---- tuned tiles ------------------------------------------------------------------------------------------------


@pytest.fixture
def tuning(K, monkeypatch, tmp_path):
    """Tuning on (DSLC_AUTOTUNE=on measures under the interpreter too), an empty in-memory cache and a
    disk cache in a temporary folder."""
    rt = sys.modules[K.__name__.rsplit(".", 1)[0] + ".kernels_runtime"]
    monkeypatch.setenv("DSLC_AUTOTUNE", "on")
    monkeypatch.setenv("DSLC_AUTOTUNE_CACHE", str(tmp_path / "tiles.json"))
    monkeypatch.setattr(rt, "_TILES", {})
    monkeypatch.setattr(rt, "_DISK_LOADED", False)
    return rt


def test_every_tile_candidate_computes_the_same_region(K, tuning):
    """Each candidate tile (BLOCK_M, num_warps) is a different compiled kernel: all must agree with PyTorch,
    forward and backward (the backward with partial weight sums)."""
    x = torch.randn(300, 72, requires_grad=True)
    w = torch.randn(72, requires_grad=True)
    g = torch.randn(300, 72)
    want = [K.rmsnorm_torch(x, w, 1e-6)] + list(torch.autograd.grad(K.rmsnorm_torch(x, w, 1e-6), (x, w), g))
    lay = tuning.row_layout("rmsnorm", x, w)
    candidates = tuning.tile_candidates(lay)
    assert len(candidates) >= 3 and (lay.BLOCK_M, lay.num_warps) in candidates
    for tile in candidates:
        tuning._TILES.clear()
        real = tuning.tuned_tile
        tuning.tuned_tile = lambda *a, tile=tile: tile  # force this tile for every launch
        try:
            y = K.rmsnorm_triton(x, w, 1e-6)
            got = [y] + list(torch.autograd.grad(y, (x, w), g))
        finally:
            tuning.tuned_tile = real
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, tile=tile: f"tile {tile}: {m}")


def test_tuned_tile_is_measured_once_and_cached_on_disk(K, tuning, tmp_path):
    x = torch.randn(64, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    y = K.rmsnorm_triton(x, w, 1e-6)
    y.backward(torch.ones_like(y))
    keys = sorted(tuning._TILES)
    assert len(keys) == 2 and any("fwd_kernel" in k for k in keys) and any("bwd_kernel" in k for k in keys), keys
    assert all("|N=40|" in k for k in keys)
    on_disk = json.loads((tmp_path / "tiles.json").read_text())
    assert sorted(on_disk) == keys
    # a fresh process reads the disk cache instead of measuring again
    tuning._TILES.clear()
    tuning._DISK_LOADED = False
    calls = []
    real_time = tuning._time
    tuning._time = lambda run, device: calls.append(1) or real_time(run, device)
    try:
        K.rmsnorm_triton(x, w, 1e-6)
    finally:
        tuning._time = real_time
    assert calls == [] and sorted(tuning._TILES) == keys
    # another row width is another key
    K.rmsnorm_triton(torch.randn(64, 24), torch.randn(24), 1e-6)
    assert any("|N=24|" in k for k in tuning._TILES)


def test_a_corrupt_tile_cache_is_ignored_with_a_warning(K, tuning, tmp_path):
    (tmp_path / "tiles.json").write_text("{not json")
    x, w = torch.randn(8, 16), torch.randn(16)
    with pytest.warns(UserWarning, match="ignoring the autotune cache"):
        y = K.rmsnorm_triton(x, w, 1e-6)
    torch.testing.assert_close(y, K.rmsnorm_torch(x, w, 1e-6))
    assert len(json.loads((tmp_path / "tiles.json").read_text())) == 1  # rewritten with the new measurement


# ---- grouped launches ------------------------------------------------------------------------------------------


def _count_launches(K, monkeypatch):
    rt = sys.modules[K.__name__.rsplit(".", 1)[0] + ".kernels_runtime"]
    launches = []
    for name in ("launch_rows", "launch_pair"):
        real = getattr(K, name)

        def spy(kernel, *args, _real=real, **kw):
            launches.append(getattr(kernel, "fn", kernel).__name__)
            return _real(kernel, *args, **kw)

        monkeypatch.setattr(K, name, spy)
    return launches, rt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_of_q_and_k_in_one_launch(K, monkeypatch, dtype):
    """Two problems of different head counts (q: 6 heads, k: 2) share one grid, forward and backward;
    each matches its own single call, cos/sin gradients summed over both."""
    launches, _ = _count_launches(K, monkeypatch)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 9, 32, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 9, 32, generator=g).to(dtype).requires_grad_()
    ang = torch.rand(2, 1, 9, 16, generator=g) * 6
    cos = torch.cat((ang, ang), -1).cos().to(dtype).requires_grad_()
    sin = torch.cat((ang, ang), -1).sin().to(dtype)
    qo, ko = K.rope_x2_triton(q, cos, sin, k, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    got = torch.autograd.grad((qo, ko), (q, k, cos), (gq, gk))
    assert launches == ["rope_fwd_kernel_x2", "rope_bwd_kernel_x2"]
    rq, rk = K.rope_torch(q, cos, sin), K.rope_torch(k, cos, sin)
    want = torch.autograd.grad((rq, rk), (q, k, cos), (gq, gk))
    for a, b, what in zip((qo, ko, *got), (rq, rk, *want), ("q", "k", "dq", "dk", "dcos")):
        close(a, b, dtype, what)


def test_grouped_calls_with_unequal_rows_launch_twice(K, monkeypatch):
    launches, _ = _count_launches(K, monkeypatch)
    a, b = torch.randn(5, 16), torch.randn(3, 24)
    ya, yb = K.swiglu_x2_triton(a, a, b, b)
    torch.testing.assert_close(ya, K.swiglu_torch(a, a))
    torch.testing.assert_close(yb, K.swiglu_torch(b, b))
    assert launches == ["swiglu_fwd_kernel", "swiglu_fwd_kernel"]


def test_grouped_launch_with_an_empty_problem(K):
    a, b = torch.randn(0, 16), torch.randn(7, 16)
    ya, yb = K.swiglu_x2_triton(a, a, b, b)
    assert ya.shape == (0, 16)
    torch.testing.assert_close(yb, K.swiglu_torch(b, b))


def test_norms_with_weight_gradients_are_not_grouped():
    """Their backward keeps per-program partial sums for one problem."""
    assert not groupable(REGIONS["rmsnorm"]) and groupable(REGIONS["rope"]) and groupable(REGIONS["softmax"])
