"""Inline small functions into their callers so fusion can see across call boundaries.

Inlined: `fn`s whose bodies are elementwise ops, row reductions, casts and the view/permutation ops the
rewrite passes turn into region inputs (unsqueeze, chunk/neg/concat), such as rotary embedding. Modules are
never inlined: each is called through its forward, so hooks, LoRA wrappers and swapped modules take effect;
a norm fuses inside its own forward (and takes the residual add before it: see `residual.py`).
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.passes.common import ELEMENTWISE, ROW_REDUCTIONS, defined_names, has_syms, map_bodies, subst_op

INLINE_OPS = ELEMENTWISE | ROW_REDUCTIONS | {"unsqueeze", "chunk", "concat", "identity"}


def _inlinable_body(graph: N.Graph, fns: dict[str, N.FnDef]) -> bool:
    if has_syms(graph):
        return False
    for st in graph.body:
        if isinstance(st, (N.Loop, N.Branch)):
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
        self.counter = 0

    def fresh_prefix(self, name: str) -> str:
        self.counter += 1
        return f"{name}__{self.counter}_"

    def graph(self, g: N.Graph, _owner) -> N.Graph:
        taken = {r for st in g.body for r in defined_names(st)} | {a.name for a in g.args}
        return replace(g, body=tuple(self.body(g.body, taken)))

    def body(self, body, taken: set) -> list:
        out: list = []
        for st in body:
            if isinstance(st, (N.Loop, N.Branch)):
                out.append(N.with_bodies(st, [self.body(b, taken) for b in N.bodies(st)]))
            elif st.op == "fn" and _inlinable_body(self.fns[st.target].graph, self.fns):
                out.extend(self.body(self.inline_fn(st, taken), taken))
            else:
                out.append(st)
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
            # library code inlined into a spec cites the spec's call line, not the library's own
            span = st.span if st.span.file == call.span.file else call.span
            ops.append(
                replace(
                    op,
                    results=tuple(names[r] for r in st.results),
                    vars=tuple(f"{call.target}_{v}" if v else "" for v in st.vars),
                    span=span,
                )
            )
        for res, out in zip(call.results, graph.outputs):  # the call's results take the callee's outputs
            ops.append(
                N.Op(
                    "identity",
                    (N.Ref("value", names.get(out, out)),),
                    (),
                    (res,),
                    (call.vars[call.results.index(res)],),
                    "",
                    call.span,
                )
            )
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


def inline_fusable(program: N.Program) -> N.Program:
    """Inline fusable functions into every body."""
    inliner = _Inliner(program)
    return map_bodies(program, inliner.graph)
