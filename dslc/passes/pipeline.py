"""The optimization pipeline: a flat list, read top to bottom, each pass one file.

Every pass maps a Program to a Program; `optimize` re-infers types where a pass needs them, and
(with `verify=True`, as the tests run it) checks the IR's rules after each pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from dslc.ir import nodes as N
from dslc.passes.cleanup import copy_propagate, cse, dce
from dslc.passes.grouping import group_regions
from dslc.passes.horizontal import fuse_projections
from dslc.passes.inline import inline_fusable
from dslc.passes.losshead import find_loss_head_softcap
from dslc.passes.residual import fuse_residual_norms
from dslc.passes.rewrite import rotate_half, views_first
from dslc.passes.rowfusion import FusionReport, fuse_rows

PIPELINE = [
    ("inline", inline_fusable),  # small fns (rope, rotate_half) into their callers; modules stay calls
    ("copy-propagate", copy_propagate),  # drop `a = b` copies the inliner left
    ("rotate-half", rotate_half),  # chunk / neg / concat over the last dim -> one permutation op
    ("views-first", views_first),  # unsqueeze(cast(x)) -> cast(unsqueeze(x)): views move to region inputs
    ("cse", cse),  # identical pure ops computed once
    ("dce", dce),  # pure ops whose results nobody reads
    ("loss-head-softcap", find_loss_head_softcap),  # head + cap * tanh(logits / cap): the fused loss caps per chunk
    ("horizontal-matmul", fuse_projections),  # projections of one input (q/k/v, gate/up) -> one fused_linear
    (
        "residual-norm",
        fuse_residual_norms,
    ),  # `norm(a + b)` -> `norm(a, residual = b)`: the add runs in the norm (needs types)
    ("row-fusion", fuse_rows),  # elementwise chains and last-dim reductions -> RowRegions (needs types)
    ("dce-after-fusion", dce),
    ("region-group", group_regions),  # two independent calls of one region (rope of q and k) -> one launch
]


@dataclass
class Optimized:
    program: N.Program
    types: dict  # value types of the optimized program, per module instance
    report: FusionReport


class PassError(Exception):
    """A pass produced IR that breaks the IR's rules (a compiler bug); names the pass and the rules."""


def optimize(program: N.Program, verify: bool = False) -> Optimized:
    from dslc.check.types import infer_types

    report = FusionReport()
    for name, run in PIPELINE:
        if run is fuse_rows:
            program, report = fuse_rows(program, infer_types(program))
        elif run is fuse_residual_norms:
            program = fuse_residual_norms(program, infer_types(program))
        else:
            program = run(program)
        if verify:
            from dslc.ir.verify import verify_program

            problems = verify_program(program, extra_ops=("region", "rotate_half", "fused_linear"))
            if problems:
                raise PassError(f"after pass `{name}`:\n  " + "\n  ".join(problems))
    return Optimized(program, infer_types(program, symbolic=True), report)
