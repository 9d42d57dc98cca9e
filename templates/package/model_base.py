"""What every generated top-level model shares: the Hugging Face-style forward, loading, saving,
weight tying, KV caches, activation checkpointing and generation.

The generated class sets `config_class`, `task`, `graph_inputs`, `layout_rules`, `ignored_keys`,
`tp_plan`, and implements `forward_graph(*graph_inputs, ctx)`, the spec's own forward.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from .attention import AttentionContext, KVCache, cache_sites
from .checkpoint import CheckpointError, CheckpointReader, bind_rules, read_state, write_shards, write_state
from .generation import GenerationConfig
from .losses import (
    AUX_LOSSES,
    LOSS_PROBLEM_TYPES,
    causal_lm_loss,
    fused_causal_lm_losses,
    masked_lm_loss,
    sequence_classification_loss,
)
from .moe import RouterRecorder, load_balancing_loss
from .outputs import output_class

LOSSES = {
    "causal_lm": causal_lm_loss,
    "masked_lm": masked_lm_loss,
    "sequence_classification": sequence_classification_loss,
    "image_classification": sequence_classification_loss,  # HF's ForImageClassification loss is the same
}
CLASSIFIERS = ("sequence_classification", "image_classification")  # their loss follows config.problem_type
# the `loss_type` HF Trainer reads to count `num_items_in_batch` (over labels[..., 1:] for a causal LM)
LOSS_TYPES = {
    "causal_lm": "ForCausalLM",
    "masked_lm": "ForMaskedLM",
    "sequence_classification": "ForSequenceClassification",
    "image_classification": "ForImageClassification",
}
KNOWN_INPUTS = ("input_ids", "position_ids", "token_type_ids")  # what forward() makes or takes by these names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# `save_activations` op kinds -> the aten ops whose outputs a checkpointed block keeps (selective checkpointing)
SAVE_OPS = {
    "linear": ("mm", "addmm", "bmm", "baddbmm"),
    "attention": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math",
        "flex_attention",
    ),
}


class Remat:
    """How a stack owner's checkpointed blocks recompute (set by `activation_checkpointing_enable`): blocks
    marked `_dslc_recompute = False` run normally (every_n_layers), `save` names op kinds (SAVE_OPS) kept
    rather than recomputed, `offload` moves the saved block inputs to CPU memory."""

    def __init__(self, save: tuple[str, ...] = (), offload: bool = False):
        self.save = tuple(save)
        self.offload = offload
        ops = [getattr(torch.ops.aten, n, None) for kind in self.save for n in SAVE_OPS[kind]]
        self.kept = [op.default for op in ops if op is not None and hasattr(op, "default")]
        # torch.utils.checkpoint's selective contexts: the outputs of the kept ops are saved, the rest recomputed
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        self.context_fn = functools.partial(create_selective_checkpoint_contexts, self.kept)

    def __bool__(self) -> bool:
        return True


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant_tensor(values, dtype: torch.dtype, device) -> torch.Tensor:
    """The spec's `constant(values, dtype)`: a [len(values)] tensor, made once per (values, dtype, device) and
    reused, so a forward after the first copies nothing from the host (CUDA graphs replay it). A list of one
    repeated value is made on the device."""
    key = (tuple(values), dtype, torch.device(device))
    found = _CONSTANTS.get(key)
    if found is None:
        if len(set(key[0])) == 1:
            found = torch.full((len(key[0]),), key[0][0], dtype=dtype, device=device)
        else:
            found = torch.tensor(key[0], dtype=dtype, device=device)
        _CONSTANTS[key] = found
    return found


def checkpoint_call(module, enabled, *args):
    """Call `module(*args)`, recomputing its activations in backward when `enabled` (True, or a `Remat`) and the
    module is not one `activation_checkpointing_enable(every_n_layers=...)` left out."""
    if not enabled or not getattr(module, "_dslc_recompute", True):
        return module(*args)
    from torch.utils.checkpoint import checkpoint

    if not isinstance(enabled, Remat) or not (enabled.save or enabled.offload):
        return checkpoint(module, *args, use_reentrant=False)
    kwargs = {"context_fn": enabled.context_fn} if enabled.save else {}
    if enabled.offload:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return checkpoint(module, *args, use_reentrant=False, **kwargs)


class FusedWeights(NamedTuple):
    """Projections of one input (q/k/v, gate/up) concatenated for one matmul, after `fuse_projections()`.

    The parts keep their own Parameters (their names, for state dicts, PEFT and optimizers); those are views
    into `weight` / `bias`, so an in-place update of a part updates the fused tensor too. `sources` remembers
    each part's class and parameters: a part that was wrapped, swapped, hooked or given new parameters since
    no longer matches, and the forward falls back to calling the parts one by one."""

    weight: torch.Tensor  # [sum(out_features), in_features]
    bias: torch.Tensor | None  # [sum(out_features)]
    sizes: list[int]  # out_features per part, in order
    sources: tuple  # per part: (class, weight, bias) when fused


def _still_fused(fused: FusedWeights, parts) -> bool:
    if torch.is_grad_enabled() and any(w.requires_grad for _, w, _ in fused.sources):
        return False  # training: each part gets its own gradient through its own forward
    for part, (cls, weight, bias) in zip(parts, fused.sources):
        if type(part) is not cls or part._forward_hooks or part._forward_pre_hooks:
            return False
        if part.weight is not weight or part.bias is not bias:
            return False
    return True


def fused_linear(x, fused: FusedWeights | None, *parts):
    """The projections `parts` of x: one matmul when they were fused at load time and every part is still the
    plain layer it was (no PEFT wrapper, hook, swapped module or new weight; not training), else one call each."""
    if fused is not None and not _global_hooks() and _still_fused(fused, parts):
        return F.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=-1)
    return tuple(p(x) for p in parts)


def _global_hooks() -> bool:
    """Whether global module hooks (`nn.modules.module.register_module_forward_hook`) are set: they must fire."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class PreTrainedModel(nn.Module):
    config_class = None
    task = "base"
    graph_inputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ("logits",)
    layout_rules: list[dict] = []
    ignored_keys: list[str] = []
    tp_plan: dict[str, str] = {}
    remat_save: tuple[str, ...] = ()  # the spec's `save_activations` op kinds (SAVE_OPS)
    loss_head: tuple[str, str, str | None] | None = None  # (submodule, weight, bias) of a Linear-like head
    router_pattern: str | None = None  # the spec's `router` line: the submodules whose outputs are router logits
    losses: tuple[str, ...] = ()  # the spec's `loss` lines' kinds (none: the task's own loss)
    graph_capturable: bool = True  # False: a forward reads sizes on the host (MoE), so no CUDA-graph decoding
    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        # generate()'s defaults: the config's special tokens; from_pretrained reads generation_config.json over it
        self.generation_config = GenerationConfig.from_model_config(config) if self.can_generate() else None

    @property
    def loss_type(self) -> str | None:
        return LOSS_TYPES.get(self.task)

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (HF's `model.device`); cpu for a model without parameters."""
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter (HF's `model.dtype`); float32 when there is none."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @classmethod
    def can_generate(cls) -> bool:
        """Whether `generate()` applies: causal language models (their forward gives next-token logits)."""
        return cls.task == "causal_lm"

    # ---- weights -------------------------------------------------------------------------------
    def tied_parameters(self) -> dict[str, str]:
        """Full name of each tied parameter -> the parameter it shares storage with."""
        out = {}
        for prefix, module in self.named_modules():
            for target, source in getattr(module, "tied", {}).items():
                p = f"{prefix}." if prefix else ""
                out[p + target] = p + source
        return out

    def tie_weights(self) -> None:
        for target, source in self.tied_parameters().items():
            owner, _, leaf = target.rpartition(".")
            setattr(self.get_submodule(owner) if owner else self, leaf, self.get_parameter(source))

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Like nn.Module's, without the second name of a tied weight (as HF's safetensors files),
        so `safetensors.torch.save_file(model.state_dict())` (what HF Trainer does) works."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for target in self.tied_parameters():
            state.pop(prefix + target, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts state dicts with or without the tied copies."""
        state = dict(state_dict)
        for target, source in self.tied_parameters().items():
            if target not in state and source in state:
                state[target] = state[source]
        result = super().load_state_dict(state, strict=strict, assign=assign)
        if assign:
            self.tie_weights()
        return result

    def parameter_shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self.named_parameters(remove_duplicate=False)}

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count, shared (tied) tensors once; HF Trainer calls it with exclude_embeddings=True."""
        skip = set()
        if exclude_embeddings:
            skip = {
                id(p) for m in self.modules() if type(m).__name__ == "Embedding" for p in m.parameters(recurse=False)
            }
        return sum(
            p.numel() for p in self.parameters() if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    def get_input_embeddings(self):
        found = self._input_embedding_name()
        return self.get_submodule(found) if found is not None else None

    def _input_embedding_name(self) -> str | None:
        """The token embedding's module name: the first `Embedding` (GPT-2's `wte` comes before `wpe`)."""
        return next((n for n, m in self.named_modules() if type(m).__name__ == "Embedding"), None)

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Put `value` where the token embedding is (a tied LM head is tied to it again by `tie_weights()`)."""
        found = self._input_embedding_name()
        if found is None:
            raise ValueError(f"{type(self).__name__} has no token embedding to replace")
        owner, _, leaf = found.rpartition(".")
        setattr(self.get_submodule(owner) if owner else self, leaf, value)

    def get_output_embeddings(self):
        """The LM head (the spec's `loss_head` module), or None for a model without one (BertModel)."""
        return self.get_submodule(self.loss_head[0]) if self.loss_head is not None else None

    def logit_softcap(self) -> float | None:
        """The soft-cap the spec's forward applies after the LM head (logits -> cap * tanh(logits / cap),
        Gemma 2's final_logit_softcapping), or None: the logits are the head's output."""
        return None

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of `hidden` ([..., H], from `forward_hidden`) as the spec's forward computes them: the LM
        head, then its soft-cap if it has one."""
        logits = self.get_submodule(self.loss_head[0])(hidden)  # [..., V]
        cap = self.logit_softcap()
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing: bool = True):
        """Resize the token embedding (and the LM head, tied or not, with its bias) to `new_num_tokens` rows
        (rounded up to a multiple of `pad_to_multiple_of`), keep the old rows, update config.vocab_size, return
        the embedding, as HF's. New rows, as HF's default `mean_resizing`: drawn from a normal distribution with
        the old rows' mean and 1e-9 times their covariance (the mean itself when that is not positive-definite),
        so the old tokens' logits are unchanged and the new ones' are near the average; a new head bias entry:
        the old bias mean. `mean_resizing=False`: normal(0, config.initializer_range), zero head bias."""
        embedding = self.get_input_embeddings()
        if embedding is None or not isinstance(getattr(embedding, "weight", None), torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no token embedding to resize")
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embedding
        rows = embedding.weight.shape[0] if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            if (
                not isinstance(pad_to_multiple_of, int)
                or isinstance(pad_to_multiple_of, bool)
                or pad_to_multiple_of < 1
            ):
                raise ValueError(f"pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}")
            rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"new_num_tokens must be an int >= 1, got {new_num_tokens!r}")
        std = getattr(self.config, "initializer_range", 0.02)
        tied = self.tied_parameters()
        head = self.get_output_embeddings()
        _resize_rows(embedding, "weight", rows, mean_resizing, std)
        embedding.num_embeddings = rows
        if embedding.padding_idx is not None and embedding.padding_idx >= rows:
            embedding.padding_idx = None
        if head is not None:
            head_name = self.loss_head[0]
            if f"{head_name}.weight" not in tied:
                _resize_rows(head, "weight", rows, mean_resizing, std)
            if getattr(head, "bias", None) is not None:
                _resize_rows(head, "bias", rows, mean_resizing, 0.0)
            if hasattr(head, "out_features"):
                head.out_features = rows
        self.config.vocab_size = rows
        self.tie_weights()
        from . import cuda_graphs

        cuda_graphs.release(self)  # a kept decode graph holds the old [B, V] buffers
        return embedding

    # ---- horizontal fusion -----------------------------------------------------------------------
    def fuse_projections(self) -> PreTrainedModel:
        """Concatenate the projections that read one input (q/k/v, gate/up: each module's `projection_groups`)
        so each group runs as one matmul in inference. The parts stay modules with their own parameters (now
        views into the fused tensor), so names, state dicts and `save_pretrained` are unchanged; a part that is
        later wrapped (PEFT), hooked or swapped is called on its own again. Moving the model (`.to()`) keeps it fused."""
        for module in self.modules():
            for fused, parts in getattr(module, "projection_groups", {}).items():
                layers = [getattr(module, p) for p in parts]
                if any(not isinstance(layer, nn.Linear) for layer in layers):
                    continue  # already wrapped or swapped: nothing to fuse
                biases = [layer.bias for layer in layers]
                if any(b is None for b in biases) and not all(b is None for b in biases):
                    continue
                if len({(layer.weight.dtype, layer.weight.device) for layer in layers}) != 1:
                    continue
                with torch.no_grad():
                    weight = torch.cat([layer.weight for layer in layers])
                    bias = torch.cat(biases) if biases[0] is not None else None
                sizes = [layer.weight.shape[0] for layer in layers]
                for layer, w, b in zip(layers, weight.split(sizes), bias.split(sizes) if bias is not None else biases):
                    layer.weight.data = w  # the part's Parameter object stays (optimizers, PEFT); its storage is shared
                    if b is not None:
                        layer.bias.data = b
                sources = tuple((type(layer), layer.weight, layer.bias) for layer in layers)
                setattr(module, fused, FusedWeights(weight, bias, sizes, sources))
        return self

    def unfuse_projections(self) -> PreTrainedModel:
        """Drop the fused tensors: every projection runs on its own again (its parameters keep their values)."""
        for module in self.modules():
            for fused, parts in getattr(module, "projection_groups", {}).items():
                if getattr(module, fused, None) is None:
                    continue
                for part in parts:
                    layer = getattr(module, part)
                    for p in (layer.weight, layer.bias):
                        if p is not None:
                            p.data = p.data.clone()
                setattr(module, fused, None)
        return self

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()`, `.half()`...: fused projections are fused again from the moved parameters."""
        fused = any(
            getattr(m, f, None) is not None for m in self.modules() for f in getattr(m, "projection_groups", {})
        )
        if fused:
            self.unfuse_projections()
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse_projections()
        return out

    @classmethod
    def from_pretrained(
        cls,
        folder,
        dtype=None,
        device=None,
        strict: bool = True,
        fuse_projections: bool = False,
        config=None,
        init_missing: bool = False,
    ):
        """Load a Hugging Face folder (config.json + safetensors) as it is.

        `config`: a config object (or another folder's path) instead of the folder's config.json, for a folder
        of weights alone (what HF Trainer writes for a model that is not a transformers class). A
        generation_config.json there becomes `model.generation_config` (a malformed one is a ConfigError naming it).

        The model is built on the meta device and each checkpoint tensor is assigned in place,
        so the weights are held once. `strict=False` warns about unused checkpoint tensors
        instead of refusing them; missing or mis-shaped parameters are always refused. Before anything is
        allocated, config.json's sizes are compared with the checkpoint's (a config.json with 10^9 layers for
        a 4-layer checkpoint is refused at once); tensors of a dtype the parameter cannot take (int16, bool,
        complex, float8 for a float weight) are refused by name; NaN or infinite weights are warned about.

        `init_missing=True`: parameters the checkpoint lacks are not refused but initialized by their module's
        `reset_parameters()` (the spec's init), as a new head on a pretrained trunk (a classifier from a causal
        LM); their names are in `model.newly_initialized` (empty otherwise). Shape mismatches are still refused.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {folder}")
        if isinstance(dtype, str):
            if dtype.removeprefix("torch.") not in DTYPES:
                raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype.removeprefix("torch.")]
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)} (or the torch dtypes)")
        if config is None or isinstance(config, (str, Path)):
            config = cls.config_class.from_pretrained(folder if config is None else config)
        elif not isinstance(config, cls.config_class):
            raise ValueError(f"config must be a {cls.config_class.__name__} or a folder, got {type(config).__name__}")
        generation_config = _generation_config(cls, folder)
        reader = CheckpointReader(folder)
        model = _build_within(cls, config, reader, folder)
        if generation_config is not None:
            model.generation_config = generation_config
        tied = model.tied_parameters()
        dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
        rules = bind_rules(cls.layout_rules, model.config)
        tensors, problems = read_state(reader, model.parameter_shapes(), rules, cls.ignored_keys, tied, dtypes)
        missing = []
        if init_missing:
            missing = [n for n in model.parameter_shapes() if n not in tensors and n not in tied]
            absent = tuple(f"parameter `{n}` " for n in missing)
            problems = [p for p in problems if not p.startswith(absent)]
        if not strict:
            extra = [p for p in problems if p.startswith("unexpected")]
            for p in extra:
                warnings.warn(p, stacklevel=2)
            problems = [p for p in problems if p not in extra]
        if problems:
            hint = _size_hint(model, reader, config, problems)
            raise CheckpointError(f"{folder} does not fit {cls.__name__}:\n  - " + "\n  - ".join(problems) + hint)
        non_finite = []
        for name, tensor in tensors.items():
            cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
            if cast:
                tensor = tensor.to(dtype)
            if device is not None:
                tensor = tensor.to(device)
            if tensor.is_floating_point() and not _finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    non_finite.append(
                        f"`{name}` has {bad} non-finite value{'s' * (bad != 1)}"
                        + (f" (after the cast to {str(dtype).removeprefix('torch.')})" if cast else "")
                    )
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        if non_finite:
            warnings.warn(
                f"{folder}: NaN or infinite weights: "
                + "; ".join(non_finite[:8])
                + (f"; and {len(non_finite) - 8} more tensors" if len(non_finite) > 8 else "")
                + ": the outputs will be NaN or infinite where they are used",
                stacklevel=2,
            )
        _init_missing(model, missing, dtype, device)
        model.newly_initialized = missing
        model.tie_weights()
        if fuse_projections:
            model.fuse_projections()
        return model.eval()

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict=None,
        push_to_hub: bool = False,
        max_shard_size="50GB",
        safe_serialization: bool = True,
        **kwargs,
    ) -> None:
        """Write config.json, the weights and (for a model that generates) generation_config.json, which Hugging
        Face transformers loads back. `state_dict`: tensors by parameter name (as `state_dict()` gives them, tied
        copies absent or present) written instead of the parameters; `max_shard_size` (bytes, "5GB", "500MB"):
        above it, `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`, as HF's. Only
        safetensors are written (`safe_serialization=False` is refused); `is_main_process=False` writes nothing
        (HF Trainer's other ranks). HF's other options are accepted at their no-op values only."""
        self._save_pretrained(
            save_directory, is_main_process, state_dict, push_to_hub, max_shard_size, safe_serialization, **kwargs
        )

    def _save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict=None,
        push_to_hub: bool = False,
        max_shard_size="50GB",
        safe_serialization: bool = True,
        **kwargs,
    ) -> bool:
        """save_pretrained's work; whether this process wrote the folder. A sharded model (DTensor parameters:
        `parallelize`, TP or FSDP2) is gathered into full tensors first, on every rank (each must call it,
        whatever its is_main_process), and rank 0 alone writes."""
        _check_save_options(type(self).__name__, push_to_hub, safe_serialization, kwargs)
        from .parallel import full_state, model_class

        state_dict, writes = full_state(self, state_dict)
        if not is_main_process or not writes:
            return False
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = write_state(state_dict, bind_rules(self.layout_rules, self.config), self.tied_parameters())
        write_shards(folder, tensors, max_shard_size)
        config = self.config.to_dict()
        config["architectures"] = [model_class(self).__name__]
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        config["dtype"] = str(dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.can_generate() and isinstance(self.generation_config, GenerationConfig):
            self.generation_config.save_pretrained(folder)
        return True

    # ---- scale out -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_sharded(
        cls, folder, mesh, tp: str | None = None, dp_shard: str | None = None, dtype=None, **options
    ):
        """`from_pretrained` then `parallelize` (with its `options`), without the whole model on any rank: built on
        the meta device, sharded there, filled from rank 0's reading of the folder shard by shard
        (parallel.load_sharded)."""
        from .parallel import load_sharded

        return load_sharded(cls, folder, mesh, tp=tp, dp_shard=dp_shard, dtype=dtype, **options)

    def parallelize(self, mesh, tp: str | None = None, dp_shard: str | None = None, **options) -> PreTrainedModel:
        """Shard the model in place over a DeviceMesh: the spec's `parallel` plan (tensor parallelism, with sequence
        parallelism for its `sequence` norms) on the `tp` dimension, FSDP2 per block of the repeat stack then the
        whole model on `dp_shard`, or both (2-D). Dimension names default to "tp" and "dp_shard". `options`:
        sequence_parallel, param_dtype, reduce_dtype, reshard_after_forward, offload (parallel.parallelize says
        what each does); returns the model."""
        from .parallel import parallelize

        return parallelize(self, mesh, tp=tp, dp_shard=dp_shard, **options)

    # ---- training --------------------------------------------------------------------------------
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False, save=None
    ) -> None:
        """Recompute the spec's checkpointed blocks in backward while training (always non-reentrant, so
        `activation_checkpointing_kwargs` such as use_reentrant are not needed). HF Trainer calls this.

        every_n_layers: recompute every n-th block of each stack (blocks 0, n, 2n, ...; 1: all).
        save: op kinds whose outputs the recomputed blocks keep (selective checkpointing): "linear" (the
          matmuls), "attention" (the attention kernel); default the spec's `save_activations` line.
        offload: keep the tensors saved for backward in CPU memory (torch.autograd.graph.save_on_cpu).
        All of them compose with torch.compile(fullgraph=True), offload excepted."""
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be an int >= 1, got {every_n_layers!r}")
        save = self.remat_save if save is None else tuple([save] if isinstance(save, str) else save)
        unknown = [s for s in save if s not in SAVE_OPS]
        if unknown:
            raise ValueError(f"save: unknown op kind(s) {', '.join(map(repr, unknown))}; use {', '.join(SAVE_OPS)}")
        policy = Remat(save, bool(offload))
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = policy
                for stack in m.children():
                    if isinstance(stack, nn.ModuleList):
                        for i, block in enumerate(stack):
                            block._dslc_recompute = i % every_n_layers == 0

    def activation_checkpointing_disable(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False
            if hasattr(m, "_dslc_recompute"):
                del m._dslc_recompute

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    # the names transformers 4 uses (and 5 still calls on models that only define them)
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # ---- KV caches -------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int) -> None:
        """Give every attention site a static [batch, kv_heads, max_len, head_dim] cache."""
        for m in cache_sites(self):
            m.kv_cache = KVCache(batch, max_len)

    def clear_cache(self) -> None:
        for m in cache_sites(self):
            m.kv_cache = None

    # ---- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        position_ids=None,
        token_type_ids=None,
        inputs_embeds=None,
        logits_to_keep=0,
        output_hidden_states=None,
        output_attentions=None,
        output_router_logits=None,
        return_dict=None,
        use_cache=None,
        past_key_values=None,
        cache=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        """Hugging Face-style call: the task's outputs as a ModelOutput (`.loss` too when labels are given).

        return_dict=False: the same fields as a tuple, loss first when present (None fields left out).
        output_hidden_states: `hidden_states`, as Hugging Face: the input of the first block of the spec's
          `repeat` stack (the embeddings), each block's output, the last one replaced by the stack owner's
          output (after the final norm). Models without a single such stack refuse it.
        inputs_embeds: [B, T, hidden] instead of input_ids; they replace the token embedding's output,
          so only models whose input_ids feed nothing but that embedding take them (others refuse).
        logits_to_keep: (causal LMs) an int keeps the last N positions' logits (0: all), a tensor the
          positions it lists (1D, or 2D per row / a bool mask), as Hugging Face's; the head sees only those.
        use_cache: accepted and ignored: forward never reads nor returns a KV cache (`out` has no
          past_key_values, whatever use_cache says); cached decoding is `generate()`.
        past_key_values / cache: refused; use `generate()`, whose static KV cache lives in the model.
        output_attentions=True: refused (the attention probabilities are never materialized).
        output_router_logits: (a spec with a `router` line; default: the config's) `router_logits`, each layer's
          router output as [tokens, num_experts], and `aux_loss`, their load-balancing loss, which is added to
          the loss times the router's `coef` when labels are given, as transformers' MoE models do.
        num_items_in_batch: what HF Trainer passes to normalize the loss over gradient accumulation.
        Other inputs of the spec's forward (a float `x`, say) are given by their names: `model(x=...)`.
        Unknown keyword arguments are refused (TypeError) unless their value is None.
        """
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in self.graph_inputs}
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword arguments: {', '.join(unknown)}")
        if past_key_values is not None or cache is not None:
            raise ValueError(
                f"{type(self).__name__}.forward() takes no past_key_values/cache: it runs the whole sequence. "
                "For cached decoding use model.generate(...) (or setup_cache + decode_step), whose static KV "
                "cache lives in the model"
            )
        if self._flag("output_attentions", output_attentions):
            raise ValueError(
                f"{type(self).__name__} cannot return attentions (output_attentions=True): its attention runs "
                "fused and never materializes the attention probabilities"
            )
        output_hidden_states = self._flag("output_hidden_states", output_hidden_states)
        if self.router_pattern is None and output_router_logits:
            raise ValueError(
                f"{type(self).__name__} has no router (its spec has no `router` line), so it has no router logits"
            )
        routers = None
        if self.router_pattern is not None and self._flag("output_router_logits", output_router_logits):
            routers = RouterRecorder(self, self.router_pattern, self.router_options()["num_experts"])
        return_dict = self._flag("return_dict", return_dict, default=True)
        if "input_ids" in self.graph_inputs and (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        missing = [n for n in self.graph_inputs if n not in KNOWN_INPUTS and extra.get(n) is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs {', '.join(f'`{n}`' for n in missing)} (its spec's forward "
                f"takes {', '.join(self.graph_inputs)}): pass them by name, e.g. model({missing[0]}=...)"
            )
        keep_all = keeps_all_positions(logits_to_keep)
        if not keep_all:
            if self.task != "causal_lm" or self.loss_head is None:
                raise ValueError(
                    f"logits_to_keep: {type(self).__name__} (task `{self.task}`) does not end in a language-model "
                    "head, so it cannot keep only some positions' logits"
                )
            if labels is not None:
                raise ValueError("logits_to_keep and labels together: the loss needs the logits of every position")

        ctx, inputs = self.call_inputs(input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids, extra)
        input_ids = inputs["input_ids"]

        recorder = HiddenStateRecorder(self) if output_hidden_states else None
        swap = EmbeddingSwap(self, input_ids, inputs_embeds) if inputs_embeds is not None else None
        try:
            if recorder is not None:
                recorder.start()
            if swap is not None:
                swap.start()
            if routers is not None:
                routers.__enter__()
            fields = self._forward_fields(ctx, inputs, labels, num_items_in_batch, logits_to_keep, keep_all)
        finally:
            if routers is not None:
                routers.__exit__()
            if swap is not None:
                swap.stop()
            if recorder is not None:
                recorder.stop()
        if swap is not None:
            swap.check()
        if recorder is not None:
            fields["hidden_states"] = recorder.hidden_states(fields.get("last_hidden_state"))
        if routers is not None:
            options = self.router_options()
            fields["router_logits"] = tuple(routers.logits)
            fields["aux_loss"] = load_balancing_loss(
                routers.logits, options["num_experts"], options["top_k"], attention_mask
            )
            if fields.get("loss") is not None:
                fields["loss"] = fields["loss"] + options["coef"] * fields["aux_loss"].to(fields["loss"].device)
        out = output_class(self.task, self.output_names, moe=self.router_pattern is not None)(**fields)
        return out if return_dict else out.to_tuple()

    def call_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids=None, extra=None):
        """(AttentionContext, the graph's inputs by name) of a whole-sequence call, as HF's forward: positions
        0 .. T - 1 whatever the padding; for inputs_embeds, zero ids stand in for the token ids (only their
        shape is read: `EmbeddingSwap` replaces the embedding's output)."""
        extra = extra or {}
        first = next(t for t in (input_ids, inputs_embeds, *extra.values()) if t is not None)
        batch, length = first.shape[0], first.shape[1]  # [B, T]
        device = first.device
        cache_position = torch.arange(length, device=device)
        if input_ids is None and inputs_embeds is not None:
            input_ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = cache_position[None, :].expand(batch, length)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        inputs = dict(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids, **extra)
        return AttentionContext(key_mask, cache_position), inputs

    def _flag(self, name: str, value, default=False):
        """A forward flag: the argument when given, else the config's value (as HF), else `default`."""
        if value is not None:
            return value
        value = getattr(self.config, name, None)
        return default if value is None else value

    def _forward_fields(self, ctx, inputs, labels, num_items_in_batch, logits_to_keep, keep_all: bool) -> dict:
        """The output fields of one forward: the graph's outputs by name, and `loss` for labels (with each
        declared auxiliary term, `z_loss`, beside it)."""
        if labels is not None and self.training and self.task == "causal_lm" and self.loss_head is not None:
            # training: the chunked fused loss; the [tokens, vocab] logits are never materialized
            hidden = self.forward_hidden(*self.graph_args(inputs), ctx)  # [B, T, H]
            sub, weight, bias = self.loss_head
            head = self.get_submodule(sub)
            declared = self.loss_options()
            ce = declared.get("cross_entropy", {})
            z = declared.get("z_loss")
            loss, z_loss = fused_causal_lm_losses(
                hidden,
                full_tensor(getattr(head, weight)),
                full_tensor(getattr(head, bias)) if bias else None,
                labels,
                num_items_in_batch=num_items_in_batch,
                label_smoothing=ce.get("label_smoothing", 0.0),
                class_weight=ce.get("weight"),
                z_coef=z["coef"] if z is not None else None,
                softcap=self.logit_softcap(),
            )
            return {"loss": loss, "z_loss": z_loss} if z is not None else {"loss": loss}
        if not keep_all:
            hidden = self.forward_hidden(*self.graph_args(inputs), ctx)  # [B, T, H]
            logits = self.head_logits(keep_positions(hidden, logits_to_keep))  # [B, N, V]
            return {self.output_names[0]: logits}
        outputs = self.run_graph(ctx, **inputs)
        named = dict(zip(self.output_names, outputs))
        if labels is not None:
            named = {**self.task_loss(named[self.output_names[0]], labels, num_items_in_batch), **named}
        return named

    def task_loss(self, logits, labels, num_items_in_batch=None) -> dict:
        """`loss` of the task's logits against `labels` (HF's order: loss first): the task's own loss, or the
        spec's declared one with its options, plus each declared auxiliary term times its `coef`, which is
        also returned under its name (`z_loss`)."""
        if self.task not in LOSSES:
            raise ValueError(f"task `{self.task}` has no loss; labels cannot be used")
        declared = self.loss_options()
        main = next((k for k in declared if k not in AUX_LOSSES), None)
        options = {k: v for k, v in declared.get(main, {}).items() if v is not None}
        if self.task in CLASSIFIERS:
            problem_type = config_option(self.config, "problem_type")
            if main is not None:
                wanted = LOSS_PROBLEM_TYPES[main]
                if problem_type not in (None, wanted):
                    raise ValueError(
                        f"config problem_type {problem_type!r}, but the spec declares `loss {main}` ({wanted}): "
                        "leave problem_type unset or change the spec's loss"
                    )
                problem_type = wanted
            options["problem_type"] = problem_type
        fields = {"loss": LOSSES[self.task](logits, labels, num_items_in_batch, **options)}
        for kind, aux in declared.items():
            if kind in AUX_LOSSES:
                term = AUX_LOSSES[kind](logits, labels, num_items_in_batch, shift=self.task == "causal_lm")
                fields["loss"] = fields["loss"] + aux["coef"] * term
                fields[kind] = term
        return fields

    def loss_options(self) -> dict[str, dict]:
        """Each declared loss's options, from the config (the spec's `loss` lines; none: the task's own loss)."""
        return {}

    def graph_args(self, inputs: dict) -> list:
        """The spec's forward arguments, by name, from the HF-style keyword inputs."""
        args = []
        for name in self.graph_inputs:
            value = inputs.get(name)
            if value is None and name == "token_type_ids":
                value = torch.zeros_like(inputs["input_ids"])
            if value is None:
                raise ValueError(f"{type(self).__name__} needs `{name}`")
            args.append(value)
        return args

    def run_graph(self, ctx: AttentionContext, **inputs) -> tuple:
        out = self.forward_graph(*self.graph_args(inputs), ctx)
        return out if isinstance(out, tuple) else (out,)

    def decode_step(self, input_ids, position_ids, key_mask, cache_position, last_only: bool = False) -> torch.Tensor:
        """One cached step: writes k/v at `cache_position`, returns the first output ([B, T, V] logits).
        `last_only`: the logits of the last position only, [B, 1, V], when the model ends in a Linear
        head (a prefill then never computes the [B, T, V] logits it does not use)."""
        ctx = AttentionContext(key_mask, cache_position, use_cache=True)
        if last_only and self.loss_head is not None:
            hidden = self.forward_hidden(*self.graph_args(dict(input_ids=input_ids, position_ids=position_ids)), ctx)
            return self.head_logits(hidden[:, -1:])  # [B, 1, V]
        return self.run_graph(ctx, input_ids=input_ids, position_ids=position_ids)[0]

    def generate(
        self,
        input_ids=None,
        generation_config=None,
        streamer=None,
        *,
        max_new_tokens=None,
        max_length=None,
        do_sample=None,
        temperature=None,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=None,
        attention_mask=None,
        generator=None,
        cuda_graph=None,
        **kwargs,
    ):
        """Greedy or sampled decoding over a static KV cache: [B, T + n] ids. Each setting left None comes from
        `generation_config` (this package's or transformers'), else `self.generation_config`, else HF's defaults;
        HF's other options are accepted at their no-op values only (num_beams=1, use_cache=True...). `streamer`:
        a callable given each step's tokens, or an HF streamer (put/end). See generation.generate."""
        from .generation import generate
        from .parallel import root_unsharded

        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)  # HF's name of the first argument
        with root_unsharded(self):  # FSDP2: the root's own weights gathered once for the whole run
            return generate(
                self,
                input_ids,
                generation_config=generation_config,
                streamer=streamer,
                attention_mask=attention_mask,
                generator=generator,
                cuda_graph=cuda_graph,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                **kwargs,
            )


# ---- loading helpers -----------------------------------------------------------------------------------

# save_pretrained keywords of transformers (what Trainer and PEFT pass), accepted at these no-op values
SAVE_NO_OPS = {
    "variant": None,
    "token": None,
    "save_peft_format": True,
    "save_original_format": True,
    "distributed_checkpoint": False,
    "safe_serialization": True,
}


def _check_save_options(name: str, push_to_hub, safe_serialization, kwargs: dict) -> None:
    if safe_serialization is not True:
        raise ValueError(
            f"{name}.save_pretrained writes safetensors only (safe_serialization={safe_serialization!r}): pickle "
            "checkpoints are not written, and loading refuses them"
        )
    if push_to_hub:
        raise ValueError(f"{name}.save_pretrained cannot push to the Hub (push_to_hub=True): save, then upload")
    unknown = sorted(k for k in kwargs if k not in SAVE_NO_OPS)
    if unknown:
        raise TypeError(f"{name}.save_pretrained() got unexpected keyword arguments: {', '.join(unknown)}")
    odd = [f"{k}={v!r}" for k, v in kwargs.items() if v != SAVE_NO_OPS[k]]
    if odd:
        raise ValueError(f"{name}.save_pretrained does not implement {', '.join(odd)}")


@torch.no_grad()
def _init_missing(model: nn.Module, names: list[str], dtype, device) -> None:
    """Give the parameters `names` (still on the meta device) storage and their module's initial values
    (`reset_parameters()`, the spec's init); the module's loaded parameters keep the checkpoint's values."""
    owners: dict[str, list[str]] = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        owners.setdefault(owner, []).append(leaf)
    for owner, leaves in owners.items():
        module = model.get_submodule(owner) if owner else model
        for leaf in leaves:
            meta = module._parameters[leaf]
            tensor = torch.empty(meta.shape, dtype=dtype or meta.dtype, device=device)
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        loaded = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False) if n not in leaves}
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for leaf in leaves:
                nn.init.normal_(module._parameters[leaf], std=getattr(model.config, "initializer_range", 0.02))
        for n, value in loaded.items():
            module._parameters[n].copy_(value)


def _generation_config(cls, folder: Path):
    """The folder's generation_config.json for a model that generates (None when absent), refused naming it."""
    from .config import ConfigError

    path = folder / "generation_config.json"
    if not cls.can_generate() or not (path.exists() or path.is_symlink()):
        return None
    return GenerationConfig.from_pretrained(folder, error=ConfigError)


@torch.no_grad()
def _resize_rows(module: nn.Module, name: str, rows: int, mean_resizing: bool, std: float) -> None:
    """Give `module.<name>` (a [V, H] weight or a [V] bias) `rows` rows: the old ones kept, new ones as HF's
    resize initializes them (see resize_token_embeddings)."""
    old = getattr(module, name)
    kept = min(rows, old.shape[0])
    new = old.new_empty((rows, *old.shape[1:]))
    new[:kept] = old[:kept]
    added = rows - old.shape[0]
    if added > 0:
        new[kept:] = _added_rows(old, added, mean_resizing, std)
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _added_rows(old: torch.Tensor, added: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """`added` new rows for `old` ([V, H] or [V]), as HF's `_init_added_embeddings_weights_with_mean`
    (a bias: its mean, as HF's 1e-9-std normal around it); without mean resizing normal(0, std) (a bias: 0)."""
    values = old.detach().float()
    if not mean_resizing:
        if values.dim() == 1:
            return torch.zeros(added, dtype=old.dtype, device=old.device)
        return torch.randn(added, *old.shape[1:], device=old.device).mul(std).to(old.dtype)
    mean = values.mean(dim=0)
    if values.dim() == 1:
        return mean.expand(added).to(old.dtype)
    centered = values - mean
    covariance = 1e-9 * (centered.T @ centered) / values.shape[0]
    try:
        sample = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((added,))
    except (ValueError, RuntimeError):  # not positive-definite: the mean, as HF
        sample = mean.expand(added, -1)
    return sample.to(old.dtype)


class _TooLarge(Exception):
    pass


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite; a sum (25x faster than isfinite().all() on CPU) decides unless it overflows."""
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def _block_counts(keys) -> dict[str, int]:
    """`model.layers` -> 4 for keys `model.layers.0.*` .. `model.layers.3.*`: the checkpoint's repeated blocks."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and i:
                prefix = ".".join(parts[:i])
                counts[prefix] = max(counts.get(prefix, 0), int(part) + 1)
    return counts


def _int_fields(config) -> dict[str, int]:
    types = getattr(config, "TYPES", {})
    return {
        n: getattr(config, n) for n, (t, _) in types.items() if t == "int" and isinstance(getattr(config, n, None), int)
    }


def _build_within(cls, config, reader: CheckpointReader, folder: Path):
    """`cls(config)` on the meta device, stopped as soon as it outgrows the checkpoint: the model cannot hold more
    parameter values than the checkpoint (tied copies aside), so a config.json that asks for 10^9 layers or a
    10^12-wide matrix is refused after a few blocks, before Python builds 10^9 modules (the meta device allocates
    nothing; the module objects are what would exhaust memory). Errors while building name config.json."""
    from torch.nn.modules.module import (
        register_module_module_registration_hook,
        register_module_parameter_registration_hook,
    )

    from .config import ConfigError

    shapes = {}
    for key in reader.location:
        try:
            shapes[key] = reader.header(key)[1]
        except Exception:  # reading it later reports the problem
            shapes[key] = []
    values = sum(math.prod(s) for s in shapes.values())
    # every parameter is filled from the checkpoint (split and concat keep the count) or tied to one that is;
    # tied copies are built before they are tied, so the bound leaves room for up to 15 copies of everything
    max_values = 16 * values + 2**24
    max_modules = 1024 + 16 * len(shapes)
    built = {"values": 0, "modules": 0}
    thread = threading.get_ident()

    def on_parameter(module, name, param):
        if param is not None and threading.get_ident() == thread:
            built["values"] += param.numel()
            if built["values"] > max_values:
                raise _TooLarge

    def on_module(module, name, submodule):
        if threading.get_ident() == thread:
            built["modules"] += 1
            if built["modules"] > max_modules:
                raise _TooLarge

    path = folder / "config.json"
    blocks = _block_counts(shapes)
    largest = max([d for s in shapes.values() for d in s] + list(blocks.values()) + [0])
    too_large = [f"{n}={v}" for n, v in _int_fields(config).items() if v > largest]
    hooks = [
        register_module_parameter_registration_hook(on_parameter),
        register_module_module_registration_hook(on_module),
    ]
    try:
        with torch.device("meta"):
            return cls(config)
    except _TooLarge:
        suspects = too_large
        where = ", ".join(f"{count} `{prefix}` blocks" for prefix, count in sorted(blocks.items()))
        raise ConfigError(
            f"{path} does not fit its checkpoint: {cls.__name__} built from it would hold more than "
            f"{max_values:,} parameter values or {max_modules:,} modules, while the checkpoint holds {values:,} "
            f"values in {len(shapes)} tensors{f' ({where})' if where else ''}"
            + (f"; larger than any checkpoint dimension: {', '.join(suspects)}" if suspects else "")
            + ". Fix those sizes in config.json to the checkpoint's."
        ) from None
    except (ConfigError, CheckpointError):
        raise
    except Exception as e:  # a negative or overflowing size, a zero divisor
        odd = [f"{n}={v}" for n, v in _int_fields(config).items() if v <= 0] + too_large
        raise ConfigError(
            f"{path}: {cls.__name__} cannot be built from it ({type(e).__name__}: {e})"
            + (f"; check {', '.join(odd)}" if odd else "; check its sizes")
        ) from None
    finally:
        for hook in hooks:
            hook.remove()


def _size_hint(model, reader: CheckpointReader, config, problems: list[str]) -> str:
    """Which config.json values likely made the model's shapes differ from the checkpoint's, for the message."""
    lines = []
    counts = _block_counts(reader.keys())
    fields = _int_fields(config)
    wrong: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name in counts and len(module) != counts[name]:
            lines.append(
                f"the checkpoint has {counts[name]} `{name}` blocks, the model built from config.json {len(module)}"
            )
            wrong.add(len(module))
    for p in problems:
        if p.startswith("shape mismatch"):
            got, want = (re.findall(r"\[([\d, ]*)\]", p) + ["", ""])[:2]
            got = [int(d) for d in got.split(",") if d.strip()]
            want = [int(d) for d in want.split(",") if d.strip()]
            wrong.update(w for i, w in enumerate(want) if i >= len(got) or got[i] != w)
    suspects = [f"{n}={v}" for n, v in fields.items() if v in wrong or v <= 0]
    if suspects:
        lines.append(f"config.json values that give these sizes: {', '.join(suspects)}")
    return "".join(f"\n  ({line})" for line in lines)


# ---- forward helpers -----------------------------------------------------------------------------------


def config_option(config, name: str):
    """A config.json key the spec does not declare (HF's `problem_type`), else None: an attribute of an HF
    config, an `extra` entry of the package's own."""
    value = getattr(config, name, None)
    if value is None and isinstance(getattr(config, "extra", None), dict):
        value = config.extra.get(name)
    return value


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel (DTensor) weight gathered whole, differentiably (the fused loss reads the LM head's
    weight outside its forward); any other tensor as it is."""
    return tensor.full_tensor() if type(tensor).__name__ == "DTensor" else tensor


def keeps_all_positions(logits_to_keep) -> bool:
    return logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)


def keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions of hidden [B, T, H] that `logits_to_keep` selects, as Hugging Face's
    `slice_logits_to_keep`: an int N the last N ([B, N, H]); a 1D tensor those positions of every row;
    a 2D int tensor [B, N] positions per row; a 2D bool mask [B, T] its True positions ([count, H])."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:, :]
    if not isinstance(logits_to_keep, torch.Tensor) or logits_to_keep.ndim not in (1, 2):
        raise ValueError(f"logits_to_keep must be an int or a 1D/2D tensor, got {logits_to_keep!r}")
    if logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    return hidden[:, logits_to_keep, :]


def repeat_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """(owner, blocks) of the model's one `repeat` stack (an nn.ModuleList of one block type), or None
    when it has none or several."""
    stacks = [
        (owner, child)
        for owner in model.modules()
        for child in owner.children()
        if isinstance(child, nn.ModuleList) and len(child) and len({type(b) for b in child}) == 1
    ]
    return stacks[0] if len(stacks) == 1 else None


class HiddenStateRecorder:
    """Hugging Face's `hidden_states`, read with forward hooks on the `repeat` stack's blocks: the first
    block's input (the embeddings), then each block's output, the last one replaced by the output of the
    module that owns the stack (after its final norm, as HF's `last_hidden_state`)."""

    def __init__(self, model: nn.Module):
        found = repeat_stack(model)
        if found is None:
            raise ValueError(
                f"output_hidden_states: {type(model).__name__} has no single `repeat` stack of blocks, so its "
                "hidden states are not defined"
            )
        self.model = model
        self.owner, self.blocks = found
        self.handles = []
        self.states: list[torch.Tensor] = []
        self.calls = 0
        self.owner_output = None
        self.owner_calls = 0

    def start(self) -> None:
        def first_input(module, args):
            if not self.states and args and isinstance(args[0], torch.Tensor):
                self.states.append(args[0])

        def block_output(module, args, output):
            self.calls += 1
            self.states.append(output[0] if isinstance(output, (tuple, list)) else output)

        def owner_output(module, args, output):
            self.owner_calls += 1
            self.owner_output = output

        self.handles.append(self.blocks[0].register_forward_pre_hook(first_input))
        self.handles.extend(b.register_forward_hook(block_output) for b in self.blocks)
        if self.owner is not self.model:
            self.handles.append(self.owner.register_forward_hook(owner_output))

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def hidden_states(self, last_hidden_state=None) -> tuple[torch.Tensor, ...]:
        name = type(self.model).__name__
        if self.calls != len(self.blocks) or len(self.states) != len(self.blocks) + 1:
            raise ValueError(
                f"output_hidden_states: {name}'s forward did not run each of its {len(self.blocks)} blocks once "
                f"({self.calls} block calls), so its hidden states are not Hugging Face's"
            )
        final = self.owner_output if self.owner_calls == 1 else last_hidden_state
        last = self.states[-1]
        if not isinstance(final, torch.Tensor) or final.shape != last.shape:
            raise ValueError(
                f"output_hidden_states: cannot tell {name}'s last hidden state (the output of "
                f"`{type(self.owner).__name__}`, which owns the blocks, is not one [B, T, hidden] tensor)"
            )
        return tuple(self.states[:-1]) + (final,)


# tensor reads that look at metadata only: input_ids may meet them when inputs_embeds stand in for it
_METADATA_READS = {
    "shape",
    "device",
    "dtype",
    "ndim",
    "is_cuda",
    "is_meta",
    "layout",
    "size",
    "dim",
    "numel",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
}


class EmbeddingSwap:
    """inputs_embeds in place of the token embedding's output: a forward hook on the input embedding
    replaces what it computes from the stand-in ids. A torch-function mode makes sure those ids reach
    nothing but that embedding (and shape reads), so no other op silently reads the stand-in values."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, inputs_embeds: torch.Tensor):
        self.model = model
        self.embedding = model.get_input_embeddings()
        if self.embedding is None:
            raise ValueError(f"inputs_embeds: {type(model).__name__} has no token embedding to replace")
        weight = getattr(self.embedding, "weight", None)
        if weight is not None and inputs_embeds.shape[-1] != weight.shape[-1]:
            raise ValueError(
                f"inputs_embeds: last dimension {inputs_embeds.shape[-1]} does not match the embedding width "
                f"{weight.shape[-1]}"
            )
        self.ids = ids
        self.inputs_embeds = inputs_embeds
        self.handles = []
        self.calls = 0
        self.mode = None

    def start(self) -> None:
        from torch.overrides import TorchFunctionMode

        swap = self

        class IdsGuard(TorchFunctionMode):
            inside = False

            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if (
                    not self.inside
                    and _reads_values(func)
                    and any(a is swap.ids for a in torch.utils._pytree.tree_leaves((args, kwargs)))
                ):
                    raise ValueError(
                        f"inputs_embeds: {type(swap.model).__name__} reads input_ids beyond its token embedding "
                        f"(in {getattr(func, '__name__', func)}), so it needs input_ids"
                    )
                return func(*args, **kwargs)

        self.mode = IdsGuard()

        def before(module, args):
            if args and args[0] is self.ids:
                self.mode.inside = True

        def after(module, args, output):
            if args and args[0] is self.ids:
                self.mode.inside = False
                self.calls += 1
                return self.inputs_embeds

        self.handles = [self.embedding.register_forward_pre_hook(before), self.embedding.register_forward_hook(after)]
        self.mode.__enter__()

    def stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
        for h in self.handles:
            h.remove()
        self.handles = []

    def check(self) -> None:
        if self.calls != 1:
            raise ValueError(
                f"inputs_embeds: {type(self.model).__name__}'s token embedding was called on input_ids "
                f"{self.calls} times (expected once), so it needs input_ids"
            )


def _reads_values(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name not in _METADATA_READS
