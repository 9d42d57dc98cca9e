"""Copy propagation, common-subexpression elimination and dead-code elimination."""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.ir import ops
from dslc.passes.common import map_bodies, subst, subst_op, use_counts

# calls may hold state (KV cache, RNG); the impure primitives come from the op table
PURE_EXCLUDED = {"call", "region"} | ops.IMPURE


def _rename_ref(names: dict[str, str]):
    def f(r: N.Ref) -> N.E:
        if r.kind in ("value", "dtype_of") and r.name in names:
            return N.Ref(r.kind, names[r.name])
        return r

    return f


def _propagate(body, names: dict[str, str], counts: dict[str, int]) -> list:
    """Drop `a = identity(b)` where b is a value, renaming uses of a to b. When b is a temporary read
    only by the copy, b's defining op takes a's name instead, so the user's variable name survives."""
    out = []
    for st in body:
        if isinstance(st, N.Loop):
            inner = _propagate(st.body, names, counts)
            out.append(
                replace(
                    st,
                    body=tuple(inner),
                    inputs=tuple(names.get(v, v) for v in st.inputs),
                    yields=tuple(names.get(v, v) for v in st.yields),
                )
            )
            continue
        if isinstance(st, N.Branch):
            out.append(_branch_sides(st, lambda body: _propagate(body, names, counts), names))
            continue
        st = subst_op(st, _rename_ref(names))
        if st.op == "identity" and isinstance(st.args[0], N.Ref) and st.args[0].kind == "value":
            src, dst = st.args[0].name, st.results[0]
            k = next(
                (i for i in range(len(out) - 1, -1, -1) if isinstance(out[i], N.Op) and src in out[i].results), None
            )
            if k is not None and counts.get(src, 0) == 1 and st.vars[0]:
                op = out[k]
                j = op.results.index(src)
                if not op.vars[j] or "__" in src:
                    out[k] = replace(
                        op,
                        results=op.results[:j] + (dst,) + op.results[j + 1 :],
                        vars=op.vars[:j] + (st.vars[0],) + op.vars[j + 1 :],
                    )
                    continue
            names[dst] = src
            continue
        out.append(st)
    return out


def _branch_sides(st: N.Branch, visit, names: dict[str, str]) -> N.Branch:
    """A branch with each side's body visited and both sides' values renamed (names found inside a side
    stay inside it: SSA names are unique, so the other side never meets them)."""
    then, orelse = visit(st.then), visit(st.orelse)
    rename = _rename_ref(names)
    return replace(
        st,
        then=tuple(then),
        orelse=tuple(orelse),
        then_value=subst(st.then_value, rename),
        else_value=subst(st.else_value, rename),
    )


def copy_propagate(program: N.Program) -> N.Program:
    def fn(g: N.Graph, owner) -> N.Graph:
        names: dict[str, str] = {}
        body = _propagate(g.body, names, use_counts(g))
        return replace(g, body=tuple(body), outputs=tuple(names.get(o, o) for o in g.outputs))

    return map_bodies(program, fn)


def cse(program: N.Program) -> N.Program:
    """Two pure ops with the same name, arguments and keywords compute the same value: keep the first."""

    def fn(g: N.Graph, owner) -> N.Graph:
        names: dict[str, str] = {}

        def visit(body) -> list:
            seen: dict = {}
            out = []
            for st in body:
                if isinstance(st, N.Loop):
                    out.append(
                        replace(
                            st,
                            body=tuple(visit(st.body)),
                            inputs=tuple(names.get(v, v) for v in st.inputs),
                            yields=tuple(names.get(v, v) for v in st.yields),
                        )
                    )
                    continue
                if isinstance(st, N.Branch):  # each side its own scope: nothing merges across sides
                    out.append(_branch_sides(st, visit, names))
                    continue
                st = subst_op(st, _rename_ref(names))
                if st.op not in PURE_EXCLUDED:
                    key = (st.op, st.target, st.args, st.kwargs, len(st.results))
                    if key in seen:
                        for r, prev in zip(st.results, seen[key].results):
                            names[r] = prev
                        continue
                    seen[key] = st
                out.append(st)
            return out

        body = visit(g.body)
        return replace(g, body=tuple(body), outputs=tuple(names.get(o, o) for o in g.outputs))

    return map_bodies(program, fn)


def _impure(body) -> bool:
    return any(st.op in PURE_EXCLUDED for st in N.iter_ops(body))


def dce(program: N.Program) -> N.Program:
    """Remove pure ops none of whose results are used."""

    def keep(st, counts: dict) -> bool:
        if isinstance(st, N.Loop) or (isinstance(st, N.Op) and st.op in PURE_EXCLUDED):
            return True
        if isinstance(st, N.Branch) and any(_impure(body) for body in N.bodies(st)):
            return True
        return any(counts.get(r, 0) for r in st.results)

    def visit(body, counts: dict) -> list:
        return [
            N.with_bodies(st, [visit(b, counts) for b in N.bodies(st)]) if N.bodies(st) else st
            for st in body
            if keep(st, counts)
        ]

    def fn(g: N.Graph, owner) -> N.Graph:
        while True:
            new = replace(g, body=tuple(visit(g.body, use_counts(g))))
            if new == g:
                return g
            g = new

    return map_bodies(program, fn)
