"""Text form of IR expressions (and, in `print_program`, of a whole Program)."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache

from dslc.diagnostics import Span
from dslc.ir import nodes as N
from dslc.ir.evaluate import STATIC_UNARY

_PREC = {
    "or": 1,
    "and": 2,
    "==": 4,
    "!=": 4,
    "<": 4,
    "<=": 4,
    ">": 4,
    ">=": 4,
    "in": 4,
    "not in": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
    "//": 6,
    "%": 6,
    "@": 6,
    "**": 8,
}


def expr_text(e: N.E, prec: int = 0) -> str:
    """Render an expression: values `%x`, params `$p`, config fields by name, symbols by name."""
    if isinstance(e, N.Const):
        return const_text(e.value)
    if isinstance(e, N.Ref):
        return {"value": "%", "param": "$", "weight": "&"}.get(e.kind, "") + (
            f"dtype(%{e.name})" if e.kind == "dtype_of" else e.name
        )
    if isinstance(e, N.BinE) and e.op == "[]":
        return f"{expr_text(e.left, 9)}[{expr_text(e.right)}]"
    if isinstance(e, N.BinE):
        p = _PREC[e.op]
        right_p = p if e.op == "**" else p + 1
        text = f"{expr_text(e.left, p + (e.op == '**'))} {e.op} {expr_text(e.right, right_p)}"
        return f"({text})" if p < prec else text
    if isinstance(e, N.UnE):
        if e.op in STATIC_UNARY:
            return f"{e.op}({expr_text(e.operand)})"
        text = f"not {expr_text(e.operand, 3)}" if e.op == "not" else f"-{expr_text(e.operand, 7)}"
        return f"({text})" if prec > (3 if e.op == "not" else 7) else text
    if isinstance(e, N.CondE):
        text = f"{expr_text(e.then, 1)} if {expr_text(e.test, 1)} else {expr_text(e.orelse)}"
        return f"({text})" if prec > 0 else text
    if isinstance(e, N.ListE):
        return "[" + ", ".join(expr_text(i) for i in e.items) + "]"
    raise TypeError(type(e))


# ---- the whole program ---------------------------------------------------------------------------
#
# `print_program` writes a line-oriented, MLIR-flavoured text that `dslc.ir.reader.read_program` parses
# back to an equal Program. Newlines are layout only: every declaration is delimited by keywords, braces
# and its `@file:line:col-endline:endcol` span. `#` starts a comment (the reader ignores it): inferred
# types are printed as comments because they belong to one instantiation, not to the IR.
#
# Names in expressions carry their kind: `%value`, `$param`, `&weight`, `?sym` (a size symbol bound by a
# signature), `!f32` (a dtype), `dtype(%x)` / `dtype(&w)`, config fields bare; any other kind is written
# `ref("kind", "name")`. A name that is not a plain identifier is written as a JSON string after its sigil.

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+")
_WEIGHT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+")
_BARE_FILE = re.compile(r"[A-Za-z0-9_./<>+~-]+")
# words that are keywords where the reader also accepts a bare name; such names are quoted
RESERVED = frozenset("true false none not and or if else in as dtype ref inf nan for return yield repeat".split())
_SIGILS = {"value": "%", "param": "$", "weight": "&", "sym": "?", "dtype": "!"}
_COMPARE = frozenset(("==", "!=", "<", "<=", ">", ">=", "in", "not in"))


def quote(s: str) -> str:
    """A string literal: JSON escapes (quotes, backslashes, control characters), unicode kept."""
    return json.dumps(s, ensure_ascii=False)


def name_text(s: str, after_name: bool = False) -> str:
    """A declared name: bare when it is a plain identifier, else quoted. Right after another name (an op's
    target, a weight's initializer) the reader's lexer also expects keywords, so those are quoted too."""
    if not _IDENT.fullmatch(s) or s in RESERVED or (after_name and s in _grammar_keywords()):
        return quote(s)
    return s


@lru_cache(maxsize=1)
def _grammar_keywords() -> frozenset[str]:
    from dslc.resources import grammar_path

    return frozenset(re.findall(r'"([A-Za-z_]+)"', grammar_path("ir.lark").read_text()))


def key_text(s: str) -> str:
    """A keyword-argument key inside `{...}` or `(...)` where only keys can follow: bare when an identifier."""
    return s if _IDENT.fullmatch(s) else quote(s)


def path_text(s: str) -> str:
    """A dotted parameter path (`model.layers.0.weight`): bare when simple, else quoted."""
    return s if _DOTTED.fullmatch(s) else name_text(s)


def sigil_text(sigil: str, s: str) -> str:
    bare = _IDENT.fullmatch(s) or (sigil == "&" and _WEIGHT_PATH.fullmatch(s))  # `&norm.weight`: a submodule's
    return sigil + (s if bare else quote(s))


def span_text(s: Span) -> str:
    f = s.file if _BARE_FILE.fullmatch(s.file) else quote(s.file)
    return f"@{f}:{s.line}:{s.col}-{s.end_line}:{s.end_col}"


def const_text(v) -> str:
    """A scalar exactly: floats by repr (`inf` for infinity), ints, true/false/none, quoted strings."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, str):
        return "..." if v == "..." else quote(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return repr(v)
    raise TypeError(f"not an IR constant: {v!r}")


def ir_expr(e: N.E, prec: int = 0) -> str:
    """An expression exactly (see the notes above `quote`); `prec` is the binding power around it."""
    if isinstance(e, N.Const):
        text = const_text(e.value)
        negative = text.startswith("-")
        return f"({text})" if negative and prec > 7 else text
    if isinstance(e, N.Ref):
        if e.kind in _SIGILS:
            return sigil_text(_SIGILS[e.kind], e.name)
        if e.kind == "config" and _IDENT.fullmatch(e.name) and e.name not in RESERVED:
            return e.name
        if e.kind == "dtype_of":
            if e.name.startswith("weight:"):
                return f"dtype({sigil_text('&', e.name[len('weight:') :])})"
            return f"dtype({sigil_text('%', e.name)})"
        return f"ref({quote(e.kind)}, {quote(e.name)})"
    if isinstance(e, N.BinE) and e.op == "[]":
        return f"{ir_expr(e.left, 9)}[{ir_expr(e.right)}]"
    if isinstance(e, N.BinE):
        if e.op not in _PREC:
            raise ValueError(f"unknown operator {e.op!r} in an IR expression")
        p = _PREC[e.op]
        if e.op == "**":  # right-associative; the exponent may be negated
            left_p, right_p = p + 1, 7
        elif e.op in _COMPARE:  # comparisons do not chain
            left_p = right_p = p + 1
        else:
            left_p, right_p = p, p + 1
        text = f"{ir_expr(e.left, left_p)} {e.op} {ir_expr(e.right, right_p)}"
        return f"({text})" if p < prec else text
    if isinstance(e, N.UnE):
        if e.op in STATIC_UNARY:
            return f"{e.op}({ir_expr(e.operand)})"
        if e.op == "not":
            text, p = f"not {ir_expr(e.operand, 3)}", 3
        elif e.op == "-":
            operand = e.operand
            numeric = (
                isinstance(operand, N.Const)
                and isinstance(operand.value, (int, float))
                and not isinstance(operand.value, bool)
            )
            # `-1` reads back as the constant -1, so a negated number keeps its parentheses
            text, p = (f"-({const_text(operand.value)})" if numeric else f"-{ir_expr(operand, 7)}"), 7
        else:
            raise ValueError(f"unknown unary operator {e.op!r} in an IR expression")
        return f"({text})" if prec > p else text
    if isinstance(e, N.CondE):
        text = f"{ir_expr(e.then, 1)} if {ir_expr(e.test, 1)} else {ir_expr(e.orelse)}"
        return f"({text})" if prec > 0 else text
    if isinstance(e, N.ListE):
        return "[" + ", ".join(ir_expr(i) for i in e.items) + "]"
    raise TypeError(f"not an IR expression: {e!r}")


def default_var(result: str) -> str:
    """The source variable a result name implies (the printer writes `as "var"` only when it differs):
    `t3` -> "" (a temporary), `x_2` -> `x`, `q` -> `q`."""
    if re.fullmatch(r"(.*_)?t[0-9]+", result):  # also inlined temporaries, `input_layernorm__5_t8`
        return ""
    return re.sub(r"_[0-9]+$", "", result)


def _results_text(results: tuple[str, ...], vars_: tuple[str, ...], what: str) -> str:
    if len(results) != len(vars_):
        raise ValueError(f"{what}: {len(results)} result(s) but {len(vars_)} var name(s); run verify_program")
    parts = []
    for r, v in zip(results, vars_):
        parts.append(sigil_text("%", r) + ("" if v == default_var(r) else f" as {quote(v)}"))
    return ", ".join(parts)


def sig_text(s: N.TensorSig) -> str:
    return "[" + ", ".join(ir_expr(d) for d in s.dims) + "] " + name_text(s.dtype)


def _kwargs_text(kwargs) -> str:
    return ", ".join(f"{key_text(k)}={ir_expr(v)}" for k, v in kwargs)


class _Printer:
    def __init__(self, program: N.Program, types: dict | None):
        self.p = program
        self.types = types
        self.out: list[str] = []

    def emit(self, depth: int, text: str, span: Span | None = None, comment: str = "") -> None:
        line = "  " * depth + text
        if span is not None:
            line += "  " + span_text(span)
        if comment:
            line += _comment("  # " + comment)
        self.out.append(line)

    # ---- header and config ------------------------------------------------------------------
    def program(self) -> str:
        p = self.p
        self.out.append(_comment(f"# dslc IR: {p.model} from {p.source}" + (f", arch {p.arch}" if p.arch else "")))
        self.emit(0, f"source {quote(p.source)}")
        self.emit(0, f"model {name_text(p.model)}")
        self.emit(0, f"arch {'none' if p.arch is None else quote(p.arch)}")
        field_names = [f.name for f in p.config.fields]
        values = dict(p.values)
        implied = tuple((n, values[n]) for n in field_names if n in values)
        if len(values) != len(p.values) or implied != p.values:  # order or names the fields do not imply
            items = ", ".join(f"{key_text(k)} = {const_text(v)}" for k, v in p.values)
            self.emit(0, f"values {{{items}}}")
        self.out.append("")
        self.config(p.config, values)
        for m in p.modules:
            self.out.append("")
            self.module(m)
        for f in p.fns:
            self.out.append("")
            self.fn(f)
        self.out.append("")
        self.checkpoint(p.checkpoint)
        self.out.append("")
        self.train(p.train)
        self.out.append("")
        router = getattr(p, "router", None)
        if router is not None:
            self.emit(0, f"router {quote(router.pattern)} {{{_kwargs_text(router.options)}}}", router.span)
            self.out.append("")
        for loss in getattr(p, "losses", ()):
            self.emit(0, f"loss {name_text(loss.kind)} {{{_kwargs_text(loss.options)}}}", loss.span)
        if getattr(p, "losses", ()):
            self.out.append("")
        self.weights(p.weights)
        regions = getattr(p, "regions", ())
        if regions:
            self.out.append("")
            self.regions(regions)
        return "\n".join(self.out) + "\n"

    def config(self, c: N.ConfigDef, values: dict) -> None:
        self.emit(0, f"config {name_text(c.name)} {{", c.span)
        for f in c.fields:
            text = f"field {name_text(f.name)}: {name_text(f.type)}{'?' if f.optional else ''}"
            if f.default is not None:
                text += f" = {ir_expr(f.default)}"
            if f.name in values:
                value = values[f.name]
                shown = "[" + ", ".join(map(const_text, value)) + "]" if isinstance(value, list) else const_text(value)
                text += f" => {shown}"
            if f.doc:
                text += f" doc {quote(f.doc)}"
            self.emit(1, text, f.span)
        for key, field_name in c.aliases:
            self.emit(1, f"alias {name_text(key)} -> {name_text(field_name)}")
        for r in c.requires:
            self.emit(1, f"require {ir_expr(r.test)}, {quote(r.message)}", r.span)
        for a in c.archs:
            base = f" extends {quote(a.base)}" if a.base is not None else ""
            items = ", ".join(f"{key_text(k)} = {ir_expr(v)}" for k, v in a.overrides)
            self.emit(1, f"arch {quote(a.name)}{base} {{{items}}}", a.span)
        self.emit(0, "}")

    # ---- modules and fns --------------------------------------------------------------------
    def _instance_types(self, m: N.ModuleDef) -> tuple[dict, str]:
        if not self.types:
            return {}, ""
        keys = [k for k in self.types if len(k) >= 2 and k[0] == "module" and k[1] == m.name]
        if not keys:
            return {}, ""
        key = keys[0]
        params = ", ".join(
            f"{k}={const_text(v) if isinstance(v, (int, float, str, bool)) or v is None else v}"
            for k, v in (key[2] if len(key) > 2 else ())
        )
        note = f"types for {m.name}({params})"
        if len(keys) > 1:
            note += f", the first of {len(keys)} instantiations"
        return self.types[key], note

    def module(self, m: N.ModuleDef) -> None:
        head = f"module {name_text(m.name)}"
        if m.task is not None:
            head += f" task {name_text(m.task)}"
        if m.uses_config:
            head += " uses_config"
        self.emit(0, head + " {", m.span)
        if m.doc:
            self.emit(1, f"doc {quote(m.doc)}")
        for p in m.params:
            default = f" = {ir_expr(p.default)}" if p.default is not None else ""
            optional = "?" if p.optional else ""
            self.emit(1, f"param {sigil_text('$', p.name)}: {name_text(p.type)}{optional}{default}", p.span)
        for w in m.weights:
            text = f"weight {sigil_text('&', w.name)}: [{', '.join(ir_expr(d) for d in w.shape)}] {name_text(w.dtype)}"
            text += f" = {name_text(w.init)}"
            if w.init_std is not None:
                text += f"(std={ir_expr(w.init_std)})"
            if w.condition is not None:
                text += f" if {ir_expr(w.condition)}"
            if w.doc:
                text += f" doc {quote(w.doc)}"
            self.emit(1, text, w.span)
        for s in m.submodules:
            args = [ir_expr(a) for a in s.args] + [f"{name_text(k)}={ir_expr(v)}" for k, v in s.kwargs]
            text = f"sub {name_text(s.name)} = "
            if s.repeat is not None:
                text += f"repeat({ir_expr(s.repeat)}) "
            text += f"{name_text(s.module)}({', '.join(args)})"
            if s.condition is not None:
                text += f" if {ir_expr(s.condition)}"
            if s.doc:
                text += f" doc {quote(s.doc)}"
            self.emit(1, text, s.span)
            for alt in s.alternatives:  # a choice's later sides, each on its own line with its span
                args = [ir_expr(a) for a in alt.args] + [f"{name_text(k)}={ir_expr(v)}" for k, v in alt.kwargs]
                cond = f" if {ir_expr(alt.condition)}" if alt.condition is not None else ""
                self.emit(2, f"else {name_text(alt.module)}({', '.join(args)}){cond}", alt.span)
        for t in m.ties:
            cond = f" if {ir_expr(t.condition)}" if t.condition is not None else ""
            self.emit(1, f"tie {path_text(t.target)} = {path_text(t.source)}{cond}", t.span)
        if m.forward is not None:
            types, note = self._instance_types(m)
            if note:
                self.out.append(_comment("  # " + note))
            self.graph(1, "forward", m.forward, types, m.forward.span)
        self.emit(0, "}")

    def fn(self, f: N.FnDef) -> None:
        self.emit(0, f"fn {name_text(f.name)} {{", f.span)
        if f.doc:
            self.emit(1, f"doc {quote(f.doc)}")
        self.graph(1, "graph", f.graph, {}, f.graph.span)
        self.emit(0, "}")

    def graph(self, depth: int, keyword: str, g: N.Graph, types: dict, span: Span) -> None:
        if not g.args:
            self.out.append("  " * depth + f"{keyword}()")
        else:
            self.out.append("  " * depth + f"{keyword}(")
            for a in g.args:
                self.emit(depth + 2, self.arg(a), a.span, _type_note(types, a.name))
            self.out.append("  " * depth + ")")
        head = self.out.pop()
        if g.result_sigs is not None:
            sigs = [sig_text(s) for s in g.result_sigs]
            head += " -> " + (sigs[0] if len(sigs) == 1 else "(" + ", ".join(sigs) + ")")
        self.out.append(head + " {  " + span_text(span))
        self.body(depth + 1, g.body, types)
        self.emit(depth + 1, "return " + ", ".join(sigil_text("%", o) for o in g.outputs))
        self.emit(depth, "}")

    @staticmethod
    def arg(a: N.ArgDef) -> str:
        if a.tensor is not None and a.scalar_type is None:
            return f"{sigil_text('%', a.name)}: {sig_text(a.tensor)}"
        if a.tensor is None and a.scalar_type is not None:
            return f"{sigil_text('$', a.name)}: {name_text(a.scalar_type)}"
        tensor = sig_text(a.tensor) if a.tensor is not None else "none"
        scalar = quote(a.scalar_type) if a.scalar_type is not None else "none"
        return f"arg {quote(a.name)}: {tensor}, {scalar}"

    def body(self, depth: int, body: tuple, types: dict) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                self.loop(depth, st, types)
                continue
            if isinstance(st, N.Branch):
                self.branch(depth, st, types)
                continue
            lhs = _results_text(st.results, st.vars, f"op {st.op}")
            text = (lhs + " = " if st.results else "") + name_text(st.op)
            if st.target:
                text += " " + name_text(st.target, after_name=True)
            text += "(" + ", ".join(ir_expr(a) for a in st.args) + ")"
            if st.kwargs:
                text += " {" + _kwargs_text(st.kwargs) + "}"
            note = ", ".join(n for n in (_type_note(types, r, True) for r in st.results) if n)
            self.emit(depth, text, st.span, note)

    def loop(self, depth: int, lp: N.Loop, types: dict) -> None:
        n = len(lp.inputs)
        if not (len(lp.params) == len(lp.yields) == n):
            raise ValueError(f"loop over {lp.over}: carried values differ in number; run verify_program")
        lhs = _results_text(lp.results, lp.vars, f"loop over {lp.over}")
        carry = ", ".join(f"{sigil_text('%', p)} = {sigil_text('%', i)}" for p, i in zip(lp.params, lp.inputs))
        names = f"{name_text(lp.index)}, {name_text(lp.var)}" if lp.index else name_text(lp.var)
        text = (lhs + " = " if lp.results else "") + f"for {names} in {name_text(lp.over)} ({carry}) {{"
        note = ", ".join(n for n in (_type_note(types, r, True) for r in lp.results) if n)
        self.emit(depth, text, lp.span, note)
        self.body(depth + 1, lp.body, types)
        self.emit(depth + 1, "yield " + ", ".join(sigil_text("%", y) for y in lp.yields))
        self.emit(depth, "}")

    def branch(self, depth: int, br: N.Branch, types: dict) -> None:
        lhs = _results_text(br.results, br.vars, "branch")
        note = ", ".join(n for n in (_type_note(types, r, True) for r in br.results) if n)
        self.emit(depth, f"{lhs} = if ({ir_expr(br.test)}) {{", br.span, note)
        self.body(depth + 1, br.then, types)
        self.emit(depth + 1, "yield " + ir_expr(br.then_value))
        self.emit(depth, "} else {")
        self.body(depth + 1, br.orelse, types)
        self.emit(depth + 1, "yield " + ir_expr(br.else_value))
        self.emit(depth, "}")

    # ---- checkpoint, train, weights -------------------------------------------------------------
    def checkpoint(self, c: N.CheckpointDef) -> None:
        self.emit(0, "checkpoint {")
        for r in c.rules:
            parts = ["[" + ", ".join(quote(s) for s in r.sources) + "]"]
            for name, kwargs in r.transforms:
                parts.append(name_text(name) + (f"({_kwargs_text(kwargs)})" if kwargs else ""))
            parts.append("[" + ", ".join(quote(t) for t in r.targets) + "]")
            named = f"layout {quote(r.layout)} " if r.layout is not None else ""
            self.emit(1, "rule " + named + " -> ".join(parts), r.span)
        for pattern in c.ignores:
            self.emit(1, f"ignore {quote(pattern)}")
        self.emit(0, "}")

    def train(self, t: N.TrainDef) -> None:
        self.emit(0, "train {")
        for name in t.checkpointing:
            self.emit(1, f"activation_checkpointing {name_text(name)}")
        for pattern, style in t.parallel:
            self.emit(1, f"parallel {quote(pattern)} -> {name_text(style)}")
        for name in t.save:
            self.emit(1, f"save_activations {name_text(name)}")
        self.emit(0, "}")

    def weights(self, weights: tuple[N.WeightInfo, ...]) -> None:
        total = sum(math.prod(w.shape) for w in weights if w.tied_to is None)
        self.emit(0, "weights {", None, f"{len(weights)} tensors, {total:,} parameters (tied counted once)")
        for w in weights:
            shape = ", ".join(str(d) for d in w.shape)
            text = f"{path_text(w.name)}: [{shape}] {name_text(w.dtype)} {name_text(w.init, after_name=True)}"
            if w.tied_to is not None:
                text += f" tied_to {path_text(w.tied_to)}"
            self.emit(1, text, w.span)
        self.emit(0, "}")

    def regions(self, regions) -> None:
        """Fused regions (dslc/ir/regions.py: RowRegion, RegionInput, RegionOp); they carry no spans."""
        self.emit(0, "regions {")
        for r in regions:
            self.emit(1, f"row_region {name_text(r.name)} {{")
            if r.source:
                self.emit(2, f"source {quote(r.source)}")
            for i in r.inputs:
                optional = "?" if i.optional else ""
                self.emit(
                    2,
                    f"input {sigil_text('%', i.name)} {name_text(i.kind)}{optional} "
                    f"{'grad' if i.needs_grad else 'nograd'}{' row_invariant' if i.row_invariant else ''}",
                )
            for op in r.ops:
                args = ", ".join(sigil_text("%", a) if isinstance(a, str) else const_text(a) for a in op.args)
                attrs = (
                    " {" + ", ".join(f"{key_text(k)}={const_text(v)}" for k, v in op.attrs) + "}" if op.attrs else ""
                )
                self.emit(2, f"{sigil_text('%', op.result)} = {name_text(op.op)}({args}){attrs}")
            self.emit(2, ("outputs " + ", ".join(sigil_text("%", o) for o in r.outputs)).rstrip())
            if r.output_dtypes:
                self.emit(2, "output_dtypes " + ", ".join(quote(d) for d in r.output_dtypes))
            for n in r.notes:
                self.emit(2, f"note {quote(n)}")
            self.emit(1, "}")
        self.emit(0, "}")


def _comment(text: str) -> str:
    """A comment stays on its line whatever it quotes."""
    return text.replace("\r", " ").replace("\n", " ")


def _type_note(types: dict, value: str, with_name: bool = False) -> str:
    t = types.get(value) if types else None
    if t is None:
        return ""
    return f"%{value}: {t}" if with_name else str(t)


def print_program(program: N.Program, types: dict | None = None) -> str:
    """The whole Program as text; `types` (Checked.types) adds each value's inferred type as a comment.

    `dslc.ir.reader.read_program` parses the text back: `read_program(print_program(p)) == p`.
    """
    return _Printer(program, types).program()
