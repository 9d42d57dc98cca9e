"""Every config the `require`s allow: search for one under which a spec that checks fails.

The checker proves a spec for one evaluated config. A size written as a number where a field belongs
(`Linear(896, ...)` for `hidden_size`) or a missing `require` (`hidden_size % num_attention_heads == 0`) passes
that check and fails on the next checkpoint. This module varies the config's free fields (ints, bools, strings
compared in the spec, optional fields between none and a value), keeps the variants every `require` accepts,
and the caller checks each. A failing variant is shrunk to the fewest changed fields, so the report names the
fields that matter. Each failure found is a real config that breaks the spec; finding none is evidence over the
variants tried, not a proof.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import fields as dataclass_fields
from dataclasses import is_dataclass

from dslc.ir import nodes as N
from dslc.ir import ops
from dslc.ir.evaluate import EvalError, evaluate, free_refs
from dslc.ir.lower import _check_type as check_type  # the config's own type rule, as lowering applies it

Values = dict  # field -> value

_MISSING = object()


def config_values(config: N.ConfigDef, base: Values, changes: Values, derived: set[str]) -> Values | None:
    """`base` with `changes` applied and the derived fields recomputed; None when a type or a `require` fails."""
    by_name = {f.name: f for f in config.fields}
    values: Values = {}

    def value_of(name: str):
        if name not in values:
            values[name] = _MISSING  # a cycle reads as unknown
            f = by_name[name]
            if name in changes:
                v = changes[name]
            elif name in derived:
                v = evaluate(f.default, lambda r: _known(value_of(r.name)))
            else:
                v = base[name]
            values[name] = v
        return _known(values[name])

    try:
        for name in by_name:
            value_of(name)
        if not all(check_type(values[f.name], f.type, f.optional) for f in config.fields):
            return None
        for r in config.requires:
            if not evaluate(r.test, lambda ref: values[ref.name]):
                return None
    except (EvalError, KeyError):
        return None
    return values


def _known(v):
    if v is _MISSING:
        raise EvalError("cycle")
    return v


def derived_fields(config: N.ConfigDef, given: set[str]) -> set[str]:
    """Fields whose default reads other fields (`head_dim = hidden_size // num_attention_heads`), unless the
    check's arch or `--set` gives them a value (`given`)."""
    return {f.name for f in config.fields if f.default is not None and free_refs(f.default) and f.name not in given}


def compared_strings(program: N.Program) -> dict[str, set[str]]:
    """Config field -> the string literals the spec compares it with (`hidden_act == "silu"`), and for a field
    read as an activation's name (`activation(x, hidden_act)`) every name of the activation table: its
    candidates."""
    out: dict[str, set[str]] = {}
    for e in _expressions(program):
        if isinstance(e, N.BinE) and e.op in ("==", "!="):
            for a, b in ((e.left, e.right), (e.right, e.left)):
                if isinstance(a, N.Ref) and a.kind == "config" and isinstance(b, N.Const) and isinstance(b.value, str):
                    out.setdefault(a.name, set()).add(b.value)
    for name in activation_fields(program):  # an activation's name: every activation of the table
        out.setdefault(name, set()).update(ops.ACTIVATIONS)
    return out


def activation_fields(program: N.Program) -> dict[str, str]:
    """Config field -> the module whose forward reads it as an activation's name: `activation(x, hidden_act)`
    (or a side of a build-time `if`), or through a module parameter (`module GatedMLP(act: str = "silu")` instantiated with `act = hidden_act`).
    Such a field takes exactly the names of `ops.ACTIVATIONS`."""
    out: dict[str, str] = {}
    by_name = {m.name: m for m in program.modules}
    named_by_param: set[tuple[str, str]] = set()  # (module, param) read as a name
    regions = {r.name: r for r in program.regions}

    def names_read(op: N.Op) -> list[N.E]:
        if op.op == "activation" and len(op.args) == 2:
            return [op.args[1]]
        if op.op == "region" and op.target in regions:  # after fusion: the region's choice inputs
            inputs = regions[op.target].inputs
            return [a for k, a in enumerate(op.args) if inputs[k % len(inputs)].kind == "choice"]
        return []

    for m in program.modules:
        if m.forward is None:
            continue
        for op in N.iter_ops(m.forward.body):
            for ref in (r for e in names_read(op) for r in _taken(e)):
                if ref.kind == "config":
                    out.setdefault(ref.name, m.name)
                elif ref.kind == "param":
                    named_by_param.add((m.name, ref.name))
    for m in program.modules:
        for sub in m.submodules:
            for side in N.choices(sub):
                child = by_name.get(side.module)
                if child is None:
                    continue
                given = dict(zip((p.name for p in child.params), side.args)) | dict(side.kwargs)
                for p in child.params:
                    if (child.name, p.name) in named_by_param:
                        for r in _taken(given.get(p.name, p.default)):
                            if r.kind == "config":
                                out.setdefault(r.name, child.name)
    return out


