"""Local rewrites that expose fusable regions.

- `x1, x2 = chunk(x, 2, dim=-1); concat(-x2, x1, dim=-1)` is `rotate_half(x)`: a permutation within
  the row, which a row kernel computes by loading x at permuted columns.
- A view of an elementwise result, `unsqueeze(cast(x, T), d)`, becomes `cast(unsqueeze(x, d), T)`:
  the view then applies to the region's input (free: only strides change) instead of splitting it.
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.passes.common import ELEMENTWISE, map_bodies, use_counts

VIEW_OPS = {"unsqueeze"}


def _is_last_dim(e: N.E | None) -> bool:
    return e is None or (isinstance(e, N.Const) and e.value == -1)


def _val(e: N.E) -> str | None:
    return e.name if isinstance(e, N.Ref) and e.kind == "value" else None


def rotate_half(program: N.Program) -> N.Program:
    def fn(g: N.Graph, owner) -> N.Graph:
        counts = use_counts(g)
        body = list(g.body)
        by_result = {r: i for i, st in enumerate(body) if isinstance(st, N.Op) for r in st.results}
        for i, st in enumerate(body):
            if not isinstance(st, N.Op) or st.op != "concat" or len(st.args) != 2:
                continue
            if not _is_last_dim(dict(st.kwargs).get("dim")):
                continue
            neg_name, x1 = _val(st.args[0]), _val(st.args[1])
            j = by_result.get(neg_name)
            if j is None or body[j] is None or body[j].op != "neg" or counts.get(neg_name) != 1:
                continue
            x2 = _val(body[j].args[0])
            k = by_result.get(x1)
            if k is None or body[k] is None or body[k].op != "chunk" or body[k].results != (x1, x2):
                continue
            ch = body[k]
            if not (
                isinstance(ch.args[1], N.Const) and ch.args[1].value == 2 and _is_last_dim(dict(ch.kwargs).get("dim"))
            ):
                continue
            if counts.get(x1) != 1 or counts.get(x2) != 1:
                continue
            body[i] = replace(st, op="rotate_half", args=(ch.args[0],), kwargs=())
            body[j] = None
            body[k] = None
        return replace(g, body=tuple(b for b in body if b is not None))

    return map_bodies(program, fn)


def views_first(program: N.Program) -> N.Program:
    def fn(g: N.Graph, owner) -> N.Graph:
        changed = True
        body = list(g.body)
        while changed:
            changed = False
            counts = use_counts(replace(g, body=tuple(body)))
            by_result = {r: i for i, st in enumerate(body) if isinstance(st, N.Op) for r in st.results}
            for i, st in enumerate(body):
                if not isinstance(st, N.Op) or st.op not in VIEW_OPS:
                    continue
                src = _val(st.args[0])
                j = by_result.get(src)
                if j is None or counts.get(src) != 1:
                    continue
                inner = body[j]
                if inner.op not in ELEMENTWISE - {"rotate_half"} or len(inner.args) != 1 and inner.op != "cast":
                    continue
                x = inner.args[0]
                if _val(x) is None:
                    continue
                # view first: u = unsqueeze(x); result = inner(u)
                view = replace(st, args=(x,) + st.args[1:], results=(src,), vars=("",))
                body[j] = view
                body[i] = replace(inner, args=(N.Ref("value", src),) + inner.args[1:], results=st.results, vars=st.vars)
                changed = True
                break
        return replace(g, body=tuple(body))

    return map_bodies(program, fn)
