"""Build-time calls and values that std's RotaryEmbedding is written with: `log`, `sqrt`, `floor`, `ceil` in
config defaults and over build-time arguments in forward bodies (Python's math in the generated package), module
parameters whose defaults read config fields (computed in the generated `__init__`), and the `constant`
primitive (a tensor from a build-time list, longrope's factors)."""

from __future__ import annotations

import importlib
import math

import pytest

from dslc.api import check_source
from dslc.diagnostics import DslcError

torch = pytest.importorskip("torch")

SPEC = """use std
config C:
    dim: int = 4
    theta: float = 10000.0
    low: int = floor(dim * log(theta) / 10.0)
    high: int = ceil(sqrt(dim) * 3.5)
    factors: list[float] = [1.0, 2.0, 4.0, 8.0]

module Scale(by: float = sqrt(theta) / dim, shift: int = high - low):
    forward(x: [B, dim]) -> [B, dim]:
        return x * by + shift

model M(C): base
    scale = Scale()
    w: [dim] = ones

    forward(x: [B, dim]) -> [B, dim]:
        y = scale(x) * w + log(x * x + 1.0) * floor(log(theta))
        return y * cast(constant(factors, f32), y.dtype) + min(low, high) * max(sqrt(2.0), 1.0)
"""


def _check(text: str, **overrides):
    return check_source(text, "t.model", None, {k: str(v) for k, v in overrides.items()})


def test_config_defaults_call_math():
    v = _check(SPEC).program.config_values
    assert (v["low"], v["high"]) == (math.floor(4 * math.log(10000.0) / 10.0), math.ceil(2.0 * 3.5)) == (3, 7)


@pytest.mark.parametrize(
    "field,text,message",
    [
        ("low", "floor(log(0.0))", "the logarithm needs a positive number"),
        ("high", "ceil(sqrt(-1.0))", "the square root needs a number >= 0"),
    ],
)
def test_math_outside_its_domain_is_a_located_error(field, text, message):
    line = next(ln for ln in SPEC.split("\n") if ln.startswith(f"    {field}:"))
    bad = SPEC.replace(line, f"    {field}: int = {text}")
    with pytest.raises(DslcError) as e:
        _check(bad)
    assert any(message in d.message for d in e.value.diagnostics)


def test_generated_package_computes_the_same(tmp_path):
    from packages import built_packages

    spec = tmp_path / "mathy.model"
    spec.write_text(SPEC)
    with built_packages(tmp_path / "out", (spec, "mathy_pkg")):
        pkg = importlib.import_module("mathy_pkg")
        modeling = (tmp_path / "out" / "mathy_pkg" / "modeling.py").read_text()
        assert "import math\n" in modeling
        model = pkg.M(pkg.C())
        assert model.scale.by == math.sqrt(10000.0) / 4 and model.scale.shift == 4
        assert pkg.M(pkg.C(theta=100.0)).scale.by == 2.5  # the default follows the config it is built for
        x = torch.randn(3, 4)
        with torch.no_grad():
            model.w.fill_(1.0)
            got = model(x=x)
        got = got[0] if isinstance(got, tuple) else getattr(got, "last_hidden_state", got)
        want = (x * 25.0 + 4 + torch.log(x * x + 1.0) * 9) * torch.tensor([1.0, 2.0, 4.0, 8.0]) + 3 * math.sqrt(2.0)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "call,code,message",
    [
        ("constant(dim, f32)", "E041", "needs a non-empty build-time list of numbers"),
        ('constant(["a"], f32)', "E041", "values must be numbers"),
        ("constant(factors, float)", "E032", "needs a fixed dtype"),
        ("constant(factors)", "E040", "takes (values, dtype)"),
    ],
)
def test_constant_refuses_what_is_not_a_list_of_numbers(call, code, message):
    bad = SPEC.replace("constant(factors, f32)", call)
    with pytest.raises(DslcError) as e:
        _check(bad)
    assert [d.code for d in e.value.diagnostics] == [code] and message in e.value.diagnostics[0].message


def test_log_of_a_tensor_is_still_the_primitive():
    ops = [op.op for op in _check(SPEC).program.modules[-1].forward.body if hasattr(op, "op")]
    assert "log" in ops  # log(x * x + 1.0) is a tensor op; floor(log(theta)) a build-time value