def _taken(e) -> list[N.Ref]:
    """The names whose value `e` may be: `e` itself, or either side of a build-time `a if c else b`
    (Gemma's `"gelu_pytorch_tanh" if hidden_act == "gelu" else hidden_act`)."""
    if isinstance(e, N.Ref):
        return [e]
    if isinstance(e, N.CondE):
        return _taken(e.then) + _taken(e.orelse)
    return []


def _expressions(node) -> Iterator:
    """Every node reachable from `node` through dataclass fields, tuples and dicts."""
    stack = [node]
    seen: set[int] = set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        if is_dataclass(n) and not isinstance(n, type):
            stack.extend(getattr(n, f.name) for f in dataclass_fields(n))
        elif isinstance(n, (tuple, list)):
            stack.extend(n)
        elif isinstance(n, dict):
            stack.extend(n.values())


def candidates(f: N.FieldDef, current, strings: set[str]) -> list:
    """Other values worth trying for one field: small sizes, primes, half, double and the next int; the other
    branch of a bool; the strings the spec compares it with; none and a value for an optional field."""
    out: list = []
    if f.type == "int" and not isinstance(current, bool):
        d = current if isinstance(current, int) else 0
        out = [1, 2, 3, 5, 7, d + 1, 2 * d] + ([d // 2] if d % 2 == 0 else [])
        out = [v for v in out if v > 0]
    elif f.type == "float" and not isinstance(current, bool):
        out = [current / 2 if current else 0.5] if isinstance(current, (int, float)) else [0.5, 30.0]
    elif f.type == "bool":
        out = [not current] if isinstance(current, bool) else [True, False]
    elif f.type == "str":
        out = sorted(strings)
    if f.optional:
        out.append(None)
    return list(dict.fromkeys(v for v in out if v != current or type(v) is not type(current)))


def variants(
    config: N.ConfigDef, base: Values, pinned: set[str], derived: set[str], strings: dict[str, set[str]], seed: int = 0
) -> Iterator[Values]:
    """Change sets to try, each valid (every `require` holds): first one field at a time, every field in turn,
    then several fields at once, drawn with a fixed seed so a run is repeatable. `pinned` fields keep their
    value; `derived` ones are recomputed."""
    free = [f for f in config.fields if f.name not in pinned and f.name not in derived]
    options = {f.name: candidates(f, base.get(f.name), strings.get(f.name, set())) for f in free}
    options = {k: v for k, v in options.items() if v}
    seen: set = set()

    def valid(changes: Values) -> bool:
        key = tuple(sorted((k, repr(v)) for k, v in changes.items()))
        if not changes or key in seen:
            return False
        seen.add(key)
        return config_values(config, base, changes, derived) is not None

    for depth in range(max((len(vs) for vs in options.values()), default=0)):
        for name, vs in options.items():
            if depth < len(vs) and valid({name: vs[depth]}):
                yield {name: vs[depth]}
    rng = random.Random(seed)
    names = list(options)
    for _ in range(40 * len(names)):
        changes = {n: rng.choice(options[n]) for n in names if rng.random() < 0.3}
        if valid(changes):
            yield changes


def shrink(changes: Values, fails: Callable[[Values], bool], valid: Callable[[Values], bool]) -> Values:
    """The failing change set with every field dropped that it still fails without (one pass, in order)."""
    kept = dict(changes)
    for name in list(changes):
        trial = {k: v for k, v in kept.items() if k != name}
        if trial and valid(trial) and fails(trial):
            kept = trial
    return kept


def show_changes(changes: Values) -> str:
    """`num_attention_heads = 3, tie_word_embeddings = false`, as a spec would write them."""

    def show(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if v is None:
            return "none"
        return f'"{v}"' if isinstance(v, str) else repr(v)

    return ", ".join(f"{k} = {show(v)}" for k, v in changes.items())
