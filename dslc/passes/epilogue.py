"""Bias epilogues: a biased Linear whose result feeds an elementwise op gives its bias add to that op.

`gelu_tanh(c_fc(x))` with `c_fc` a Linear with bias becomes `gelu_tanh(linear(x, c_fc.weight) + c_fc.bias)`,
so row fusion can compute the bias add and the activation in one kernel (bias + activation) instead of
the matmul writing x W^T + b and the activation reading it back. The weights stay in their module.
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.ir.evaluate import EvalError, evaluate
from dslc.passes.common import ELEMENTWISE, subst, use_counts, value_refs


def _biased_linear(program: N.Program, sub: N.SubmoduleDef) -> tuple[str, str] | None:
    """(weight, bias) names when `sub` is a plain module whose forward is `linear(x, weight, bias)` and the bias
    exists whatever the config (its condition folds to true from the constructor's constant arguments)."""
    if sub.repeat is not None or sub.condition is not None:
        return None
    mdef = program.module(sub.module)
    body = mdef.forward.body
    if len(body) != 1 or not isinstance(body[0], N.Op) or body[0].op != "linear" or len(body[0].args) != 3:
        return None
    _, w, b = body[0].args
    if not (isinstance(w, N.Ref) and w.kind == "weight" and isinstance(b, N.Ref) and b.kind == "weight"):
        return None
    params: dict[str, N.E] = dict(zip([p.name for p in mdef.params], sub.args))
    params.update(dict(sub.kwargs))
    for p in mdef.params:
        params.setdefault(p.name, p.default)
    bias = next(x for x in mdef.weights if x.name == b.name)
    if bias.condition is not None:
        cond = subst(bias.condition, lambda r: params[r.name] if r.kind == "param" and params.get(r.name) is not None
                     else r)
        try:
            if not evaluate(cond, _constant):
                return None
        except EvalError:
            return None  # present only for some configs: keep the call
    return w.name, b.name


def _constant(r: N.Ref):
    raise EvalError(f"`{r.name}` is not a constant")


def split_bias_epilogues(program: N.Program) -> N.Program:
    modules = []
    for m in program.modules:
        if m.forward is None:
            modules.append(m)
            continue
        subs = {s.name: s for s in m.submodules}
        counts = use_counts(m.forward)
        readers: dict[str, list[N.Op]] = {}
        for st in m.forward.body:
            if isinstance(st, N.Op):
                for v in value_refs(st):
                    readers.setdefault(v, []).append(st)
        body: list = []
        taken = {r for st in m.forward.body for r in getattr(st, "results", ())}
        for st in m.forward.body:
            split = None
            if isinstance(st, N.Op) and st.op == "call" and st.target in subs and len(st.args) == 1:
                r = st.results[0]
                users = readers.get(r, [])
                if counts.get(r) == 1 and len(users) == 1 and users[0].op in ELEMENTWISE:
                    split = _biased_linear(program, subs[st.target])
            if split is None:
                body.append(st)
                continue
            weight, bias = split
            t = f"{st.target}_matmul"
            while t in taken:
                t += "_"
            taken.add(t)
            body.append(N.Op("linear", (st.args[0], N.Ref("weight", f"{st.target}.{weight}")), (), (t,), ("",), "",
                             st.span))
            body.append(N.Op("add", (N.Ref("value", t), N.Ref("weight", f"{st.target}.{bias}")), (), st.results,
                             st.vars, "", st.span))
        modules.append(replace(m, forward=replace(m.forward, body=tuple(body))))
    return replace(program, modules=tuple(modules))
