"""Attention for the generated model: masks, grouped-query attention, a static KV cache.

One `AttentionContext` is built per forward call and passed down to every attention site; it
holds the padding mask and the cache positions, and memoizes the masks it builds, boolean or
FlexAttention block masks (for static key counts; under torch.export's symbolic shapes each site
builds its own).

Which path `attention()` takes, by the context's `impl` (default: the `DSLC_ATTENTION` environment
variable, `auto` when unset):

* `auto`: plain causal / padding attention (no window, no softcap) runs SDPA, which has fused kernels
  for it. Soft-capped logits (Gemma 2) or a sliding window run FlexAttention on CUDA, compiled
  (`torch.compile(flex_attention)`, once per process): the softcap is a `score_mod`; causality, the
  window and key padding are a `mask_mod` turned into a block mask, which skips the key blocks
  outside the window (a dense boolean mask for SDPA would still visit them). Not on CUDA, or for a
  single-token decode step (which the CUDA-graph decoder captures; its dense mask is one row per
  sequence, [B, 1, 1, S]), or when the query heads per key/value head are not a power of two (FlexAttention's
  short-query kernel needs one): soft-capped logits take the eager path, a window SDPA with a boolean mask.
* `flex`: every call runs FlexAttention: compiled on CUDA, eager (unfused, slower than `eager`: for
  testing) on other devices, where torch 2.13 refuses its backward.
* `sdpa`: never FlexAttention: SDPA (with a boolean mask where needed), the eager path for softcaps.
* `eager`: every call computes softmax(q k^T) v explicitly, the reference.

Under torch.export `flex` and `auto` fall back to the SDPA / eager paths, so exported programs hold
only standard aten ops. A model compiled as a whole calls `flex_attention` itself, inside the graph.

Every path has the same contract: a query with no visible key (a left-padding row) attends to every
key instead of producing NaN; its output is never used for a real token.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

IMPL_ENV = "DSLC_ATTENTION"
IMPLS = ("auto", "flex", "sdpa", "eager")

_compiled_flex = None  # torch.compile(flex_attention), made at the first CUDA call


def default_impl() -> str:
    """The attention path chosen by the environment: `DSLC_ATTENTION`, `auto` when unset."""
    impl = os.environ.get(IMPL_ENV, "auto") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={impl!r}: expected one of {', '.join(IMPLS)}")
    return impl


def cache_sites(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention sites of `model` (the modules with a `kv_cache` slot), in module order: layer i's is the i-th."""
    return [m for m in model.modules() if hasattr(m, "kv_cache")]


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
    impl: the attention path (see the module docstring); None reads `DSLC_ATTENTION`.
    """

    def __init__(
        self,
        key_mask: torch.Tensor | None,
        cache_position: torch.Tensor,
        use_cache: bool = False,
        impl: str | None = None,
    ):
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"attention impl {impl!r}: expected one of {', '.join(IMPLS)}")
        self.key_mask = key_mask
        self.cache_position = cache_position
        self.use_cache = use_cache
        self.impl = impl or default_impl()
        self._masks: dict = {}

    def _memo(self, kind: str, num_keys, causal: bool, window: int | None, build):
        # memoized per plain-int key count only: under torch.export / dynamic-shape tracing num_keys is
        # a SymInt, which cannot key a dict (and need not: the traced graph is built once anyway)
        # and never while torch.compile traces: a dict written inside an activation-checkpointed block is a side
        # effect its higher-order op refuses (the compiled graph computes each mask once anyway)
        if type(num_keys) is not int or torch.compiler.is_compiling():
            return build()
        key = (kind, num_keys, causal, window)
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def keys(self, num_keys: int) -> torch.Tensor:
        """The padding mask over `num_keys` key slots, [B, S]: cut to them, or, when a static cache has more
        slots than the mask has positions (transformers' StaticCache), extended with True (the slots past
        the tokens so far hold no key yet, and the causal mask keeps them out)."""
        mask = self.key_mask[:, :num_keys]
        if mask.shape[1] < num_keys:
            mask = F.pad(mask, (0, num_keys - mask.shape[1]), value=True)
        return mask

    def mask(self, num_keys: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
        """Boolean [B or 1, 1, T, S] mask of allowed (query, key) pairs, or None when all are allowed."""
        return self._memo("bool", num_keys, causal, window, lambda: self._bool_mask(num_keys, causal, window, device))

    def _bool_mask(self, num_keys: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
        allowed = None
        if causal or window is not None:
            q_pos = self.cache_position[:, None]  # [T, 1]
            k_pos = torch.arange(num_keys, device=device)[None, :]  # [1, S]
            allowed = k_pos <= q_pos if causal else torch.ones_like(k_pos, dtype=torch.bool) & (q_pos >= 0)
            if window is not None:  # causal: the last `window` keys; bidirectional: distance below `window`
                allowed = allowed & (k_pos > q_pos - window) & (k_pos < q_pos + window)
            allowed = allowed[None, None]  # [1, 1, T, S]
        if self.key_mask is not None:
            pad = self.keys(num_keys)[:, None, None, :]  # [B, 1, 1, S]
            allowed = pad if allowed is None else allowed & pad
        if allowed is not None:
            # a query with no visible key attends to every key instead of producing NaN
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        return allowed

    def block_mask(self, num_keys: int, causal: bool, window: int | None, device) -> BlockMask:
        """The FlexAttention block mask of `mask`: the same allowed pairs, batch-wide when unpadded."""
        return self._memo("block", num_keys, causal, window, lambda: self._block_mask(num_keys, causal, window, device))

    def _block_mask(self, num_keys: int, causal: bool, window: int | None, device) -> BlockMask:
        pos = self.cache_position  # [T]
        pad = self.keys(num_keys) if self.key_mask is not None else None  # [B, S]
        blind = self._no_visible_key(num_keys, causal, window)  # [B or 1, T]

        def mask_mod(b, h, q_idx, kv_idx):
            p = pos[q_idx]
            allowed = kv_idx <= p if causal else kv_idx >= 0
            if window is not None:
                allowed = allowed & (kv_idx > p - window) & (kv_idx < p + window)
            if pad is not None:
                allowed = allowed & pad[b, kv_idx]
            return allowed | blind[b if blind.shape[0] > 1 else 0, q_idx]

        batch = pad.shape[0] if pad is not None else None
        return create_block_mask(mask_mod, batch, None, pos.shape[0], num_keys, device=device)

    def _no_visible_key(self, num_keys: int, causal: bool, window: int | None) -> torch.Tensor:
        """[B or 1, T] bool: the queries that see no key (every key masked), by counting real keys in range."""
        pos = self.cache_position  # [T]
        if self.key_mask is not None:
            real = self.keys(num_keys)  # [B, S]
        else:
            real = torch.ones(1, num_keys, dtype=torch.bool, device=pos.device)  # [1, S]
        seen = F.pad(real.long().cumsum(-1), (1, 0))  # [B, S + 1]: real keys before each index
        if causal:
            hi = (pos + 1).clamp(0, num_keys)  # [T], keys < hi
        elif window is not None:
            hi = (pos + window).clamp(0, num_keys)
        else:
            hi = torch.full_like(pos, num_keys)
        lo = (pos - window + 1).clamp(0, num_keys) if window is not None else torch.zeros_like(pos)  # keys >= lo
        lo = torch.minimum(lo, hi)
        return seen[:, hi] == seen[:, lo]  # [B or 1, T]


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
    dropout: float = 0.0,
) -> torch.Tensor:  # [B, H_q, T, D_v]
    """`dropout`: on the attention probabilities (the generated module passes it only while training); the
    SDPA and eager paths apply it, FlexAttention has none, so a call with dropout takes the dense path."""
    if cache is not None and ctx.use_cache:
        k, v = cache.update(ctx.cache_position, k, v)  # [B, H_kv, S_max, D]
    path = _path(ctx.impl, q, k, window, softcap)
    if path == "flex" and dropout:
        path = "eager" if softcap is not None else "sdpa"
    if path == "flex":
        return _flex(q, k, v, ctx, causal, window, softcap, scale)
    if path == "eager":
        return _eager(q, k, v, ctx, causal, window, softcap, scale, dropout)
    return _sdpa(q, k, v, ctx, causal, window, scale, dropout)


def _path(impl: str, q: torch.Tensor, k: torch.Tensor, window: int | None, softcap: float | None) -> str:
    """`flex`, `sdpa` or `eager` for one call (see the module docstring)."""
    dense = "eager" if softcap is not None else "sdpa"
    if impl == "eager" or torch.compiler.is_exporting():
        return "eager" if impl == "eager" else dense
    if impl == "flex":
        return "flex"
    if impl == "sdpa" or (softcap is None and window is None):
        return dense
    groups = q.shape[1] // k.shape[1]
    flex_fits = q.is_cuda and q.shape[2] > 1 and groups & (groups - 1) == 0
    return "flex" if flex_fits else dense


def _sdpa(q, k, v, ctx: AttentionContext, causal: bool, window: int | None, scale: float | None, dropout=0.0):
    gqa = k.shape[1] != q.shape[1]
    num_keys = k.shape[2]
    if ctx.key_mask is None and window is None and num_keys == q.shape[2] and not ctx.use_cache:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa, dropout_p=dropout)
    mask = ctx.mask(num_keys, causal, window, q.device)  # [B or 1, 1, T, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa, dropout_p=dropout)


def _eager(q, k, v, ctx: AttentionContext, causal, window, softcap, scale, dropout=0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v with the [B, H_q, T, S] scores materialized (soft-capped when asked)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # [B, H_q, S, D]
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # [B, H_q, T, S]
    mask = ctx.mask(k.shape[2], causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return probs @ v


def _flex(q, k, v, ctx: AttentionContext, causal, window, softcap, scale) -> torch.Tensor:
    """FlexAttention: the softcap as a score_mod, the masks as a (memoized) block mask."""
    block_mask = ctx.block_mask(k.shape[2], causal, window, q.device)
    score_mod = None
    if softcap is not None:
        # a tensor, not a Python float: the compiled kernel then takes it as an input, so sites with
        # other caps reuse it (a float would be specialized, then turned into a symbolic one that fails to lower)
        cap = torch.full((), softcap, dtype=torch.float32, device=q.device)

        def score_mod(score, b, h, q_idx, kv_idx):  # score: q . k * scale
            return cap * torch.tanh(score / cap)

    run = _flex_fn(q.device)
    return run(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _flex_fn(device: torch.device):
    """The compiled flex_attention on CUDA (compiled once per process), the eager one elsewhere or when
    already inside a compiled graph (which compiles it with the rest)."""
    global _compiled_flex
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex
