"""Fused regions: what the fusion passes produce and the kernel generators consume.

A `RowRegion` is a chain of elementwise ops and reductions over the last dimension, computed row by
row: the region's output shape is [D0, D1, D2, N] (leading dims padded with 1 to rank 4; N is the
last dim) and every input broadcasts to it. A Triton program handles one row of N values, so a
reduction over the last dimension (mean, sum, amax) is a reduction within the program, and a
region can hold a norm with its prologue (residual add) and epilogue (weight, cast).

Ops (`RegionOp.op`), all computed in float32:
  unary:    neg exp log sqrt rsqrt tanh sigmoid silu gelu gelu_tanh relu cos sin abs erf identity
  activation: attrs (("name", C),), C a choice input: the activation of `ops.ACTIVATIONS` it names
  binary:   add sub mul div maximum minimum pow (exponent must be a constant)
  cast:     attrs (("dtype", D),) with D "f32" | "bf16" | "f16" or "input:<name>" (that input's dtype):
            the value is rounded to D (compute stays f32)
  row:      sum mean amax (over the last dim, keepdim: the result is one value per row)
  rotate_half: (x1, x2) -> (-x2, x1) over the last dim; its argument must be a region input
Arguments are value names (inputs or earlier results) or float constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dslc.ir import ops

# the fusable ops of the one op table (dslc/ir/ops.py)
UNARY_OPS = ops.names("unary", fusable=True)
BINARY_OPS = ops.names("binary", fusable=True)
ROW_OPS = ops.names("row", fusable=True)
REGION_OPS = UNARY_OPS + BINARY_OPS + ROW_OPS + ("cast", "rotate_half")
assert set(REGION_OPS) == ops.FUSABLE, "a fusable op of dslc/ir/ops.py that row regions do not take"


@dataclass(frozen=True)
class RegionInput:
    """A tensor (or scalar) entering the region.

    kind: "tensor" (broadcasts to the region's output shape; its last dim is N or 1)
          or "scalar" (a Python number known when the module runs, e.g. eps)
          or "choice" (a build-time string, e.g. the config's `hidden_act`, that an `activation` op's `name`
          attribute names: a `tl.constexpr` of the Triton kernels, so each value compiles its own kernel).
    needs_grad: whether backward must produce its gradient.
    optional: an optional weight (`bias: [dim] = zeros if bias`) that may be None, read only as an added
              term: None counts as zero.
    row_invariant: the same N values in every row (a weight [N]): its gradient is a sum over the rows,
              which the backward kernel reduces in place into one partial row per program.
    """

    name: str
    kind: str = "tensor"
    needs_grad: bool = True
    optional: bool = False
    row_invariant: bool = False


@dataclass(frozen=True)
class RegionOp:
    op: str
    args: tuple[str | float, ...]
    result: str
    attrs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RowRegion:
    name: str  # a Python identifier, unique in the generated package
    inputs: tuple[RegionInput, ...]
    ops: tuple[RegionOp, ...]
    outputs: tuple[str, ...]  # results leaving the region, each full-width [.., N] or per-row [.., 1]
    output_dtypes: tuple[str, ...] = ()  # per output: "f32" | "bf16" | "f16" | "input:<name>"
    source: str = ""  # "qwen2.model:25-27", for comments and the fusion report
    notes: tuple[str, ...] = field(default=())

    def result_names(self) -> set[str]:
        return {o.result for o in self.ops}
