"""Read the text form of the IR (written by `dslc.ir.printer.print_program`) back into a Program.

The grammar is `grammar/ir.lark` (Lark LALR). The round trip is exact: `read_program(print_program(p)) == p`,
spans, floats, nested expressions and escaped strings included. Comments (inferred types) are ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import lru_cache

from lark import Token, Transformer, v_args
from lark.exceptions import LarkError, VisitError

from dslc.diagnostics import Span
from dslc.ir import nodes as N
from dslc.ir.evaluate import STATIC_UNARY
from dslc.ir.printer import default_var
from dslc.resources import grammar_path

_SPAN = re.compile(r'@([^"].*?|".*"):(-?[0-9]+):(-?[0-9]+)-(-?[0-9]+):(-?[0-9]+)$', re.S)


class IRSyntaxError(ValueError):
    """The text is not the IR's text form; the message gives line and column."""


@lru_cache(maxsize=1)
def _parser():
    from lark import Lark

    return Lark(grammar_path("ir.lark").read_text(), parser="lalr", maybe_placeholders=True, cache=True)


def _str(tok: Token) -> str:
    return json.loads(str(tok))


def _sigil_name(tok: Token) -> str:
    """`%x` -> x; `%"a b"` -> a b."""
    rest = str(tok)[1:]
    return json.loads(rest) if rest.startswith('"') else rest


def _span(tok: Token) -> Span:
    m = _SPAN.match(str(tok))
    if m is None:  # the grammar's SPAN terminal and this pattern agree; kept as a guard
        raise IRSyntaxError(f"bad span {tok!s}")
    f = m.group(1)
    return Span(json.loads(f) if f.startswith('"') else f, *(int(m.group(i)) for i in range(2, 6)))


def _number(text: str):
    if text in ("inf", "-inf", "nan"):
        return float(text)
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else float(text)


def _opt(xs):
    return tuple(x for x in xs if x is not None)


