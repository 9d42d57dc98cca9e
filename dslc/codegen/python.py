"""IR -> Python source text for one forward body (the only place that knows Python expression syntax).

Single-use temporaries are inlined into their use, so `down_proj(silu(gate_proj(x)) * up_proj(x))`
renders as one line; every assigned line carries a shape comment and a `spec.model:LINE` reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dslc.ir import nodes as N

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
VIEW_OPS = ("unsqueeze", "squeeze", "transpose", "reshape", "select")
INLINE_LIMIT = 60  # a region or module call longer than this gets its own line instead of being nested
_BIN = {"add": ("+", ADD), "sub": ("-", ADD), "mul": ("*", MUL), "div": ("/", MUL), "matmul": ("@", MUL),
        "pow": ("**", POW)}
_STATIC_BIN = {"+": ADD, "-": ADD, "*": MUL, "/": MUL, "//": MUL, "%": MUL, "@": MUL, "**": POW,
               "==": CMP, "!=": CMP, "<": CMP, "<=": CMP, ">": CMP, ">=": CMP, "and": 4, "or": 3}
_TORCH_UNARY = {"exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "rsqrt": "torch.rsqrt",
                "tanh": "torch.tanh", "sigmoid": "torch.sigmoid", "cos": "torch.cos", "sin": "torch.sin",
                "abs": "torch.abs", "erf": "torch.erf", "silu": "F.silu", "relu": "F.relu", "gelu": "F.gelu"}


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
    module_of_sub: dict[str, str] = field(default_factory=dict)  # submodule name -> module def name
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
        if e.kind == "dtype":
            if e.name not in TORCH_DTYPES:
                raise CodegenError(f"dtype `{e.name}` has no fixed torch dtype here")
            return TORCH_DTYPES[e.name], ATOM
        if e.kind == "dtype_of":
            if e.name.startswith("weight:"):
                return f"self.{e.name[len('weight:'):]}.dtype", ATOM
            return f"{names[e.name]}.dtype", ATOM
        raise CodegenError(f"unknown reference kind {e.kind}")
    if isinstance(e, N.BinE):
        p = _STATIC_BIN[e.op]
        if e.op in ("==", "!=") and N.Const(None) in (e.left, e.right):  # comparisons with None use `is`
            other = e.right if e.left == N.Const(None) else e.left
            return f"{static_text(other, ctx, names, CMP + 1, init)} {'is' if e.op == '==' else 'is not'} None", CMP
        left = static_text(e.left, ctx, names, p + (e.op == "**"), init)
        right = static_text(e.right, ctx, names, p if e.op == "**" else p + 1, init)
        return f"{left} {e.op} {right}", p
    if isinstance(e, N.UnE):
        if e.op == "not":
            return f"not {static_text(e.operand, ctx, names, 5, init)}", 5
        return f"-{static_text(e.operand, ctx, names, UNARY, init)}", UNARY
    if isinstance(e, N.CondE):
        return (f"{static_text(e.then, ctx, names, 2, init)} if {static_text(e.test, ctx, names, 2, init)} "
                f"else {static_text(e.orelse, ctx, names, COND, init)}"), COND
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
        for a in list(st.args) + [v for _, v in st.kwargs]:
            for r in free_refs(a):
                if r.kind in ("value", "dtype_of") and not r.name.startswith("weight:"):
                    counts[r.name] = counts.get(r.name, 0) + 1


class BodyRenderer:
    """Renders one Graph's body into indented Python lines."""

    def __init__(self, graph: N.Graph, ctx: BodyContext, arg_names: dict[str, str] | None = None):
        self.g = graph
        self.ctx = ctx
        self.names: dict[str, str] = dict(arg_names or {a.name: a.name for a in graph.args})
        self.inline: dict[str, tuple[str, int]] = {}
        counts: dict[str, int] = {}
        _uses(graph.body, counts)
        for o in graph.outputs:
            counts[o] = counts.get(o, 0) + 1
        self.counts = counts
        self.lines: list[str] = []
        self.used_syms: set[str] = set()

    # ---- operands ---------------------------------------------------------------------------------
    def operand(self, e: N.E, prec: int = 0) -> str:
        if isinstance(e, N.Ref) and e.kind == "value" and e.name in self.inline:
            text, p = self.inline.pop(e.name)
            return f"({text})" if p < prec else text
        self._collect_syms(e)
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
            cond = [x for x in a if isinstance(x, N.Ref) and x.kind == "weight" and x.name in self.ctx.conditional_weights]
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
            return f"kernels.{op.target}({', '.join(self.operand(x) for x in a)})", ATOM
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
        if name == "dropout":
            p = self.operand(a[1]) if len(a) > 1 else self.operand(kw.get("p", N.Const(0.0)))
            return f"F.dropout({self.operand(a[0])}, p={p}, training=self.training)", ATOM
        if name == "topk":
            return f"torch.topk({self.operand(a[0])}, {self.operand(a[1])}, dim=-1)", ATOM
        if name == "attention":
            opts = [f"{k}={self.operand(v)}" for k, v in op.kwargs]
            qkv = ", ".join(self.operand(x) for x in a)
            return f"attention({qkv}, ctx, self.kv_cache, {', '.join(opts)})", ATOM
        if name == "call":
            return self._call(op), ATOM
        if name == "fn":
            return f"{op.target}({', '.join(self.operand(x) for x in a)})", ATOM
        raise CodegenError(f"no Python rendering for op `{name}`")

    def _call(self, op: N.Op) -> str:
        args = [self.operand(x) for x in op.args] + [f"{k}={self.operand(v)}" for k, v in op.kwargs]
        sub_module = self.ctx.module_of_sub.get(op.target, "")
        if self.ctx.needs_ctx.get(sub_module):
            args.append("ctx")
        callee = op.target if op.target in self.loop_vars else f"self.{op.target}"
        if sub_module in self.ctx.checkpointed:
            return f"checkpoint_call({callee}, self.training and self.gradient_checkpointing, {', '.join(args)})"
        return f"{callee}({', '.join(args)})"

    def _device_arg(self) -> str:
        for a in self.g.args:
            if a.tensor is not None:
                return f"{self.names[a.name]}.device"
        raise CodegenError("`arange` needs a tensor argument in the same function to take its device from")

    # ---- statements --------------------------------------------------------------------------------
    loop_vars: set = set()

    def render(self) -> list[str]:
        self.loop_vars = set()
        self._body(self.g.body, "")
        outs = ", ".join(self.operand(N.Ref("value", o)) for o in self.g.outputs)
        self.lines.append(f"return {outs}")
        return self._sym_bindings() + self.lines

    def _body(self, body, indent: str) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                for inp, param, var in zip(st.inputs, st.params, st.vars):
                    self.names[param] = var
                    if self.names.get(inp) != var:
                        self.lines.append(f"{indent}{var} = {self.operand(N.Ref('value', inp))}")
                self.loop_vars.add(st.var)
                self.ctx.module_of_sub[st.var] = self.ctx.module_of_sub.get(st.over, "")
                self.lines.append(f"{indent}for {st.var} in self.{st.over}:  # {_where(self.ctx, st.span)}")
                self._body(st.body, indent + "    ")
                for y, var in zip(st.yields, st.vars):
                    if self.names.get(y) != var:
                        self.lines.append(f"{indent}    {var} = {self.operand(N.Ref('value', y))}")
                for r, var in zip(st.results, st.vars):
                    self.names[r] = var
                continue
            text, p = self.op_text(st)
            single_use = len(st.results) == 1 and not st.vars[0] and self.counts.get(st.results[0], 0) == 1
            returned = st.results[0] in self.g.outputs
            if single_use and (returned or len(text) <= INLINE_LIMIT or st.op not in ("region", "call")) \
                    and not (st.op == "call" and self._feeds_region(st.results[0])):
                self.inline[st.results[0]] = (text, p)
                continue
            targets = []
            for r, var in zip(st.results, st.vars):
                if len(st.results) > 1 and not self.counts.get(r, 0):
                    targets.append("_")  # a result nobody reads
                    continue
                if not var and st.op in ("call", "region") and ("__" in r or r[:1] == "t" and r[1:].isdigit()):
                    var = self._fresh(f"{st.target}_out")  # self.self_attn(...) -> self_attn_out
                elif not var and st.op in VIEW_OPS and st.args and isinstance(st.args[0], N.Ref) \
                        and st.args[0].kind == "value" and "__" in r:
                    var = self._fresh(f"{self.names[st.args[0].name]}_{st.op}")  # cos.unsqueeze(1) -> cos_unsqueeze
                name = self._local_name(var or r)
                self.names[r] = name
                targets.append(name)
            comment = _shape_comment(self.ctx, st)
            self.lines += commented(f"{indent}{', '.join(targets)} = {text}", comment, indent)

    def _feeds_region(self, value: str) -> bool:
        """A module call read by a fused region: kept on its own line, so the region's line stays short."""
        return any(isinstance(st, N.Op) and st.op == "region" and N.Ref("value", value) in st.args for st in self.g.body)

    def _fresh(self, base: str) -> str:
        """`base`, or `base_2`, `base_3`... when a local of this body already has that name."""
        taken = set(self.names.values())
        name, i = base, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        self.names[f"\0{name}"] = name  # reserved until the value is bound
        return name

    def _local_name(self, name: str) -> str:
        """A readable local for a value: `norm__7_t8` (inlined from `norm`) becomes `norm_out`."""
        if "__" in name:
            base = name.split("__")[0] + "_out"
            taken = set(self.names.values())
            name, i = base, 2
            while name in taken:
                name, i = f"{base}_{i}", i + 1
        return name

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


def _is_tensor(e: N.E) -> bool:
    from dslc.ir.evaluate import free_refs

    return any(r.kind in ("value", "weight") for r in free_refs(e))


def _truthy(e: N.E) -> bool:
    return isinstance(e, N.Const) and bool(e.value)


def _where(ctx: BodyContext, span) -> str:
    return f"{Path(span.file).name}:{span.line}"


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
    parts = [x for x in (shape, _where(ctx, op.span)) if x]
    return "  # " + "  ".join(parts)
