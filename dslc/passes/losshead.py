"""The LM head's final soft-cap: the fused loss takes it inside its chunks.

A causal LM whose forward ends in its Linear-like head followed by `cap * tanh(logits / cap)` (Gemma 2's
final_logit_softcapping), written directly or as the build-time branch
`cap * tanh(logits / cap) if cap != none else logits`, gets the cap recorded on its ModuleDef
(`head_softcap`). The forward is left as it is (inference computes the capped logits as written); the
generated package's training loss (the chunked fused linear cross-entropy) applies the cap per chunk and
takes the gradient through 1 - tanh^2, so the [tokens, vocab] logits are never materialized.
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N
from dslc.ir.evaluate import free_refs


def _value(e: N.E) -> str | None:
    return e.name if isinstance(e, N.Ref) and e.kind == "value" else None


def _static(e: N.E) -> bool:
    """A build-time expression: no tensor value or weight in it."""
    return all(r.kind not in ("value", "weight") for r in free_refs(e))


def _softcap_of(ops, logits: str) -> tuple[N.E, str] | None:
    """(cap, result) when `ops` are exactly div(logits, cap), tanh, mul by the same cap (either side)."""
    if len(ops) != 3 or not all(isinstance(o, N.Op) for o in ops):
        return None
    div, tanh, mul = ops
    if (div.op, tanh.op, mul.op) != ("div", "tanh", "mul") or div.kwargs or tanh.kwargs or mul.kwargs:
        return None
    if len(div.args) != 2 or _value(div.args[0]) != logits or not _static(div.args[1]):
        return None
    cap = div.args[1]
    if tanh.args != (N.Ref("value", div.results[0]),) or len(mul.args) != 2:
        return None
    t = N.Ref("value", tanh.results[0])
    if mul.args not in ((cap, t), (t, cap)):
        return None
    return cap, mul.results[0]


def find_head_softcap(m: N.ModuleDef) -> N.HeadSoftcap | None:
    """The soft-cap after the head call, when the forward's last statements are exactly one of the two forms
    (the head itself is checked by the code generator's `loss_head`: a Linear-like submodule's call)."""
    g = m.forward
    if g is None or len(g.outputs) != 1:
        return None
    body = g.body
    calls = [i for i, st in enumerate(body) if isinstance(st, N.Op) and st.op == "call" and len(st.results) == 1]
    if not calls:
        return None
    logits, tail = body[calls[-1]].results[0], body[calls[-1] + 1 :]  # the last call: the head
    found = _softcap_of(tail, logits)
    if found is not None and found[1] == g.outputs[0]:
        return N.HeadSoftcap(logits, found[0], None)
    if len(tail) != 1 or not isinstance(tail[0], N.Branch) or tail[0].results != g.outputs:
        return None
    branch = tail[0]
    if not _static(branch.test):
        return None
    for capped, plain, capped_value, plain_value, test in (
        (branch.then, branch.orelse, branch.then_value, branch.else_value, branch.test),
        (branch.orelse, branch.then, branch.else_value, branch.then_value, N.UnE("not", branch.test)),
    ):
        found = _softcap_of(capped, logits)
        if found is not None and not plain and _value(plain_value) == logits and _value(capped_value) == found[1]:
            return N.HeadSoftcap(logits, found[0], test)
    return None


def find_loss_head_softcap(program: N.Program) -> N.Program:
    """Record the final soft-cap of the causal LM's head on the model's ModuleDef (see the module docstring)."""
    modules = []
    for m in program.modules:
        if m.name == program.model and m.task == "causal_lm" and m.head_softcap is None:
            cap = find_head_softcap(m)
            if cap is not None:
                m = replace(m, head_softcap=cap)
        modules.append(m)
    return replace(program, modules=tuple(modules))
