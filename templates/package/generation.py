"""Token generation over a static KV cache: greedy or sampled, batched with left padding.

Shapes stay fixed from step to step (the cache is allocated for prompt + max_new_tokens), so the
decode step is captured in a CUDA graph and replayed per token on CUDA (cuda_graphs.py). Greedy
decoding equals Hugging Face's.
"""

from __future__ import annotations

import math
import numbers

import torch

# config fields that give a model's context length, in the order they are looked for
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def vocab_size(model) -> int | None:
    """Rows of the input embedding (the ids a model can read), else config.vocab_size; None when unknown."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if _is_int(value) else None


def context_length(model) -> tuple[str, int] | None:
    """(config field, value) of the longest sequence the model takes, or None when its config names none."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if _is_int(value) and value > 0:
            return name, int(value)
    return None


def _token_ids(name: str, value, vocab: int | None) -> list[int]:
    """An int, a list of ints or an integer tensor of token ids, each checked against the vocabulary."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(
                f"{name} must be a token id or a list of them, got a {value.dtype} tensor of shape {list(value.shape)}"
            )
        ids = value.reshape(-1).tolist()
    elif _is_int(value):
        ids = [value]
    elif isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        ids = list(value)
    else:
        raise ValueError(f"{name} must be a token id (int) or a list of them, got {value!r}")
    for i in ids:
        if i < 0 or (vocab is not None and i >= vocab):
            raise ValueError(f"{name} {i} is outside the model's vocabulary (ids 0..{(vocab or 0) - 1})")
    return [int(i) for i in ids]


def check_inputs(
    model,
    input_ids,
    max_new_tokens,
    do_sample,
    temperature,
    top_k,
    top_p,
    eos_token_id,
    attention_mask,
    pad_token_id,
    generator,
    streamer,
    cuda_graph,
) -> None:
    """Refuse what generate() cannot use, before anything is allocated, with the argument's name and the fix."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"input_ids must be a torch tensor of token ids [batch, length], got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be [batch, length], got shape {list(input_ids.shape)} "
            "(add a batch dimension: input_ids[None])"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): give at least one token per row")
    vocab = vocab_size(model)
    low, high = int(input_ids.min()), int(input_ids.max())
    for i in (low, high):
        if i < 0 or (vocab is not None and i >= vocab):
            raise ValueError(
                f"input_ids holds token id {i}, outside the model's vocabulary (ids 0..{(vocab or 0) - 1})"
            )
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    context = context_length(model)
    total = input_ids.shape[1] + max_new_tokens
    if context is not None and total > context[1]:
        raise ValueError(
            f"the prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens is past "
            f"the model's context, {context[0]}={context[1]}: shorten the prompt or lower max_new_tokens"
        )
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if do_sample and temperature == 0:
        raise ValueError(
            "temperature=0 with do_sample=True divides the logits by zero: for greedy decoding use "
            "do_sample=False, else give a temperature > 0"
        )
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0: no top-k), got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if eos_token_id is not None:
        _token_ids("eos_token_id", eos_token_id, vocab)
    if pad_token_id is not None:
        if not _is_int(pad_token_id):
            raise ValueError(f"pad_token_id must be a token id (int), got {pad_token_id!r}")
        _token_ids("pad_token_id", pad_token_id, vocab)
    if attention_mask is not None:
        _check_mask(attention_mask, input_ids)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != input_ids.device.type:
            raise ValueError(
                f"generator is on {generator.device}, input_ids on {input_ids.device}: make the "
                f"generator with torch.Generator(device={str(input_ids.device)!r})"
            )
    if streamer is not None and not callable(streamer):
        raise ValueError(f"streamer must be a callable taking each step's [batch] tokens, got {streamer!r}")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")


def _check_mask(mask, input_ids) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor [batch, length] of 0/1, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {list(mask.shape)}, input_ids {list(input_ids.shape)}: they must be equal"
        )
    if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 or 1 only (1: a token, 0: left padding)")
    keep = mask.bool()
    if not bool(keep.any(dim=1).all()):
        row = int((~keep.any(dim=1)).nonzero()[0])
        raise ValueError(f"attention_mask row {row} masks every token: each row needs at least one")
    if not bool((keep.long().cummax(dim=1).values == keep.long()).all()):
        row = int((keep.long().cummax(dim=1).values != keep.long()).any(dim=1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} has padding after a token: generate() takes left padding only "
            "(pad on the left, as tokenizer(..., padding_side='left') does)"
        )


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
def generate(
    model,
    input_ids,
    max_new_tokens=20,
    do_sample=False,
    temperature=1.0,
    top_k=None,
    top_p=None,
    eos_token_id=None,
    attention_mask=None,
    pad_token_id=None,
    generator=None,
    streamer=None,
    cuda_graph=None,
):
    """Return [B, T + n] token ids (n <= max_new_tokens: stops early once every row hit EOS).

    cuda_graph: replay the decode steps from a CUDA graph (cuda_graphs.py); None: when the model is on
    CUDA, False: never, True: always (with a warning and eager steps where CUDA is unavailable). The
    graph and its KV caches are kept for the next call of the same shapes: `cuda_graphs.release(model)`.

    Every argument is checked first (ids inside the vocabulary, prompt + max_new_tokens within the context the
    config names, temperature > 0 when sampling, a left-padded 0/1 mask of input_ids' shape): a ValueError names it.
    """
    check_inputs(
        model,
        input_ids,
        max_new_tokens,
        do_sample,
        temperature,
        top_k,
        top_p,
        eos_token_id,
        attention_mask,
        pad_token_id,
        generator,
        streamer,
        cuda_graph,
    )
    temperature = float(temperature)
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
        logits = model.decode_step(
            input_ids, position_ids, key_mask, torch.arange(prompt_len, device=device), last_only=True
        )
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
