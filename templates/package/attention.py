"""Attention for the generated model: masks, grouped-query attention, a static KV cache.

One `AttentionContext` is built per forward call and passed down to every attention site; it
holds the padding mask and the cache positions, and memoizes the boolean masks it builds (for
static key counts; under torch.export's symbolic shapes each site builds its own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class KVCache:
    """A preallocated (static-shape) key/value cache for one attention site: [B, H_kv, S_max, D].

    The buffers are allocated at the first update, from the shapes, dtype and device of k and v.
    """

    def __init__(self, batch: int, max_len: int):
        self.batch = batch
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # cache_position: [T] slots written by this call; k, v: [B, H_kv, T, D]
        if self.k is None:
            self.k = k.new_zeros(self.batch, k.shape[1], self.max_len, k.shape[3])
            self.v = v.new_zeros(self.batch, v.shape[1], self.max_len, v.shape[3])
        self.k.index_copy_(2, cache_position, k)
        self.v.index_copy_(2, cache_position, v)
        return self.k, self.v


class AttentionContext:
    """What every attention site of one forward call shares.

    key_mask: [B, S] bool, True where a key position holds a real token (None: all real).
    cache_position: [T] int64, the absolute position of each query (and the cache slot it writes).
    use_cache: whether attention sites with a KVCache read and write it.
    """

    def __init__(self, key_mask: torch.Tensor | None, cache_position: torch.Tensor, use_cache: bool = False):
        self.key_mask = key_mask
        self.cache_position = cache_position
        self.use_cache = use_cache
        self._masks: dict = {}

    def mask(self, num_keys: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
        """Boolean [B or 1, 1, T, S] mask of allowed (query, key) pairs, or None when all are allowed."""
        # memoized per plain-int key count only: under torch.export / dynamic-shape tracing num_keys is
        # a SymInt, which cannot key a dict (and need not: the traced graph is built once anyway)
        key = (num_keys, causal, window) if type(num_keys) is int else None
        if key is not None and key in self._masks:
            return self._masks[key]
        allowed = None
        if causal or window is not None:
            q_pos = self.cache_position[:, None]  # [T, 1]
            k_pos = torch.arange(num_keys, device=device)[None, :]  # [1, S]
            allowed = k_pos <= q_pos if causal else torch.ones_like(k_pos, dtype=torch.bool) & (q_pos >= 0)
            if window is not None:
                allowed = allowed & (k_pos > q_pos - window)
            allowed = allowed[None, None]  # [1, 1, T, S]
        if self.key_mask is not None:
            pad = self.key_mask[:, None, None, :num_keys]  # [B, 1, 1, S]
            allowed = pad if allowed is None else allowed & pad
        if allowed is not None:
            # a query with no visible key (a left-padding row) attends to every key instead of
            # producing NaN; its output is never used for a real token
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        if key is not None:
            self._masks[key] = allowed
        return allowed


def attention(
    q: torch.Tensor,  # [B, H_q, T, D]
    k: torch.Tensor,  # [B, H_kv, T, D]
    v: torch.Tensor,  # [B, H_kv, T, D_v]
    ctx: AttentionContext,
    cache: KVCache | None,
    *,
    causal: bool,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:  # [B, H_q, T, D_v]
    if cache is not None and ctx.use_cache:
        k, v = cache.update(ctx.cache_position, k, v)  # [B, H_kv, S_max, D]
    num_keys = k.shape[2]
    simple = ctx.key_mask is None and window is None and num_keys == q.shape[2] and not ctx.use_cache
    if softcap is None:
        if simple:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
            )
        mask = ctx.mask(num_keys, causal, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    # soft-capped logits (Gemma 2): no fused kernel takes them, so compute the scores
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    scores = softcap * torch.tanh(scores / softcap)  # [B, H_q, T, S]
    mask = ctx.mask(num_keys, causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v
