"""Model outputs that read as Hugging Face's `ModelOutput` does, without importing transformers.

An output is an ordered dict of the fields that are not None, that also reads as attributes and as a
tuple: `out.logits`, `out["logits"]` and `out[0]` all work, `out.to_tuple()` lists the fields that are
set. Each task has its class with its fields in Hugging Face's order (`CausalLMOutput`: loss, logits,
hidden_states, attentions), then a declared auxiliary loss (`z_loss`, a spec's `loss z_loss` line; last, so
Hugging Face's fields keep their positions); a field that is not set reads as None.

Construction follows Hugging Face, so that tools which rebuild an output with `type(out)(...)` work
(accelerate's `convert_to_fp32` passes one dict; others pass (key, value) pairs or the values in field
order): `CausalLMOutput(loss, logits)`, `CausalLMOutput(logits=...)`, `CausalLMOutput({"logits": ...})`,
`CausalLMOutput((k, v) for ...)`.

Every class is a registered pytree node (flattened to its set fields, keyed by name), so
`torch.export`, `torch.compile` and `torch.utils._pytree` take outputs apart and put them back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.utils._pytree as pytree


class ModelOutput(OrderedDict):
    """An ordered dict of the fields that are set (not None), read also as attributes and by position.

    `fields` lists a subclass's field names in order; the base class has none and takes any keyword.
    """

    fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and not kwargs and not isinstance(args[0], torch.Tensor):
            pairs = _pairs(args[0])
            if pairs is not None:
                args = ()
                kwargs = dict(pairs)
        if len(args) > len(self.fields):
            raise TypeError(
                f"{type(self).__name__} takes at most {len(self.fields)} positional fields {self.fields}, got {len(args)}"
            )
        values = dict(zip(self.fields, args))
        for name, value in kwargs.items():
            if name in values:
                raise TypeError(f"{type(self).__name__} got field `{name}` both by position and by name")
            if self.fields and name not in self.fields:
                raise TypeError(f"{type(self).__name__} has no field `{name}`; its fields are {self.fields}")
            values[name] = value
        order = list(self.fields) + [n for n in values if n not in self.fields]
        for name in order:
            if values.get(name) is not None:
                super().__setitem__(name, values[name])

    # ---- reading -------------------------------------------------------------------------------
    def __getattr__(self, name):  # only called when normal attribute lookup fails
        if not name.startswith("_"):
            if name in self:
                return super().__getitem__(name)
            if name in type(self).fields:
                return None
        raise AttributeError(f"{type(self).__name__} has no field `{name}`")

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]  # an int or a slice: the set fields as a tuple

    def to_tuple(self) -> tuple:
        """The set fields' values, in order (Hugging Face's `return_dict=False` form)."""
        return tuple(self.values())

    # ---- writing: `out.x = v` and `out["x"] = v` are the same; setting None removes the field ------
    def __setattr__(self, name, value):
        if name.startswith("_") or (self.fields and name not in self.fields):
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def __setitem__(self, key, value):
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} fields are named by strings, not {type(key).__name__}")
        if self.fields and key not in self.fields:
            raise KeyError(f"{type(self).__name__} has no field `{key}`; its fields are {self.fields}")
        if value is None:
            super().pop(key, None)
        else:
            super().__setitem__(key, value)

    def __reduce__(self):
        return type(self), (dict(self.items()),)


def _pairs(arg):
    """The (name, value) pairs a single positional argument stands for, or None when it is a field value."""
    if isinstance(arg, Mapping):
        return list(arg.items())
    if isinstance(arg, (str, bytes)):
        return None
    try:
        items = list(iter(arg))
    except TypeError:
        return None
    if items and all(isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[0], str) for e in items):
        return [tuple(e) for e in items]
    if not items and not isinstance(arg, (tuple, list)):  # an exhausted or empty generator: no fields
        return []
    return None


def _flatten(out: ModelOutput):
    return list(out.values()), tuple(out.keys())


def _flatten_with_keys(out: ModelOutput):
    return [(pytree.MappingKey(k), v) for k, v in out.items()], tuple(out.keys())


def _register(cls) -> None:
    def unflatten(values, keys):
        return cls(**dict(zip(keys, values)))

    pytree.register_pytree_node(
        cls,
        _flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=_flatten_with_keys,
    )


_register(ModelOutput)


class BaseModelOutput(ModelOutput):
    """A base model's outputs (Hugging Face's BaseModelOutputWithPooling)."""

    fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class CausalLMOutput(ModelOutput):
    fields = ("loss", "logits", "hidden_states", "attentions", "z_loss")


class MaskedLMOutput(ModelOutput):
    fields = ("loss", "logits", "hidden_states", "attentions", "z_loss")


class SequenceClassifierOutput(ModelOutput):
    fields = ("loss", "logits", "hidden_states", "attentions", "z_loss")


class MoeCausalLMOutput(ModelOutput):
    """A mixture-of-experts causal LM's (Hugging Face's MoeCausalLMOutputWithPast, without the cache)."""

    fields = ("loss", "aux_loss", "logits", "hidden_states", "attentions", "router_logits", "z_loss")


class ImageClassifierOutput(ModelOutput):
    fields = ("loss", "logits", "hidden_states", "attentions", "z_loss")


class EmbeddingOutput(ModelOutput):
    fields = ("embeddings", "hidden_states")


TASK_OUTPUTS = {
    "base": BaseModelOutput,
    "causal_lm": CausalLMOutput,
    "masked_lm": MaskedLMOutput,
    "sequence_classification": SequenceClassifierOutput,
    "image_classification": ImageClassifierOutput,
    "embedding": EmbeddingOutput,
}


def output_class(task: str, names: tuple[str, ...], moe: bool = False) -> type[ModelOutput]:
    """The output class of a task whose model returns `names` (the plain ModelOutput when they do not fit);
    `moe`: a model with router logits (a causal LM's is MoeCausalLMOutput)."""
    if moe:
        return MoeCausalLMOutput if task == "causal_lm" else ModelOutput
    cls = TASK_OUTPUTS.get(task)
    if cls is not None and all(n in cls.fields for n in names):
        return cls
    return ModelOutput
