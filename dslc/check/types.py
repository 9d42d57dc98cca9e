"""Type inference for an already-checked Program (after a pass rewrote it): value types per module."""

from __future__ import annotations

from dslc.check.dims import NamedInt
from dslc.check.shapes import Checker
from dslc.diagnostics import DslcError, Reporter
from dslc.ir import nodes as N
from dslc.ir.evaluate import evaluate


def bind_params(program: N.Program, values: dict | None = None):
    """Constructor-argument binding for module instances of a valid program (no diagnostics needed)."""
    values = program.config_values if values is None else values

    def bind(mdef: N.ModuleDef, args, kwargs, lookup, span) -> dict:
        given = dict(zip([p.name for p in mdef.params], args))
        given.update(dict(kwargs))
        out: dict = {}
        for p in mdef.params:
            if p.name in given:
                v = evaluate(given[p.name], lookup)
            else:
                v = evaluate(p.default, lambda r: out[r.name] if r.kind == "param" else values[r.name])
            out[p.name] = float(v) if p.type == "float" and isinstance(v, int) else v
        return out

    return bind


def named_values(values: dict) -> dict:
    """Config values with each int a `NamedInt` of its field, so sizes computed from them carry their expression."""
    return {k: NamedInt(v, k) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in values.items()}


def infer_types(program: N.Program, symbolic: bool = False) -> dict:
    """(kind, module, params) -> {value: TType} for every module instance; raises on an invalid program.

    `symbolic`: int config values are `NamedInt`s, so each dim computed from them carries its config
    expression (`num_key_value_heads * head_dim`) for codegen's shape comments."""
    rep = Reporter()
    values = named_values(program.config_values) if symbolic else program.config_values
    checker = Checker(program, bind_params(program, values), rep)
    checker.values = values
    checker.run()
    if rep.has_errors:
        raise DslcError([d for d in rep.diagnostics if d.is_error])
    return checker.types
