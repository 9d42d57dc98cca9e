"""The compiler's front half as functions: parse, lower and check a spec."""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    variants_checked: int = 0  # other configs the requires allow, checked too (`check_ast(variants=N)`)


def check_file(
    path: str | Path, arch: str | None = None, overrides: dict[str, str] | None = None, variants: int = 0
) -> Checked:
    """Parse, lower and check a spec; raises DslcError with every error found."""
    from dslc.syntax.parser import parse_file

    return check_ast(parse_file(path), arch, overrides, variants)


def check_source(
    text: str,
    path: str = "<input>",
    arch: str | None = None,
    overrides: dict[str, str] | None = None,
    variants: int = 0,
) -> Checked:
    from dslc.syntax.parser import parse_text

    return check_ast(parse_text(text, path), arch, overrides, variants)


def check_ast(spec, arch=None, overrides=None, variants: int = 0) -> Checked:
    """Check the spec for its config (arch, `--set` overrides); then, with `variants`, for up to that many other
    configs its `require`s allow (dslc/check/configs.py). The first variant that fails is raised, shrunk to
    the fields that matter, as errors that name them."""
    checked = _check_one(spec, arch, overrides or {})
    if variants:
        checked.variants_checked = _check_variants(spec, arch, overrides or {}, checked, variants)
    return checked


def _check_variants(spec, arch, overrides: dict, checked: Checked, limit: int) -> int:
    from itertools import islice

    from dslc.check import configs

    program = checked.program
    base = program.config_values
    derived = configs.derived_fields(program.config, set(checked.config_eval.fixed))
    strings = configs.compared_strings(program)

    found: dict[tuple, list[Diagnostic]] = {}  # each variant is checked once, shrinking included

    def errors(changes: dict) -> list[Diagnostic]:
        key = tuple(sorted(changes.items(), key=lambda kv: kv[0]))
        if key not in found:
            found[key] = []
            try:
                _check_one(spec, arch, overrides, changes)
            except DslcError as e:
                # an E020 is a `require` the variant search could not see through: not a config to check
                if not any(d.code == "E020" for d in e.diagnostics):
                    found[key] = e.diagnostics
        return found[key]

    def valid(changes: dict) -> bool:
        return configs.config_values(program.config, base, changes, derived) is not None

    n = 0
    for changes in islice(configs.variants(program.config, base, set(overrides), derived, strings), limit):
        n += 1
        if errors(changes):
            small = configs.shrink(changes, lambda c: bool(errors(c)), valid)
            shown = configs.show_changes(small)
            help_ = (
                f"the checked config passes, and this one satisfies every `require` of `{program.config.name}`: "
                "write the size in config fields, or rule such configs out with a `require`"
            )
            first: dict = {}  # one error per place
            for d in errors(small):
                first.setdefault(d.span, d)
            raise DslcError(
                [replace(d, message=f"with {shown}: {d.message}", help=(*d.help, help_)) for d in first.values()]
            )
    return n


def _check_one(spec, arch, overrides: dict, exact: dict | None = None) -> Checked:
    from dslc.check.shapes import Checker
    from dslc.check.types import named_values
    from dslc.ir.lower import Lowering

    low = Lowering(spec, parse_std(), arch, overrides, exact)
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
    checker.values = named_values(program.config_values)  # diagnostics name the fields a size comes from
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
