"""On a CUDA device: the generated package's Triton kernels against its PyTorch path.

Builds models/qwen2.model, then checks every fused region of it (found in the package's `kernels` module,
`<name>_torch` against `kernels_triton.<name>_triton`) forward and backward in bfloat16 and float32 at
model-like shapes, and a training step of the bundled tiny Qwen2 checkpoint (models/tiny-qwen2/): loss and
every gradient with the Triton backend against the torch backend. Marked `cuda`: skipped without a GPU
(tests/conftest.py); `pytest -m cuda` runs these with the other CUDA tests (bench/gpu.sh does).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from packages import built_packages  # noqa: E402

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
NAME = "cudak_qwen2"
# the device under test; DSLC_CUDA_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs the same checks through the
# Triton interpreter when debugging these tests without a GPU (the `cuda` marker still skips them in a plain run;
# the interpreter truncates on bf16 casts, so the bf16 training-step check fails there: about 4x PyTorch's error)
DEVICE = os.environ.get("DSLC_CUDA_TEST_DEVICE", "cuda")
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("cudak"), (ROOT / "models" / "qwen2.model", NAME)):
        K = importlib.import_module(f"{NAME}.kernels")
        KT = importlib.import_module(f"{NAME}.kernels_triton")
        yield importlib.import_module(NAME), K, KT


def regions(K) -> list[str]:
    return sorted(n.removesuffix("_torch") for n in dir(K) if n.endswith("_torch") and callable(getattr(K, n)))


def test_the_package_has_the_expected_regions(pkg):
    _, K, KT = pkg
    names = regions(K)
    assert {"rms_norm", "rms_norm_residual", "attention_apply_rope", "gated_mlp_pointwise"} <= set(names), names
    assert all(hasattr(KT, f"{n}_triton") for n in names)


# ---- inputs by argument name -------------------------------------------------------------------------------
ROWS = {"small": (37, 896), "wide": (2048, 4864)}  # odd row count; Qwen2-0.5B's intermediate width
ROPE = {"small": (2, 14, 33, 64), "wide": (4, 14, 512, 64)}


def make_inputs(fn, size: str, dtype):
    """Inputs for a region from its parameter names; (values, which take a gradient)."""
    g = torch.Generator().manual_seed(0)

    def rn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    R, N = ROWS[size]
    B, H, T, D = ROPE[size]
    ang = torch.rand(B, 1, T, D // 2, generator=g) * 6.0
    ang = torch.cat((ang, ang), -1)
    table = {"cos": ang.cos().to(DEVICE), "sin": ang.sin().to(DEVICE)}  # float32, as the model passes them
    values, needs = [], []
    for name in inspect.signature(fn).parameters:
        if name == "eps":
            values.append(1e-6)
            needs.append(False)
        elif name == "act":  # an activation region's name from the table (ops.ACTIVATIONS): Qwen2's
            values.append("silu")
            needs.append(False)
        elif name == "emb":  # RotaryEmbedding's angles [B, T, D], float32 as the model computes them
            values.append(torch.rand(B, T, D, generator=g).mul(6.0).to(DEVICE))
            needs.append(True)
        elif name == "scale":  # the rope attention factor, a Python float
            values.append(1.0)
            needs.append(False)
        elif name == "weight":
            values.append(1 + rn(N, scale=0.1))
            needs.append(True)
        elif name in table:
            values.append(table[name])
            needs.append(False)
        elif name in ("q", "k"):
            values.append(rn(B, H, T, D))
            needs.append(True)
        elif name in ("x", "residual", "gate_proj", "up_proj"):
            values.append(rn(R, N))
            needs.append(True)
        else:
            raise AssertionError(f"no input rule for parameter {name!r} of {fn.__name__}: add one here")
    return values, needs


def run(fn, values, needs, grads=None):
    leaves = [v.detach().clone().requires_grad_(n) if isinstance(v, torch.Tensor) else v for v, n in zip(values, needs)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grads is None:
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outs]
    wrt = [v for v, n in zip(leaves, needs) if n]
    return outs, torch.autograd.grad(outs, wrt, grads), grads


def assert_close(a, b, dtype, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    scale = b.float().abs().max().item() + 1e-6
    if dtype == torch.float32:  # weight gradients sum many rows in another order: relative to the largest value
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=2e-2 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("size", list(ROWS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_region_triton_matches_torch(pkg, dtype, size):
    _, K, KT = pkg
    for name in regions(K):
        ref_fn, tri_fn = getattr(K, f"{name}_torch"), getattr(KT, f"{name}_triton")
        values, needs = make_inputs(ref_fn, size, dtype)
        ref_out, ref_grads, grads = run(ref_fn, values, needs)
        out, gin, _ = run(tri_fn, values, needs, grads)
        assert len(out) == len(ref_out), name
        for i, (a, b) in enumerate(zip(out, ref_out)):
            assert_close(a, b, dtype, f"{name} output {i} {size} {dtype}")
        for i, (a, b) in enumerate(zip(gin, ref_grads)):
            assert_close(a, b, dtype, f"{name} grad {i} {size} {dtype}")


# ---- the model: a training step, Triton backend against the torch backend ---------------------------------------
def _train_step(mod, K, dtype, backend):
    """Loss and every gradient of one forward+backward of the tiny checkpoint, on `backend`."""
    model = mod.Qwen2ForCausalLM.from_pretrained(ROOT / "models" / "tiny-qwen2", dtype=dtype, device=DEVICE).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[0, :5] = -100
    K.set_backend(backend)
    try:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
    finally:
        K.set_backend("auto")
    return loss.detach().double().item(), {n: p.grad.double() for n, p in model.named_parameters()}


def _rel(a, b) -> float:
    return ((a - b).norm() / (b.norm() + 1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_train_step_triton_matches_torch(pkg, dtype):
    mod, K, _ = pkg
    ref_loss, ref_grads = _train_step(mod, K, dtype, "torch")
    loss, grads = _train_step(mod, K, dtype, "triton")
    assert grads.keys() == ref_grads.keys()
    if dtype == torch.float32:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
        errors = {n: _rel(grads[n], ref_grads[n]) for n in ref_grads}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-4, f"{worst}: relative error {errors[worst]:.3g} against the torch backend"
        return
    # bf16: the two paths round differently at every layer, so compare each with a float32 step (the same
    # checkpoint, torch backend): the Triton path must be about as close to it as PyTorch's own bf16 is
    exact_loss, exact = _train_step(mod, K, torch.float32, "torch")
    assert abs(loss - exact_loss) <= 2 * abs(ref_loss - exact_loss) + 1e-2 * abs(exact_loss), (
        loss,
        ref_loss,
        exact_loss,
    )
    for n in exact:
        err, ref_err = _rel(grads[n], exact[n]), _rel(ref_grads[n], exact[n])
        assert err <= 2 * ref_err + 1e-2, f"{n}: bf16 Triton error {err:.3g}, bf16 PyTorch error {ref_err:.3g}"


# ---- grouped launch, tuned tiles, the fused loss's row kernel ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_rope_pair_in_one_launch_matches_two_calls(pkg, dtype):
    """q (14 heads) and k (2 heads) through `attention_apply_rope_x2_triton`, as Qwen2's attention calls it."""
    _, K, KT = pkg
    g = torch.Generator().manual_seed(2)
    B, T, D = 2, 300, 64
    ang = torch.rand(B, 1, T, D // 2, generator=g) * 6.0
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos().to(DEVICE), ang.sin().to(DEVICE)
    q = torch.randn(B, 14, T, D, generator=g).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn(B, 2, T, D, generator=g).to(dtype).to(DEVICE).requires_grad_()
    qo, ko = KT.attention_apply_rope_x2_triton(cos, q, sin, cos, k, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    got = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    rq, rk = K.attention_apply_rope_torch(cos, q, sin), K.attention_apply_rope_torch(cos, k, sin)
    want = torch.autograd.grad((rq, rk), (q, k), (gq, gk))
    for a, b, what in zip((qo, ko, *got), (rq, rk, *want), ("q", "k", "dq", "dk")):
        assert_close(a, b, dtype, what)


def test_tiles_are_tuned_on_cuda_and_cached(pkg, tmp_path, monkeypatch):
    _, K, KT = pkg
    rt = importlib.import_module(f"{NAME}.kernels_runtime")
    monkeypatch.setenv("DSLC_AUTOTUNE", "auto")
    monkeypatch.setenv("DSLC_AUTOTUNE_CACHE", str(tmp_path / "tiles.json"))
    monkeypatch.setattr(rt, "_TILES", {})
    monkeypatch.setattr(rt, "_DISK_LOADED", False)
    x = torch.randn(4096, 896, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(896, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = KT.rms_norm_triton(x, 1e-6, w)
    y.sum().backward()
    assert len(rt._TILES) == 2 and (tmp_path / "tiles.json").exists()
    lay = rt.row_layout("rms_norm", x, w)
    assert all(tile in rt.tile_candidates(lay) for tile in rt._TILES.values())
    torch.testing.assert_close(y, K.rms_norm_torch(x, 1e-6, w))


def test_fused_loss_row_kernel_at_qwen2_vocabulary(pkg):
    """The Triton row pass (several 16384-column steps per row) against F.cross_entropy, bf16 logits."""
    rows = importlib.import_module(f"{NAME}.losses_triton")
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(64, 151936, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    target = torch.randint(0, 151936, (64,), generator=g).to(DEVICE)
    keep = torch.ones(64, dtype=torch.bool, device=DEVICE)
    keep[:3] = False
    x = logits.float().requires_grad_()
    want = torch.nn.functional.cross_entropy(x, target, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    buf = logits.clone()
    got = rows.cross_entropy_rows(buf, target, keep, write_grad=True)
    torch.testing.assert_close(got, torch.where(keep, want, 0.0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(buf.float(), want_grad * keep[:, None], rtol=2e-2, atol=1e-3)