@v_args(inline=True)
class _ToIR(Transformer):
    # ---- names and constants -----------------------------------------------------------------
    def name(self, tok):
        return _str(tok) if tok.type == "STRING" else str(tok)

    path = name

    def number(self, tok):
        return N.Const(_number(str(tok)))

    def string(self, tok):
        return N.Const(_str(tok))

    def true(self):
        return N.Const(True)

    def false(self):
        return N.Const(False)

    def none(self, _tok):
        return N.Const(None)

    # ---- expressions -------------------------------------------------------------------------
    def ellipsis(self, _tok):
        return N.Const("...")

    def value_ref(self, tok):
        return N.Ref("value", _sigil_name(tok))

    def param_ref(self, tok):
        return N.Ref("param", _sigil_name(tok))

    def weight_ref(self, tok):
        return N.Ref("weight", _sigil_name(tok))

    def sym_ref(self, tok):
        return N.Ref("sym", _sigil_name(tok))

    def dtype_ref(self, tok):
        return N.Ref("dtype", _sigil_name(tok))

    def config_ref(self, tok):
        return N.Ref("config", str(tok))

    def dtype_of(self, tok):
        name = _sigil_name(tok)
        return N.Ref("dtype_of", ("weight:" + name) if tok.type == "WEIGHT" else name)

    def other_ref(self, kind, name):
        return N.Ref(_str(kind), _str(name))

    def binop(self, left, op, right):
        return N.BinE(str(op), left, right)

    def in_op(self, left, right):
        return N.BinE("in", left, right)

    def not_in_op(self, left, right):
        return N.BinE("not in", left, right)

    def or_op(self, left, right):
        return N.BinE("or", left, right)

    def and_op(self, left, right):
        return N.BinE("and", left, right)

    def not_op(self, operand):
        return N.UnE("not", operand)

    def neg(self, _minus, operand):
        return N.UnE("-", operand)

    def index_op(self, seq, index):
        return N.BinE("[]", seq, index)

    def static_call(self, fn, operand):
        if str(fn) not in STATIC_UNARY:
            raise IRSyntaxError(f"unknown function `{fn}` in an IR expression (known: {', '.join(STATIC_UNARY)})")
        return N.UnE(str(fn), operand)

    def cond(self, then, test, orelse):
        return N.CondE(then, test, orelse)

    def list(self, *items):
        return N.ListE(_opt(items))

    def named_expr(self, name, value):
        return (name, value)

    # ---- header and config ---------------------------------------------------------------------
    def opt_string(self, tok):
        return None if tok.type == "NONE" else _str(tok)

    def value_item(self, name, c):
        return (name, c.value)

    def values(self, *items):
        return _opt(items)

    def header(self, source, model, arch, values):
        return (_str(source), model, arch, values)

    def doc(self, tok):
        return ("doc", _str(tok))

    def const_list(self, *items):
        return N.Const([i.value for i in items if i is not None])  # a list-typed field's value

    def field(self, name, type_, optional, default, value, doc, span):
        f = N.FieldDef(name, type_, optional is not None, default, doc[1] if doc else "", _span(span))
        return ("field", f, value)

    def alias(self, key, field):
        return ("alias", (key, field))

    def require(self, test, message, span):
        return ("require", N.RequireDef(test, _str(message), _span(span)))

    def arch_def(self, name, base, *rest):
        *overrides, span = rest
        return ("arch", N.ArchDef(_str(name), _str(base) if base is not None else None, _opt(overrides), _span(span)))

    def config(self, name, span, *items):
        fields, values, aliases, requires, archs = [], [], [], [], []
        for item in items:
            if item[0] == "field":
                fields.append(item[1])
                if item[2] is not None:
                    values.append((item[1].name, item[2].value))
            elif item[0] == "alias":
                aliases.append(item[1])
            elif item[0] == "require":
                requires.append(item[1])
            else:
                archs.append(item[1])
        config = N.ConfigDef(name, tuple(fields), tuple(aliases), tuple(requires), tuple(archs), _span(span))
        return config, tuple(values)

    # ---- modules ------------------------------------------------------------------------------------
    def param(self, tok, type_, optional, default, span):
        return ("param", N.ParamDef(_sigil_name(tok), type_, default, _span(span), optional is not None))

    def weight(self, tok, *rest):
        *dims, dtype, init, std, cond, doc, span = rest
        w = N.WeightDef(_sigil_name(tok), _opt(dims), dtype, init, std, cond, doc[1] if doc else "", _span(span))
        return ("weight", w)

    def repeat(self, e):
        return e

    def sub(self, name, repeat, module, *rest):
        alternatives = []
        while rest and isinstance(rest[-1], N.SubmoduleDef):
            alternatives.insert(0, rest[-1])
            rest = rest[:-1]
        *call_args, cond, doc, span = rest
        args = tuple(a for a in call_args if a is not None and not isinstance(a, tuple))
        kwargs = tuple(a for a in call_args if isinstance(a, tuple))
        alternatives = tuple(replace(a, name=name) for a in alternatives)  # each side is the same member
        s = N.SubmoduleDef(name, module, args, kwargs, repeat, cond, doc[1] if doc else "", _span(span), alternatives)
        return ("sub", s)

    def sub_else(self, module, *rest):
        *call_args, cond, span = rest
        args = tuple(a for a in call_args if a is not None and not isinstance(a, tuple))
        kwargs = tuple(a for a in call_args if isinstance(a, tuple))
        return N.SubmoduleDef("", module, args, kwargs, None, cond, "", _span(span))

    def tie(self, target, source, cond, span):
        return ("tie", N.TieDef(target, source, cond, _span(span)))

    def forward(self, graph):
        return ("forward", graph)

    def module_def(self, name, task, uses_config, span, *items):
        parts: dict[str, list] = {"doc": [], "param": [], "weight": [], "sub": [], "tie": [], "forward": []}
        for kind, node in items:
            parts[kind].append(node)
        if len(parts["forward"]) > 1 or len(parts["doc"]) > 1:
            raise IRSyntaxError(f"module {name}: more than one forward or doc")
        return N.ModuleDef(
            name=name,
            params=tuple(parts["param"]),
            weights=tuple(parts["weight"]),
            submodules=tuple(parts["sub"]),
            ties=tuple(parts["tie"]),
            forward=parts["forward"][0] if parts["forward"] else None,
            uses_config=uses_config is not None,
            task=task,
            doc=parts["doc"][0] if parts["doc"] else "",
            span=_span(span),
        )

    def fn_def(self, name, span, doc, graph):
        return N.FnDef(name, graph, doc[1] if doc else "", _span(span))

    # ---- graphs -------------------------------------------------------------------------------------
    def sig(self, *rest):
        *dims, dtype = rest
        return N.TensorSig(_opt(dims), dtype)

    def results_sig(self, sig):
        return (sig,)

    def sig_tuple(self, *sigs):
        return _opt(sigs)

    def tensor_arg(self, tok, sig, span):
        return N.ArgDef(_sigil_name(tok), sig, None, _span(span))

    def scalar_arg(self, tok, type_, span):
        return N.ArgDef(_sigil_name(tok), None, type_, _span(span))

    def generic_arg(self, name, tensor, scalar, span):
        tensor = None if isinstance(tensor, Token) else tensor
        scalar = None if scalar.type == "NONE" else _str(scalar)
        return N.ArgDef(_str(name), tensor, scalar, _span(span))

    def graph(self, *items):
        at = next(i for i, x in enumerate(items) if isinstance(x, Token) and x.type == "SPAN")
        args, result_sigs = items[: at - 1], items[at - 1]
        span, body, outputs = items[at], items[at + 1 : -1], items[-1]
        return N.Graph(tuple(args), tuple(body), outputs or (), result_sigs, _span(span))

    def result(self, tok, var):
        name = _sigil_name(tok)
        return (name, _str(var) if var is not None else default_var(name))

    def results(self, *rs):
        return rs

    def value_list(self, *toks):
        return tuple(_sigil_name(t) for t in toks)

    def kwargs(self, *items):
        return _opt(items)

    def op(self, results, opname, target, *rest):
        *args, kwargs, span = rest
        results = results or ()
        return N.Op(
            opname,
            _opt(args),
            kwargs or (),
            tuple(r for r, _ in results),
            tuple(v for _, v in results),
            target if target is not None else "",
            _span(span),
        )

    def carry(self, param, init):
        return (_sigil_name(param), _sigil_name(init))

    def loop(self, results, first, second, over, *rest):
        index, var = (first, second) if second is not None else ("", first)
        at = next(i for i, x in enumerate(rest) if isinstance(x, Token) and x.type == "SPAN")
        carries = _opt(rest[:at])
        span, body, yields = rest[at], rest[at + 1 : -1], rest[-1]
        results = results or ()
        return N.Loop(
            var,
            over,
            tuple(body),
            tuple(i for _, i in carries),
            tuple(p for p, _ in carries),
            yields or (),
            tuple(r for r, _ in results),
            tuple(v for _, v in results),
            _span(span),
            index,
        )

    def branch_side(self, *items):
        return tuple(items[:-1]), items[-1]

    def branch(self, results, test, span, then, orelse):
        return N.Branch(
            test,
            then[0],
            then[1],
            orelse[0],
            orelse[1],
            tuple(r for r, _ in results),
            tuple(v for _, v in results),
            _span(span),
        )

    # ---- checkpoint, train, weights ---------------------------------------------------------------
    def string_list(self, *toks):
        return tuple(_str(t) for t in toks if t is not None)

    def ckpt_transform(self, name, *kwargs):
        return (name, _opt(kwargs))

    def layout_name(self, tok):
        return ("layout", _str(tok))

    def layout_rule(self, layout, sources, *rest):
        *transforms, targets, span = rest
        return N.LayoutRuleDef(sources, tuple(transforms), targets, _span(span), layout[1] if layout else None)

    def ignore(self, tok):
        return _str(tok)

    def checkpoint(self, *items):
        return N.CheckpointDef(
            tuple(i for i in items if isinstance(i, N.LayoutRuleDef)), tuple(i for i in items if isinstance(i, str))
        )

    def checkpointing(self, name):
        return ("ckpt", name)

    def parallel(self, pattern, style):
        return ("par", (_str(pattern), style))

    def save_activations(self, name):
        return ("save", name)

    def router(self, pattern, *rest):
        *options, span = rest
        return N.RouterDef(_str(pattern), _opt(options), _span(span))

    def loss_def(self, kind, *rest):
        *options, span = rest
        return N.LossDef(kind, _opt(options), _span(span))

    def train(self, *items):
        return N.TrainDef(
            tuple(x for k, x in items if k == "ckpt"),
            tuple(x for k, x in items if k == "par"),
            tuple(x for k, x in items if k == "save"),
        )

    def weight_info(self, name, *rest):
        *dims, dtype, init, tied_to, span = rest
        return N.WeightInfo(name, tuple(int(d) for d in dims if d is not None), dtype, init, tied_to, _span(span))

    def weights(self, *infos):
        return infos

    # ---- fused regions --------------------------------------------------------------------------------
    def region_source(self, tok):
        return ("source", _str(tok))

    def region_input(self, tok, kind, optional, grad, invariant):
        from dslc.ir.regions import RegionInput

        return (
            "input",
            RegionInput(_sigil_name(tok), kind, str(grad) == "grad", optional is not None, invariant is not None),
        )

    def region_attr(self, name, c):
        return (name, c.value)

    def region_op(self, tok, opname, *rest):
        from dslc.ir.regions import RegionOp

        args = []
        attrs = []
        for x in rest:
            if isinstance(x, Token):
                args.append(_sigil_name(x) if x.type == "VALUE" else _number(str(x)))
            elif isinstance(x, tuple):
                attrs.append(x)
        return ("op", RegionOp(opname, tuple(args), _sigil_name(tok), tuple(attrs)))

    def region_outputs(self, values):
        return ("outputs", values or ())

    def region_dtypes(self, *toks):
        return ("dtypes", tuple(_str(t) for t in toks))

    def region_note(self, tok):
        return ("note", _str(tok))

    def row_region(self, name, *items):
        from dslc.ir.regions import RowRegion

        parts: dict[str, list] = {"source": [], "input": [], "op": [], "outputs": [], "dtypes": [], "note": []}
        for kind, x in items:
            parts[kind].append(x)
        return RowRegion(
            name=name,
            inputs=tuple(parts["input"]),
            ops=tuple(parts["op"]),
            outputs=parts["outputs"][0] if parts["outputs"] else (),
            output_dtypes=parts["dtypes"][0] if parts["dtypes"] else (),
            source=parts["source"][0] if parts["source"] else "",
            notes=tuple(parts["note"]),
        )

    def regions(self, *rs):
        return tuple(rs)

    def start(self, header, config, *rest):
        source, model, arch, explicit_values = header
        config_def, field_values = config
        modules = tuple(x for x in rest if isinstance(x, N.ModuleDef))
        fns = tuple(x for x in rest if isinstance(x, N.FnDef))
        losses = tuple(x for x in rest if isinstance(x, N.LossDef))
        rest = [x for x in rest if not isinstance(x, N.LossDef)]
        checkpoint, train, router, weights, regions = rest[-5:]
        extra = {"regions": regions} if regions else {}  # absent: the Program's default
        if losses:
            extra["losses"] = losses
        if router is not None:
            extra["router"] = router
        return N.Program(
            source=source,
            model=model,
            config=config_def,
            arch=arch,
            values=explicit_values if explicit_values is not None else field_values,
            modules=modules,
            fns=fns,
            checkpoint=checkpoint,
            train=train,
            weights=tuple(weights),
            **extra,
        )


def read_program(text: str) -> N.Program:
    """Parse the text `print_program` writes; raises IRSyntaxError (with line:col) on anything else."""
    try:
        tree = _parser().parse(text)
    except LarkError as e:
        raise IRSyntaxError(f"not IR text: {e}") from None
    try:
        return _ToIR().transform(tree)
    except VisitError as e:
        raise IRSyntaxError(f"not IR text: {e.orig_exc}") from None
