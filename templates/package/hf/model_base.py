"""The model base of a `dslc build --target hf` package: the generated modules on transformers' own classes.

`PreTrainedModel` here is the standalone base (`model_core.py`: loading with the spec's layout rules,
saving, weight tying, the HF-style forward) mixed into transformers' `PreTrainedModel` and
`GenerationMixin`, so `generate` is transformers' whole API (beam search, repetition penalty, stopping
criteria, streamers, `generation_config`), driving the model through transformers' cache classes: each
attention site reads and writes the `Cache` it is given (`CacheSlot`), layer by layer.
The modeling code (modeling.py, kernels) is the same text in both targets; only this base layer, the
config base (config.py) and the package's `register()` differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers import PreTrainedModel as HFPreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import model_core, parallel
from .attention import AttentionContext, cache_sites

# kernels.py is imported by modeling.py as a module (`from . import kernels`); naming it here too makes
# transformers' remote-code loader, which finds a folder's files by their `from .x import` lines, copy it
from .kernels import set_backend  # noqa: F401
from .model_core import LOSSES, EmbeddingSwap, checkpoint_call, constant_tensor, fused_linear, keep_positions

# keywords transformers' Auto classes and pipelines pass that this loader does not use (a local folder; the
# attention implementation is the spec's)
HUB_KWARGS = frozenset(
    """trust_remote_code cache_dir force_download local_files_only token revision subfolder use_safetensors
    low_cpu_mem_usage _from_auto _from_pipeline code_revision proxies resume_download _commit_hash
    attn_implementation adapter_kwargs _adapter_model_path""".split()
)
# transformers 5 names the output's cache field `cache`, earlier releases `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = ["PreTrainedModel", "CacheSlot", "checkpoint_call", "constant_tensor", "fused_linear", "register_auto"]

# the Auto class of each task (AutoConfig besides); `register_auto` and the `auto_map` of saved folders use it
AUTO_CLASSES = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}


def register_auto(config_class, model_class) -> None:
    """Add the package to transformers' AutoConfig (by its own model_type) and to its task's Auto class."""
    import transformers

    transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    auto = AUTO_CLASSES.get(model_class.task)
    if auto is not None:
        getattr(transformers, auto).register(config_class, model_class, exist_ok=True)


def hf_tp_plan(plan: dict[str, str], prefix: str) -> dict[str, str]:
    """The spec's `parallel` plan ({"model.layers.{i}.self_attn.q_proj": "colwise"}) in transformers' format:
    relative to the base model, `*` for the layer index ({"layers.*.self_attn.q_proj": "colwise"}). Only the
    blocks' projections: the sequence-parallel lines (norms, the embedding) follow parallel.py's layouts, which
    transformers' plan styles do not spell."""
    out = {}
    for path, style in plan.items():
        if style == "sequence" or "{i}" not in path:
            continue
        path = path.replace("{i}", "*")
        out[path.removeprefix(f"{prefix}.")] = style
    return out


