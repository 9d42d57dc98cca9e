"""Inline small callees into their callers so fusion can see across call boundaries.

Inlined: functions and leaf modules (no submodules, no attention) whose bodies are elementwise ops,
row reductions, casts and the view/permutation ops the rewrite passes turn into region inputs
(unsqueeze, chunk/neg/concat). A norm called from a block becomes ops of the block, so the residual
add before it can join its region. The callee's weights stay where they are (`input_layernorm.weight`).
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.ir.evaluate import EvalError, evaluate
from dslc.passes.common import ELEMENTWISE, ROW_REDUCTIONS, has_syms, map_bodies, subst, subst_op

INLINE_OPS = ELEMENTWISE | ROW_REDUCTIONS | {"unsqueeze", "chunk", "concat", "identity"}


def _inlinable_body(graph: N.Graph, fns: dict[str, N.FnDef]) -> bool:
    if has_syms(graph):
        return False
    for st in graph.body:
        if isinstance(st, N.Loop):
            return False
        if st.op == "fn":
            if not _inlinable_body(fns[st.target].graph, fns):
                return False
        elif st.op not in INLINE_OPS:
            return False
    return True


class _Inliner:
    def __init__(self, program: N.Program):
        self.p = program
        self.fns = {f.name: f for f in program.fns}
        self.mods = {m.name: m for m in program.modules}
        self.counter = 0

    def fresh_prefix(self, name: str) -> str:
        self.counter += 1
        return f"{name}__{self.counter}_"

    def graph(self, g: N.Graph, owner) -> N.Graph:
        if isinstance(owner, N.ModuleDef):
            subs = {s.name: s for s in owner.submodules}
        else:
            subs = {}
        taken = {r for st in g.body for r in getattr(st, "results", ())} | {a.name for a in g.args}
        return replace(g, body=tuple(self.body(g.body, subs, taken)))

    def body(self, body, subs: dict, taken: set) -> list:
        out: list = []
        for st in body:
            if isinstance(st, N.Loop):
                out.append(replace(st, body=tuple(self.body(st.body, subs, taken))))
                continue
            inlined = None
            if st.op == "fn" and _inlinable_body(self.fns[st.target].graph, self.fns):
                inlined = self.inline_fn(st, taken)
            elif st.op == "call" and st.target in subs:
                inlined = self.inline_module(st, subs[st.target], taken)
            if inlined is None:
                out.append(st)
            else:
                out.extend(self.body(inlined, subs, taken))
        return out

    def _rename(self, graph: N.Graph, prefix: str, taken: set) -> dict[str, str]:
        names = {}
        for st in graph.body:
            for r, var in zip(st.results, st.vars):
                base = f"{prefix}{var or r}"
                name, i = base, 1
                while name in taken:
                    name, i = f"{base}_{i}", i + 1
                taken.add(name)
                names[r] = name
        return names

    def _splice(self, graph: N.Graph, call: N.Op, names: dict[str, str], bind) -> list[N.Op]:
        ops = []
        for st in graph.body:
            op = subst_op(st, bind)
            ops.append(replace(op, results=tuple(names[r] for r in st.results),
                               vars=tuple(f"{call.target}_{v}" if v else "" for v in st.vars), span=st.span))
        for res, out in zip(call.results, graph.outputs):  # the call's results take the callee's outputs
            ops.append(N.Op("identity", (N.Ref("value", names.get(out, out)),), (), (res,),
                            (call.vars[call.results.index(res)],), "", call.span))
        return ops

    def inline_fn(self, call: N.Op, taken: set) -> list[N.Op]:
        f = self.fns[call.target]
        names = self._rename(f.graph, self.fresh_prefix(f.name), taken)
        args = {a.name: e for a, e in zip(f.graph.args, call.args)}

        def bind(r: N.Ref) -> N.E:
            if r.kind == "param":
                return args[r.name]
            return _bind_value(r, args, names)

        return self._splice(f.graph, call, names, bind)

    def inline_module(self, call: N.Op, sub: N.SubmoduleDef, taken: set):
        if sub.repeat is not None or sub.condition is not None:
            return None
        mdef = self.mods[sub.module]
        if mdef.submodules or mdef.forward is None or not _inlinable_body(mdef.forward, self.fns):
            return None
        params: dict[str, N.E] = dict(zip([p.name for p in mdef.params], sub.args))
        params.update(dict(sub.kwargs))
        for p in mdef.params:
            if p.name not in params:
                params[p.name] = subst(p.default, lambda r: params[r.name] if r.kind == "param" else r)
        present: dict[str, bool] = {}
        for w in mdef.weights:
            if w.condition is None:
                present[w.name] = True
                continue
            cond = subst(w.condition, lambda r: params[r.name] if r.kind == "param" else r)
            try:
                present[w.name] = bool(evaluate(cond, _no_refs))
            except EvalError:
                return None  # depends on the config: keep the call, so both cases stay possible
        names = self._rename(mdef.forward, self.fresh_prefix(sub.name), taken)
        args = {a.name: e for a, e in zip(mdef.forward.args, call.args)}

        def bind(r: N.Ref) -> N.E:
            if r.kind == "param":
                return params[r.name]
            if r.kind == "weight":
                return N.Ref("weight", f"{sub.name}.{r.name}") if present[r.name] else N.Const(None)
            if r.kind == "dtype_of" and r.name.startswith("weight:"):
                return N.Ref("dtype_of", f"weight:{sub.name}.{r.name[len('weight:'):]}")
            return _bind_value(r, args, names)

        ops = self._splice(mdef.forward, call, names, bind)
        return [_drop_absent(op) for op in ops]


def _bind_value(r: N.Ref, args: dict[str, N.E], names: dict[str, str]) -> N.E:
    """A callee's value (or the dtype of one) in the caller: an argument's expression, or its renamed SSA value."""
    if r.kind == "value":
        return args[r.name] if r.name in args else N.Ref("value", names[r.name])
    if r.kind == "dtype_of" and not r.name.startswith("weight:"):
        inner = args.get(r.name)
        if inner is not None:
            return N.Ref("dtype_of", inner.name) if isinstance(inner, N.Ref) else r
        return N.Ref("dtype_of", names[r.name])
    return r


def _no_refs(r: N.Ref):
    raise EvalError(f"`{r.name}` is not a constant")


def _drop_absent(op: N.Op) -> N.Op:
    """`y + none` (an absent optional weight) is `y`."""
    if op.op in ("add", "sub") and any(isinstance(a, N.Const) and a.value is None for a in op.args):
        keep = [a for a in op.args if not (isinstance(a, N.Const) and a.value is None)]
        return replace(op, op="identity", args=(keep[0],))
    return op


def inline_fusable(program: N.Program) -> N.Program:
    """Inline fusable functions and leaf modules into every body."""
    inliner = _Inliner(program)
    return map_bodies(program, inliner.graph)
