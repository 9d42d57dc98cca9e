"""Launch helpers for the generated row-region kernels (torch only: no Triton import here).

A fused region computes over the broadcast of its tensor inputs, padded on the left to
[D0, D1, D2, N]: R = D0 * D1 * D2 rows of N values. Every tensor input reaches the kernel through
four strides (0 on broadcast dims), so weights [N], per-row tensors [..., 1] and tables such as
cos [B, 1, T, D] against q [B, H, T, D] all load in place.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

MAX_ROW = 65536  # the longest row a one-row-per-program kernel holds in registers


class RowLayout(NamedTuple):
    shape: tuple[int, ...]  # broadcast shape of the tensor inputs: the full-row outputs' shape [..., N]
    row_shape: tuple[int, ...]  # per-row outputs' shape [..., 1]
    D0: int
    D1: int
    D2: int
    N: int
    R: int  # rows = D0 * D1 * D2
    BLOCK_M: int  # rows per program
    BLOCK_N: int  # next power of 2 >= N
    num_warps: int
    device: torch.device

    @property
    def grid(self) -> tuple[int]:
        return ((self.R + self.BLOCK_M - 1) // self.BLOCK_M,)

    @property
    def empty(self) -> bool:
        return self.R == 0 or self.N == 0


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_layout(region: str, *tensors: torch.Tensor, even: bool = False) -> RowLayout:
    """The row layout of a region over `tensors` (its tensor inputs); raises ValueError for unsupported sizes."""
    try:
        shape = tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
    except RuntimeError:
        shapes = ", ".join(str(list(t.shape)) for t in tensors)
        raise ValueError(
            f"region {region}: the tensor inputs do not broadcast to one shape ({shapes}); a fused "
            "row region needs them to"
        ) from None
    if not 1 <= len(shape) <= 4:
        raise ValueError(
            f"region {region}: inputs broadcast to {list(shape)}; the row kernels take rank 1 to 4 "
            "(up to 3 leading dims)"
        )
    D0, D1, D2, N = (1,) * (4 - len(shape)) + shape
    if N > MAX_ROW:
        raise ValueError(
            f"region {region}: row length N={N} is above the limit {MAX_ROW} of the fused row kernels "
            "(a program holds a whole row); use the PyTorch path for this size"
        )
    if even and N % 2:
        raise ValueError(f"region {region}: rotate_half needs an even row length, got N={N}")
    R = D0 * D1 * D2
    BLOCK_N = _next_pow2(N)
    # several rows per program when rows are short; the interpreter (CPU tests) prefers big tiles
    tile = 16384 if os.environ.get("TRITON_INTERPRET") == "1" else 2048
    BLOCK_M = max(1, min(tile // BLOCK_N, 64, _next_pow2(R)))
    num_warps = min(32, max(4, BLOCK_M * BLOCK_N // 512))
    device = tensors[0].device
    return RowLayout(shape, shape[:-1] + (1,), D0, D1, D2, N, R, BLOCK_M, BLOCK_N, num_warps, device)


def strides4(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The strides (in elements) of `t` broadcast to `shape`, padded on the left to 4 (0 where broadcast)."""
    st = t.expand(shape).stride()
    st = tuple(0 if n == 1 else s for n, s in zip(shape, st))
    return (0,) * (4 - len(st)) + st


def grad_or_zeros(g: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An output's incoming gradient; None (the output was not used) becomes stride-0 zeros (no memory)."""
    if g is None:
        return torch.zeros((), dtype=torch.float32, device=like.device).expand(shape)
    return g


def grad_buffer(t: torch.Tensor, shape: tuple[int, ...], wanted: bool) -> torch.Tensor | None:
    """Where the kernel writes `t`'s gradient, one value per element of `shape` ([R, N] contiguous):
    `t`'s own dtype when `t` has the full shape, else float32 partials that `reduce_grad` sums."""
    if not wanted:
        return None
    if tuple(t.shape) == tuple(shape):
        return torch.empty(shape, dtype=t.dtype, device=t.device)
    return torch.empty(shape, dtype=torch.float32, device=t.device)


def reduce_grad(buf: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor | None:
    """Sum a gradient buffer over the dims where `t` was broadcast, back to `t`'s shape and dtype."""
    if buf is None:
        return None
    if buf.shape != t.shape:
        buf = buf.sum_to_size(t.shape)
    return buf.to(t.dtype)


def sum_to_shape(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The gradient `g` (broadcastable against `t`) summed back to `t`'s shape (the PyTorch backward)."""
    g = torch.broadcast_to(g, torch.broadcast_shapes(g.shape, t.shape))
    return g.sum_to_size(t.shape) if g.shape != t.shape else g


def check_lanes(region: str, what: str, N: int, *tensors: torch.Tensor) -> None:
    """`what` varies along the row only through `tensors`: if all of them are per-row ([..., 1]), PyTorch
    semantics would give a [..., 1] result that the row kernel does not compute; say so."""
    if N > 1 and all(t.dim() == 0 or t.shape[-1] == 1 for t in tensors):
        names = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(
            f"region {region}: {what} depends on the row only through per-row tensors ({names}); "
            "the fused row kernel does not support this, use the PyTorch path"
        )


def check_output_shape(region: str, output: str, want: tuple[int, ...], *tensors: torch.Tensor) -> None:
    """An output that depends on only some inputs must still cover the region's whole broadcast shape."""
    got = tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
    if got[:-1] != tuple(want)[:-1]:
        raise ValueError(
            f"region {region}: output {output} would have shape {list(got)} in PyTorch but the region "
            f"computes {list(want)}; use the PyTorch path"
        )
