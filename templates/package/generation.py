"""Token generation over a static KV cache: greedy or sampled, batched with left padding.

Shapes stay fixed from step to step (the cache is allocated for prompt + max_new_tokens), so the
decode step is captured in a CUDA graph and replayed per token on CUDA (cuda_graphs.py). Greedy
decoding equals Hugging Face's. `GenerationConfig` holds the defaults (generation_config.json, else the
model config's special tokens); `generate` takes Hugging Face's argument names, refusing the ones whose
feature it does not implement (beam search, logits processors...) unless they hold their no-op value.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path

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


# ---- GenerationConfig ---------------------------------------------------------------------------------------

# the fields generate() reads, with their defaults when neither the call nor the config sets them (HF's)
GENERATION_DEFAULTS = {
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "max_new_tokens": None,  # neither this nor max_length: 20 new tokens, capped at the model's context (as HF)
    "max_length": None,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}
# Hugging Face options generate() does not implement, at the value that makes each a no-op (HF's defaults)
NO_OP_OPTIONS = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "diversity_penalty": 0.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "early_stopping": False,
    "use_cache": True,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    # only read with an assistant model, which generate() never has
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
    "assistant_lookbehind": 10,
    "target_lookbehind": 10,
}
# HF generate() arguments that are objects or callables: refused unless None (or an empty list)
NO_OP_OBJECTS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "stop_strings",
    "tokenizer",
    "max_time",
    "bad_words_ids",
    "force_words_ids",
    "constraints",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "min_p",
    "top_h",
    "watermarking_config",
    "assistant_early_exit",
    "prompt_lookup_num_tokens",
    "guidance_scale",
    "penalty_alpha",
    "dola_layers",
    "cache_implementation",
    "cache_config",
)
HF_TARGET = "build the model with `dslc build --target hf` for transformers' whole generate() API"


def _no_op(name: str, value) -> bool:
    if value is None:
        return True
    if name in NO_OP_OPTIONS:
        return value == NO_OP_OPTIONS[name]
    return isinstance(value, (list, tuple)) and not value  # an empty LogitsProcessorList / StoppingCriteriaList


def unsupported(options: dict, source: str) -> list[str]:
    """`name=value (source)` for each option generate() does not implement and that is not at its no-op value."""
    out = []
    for name, value in options.items():
        if (name in NO_OP_OPTIONS or name in NO_OP_OBJECTS) and not _no_op(name, value):
            out.append(f"{name}={value!r}" + (f" ({source})" if source else ""))
    return out


class GenerationConfig:
    """The defaults of `generate()`, by Hugging Face's field names (see GENERATION_DEFAULTS); None: not set.

    Built from the model config's special tokens (`from_model_config`), replaced by the folder's
    generation_config.json when there is one (`from_pretrained`), written by `save_pretrained`. Keys it does
    not use are kept in `extra` and written back. `to_dict()` gives the set fields, as HF's `to_diff_dict`."""

    def __init__(self, **kwargs):
        for name in GENERATION_DEFAULTS:
            setattr(self, name, kwargs.pop(name, None))
        self.extra = kwargs
        problem = self.validate()
        if problem:
            raise ValueError(f"GenerationConfig: {problem}")

    def __repr__(self) -> str:
        return f"GenerationConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update({n: getattr(self, n) for n in GENERATION_DEFAULTS if getattr(self, n) is not None})
        return out

    def validate(self) -> str | None:
        """What is wrong with a field's type or range (`key`: why), or None."""
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
                kind = "a token id (int >= 0) or a list of them" if name == "eos_token_id" else "a token id (int >= 0)"
                return f"`{name}` must be {kind}, got {value!r}"
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                return f"`{name}` must be an int >= 1, got {value!r}"
        checks = {
            "do_sample": (lambda v: isinstance(v, bool), "true or false"),
            "temperature": (lambda v: _is_real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
            "top_k": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: no top-k)"),
            "top_p": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
        }
        for name, (ok, kind) in checks.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                return f"`{name}` must be {kind}, got {value!r}"
        return None

    @classmethod
    def from_dict(cls, data: dict) -> GenerationConfig:
        return cls(**data)

    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        """The special tokens the model config names (bos/eos/pad_token_id), as HF's `from_model_config`."""
        data = config.to_dict() if hasattr(config, "to_dict") else {}
        # a malformed id is left out here: generate() reads it from the config and refuses it, naming it
        ids = {k: data[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(k) is not None}
        return cls(**{k: v for k, v in ids.items() if cls._fits(k, v)})

    @classmethod
    def _fits(cls, name: str, value) -> bool:
        try:
            cls(**{name: value})
        except ValueError:
            return False
        return True

    @classmethod
    def from_pretrained(cls, folder, error=ValueError) -> GenerationConfig:
        """Read `folder/generation_config.json`; a malformed file or field is `error` naming the file and the key."""
        path = Path(folder) / "generation_config.json"
        if not path.is_file():  # never opens a FIFO or a device
            raise error(f"{path} is not a regular file" if path.exists() else f"no generation_config.json in {folder}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:
            raise error(f"{path}: JSON nested too deeply") from None
        except (ValueError, OSError) as e:
            raise error(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise error(f"{path}: must be a JSON object of keys and values, got {type(data).__name__}")
        try:
            return cls(**data)
        except ValueError as e:
            raise error(f"{path}: {str(e).removeprefix('GenerationConfig: ')}") from None

    def save_pretrained(self, folder) -> None:
        path = Path(folder) / "generation_config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _options_of(generation_config) -> dict:
    """A generation config's set fields: ours, Hugging Face's (its to_dict()), or a plain dict."""
    if isinstance(generation_config, GenerationConfig):
        return generation_config.to_dict()
    if isinstance(generation_config, dict):
        data = dict(generation_config)
    elif callable(getattr(generation_config, "to_dict", None)):
        data = generation_config.to_dict()
    else:
        raise ValueError(
            f"generation_config must be a GenerationConfig (this package's or transformers'), or a dict, got "
            f"{type(generation_config).__name__}"
        )
    # HF's bookkeeping keys, and fields it leaves unset (None)
    return {k: v for k, v in data.items() if v is not None and not k.startswith("_") and k != "transformers_version"}


def resolve_options(model, input_len: int, generation_config=None, **kwargs) -> dict:
    """generate()'s settings: each keyword argument that is not None, else the `generation_config` passed, else the
    model's `generation_config` (its generation_config.json, or its config's special tokens), else the model
    config's eos/pad_token_id, else HF's defaults. Options generate() does not implement are refused at any
    value but their no-op one (a ValueError naming them); unknown keywords are a TypeError."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(
        k for k in given if k not in GENERATION_DEFAULTS and k not in NO_OP_OPTIONS and k not in NO_OP_OBJECTS
    )
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)} ({HF_TARGET})")
    passed = _options_of(generation_config) if generation_config is not None else {}
    stored = getattr(model, "generation_config", None)
    stored = stored.to_dict() if isinstance(stored, GenerationConfig) else {}
    refused = unsupported(given, "") + unsupported(passed, "in generation_config")
    if refused:
        raise ValueError(f"generate() does not implement {', '.join(refused)}: {HF_TARGET}")
    ignored = unsupported(stored, "")
    if ignored:  # a checkpoint's generation_config.json (Qwen2-Instruct's repetition_penalty=1.05): not an error
        warnings.warn(
            f"generate() ignores {', '.join(ignored)} of model.generation_config (not implemented here; {HF_TARGET})",
            stacklevel=3,
        )
    model_config = getattr(model, "config", None)
    model_config = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
    out = {}
    for name, default in GENERATION_DEFAULTS.items():
        for source in (given, passed, stored, model_config if name in ("eos_token_id", "pad_token_id") else {}):
            if source.get(name) is not None:
                out[name] = source[name]
                break
        else:
            out[name] = default
    max_length = out.pop("max_length")
    if out["max_new_tokens"] is None:  # max_new_tokens wins over max_length, whichever source set each (as HF)
        out["max_new_tokens"] = _new_tokens(model, input_len, max_length)
    del out["bos_token_id"]
    return out


def _new_tokens(model, input_len: int, max_length):
    """max_new_tokens from max_length (prompt + new tokens); without either, 20 capped at the context (as HF)."""
    if max_length is None:
        context = context_length(model)
        return max(1, min(20, context[1] - input_len)) if context is not None else 20
    if not _is_int(max_length) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    if max_length <= input_len:
        raise ValueError(
            f"max_length={max_length} (prompt + new tokens) leaves no room after the prompt's {input_len} tokens: "
            "raise it, or give max_new_tokens"
        )
    return max_length - input_len


def _hf_streamer(streamer) -> bool:
    """Whether `streamer` follows Hugging Face's protocol (put the prompt, then each step's tokens; end)."""
    return callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))


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
    if streamer is not None and not callable(streamer) and not _hf_streamer(streamer):
        raise ValueError(
            "streamer must be a callable taking each step's [batch] tokens, or a Hugging Face streamer (with "
            f"put() and end(), as TextStreamer), got {streamer!r}"
        )
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
    generation_config=None,
    streamer=None,
    attention_mask=None,
    generator=None,
    cuda_graph=None,
    **kwargs,
):
    """Return [B, T + n] token ids (n <= max_new_tokens: stops early once every row hit EOS).

    Settings (max_new_tokens or max_length, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id) come
    from the keyword arguments, else `generation_config` (this package's or transformers'), else
    `model.generation_config`, else the model config's eos/pad_token_id, else HF's defaults (20 new tokens, greedy;
    when sampling temperature 1, top_k 50, top_p 1): `resolve_options`. HF options that only have a no-op value here
    (num_beams=1, repetition_penalty=1.0, use_cache=True...) are accepted at it and refused at any other.

    streamer: a callable given each step's [batch] tokens, or a Hugging Face streamer (TextStreamer...):
    `put(prompt_ids)`, then `put(tokens)` per step (on the CPU), then `end()`.
    cuda_graph: replay the decode steps from a CUDA graph (cuda_graphs.py); None: when the model is on
    CUDA, False: never, True: always (with a warning and eager steps where CUDA is unavailable). The
    graph and its KV caches are kept for the next call of the same shapes: `cuda_graphs.release(model)`.

    Every argument is checked first (ids inside the vocabulary, prompt + max_new_tokens within the context the
    config names, temperature > 0 when sampling, a left-padded 0/1 mask of input_ids' shape): a ValueError names it.
    """
    if input_ids is None:
        raise ValueError("generate() needs input_ids (the prompt's token ids [batch, length])")
    input_len = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else 0
    options = resolve_options(model, input_len, generation_config, **kwargs)
    max_new_tokens, do_sample = options["max_new_tokens"], options["do_sample"]
    temperature, top_k, top_p = options["temperature"], options["top_k"], options["top_p"]
    eos_token_id, pad_token_id = options["eos_token_id"], options["pad_token_id"]
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
    if not do_sample:  # greedy reads no sampling setting (and the CUDA graph kept for greedy is reused)
        temperature, top_k, top_p = 1.0, None, None
    hf_streamer = _hf_streamer(streamer)
    if hf_streamer:
        streamer.put(input_ids.cpu())
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
    if cuda_graph and not model.graph_capturable:
        raise ValueError(
            f"cuda_graph=True: {type(model).__name__}'s forward reads sizes on the host (each expert's token count), "
            "which a CUDA graph cannot capture; generate with cuda_graph=False"
        )
    if cuda_graph is None:
        cuda_graph = input_ids.is_cuda and not torch.cuda.is_current_stream_capturing() and model.graph_capturable
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
        # A config with a top-level original_max_position_embeddings (Phi-3's longrope) switches rotary factors
        # once the sequence passes it: as transformers' Phi-3 does, the step that reaches original + 1 tokens
        # recomputes the whole sequence instead of reading the cache (once, when the prompt was shorter).
        original = getattr(model.config, "original_max_position_embeddings", None)
        rebuild_at = original if isinstance(original, int) and prompt_len <= original else -1
        end = total
        for t in range(prompt_len, total):
            if eos.numel():
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished |= torch.isin(next_token, eos)
            tokens[:, t] = next_token
            if hf_streamer:
                streamer.put(next_token.cpu())
            elif streamer is not None:
                streamer(next_token)
            if t == total - 1 or (eos.numel() and bool(finished.all())):
                end = t + 1
                break
            if t == rebuild_at:  # the cache's keys were rotated for the short context: recompute them all
                mask = key_mask[:, : t + 1]
                logits = model.decode_step(
                    tokens[:, : t + 1],
                    (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0),
                    key_mask,
                    torch.arange(t + 1, device=device),
                    last_only=True,
                )
                next_token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            elif decoder is not None:
                next_token = decoder.step(next_token[:, None], next_pos, t)
            else:
                cache_position = torch.tensor([t], device=device)
                logits = model.decode_step(next_token[:, None], next_pos, key_mask, cache_position)
                next_token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            next_pos = next_pos + 1
        if hf_streamer:
            streamer.end()
        return tokens[:, :end]
    finally:
        model.clear_cache()
        model.train(was_training)
