"""The fused linear cross-entropy of generated packages: exact against the unfused loss in float32, as
precise as the unfused loss in bf16, HF's num_items_in_batch and all-ignored semantics, its chunk rule, no
[tokens, vocab] tensor ever allocated, and its peak memory measured against the unfused loss at Qwen2's
vocabulary (CPU, separate processes)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dispatch_log import TensorOutputs
from packages import MODELS, built_packages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("build"), (MODELS / "qwen2.model", "qwen2_loss")) as out:
        yield importlib.import_module("qwen2_loss.losses"), out


def _problem(n_batch=3, t=11, h=16, v=301, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_batch, t, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n_batch, t), generator=g)
    labels[0, :4] = -100
    return hidden, weight, b, labels


def _params(hidden, weight, b):
    return [x for x in (hidden, weight, b) if x is not None and x.requires_grad]


def _unfused(mod, hidden, weight, b, labels, num_items_in_batch=None):
    logits = hidden @ weight.T + (b if b is not None else 0)
    return mod.causal_lm_loss(logits, labels, num_items_in_batch)


CAP = 2.0  # small next to the logits of _problem (std ~ sqrt(h) = 4): most logits are in tanh's saturated part


def _capped(mod, hidden, weight, b, labels, num_items_in_batch=None, **options):
    """The unfused reference: materialized logits, HF Gemma 2's cap (logits / cap, tanh, * cap), the loss."""
    logits = hidden @ weight.T + (b if b is not None else 0)
    logits = torch.tanh(logits / CAP) * CAP
    return mod.causal_lm_loss(logits, labels, num_items_in_batch, **options)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 7, 33, 64, None])  # 5 and 7 do not divide the 33 tokens
def test_fused_loss_equals_unfused(losses, bias, chunk):
    mod, _ = losses
    hidden, weight, b, labels = _problem(bias=bias)
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=chunk)
    grads = torch.autograd.grad(fused * 2.5, _params(hidden, weight, b))
    plain = _unfused(mod, hidden, weight, b, labels)
    ref = torch.autograd.grad(plain * 2.5, _params(hidden, weight, b))
    torch.testing.assert_close(fused, plain)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("needs", ["hidden", "weight", "bias", "weight+bias", "none"])
def test_fused_loss_requires_grad_combinations(losses, needs):
    mod, _ = losses
    hidden, weight, b, labels = _problem(bias=True)
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", b)):
        x.requires_grad_(name in needs.split("+"))
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=7)
    plain = _unfused(mod, hidden, weight, b, labels)
    torch.testing.assert_close(fused, plain)
    params = _params(hidden, weight, b)
    assert fused.requires_grad == bool(params)
    if params:
        for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
            torch.testing.assert_close(got, want)


def _rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("softcap", [None, CAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_bf16_is_as_precise_as_unfused_bf16(losses, bias, softcap):
    """bf16 inputs against the float32 loss of the same (bf16-valued) inputs: the fused loss is within a
    relative-error bound, and no further from it than the unfused bf16 loss (HF eager's, which caps in bf16)."""
    mod, _ = losses
    unfused = _capped if softcap else _unfused
    hidden, weight, b, labels = _problem(n_batch=2, t=40, h=32, v=500, bias=bias, dtype=torch.bfloat16)
    ref_inputs = [x.detach().float().requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    ref = unfused(mod, *ref_inputs, labels)
    ref_grads = torch.autograd.grad(ref, _params(*ref_inputs))
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=13, softcap=softcap)
    fused_grads = torch.autograd.grad(fused, _params(hidden, weight, b))
    plain = unfused(mod, hidden, weight, b, labels)
    plain_grads = torch.autograd.grad(plain, _params(hidden, weight, b))
    assert fused.dtype == torch.float32
    assert abs(fused.item() - ref.item()) / ref.item() < 2e-3
    for got, hf, want in zip(fused_grads, plain_grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert _rel(got, want) < 2e-2
        assert _rel(got, want) <= 1.5 * _rel(hf, want) + 1e-3


@pytest.mark.parametrize("count", [50, "tensor"])
def test_fused_loss_num_items_in_batch(losses, count):
    """HF Trainer's count over the whole batch: a sum divided by it, as transformers' fixed_cross_entropy."""
    mod, _ = losses
    hidden, weight, b, labels = _problem(bias=True)
    num = torch.tensor(50) if count == "tensor" else count
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=7, num_items_in_batch=num)
    plain = _unfused(mod, hidden, weight, b, labels, num)
    torch.testing.assert_close(fused, plain)
    params = _params(hidden, weight, b)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("num", [None, 5])
def test_fused_loss_all_labels_ignored(losses, num):
    """As HF: the mean over no token is NaN (0 / 0) but every gradient is 0, not NaN; with a batch count the
    loss is 0 too (a micro-batch with nothing to learn under gradient accumulation)."""
    mod, _ = losses
    hidden, weight, b, labels = _problem(bias=True)
    labels = torch.full_like(labels, -100)
    labels[:, 0] = 3  # position 0 is never a target (the shift drops it)
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=7, num_items_in_batch=num)
    plain = _unfused(mod, hidden, weight, b, labels, num)
    torch.testing.assert_close(fused, plain, equal_nan=True)
    assert fused.isnan().item() == (num is None)
    params = _params(hidden, weight, b)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
        assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))