def write_remote_code(folder: Path, config_class, model_class) -> None:
    """Copy the package's code files into a saved folder and name them in config.json's `auto_map`, so
    `AutoModelFor...from_pretrained(folder, trust_remote_code=True)` loads it where the package (and dslc)
    is not installed."""
    package = Path(__file__).resolve().parent
    for source in sorted(package.glob("*.py")):
        if source.name != "__init__.py":
            (folder / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    auto_map = {"AutoConfig": f"config.{config_class.__name__}"}
    if model_class.task in AUTO_CLASSES:
        auto_map[AUTO_CLASSES[model_class.task]] = f"modeling.{model_class.__name__}"
    config["auto_map"] = auto_map
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _refuse_extras(kwargs: dict, who: str) -> None:
    """transformers' output flags this path cannot honour, and unknown keywords, refused by name."""
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(name, None):
            raise ValueError(f"{who}: {name}=True is not supported")
    unknown = sorted(k for k, v in kwargs.items() if v is not None)
    if unknown:
        raise TypeError(f"{who} got unexpected keyword arguments: {', '.join(unknown)}")


class CacheSlot:
    """One attention site's view of a transformers `Cache`: what `attention()` calls as `kv_cache.update`."""

    def __init__(self, cache: Cache, layer_idx: int):
        self.cache = cache
        self.layer_idx = layer_idx

    def update(self, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # k, v: [B, H_kv, T, D] -> every cached key and value of this layer, [B, H_kv, S, D]
        return self.cache.update(k, v, self.layer_idx)


class Backbone(torch.nn.Module):
    """`model.base_model` / `model.get_decoder()`: the model up to its last hidden state, called as transformers
    calls a base model (input_ids or inputs_embeds, attention_mask, position_ids) and returning
    `BaseModelOutputWithPast(last_hidden_state=...)`, as TRL's fused LM-head loss and PEFT expect. A view of
    the owning model (not a submodule of it: its parameters are the model's own)."""

    def __init__(self, owner: PreTrainedModel):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not registered: no second path to the same parameters

    def get_input_embeddings(self):
        return self.owner.get_input_embeddings()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        past_key_values=None,
        return_dict=None,
        **kwargs,
    ):
        owner = self.owner
        if use_cache or cache is not None or past_key_values is not None:
            raise ValueError(f"{type(owner).__name__}.base_model runs without a KV cache (use_cache=False)")
        _refuse_extras(kwargs, f"{type(owner).__name__}.base_model")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        ctx, inputs = owner.call_inputs(input_ids, inputs_embeds, attention_mask, position_ids)
        swap = EmbeddingSwap(owner, inputs["input_ids"], inputs_embeds) if inputs_embeds is not None else None
        if swap is not None:
            swap.start()
        try:
            hidden = owner.forward_hidden(*owner.graph_args(inputs), ctx)
        finally:
            if swap is not None:
                swap.stop()
        if swap is not None:
            swap.check()
        return BaseModelOutputWithPast(last_hidden_state=hidden)  # [B, T, H]


class PreTrainedModel(model_core.PreTrainedModel, HFPreTrainedModel, GenerationMixin):
    """A generated model as a transformers `PreTrainedModel` with `GenerationMixin`."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True

    def __init__(self, config):
        HFPreTrainedModel.__init__(self, config)  # transformers' bookkeeping (generation_config, attn implementation)
        self.gradient_checkpointing = False
        if self.tp_plan and getattr(config, "base_model_tp_plan", None) is None:
            config.base_model_tp_plan = hf_tp_plan(self.tp_plan, self.base_model_prefix)

    @property
    def _no_split_modules(self) -> list[str]:
        """What accelerate's device maps keep on one device: the block of the spec's `repeat` stack."""
        stack = model_core.repeat_stack(self)
        return [type(stack[1][0]).__name__] if stack is not None else []

    generate = GenerationMixin.generate  # transformers' generate, not the standalone one

    @property
    def base_model(self) -> Backbone:
        """The model up to its last hidden state, called as a transformers base model (see `Backbone`); the
        spec's own backbone module stays `model.model`."""
        return Backbone(self)

    def get_decoder(self) -> Backbone:
        return self.base_model

    @classmethod
    def can_generate(cls) -> bool:
        return cls.task == "causal_lm"

    @property
    def loss_type(self) -> str | None:
        return model_core.LOSS_TYPES.get(self.task)

    @loss_type.setter
    def loss_type(self, value) -> None:
        """transformers' __init__ assigns it from the class name; the spec's task decides here."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        config=None,
        dtype=None,
        torch_dtype=None,
        device_map=None,
        **kwargs,
    ):
        """Load a local checkpoint folder, as transformers' Auto classes and pipelines call it: the spec's
        loader (model_core: layout rules, size checks before allocating) with transformers' keywords.
        `dtype` / `torch_dtype` ("auto": config.json's), `device_map` (a device; "auto": the first CUDA
        device, else CPU). Hub downloads are not made: give a folder."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise ValueError(
                f"{pretrained_model_name_or_path}: not a local folder; this package loads checkpoint folders "
                "(download one with huggingface_hub.snapshot_download first)"
            )
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments")
        adapter = kwargs.get("adapter_kwargs") or {}  # the Auto classes pass hub options in it; a path means an adapter
        if adapter.get("_adapter_model_path") or kwargs.get("_adapter_model_path"):
            raise ValueError(
                f"{cls.__name__}.from_pretrained does not load PEFT adapters: load the model, then "
                "peft.PeftModel.from_pretrained(model, adapter_folder)"
            )
        unknown = sorted(k for k, v in kwargs.items() if k not in HUB_KWARGS and v is not None)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword arguments: {', '.join(unknown)}")
        dtype = dtype if dtype is not None else torch_dtype
        if dtype == "auto":
            dtype = getattr(cls.config_class.from_pretrained(folder), "dtype", None)
        if device_map == "auto":
            device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
        if isinstance(device_map, dict):
            raise ValueError("device_map as a dict (sharding over devices) is not supported: give one device")
        model = super().from_pretrained(folder, dtype=dtype, device=device_map)  # checks generation_config.json
        if model.can_generate():  # transformers' GenerationConfig, read by transformers' generate
            has_file = (folder / "generation_config.json").is_file()
            model.generation_config = (
                GenerationConfig.from_pretrained(folder)
                if has_file
                else GenerationConfig.from_model_config(model.config)
            )
        return model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """The standalone save (config.json, safetensors as transformers writes them), plus the package's code
        and config.json's `auto_map`: the folder loads with `trust_remote_code=True` anywhere."""
        if not self._save_pretrained(save_directory, *args, **kwargs):
            return  # not the main process (or not rank 0 of a sharded model)
        if self.can_generate() and self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        write_remote_code(Path(save_directory), type(self.config), parallel.model_class(self))

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """transformers builds 4D masks for compilable (static) caches; the attention sites build their own
        from the 2D padding mask and the cache positions."""
        return attention_mask

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """transformers' forward: without a cache (and use_cache not True) the standalone forward
        (model_core.py); with one (`cache`, or `past_key_values` in older transformers) the new positions
        run against it, and the output carries it back, as transformers' causal LMs do."""
        cache = cache if cache is not None else past_key_values
        if cache is None and not use_cache:
            return model_core.PreTrainedModel.forward(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        if self.task != "causal_lm":
            raise ValueError(
                f"{type(self).__name__} (task `{self.task}`) has no KV cache: call it with use_cache=False"
            )
        if inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__}: inputs_embeds with a KV cache is not supported; give input_ids")
        kwargs.pop("return_dict", None)
        _refuse_extras(kwargs, f"{type(self).__name__}.forward() with a KV cache")
        if cache is None:
            cache = DynamicCache()
        batch, length = input_ids.shape  # [B, T] new positions
        past = cache.get_seq_length()
        cache_position = torch.arange(past, past + length, device=input_ids.device)  # [T]
        if position_ids is None:  # as transformers' causal LMs: positions count the cache, not the padding
            position_ids = cache_position[None, :].expand(batch, length)
        key_mask = attention_mask.bool() if attention_mask is not None else None  # [B, S]
        sites = cache_sites(self)
        for layer_idx, site in enumerate(sites):
            site.kv_cache = CacheSlot(cache, layer_idx)
        try:
            ctx = AttentionContext(key_mask, cache_position, use_cache=True)
            inputs = dict(input_ids=input_ids, position_ids=position_ids)
            if self.loss_head is not None:  # the head (and its soft-cap) on the kept positions only
                hidden = self.forward_hidden(*self.graph_args(inputs), ctx)  # [B, T, H]
                logits = self.head_logits(keep_positions(hidden, logits_to_keep))  # [B, N, V]
            else:  # logits that are more than a linear head: the whole graph
                logits = keep_positions(self.run_graph(ctx, **inputs)[0], logits_to_keep)  # [B, N, V]
        finally:
            for site in sites:
                site.kv_cache = None
        loss = LOSSES[self.task](logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
