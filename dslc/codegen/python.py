"""IR -> Python source text for one forward body (the only place that knows Python expression syntax).

Single-use temporaries are inlined into their use, so `down_proj(silu(gate_proj(x)) * up_proj(x))`
renders as one line; every assigned line carries a shape comment and a `spec.model:LINE` reference.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field

from dslc.codegen.text import where
from dslc.ir import nodes as N
from dslc.ir import ops
from dslc.ir.evaluate import STATIC_UNARY
from dslc.passes.common import VIEW_OPS

TORCH_DTYPES = {
    "f32": "torch.float32",
    "f16": "torch.float16",
    "bf16": "torch.bfloat16",
    "f64": "torch.float64",
    "i64": "torch.int64",
    "i32": "torch.int32",
    "bool": "torch.bool",
}

ATOM, POW, UNARY, MUL, ADD, CMP, COND = 100, 15, 14, 13, 12, 9, 1
INLINE_LIMIT = 60  # a region or module call longer than this gets its own line instead of being nested
_BIN = {
    "add": ("+", ADD),
    "sub": ("-", ADD),
    "mul": ("*", MUL),
    "div": ("/", MUL),
    "matmul": ("@", MUL),
    "pow": ("**", POW),
}
_STATIC_BIN = {
    "+": ADD,
    "-": ADD,
    "*": MUL,
    "/": MUL,
    "//": MUL,
    "%": MUL,
    "@": MUL,
    "**": POW,
    "==": CMP,
    "!=": CMP,
    "<": CMP,
    "<=": CMP,
    ">": CMP,
    ">=": CMP,
    "in": CMP,
    "not in": CMP,
    "and": 4,
    "or": 3,
}
_TORCH_UNARY = ops.torch_spellings()  # unary ops spelled as one call (dslc/ir/ops.py)
_MOE = {"moe_dispatch": "dispatch", "grouped_linear": "grouped_linear", "moe_combine": "combine"}  # moe.py


class CodegenError(Exception):
    """The IR holds something the Python backend cannot render (a compiler bug or unsupported op)."""


@dataclass
class BodyContext:
    """Where a body is rendered: a module's forward (self.*) or a free function."""

    spec_name: str
    in_module: bool
    module: N.ModuleDef | None = None
    param_attrs: dict[str, str] = field(default_factory=dict)  # module param -> self attribute
    conditional_weights: set[str] = field(default_factory=set)
    needs_ctx: dict[str, bool] = field(default_factory=dict)  # module name -> forward takes ctx
    module_of_sub: dict[str, tuple[str, ...]] = field(default_factory=dict)  # submodule -> its module def(s)
    checkpointed: set[str] = field(default_factory=set)  # module defs with activation checkpointing
    type_names: dict = field(default_factory=dict)  # value -> shape comment text
    config_prefix: str = "self.config"  # how a forward body reaches the config


def static_text(e: N.E, ctx: BodyContext, names: dict[str, str], prec: int = 0, init: bool = False) -> str:
    """Render a static expression. `init`: inside __init__ (params are locals, config is `config`)."""
    text, p = _static(e, ctx, names, init)
    return f"({text})" if p < prec else text


def _static(e: N.E, ctx: BodyContext, names: dict[str, str], init: bool) -> tuple[str, int]:
    if isinstance(e, N.Const):
        if isinstance(e.value, str):
            return repr(e.value), ATOM
        if isinstance(e.value, (int, float)) and not isinstance(e.value, bool) and e.value < 0:
            return repr(e.value), UNARY
        return repr(e.value), ATOM
    if isinstance(e, N.Ref):
        if e.kind == "value":
            return names[e.name], ATOM
        if e.kind == "weight":
            return f"self.{e.name}", ATOM
        if e.kind == "param":
            if init or not ctx.in_module:
                return e.name, ATOM
            return f"self.{ctx.param_attrs[e.name]}", ATOM
        if e.kind == "config":
            return (f"config.{e.name}" if init else f"{ctx.config_prefix}.{e.name}"), ATOM
        if e.kind == "sym":
            return e.name, ATOM
        if e.kind == "layer":  # the layer index of a repeat's constructor arguments (`for i in range(n)`)
            return e.name, ATOM
        if e.kind == "loop_index":  # `for i, layer in layers`: the enumerate() variable
            return names[N.loop_index_key(e.name)], ATOM
        if e.kind == "dtype":
            if e.name not in TORCH_DTYPES:
                raise CodegenError(f"dtype `{e.name}` has no fixed torch dtype here")
            return TORCH_DTYPES[e.name], ATOM
        if e.kind == "dtype_of":
            if e.name.startswith("weight:"):
                return f"self.{e.name[len('weight:') :]}.dtype", ATOM
            return f"{names[e.name]}.dtype", ATOM
        raise CodegenError(f"unknown reference kind {e.kind}")
    if isinstance(e, N.BinE) and e.op == "[]":
        return f"{static_text(e.left, ctx, names, ATOM, init)}[{static_text(e.right, ctx, names, 0, init)}]", ATOM
    if isinstance(e, N.BinE):
        p = _STATIC_BIN[e.op]
        if e.op in ("==", "!=") and N.Const(None) in (e.left, e.right):  # comparisons with None use `is`
            other = e.right if e.left == N.Const(None) else e.left
            return f"{static_text(other, ctx, names, CMP + 1, init)} {'is' if e.op == '==' else 'is not'} None", CMP
        left = static_text(e.left, ctx, names, p + (e.op == "**"), init)
        right = static_text(e.right, ctx, names, p if e.op == "**" else p + 1, init)
        return f"{left} {e.op} {right}", p
    if isinstance(e, N.UnE):
        if e.op in ("int", "float", "len"):
            return f"{e.op}({static_text(e.operand, ctx, names, 0, init)})", ATOM
        if e.op in STATIC_UNARY:  # log, sqrt, floor, ceil: Python's math module
            return f"math.{e.op}({static_text(e.operand, ctx, names, 0, init)})", ATOM
        if e.op == "not":
            return f"not {static_text(e.operand, ctx, names, 5, init)}", 5
        return f"-{static_text(e.operand, ctx, names, UNARY, init)}", UNARY
    if isinstance(e, N.CondE):
        return (
            f"{static_text(e.then, ctx, names, 2, init)} if {static_text(e.test, ctx, names, 2, init)} "
            f"else {static_text(e.orelse, ctx, names, COND, init)}"
        ), COND
    if isinstance(e, N.ListE):
        return "[" + ", ".join(static_text(i, ctx, names, 0, init) for i in e.items) + "]", ATOM
    raise CodegenError(f"cannot render {type(e).__name__}")


def _uses(body, counts: dict[str, int]) -> None:
    from dslc.ir.evaluate import free_refs

    for st in body:
        if isinstance(st, N.Loop):
            for v in st.inputs:
                counts[v] = counts.get(v, 0) + 1
            _uses(st.body, counts)
            for v in st.yields:
                counts[v] = counts.get(v, 0) + 1
            continue
        if isinstance(st, N.Branch):
            _uses(st.then, counts)
            _uses(st.orelse, counts)
            exprs = [st.test, st.then_value, st.else_value]
        else:
            exprs = list(st.args) + [v for _, v in st.kwargs]
        for a in exprs:
            for r in free_refs(a):
                if r.kind in ("value", "dtype_of") and not r.name.startswith("weight:"):
                    counts[r.name] = counts.get(r.name, 0) + 1


