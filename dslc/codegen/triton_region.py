"""A fused RowRegion -> Python source: the PyTorch path, and a Triton forward + derived backward.

`render_region_torch(region)`: `def <name>_torch(<inputs>)`, the region as torch ops with the ops'
own dtype flow (the reference and the CPU path).
`render_region_triton(region)`: `<name>_fwd_kernel` and `<name>_bwd_kernel` (@triton.jit), the
backward derived by reverse mode over the op list (`dslc.codegen.autodiff`), a
`<Name>Function(torch.autograd.Function)` that saves only the region's inputs (backward recomputes
the rest) and `def <name>_triton(<inputs>)`.
`render_kernels_module(regions)`: a whole `kernels.py` (Triton guarded, a dispatcher per region).

Kernel layout: the output is the broadcast of the tensor inputs, padded to [D0, D1, D2, N]; a
program computes BLOCK_M rows of BLOCK_N = next_power_of_2(N) columns in fp32, every load and
store masked; per-row values are [BLOCK_M, 1] tiles that broadcast over the row.
Helpers the generated code calls (`row_layout`, `strides4`, ...) live in the package's
`kernels_runtime.py` (templates/package/kernels_runtime.py).

The compiler must not import torch or triton: this module only builds text.
"""

from __future__ import annotations

import re

from dslc.codegen.activations import render_triton_helpers
from dslc.codegen.autodiff import (
    CONST,
    FULL,
    ROW,
    RUNTIME_NAMES,
    TORCH_DTYPES,
    Expr,
    RegionError,
    RegionInfo,
    Stmt,
    TorchDialect,
    TritonDialect,
    analyze,
    backward_program,
    forward_program,
    live_reads,
    name,
)
from dslc.codegen.text import docstring
from dslc.ir.regions import RowRegion

TL_SHAPE = {FULL: "[BLOCK_M, BLOCK_N]", ROW: "[BLOCK_M, 1]", CONST: "scalar"}
TORCH_SHAPE = {FULL: "[..., N]", ROW: "[..., 1]", CONST: "scalar"}


def class_name(region: RowRegion) -> str:
    return "".join(p[:1].upper() + p[1:] for p in region.name.split("_") if p) + "Function"


def _doc(region: RowRegion, what: str) -> str:
    src = f" ({docstring(region.source)})" if region.source else ""
    notes = "".join(f" {docstring(n)}" for n in region.notes)
    return f'"""Fused region `{region.name}`{src}: {what}.{notes}"""'


def _line(indent: str, s: Stmt, shapes: dict[int, str]) -> str:
    comment = f"  # {shapes[s.expr.kind if s.expr.kind != CONST else CONST]} {s.comment}".rstrip()
    return f"{indent}{s.target} = {s.expr.text}{comment}"


def _params(region: RowRegion) -> list[str]:
    return [i.name for i in region.inputs]


# ----------------------------------------------------------------------------------------------------------------
# What the Triton path can run, decided at build time


MAX_ROW = 65536  # kernels_runtime.MAX_ROW: the longest row a one-row-per-program kernel holds
MAX_RANK = 4  # three leading dims and the row


