"""The generated package's attention against a naive reference: causal, sliding window, padding masks,
grouped-query heads, soft-capped logits, and the static KV cache (prefill then one token at a time)."""

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
    if window is not None:
        allowed &= kj > qi - window
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


@pytest.mark.parametrize("causal,window,softcap,heads", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_reference(attn, causal, window, softcap, heads, padded):
    g = torch.Generator().manual_seed(0)
    b, t, d = 2, 7, 8
    q = torch.randn(b, heads[0], t, d, generator=g)
    k = torch.randn(b, heads[1], t, d, generator=g)
    v = torch.randn(b, heads[1], t, d, generator=g)
    key_mask = torch.ones(b, t, dtype=torch.bool)
    if padded:
        key_mask[0, :3] = False  # left padding
        key_mask[1, 5:] = False  # right padding
    ctx = attn.AttentionContext(key_mask if padded else None, torch.arange(t))
    got = attn.attention(q, k, v, ctx, None, causal=causal, window=window, softcap=softcap)
    torch.testing.assert_close(got, reference(q, k, v, key_mask, causal, window, softcap))


@pytest.mark.parametrize("window", [None, 3])
def test_kv_cache_decoding_matches_full_attention(attn, window):
    """Prefill 5 positions into a static cache of 9, then 4 single-token steps: each step's output equals
    full attention over the sequence so far."""
    g = torch.Generator().manual_seed(1)
    b, hq, hk, t, d, total = 2, 4, 2, 9, 8, 9
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hk, hk))
    key_mask = torch.ones(b, total, dtype=torch.bool)
    key_mask[1, :2] = False
    full = reference(q, k, v, key_mask, True, window, None)
    real = key_mask[:, None, :, None].expand_as(full)  # padding queries' outputs are never used: not compared
    cache = attn.KVCache(b, total)
    ctx = attn.AttentionContext(key_mask, torch.arange(5), use_cache=True)
    got = attn.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], ctx, cache, causal=True, window=window)
    torch.testing.assert_close(got[real[:, :, :5]], full[:, :, :5][real[:, :, :5]])
    for pos in range(5, t):
        ctx = attn.AttentionContext(key_mask, torch.tensor([pos]), use_cache=True)
        sl = slice(pos, pos + 1)
        got = attn.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], ctx, cache, causal=True, window=window)
        torch.testing.assert_close(got[real[:, :, sl]], full[:, :, sl][real[:, :, sl]])