class BodyRenderer:
    """Renders one Graph's body into indented Python lines.

    Naming is one rule, applied by `_bind` to every Python name the body assigns (op results, loop-carried
    variables, the loop variable): a name is never rebound while the SSA value it holds may still be read,
    whether by a later statement, inside a loop that repeats, by a graph output or through an expression
    kept back for inlining. Values get the user's variable name (or `<callee>_out`) when that is free, else
    a numbered variant; module-level names the body calls (torch, F, kernels, fns, ...) are never taken.
    """

    def __init__(self, graph: N.Graph, ctx: BodyContext, arg_names: dict[str, str] | None = None):
        self.g = graph
        self.ctx = ctx
        self.names: dict[str, str] = dict(arg_names or {a.name: a.name for a in graph.args})
        self.inline: dict[str, tuple[str, int, frozenset[str]]] = {}  # value -> (text, precedence, values it reads)
        counts: dict[str, int] = {}
        _uses(graph.body, counts)
        for o in graph.outputs:
            counts[o] = counts.get(o, 0) + 1
        self.counts = counts
        self.lines: list[str] = []
        self.used_syms: set[str] = set()
        self.loop_vars: dict[str, str] = {}  # a loop's variable (`layer`) -> its Python name
        self.last_read, self.position, self.loop_end = _liveness(graph)
        self.holder: dict[str, str] = {name: value for value, name in self.names.items()}  # Python name -> value
        self.reserved = (
            set(keyword.kwlist)
            | set(_GLOBALS)
            | _sym_names(graph)
            | {st.target for st in _walk(graph.body) if isinstance(st, N.Op) and st.op == "fn"}
        )
        self._reading: set[str] = set()  # values read by the op being rendered (through inlined text too)

    # ---- operands ---------------------------------------------------------------------------------
    def operand(self, e: N.E, prec: int = 0) -> str:
        if isinstance(e, N.Ref) and e.kind == "value" and e.name in self.inline:
            text, p, reads = self.inline.pop(e.name)
            self._reading |= reads
            return f"({text})" if p < prec else text
        self._collect_syms(e)
        self._reading |= set(_value_reads(e))
        return static_text(e, self.ctx, self.names, prec)

    def _collect_syms(self, e: N.E) -> None:
        from dslc.ir.evaluate import free_refs

        for r in free_refs(e):
            if r.kind == "sym":
                self.used_syms.add(r.name)

    # ---- ops --------------------------------------------------------------------------------------
    def op_text(self, op: N.Op) -> tuple[str, int]:
        a = op.args
        kw = dict(op.kwargs)
        name = op.op
        if name in _BIN:
            sym, p = _BIN[name]
            cond = [
                x for x in a if isinstance(x, N.Ref) and x.kind == "weight" and x.name in self.ctx.conditional_weights
            ]
            left = self.operand(a[0], p + (name == "pow"))
            right = self.operand(a[1], p if name == "pow" else p + 1)
            if cond and name in ("add", "sub"):
                other = left if cond[0] == a[1] else right
                return f"{other} if self.{cond[0].name} is None else {left} {sym} {right}", COND
            return f"{left} {sym} {right}", p
        if name == "neg":
            return f"-{self.operand(a[0], UNARY)}", UNARY
        if name == "identity":
            text, _ = self.operand(a[0]), None
            return text, ATOM
        if name in _TORCH_UNARY:
            return f"{_TORCH_UNARY[name]}({self.operand(a[0])})", ATOM
        if name == "gelu_tanh":
            return f'F.gelu({self.operand(a[0])}, approximate="tanh")', ATOM
        if name == "activation":  # the package's activations.py: ACT2FN[name](x)
            return f"activation({self.operand(a[0])}, {self.operand(a[1])})", ATOM
        if name in ("maximum", "minimum"):
            tensor_args = [x for x in a if _is_tensor(x)]
            if len(tensor_args) == 1:  # a tensor against a scalar: clamp
                scalar = a[1] if tensor_args[0] is a[0] else a[0]
                bound = "min" if name == "maximum" else "max"
                return f"{self.operand(tensor_args[0], ATOM)}.clamp({bound}={self.operand(scalar)})", ATOM
            return f"torch.{name}({self.operand(a[0])}, {self.operand(a[1])})", ATOM
        if name == "where":
            return f"torch.where({', '.join(self.operand(x) for x in a)})", ATOM
        if name in ("sum", "mean", "amax", "amin"):
            dim = self.operand(kw["dim"]) if "dim" in kw else "-1"
            keep = ", keepdim=True" if "keepdim" in kw and _truthy(kw["keepdim"]) else ""
            return f"{self.operand(a[0], ATOM)}.{name}(dim={dim}{keep})", ATOM
        if name in ("softmax", "log_softmax"):
            dim = self.operand(kw["dim"]) if "dim" in kw else "-1"
            return f"torch.{name}({self.operand(a[0])}, dim={dim})", ATOM
        if name == "linear":
            args = ", ".join(self.operand(x) for x in a)
            return f"F.linear({args})", ATOM
        if name == "gather":
            padding = f", {self.operand(kw['padding_idx'])}" if "padding_idx" in kw else ""
            return f"F.embedding({self.operand(a[1])}, {self.operand(a[0])}{padding})", ATOM
        if name == "cast":
            return f"{self.operand(a[0], ATOM)}.to({self.operand(a[1])})", ATOM
        if name == "reshape":
            dims = a[1].items if isinstance(a[1], N.ListE) else None
            if dims is None:
                raise CodegenError("reshape needs a list of dims")
            return f"{self.operand(a[0], ATOM)}.reshape({', '.join(self.operand(d) for d in dims)})", ATOM
        if name == "transpose":
            return f"{self.operand(a[0], ATOM)}.transpose({self.operand(a[1])}, {self.operand(a[2])})", ATOM
        if name == "rotate_half":
            x = self.operand(a[0], ATOM)
            return f"torch.cat([-{x}.chunk(2, dim=-1)[1], {x}.chunk(2, dim=-1)[0]], dim=-1)", ATOM
        if name == "fused_linear":
            parts = ", ".join(f"self.{c.value}" for c in kw["parts"].items)
            return f"fused_linear({self.operand(a[0])}, self.{op.target}, {parts})", ATOM
        if name == "region":
            suffix = f"_x{N.group_size(op)}" if N.group_size(op) > 1 else ""
            return f"kernels.{op.target}{suffix}({', '.join(self.operand(x) for x in a)})", ATOM
        if name == "select":
            return f"{self.operand(a[0], ATOM)}.select({self.operand(a[1])}, {self.operand(a[2])})", ATOM
        if name in ("unsqueeze", "squeeze"):
            return f"{self.operand(a[0], ATOM)}.{name}({self.operand(a[1])})", ATOM
        if name == "chunk":
            dim = self.operand(kw["dim"]) if "dim" in kw else "-1"
            return f"{self.operand(a[0], ATOM)}.chunk({self.operand(a[1])}, dim={dim})", ATOM
        if name == "split":
            dim = self.operand(kw["dim"]) if "dim" in kw else "-1"
            return f"{self.operand(a[0], ATOM)}.split({self.operand(a[1])}, dim={dim})", ATOM
        if name == "concat":
            dim = self.operand(kw["dim"]) if "dim" in kw else "-1"
            return f"torch.cat([{', '.join(self.operand(x) for x in a)}], dim={dim})", ATOM
        if name == "arange":
            device = self._device_arg()
            return f"torch.arange({', '.join(self.operand(x) for x in a)}, device={device})", ATOM
        if name == "constant":
            device = self._device_arg()
            values, dtype = (self.operand(x) for x in a)
            return f"constant_tensor({values}, {dtype}, {device})", ATOM
        if name == "dropout":
            p = self.operand(a[1]) if len(a) > 1 else self.operand(kw.get("p", N.Const(0.0)))
            return f"F.dropout({self.operand(a[0])}, p={p}, training=self.training)", ATOM
        if name == "topk":
            return f"torch.topk({self.operand(a[0])}, {self.operand(a[1])}, dim=-1)", ATOM
        if name in _MOE:
            return f"moe.{_MOE[name]}({', '.join(self.operand(x) for x in a)})", ATOM
        if name in ("conv2d", "max_pool2d"):
            args = ", ".join(self.operand(x) for x in a)
            opts = "".join(f", {k}={self.operand(v)}" for k, v in op.kwargs)
            return f"F.{name}({args}{opts})", ATOM
        if name == "expand":
            dims = a[1].items if isinstance(a[1], N.ListE) else None
            if dims is None:
                raise CodegenError("expand needs a list of dims")
            return f"{self.operand(a[0], ATOM)}.expand({', '.join(self.operand(d) for d in dims)})", ATOM
        if name == "attention":
            opts = [
                f"dropout={self.operand(v)} if self.training else 0.0" if k == "dropout" else f"{k}={self.operand(v)}"
                for k, v in op.kwargs
            ]
            qkv = ", ".join(self.operand(x) for x in a)
            return f"attention({qkv}, ctx, self.kv_cache, {', '.join(opts)})", ATOM
        if name == "call":
            return self._call(op), ATOM
        if name == "fn":
            return f"{op.target}({', '.join(self.operand(x) for x in a)})", ATOM
        raise CodegenError(f"no Python rendering for op `{name}`")

    def _call(self, op: N.Op) -> str:
        args = [self.operand(x) for x in op.args] + [f"{k}={self.operand(v)}" for k, v in op.kwargs]
        modules = self.ctx.module_of_sub.get(op.target, ())  # two or more for a choice `A() if c else B()`
        if any(self.ctx.needs_ctx.get(m) for m in modules):
            args.append("ctx")
        callee = self.loop_vars.get(op.target, f"self.{op.target}")
        checkpointed = [m for m in modules if m in self.ctx.checkpointed]
        if checkpointed:
            enabled = "self.training and self.gradient_checkpointing"
            if len(checkpointed) < len(modules):  # a choice of which only some sides are checkpointed
                kinds = checkpointed[0] if len(checkpointed) == 1 else f"({', '.join(checkpointed)})"
                enabled += f" and isinstance({callee}, {kinds})"
            return f"checkpoint_call({callee}, {enabled}, {', '.join(args)})"
        return f"{callee}({', '.join(args)})"

    def _device_arg(self) -> str:
        for a in self.g.args:
            if a.tensor is not None:
                self._reading.add(a.name)
                return f"{self.names[a.name]}.device"
        raise CodegenError("`arange` and `constant` need a tensor argument in the same function for their device")

    # ---- statements --------------------------------------------------------------------------------
    def render(self) -> list[str]:
        self._body(self.g.body, "")
        outs = ", ".join(self.operand(N.Ref("value", o)) for o in self.g.outputs)
        self.lines.append(f"return {outs}")
        return self._sym_bindings() + self.lines

    def _body(self, body, indent: str) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                self._loop(st, indent)
                continue
            if isinstance(st, N.Branch):
                self._branch(st, indent)
                continue
            self._reading = set()
            text, p = self.op_text(st)
            single_use = len(st.results) == 1 and not st.vars[0] and self.counts.get(st.results[0], 0) == 1
            returned = st.results[0] in self.g.outputs
            if (
                single_use
                and (returned or len(text) <= INLINE_LIMIT or st.op not in ("region", "call"))
                and not (st.op == "call" and self._feeds_region(st.results[0]))
            ):
                self.inline[st.results[0]] = (text, p, frozenset(self._reading))
                continue
            at = self.position[id(st)]
            targets: list[str] = []
            for r, var in zip(st.results, st.vars):
                if len(st.results) > 1 and not self.counts.get(r, 0):
                    targets.append("_")  # a result nobody reads
                    continue
                targets.append(self._bind(r, self._preferred(st, r, var), at, targets))
            comment = _shape_comment(self.ctx, st)
            self.lines += commented(f"{indent}{', '.join(targets)} = {text}", comment, indent)

    def _loop(self, st: N.Loop, indent: str) -> None:
        at = self.position[id(st)]
        # the carried variables and the loop variable are bound together as the loop starts; the inputs are
        # copied in with one tuple assignment, so an input held in another carried variable's name is read first
        self._reading = set()
        entering = [(self.operand(N.Ref("value", inp)), inp) for inp in st.inputs]
        taken: list[str] = []
        carried = [self._bind(param, var, at, taken) for param, var in zip(st.params, st.vars)]
        self._assign(indent, [(n, text) for n, (text, inp) in zip(carried, entering) if self.names.get(inp) != n])
        loop_var = self._bind(_loop_var_key(st), st.var, at, taken)
        self.loop_vars[st.var] = loop_var
        self.ctx.module_of_sub[st.var] = self.ctx.module_of_sub.get(st.over, ())
        if st.index:
            index = self._bind(N.loop_index_key(st.index), st.index, at, [*taken, loop_var])
            head = f"for {index}, {loop_var} in enumerate(self.{st.over}):"
        else:
            head = f"for {loop_var} in self.{st.over}:"
        self.lines.append(f"{indent}{head}  # {where(st.span)}")
        self._body(st.body, indent + "    ")
        self._reading = set()
        leaving = [(n, self.operand(N.Ref("value", y))) for n, y in zip(carried, st.yields) if self.names.get(y) != n]
        self._assign(indent + "    ", leaving)
        del self.loop_vars[st.var]
        for r, n in zip(st.results, carried):
            self.names[r] = n
            self.holder[n] = r

    def _branch(self, st: N.Branch, indent: str, keyword: str = "if", name: str | None = None) -> None:
        """`if test:` / `else:`, each side's body and then its value assigned to the result's one name (free
        from the branch's end on: a side runs alone, so what the other side reads may still hold it). An else
        side that is itself only a branch giving the value continues as `elif`."""
        self._reading = set()
        self.lines.append(f"{indent}{keyword} {self.operand(st.test)}:  # {where(st.span)}")
        self._body(st.then, indent + "    ")
        self._reading = set()
        then_text = self.operand(st.then_value)
        if name is None:
            name = self._bind(st.results[0], st.vars[0] or "branch_out", self.loop_end[id(st)], [])
        else:
            self.names[st.results[0]] = name
        self._side_value(indent, name, then_text)
        chained = st.orelse[-1] if len(st.orelse) == 1 and isinstance(st.orelse[-1], N.Branch) else None
        if chained is not None and st.else_value == N.Ref("value", chained.results[0]):
            self._branch(chained, indent, "elif", name)
            return
        start = len(self.lines)
        self.lines.append(f"{indent}else:")
        self._body(st.orelse, indent + "    ")
        self._reading = set()
        self._side_value(indent, name, self.operand(st.else_value))
        if self.lines[-1] == f"{indent}    pass" and len(self.lines) == start + 2:
            del self.lines[start:]  # `x = norm(x) if use_norm else x`: no else side at all

    def _side_value(self, indent: str, name: str, text: str) -> None:
        """The side's `name = value`, unless the value already has that name (then `pass` if the side is empty)."""
        if text != name:
            self.lines.append(f"{indent}    {name} = {text}")
        elif self.lines[-1].split("  #")[0].endswith(":"):
            self.lines.append(f"{indent}    pass")

    def _assign(self, indent: str, pairs: list[tuple[str, str]]) -> None:
        """`a = x` or, for several, `a, b = x, y` (all right-hand sides read before any name is rebound)."""
        if pairs:
            self.lines.append(f"{indent}{', '.join(n for n, _ in pairs)} = {', '.join(t for _, t in pairs)}")

    def _preferred(self, st: N.Op, r: str, var: str) -> str:
        """The name a result would like: the user's variable, `<callee>_out` for a call's or region's unnamed
        result, `<value>_<view>` for an unnamed view, or the inliner's `norm__7_t8` as `norm_out`."""
        if not var and st.op in ("call", "region"):
            return f"{st.target}_out"  # self.self_attn(...) -> self_attn_out
        if (
            not var
            and st.op in VIEW_OPS
            and st.args
            and isinstance(st.args[0], N.Ref)
            and st.args[0].kind == "value"
            and st.args[0].name in self.names
        ):
            return f"{self.names[st.args[0].name]}_{st.op}"  # cos.unsqueeze(1) -> cos_unsqueeze
        if var:
            return var  # the spec's own name, as written (`y__a` too)
        return r.split("__")[0] + "_out" if "__" in r else r

    def _bind(self, value: str, preferred: str, at: int, taken: list[str]) -> str:
        """The one place a Python name is given to a value: `preferred` or `preferred_2`, `_3`, ... whichever is
        first free at position `at` (see the class docstring); `taken` are names bound by the same statement."""
        base = re.sub(r"\W", "_", preferred) or "v"
        if base[0].isdigit():
            base = "v_" + base
        pending = set().union(*(reads for _, _, reads in self.inline.values())) if self.inline else set()
        name, i = base, 2
        while not self._free(name, at, pending) or name in taken:
            name, i = f"{base}_{i}", i + 1
        self.names[value] = name
        self.holder[name] = value
        return name

    def _free(self, name: str, at: int, pending: set[str]) -> bool:
        if name in self.reserved:
            return False
        held = self.holder.get(name)
        return held is None or (self.last_read.get(held, -1) <= at and held not in pending)

    def _feeds_region(self, value: str) -> bool:
        """A module call read by a fused region: kept on its own line, so the region's line stays short."""
        return any(
            isinstance(st, N.Op) and st.op == "region" and N.Ref("value", value) in st.args for st in self.g.body
        )

    def _sym_bindings(self) -> list[str]:
        lines = []
        for sym in sorted(self.used_syms):
            for a in self.g.args:
                if a.tensor is None:
                    continue
                dims = a.tensor.dims
                idx = [i for i, d in enumerate(dims) if isinstance(d, N.Ref) and d.kind == "sym" and d.name == sym]
                if not idx:
                    continue
                i = idx[0]
                ell = [j for j, d in enumerate(dims) if isinstance(d, N.Const) and d.value == "..."]
                index = str(i) if not ell or i < ell[0] else str(i - len(dims))
                lines.append(f"{sym} = {self.names[a.name]}.shape[{index}]")
                break
            else:
                raise CodegenError(f"size symbol `{sym}` is not bound by any argument")
        return lines


