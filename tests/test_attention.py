"""The generated package's attention against a naive reference: causal, sliding window, padding masks,
grouped-query heads, soft-capped logits, and the static KV cache (prefill then one token at a time), on
every path (`impl`: auto, FlexAttention, SDPA, eager), forward and backward."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from packages import MODELS, built_packages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def attn(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("build"), (MODELS / "qwen2.model", "qwen2_attn")):
        yield importlib.import_module("qwen2_attn.attention")


def reference(q, k, v, key_mask, causal, window, softcap, scale=None):
    """softmax(q k^T) v spelled out: repeat kv heads, mask (causal, window, padding), a row with no
    visible key attends to every key (the package's convention for left-padding rows)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    t, s = q.shape[2], k.shape[2]
    qi, kj = torch.arange(t)[:, None], torch.arange(s)[None, :]
    allowed = torch.ones(t, s, dtype=torch.bool)
    if causal:
        allowed &= kj <= qi
    if window is not None:  # the distance between query and key below `window` (causal: keys behind only)
        allowed &= (qi - kj).abs() < window
    allowed = allowed[None, None] & key_mask[:, None, None, :]
    allowed |= ~allowed.any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


CASES = [  # causal, window, softcap, heads (q, kv)
    (True, None, None, (4, 4)),
    (True, None, None, (6, 2)),
    (True, 3, None, (4, 2)),
    (False, None, None, (4, 1)),
    (True, None, 5.0, (4, 2)),
    (False, 2, 5.0, (2, 2)),
]


IMPLS = ["auto", "flex", "sdpa", "eager"]


@pytest.fixture()
def flex_backward_on_cpu(monkeypatch):
    """torch 2.13 refuses FlexAttention backward on CPU (a device check); its eager (unfused) backward
    itself runs there, so the tests lift the check to exercise the score_mod / mask_mod gradients."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *tensors: None)


def _qkv(heads, b=2, t=7, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).requires_grad_(grad) for h in (heads[0], heads[1], heads[1])]


def _key_mask(b, t, padded):
    key_mask = torch.ones(b, t, dtype=torch.bool)
    if padded:
        key_mask[0, :3] = False  # left padding
        key_mask[1, 5:] = False  # right padding
    return key_mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal,window,softcap,heads", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_reference(attn, impl, causal, window, softcap, heads, padded):
    q, k, v = _qkv(heads)
    key_mask = _key_mask(2, 7, padded)
    ctx = attn.AttentionContext(key_mask if padded else None, torch.arange(7), impl=impl)
    got = attn.attention(q, k, v, ctx, None, causal=causal, window=window, softcap=softcap)
    torch.testing.assert_close(got, reference(q, k, v, key_mask, causal, window, softcap))


@pytest.mark.parametrize("causal,window,softcap,heads", [(True, 3, 5.0, (4, 2)), (False, 2, None, (2, 1))])
def test_flex_gradients_match_eager(attn, flex_backward_on_cpu, causal, window, softcap, heads):
    """Backward through FlexAttention (softcap score_mod, window + padding block mask, GQA) equals the
    eager path's, for q, k and v, with a custom scale."""
    grads = {}
    for impl in ("flex", "eager"):
        q, k, v = _qkv(heads, seed=3, grad=True)
        ctx = attn.AttentionContext(_key_mask(2, 7, True), torch.arange(7), impl=impl)
        out = attn.attention(q, k, v, ctx, None, causal=causal, window=window, softcap=softcap, scale=0.3)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[impl] = [t.grad for t in (q, k, v)]
    for got, want in zip(grads["flex"], grads["eager"]):
        torch.testing.assert_close(got, want)


def test_block_masks_are_memoized_per_shape(attn):
    ctx = attn.AttentionContext(_key_mask(2, 7, True), torch.arange(7), impl="flex")
    first = ctx.block_mask(7, True, 3, "cpu")
    assert ctx.block_mask(7, True, 3, "cpu") is first
    assert ctx.block_mask(7, True, None, "cpu") is not first


def test_auto_takes_flex_only_on_cuda(attn):
    """On the CPU `auto` keeps SDPA / eager; the path on a CUDA tensor is decided from shapes alone."""
    q, k = torch.empty(1, 4, 5, 8), torch.empty(1, 2, 5, 8)
    assert attn._path("auto", q, k, 3, 5.0) == "eager" and attn._path("auto", q, k, 3, None) == "sdpa"
    assert attn._path("auto", q, k, None, None) == "sdpa" and attn._path("flex", q, k, None, None) == "flex"
    assert attn._path("sdpa", q, k, 3, 5.0) == "eager" and attn._path("eager", q, k, None, None) == "eager"


def test_impl_from_the_environment(attn, monkeypatch):
    monkeypatch.setenv("DSLC_ATTENTION", "flex")
    assert attn.AttentionContext(None, torch.arange(3)).impl == "flex"
    monkeypatch.delenv("DSLC_ATTENTION")
    assert attn.AttentionContext(None, torch.arange(3)).impl == "auto"
    monkeypatch.setenv("DSLC_ATTENTION", "fast")
    with pytest.raises(ValueError, match="DSLC_ATTENTION='fast': expected one of auto, flex, sdpa, eager"):
        attn.AttentionContext(None, torch.arange(3))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (3, 5.0)])