def triton_refusal(region: RowRegion, types: dict[str, tuple | None]) -> str | None:
    """Why the Triton path could not run `region`, or None when it can: the fusion pass calls this before it
    accepts a region, so a package never holds a region that fails on Triton while PyTorch runs it.

    `types` gives, for each tensor input and op result, its shape in PyTorch's semantics (ints or size
    symbols; None if unknown). Checked here: the generator's own rules (`analyze`); the launcher's layout
    (`row_layout`: the broadcast of every tensor input, also one read only for its dtype) with its limits of
    rank 1 to 4, the row length and an even row for rotate_half where the sizes are known; and what the
    launcher's `check_lanes` / `check_output_shape` would refuse at run time: every output must have the
    shape the kernel writes ([.., N] or [.., 1] over the layout's leading dims), and a row `sum` must not
    reduce a value that is [.., 1] in PyTorch (the kernel would add N copies of it)."""
    try:
        info = analyze(region)
    except RegionError as e:
        return str(e)
    shape: tuple = ()
    for x in info.tensor_inputs:
        t = types.get(x)
        if t is None:
            return f"input {x} is of unknown shape"
        shape = _broadcast(shape, tuple(t))
        if shape is None:
            return f"the tensor inputs ({', '.join(info.tensor_inputs)}) do not broadcast to one shape"
    if not 1 <= len(shape) <= MAX_RANK:
        return f"inputs broadcast to rank {len(shape)}; the row kernels take rank 1 to {MAX_RANK}"
    n = shape[-1]
    if isinstance(n, int) and n > MAX_ROW:
        return f"row length {n} is above the limit {MAX_ROW} of the Triton row kernels"
    if info.rotated_inputs() and isinstance(n, int) and n % 2:
        return f"rotate_half over an odd row length {n}"
    row_wide = n != 1
    for op in region.ops:
        if op.op == "sum" and isinstance(op.args[0], str) and row_wide and info.kind(op.args[0]) == FULL:
            t = types.get(op.args[0])
            if t is None or tuple(t)[-1:] == (1,):
                return (
                    f"sum({op.args[0]}) over a value that is {_dims(t)} in PyTorch, not a whole row: the "
                    "Triton kernel would sum the broadcast row"
                )
    for o in region.outputs:
        want = shape if info.kind(o) == FULL else shape[:-1] + (1,)
        got = types.get(o)
        if got is None or tuple(got) != want:
            return (
                f"output {o} is {_dims(got)} in PyTorch but the Triton kernel writes {_dims(want)} "
                "(it depends on the row only through narrower inputs)"
            )
    return None


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """Shapes broadcast from the right (each pair of dims equal or 1); None where they do not."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))


def _dims(t) -> str:
    return "of unknown shape" if t is None else "[" + ", ".join(str(d) for d in t) + "]"


# ----------------------------------------------------------------------------------------------------------------
# PyTorch


def render_region_torch(region: RowRegion) -> str:
    """`def <name>_torch(<inputs>)`: the region as torch ops (each op in its arguments' dtype, casts `.to`)."""
    info = analyze(region)
    d = TorchDialect(info)
    lines = [
        f"def {region.name}_torch({', '.join(_params(region))}):",
        f"    {_doc(region, 'PyTorch ops (the reference and the CPU path)')}",
    ]
    for s in forward_program(info, d):
        lines.append(_line("    ", s, TORCH_SHAPE))
    lines.append(f"    return {', '.join(info.ident(o) for o in region.outputs)}")
    return "\n".join(lines) + "\n"


def render_region_torch_backward(region: RowRegion) -> str:
    """`def <name>_torch_bwd(<inputs>, <output grads>)`: the derived backward as torch ops (to test the rules).

    Returns one gradient per input (None for scalars and inputs without needs_grad)."""
    info = analyze(region)
    d = TorchDialect(info)
    gnames = {str(i): name(info.namer.fresh(f"d_{info.ident(o)}"), info.kind(o)) for i, o in enumerate(region.outputs)}
    bw = backward_program(info, d, gnames)
    params = _params(region) + [g.text for g in gnames.values()]
    lines = [
        f"def {region.name}_torch_bwd({', '.join(params)}):",
        f"    {_doc(region, 'derived backward as PyTorch ops (reverse mode over the op list)')}",
    ]
    for s in bw.stmts:
        lines.append(_line("    ", s, TORCH_SHAPE))
    rets = []
    for inp in region.inputs:
        if inp.name in bw.input_grads:
            rets.append(f"sum_to_shape({bw.input_grads[inp.name].text}, {inp.name})")
        else:
            rets.append("None")
    lines.append(f"    return {_tuple(rets)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


class _KernelNames:
    """Identifiers of one region's kernel arguments."""

    def __init__(self, info: RegionInfo):
        n = info.namer
        self.info = info
        self.ptr, self.strides, self.row = {}, {}, {}
        for x in info.tensor_inputs:
            ident = info.ident(x)
            self.ptr[x] = n.fresh(f"{ident}_ptr")
            self.strides[x] = [n.fresh(f"{ident}_s{k}") for k in range(4)]
            self.row[x] = n.fresh(f"{ident}_row")
        self.out_ptr = [n.fresh(f"{info.ident(o)}_ptr") for o in info.region.outputs]
        # launcher locals holding the outputs: the value's name unless that is an input or already taken
        self.out_local, seen = [], set()
        for o in info.region.outputs:
            ident = info.ident(o)
            self.out_local.append(n.fresh(f"{ident}_out") if o in info.tensor_inputs or ident in seen else ident)
            seen.add(ident)
        # backward
        self.gout = [n.fresh(f"d_{info.ident(o)}") for o in info.region.outputs]
        self.gout_ptr = [n.fresh(f"{g}_ptr") for g in self.gout]
        self.gout_strides = [[n.fresh(f"{g}_s{k}") for k in range(4)] for g in self.gout]
        self.gout_row = [n.fresh(f"{g}_row") for g in self.gout]
        self.gin_ptr = {x: n.fresh(f"d_{info.ident(x)}_ptr") for x in info.grad_inputs}
        self.store_flag = {x: n.fresh(f"STORE_D_{info.ident(x).upper()}") for x in info.grad_inputs}
        self.gin_buf = {x: n.fresh(f"grad_{info.ident(x)}") for x in info.grad_inputs}  # launcher locals
        # row-invariant inputs (a weight [N]): the backward sums their gradient over rows in place
        self.invariant = [x for x in info.grad_inputs if info.region_input(x).row_invariant]
        self.reduce_flag = {x: n.fresh(f"REDUCE_D_{info.ident(x).upper()}") for x in self.invariant}
        self.acc = {x: n.fresh(f"acc_d_{info.ident(x)}") for x in self.invariant}

    def loads(self) -> dict[str, tuple[str, str, str]]:
        return {x: (self.ptr[x], self.row[x], self.strides[x][3]) for x in self.info.tensor_inputs}


def _input_args(info: RegionInfo, k: _KernelNames) -> list[str]:
    out = []
    for x in info.tensor_inputs:
        out.append(f"{k.ptr[x]},  # input {x}: broadcasts to [D0, D1, D2, N] through the strides below")
        for j, s in enumerate(k.strides[x]):
            out.append(f"{s},  # {x} stride over {('D0', 'D1', 'D2', 'N')[j]} (0 where broadcast)")
    for s in info.scalar_inputs:
        out.append(f"{info.ident(s)},  # scalar input {s} (float)")
    return out


def _choice_args(info: RegionInfo) -> list[str]:
    """The choice inputs (an activation's name): constexprs, so each name compiles its own kernel."""
    return [f"{info.ident(c)}: tl.constexpr,  # choice input {c}: the activation's name" for c in info.choice_inputs]


def _choice_kwargs(info: RegionInfo, sfx: str = "") -> list[str]:
    """`name=name,` launch keywords of the choice inputs (in the autotuner's key with the other constexprs)."""
    return [f"{info.ident(c)}{sfx}={c}{sfx}," for c in info.choice_inputs]


_DIM_ARGS = [
    "R,  # rows: D0 * D1 * D2",
    "D1,  # leading dim 1 (padded with 1)",
    "D2,  # leading dim 2 (padded with 1)",
    "N,  # row length (the last dim)",
]
_BLOCK_ARGS = [
    "BLOCK_M: tl.constexpr,  # rows per program",
    "BLOCK_N: tl.constexpr,  # next_power_of_2(N): columns per program",
]


def _prologue(info: RegionInfo, backward: bool, block: str = "tl.program_id(0)") -> list[str]:
    rows = (
        "    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]"
        if block == "tl.program_id(0)"
        else f"    rows = ({block} * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]).to(tl.int64)  # [BLOCK_M, 1]"
    )
    lines = [
        rows,
        "    cols = tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]",
        "    row_mask = rows < R  # [BLOCK_M, 1]",
        "    mask = row_mask & (cols < N)  # [BLOCK_M, BLOCK_N]",
        "    # row -> (i0, i1, i2) over the leading dims [D0, D1, D2]",
        "    i2 = rows % D2  # [BLOCK_M, 1]",
        "    i1 = (rows // D2) % D1  # [BLOCK_M, 1]",
        "    i0 = rows // (D1 * D2)  # [BLOCK_M, 1]",
    ]
    if info.rotated_inputs():
        lines += [
            "    # rotate_half: (x1, x2) -> (-x2, x1); column j reads column (j + N/2) mod N",
            "    rot_cols = (cols + N // 2) % N  # [1, BLOCK_N]",
            "    rot_sign = tl.where(cols < N // 2, -1.0, 1.0)  # [1, BLOCK_N]",
        ]
        if backward:
            lines.append("    rot_idx = tl.broadcast_to(rot_cols, [BLOCK_M, BLOCK_N])  # [BLOCK_M, BLOCK_N]")
    return lines


def _loads(info: RegionInfo, k: _KernelNames, live: set[str]) -> list[str]:
    lines = []
    rotated = set(info.rotated_inputs())
    for x in info.tensor_inputs:
        ident = info.ident(x)
        if ident not in live and x not in rotated:
            continue
        s0, s1, s2, s3 = k.strides[x]
        lines.append(f"    {k.row[x]} = i0 * {s0} + i1 * {s1} + i2 * {s2}  # [BLOCK_M, 1] offset of {x}'s rows")
        if ident in live:
            lines.append(
                f"    {ident} = tl.load({k.ptr[x]} + {k.row[x]} + cols * {s3}, mask=mask, other=0.0)"
                f".to(tl.float32)  # [BLOCK_M, BLOCK_N] {x}"
            )
    return lines


def _kernel_doc(region: RowRegion, what: str) -> str:
    return f"    {_doc(region, what)}"


def _render_fwd_kernel(info: RegionInfo, k: _KernelNames, grouped: bool = False) -> str:
    region = info.region
    d = TritonDialect(info, k.loads())
    stmts = forward_program(info, d)
    outs = [info.ident(o) for o in region.outputs]
    live = live_reads(stmts, frozenset(outs))
    args = _input_args(info, k)
    for o, p, dt in zip(region.outputs, k.out_ptr, _out_dtype_texts(info)):
        shape = "[R, N]" if info.kind(o) == FULL else "[R, 1]"
        args.append(f"{p},  # output {o}: {shape} contiguous, {dt}")
    args += _DIM_ARGS + _choice_args(info) + _BLOCK_ARGS
    what = "Triton forward, BLOCK_M rows per program, fp32 compute"
    block = "block" if grouped else "tl.program_id(0)"
    lines = _prologue(info, backward=False, block=block)
    lines += _loads(info, k, live)
    lines += [_line("    ", s, TL_SHAPE) for s in stmts]
    for o, p in zip(region.outputs, k.out_ptr):
        v = info.ident(o)
        if info.kind(o) == FULL:
            lines.append(f"    tl.store({p} + rows * N + cols, {v}.to({p}.dtype.element_ty), mask=mask)")
        else:
            lines.append(f"    tl.store({p} + rows, {v}.to({p}.dtype.element_ty), mask=row_mask)")
    if grouped:
        return _grouped_kernels(region, "fwd", args, lines, what)
    head = ["@triton.jit", f"def {region.name}_fwd_kernel("] + [f"    {a}" for a in args] + ["):"]
    return "\n".join(head + [_kernel_doc(region, what)] + lines) + "\n"


def _render_bwd_kernel(info: RegionInfo, k: _KernelNames, grouped: bool = False) -> str:
    region = info.region
    d = TritonDialect(info, k.loads())
    gexprs = {str(i): name(g, info.kind(o)) for i, (o, g) in enumerate(zip(region.outputs, k.gout))}
    bw = backward_program(info, d, gexprs)
    roots = frozenset().union(*(e.reads for e in bw.input_grads.values())) if bw.input_grads else frozenset()
    live = live_reads(bw.stmts, roots)
    args = _input_args(info, k)
    for o, p, st in zip(region.outputs, k.gout_ptr, k.gout_strides):
        shape = "[D0, D1, D2, N]" if info.kind(o) == FULL else "[D0, D1, D2, 1]"
        args.append(f"{p},  # gradient of output {o}: {shape} through the strides below")
        for j, s in enumerate(st):
            args.append(f"{s},  # stride over {('D0', 'D1', 'D2', 'N')[j]}")
    for x in info.grad_inputs:
        if x in k.reduce_flag:
            args.append(
                f"{k.gin_ptr[x]},  # gradient of {x}: [programs, N] float32 partial sums when "
                f"{k.reduce_flag[x]}, else [R, N] contiguous"
            )
        else:
            args.append(f"{k.gin_ptr[x]},  # gradient of {x}: [R, N] contiguous (the launcher sums broadcast dims)")
    args += _DIM_ARGS
    for x in info.grad_inputs:
        args.append(f"{k.store_flag[x]}: tl.constexpr,  # whether {x}'s gradient is wanted")
    for x in k.invariant:
        args.append(f"{k.reduce_flag[x]}: tl.constexpr,  # {x} is the same in every row: sum its gradient here")
    args += _choice_args(info) + _BLOCK_ARGS
    lines = ["@triton.jit", f"def {region.name}_bwd_kernel("] + [f"    {a}" for a in args] + ["):"]
    if not k.invariant:
        what = "Triton backward derived by reverse mode; recomputes the forward"
        if grouped:
            return _grouped_kernels(region, "bwd", args, _bwd_body(info, k, bw, live, "block"), what)
        lines.append(_kernel_doc(region, what))
        body = _bwd_body(info, k, bw, live, "tl.program_id(0)")
        return "\n".join(lines + body) + "\n"
    lines.append(
        _kernel_doc(
            region,
            "Triton backward derived by reverse mode; recomputes the forward. Each program walks row blocks "
            "pid, pid + programs, ... and keeps the gradients of row-invariant inputs as one partial row",
        )
    )
    lines.append("    pid = tl.program_id(0)")
    for x in k.invariant:
        lines.append(
            f"    {k.acc[x]} = tl.zeros([1, BLOCK_N], dtype=tl.float32)  # [1, BLOCK_N] this program's sum of d_{x}"
        )
    lines.append("    for block in range(pid, tl.cdiv(R, BLOCK_M), tl.num_programs(0)):")
    lines += ["    " + ln for ln in _bwd_body(info, k, bw, live, "block")]
    lines.append("    partial_cols = tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]")
    for x in k.invariant:
        lines.append(f"    if {k.store_flag[x]} and {k.reduce_flag[x]}:")
        lines.append(f"        tl.store({k.gin_ptr[x]} + pid * N + partial_cols, {k.acc[x]}, mask=partial_cols < N)")
    return "\n".join(lines) + "\n"


def _arg_name(entry: str) -> str:
    return entry.split(",")[0].split(":")[0].strip()


_SHARED_ARGS = ("N", "BLOCK_M", "BLOCK_N")  # the same for both problems of a grouped launch


def _grouped_kernels(region: RowRegion, phase: str, args: list[str], body: list[str], what: str) -> str:
    """For a region whose calls launch in pairs: the body as `<name>_<phase>_rows` (a @triton.jit function
    of the row block), `<name>_<phase>_kernel` (one problem: block = program id) and
    `<name>_<phase>_kernel_x2` (two problems in one grid, split at BLOCKS_A)."""
    names = [_arg_name(a) for a in args]
    flags = [n for n, a in zip(names, args) if ": tl.constexpr" in a and n not in _SHARED_ARGS]
    own = [n for n in names if n not in _SHARED_ARGS and n not in flags]  # pointers, strides, R, D1, D2
    rows_fn = f"{region.name}_{phase}_rows"
    at = names.index("BLOCK_M")
    rows_args = args[:at] + ["block,  # the block of BLOCK_M rows to compute"] + args[at:]
    rows_names = names[:at] + ["block"] + names[at:]
    out = ["@triton.jit", f"def {rows_fn}("] + [f"    {a}" for a in rows_args] + ["):"]
    out.append(_kernel_doc(region, f"{what}; the rows of one block"))
    out += body
    out += ["", "", "@triton.jit", f"def {region.name}_{phase}_kernel("] + [f"    {a}" for a in args] + ["):"]
    out.append(_kernel_doc(region, f"{what}; program i computes row block i"))
    out.append(f"    {rows_fn}({', '.join('tl.program_id(0)' if n == 'block' else n for n in rows_names)})")

    def call(suffix: str, block: str) -> str:
        picked = [block if n == "block" else (n if n in _SHARED_ARGS else f"{n}_{suffix}") for n in rows_names]
        return f"{rows_fn}({', '.join(picked)})"

    x2 = [f"{n}_a,  # first problem: {n}" for n in own] + [f"{n}_b,  # second problem: {n}" for n in own]
    x2 += ["N,  # row length (the same for both)", "BLOCKS_A,  # row blocks of the first problem"]
    x2 += [f"{f}_{s}: tl.constexpr," for s in ("a", "b") for f in flags] + _BLOCK_ARGS
    out += ["", "", "@triton.jit", f"def {region.name}_{phase}_kernel_x2("] + [f"    {a}" for a in x2] + ["):"]
    out.append(_kernel_doc(region, f"{what}; two problems in one grid: programs below BLOCKS_A take the first"))
    out.append("    pid = tl.program_id(0)")
    out.append("    if pid < BLOCKS_A:")
    out.append(f"        {call('a', 'pid')}")
    out.append("    else:")
    out.append(f"        {call('b', 'pid - BLOCKS_A')}")
    return "\n".join(out) + "\n"


def _bwd_body(info: RegionInfo, k: _KernelNames, bw, live: set[str], block: str) -> list[str]:
    """The backward over one block of BLOCK_M rows: loads, the derived statements, gradient stores (or, for
    row-invariant inputs, the block's column sums added to the program's partial row)."""
    region = info.region
    lines = _prologue(info, backward=True, block=block)
    lines += _loads(info, k, live)
    for i, o in enumerate(region.outputs):
        g = k.gout[i]
        if g not in live:
            continue
        s0, s1, s2, s3 = k.gout_strides[i]
        lines.append(f"    {k.gout_row[i]} = i0 * {s0} + i1 * {s1} + i2 * {s2}  # [BLOCK_M, 1]")
        if info.kind(o) == FULL:
            lines.append(
                f"    {g} = tl.load({k.gout_ptr[i]} + {k.gout_row[i]} + cols * {s3}, mask=mask, other=0.0)"
                f".to(tl.float32)  # [BLOCK_M, BLOCK_N] incoming gradient of {o}"
            )
        else:
            lines.append(
                f"    {g} = tl.load({k.gout_ptr[i]} + {k.gout_row[i]}, mask=row_mask, other=0.0)"
                f".to(tl.float32)  # [BLOCK_M, 1] incoming gradient of {o}"
            )
    lines += [_line("    ", s, TL_SHAPE) for s in bw.stmts]
    for x in info.grad_inputs:
        p = k.gin_ptr[x]
        grad = bw.input_grads[x]
        store = f"tl.store({p} + rows * N + cols, {grad.paren(9)}.to({p}.dtype.element_ty), mask=mask)"
        lines.append(f"    if {k.store_flag[x]}:")
        if x in k.reduce_flag:
            lines.append(f"        if {k.reduce_flag[x]}:")
            lines.append(
                f"            {k.acc[x]} += tl.sum(tl.where(mask, {grad.text}, 0.0), axis=0, keep_dims=True)"
                "  # [1, BLOCK_N]"
            )
            lines.append("        else:")
            lines.append(f"            {store}")
        else:
            lines.append(f"        {store}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function and launcher


def _out_dtype_texts(info: RegionInfo) -> list[str]:
    """Torch dtype expressions of the outputs, for the launcher."""
    region = info.region
    out = []
    for i, o in enumerate(region.outputs):
        dt = region.output_dtypes[i] if region.output_dtypes else None
        if dt is None:
            out.append(info.values[o].dtype or "torch.float32")
        elif dt.startswith("input:"):
            out.append(f"{dt[len('input:') :]}.dtype")
        else:
            out.append(TORCH_DTYPES[dt])
    return out


def _checks(info: RegionInfo, lay: str = "lay", sfx: str = "") -> list[str]:
    """Launcher checks for per-row tensor inputs ([..., 1]) the row kernel cannot follow (rare; emitted only
    where a value varies along the row through a strict subset of the tensor inputs). `lay` names the layout
    and `sfx` ends the input names (a grouped launch's `_a` / `_b`)."""
    region = info.region
    all_t = set(info.tensor_inputs)

    def names(xs) -> str:
        return ", ".join(f"{x}{sfx}" for x in sorted(xs))

    lines = []
    for op in region.ops:
        if op.op == "sum" and not isinstance(op.args[0], (int, float)):
            lanes = info.values[op.args[0]].lanes
            if lanes and lanes != all_t:
                lines.append(f'check_lanes("{region.name}", "sum({op.args[0]})", {lay}.N, {names(lanes)})')
    for o in region.outputs:
        v = info.values[o]
        if v.kind == FULL and v.lanes != all_t:
            lines.append(f'check_lanes("{region.name}", "output {o}", {lay}.N, {names(v.lanes)})')
        if v.deps != all_t:
            shape = f"{lay}.shape" if v.kind == FULL else f"{lay}.row_shape"
            lines.append(f'check_output_shape("{region.name}", "{o}", {shape}, {names(v.deps)})')
    return lines


def _launch_args(info: RegionInfo, k: _KernelNames) -> list[str]:
    out = [f"{x}, *strides4({x}, lay.shape)," for x in info.tensor_inputs]
    out += [f"float({s})," for s in info.scalar_inputs]
    return out


def _tuple(names: list[str]) -> str:
    return f"({names[0]},)" if len(names) == 1 else f"({', '.join(names)})"


def _unpack(names: list[str]) -> str:
    return f"({names[0]},)" if len(names) == 1 else ", ".join(names)


def _render_function(info: RegionInfo, k: _KernelNames) -> str:
    region = info.region
    cls = class_name(region)
    tensors = ", ".join(info.tensor_inputs)
    even = ", even=True" if info.rotated_inputs() else ""
    layout = f'lay = row_layout("{region.name}", {tensors}{even})  # [D0, D1, D2, N] of the broadcast inputs'
    first = info.tensor_inputs[0]
    outs = k.out_local
    L = []
    L.append(f"class {cls}(torch.autograd.Function):")
    L.append(f"    {_doc(region, 'Triton forward, derived Triton backward; saves only the inputs')}")
    L.append("")
    L.append("    @staticmethod")
    L.append(f"    def forward(ctx, {', '.join(_params(region))}):")
    L.append(f"        {layout}")
    L += [f"        {c}" for c in _checks(info)]
    for o, v, dt in zip(region.outputs, outs, _out_dtype_texts(info)):
        shape = "lay.shape" if info.kind(o) == FULL else "lay.row_shape"
        comment = "[..., N]" if info.kind(o) == FULL else "[..., 1]"
        L.append(f"        {v} = torch.empty({shape}, dtype={dt}, device=lay.device)  # {comment} output {o}")
    L.append("        if not lay.empty:")
    L.append("            launch_rows(")
    L.append(f"                {region.name}_fwd_kernel, lay,")
    L += [f"                {a}" for a in _launch_args(info, k)]
    L += [f"                {v}," for v in outs]
    L.append("                lay.R, lay.D1, lay.D2, lay.N,")
    L += [f"                {c}" for c in _choice_kwargs(info)]
    L.append("            )")
    L.append(f"        ctx.save_for_backward({tensors})")
    L.append(f"        ctx.scalars = {_tuple(info.scalar_inputs + info.choice_inputs)}")
    L.append("        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None")
    L.append(f"        return {', '.join(outs)}")
    L.append("")
    L.append("    @staticmethod")
    L.append(f"    def backward(ctx, {', '.join(k.gout)}):")
    L.append(f"        {_unpack(info.tensor_inputs)} = ctx.saved_tensors")
    if info.scalar_inputs or info.choice_inputs:
        L.append(f"        {_unpack(info.scalar_inputs + info.choice_inputs)} = ctx.scalars")
    if not info.grad_inputs:
        L.append(f"        return {', '.join('None' for _ in region.inputs)}")
        return "\n".join(L) + "\n"
    L.append(f"        {layout}")
    for o, g in zip(region.outputs, k.gout):
        shape = "lay.shape" if info.kind(o) == FULL else "lay.row_shape"
        L.append(f"        {g} = grad_or_zeros({g}, {shape}, {first})")
    position = {inp.name: i for i, inp in enumerate(region.inputs)}
    for x in info.grad_inputs:
        wanted = f"ctx.needs_input_grad[{position[x]}]"
        if x in k.reduce_flag:
            L.append(f"        {k.gin_buf[x]} = partial_grad_buffer({x}, lay, {wanted})")
        else:
            L.append(f"        {k.gin_buf[x]} = grad_buffer({x}, lay.shape, {wanted})")
    L.append("        if not lay.empty:")
    L.append("            launch_rows(")
    L.append(f"                {region.name}_bwd_kernel, lay,")
    L += [f"                {a}" for a in _launch_args(info, k)]
    for o, g in zip(region.outputs, k.gout):
        shape = "lay.shape" if info.kind(o) == FULL else "lay.row_shape"
        L.append(f"                {g}, *strides4({g}, {shape}),")
    for x in info.grad_inputs:
        b = k.gin_buf[x]
        L.append(f"                {first} if {b} is None else {b},  # any pointer when not wanted")
    L.append("                lay.R, lay.D1, lay.D2, lay.N,")
    if k.invariant:
        L.append("                partial=True,  # lay.programs programs, each summing row-invariant gradients")
    for x in info.grad_inputs:
        L.append(f"                {k.store_flag[x]}={k.gin_buf[x]} is not None,")
    for x in k.invariant:
        L.append(f"                {k.reduce_flag[x]}=row_invariant({x}, lay),")
    L += [f"                {c}" for c in _choice_kwargs(info)]
    L.append("            )")
    rets = [f"reduce_grad({k.gin_buf[i.name]}, {i.name})" if i.name in k.gin_buf else "None" for i in region.inputs]
    L.append(f"        return {', '.join(rets)}")
    return "\n".join(L) + "\n"


def pair_params(region: RowRegion) -> list[str]:
    """The parameters of a grouped call `<name>_x2`: the first call's inputs (`_a`), then the second's (`_b`)."""
    return [f"{n}_a" for n in _params(region)] + [f"{n}_b" for n in _params(region)]


def _render_pair_function(info: RegionInfo, k: _KernelNames) -> str:
    """`<Name>PairFunction`: two calls of the region, one launch forward and one backward."""
    region = info.region
    even = ", even=True" if info.rotated_inputs() else ""
    tensors = info.tensor_inputs
    outs = k.out_local
    position = {inp.name: i for i, inp in enumerate(region.inputs)}
    L = [f"class {class_name(region).removesuffix('Function')}PairFunction(torch.autograd.Function):"]
    L.append(f"    {_doc(region, 'two calls in one launch (forward and backward); saves only the inputs')}")
    L += ["", "    @staticmethod", f"    def forward(ctx, {', '.join(pair_params(region))}):"]
    layouts = [
        f'        lay_{x} = row_layout("{region.name}", {", ".join(f"{t}_{x}" for t in tensors)}{even})' for x in "ab"
    ]

    def launch(phase: str) -> list[str]:
        return [
            "        if not (lay_a.empty and lay_b.empty):",
            "            launch_pair(",
            f"                {region.name}_{phase}_kernel_x2, lay_a, lay_b,",
        ]

    def inputs(x: str) -> list[str]:
        """Launch arguments of problem `x`'s inputs: tensors with their strides, then the scalars."""
        args = [f"{t}_{x}, *strides4({t}_{x}, lay_{x}.shape)" for t in tensors]
        return args + [f"float({sc}_{x})" for sc in info.scalar_inputs]

    L += layouts
    for x in "ab":
        L += [f"        {c}" for c in _checks(info, f"lay_{x}", f"_{x}")]
    for x in "ab":
        for o, v, dt in zip(region.outputs, outs, _out_dtype_texts(info)):
            shape = f"lay_{x}.shape" if info.kind(o) == FULL else f"lay_{x}.row_shape"
            dt = re.sub(r"\b(\w+)\.dtype\b", rf"\1_{x}.dtype", dt)  # x.dtype -> x_a.dtype
            L.append(f"        {v}_{x} = torch.empty({shape}, dtype={dt}, device=lay_{x}.device)  # output {o}")
    L += launch("fwd")
    for x in "ab":
        args = inputs(x) + [f"{v}_{x}" for v in outs]
        args += [f"lay_{x}.R", f"lay_{x}.D1", f"lay_{x}.D2"]
        L.append(f"                ({', '.join(args)}),")
    for x in "ab":
        L += [f"                {c}" for c in _choice_kwargs(info, f"_{x}")]
    L.append("            )")
    L.append(f"        ctx.save_for_backward({', '.join(f'{t}_{x}' for x in 'ab' for t in tensors)})")
    kept = info.scalar_inputs + info.choice_inputs
    L.append(f"        ctx.scalars = {_tuple([f'{sc}_{x}' for x in 'ab' for sc in kept])}")
    L.append("        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None")
    L.append(f"        return {', '.join(f'{v}_{x}' for x in 'ab' for v in outs)}")
    gouts = [f"{g}_{x}" for x in "ab" for g in k.gout]
    L += ["", "    @staticmethod", f"    def backward(ctx, {', '.join(gouts)}):"]
    L.append(f"        {_unpack([f'{t}_{x}' for x in 'ab' for t in tensors])} = ctx.saved_tensors")
    if kept:
        L.append(f"        {_unpack([f'{sc}_{x}' for x in 'ab' for sc in kept])} = ctx.scalars")
    n_in = len(region.inputs)
    if not info.grad_inputs:
        L.append(f"        return {', '.join('None' for _ in range(2 * n_in))}")
        return "\n".join(L) + "\n"
    L += layouts
    for x, offset in (("a", 0), ("b", n_in)):
        for o, g in zip(region.outputs, k.gout):
            shape = f"lay_{x}.shape" if info.kind(o) == FULL else f"lay_{x}.row_shape"
            L.append(f"        {g}_{x} = grad_or_zeros({g}_{x}, {shape}, {tensors[0]}_{x})")
        for t in info.grad_inputs:
            wanted = f"ctx.needs_input_grad[{position[t] + offset}]"
            L.append(f"        {k.gin_buf[t]}_{x} = grad_buffer({t}_{x}, lay_{x}.shape, {wanted})")
    L += launch("bwd")
    for x in "ab":
        args = inputs(x)
        for o, g in zip(region.outputs, k.gout):
            shape = f"lay_{x}.shape" if info.kind(o) == FULL else f"lay_{x}.row_shape"
            args.append(f"{g}_{x}, *strides4({g}_{x}, {shape})")
        for t in info.grad_inputs:
            b = f"{k.gin_buf[t]}_{x}"
            args.append(f"{tensors[0]}_{x} if {b} is None else {b}")
        args += [f"lay_{x}.R", f"lay_{x}.D1", f"lay_{x}.D2"]
        L.append(f"                ({', '.join(args)}),")
    for x in "ab":
        for t in info.grad_inputs:
            L.append(f"                {k.store_flag[t]}_{x}={k.gin_buf[t]}_{x} is not None,")
    for x in "ab":
        L += [f"                {c}" for c in _choice_kwargs(info, f"_{x}")]
    L.append("            )")
    rets = [
        f"reduce_grad({k.gin_buf[i.name]}_{x}, {i.name}_{x})" if i.name in k.gin_buf else "None"
        for x in "ab"
        for i in region.inputs
    ]
    L.append(f"        return {', '.join(rets)}")
    return "\n".join(L) + "\n"


def _render_pair_launcher(info: RegionInfo) -> str:
    region = info.region
    params = pair_params(region)
    a = ", ".join(params[: len(params) // 2])
    b = ", ".join(params[len(params) // 2 :])
    ta = ", ".join(f"{t}_a" for t in info.tensor_inputs)
    tb = ", ".join(f"{t}_b" for t in info.tensor_inputs)
    one = len(region.outputs) == 1
    split = (
        f"{region.name}_triton({a}), {region.name}_triton({b})"
        if one
        else (f"(*{region.name}_triton({a}), *{region.name}_triton({b}))")
    )
    cls = class_name(region).removesuffix("Function") + "PairFunction"
    return (
        f"def {region.name}_x2_triton({', '.join(params)}):\n"
        f"    {_doc(region, 'two calls, one launch when their rows are equally long')}\n"
        f"    if row_width({ta}) != row_width({tb}):\n"
        f"        return {split}\n"
        f"    return {cls}.apply({', '.join(params)})\n"
    )


def _render_launcher(info: RegionInfo) -> str:
    region = info.region
    params = ", ".join(_params(region))
    return (
        f"def {region.name}_triton({params}):\n"
        f"    {_doc(region, 'Triton kernels with autograd')}\n"
        f"    return {class_name(region)}.apply({params})\n"
    )


def render_region_triton(region: RowRegion, grouped: bool = False) -> str:
    """Triton forward and backward kernels, the autograd.Function and `<name>_triton(<inputs>)`; for a
    `grouped` region (its calls launch in pairs) also the `_x2` kernels, `<Name>PairFunction` and
    `<name>_x2_triton(<inputs>_a, <inputs>_b)`."""
    info = analyze(region)
    k = _KernelNames(info)
    parts = [
        _render_fwd_kernel(info, k, grouped),
        _render_bwd_kernel(info, k, grouped),
        _render_function(info, k),
        _render_launcher(info),
    ]
    if grouped:
        parts += [_render_pair_function(info, k), _render_pair_launcher(info)]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# A whole kernels.py


def uses_activation(regions) -> bool:
    """Whether some region computes an activation chosen by name (it needs the package's activations)."""
    return any(op.op == "activation" for r in regions for op in r.ops)


def render_kernels_module(
    regions: list[RowRegion],
    runtime_import: str = "from .kernels_runtime import",
    grouped: frozenset[str] = frozenset(),
    activations_import: str = "from .activations import activation",
) -> str:
    """`kernels.py` for the generated package: per region the PyTorch function, the Triton kernels (only when
    triton imports) and `<name>(<inputs>)` choosing Triton for CUDA tensors and PyTorch elsewhere."""
    acts = uses_activation(regions)
    head = [
        '"""Fused regions generated by dslc: Triton kernels (forward and derived backward) on CUDA,',
        'the same regions as PyTorch ops elsewhere."""',
        "",
        "import torch",
        "",
        f"{runtime_import} {', '.join(RUNTIME_NAMES)}  # noqa: F401",
        *([activations_import] if acts else []),
        "",
        "try:",
        "    import triton",
        "    import triton.language as tl",
        "except ImportError:  # no Triton (CPU-only install): the PyTorch path is used",
        "    triton = None",
        "",
    ]
    body = []
    for r in regions:
        body.append(render_region_torch(r))
    body.append("if triton is not None:\n")
    if acts:
        body.append(
            "\n".join(("    " + ln) if ln.strip() else "" for ln in render_triton_helpers().splitlines()) + "\n"
        )
    for r in regions:
        text = render_region_triton(r, r.name in grouped)
        body.append("\n".join(("    " + ln) if ln.strip() else "" for ln in text.splitlines()) + "\n")
    for r in regions:
        params = ", ".join(_params(r))
        first = next(i.name for i in r.inputs if i.kind == "tensor")
        body.append(
            f"def {r.name}({params}):\n"
            f"    {_doc(r, 'Triton on CUDA, PyTorch elsewhere')}\n"
            f"    if triton is not None and {first}.is_cuda:\n"
            f"        return {r.name}_triton({params})\n"
            f"    return {r.name}_torch({params})\n"
        )
    return "\n".join(head) + "\n\n".join(body)


__all__ = [
    "triton_refusal",
    "render_region_torch",
    "render_region_torch_backward",
    "render_region_triton",
    "render_kernels_module",
    "class_name",
    "Expr",
]