# module-level names a forward body calls (imports of the generated modeling.py and the names it always uses)
_GLOBALS = (
    "self",
    "ctx",
    "torch",
    "F",
    "nn",
    "kernels",
    "attention",
    "activation",
    "moe",
    "checkpoint_call",
    "fused_linear",
)


def _walk(body):
    for st in body:
        yield st
        for inner in N.bodies(st):
            yield from _walk(inner)


def _loop_var_key(st: N.Loop) -> str:
    return f"\0loop {st.var} {id(st)}"  # the loop variable as a pseudo-value (no SSA name has a NUL)


def _value_reads(e: N.E) -> list[str]:
    from dslc.ir.evaluate import free_refs

    return [r.name for r in free_refs(e) if r.kind in ("value", "dtype_of") and not r.name.startswith("weight:")]


def _op_reads(st: N.Op) -> list[str]:
    return [v for a in list(st.args) + [v for _, v in st.kwargs] for v in _value_reads(a)]


def _sym_names(graph: N.Graph) -> set[str]:
    """Size symbols of the arguments' types: `_sym_bindings` may bind them (`B = x.shape[0]`)."""
    from dslc.ir.evaluate import free_refs

    return {
        r.name
        for a in graph.args
        if a.tensor is not None
        for d in a.tensor.dims
        for r in free_refs(d)
        if r.kind == "sym"
    }


