"""Horizontal matmul fusion: Linear-like projections of the same input become one `fused_linear` op.

`q_proj(x)`, `k_proj(x)`, `v_proj(x)` (or `gate_proj(x)`, `up_proj(x)`) read the same activation;
one matmul against their concatenated weights reads it once and launches once. The weights stay
separate parameters (checkpoint names) unless the user fuses them at load time
(`model.fuse_projections()` / `from_pretrained(..., fuse_projections=True)`); the generated forward
takes the fused weight when it exists, and `save_pretrained` always writes the original names.
"""

from __future__ import annotations

from dataclasses import replace

from dslc.ir import nodes as N


def _linear_like(program: N.Program, sub: N.SubmoduleDef) -> bool:
    """A plain submodule whose forward is one `linear(x, weight[, bias])` of its own weights."""
    if sub.repeat is not None or sub.condition is not None:
        return False
    body = program.module(sub.module).forward.body
    if len(body) != 1 or not isinstance(body[0], N.Op) or body[0].op != "linear":
        return False
    op = body[0]
    return all(isinstance(a, N.Ref) and a.kind == "weight" for a in op.args[1:2])


def fused_name(parts: list[str]) -> str:
    """q_proj, k_proj, v_proj -> qkv_proj; gate_proj, up_proj -> gate_up_proj."""
    suffixes = {p.rsplit("_", 1)[-1] for p in parts if "_" in p}
    if len(suffixes) == 1 and all("_" in p for p in parts):
        suffix = suffixes.pop()
        heads = [p.rsplit("_", 1)[0] for p in parts]
        joined = "".join(heads) if all(len(h) == 1 for h in heads) else "_".join(heads)
        return f"{joined}_{suffix}"
    return "_".join(parts)


def fuse_projections(program: N.Program) -> N.Program:
    modules = []
    for m in program.modules:
        if m.forward is None:
            modules.append(m)
            continue
        subs = {s.name: s for s in m.submodules if _linear_like(program, s)}
        groups: dict[tuple, list[int]] = {}
        body = list(m.forward.body)
        for i, st in enumerate(body):
            if isinstance(st, N.Op) and st.op == "call" and st.target in subs and len(st.args) == 1:
                key = (st.args[0], program.module(subs[st.target].module).name, _has_bias(program, m, st.target))
                groups.setdefault(key, []).append(i)
        taken = {s.name for s in m.submodules} | {w.name for w in m.weights}
        fused: list[tuple[str, tuple[str, ...]]] = []
        replaced: dict[int, N.Op | None] = {}
        for (arg, _, _), idx in groups.items():
            if len(idx) < 2:
                continue
            parts = [body[i].target for i in idx]
            name = fused_name(parts)
            while name in taken:
                name += "_fused"
            taken.add(name)
            fused.append((name, tuple(parts)))
            first = body[idx[0]]
            replaced[idx[0]] = N.Op(
                "fused_linear",
                (arg,),
                (("parts", N.ListE(tuple(N.Const(p) for p in parts))),),
                tuple(body[i].results[0] for i in idx),
                tuple(body[i].vars[0] or body[i].target for i in idx),
                name,
                first.span,
            )
            for i in idx[1:]:
                replaced[i] = None
        if not fused:
            modules.append(m)
            continue
        new_body = tuple(replaced.get(i, st) for i, st in enumerate(body) if replaced.get(i, st) is not None)
        modules.append(replace(m, forward=replace(m.forward, body=new_body), projection_groups=tuple(fused)))
    return replace(program, modules=tuple(modules))


def _has_bias(program: N.Program, m: N.ModuleDef, sub_name: str) -> str:
    """The bias argument as written (fusion needs all parts with a bias or all without)."""
    sub = next(s for s in m.submodules if s.name == sub_name)
    return repr(dict(sub.kwargs).get("bias")) + repr(sub.args[2:3])
