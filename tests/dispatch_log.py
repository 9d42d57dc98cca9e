"""A TorchDispatchMode that logs every tensor an aten op outputs: how tests prove a tensor is never allocated
(the fused loss never holds the [tokens, vocab] logits)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TensorOutputs(TorchDispatchMode):
    """`outputs`: (element count, op name, shape) of each tensor output, in run order."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[int, str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.numel(), str(func), tuple(t.shape)))
        return out