def _liveness(graph: N.Graph) -> tuple[dict[str, float], dict[int, int], dict[int, int]]:
    """Positions of the statements in rendering order, and per value the last position it may be read at.

    A value read inside a loop it is defined outside of stays live to that loop's end (the body runs again);
    a loop's inputs are read as it starts, its yields as its body ends; outputs and a loop variable are read
    to the end of their scope. Returns (last read per value, position per statement id, end per loop id)."""
    last: dict[str, float] = {}
    position: dict[int, int] = {}
    loop_end: dict[int, int] = {}
    defined_in: dict[str, tuple[int, ...]] = {a.name: () for a in graph.args}
    extend: list[tuple[str, int]] = []  # (value, loop id): live to that loop's end
    counter = 0

    def read(v: str, at: int, stack: tuple[int, ...]) -> None:
        home = defined_in.get(v, ())
        for depth, loop in enumerate(stack):
            if home[: depth + 1] != stack[: depth + 1]:
                extend.append((v, loop))  # the outermost loop the value is not defined in
                return
        last[v] = max(last.get(v, -1), at)

    def walk(body, stack: tuple[int, ...]) -> None:
        nonlocal counter
        for st in body:
            counter += 1
            position[id(st)] = counter
            if isinstance(st, N.Loop):
                for v in st.inputs:
                    read(v, counter, stack)
                inner = stack + (id(st),)
                for v in st.params:
                    defined_in[v] = inner
                walk(st.body, inner)
                counter += 1
                loop_end[id(st)] = counter
                for v in st.yields:
                    read(v, counter, inner)
                last[_loop_var_key(st)] = counter
                if st.index:
                    last[N.loop_index_key(st.index)] = counter
                for v in st.results:
                    defined_in[v] = stack
                continue
            if isinstance(st, N.Branch):  # the sides in order, each value read as its side ends
                for v in _value_reads(st.test):
                    read(v, counter, stack)
                for side, value in ((st.then, st.then_value), (st.orelse, st.else_value)):
                    walk(side, stack)
                    counter += 1
                    for v in _value_reads(value):
                        read(v, counter, stack)
                loop_end[id(st)] = counter
                for v in st.results:
                    defined_in[v] = stack
                continue
            for v in _op_reads(st):
                read(v, counter, stack)
            for v in st.results:
                defined_in[v] = stack

    walk(graph.body, ())
    for v, loop in extend:
        last[v] = max(last.get(v, -1), loop_end[loop])
    for o in graph.outputs:
        last[o] = float("inf")
    return last, position, loop_end


def _is_tensor(e: N.E) -> bool:
    from dslc.ir.evaluate import free_refs

    return any(r.kind in ("value", "weight") for r in free_refs(e))


def _truthy(e: N.E) -> bool:
    return isinstance(e, N.Const) and bool(e.value)


LINE_LENGTH = 120  # templates/ruff.toml
METHOD_INDENT = 8  # a statement in a method body


def commented(code: str, comment: str, indent: str = "") -> list[str]:
    """`code  # comment` when it fits on one line, else the comment on its own line above the code (a trailing
    comment would make the formatter split the statement across lines)."""
    if not comment or METHOD_INDENT + len(code) + len(comment) <= LINE_LENGTH:
        return [code + comment]
    return [f"{indent}# {comment.lstrip().removeprefix('# ')}", code]


def _shape_comment(ctx: BodyContext, op: N.Op) -> str:
    shapes = [ctx.type_names.get(r) for r in op.results]
    shape = ", ".join(s for s in shapes if s)
    parts = [x for x in (shape, where(op.span)) if x]
    return "  # " + "  ".join(parts)
