"""Grouped launches: two calls of one fused region, neither reading the other, become one launch.

`q = rope(cos, q, sin)` and `k = rope(cos, k, sin)` run the same region kernel on tensors of different
head counts. The pass turns such a pair into one `region` op with `group = 2`: the first call's inputs
then the second's, the first call's results then the second's, at the place of the first call. The
generated package runs it as `kernels.<region>_x2(...)`: on the Triton path one grid covers both
problems (programs below the first problem's block count take it, the rest the second).

Regions whose backward keeps partial sums for a row-invariant input (norm weights) or that take an
optional weight are not grouped: their launches stay one per call.
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.ir.regions import RowRegion
from dslc.passes.common import map_bodies, value_refs


def groupable(region: RowRegion) -> bool:
    """Whether calls of `region` may share a launch."""
    return not any((i.row_invariant and i.needs_grad) or i.optional for i in region.inputs)


def group_regions(program: N.Program) -> N.Program:
    """Pair the independent calls of each groupable region within every body (see the module docstring)."""
    eligible = {r.name for r in program.regions if groupable(r)}
    if not eligible:
        return program

    def rewrite(graph: N.Graph, _owner) -> N.Graph:
        return replace(graph, body=tuple(_pair(graph.body, eligible)))

    return map_bodies(program, rewrite)


def _pair(body, eligible: set[str]) -> list:
    body = list(body)
    defined_at = {r: i for i, st in enumerate(body) for r in st.results}
    taken: set[int] = set()
    out = []
    for i, st in enumerate(body):
        if i in taken:
            continue
        if isinstance(st, (N.Loop, N.Branch)):
            out.append(N.with_bodies(st, [_pair(b, eligible) for b in N.bodies(st)]))
            continue
        if st.op == "region" and st.target in eligible and not st.kwargs:
            j = next(
                (j for j in range(i + 1, len(body)) if j not in taken and _partner(st, body[j], i, defined_at)), None
            )
            if j is not None:
                other = body[j]
                taken.add(j)
                st = replace(
                    st,
                    args=st.args + other.args,
                    kwargs=((N.REGION_GROUP, N.Const(2)),),
                    results=st.results + other.results,
                    vars=st.vars + other.vars,
                )
        out.append(st)
    return out


def _partner(first: N.Op, other, at: int, defined_at: dict[str, int]) -> bool:
    """`other` calls the same region and reads only values defined before `first` (so it can move there)."""
    return (
        isinstance(other, N.Op)
        and other.op == "region"
        and other.target == first.target
        and not other.kwargs
        and all(defined_at.get(v, -1) < at for v in value_refs(other))
    )
