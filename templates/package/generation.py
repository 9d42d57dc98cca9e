"""Token generation over a static KV cache: greedy or sampled, batched with left padding.

Shapes stay fixed from step to step (the cache is allocated for prompt + max_new_tokens), so the
decode step is captured in a CUDA graph and replayed per token on CUDA (cuda_graphs.py). Greedy
decoding equals Hugging Face's.
"""

from __future__ import annotations

import torch


def _warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in Hugging Face's order and with its tie rules."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[..., -1:].fill_(False)  # always keep the most likely token (fill_: no host tensor, graph-safe)
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    """[B, T, V] logits -> [B] next tokens, from the last position."""
    scores = logits[:, -1, :].float()  # [B, V]
    if do_sample:
        probs = _warp(scores, temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=None, top_p=None,
             eos_token_id=None, attention_mask=None, pad_token_id=None, generator=None, streamer=None,
             cuda_graph=None):
    """Return [B, T + n] token ids (n <= max_new_tokens: stops early once every row hit EOS).

    cuda_graph: replay the decode steps from a CUDA graph (cuda_graphs.py); None: when the model is on
    CUDA, False: never, True: always (with a warning and eager steps where CUDA is unavailable). The
    graph and its KV caches are kept for the next call of the same shapes: `cuda_graphs.release(model)`.
    """
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total = prompt_len + max_new_tokens
    eos = torch.as_tensor(eos_token_id if eos_token_id is not None else [], device=device).reshape(-1)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)

    key_mask = torch.ones(batch, total, dtype=torch.bool, device=device)  # [B, S_max]
    if attention_mask is not None:
        key_mask[:, :prompt_len] = attention_mask.bool()
    prompt_mask = key_mask[:, :prompt_len]
    position_ids = (prompt_mask.long().cumsum(-1) - 1).masked_fill(~prompt_mask, 0)  # [B, T]
    tokens = torch.full((batch, total), pad, dtype=input_ids.dtype, device=device)
    tokens[:, :prompt_len] = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    if cuda_graph is None:
        cuda_graph = input_ids.is_cuda and not torch.cuda.is_current_stream_capturing()
    cuda_graph = cuda_graph and max_new_tokens > 1
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    decoder = None
    if cuda_graph:
        from . import cuda_graphs

        decoder = cuda_graphs.reuse(model, key_mask, **sampling, generator=generator)  # its KV caches installed
    if decoder is None:
        model.setup_cache(batch, total)
    try:
        logits = model.decode_step(input_ids, position_ids, key_mask, torch.arange(prompt_len, device=device),
                                   last_only=True)
        if cuda_graph and decoder is None:  # after the prefill: the KV caches exist before the capture
            decoder = cuda_graphs.CUDAGraphDecoder(model, key_mask, logits.shape[-1], **sampling, generator=generator)
            if decoder.graph is not None:
                cuda_graphs.keep(model, decoder)  # for the next call of the same shapes and settings
        next_token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
        next_pos = position_ids[:, -1:] + 1  # [B, 1]
        end = total
        for t in range(prompt_len, total):
            if eos.numel():
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished |= torch.isin(next_token, eos)
            tokens[:, t] = next_token
            if streamer is not None:
                streamer(next_token)
            if t == total - 1 or (eos.numel() and bool(finished.all())):
                end = t + 1
                break
            if decoder is not None:
                next_token = decoder.step(next_token[:, None], next_pos, t)
            else:
                cache_position = torch.tensor([t], device=device)
                logits = model.decode_step(next_token[:, None], next_pos, key_mask, cache_position)
                next_token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            next_pos = next_pos + 1
        return tokens[:, :end]
    finally:
        model.clear_cache()
        model.train(was_training)
