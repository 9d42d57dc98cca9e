"""Launch helpers for the generated row-region kernels (torch only: no Triton import here).

A fused region computes over the broadcast of its tensor inputs, padded on the left to
[D0, D1, D2, N]: R = D0 * D1 * D2 rows of N values. Every tensor input reaches the kernel through
four strides (0 on broadcast dims), so weights [N], per-row tensors [..., 1] and tables such as
cos [B, 1, T, D] against q [B, H, T, D] all load in place.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
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
    max_programs: int  # programs of a backward that reduces row-invariant gradients (about 2 per SM)

    @property
    def blocks(self) -> int:
        """Row blocks of BLOCK_M rows."""
        return (self.R + self.BLOCK_M - 1) // self.BLOCK_M

    @property
    def grid(self) -> tuple[int]:
        """One program per row block."""
        return (self.blocks,)

    @property
    def programs(self) -> int:
        """Programs of a backward that keeps partial sums, each walking every programs-th row block. It does
        not depend on BLOCK_M (a program with no block stores a zero row), so any tile fits its buffer."""
        return max(1, min(self.R, self.max_programs))

    @property
    def partial_grid(self) -> tuple[int]:
        return (self.programs,)

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
    return RowLayout(
        shape, shape[:-1] + (1,), D0, D1, D2, N, R, BLOCK_M, BLOCK_N, num_warps, device, _max_programs(device)
    )


_PROGRAMS: dict = {}


def _max_programs(device: torch.device) -> int:
    """Two programs per SM on CUDA (as Liger's and the Triton tutorial's norm backward size their partial
    buffers), a handful under the interpreter (programs run one after another there)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROGRAMS:
        _PROGRAMS[index] = 2 * torch.cuda.get_device_properties(index).multi_processor_count
    return _PROGRAMS[index]


def row_width(*tensors: torch.Tensor) -> int:
    """N, the last dim of the tensors' broadcast shape."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return shape[-1] if shape else 1


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


def row_invariant(t: torch.Tensor, lay: RowLayout) -> bool:
    """Whether `t` holds the same N values in every row of `lay` (a weight [N], or [1, .., 1, N])."""
    return t.dim() >= 1 and t.shape[-1] == lay.N and t.numel() == lay.N


def partial_grad_buffer(t: torch.Tensor, lay: RowLayout, wanted: bool) -> torch.Tensor | None:
    """Where the backward writes the gradient of an input that may be row-invariant: for a row-invariant `t`,
    [programs, N] float32 partial sums (each program adds up its rows; `reduce_grad` sums the few partial
    rows), instead of a [R, N] float32 buffer summed afterwards; otherwise `grad_buffer`'s."""
    if not wanted:
        return None
    if row_invariant(t, lay):
        alloc = torch.zeros if lay.empty else torch.empty  # no rows: no program runs, the sum is zero
        return alloc((lay.programs, lay.N), dtype=torch.float32, device=t.device)
    return grad_buffer(t, lay.shape, wanted)


