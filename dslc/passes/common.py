"""Helpers shared by the passes: op classification, substitution, walking bodies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from dslc.ir import nodes as N
from dslc.ir.evaluate import free_refs
from dslc.ir.regions import BINARY_OPS, ROW_OPS, UNARY_OPS

ELEMENTWISE = set(UNARY_OPS) | set(BINARY_OPS) | {"cast", "rotate_half"}  # the fusable non-reductions
ROW_REDUCTIONS = set(ROW_OPS)
VIEW_OPS = ("unsqueeze", "squeeze", "transpose", "reshape", "select")  # a new view of one value, no new numbers


def subst(e: N.E, f: Callable[[N.Ref], N.E]) -> N.E:
    """Replace every Ref in `e` by f(ref)."""
    if isinstance(e, N.Ref):
        return f(e)
    if isinstance(e, N.BinE):
        return N.BinE(e.op, subst(e.left, f), subst(e.right, f))
    if isinstance(e, N.UnE):
        return N.UnE(e.op, subst(e.operand, f))
    if isinstance(e, N.CondE):
        return N.CondE(subst(e.then, f), subst(e.test, f), subst(e.orelse, f))
    if isinstance(e, N.ListE):
        return N.ListE(tuple(subst(i, f) for i in e.items))
    return e


def subst_op(op: N.Op, f: Callable[[N.Ref], N.E]) -> N.Op:
    return replace(op, args=tuple(subst(a, f) for a in op.args), kwargs=tuple((k, subst(v, f)) for k, v in op.kwargs))


def value_refs(op) -> list[str]:
    """SSA values an op, loop or branch reads (from outside it, for a loop or a branch)."""
    if isinstance(op, N.Loop):
        inner = {v for st in op.body for v in value_refs(st)}
        defined = set(op.params) | {r for st in op.body for r in defined_names(st)}
        return list(op.inputs) + sorted(inner - defined)
    if isinstance(op, N.Branch):
        inner = {v for body in N.bodies(op) for st in body for v in value_refs(st)}
        inner |= {r.name for e in (op.then_value, op.else_value) for r in free_refs(e) if r.kind == "value"}
        defined = {r for body in N.bodies(op) for st in body for r in defined_names(st)}
        return sorted(inner - defined)
    out = []
    for a in list(op.args) + [v for _, v in op.kwargs]:
        for r in free_refs(a):
            if r.kind == "value":
                out.append(r.name)
            elif r.kind == "dtype_of" and not r.name.startswith("weight:"):
                out.append(r.name)
    return out


def defined_names(st) -> list[str]:
    """Every value a statement defines, inside its loop or branch bodies too."""
    if isinstance(st, N.Loop):
        return list(st.results) + list(st.params) + [r for s in st.body for r in defined_names(s)]
    if isinstance(st, N.Branch):
        return list(st.results) + [r for body in N.bodies(st) for s in body for r in defined_names(s)]
    return list(st.results)


def use_counts(graph: N.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}

    def visit(body) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                for v in st.inputs:
                    counts[v] = counts.get(v, 0) + 1
                visit(st.body)
                for v in st.yields:
                    counts[v] = counts.get(v, 0) + 1
                continue
            if isinstance(st, N.Branch):
                for body, value in ((st.then, st.then_value), (st.orelse, st.else_value)):
                    visit(body)
                    for r in free_refs(value):
                        if r.kind == "value":
                            counts[r.name] = counts.get(r.name, 0) + 1
                continue
            for v in value_refs(st):
                counts[v] = counts.get(v, 0) + 1

    visit(graph.body)
    for o in graph.outputs:
        counts[o] = counts.get(o, 0) + 1
    return counts


def map_bodies(program: N.Program, fn) -> N.Program:
    """Apply fn(graph, owner) -> Graph to every module forward (and residual variant) and fn body."""
    modules = tuple(
        replace(
            m,
            forward=fn(m.forward, m) if m.forward is not None else None,
            residual=fn(m.residual, m) if m.residual is not None else None,
        )
        for m in program.modules
    )
    fns = tuple(replace(f, graph=fn(f.graph, f)) for f in program.fns)
    return replace(program, modules=modules, fns=fns)


def has_syms(graph: N.Graph) -> bool:
    def body_has(body) -> bool:
        for st in body:
            if isinstance(st, (N.Loop, N.Branch)):
                if any(body_has(inner) for inner in N.bodies(st)):
                    return True
                continue
            for a in list(st.args) + [v for _, v in st.kwargs]:
                if any(r.kind == "sym" for r in free_refs(a)):
                    return True
        return False

    return body_has(graph.body)
