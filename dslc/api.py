"""The compiler's front half as functions: parse, lower and check a spec."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dslc.diagnostics import Diagnostic, DslcError, Reporter
from dslc.ir.nodes import Program
from dslc.resources import std_path


@lru_cache(maxsize=1)
def parse_std():
    from dslc.syntax.parser import parse_file

    return parse_file(std_path())


@dataclass
class Checked:
    program: Program
    warnings: list[Diagnostic]
    types: dict  # (module, params) -> {value: TType}, from the checker
    optimized: object = None  # dslc.passes.pipeline.Optimized, once a build ran the passes
    config_eval: object = None  # dslc.ir.lower.ConfigEvaluation: the config per arch, as checked


def check_file(path: str | Path, arch: str | None = None, overrides: dict[str, str] | None = None) -> Checked:
    """Parse, lower and check a spec; raises DslcError with every error found."""
    from dslc.syntax.parser import parse_file

    return check_ast(parse_file(path), arch, overrides)


def check_source(
    text: str, path: str = "<input>", arch: str | None = None, overrides: dict[str, str] | None = None
) -> Checked:
    from dslc.syntax.parser import parse_text

    return check_ast(parse_text(text, path), arch, overrides)


def check_ast(spec, arch=None, overrides=None) -> Checked:
    from dslc.check.shapes import Checker
    from dslc.ir.lower import Lowering

    low = Lowering(spec, parse_std(), arch, overrides or {})
    try:
        program = low.run()
    except DslcError:
        raise
    except Exception as e:  # an _Abort escaping run(): its diagnostics are in the reporter
        if low.rep.has_errors:
            raise DslcError(_dedupe([d for d in low.rep.diagnostics if d.is_error])) from None
        raise e
    rep = Reporter()
    checker = Checker(program, low.bind_params, rep)
    checker.run()
    diags = low.rep.diagnostics + rep.diagnostics
    errors = _dedupe([d for d in diags if d.is_error])
    if errors:
        raise DslcError(errors)
    return Checked(program, _dedupe([d for d in diags if not d.is_error]), checker.types, config_eval=low.config_eval)


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen, out = set(), []
    for d in diags:
        key = (d.code, d.span, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return sorted(out, key=lambda d: (d.span.file, d.span.line, d.span.col))
