"""The op vocabulary is one table (dslc/ir/ops.py): every stage's list agrees with it, and every op it calls
fusable has all of its pieces (a PyTorch and a Triton forward, a derivative rule), every op is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslc.check.primitives import PRIMITIVES
from dslc.codegen.triton_region import render_region_torch, render_region_torch_backward, render_region_triton
from dslc.ir import ops
from dslc.ir.regions import REGION_OPS, RegionInput, RegionOp, RowRegion
from dslc.passes.cleanup import PURE_EXCLUDED

ROOT = Path(__file__).resolve().parents[1]


def test_the_checker_types_exactly_the_table():
    assert set(PRIMITIVES) == set(ops.OPS)


def test_row_regions_take_exactly_the_fusable_ops():
    assert set(REGION_OPS) == ops.FUSABLE


def test_impure_ops_are_never_merged_or_dropped():
    assert ops.IMPURE <= PURE_EXCLUDED and {"attention", "dropout"} <= ops.IMPURE


def _one_op_region(name: str) -> RowRegion:
    kind = ops.OPS[name].kind
    inputs = (RegionInput("x"), RegionInput("y"))
    if name == "cast":
        return RowRegion(name, inputs[:1], (RegionOp("cast", ("x",), "r", (("dtype", "f32"),)),), ("r",))
    if name == "pow":
        return RowRegion(name, inputs[:1], (RegionOp("pow", ("x", 3.0), "r"),), ("r",))
    if name == "activation":  # the name is a choice input: a tl.constexpr of the kernels
        inputs = (RegionInput("x"), RegionInput("act", "choice", False))
        return RowRegion(name, inputs, (RegionOp("activation", ("x",), "r", (("name", "act"),)),), ("r",))
    if kind == "binary":
        return RowRegion(name, inputs, (RegionOp(name, ("x", "y"), "r"),), ("r",))
    return RowRegion(name, inputs[:1], (RegionOp(name, ("x",), "r"),), ("r",))


@pytest.mark.parametrize("name", sorted(ops.FUSABLE))
def test_every_fusable_op_has_its_forward_and_derivative(name):
    """A one-op region renders as PyTorch, as its derived PyTorch backward and as Triton kernels (which hold
    the derivative): no op is fusable without every piece (numerics: tests/test_triton_regions.py)."""
    region = _one_op_region(name)
    assert f"def {name}_torch(" in render_region_torch(region)
    backward = render_region_torch_backward(region)
    assert f"def {name}_torch_bwd(" in backward and "return" in backward
    triton = render_region_triton(region)
    assert f"def {name}_fwd_kernel(" in triton and f"def {name}_bwd_kernel(" in triton


def test_every_torch_spelling_names_a_real_function():
    torch = pytest.importorskip("torch")
    namespace = {"torch": torch, "F": torch.nn.functional}
    for name, spelling in ops.torch_spellings().items():
        assert callable(eval(spelling, namespace)), (name, spelling)


def test_every_activation_is_built_from_fusable_ops_and_spelled_in_torch():
    torch = pytest.importorskip("torch")
    namespace = {"torch": torch, "F": torch.nn.functional}
    x = torch.linspace(-3, 3, 7)
    for name, act in ops.ACTIVATIONS.items():
        assert all(op in ops.FUSABLE and op != "activation" for _, op, _ in act.steps), name
        assert eval(act.torch, namespace | {"x": x}).shape == x.shape, name


def test_every_activation_is_documented():
    doc = (ROOT / "docs" / "language.md").read_text()
    section = doc[doc.index("### Activations") :]
    missing = [name for name in ops.ACTIVATIONS if f"`{name}`" not in section]
    assert not missing, f"document these activations in docs/language.md (Activations): {missing}"


def test_every_op_is_documented():
    doc = (ROOT / "docs" / "language.md").read_text()
    section = doc[doc.index("## Primitive ops") :]
    missing = [name for name in ops.OPS if f"`{name}`" not in section]
    assert not missing, f"document these ops in docs/language.md (Primitive ops): {missing}"


def test_names_by_kind_cover_the_table():
    assert set().union(*(ops.names(k) for k in ops.KINDS)) == set(ops.OPS)
    with pytest.raises(KeyError):
        ops.names("elementwise")
