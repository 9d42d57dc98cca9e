"""The activations chosen by name (`activation(x, hidden_act)`), rendered from the one table `ops.ACTIVATIONS`.

- `render_activations_module()`: the package's `activations.py`, `ACT2FN` (name -> function, as transformers'
  table) and `activation(x, name)`, which modeling.py and the PyTorch path of the fused regions call.
- `render_triton_helpers()`: `activation_fwd(x, ACT)` and `activation_bwd(x, g, ACT)`, @triton.jit functions the
  region kernels call with the name as a `tl.constexpr`: `if ACT == "silu":` is decided when the kernel
  compiles, so each activation is its own specialization holding only its formula. Each branch is the entry's
  steps (region ops over `x`) through the same forward and reverse-mode rules as every fused region
  (dslc/codegen/autodiff.py), so the derivative dispatches as the forward does.
- `render_torch_backward_helper()`: `activation_torch_bwd` in PyTorch, from the same rules, for the tests that check
  the derived backward of a region (`render_region_torch_backward`) against torch.autograd.

The compiler must not import torch: this module only builds text.
"""

from __future__ import annotations

from dslc.codegen.autodiff import FULL, TorchDialect, TritonDialect, analyze, backward_program, name
from dslc.codegen.autodiff import forward_program as _forward
from dslc.ir import ops
from dslc.ir.regions import RegionInput, RegionOp, RowRegion


def _region(act: ops.Activation) -> RowRegion:
    steps = tuple(RegionOp(op, args, result) for result, op, args in act.steps)
    return RowRegion(f"act_{act.name}", (RegionInput("x"),), steps, (steps[-1].result,))


def _renamed(stmts, last: str) -> list[str]:
    """The statements as lines, the final one assigning `last` (nothing reads it: it is the result)."""
    lines = [f"{s.target} = {s.expr.text}" for s in stmts[:-1]]
    return lines + [f"{last} = {stmts[-1].expr.text}"]


def _forward_lines(act: ops.Activation, dialect) -> list[str]:
    info = analyze(_region(act))
    return _renamed(_forward(info, dialect(info)), "y")


def _backward_lines(act: ops.Activation, dialect) -> list[str]:
    info = analyze(_region(act))
    bw = backward_program(info, dialect(info), {"0": name("g", FULL)})
    dx = bw.input_grads["x"]
    stmts = list(bw.stmts)
    if stmts and dx.text == stmts[-1].target:  # the adjoint's own statement: name it dx
        return _renamed(stmts, "dx")
    return [f"{s.target} = {s.expr.text}" for s in stmts] + [f"dx = {dx.text}"]


def _dispatch(lines_of, dialect, indent: str, result: str, fallback: str) -> list[str]:
    out = []
    for i, act in enumerate(ops.ACTIVATIONS.values()):
        out.append(f'{indent}{"if" if i == 0 else "elif"} ACT == "{act.name}":  # {act.doc}')
        out += [f"{indent}    {ln}" for ln in lines_of(act, dialect)]
    out += [f"{indent}else:", f"{indent}    {fallback}"]
    return out + [f"{indent}return {result}"]


def _triton(info):
    return TritonDialect(info, {})


def render_triton_helpers() -> str:
    """The two @triton.jit helpers (no indentation; the caller indents them under `if triton is not None:`)."""
    names = ", ".join(ops.ACTIVATIONS)
    fallback = f'tl.static_assert(False, "unknown activation: the names are {names}")'
    fwd = [
        "@triton.jit",
        "def activation_fwd(x, ACT: tl.constexpr):",
        '    """The activation named ACT of fp32 x (one branch compiles per name: dslc.ir.ops.ACTIVATIONS)."""',
        *_dispatch(_forward_lines, _triton, "    ", "y", fallback),
    ]
    bwd = [
        "@triton.jit",
        "def activation_bwd(x, g, ACT: tl.constexpr):",
        '    """g times the derivative of the activation named ACT at x (fp32)."""',
        *_dispatch(_backward_lines, _triton, "    ", "dx", fallback),
    ]
    return "\n".join(fwd) + "\n\n\n" + "\n".join(bwd) + "\n"


def render_torch_backward_helper() -> str:
    """`activation_torch_bwd(x, g, ACT)` in PyTorch: the kernels' derivative rules, for tests against autograd."""
    fallback = 'raise ValueError(f"unknown activation {ACT!r}")'
    lines = [
        "def activation_torch_bwd(x, g, ACT):",
        '    """g times the derivative of the activation named ACT at x, by the rules the Triton kernels use."""',
        *_dispatch(_backward_lines, TorchDialect, "    ", "dx", fallback),
    ]
    return "\n".join(lines) + "\n"


def _torch_functions() -> tuple[list[str], dict[str, str]]:
    """The package's functions for the table (one per distinct formula, named after its first entry) and, per
    name, what ACT2FN maps it to: a torch function itself where the formula is one call of `x`."""
    defs, by_formula, entry = [], {}, {}
    for a in ops.ACTIVATIONS.values():
        if a.torch not in by_formula:
            fn = a.torch.removesuffix("(x)")
            if a.torch.endswith("(x)") and fn.replace(".", "").replace("_", "").isalnum():
                by_formula[a.torch] = fn  # F.silu, torch.sigmoid
            else:
                by_formula[a.torch] = a.name
                defs.append(f'def {a.name}(x: torch.Tensor) -> torch.Tensor:\n    """{a.doc}"""\n    return {a.torch}')
        entry[a.name] = by_formula[a.torch]
    return defs, entry


def render_activations_module() -> str:
    """The package's activations.py."""
    defs, entry = _torch_functions()
    rows = "\n".join(f'    "{n}": {fn},  # {ops.ACTIVATIONS[n].doc}' for n, fn in entry.items())
    fns = "\n\n\n".join(defs)
    return f'''"""Activations by name, as transformers' ACT2FN (generated by dslc from its activation table).

`activation(x, name)` is what the modeling code calls with a config field (`self.config.hidden_act`); the
config class refuses a name outside `ACT2FN` when it loads. The fused regions' Triton kernels compute the same
activations (kernels_triton.py: `activation_fwd`, `activation_bwd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


{fns}


ACT2FN = {{
{rows}
}}


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The activation called `name` in ACT2FN (transformers' names: "silu", "gelu_pytorch_tanh", ...)."""
    return ACT2FN[name](x)
'''


__all__ = ["render_activations_module", "render_torch_backward_helper", "render_triton_helpers"]