def test_fused_loss_backward_runs_once(losses):
    mod, _ = losses
    hidden, weight, b, labels = _problem()
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=7)
    fused.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        fused.backward()


def test_fused_loss_chunk_rule(losses):
    mod, _ = losses
    bf16, f32 = torch.bfloat16, torch.float32
    # Qwen2-0.5B at 8192 tokens: 4 chunks of 2048 tokens, 6 bytes per logit = 1.87 GB of [C, V] buffers
    assert mod.chunk_buffer_bytes(151936, bf16) == 6 * 151936 and mod.chunk_buffer_bytes(151936, f32) == 4 * 151936
    assert mod.default_chunk(8192, 151936, 896, bf16) == 2048
    assert mod.default_chunk(8192, 151936, 896, f32) == 2731  # 3 chunks of the 2 GiB cap
    assert mod.default_chunk(100, 151936, 896, bf16) == 100  # small: one chunk
    assert mod.default_chunk(1, 32000, 256, f32) == 1 and mod.default_chunk(0, 32000, 256, f32) == 1
    for n in (1, 100, 1000, 2048, 4097, 8192, 32768, 131072):
        for v in (1000, 32000, 151936, 256000):
            for dtype in (bf16, f32):
                c = mod.default_chunk(n, v, 896, dtype)
                size = torch.empty((), dtype=dtype).element_size()
                buffers = c * mod.chunk_buffer_bytes(v, dtype)
                assert 1 <= c <= n
                # within the budget (the last chunk may be smaller; chunks are balanced to within one token)
                budget = min(mod.MAX_CHUNK_BYTES, max(mod.MIN_CHUNK_BYTES, 3 * n * v * size // 4))
                assert buffers <= budget or c == 1
                chunks = -(-n // c)
                assert n - (chunks - 1) * c >= c - chunks
                # never above 3/4 of the [N, V] logits in dtype unless below the 256 MiB floor
                assert buffers <= max(mod.MIN_CHUNK_BYTES, 3 * n * v * size // 4) or c == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_never_allocates_the_logits(losses, dtype, bias):
    """No op of forward or backward outputs an [N, V] tensor (nor anything above one chunk's [C, V])."""
    mod, _ = losses
    n, v, h, chunk = 4 * 40, 301, 8, 24
    hidden, weight, b, labels = _problem(n_batch=4, t=40, h=h, v=v, bias=bias, dtype=dtype)
    with TensorOutputs() as shapes:
        loss = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=chunk)
        loss.backward()
    biggest = max(shapes.outputs)
    assert biggest[0] <= max(chunk * v, v * h) < n * v, biggest
    assert sum(1 for numel, _, _ in shapes.outputs if numel == chunk * v) > 0  # the chunks did run
    assert hidden.grad is not None and weight.grad.dtype == dtype


def test_fused_loss_benchmark_runs(losses):
    mod, _ = losses
    result = mod.benchmark_fused_loss(64, 16, 500, torch.float32, device="cpu", repeats=1)
    assert result["chunk"] == 64 and result["fused_ms"] > 0 and result["unfused_ms"] > 0
    assert abs(result["fused_loss"] - result["unfused_loss"]) < 1e-4


# ---- a final soft-cap (Gemma 2's final_logit_softcapping) inside the chunks ------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 7, 33, None])
def test_fused_loss_softcap_equals_unfused(losses, bias, chunk):
    """float32: loss and every gradient (through 1 - tanh^2) equal the unfused capped loss at any chunk."""
    mod, _ = losses
    hidden, weight, b, labels = _problem(bias=bias)
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=chunk, softcap=CAP)
    grads = torch.autograd.grad(fused * 2.5, _params(hidden, weight, b))
    plain = _capped(mod, hidden, weight, b, labels)
    ref = torch.autograd.grad(plain * 2.5, _params(hidden, weight, b))
    torch.testing.assert_close(fused, plain)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)
    # the cap is live: the uncapped loss is a different number
    assert abs(plain.item() - _unfused(mod, hidden, weight, b, labels).item()) > 0.1


def test_fused_loss_softcap_with_declared_options(losses):
    """The cap composes with the declared per-row options (label smoothing, class weights, z-loss) and HF
    Trainer's num_items_in_batch: all of them are of the capped logits."""
    mod, _ = losses
    hidden, weight, b, labels = _problem(bias=True)
    cw = torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    loss, z = mod.fused_causal_lm_losses(
        hidden,
        weight,
        b,
        labels,
        chunk=7,
        num_items_in_batch=40,
        label_smoothing=0.1,
        class_weight=cw,
        z_coef=1e-2,
        softcap=CAP,
    )
    grads = torch.autograd.grad(loss, _params(hidden, weight, b))
    logits = torch.tanh((hidden @ weight.T + b) / CAP) * CAP
    ce = mod.causal_lm_loss(logits, labels, 40, label_smoothing=0.1, weight=cw)
    want_z = mod.z_loss(logits, labels, 40, shift=True)
    want = ce + 1e-2 * want_z
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(z, want_z)
    for got, ref in zip(grads, torch.autograd.grad(want, _params(hidden, weight, b))):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_softcap_never_allocates_the_logits(losses, dtype):
    """With the cap, no op of forward or backward outputs an [N, V] tensor either."""
    mod, _ = losses
    n, v, h, chunk = 4 * 40, 301, 8, 24
    hidden, weight, b, labels = _problem(n_batch=4, t=40, h=h, v=v, bias=True, dtype=dtype)
    with TensorOutputs() as shapes:
        loss = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=chunk, softcap=CAP)
        loss.backward()
    biggest = max(shapes.outputs)
    assert biggest[0] <= max(chunk * v, v * h) < n * v, biggest
    assert any("tanh" in func for numel, func, _ in shapes.outputs if numel == chunk * v)  # the cap ran per chunk
    assert hidden.grad is not None and weight.grad.dtype == dtype


