"""The decode step of `generate` captured in a CUDA graph and replayed once per token.

A decode step reads and writes only tensors whose shapes and addresses never change while generating:

* inputs, copied in before each replay: token ids [B, 1], position ids [B, 1], the cache slot [1]
  (also the query's absolute position), and for sampling float32 Exp(1) noise [B, V];
* the key mask [B, S_max] (real token or left padding; the slots not yet generated are True and hidden
  by the causal mask, so it is constant while decoding) and every attention site's KV cache
  [B, H_kv, S_max, D], allocated by the prefill before anything is captured;
* outputs: the logits [B, 1, V] and the picked token [B].

Inside the step nothing depends on the data on the host side: the masks are tensor ops on these buffers
(`AttentionContext.mask`), the cache write is an `index_copy_` at the slot tensor, no `.item()`, no
data-dependent branch, the same allocations every step. So the whole step, token choice included,
replays from one graph: greedy is an argmax; sampling is `argmax(probs / q)` with q ~ Exp(1), the
Gumbel-max form `torch.multinomial(probs, 1)` itself computes, with q drawn outside the graph from the
caller's generator, so sampled tokens equal the eager path's for the same seed.

`CUDAGraphDecoder(..., graph=False)` (and the fallback when CUDA is missing or the capture fails) runs
the very same buffer logic eagerly. A captured decoder is kept per model (weakly) and reused by the next
`generate` of the same batch, total length and sampling settings; `release(model)` frees it.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .attention import cache_sites

# model -> its last decoder, with the key it was made for; a weak key, so a collected model frees it
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pick_tokens(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_k, top_p) -> torch.Tensor:
    """[B, T, V] logits -> [B] next tokens: greedy without noise, else Gumbel-max sampling with Exp(1) noise."""
    scores = logits[:, -1, :].float()  # [B, V]
    if noise is None:
        return scores.argmax(dim=-1)
    from .generation import _warp

    probs = _warp(scores, temperature, top_k, top_p).softmax(dim=-1)
    return probs.div(noise).argmax(dim=-1)  # = torch.multinomial(probs, 1) for the same Exp(1) draws


class CUDAGraphDecoder:
    """One decode step over static buffers, replayed from a CUDA graph (or run eagerly, same buffers).

    Build it after the prefill (which allocates the KV caches), then call `step(token, pos, t)` once per
    token: it copies the inputs into the static buffers, replays (or runs) the step and returns the
    next token [B]. `graph=False` runs eagerly; `graph=True` captures, and falls back to eager with a
    warning when CUDA is unavailable or the capture fails. `replays` counts graph replays, `steps` all steps.
    """

    def __init__(
        self,
        model,
        key_mask: torch.Tensor,
        vocab_size: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        graph: bool = True,
        warmup: int = 2,
    ):
        batch, max_len = key_mask.shape  # [B, S_max]
        sites = cache_sites(model)
        caches = [m.kv_cache for m in sites]
        if any(c is None or c.k is None or c.batch != batch or c.max_len != max_len for c in caches):
            raise ValueError(
                f"the KV caches must be set up for [{batch}, {max_len}] and filled by the prefill "
                "before a decoder is built (decode_step allocates them at the first call)"
            )
        device = key_mask.device
        self._model = weakref.ref(model)  # the weights stay the model's; the graph only holds their addresses
        self.sites = sites
        self.caches = caches
        self.batch, self.max_len, self.vocab_size = batch, max_len, vocab_size
        self.sampling = (temperature, top_k, top_p) if do_sample else None
        self.generator = generator
        # ---- static inputs and outputs ----
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)  # [1]
        self.key_mask = key_mask.to(torch.bool).clone()  # [B, S_max]
        self.noise = torch.ones(batch, vocab_size, dtype=torch.float32, device=device) if do_sample else None
        self.next_token = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.logits: torch.Tensor | None = None  # [B, 1, V], written by every step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        self.replays = 0
        if graph:
            self._capture(warmup)

    # ---- the step ------------------------------------------------------------------------------
    def _run(self) -> None:
        """The captured body: decode one token from the static inputs into the static outputs."""
        model = self._model()
        with torch.no_grad():
            logits = model.decode_step(self.input_ids, self.position_ids, self.key_mask, self.cache_position)
            temperature, top_k, top_p = self.sampling or (1.0, None, None)
            self.next_token.copy_(_pick_tokens(logits, self.noise, temperature, top_k, top_p))
        self.logits = logits

    def _capture(self, warmup: int) -> None:
        device = self.key_mask.device
        if device.type != "cuda" or not torch.cuda.is_available():
            warnings.warn(f"CUDA graphs need a CUDA device (the model is on {device}); decoding eagerly", stacklevel=3)
            return
        # warm-up and capture write a throwaway k/v into the last slot, which no step reads: a step at
        # slot t reads slots <= t, and the last token (slot S_max - 1) is never fed back
        self.cache_position.fill_(self.max_len - 1)
        stream = torch.cuda.current_stream(device)
        pool = None
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):  # compiles the Triton kernels, picks the cuBLAS algorithms
                    self._run()
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._run()
        except Exception as e:  # any failure means: decode eagerly
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
            if pool is not None:  # and may leave the allocator routing that stream's allocations to the pool
                try:
                    torch._C._cuda_endAllocateToPool(stream.device_index, pool)
                    torch._C._cuda_releasePool(stream.device_index, pool)
                except Exception:  # already ended, or another torch version: nothing to undo
                    pass
            warnings.warn(
                f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); decoding eagerly",
                stacklevel=3,
            )
            self.logits = None
            return
        self.graph = graph

    def step(self, token: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        """Decode token [B, 1] at positions pos [B, 1] into cache slot t; return the next token [B] (a copy)."""
        self.input_ids.copy_(token.reshape(self.batch, 1))
        self.position_ids.copy_(pos.reshape(self.batch, 1))
        self.cache_position.fill_(t)
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)  # outside the graph: the caller's generator
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
        else:
            self._run()
        self.steps += 1
        return self.next_token.clone()

    # ---- reuse across generate calls -------------------------------------------------------------
    def install(self, key_mask: torch.Tensor, generator: torch.Generator | None) -> None:
        """Give the model this decoder's KV caches and take the new call's key mask and generator."""
        for m, c in zip(self.sites, self.caches):
            m.kv_cache = c
        self.key_mask.copy_(key_mask)
        self.generator = generator


def _reuse_key(model, key_mask: torch.Tensor, sampling) -> tuple:
    """Everything a captured step depends on besides its buffers: shapes, settings and weight addresses."""
    tensors = [*model.parameters(), *model.buffers()]
    return (
        tuple(key_mask.shape),
        key_mask.device,
        sampling,
        torch.is_autocast_enabled(key_mask.device.type),
        tuple((t.data_ptr(), t.dtype) for t in tensors),
    )


def reuse(
    model,
    key_mask: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator=None,
) -> CUDAGraphDecoder | None:
    """The model's kept decoder, its KV caches installed, when it fits this call; else None."""
    entry = _DECODERS.get(model)
    if entry is None:
        return None
    key, decoder = entry
    if key != _reuse_key(model, key_mask, (temperature, top_k, top_p) if do_sample else None):
        release(model)
        return None
    decoder.install(key_mask, generator)
    return decoder


def keep(model, decoder: CUDAGraphDecoder) -> None:
    """Keep `decoder` (and its KV caches) for the next `generate` of `model`."""
    _DECODERS[model] = (_reuse_key(model, decoder.key_mask, decoder.sampling), decoder)


def decoder_of(model) -> CUDAGraphDecoder | None:
    """The decoder kept for `model`, if any."""
    entry = _DECODERS.get(model)
    return entry[1] if entry else None


def release(model) -> None:
    """Free the graph and KV caches kept for `model`."""
    _DECODERS.pop(model, None)