def reduce_grad(buf: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor | None:
    """Sum a gradient buffer ([R, N], or [programs, N] partial sums) over the dims where `t` was broadcast,
    back to `t`'s shape and dtype."""
    if buf is None:
        return None
    if buf.dim() < t.dim():  # partial sums [programs, N] of a `t` of shape [1, .., 1, N]
        buf = buf.reshape((1,) * (t.dim() - buf.dim()) + tuple(buf.shape))
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


# ---------------------------------------------------------------------------------------------------------------
# Launch with a tuned tile


def launch_rows(kernel, lay: RowLayout, *args, partial: bool = False, **constexprs) -> None:
    """Launch a row kernel over `lay` with the tile (BLOCK_M, num_warps) tuned for it.

    The grid is one program per block of BLOCK_M rows, or `lay.programs` programs for a backward that keeps
    partial sums (`partial`). The tile comes from `tuned_tile`: measured once per kernel, row width, dtypes
    and row-count bucket on CUDA, else the fixed rule of `row_layout`."""

    def launch(block_m: int, num_warps: int) -> None:
        grid = lay.partial_grid if partial else (_cdiv(lay.R, block_m),)
        kernel[grid](*args, **constexprs, BLOCK_M=block_m, BLOCK_N=lay.BLOCK_N, num_warps=num_warps)

    launch(*tuned_tile(kernel, lay, args, constexprs, launch))


def launch_pair(kernel, lay_a: RowLayout, lay_b: RowLayout, args_a: tuple, args_b: tuple, **constexprs) -> None:
    """Launch a grouped kernel (`<region>_x2`) over two problems of one region with the same row width:
    programs below the first problem's block count take its rows, the others the second's. The tile is
    tuned on the larger problem's layout."""
    lay = lay_a if lay_a.R >= lay_b.R else lay_b

    def launch(block_m: int, num_warps: int) -> None:
        blocks_a = _cdiv(lay_a.R, block_m)
        grid = (blocks_a + _cdiv(lay_b.R, block_m),)
        kernel[grid](
            *args_a, *args_b, lay.N, blocks_a, **constexprs, BLOCK_M=block_m, BLOCK_N=lay.BLOCK_N, num_warps=num_warps
        )

    launch(*tuned_tile(kernel, lay, args_a + args_b, constexprs, launch))


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def tile_candidates(lay: RowLayout) -> list[tuple[int, int]]:
    """(BLOCK_M, num_warps) pairs to try, at most four (each is one Triton compile, once per kernel and key
    thanks to the caches): the rule's tile with its warps, half and twice as many, and a 4x taller tile."""
    taller = max(1, min(4 * lay.BLOCK_M * lay.BLOCK_N, 8192) // lay.BLOCK_N)
    taller = min(taller, 64, _next_pow2(lay.R))
    out = [
        (lay.BLOCK_M, lay.num_warps),
        (lay.BLOCK_M, max(2, lay.num_warps // 2)),
        (lay.BLOCK_M, min(32, lay.num_warps * 2)),
        (taller, min(32, max(4, taller * lay.BLOCK_N // 512))),
    ]
    return list(dict.fromkeys(out))


_TILES: dict[str, tuple[int, int]] = {}  # tuning key -> (BLOCK_M, num_warps)
_KEYS: dict[tuple, str] = {}  # a launch's facts -> its tuning key (`_tile_key`)
_DISK_LOADED = False


def autotune_mode() -> str:
    """DSLC_AUTOTUNE: `auto` (default: measure on CUDA), `on` (also on the CPU, under the Triton
    interpreter: for tests) or `off` (the fixed rule everywhere)."""
    mode = os.environ.get("DSLC_AUTOTUNE", "auto").lower()
    return {"1": "on", "0": "off", "true": "on", "false": "off"}.get(mode, mode)


def tuned_tile(kernel, lay: RowLayout, args: tuple, constexprs: dict, launch) -> tuple[int, int]:
    """The tile for this launch: cached, or measured now by calling `launch(BLOCK_M, num_warps)` with each
    candidate (when tuning is on and this is no graph capture or compile trace), or the fixed rule."""
    key = _tile_key(kernel, lay, args, constexprs)
    if key in _TILES:
        return _TILES[key]
    if not _DISK_LOADED:
        _load_disk_cache()
        if key in _TILES:
            return _TILES[key]
    mode = autotune_mode()
    if mode == "off" or (mode == "auto" and lay.device.type != "cuda") or not _may_measure(lay):
        return lay.BLOCK_M, lay.num_warps
    timings = {tile: _time(lambda tile=tile: launch(*tile), lay.device) for tile in tile_candidates(lay)}
    best = min(timings, key=timings.get)
    _TILES[key] = best
    _save_disk_cache()
    return best


def _may_measure(lay: RowLayout) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (lay.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _time(run, device: torch.device) -> float:
    """Seconds per launch: on CUDA the mean of 10 launches between events after a warm-up (which compiles);
    on the CPU one interpreted launch after the warm-up."""
    run()
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(10):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 10e3


def _tile_key(kernel, lay: RowLayout, args: tuple, constexprs: dict) -> str:
    """Kernel (name and source hash), row width, row-count bucket, argument dtypes and the constexprs (flags and
    activation names), as
    the disk cache's string. Every launch asks for it: a tuple of the same facts keys a memo of the strings,
    so the source hash, the formatting and the device name are worked out once per distinct launch."""
    dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
    rows = min(_next_pow2(lay.R), 1 << 16)
    fast = (id(kernel), lay.N, rows, dtypes, tuple(sorted(constexprs.items())), lay.device)
    key = _KEYS.get(fast)
    if key is None:
        fn = getattr(kernel, "fn", kernel)
        digest = hashlib.sha1(inspect.getsource(fn).encode()).hexdigest()[:12]
        names = ",".join(str(d).removeprefix("torch.") for d in dtypes)
        flags = ",".join(f"{k}={v if isinstance(v, str) else int(v)}" for k, v in fast[4])  # an activation's name
        key = f"{fn.__name__}-{digest}|N={lay.N}|R<={rows}|{names}|{flags}|{_device_name(lay.device)}"
        _KEYS[fast] = key  # by the kernel's id: a kernel object lives as long as its module, and need not hash
    return key


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _disk_cache_path() -> Path | None:
    """DSLC_AUTOTUNE_CACHE (empty: none); default ~/.cache/dslc/autotune-<triton version>.json."""
    path = os.environ.get("DSLC_AUTOTUNE_CACHE")
    if path == "":
        return None
    if path:
        return Path(path)
    import triton

    return Path.home() / ".cache" / "dslc" / f"autotune-triton-{triton.__version__}.json"


def _load_disk_cache() -> None:
    global _DISK_LOADED
    _DISK_LOADED = True
    path = _disk_cache_path()
    if path is None or not path.is_file():
        return
    try:
        entries = json.loads(path.read_text())
        for key, (block_m, num_warps) in entries.items():
            if isinstance(block_m, int) and isinstance(num_warps, int) and block_m >= 1 and 1 <= num_warps <= 32:
                _TILES.setdefault(key, (block_m, num_warps))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        warnings.warn(f"dslc: ignoring the autotune cache {path}: {e}; delete it to start afresh", stacklevel=2)


def _save_disk_cache() -> None:
    path = _disk_cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-")
        with os.fdopen(fd, "w") as f:
            json.dump({k: list(v) for k, v in sorted(_TILES.items())}, f, indent=0)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"dslc: could not write the autotune cache {path}: {e}", stacklevel=2)