def test_fused_loss_softcap_chunk_rule(losses):
    """The cap's slope is one more [C, V] buffer in the GEMM dtype: 8 bytes per logit, so smaller chunks."""
    mod, _ = losses
    bf16, f32 = torch.bfloat16, torch.float32
    assert mod.chunk_buffer_bytes(256000, bf16, softcap=True) == 8 * 256000
    assert mod.chunk_buffer_bytes(256000, f32, softcap=True) == 8 * 256000
    # Gemma-2-2B's head at 8192 tokens in bf16: the 2 GiB cap / 8 bytes per logit -> 1049 tokens, 8 chunks of 1024
    assert mod.default_chunk(8192, 256000, 2304, bf16, softcap=True) == 1024
    assert mod.default_chunk(8192, 256000, 2304, bf16) == 1366  # 6 chunks without it (1398 fit)


def test_fused_loss_softcap_benchmark_runs(losses):
    mod, _ = losses
    result = mod.benchmark_fused_loss(64, 16, 500, torch.float32, device="cpu", repeats=1, softcap=CAP)
    assert result["softcap"] == CAP and result["fused_ms"] > 0 and result["unfused_ms"] > 0
    assert abs(result["fused_loss"] - result["unfused_loss"]) < 1e-4


PEAK = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    from qwen2_loss.losses import causal_lm_loss, fused_causal_lm_loss
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 1024, 64, 151936
    hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[2] == "fused":
        loss = fused_causal_lm_loss(hidden, weight, None, labels)
    else:
        loss = causal_lm_loss(hidden @ weight.T, labels)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_kib": peak - base, "loss": loss.item()}))
