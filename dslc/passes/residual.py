"""Residual norms: `s = a + b` read by a norm submodule becomes `n, s = norm(a, residual = b)`.

The residual add of a pre-norm block (`x = x + attn(...)`, then `post_attention_layernorm(x)`) and of a
post-norm block (`LayerNorm(dense(h) + residual)`) is then computed inside the norm's own forward, in the
norm's kernel, which returns the normalized value and the sum (as vLLM's and Liger's fused norms do). The
norm stays a module called through its forward, so hooks, swaps and changed attributes take effect.

A norm here is a leaf module (no submodules) whose forward takes one tensor and returns one, built only
of elementwise ops and at least one last-dim reduction. The pass gives its ModuleDef a `residual` graph:
`forward(x, residual)` = `(forward(x + residual), x + residual)`.
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.passes.common import ELEMENTWISE, ROW_REDUCTIONS, subst_op, value_refs

RESIDUAL_SUM = "residual_sum"  # the sum's name inside a norm's residual forward


def is_norm(program: N.Program, module: str) -> bool:
    """A leaf module of one tensor in and out, made of elementwise ops and at least one row reduction."""
    m = program.module(module)
    g = m.forward
    if g is None or m.submodules or len(g.args) != 1 or g.args[0].tensor is None or len(g.outputs) != 1:
        return False
    allowed = ELEMENTWISE | ROW_REDUCTIONS | {"identity"}
    if any(not isinstance(st, N.Op) or st.op not in allowed for st in g.body):
        return False
    return any(st.op in ROW_REDUCTIONS for st in g.body)


def residual_graph(m: N.ModuleDef) -> N.Graph:
    """forward(x, residual) -> (forward(x + residual), x + residual)."""
    g = m.forward
    x = g.args[0]
    taken = {a.name for a in g.args} | {r for st in g.body for r in st.results}
    residual, total = "residual", RESIDUAL_SUM
    while residual in taken:
        residual += "_"
    while total in taken:
        total += "_"
    add = N.Op("add", (N.Ref("value", x.name), N.Ref("value", residual)), (), (total,), (total,), "", g.span)

    def rebind(r: N.Ref) -> N.E:
        if r.kind == "value" and r.name == x.name:
            return N.Ref("value", total)
        if r.kind == "dtype_of" and r.name == x.name:
            return N.Ref("dtype_of", total)
        return r

    body = (add,) + tuple(subst_op(st, rebind) for st in g.body)
    outputs = tuple(total if o == x.name else o for o in g.outputs) + (total,)
    args = (x, replace(x, name=residual))
    return N.Graph(args, body, outputs, None, g.span)


def _rewrite(body, norms: set[str], subs: dict[str, N.SubmoduleDef], types: dict) -> tuple[list, bool]:
    out: list = []
    changed = False
    adds: dict[str, int] = {}  # sum value -> its index in `out`
    for st in body:
        if isinstance(st, (N.Loop, N.Branch)):
            bodies = []
            for body_ in N.bodies(st):
                inner, ch = _rewrite(body_, norms, subs, types)
                bodies.append(inner)
                changed |= ch
            out.append(N.with_bodies(st, bodies))
            adds.clear()
            continue
        if st.op == "add" and len(st.results) == 1 and all(isinstance(a, N.Ref) and a.kind == "value" for a in st.args):
            a, b = (types.get(x.name) for x in st.args)
            if a is not None and a == b == types.get(st.results[0]):
                adds[st.results[0]] = len(out)
        if (
            st.op == "call"
            and st.target in subs
            and subs[st.target].module in norms
            and len(st.args) == 1
            and isinstance(st.args[0], N.Ref)
            and st.args[0].name in adds
        ):
            k = adds.pop(st.args[0].name)
            add = out[k]
            # the sum's readers between the add and this call would lose it: only rewrite when there are none
            between = [v for op in out[k + 1 :] for v in value_refs(op)]
            if add.results[0] not in between:
                out.pop(k)
                adds = {v: i - (i > k) for v, i in adds.items()}
                out.append(
                    replace(
                        st,
                        args=(add.args[0],),
                        kwargs=(("residual", add.args[1]),),
                        results=st.results + add.results,
                        vars=st.vars + add.vars,
                    )
                )
                changed = True
                continue
        out.append(st)
    return out, changed


def fuse_residual_norms(program: N.Program, types: dict) -> N.Program:
    """Move each residual add that feeds a norm submodule into that norm's call (types: `infer_types`)."""
    norms = {m.name for m in program.modules if is_norm(program, m.name)}
    first_types: dict[str, dict] = {}
    for (kind, name, _params), t in types.items():
        if kind == "module" and name not in first_types:
            first_types[name] = t
    used: set[str] = set()
    modules = []
    for m in program.modules:
        if m.forward is None or m.name not in first_types:
            modules.append(m)
            continue
        subs = {s.name: s for s in m.submodules if s.repeat is None and s.condition is None}
        body, changed = _rewrite(m.forward.body, norms, subs, first_types[m.name])
        if changed:
            used |= {
                subs[st.target].module for st in N.iter_ops(body) if st.op == "call" and dict(st.kwargs).get("residual")
            }
            m = replace(m, forward=replace(m.forward, body=tuple(body)))
        modules.append(m)
    modules = [replace(m, residual=residual_graph(m)) if m.name in used else m for m in modules]
    return replace(program, modules=tuple(modules))
