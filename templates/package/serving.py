"""Slot-wise decoding for a server: one static KV cache whose batch rows are independent sequences.

`SlotDecoder(model, slots, max_len)` gives every attention site a [slots, H_kv, max_len, D] cache. Each
slot holds one sequence from cache column 0, at its own length: `prefill(slot, ids, start)` writes a
prompt (or the next turn of a chat, from `start`) into one slot and returns its last logits;
`step(tokens, positions)` runs one decode step for slots 0 .. n - 1 together, each at its own position,
and returns their logits. A slot is reused by prefilling it from 0: the keys a previous sequence left past
the new one's length are never read, since each query sees only the columns at or before its position.

The masks are per row ([B, 1, T, S], from each row's positions; no padding inside a slot), so decoding
runs SDPA (or the eager path for soft-capped logits) with a boolean mask, never FlexAttention.
"""

from __future__ import annotations

import torch

from .attention import AttentionContext, KVCache, cache_sites


class SlotRows:
    """Which cache rows the next call reads and writes, shared by every site's SlotCache: `lo .. hi`."""

    def __init__(self, lo: int = 0, hi: int = 1):
        self.lo, self.hi = lo, hi


class SlotCache(KVCache):
    """A KVCache of `slots` rows written at per-row positions: `cache_position` is [B, T] (B = hi - lo)."""

    def __init__(self, rows: SlotRows, slots: int, max_len: int):
        super().__init__(slots, max_len)
        self.rows = rows

    def update(self, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k = k.new_zeros(self.batch, k.shape[1], self.max_len, k.shape[3])
            self.v = v.new_zeros(self.batch, v.shape[1], self.max_len, v.shape[3])
        keys = self.k[self.rows.lo : self.rows.hi]  # views: the writes land in the cache
        values = self.v[self.rows.lo : self.rows.hi]
        where = cache_position[:, None, :, None]  # [B, 1, T, 1]
        keys.scatter_(2, where.expand(-1, k.shape[1], -1, k.shape[3]), k)
        values.scatter_(2, where.expand(-1, v.shape[1], -1, v.shape[3]), v)
        return keys, values


class SlotContext(AttentionContext):
    """An AttentionContext whose queries sit at per-row positions: `cache_position` [B, T]."""

    def __init__(self, cache_position: torch.Tensor):
        super().__init__(None, cache_position, use_cache=True, impl="sdpa")

    def _bool_mask(self, num_keys: int, causal: bool, window: int | None, device) -> torch.Tensor:
        q_pos = self.cache_position[:, :, None]  # [B, T, 1]
        k_pos = torch.arange(num_keys, device=device)[None, None, :]  # [1, 1, S]
        allowed = k_pos <= q_pos  # the columns past a row's position hold no key of its sequence
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)
        return allowed[:, None]  # [B, 1, T, S]


class SlotDecoder:
    """Independent sequences in the rows ("slots") of one static KV cache; see the module docstring."""

    def __init__(self, model, slots: int, max_len: int):
        if slots < 1 or max_len < 1:
            raise ValueError(f"SlotDecoder needs slots >= 1 and max_len >= 1, got {slots} and {max_len}")
        self.model, self.slots, self.max_len = model, slots, max_len
        self.rows = SlotRows()
        model.eval()
        for site in cache_sites(model):
            site.kv_cache = SlotCache(self.rows, slots, max_len)

    def close(self) -> None:
        """Free the caches (the model's attention sites go back to uncached)."""
        self.model.clear_cache()

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, last_only: bool) -> torch.Tensor:
        model = self.model
        ctx = SlotContext(position_ids)
        if model.loss_head is not None:
            hidden = model.forward_hidden(*model.graph_args(dict(input_ids=input_ids, position_ids=position_ids)), ctx)
            return model.head_logits(hidden[:, -1:] if last_only else hidden)
        return model.run_graph(ctx, input_ids=input_ids, position_ids=position_ids)[0]

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int] | torch.Tensor, start: int = 0) -> torch.Tensor:
        """Write `ids` into `slot` at positions start .. start + len - 1 (0: a new sequence; the slot's length
        so far: extend it) and return the logits [V] after the last one."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.model.device).reshape(1, -1)  # [1, T]
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside 0 .. {self.slots - 1}")
        if ids.shape[1] == 0 or start < 0 or start + ids.shape[1] > self.max_len:
            raise ValueError(
                f"prefill of {ids.shape[1]} tokens from position {start} does not fit the cache's {self.max_len}"
            )
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None, :]  # [1, T]
        self.rows.lo, self.rows.hi = slot, slot + 1
        return self._run(ids, positions, last_only=True)[0, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for slots 0 .. n - 1: `tokens` [n] at `positions` [n] (each slot's next position;
        a free slot's row may hold anything below max_len). Returns the logits [n, V]."""
        n = tokens.shape[0]
        if not 0 < n <= self.slots or int(positions.max()) >= self.max_len:
            raise ValueError(f"step over {n} slots at positions up to {int(positions.max())} does not fit the cache")
        self.rows.lo, self.rows.hi = 0, n
        return self._run(tokens[:, None], positions[:, None], last_only=False)[:, -1]