""")


def _peak(out: Path, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PEAK, str(out), mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_fused_loss_peak_memory_is_a_fraction_of_unfused(losses):
    _, out = losses
    fused, plain = _peak(out, "fused"), _peak(out, "plain")
    logits_kib = 1024 * 151936 * 4 // 1024
    print(
        f"peak extra memory: fused {fused['peak_extra_kib'] / 1024:.0f} MiB, "
        f"unfused {plain['peak_extra_kib'] / 1024:.0f} MiB (float32 logits alone: {logits_kib / 1024:.0f} MiB)"
    )
    assert abs(fused["loss"] - plain["loss"]) < 1e-3
    assert plain["peak_extra_kib"] > logits_kib  # the unfused loss does hold the logits
    assert fused["peak_extra_kib"] < plain["peak_extra_kib"] / 4


# ---- the Triton row pass (losses_triton.py), under TRITON_INTERPRET=1 on the CPU ---------------------------------


@pytest.fixture
def triton_backend(losses):
    """The package's Triton path forced on (the fused loss then runs losses_triton's row kernel)."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton row kernel runs on the CPU only under TRITON_INTERPRET=1 (scripts/test.sh sets it)")
    kernels = importlib.import_module("qwen2_loss.kernels")
    kernels.set_backend("triton")
    yield losses[0]
    kernels.set_backend("auto")


@pytest.mark.parametrize("block", [None, 512])  # the whole row in one step; six steps of 512 columns
def test_triton_row_pass_matches_cross_entropy(triton_backend, block):
    rows_mod = importlib.import_module("qwen2_loss.losses_triton")
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 3001, generator=g) * 4
    target = torch.randint(0, 3001, (9,), generator=g)
    keep = torch.ones(9, dtype=torch.bool)
    keep[[2, 7]] = False
    x = logits.clone().requires_grad_()
    want_loss = torch.nn.functional.cross_entropy(x, target, reduction="none")
    (want_grad,) = torch.autograd.grad(want_loss.sum(), x)
    buf = logits.clone()
    got = rows_mod.cross_entropy_rows(buf, target, keep, write_grad=True, block=block)
    torch.testing.assert_close(got, torch.where(keep, want_loss, 0.0))
    torch.testing.assert_close(buf, want_grad * keep[:, None], rtol=1e-5, atol=1e-6)
    untouched = logits.clone()
    rows_mod.cross_entropy_rows(untouched, target, keep, write_grad=False, block=block)
    assert torch.equal(untouched, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_on_the_triton_path_matches_the_torch_path(losses, triton_backend, dtype, bias):
    mod = triton_backend
    kernels = importlib.import_module("qwen2_loss.kernels")
    hidden, weight, b, labels = _problem(bias=bias, dtype=dtype)
    got = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=7)
    got_grads = torch.autograd.grad(got, _params(hidden, weight, b))
    kernels.set_backend("torch")
    want = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=7)
    want_grads = torch.autograd.grad(want, _params(hidden, weight, b))
    kernels.set_backend("triton")
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for a, e in zip(got_grads, want_grads):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, **tol)


def test_fused_loss_on_the_triton_path_all_ignored_and_no_grad(triton_backend):
    mod = triton_backend
    hidden, weight, _, labels = _problem()
    labels[:] = -100
    loss = mod.fused_causal_lm_loss(hidden, weight, None, labels, chunk=5)
    assert torch.isnan(loss)  # as HF's mean over no token
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert not gh.any() and not gw.any()
    with torch.no_grad():
        hidden2, weight2, _, labels2 = _problem()
        torch.testing.assert_close(
            mod.fused_causal_lm_loss(hidden2, weight2, None, labels2), _unfused(mod, hidden2, weight2, None, labels2)
        )
