"""Reverse-mode differentiation of a fused `RowRegion`, emitted as straight-line statements.

`analyze` checks a region and works out, for every value, its kind (a scalar, one value per row, or
the full row), which inputs it depends on and whether a gradient flows through it.
`forward_program` turns the op list into statements `name = expression` and `backward_program`
walks the ops in reverse, one derivative rule per op kind (`_adjoint`), accumulating the adjoint of
values used more than once. Both emit through a `Dialect`: `TritonDialect` for the generated kernels
(`dslc.codegen.triton_region` wraps the statements in loads, stores and a launcher) and
`TorchDialect` (plain PyTorch, used by the tests to check the rules against torch.autograd).
Nothing here knows a layer by name: every kernel comes from the op list.

The compiler must not import torch: this module only builds text.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from dslc.ir import ops
from dslc.ir.regions import BINARY_OPS, REGION_OPS, ROW_OPS, UNARY_OPS, RegionInput, RegionOp, RowRegion

# Value kinds, ordered: an op's result has the largest kind among its arguments.
CONST, ROW, FULL = 0, 1, 2  # a number (scalar input, literal) / one value per row / the whole row
KIND_NAMES = {CONST: "scalar", ROW: "per-row", FULL: "full-row"}

CAST_DTYPES = ("f32", "bf16", "f16")
TORCH_DTYPES = {"f32": "torch.float32", "bf16": "torch.bfloat16", "f16": "torch.float16"}
TL_DTYPES = {"f32": "tl.float32", "bf16": "tl.bfloat16", "f16": "tl.float16"}

SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)
INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
TWO_OVER_SQRT_PI = 1.1283791670955126  # 2 / sqrt(pi): the derivative of erf at 0
SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi), gelu_tanh
GELU_TANH_C = 0.044715


class RegionError(ValueError):
    """The region breaks a rule the kernel generators rely on (a fusion-pass bug, said with the region's name)."""


# ----------------------------------------------------------------------------------------------------------------
# Expressions: text with a precedence (for minimal parentheses), a kind and the value names it reads.

P_CMP, P_AND, P_ADD, P_MUL, P_NEG, P_POW, P_ATOM = 1, 2, 3, 4, 5, 6, 9


@dataclass(frozen=True, eq=False)
class Expr:
    text: str
    kind: int
    reads: frozenset[str] = frozenset()
    prec: int = P_ATOM
    literal: float | None = None  # set for number literals

    def __str__(self) -> str:
        return self.text

    def paren(self, prec: int) -> str:
        return f"({self.text})" if self.prec < prec else self.text

    def _bin(self, other: Expr | float, op: str, prec: int, reverse: bool = False) -> Expr:
        o = as_expr(other)
        a, b = (o, self) if reverse else (self, o)
        # left-associative: the right operand keeps its parentheses at equal precedence (evaluation order)
        text = f"{a.paren(prec)} {op} {b.paren(prec + 1)}"
        return Expr(text, max(a.kind, b.kind), a.reads | b.reads, prec)

    def __add__(self, o):
        return self._bin(o, "+", P_ADD)

    def __radd__(self, o):
        return self._bin(o, "+", P_ADD, True)

    def __sub__(self, o):
        return self._bin(o, "-", P_ADD)

    def __rsub__(self, o):
        return self._bin(o, "-", P_ADD, True)

    def __mul__(self, o):
        return self._bin(o, "*", P_MUL)

    def __rmul__(self, o):
        return self._bin(o, "*", P_MUL, True)

    def __truediv__(self, o):
        return self._bin(o, "/", P_MUL)

    def __rtruediv__(self, o):
        return self._bin(o, "/", P_MUL, True)

    def __neg__(self):
        if self.literal is not None:
            return lit(-self.literal)
        return Expr(f"-{self.paren(P_NEG)}", self.kind, self.reads, P_NEG)

    def __and__(self, o):
        return self._bin(o, "&", P_AND)

    def gt(self, o):
        return self._bin(o, ">", P_CMP)

    def lt(self, o):
        return self._bin(o, "<", P_CMP)

    def ge(self, o):
        return self._bin(o, ">=", P_CMP)

    def le(self, o):
        return self._bin(o, "<=", P_CMP)

    def eq(self, o):
        return self._bin(o, "==", P_CMP)


def fmt_float(c: float) -> str:
    c = float(c)
    if math.isnan(c):
        return 'float("nan")'
    if math.isinf(c):
        return 'float("inf")' if c > 0 else '-float("inf")'
    return repr(c)


def lit(c: float) -> Expr:
    c = float(c)
    text = fmt_float(c)
    return Expr(text, CONST, frozenset(), P_NEG if text.startswith("-") else P_ATOM, literal=c)


def as_expr(x: Expr | float | int) -> Expr:
    return x if isinstance(x, Expr) else lit(x)


def name(ident: str, kind: int) -> Expr:
    return Expr(ident, kind, frozenset({ident}))


def call(fn: str, *args: Expr | float | str, kind: int | None = None) -> Expr:
    """`fn(a, b, ...)`; string arguments are pasted as they are (keywords, axis numbers)."""
    exprs = [a for a in args if not isinstance(a, str)]
    exprs = [as_expr(a) for a in exprs]
    texts = [a if isinstance(a, str) else as_expr(a).text for a in args]
    k = max((e.kind for e in exprs), default=CONST) if kind is None else kind
    reads = frozenset().union(*(e.reads for e in exprs)) if exprs else frozenset()
    return Expr(f"{fn}({', '.join(texts)})", k, reads)


def method(obj: Expr, tail: str, kind: int | None = None, extra: Iterable[Expr] = ()) -> Expr:
    """`obj.tail` (a method call or attribute), e.g. `x.to(torch.float32)`."""
    reads = obj.reads.union(*(e.reads for e in extra))
    return Expr(f"{obj.paren(P_ATOM)}.{tail}", obj.kind if kind is None else kind, reads)


@dataclass(frozen=True)
class Stmt:
    target: str
    expr: Expr
    comment: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Analysis


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


# helpers the generated code imports from the package's kernels_runtime.py
RUNTIME_NAMES = (
    "check_lanes",
    "check_output_shape",
    "grad_buffer",
    "grad_or_zeros",
    "launch_pair",
    "launch_rows",
    "partial_grad_buffer",
    "reduce_grad",
    "row_invariant",
    "row_layout",
    "row_width",
    "strides4",
    "sum_to_shape",
)

# names the generated code uses itself (modules, kernel and launcher locals, runtime helpers, builtins it calls)
_RESERVED = (
    set(keyword.kwlist)
    | set(RUNTIME_NAMES)
    | {
        "tl",
        "triton",
        "torch",
        "math",
        "F",
        "ctx",
        "rows",
        "cols",
        "row_mask",
        "pid",
        "block",
        "partial_cols",
        "mask",
        "i0",
        "i1",
        "i2",
        "R",
        "D0",
        "D1",
        "D2",
        "N",
        "BLOCK_M",
        "BLOCK_N",
        "rot_cols",
        "rot_sign",
        "rot_idx",
        "lay",
        "float",
        "activation",  # the activations by name (dslc/codegen/activations.py)
        "activation_fwd",
        "activation_bwd",
        "activation_torch_bwd",
    }
)


class Namer:
    """Hands out Python identifiers, never the same twice and never a reserved one."""

    def __init__(self, reserved: Iterable[str] = ()):
        self.used = set(_RESERVED) | set(reserved)

    def fresh(self, base: str) -> str:
        ident = re.sub(r"\W", "_", base) or "v"
        if ident[0].isdigit():
            ident = "v_" + ident
        cand, i = ident, 2
        while cand in self.used:
            cand, i = f"{ident}_{i}", i + 1
        self.used.add(cand)
        return cand


@dataclass
class ValueInfo:
    ident: str  # the Python identifier in generated code
    kind: int
    lanes: frozenset[str]  # tensor inputs whose values vary along the row in this value (empty: not FULL)
    deps: frozenset[str]  # every tensor input this value depends on
    active: bool  # a gradient flows from a needs_grad input to this value
    dtype: str | None  # torch dtype expression for the PyTorch path (None: a Python number)


@dataclass
class RegionInfo:
    region: RowRegion
    values: dict[str, ValueInfo]
    namer: Namer
    tensor_inputs: list[str] = field(default_factory=list)
    scalar_inputs: list[str] = field(default_factory=list)
    choice_inputs: list[str] = field(default_factory=list)  # build-time strings: a tl.constexpr in the kernels
    grad_inputs: list[str] = field(default_factory=list)  # tensor inputs with needs_grad

    def ident(self, value: str) -> str:
        return self.values[value].ident

    def region_input(self, name: str) -> RegionInput:
        return next(i for i in self.region.inputs if i.name == name)

    def kind(self, value: str) -> int:
        return self.values[value].kind

    def arg(self, a) -> Expr:
        """An op argument (a value name or a number) as an expression."""
        if _is_number(a):
            return lit(a)
        v = self.values[a]
        return name(v.ident, v.kind)

    def rotated_inputs(self) -> list[str]:
        return [op.args[0] for op in self.region.ops if op.op == "rotate_half"]


def cast_dtype(op: RegionOp) -> str:
    return dict(op.attrs).get("dtype", "")


def activation_choice(op: RegionOp) -> str:
    """The choice input naming an `activation` op's activation (its `name` attribute)."""
    return dict(op.attrs).get("name", "")


def analyze(region: RowRegion) -> RegionInfo:
    """Check the region and compute each value's kind, dependencies, activity and (PyTorch) dtype."""
    where = f"region {region.name!r}"
    if not region.name.isidentifier() or keyword.iskeyword(region.name):
        raise RegionError(f"{where}: the name must be a Python identifier")
    namer = Namer()
    values: dict[str, ValueInfo] = {}
    info = RegionInfo(region, values, namer)
    for inp in region.inputs:
        if inp.name in values:
            raise RegionError(f"{where}: input {inp.name!r} is listed twice")
        if inp.kind == "tensor":
            values[inp.name] = ValueInfo(
                namer.fresh(inp.name),
                FULL,
                frozenset({inp.name}),
                frozenset({inp.name}),
                inp.needs_grad,
                f"{inp.name}.dtype",
            )
            info.tensor_inputs.append(inp.name)
            if inp.needs_grad:
                info.grad_inputs.append(inp.name)
        elif inp.kind == "scalar":
            values[inp.name] = ValueInfo(namer.fresh(inp.name), CONST, frozenset(), frozenset(), False, None)
            info.scalar_inputs.append(inp.name)
        elif inp.kind == "choice":
            values[inp.name] = ValueInfo(namer.fresh(inp.name), CONST, frozenset(), frozenset(), False, None)
            info.choice_inputs.append(inp.name)
        else:
            raise RegionError(
                f"{where}: input {inp.name!r} has kind {inp.kind!r} (expected 'tensor', 'scalar' or 'choice')"
            )
    if not info.tensor_inputs:
        raise RegionError(f"{where}: needs at least one tensor input (the row layout comes from the tensors)")
    # the Python-visible input names must be identifiers: they are the generated functions' parameters
    for inp in region.inputs:
        if values[inp.name].ident != inp.name:
            raise RegionError(f"{where}: input name {inp.name!r} is not usable as a Python parameter name")

    for i, op in enumerate(region.ops):
        at = f"{where}, op {i} ({op.op} -> {op.result})"
        if op.op not in REGION_OPS:
            raise RegionError(f"{at}: unknown op (known: {', '.join(REGION_OPS)})")
        arity = 2 if op.op in BINARY_OPS else 1
        if len(op.args) != arity:
            raise RegionError(f"{at}: takes {arity} argument(s), got {len(op.args)}")
        for a in op.args:
            if not _is_number(a) and a not in values:
                raise RegionError(f"{at}: argument {a!r} is neither a region input nor an earlier result")
            if a in info.choice_inputs:
                raise RegionError(f"{at}: the choice input {a!r} is a name, not a value (only `activation` reads it)")
        if (op.op == "activation") != (activation_choice(op) != ""):
            raise RegionError(f"{at}: an `activation` op, and only one, names its choice input (attribute `name`)")
        if op.op == "activation" and activation_choice(op) not in info.choice_inputs:
            raise RegionError(f"{at}: activation name {activation_choice(op)!r} is not a choice input")
        if op.result in values:
            raise RegionError(f"{at}: result name {op.result!r} is already defined")
        args = [values[a] if not _is_number(a) else None for a in op.args]
        kinds = [v.kind if v else CONST for v in args]
        lanes = frozenset().union(*(v.lanes for v in args if v))
        deps = frozenset().union(*(v.deps for v in args if v))
        active = any(v.active for v in args if v)
        dtypes = [v.dtype for v in args if v and v.dtype]
        dtype = dtypes[0] if dtypes else None
        if len(set(dtypes)) > 1:
            dtype = f"torch.promote_types({dtypes[0]}, {dtypes[1]})"
        kind = max(kinds)
        if op.op == "pow":
            if not _is_number(op.args[1]):
                raise RegionError(f"{at}: the exponent must be a constant number, got {op.args[1]!r}")
        elif op.op == "cast":
            d = cast_dtype(op)
            if d.startswith("input:"):
                src = d[len("input:") :]
                if src not in info.tensor_inputs:
                    raise RegionError(f"{at}: dtype {d!r} names no tensor input")
                dtype = f"{src}.dtype"
            elif d in CAST_DTYPES:
                dtype = TORCH_DTYPES[d]
            else:
                raise RegionError(f"{at}: dtype {d!r} (expected one of {', '.join(CAST_DTYPES)} or input:<name>)")
        elif op.op in ROW_OPS:
            lanes = frozenset()
            kind = ROW if kind == FULL else kind
        elif op.op == "rotate_half":
            a = op.args[0]
            if _is_number(a) or a not in info.tensor_inputs:
                raise RegionError(
                    f"{at}: the argument of rotate_half must be a region tensor input, got {a!r} "
                    "(the kernel loads it a second time at the rotated columns)"
                )
        values[op.result] = ValueInfo(namer.fresh(op.result), kind, lanes, deps, active, dtype)

    if not region.outputs:
        raise RegionError(f"{where}: has no outputs")
    for o in region.outputs:
        if o not in values:
            raise RegionError(f"{where}: output {o!r} is not defined")
        if values[o].kind == CONST:
            raise RegionError(f"{where}: output {o!r} depends on no tensor input")
    if region.output_dtypes and len(region.output_dtypes) != len(region.outputs):
        raise RegionError(f"{where}: {len(region.outputs)} outputs but {len(region.output_dtypes)} output dtypes")
    for d in region.output_dtypes:
        if not (d in CAST_DTYPES or (d.startswith("input:") and d[len("input:") :] in info.tensor_inputs)):
            raise RegionError(
                f"{where}: output dtype {d!r} (expected one of {', '.join(CAST_DTYPES)} or input:<tensor input>)"
            )
    return info


# ----------------------------------------------------------------------------------------------------------------
# Dialects: how each primitive is spelled.


class Dialect:
    """Spelling of the primitives; `info` gives identifiers. Subclasses: Triton and PyTorch."""

    def __init__(self, info: RegionInfo):
        self.info = info

    # unary math by generic name: exp log sqrt rsqrt sigmoid erf cos sin abs tanh relu silu gelu gelu_tanh
    def fn(self, fn: str, a: Expr) -> Expr:
        raise NotImplementedError

    def activation(self, a: Expr, choice: str) -> Expr:
        """The activation that the choice input `choice` names (ops.ACTIVATIONS), dispatched when compiled."""
        raise NotImplementedError

    def activation_grad(self, a: Expr, g: Expr, choice: str) -> Expr:
        """g times the derivative of that activation at `a`."""
        raise NotImplementedError

    def where(self, c: Expr, a: Expr | float, b: Expr | float) -> Expr:
        raise NotImplementedError

    def maximum(self, a: Expr, b: Expr) -> Expr:
        raise NotImplementedError

    def minimum(self, a: Expr, b: Expr) -> Expr:
        raise NotImplementedError

    def pow(self, a: Expr, c: float) -> Expr:
        raise NotImplementedError

    def cast(self, a: Expr, dtype: str) -> Expr:
        raise NotImplementedError

    def row_sum(self, a: Expr) -> Expr:
        raise NotImplementedError

    def row_mean(self, a: Expr) -> Expr:
        raise NotImplementedError

    def row_max(self, a: Expr) -> Expr:
        raise NotImplementedError

    def row_len(self, a: Expr) -> Expr:
        raise NotImplementedError

    def rotate_half(self, x_input: str) -> Expr:
        raise NotImplementedError

    def rotate_half_t(self, g: Expr, like: Expr) -> Expr:
        """The adjoint of rotate_half: (g1, g2) -> (g2, -g1) over the last dim."""
        raise NotImplementedError

    def full(self, e: Expr, like: Expr) -> Expr:
        """`e` (per-row or scalar) broadcast to a full row like `like`."""
        raise NotImplementedError

    def zeros(self, like: Expr) -> Expr:
        raise NotImplementedError

    def indicator(self, c: Expr) -> Expr:
        """1.0 where `c` holds (and the lane is inside the row), else 0.0."""
        return self.where(c, 1.0, 0.0)

    # the generic parts, spelled with the primitives above
    def tanh(self, a: Expr) -> Expr:
        return self.fn("tanh", a)

    def sign_select(self, a: Expr, g: Expr) -> Expr:
        """g * sign(a) (0 at 0), as torch.abs's gradient."""
        return self.where(a.gt(0.0), g, self.where(a.lt(0.0), -g, 0.0))


class TritonDialect(Dialect):
    """Triton spelling. Values are fp32 tiles: [BLOCK_M, BLOCK_N] (full), [BLOCK_M, 1] (per-row) or scalars.

    `loads[x]` is (pointer, row offset, column stride) names of tensor input x, for the rotated load.
    """

    def __init__(self, info: RegionInfo, loads: dict[str, tuple[str, str, str]]):
        super().__init__(info)
        self.loads = loads

    def _t(self, a: Expr) -> Expr:
        # a bare number literal is a constexpr inside @triton.jit: make it a tensor before calling tl.* on it
        return call("tl.full", "[]", a, "tl.float32") if a.literal is not None else a

    def fn(self, fn: str, a: Expr) -> Expr:
        a = self._t(a)
        if fn in ("exp", "log", "sqrt", "rsqrt", "sigmoid", "erf", "cos", "sin", "abs"):
            return call(f"tl.{fn}", a)
        if fn == "tanh":  # tl has no tanh: 2 sigmoid(2a) - 1 (exact at +-inf)
            return 2.0 * call("tl.sigmoid", 2.0 * a) - 1.0
        if fn == "relu":
            return call("tl.maximum", a, 0.0)
        if fn == "silu":
            return a * call("tl.sigmoid", a)
        if fn == "gelu":
            return 0.5 * a * (1.0 + call("tl.erf", a * SQRT1_2))
        if fn == "gelu_tanh":
            return 0.5 * a * (1.0 + self.tanh(SQRT_2_OVER_PI * (a + GELU_TANH_C * a * a * a)))
        raise KeyError(fn)

    def activation(self, a, choice):  # a @triton.jit helper; `choice` is a tl.constexpr: one branch compiles
        return call("activation_fwd", self._t(a), choice)

    def activation_grad(self, a, g, choice):
        return call("activation_bwd", self._t(a), g, choice)

    def where(self, c, a, b):
        return call("tl.where", c, as_expr(a), as_expr(b))

    def maximum(self, a, b):
        return call("tl.maximum", self._t(a), b)

    def minimum(self, a, b):
        return call("tl.minimum", self._t(a), b)

    def pow(self, a: Expr, c: float) -> Expr:
        c = float(c)
        a = self._t(a)
        if c == 0.0:
            return a * 0.0 + 1.0
        if c == 0.5:
            return call("tl.sqrt", a)
        if c == -0.5:
            return call("tl.rsqrt", a)
        if c.is_integer() and abs(c) <= 4:
            prod = a
            for _ in range(int(abs(c)) - 1):
                prod = prod * a
            return prod if c > 0 else 1.0 / prod
        if c.is_integer():  # |a|^c with the sign of a^c for negative a
            mag = call("tl.exp2", c * call("tl.log2", call("tl.abs", a)))
            return mag if c % 2 == 0 else self.where(a.lt(0.0), -1.0, 1.0) * mag
        return call("tl.exp2", c * call("tl.log2", a))  # NaN for a < 0, as torch.pow

    def cast(self, a: Expr, dtype: str) -> Expr:
        # compute stays fp32: a cast rounds the value to `dtype` and comes back
        a = self._t(a)
        if dtype == "f32":
            return a
        if dtype.startswith("input:"):
            ptr = self.loads[dtype[len("input:") :]][0]
            return method(method(a, f"to({ptr}.dtype.element_ty)"), "to(tl.float32)")
        return method(method(a, f"to({TL_DTYPES[dtype]})"), "to(tl.float32)")

    def row_sum(self, a):
        return call("tl.sum", call("tl.where", "mask", a, 0.0), "axis=1", "keep_dims=True", kind=ROW)

    def row_mean(self, a):
        return self.row_sum(a) / self.row_len(a)

    def row_max(self, a):
        return call("tl.max", call("tl.where", "mask", a, lit(-math.inf)), "axis=1", "keep_dims=True", kind=ROW)

    def row_len(self, a):
        return Expr("N", CONST)

    def rotate_half(self, x_input: str) -> Expr:
        ptr, row, s3 = self.loads[x_input]
        load = f"tl.load({ptr} + {row} + rot_cols * {s3}, mask=mask, other=0.0).to(tl.float32)"
        return Expr("rot_sign", CONST) * Expr(load, FULL, frozenset())

    def rotate_half_t(self, g, like):
        g = self.full(g, like)
        return -Expr("rot_sign", CONST) * call("tl.gather", g, "rot_idx", "1", kind=FULL)

    def full(self, e, like):
        return e if e.kind == FULL else e + self.zeros(like)

    def zeros(self, like):
        return Expr("tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)", FULL)

    def indicator(self, c):
        return call("tl.where", c & Expr("mask", FULL), 1.0, 0.0)


class TorchDialect(Dialect):
    """PyTorch spelling: full values are [..., N] tensors, per-row values [..., 1], scalars Python numbers.

    Ops run in their arguments' dtype (plain torch semantics); a cast converts with `.to(...)`.
    """

    # the op table's PyTorch spellings, with torch.nn.functional written out (generated kernels import no F)
    TORCH_FN = {n: t.replace("F.", "torch.nn.functional.", 1) for n, t in ops.torch_spellings().items()}

    def _t(self, a: Expr) -> Expr:
        return call("torch.as_tensor", a) if a.kind == CONST else a

    def fn(self, fn, a):
        a = self._t(a)
        if fn == "gelu_tanh":
            return call("torch.nn.functional.gelu", a, 'approximate="tanh"')
        return call(self.TORCH_FN[fn], a)

    def activation(self, a, choice):  # the package's activations.py
        return call("activation", self._t(a), choice)

    def activation_grad(self, a, g, choice):  # the derivative rules (tests check them against autograd)
        return call("activation_torch_bwd", self._t(a), g, choice)

    def where(self, c, a, b):
        return call("torch.where", c, as_expr(a), as_expr(b))

    def _clamp(self, a, b, which):
        if a.kind == CONST and b.kind == CONST:
            return call(f"torch.{'maximum' if which == 'min' else 'minimum'}", self._t(a), self._t(b))
        if b.kind == CONST:
            return call("torch.clamp", a, f"{which}={b.text}", kind=a.kind)
        if a.kind == CONST:
            return call("torch.clamp", b, f"{which}={a.text}", kind=b.kind)
        return call(f"torch.{'maximum' if which == 'min' else 'minimum'}", a, b)

    def maximum(self, a, b):
        return self._clamp(a, b, "min")

    def minimum(self, a, b):
        return self._clamp(a, b, "max")

    def pow(self, a, c):
        c = float(c)
        if c == 1.0:
            return a
        return call("torch.pow", self._t(a), c)

    def cast(self, a, dtype):
        a = self._t(a)
        if dtype.startswith("input:"):
            src = self.info.ident(dtype[len("input:") :])
            return method(a, f"to({src}.dtype)", extra=[name(src, FULL)])
        return method(a, f"to({TORCH_DTYPES[dtype]})")

    def row_sum(self, a):
        return method(a, "sum(-1, keepdim=True)", kind=ROW)

    def row_mean(self, a):
        return method(a, "mean(-1, keepdim=True)", kind=ROW)

    def row_max(self, a):
        return method(a, "amax(-1, keepdim=True)", kind=ROW)

    def row_len(self, a):
        return method(a, "shape[-1]", kind=CONST)

    def rotate_half(self, x_input):
        x = self.info.arg(x_input)
        half = f"{x.text}.shape[-1] // 2"
        return call("torch.cat", Expr(f"(-{x.text}[..., {half}:], {x.text}[..., :{half}])", FULL, x.reads), "-1")

    def rotate_half_t(self, g, like):
        g = self.full(g, like)
        half = f"{g.paren(P_ATOM)}.shape[-1] // 2"
        gt = g.paren(P_ATOM)
        return call("torch.cat", Expr(f"({gt}[..., {half}:], -{gt}[..., :{half}])", FULL, g.reads), "-1")

    def full(self, e, like):
        return e if e.kind == FULL else method(e, f"expand_as({like.text})", kind=FULL, extra=[like])

    def zeros(self, like):
        return call("torch.zeros_like", like)


# ----------------------------------------------------------------------------------------------------------------
# Forward


def forward_expr(info: RegionInfo, op: RegionOp, d: Dialect) -> Expr:
    """The expression computing `op` from its (already named) arguments."""
    args = [info.arg(a) for a in op.args]
    a = args[0]
    o = op.op
    if o == "neg":
        return -a
    if o == "identity":
        return a
    if o == "activation":
        return d.activation(a, info.ident(activation_choice(op)))
    if o in UNARY_OPS:
        return d.fn(o, a)
    if o in ("add", "sub", "mul", "div"):
        b = args[1]
        return {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[o]
    if o == "maximum":
        return d.maximum(a, args[1])
    if o == "minimum":
        return d.minimum(a, args[1])
    if o == "pow":
        return d.pow(a, op.args[1])
    if o == "cast":
        return d.cast(a, cast_dtype(op))
    if o in ROW_OPS:
        if a.kind != FULL:  # a reduction over a dim of size 1 (torch keepdim semantics): the value itself
            return a
        return {"sum": d.row_sum, "mean": d.row_mean, "amax": d.row_max}[o](a)
    if o == "rotate_half":
        return d.rotate_half(op.args[0])
    raise RegionError(f"region {info.region.name!r}: no forward rule for op {o!r}")


def forward_program(info: RegionInfo, d: Dialect) -> list[Stmt]:
    out = []
    for op in info.region.ops:
        e = forward_expr(info, op, d)
        out.append(Stmt(info.ident(op.result), e, _op_comment(op)))
    return out


def _op_comment(op: RegionOp) -> str:
    args = ", ".join(fmt_float(a) if _is_number(a) else str(a) for a in op.args)
    attrs = "".join(f", {k}={v}" for k, v in op.attrs)
    return f"{op.op}({args}{attrs})"


# ----------------------------------------------------------------------------------------------------------------
# Backward: one rule per op kind. Each returns the contribution to each argument's adjoint (None: none).


def _adjoint(info: RegionInfo, op: RegionOp, y: Expr, g: Expr, d: Dialect) -> list[Expr | None]:
    args = [info.arg(a) for a in op.args]
    a = args[0]
    b = args[1] if len(args) > 1 else None
    o = op.op
    if o in ("identity", "cast"):
        return [g]  # a cast's gradient passes through (fp32 throughout: no rounding of the gradient)
    if o == "neg":
        return [-g]
    if o == "add":
        return [g, g]
    if o == "sub":
        return [g, -g]
    if o == "mul":
        return [g * b, g * a]
    if o == "div":
        return [g / b, -g * y / b]
    if o == "exp":
        return [g * y]
    if o == "log":
        return [g / a]
    if o == "sqrt":
        return [g * 0.5 / y]
    if o == "rsqrt":
        return [g * -0.5 * y * y * y]
    if o == "tanh":
        return [g * (1.0 - y * y)]
    if o == "sigmoid":
        return [g * y * (1.0 - y)]
    if o == "silu":
        s = d.fn("sigmoid", a)
        return [g * s * (1.0 + a * (1.0 - s))]
    if o == "gelu":  # d/da a Phi(a) = Phi(a) + a phi(a)
        cdf = 0.5 * (1.0 + d.fn("erf", a * SQRT1_2))
        pdf = d.fn("exp", -0.5 * a * a) * INV_SQRT_2PI
        return [g * (cdf + a * pdf)]
    if o == "activation":
        return [d.activation_grad(a, g, info.ident(activation_choice(op)))]
    if o == "gelu_tanh":
        t = d.tanh(SQRT_2_OVER_PI * (a + GELU_TANH_C * a * a * a))
        dt = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * a * a)
        return [g * (0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dt)]
    if o == "relu":
        return [d.where(a.gt(0.0), g, 0.0)]
    if o == "erf":  # 2 / sqrt(pi) e^(-a^2)
        return [g * TWO_OVER_SQRT_PI * d.fn("exp", -1.0 * a * a)]
    if o == "cos":
        return [-g * d.fn("sin", a)]
    if o == "sin":
        return [g * d.fn("cos", a)]
    if o == "abs":
        return [d.sign_select(a, g)]
    if o in ("maximum", "minimum"):
        wins = (lambda p, q: p.gt(q)) if o == "maximum" else (lambda p, q: p.lt(q))
        if b.kind == CONST:  # torch.clamp: the gradient goes to a where a is inside the bound
            return [d.where(a.ge(b) if o == "maximum" else a.le(b), g, 0.0), None]
        if a.kind == CONST:
            return [None, d.where(b.ge(a) if o == "maximum" else b.le(a), g, 0.0)]
        # torch.maximum / minimum: ties split the gradient in half
        half = 0.5 * g
        return [
            d.where(wins(a, b), g, d.where(a.eq(b), half, 0.0)),
            d.where(wins(b, a), g, d.where(a.eq(b), half, 0.0)),
        ]
    if o == "pow":
        c = float(op.args[1])
        if c == 0.0:
            return [None, None]
        if c == 1.0:
            return [g, None]
        return [g * (c * d.pow(a, c - 1.0)), None]
    if o in ROW_OPS:
        if a.kind != FULL:
            return [g]
        if o == "sum":
            return [g]  # a per-row adjoint broadcast back over the row
        if o == "mean":
            return [g / d.row_len(a)]
        # amax: the gradient goes to the position(s) of the max, split evenly among ties (as torch.amax)
        hit = d.indicator(a.eq(y))
        return [hit * (g / d.row_sum(hit))]
    if o == "rotate_half":
        return [d.rotate_half_t(g, y)]
    raise RegionError(f"region {info.region.name!r}: no derivative rule for op {o!r}")


@dataclass
class Backward:
    stmts: list[Stmt]  # forward recomputation and adjoints, in order, dead statements removed
    input_grads: dict[str, Expr]  # tensor input (needs_grad) -> its full-row adjoint


def backward_program(info: RegionInfo, d: Dialect, grad_outputs: dict[str, Expr]) -> Backward:
    """Reverse-mode pass. `grad_outputs`: the incoming gradient of each region output, by output position
    (the key is the output's index as a string), already loaded / named; kinds are the outputs' kinds."""
    region = info.region
    adj: dict[str, list[Expr]] = {}
    for i, out in enumerate(region.outputs):
        if info.values[out].active:
            adj.setdefault(out, []).append(grad_outputs[str(i)])

    stmts: list[Stmt] = []
    names = info.namer

    def settle(value: str) -> Expr | None:
        """Sum the contributions to `value`'s adjoint into one named expression of at most its kind."""
        contribs = adj.get(value)
        if not contribs:
            return None
        kind = info.kind(value)
        full = [c for c in contribs if c.kind > kind]
        rest = [c for c in contribs if c.kind <= kind]
        if full:  # full-row contributions to a per-row value: reduce over the row
            rest.append(d.row_sum(_total(full)))
        total = _total(rest)
        if total.prec == P_ATOM and total.reads and total.text in total.reads:
            return total  # already a name: no new statement
        ident = names.fresh(f"d_{info.ident(value)}")
        stmts.append(Stmt(ident, total, f"adjoint of {value}"))
        return name(ident, total.kind)

    for op in reversed(region.ops):
        if not info.values[op.result].active:
            continue
        g = settle(op.result)
        if g is None:
            continue
        y = info.arg(op.result)
        for arg, c in zip(op.args, _adjoint(info, op, y, g, d)):
            if c is None or _is_number(arg) or not info.values[arg].active:
                continue
            adj.setdefault(arg, []).append(c)

    grads: dict[str, Expr] = {}
    for x in info.grad_inputs:
        g = settle(x)
        xe = info.arg(x)
        grads[x] = d.zeros(xe) if g is None else d.full(g, xe)

    fwd = forward_program(info, d)
    roots = frozenset().union(*(e.reads for e in grads.values())) if grads else frozenset()
    return Backward(prune(fwd + stmts, roots), grads)


def _total(contribs: list[Expr]) -> Expr:
    """The sum of adjoint contributions; equal ones (x * x gives g * x twice) are counted, not repeated."""
    counts: dict[str, int] = {}
    first: dict[str, Expr] = {}
    for c in contribs:
        counts[c.text] = counts.get(c.text, 0) + 1
        first.setdefault(c.text, c)
    total = None
    for text, c in first.items():
        term = c if counts[text] == 1 else float(counts[text]) * c
        total = term if total is None else total + term
    return total


def prune(stmts: list[Stmt], roots: frozenset[str]) -> list[Stmt]:
    """Drop statements whose target nothing live reads (dead-code elimination, one backward sweep)."""
    live = set(roots)
    kept = []
    for s in reversed(stmts):
        if s.target in live:
            kept.append(s)
            live |= s.expr.reads
    return kept[::-1]


def live_reads(stmts: list[Stmt], roots: frozenset[str]) -> set[str]:
    """Every name read by the statements or the roots (to decide which inputs must be loaded)."""
    out = set(roots)
    for s in stmts:
        out |= s.expr.reads
    return out
