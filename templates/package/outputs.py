"""Model outputs: a dict that also reads as attributes, as Hugging Face's ModelOutput does."""

from __future__ import annotations

from collections import OrderedDict


class ModelOutput(OrderedDict):
    """`out.logits`, `out["logits"]` and `out[0]` all work; keys whose value is None are left out."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            if name.startswith("__"):
                raise AttributeError(name) from None
            return None

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())