def test_kv_cache_decoding_matches_full_attention(attn, impl, window, softcap):
    """Prefill 5 positions into a static cache of 9, then 4 single-token steps: each step's output equals
    full attention over the sequence so far."""
    g = torch.Generator().manual_seed(1)
    b, hq, hk, t, d, total = 2, 4, 2, 9, 8, 9
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hk, hk))
    key_mask = torch.ones(b, total, dtype=torch.bool)
    key_mask[1, :2] = False
    full = reference(q, k, v, key_mask, True, window, softcap)
    real = key_mask[:, None, :, None].expand_as(full)  # padding queries' outputs are never used: not compared
    cache = attn.KVCache(b, total)
    ctx = attn.AttentionContext(key_mask, torch.arange(5), use_cache=True, impl=impl)
    got = attn.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], ctx, cache, causal=True, window=window, softcap=softcap)
    torch.testing.assert_close(got[real[:, :, :5]], full[:, :, :5][real[:, :, :5]])
    for pos in range(5, t):
        ctx = attn.AttentionContext(key_mask, torch.tensor([pos]), use_cache=True, impl=impl)
        sl = slice(pos, pos + 1)
        got = attn.attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], ctx, cache, causal=True, window=window, softcap=softcap
        )
        torch.testing.assert_close(got[real[:, :, sl]], full[:, :, sl][real[:, :, sl]])


def test_compiled_flex_serves_every_softcap(attn, monkeypatch):
    """torch.compile(flex_attention), as CUDA runs it, here on the CPU backend (one compile, a few
    seconds): two sites with different caps share the compiled kernel (the cap is a tensor input; as a
    Python float the second cap made it recompile with a symbolic float that failed to lower)."""
    compiled = torch.compile(attn.flex_attention)
    monkeypatch.setattr(attn, "_flex_fn", lambda device: compiled)
    q, k, v = _qkv((4, 2), t=16, d=16, seed=5)
    key_mask = _key_mask(2, 16, True)
    ctx = attn.AttentionContext(key_mask, torch.arange(16), impl="flex")
    for softcap in (5.0, 2.0):
        got = attn.attention(q, k, v, ctx, None, causal=True, window=6, softcap=softcap)
        torch.testing.assert_close(got, reference(q, k, v, key_mask, True, 6, softcap), rtol=1e-5, atol=1e-5)


def test_attention_dropout_acts_in_training_only(tmp_path):
    """GPT-2's `attention(..., dropout = attn_pdrop)`: in eval the output is deterministic and equals p = 0;
    in training two calls differ (the probabilities are dropped), and the gradients still flow."""
    import importlib
    import json

    from hf_oracle import make_hf_model
    from packages import built_packages

    folder = make_hf_model("gpt2", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["attn_pdrop"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    with built_packages(tmp_path / "pkg", (ROOT / "models" / "gpt2.model", "gpt2_dropout")):
        model = importlib.import_module("gpt2_dropout").GPT2LMHeadModel.from_pretrained(folder)
    ids = torch.randint(0, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        model.config.attn_pdrop = 0.0
        c = model(input_ids=ids).logits
        model.config.attn_pdrop = 0.5
    assert torch.equal(a, b) and torch.equal(a, c)
    model.train()
    torch.manual_seed(1)
    x = model(input_ids=ids).logits
    y = model(input_ids=ids).logits
    assert not torch.allclose(x, y)
    x.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
