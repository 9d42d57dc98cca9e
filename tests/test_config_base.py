"""`config C(Base):` (a config built on another one, as specs build on std's RopeConfig): the base's fields,
from_hf keys and requires come first, the spec's own fields replace the base's of the same name; an unknown
base is E010, a cycle E060; the generated config computes derived fields after what they read, even when a
base field reads a field of the spec (RopeConfig's `rope_dim = head_dim`)."""

from __future__ import annotations

import importlib

import pytest

from dslc.api import check_source
from dslc.diagnostics import DslcError

SPEC = """config Base:
    theta: float = 10.0                   # the base's default
    scaled: float = theta * width         # reads a field only the derived config declares
    from_hf nested.theta -> theta
    from_hf nested.kind -> kind
    kind: str = "a"
    require theta > 1.0, "theta must be above 1"

config C(Base):
    width: int = depth * 2
    depth: int = 4
    theta: float = 100.0                  # replaces the base's field
    from_hf other.kind -> kind

model M(C): base
    w: [width]

    forward(x: [B, width]) -> [B, width]:
        return x * w * scaled
"""


def check(text: str, **overrides):
    return check_source(text, "t.model", None, {k: str(v) for k, v in overrides.items()})


def errors(text: str, **overrides):
    with pytest.raises(DslcError) as e:
        check(text, **overrides)
    return e.value.diagnostics


def test_base_fields_come_first_and_the_spec_replaces_them():
    p = check(SPEC).program
    assert p.config_values == {"theta": 100.0, "scaled": 800.0, "kind": "a", "width": 8, "depth": 4}
    assert [f.name for f in p.config.fields] == ["scaled", "kind", "width", "depth", "theta"]  # base's, then own
    theta = next(f for f in p.config.fields if f.name == "theta")
    assert (
        theta.span.line
        == SPEC.split("\n").index("    theta: float = 100.0                  # replaces the base's field") + 1
    )


def test_base_requires_and_aliases_apply():
    (d,) = errors(SPEC, theta=0.5)
    assert d.code == "E020" and "theta must be above 1" in d.message
    aliases = dict(check(SPEC).program.config.aliases)
    assert aliases["nested.theta"] == "theta" and aliases["other.kind"] == "kind" and aliases["nested.kind"] == "kind"


def test_unknown_base_is_e010_with_a_suggestion():
    (d,) = errors(SPEC.replace("config C(Base):", "config C(Bse):"))
    assert d.code == "E010" and d.message == "unknown config `Bse`" and "Base" in " ".join(d.help)
    assert (d.span.line, d.span.col) == (9, 10)


def test_a_config_that_extends_itself_is_e060():
    text = SPEC.replace("config Base:", "config Base(C):")
    (d,) = errors(text)
    assert d.code == "E060" and "extends itself" in d.message


def test_generated_config_computes_derived_fields_after_what_they_read(tmp_path):
    from packages import built_packages

    spec = tmp_path / "based.model"
    spec.write_text(SPEC)
    with built_packages(tmp_path / "out", (spec, "based_pkg")):
        pkg = importlib.import_module("based_pkg")
        config = pkg.C()
        assert (config.width, config.scaled) == (8, 800.0)
        assert pkg.C(depth=3).scaled == 600.0
        assert pkg.C.from_dict({"nested": {"theta": 20.0}, "other": {"kind": "b"}}).scaled == 160.0
        assert pkg.C.from_dict({"other": {"kind": "b"}}).kind == "b"
