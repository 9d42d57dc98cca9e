"""Lark parse tree -> `dslc.syntax.ast` nodes, with spans and doc comments attached."""

from __future__ import annotations

import ast as pyast
import math
import warnings

from lark import Token, Transformer, v_args

from dslc.diagnostics import Diagnostic, DslcError, Span, comment_start
from dslc.syntax import ast as A


def _line_comment(line: str) -> str:
    """The text of a trailing `# comment` on a source line ("" if none)."""
    return line[comment_start(line) + 1 :].strip()


def _code_part(line: str) -> str:
    """`line` without its trailing `# comment`."""
    return line[: comment_start(line)]


def _decode_string(tok: Token, path: str) -> str:
    try:
        with warnings.catch_warnings():  # `"\q"`: Python only warns; here it is an error
            warnings.simplefilter("error")
            value = pyast.literal_eval(str(tok))
    except (ValueError, SyntaxError, Warning):
        raise DslcError(
            [
                Diagnostic(
                    "E001",
                    "invalid escape in string",
                    Span.at(path, tok.line, tok.column, len(tok)),
                    ('escapes: \\\\, \\", \\n, \\t, \\r, \\xHH, \\uHHHH',),
                )
            ]
        ) from None
    if not isinstance(value, str):  # pragma: no cover - the STRING terminal only admits "..."
        raise DslcError([Diagnostic("E001", "invalid string", Span.at(path, tok.line, tok.column, len(tok)))])
    return value


class _ToAst(Transformer):
    def __init__(self, text: str, path: str):
        super().__init__()
        self.path = path
        self.lines = text.split("\n")

    # ---- helpers --------------------------------------------------------------
    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span.at(self.path, 1, 1)
        end_line, end_col = meta.end_line, meta.end_column
        if end_line > meta.line:  # a statement's span takes in its newline: end it at its last code character
            end_line, end_col = self._code_end(meta.line, meta.column, end_line, end_col)
        return Span(self.path, meta.line, meta.column, end_line, end_col)

    def _code_end(self, line: int, col: int, end_line: int, end_col: int) -> tuple[int, int]:
        """The position just after the last code character (not blank, not a comment) before (end_line, end_col)."""
        for ln in range(min(end_line, len(self.lines)), line - 1, -1):
            text = self.lines[ln - 1]
            if ln == end_line:
                text = text[: end_col - 1]
            code = _code_part(text).rstrip()
            if ln == line and len(code) < col:
                break
            if code.strip():
                return ln, len(code) + 1
        return line, col + 1

    def _tspan(self, tok: Token) -> Span:
        return Span(self.path, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)

    def _doc(self, line: int) -> str:
        """Trailing comment on `line`, else the comment lines directly above it."""
        doc = _line_comment(self.lines[line - 1]) if 0 < line <= len(self.lines) else ""
        if doc:
            return doc
        above = []
        i = line - 2
        while i >= 0 and self.lines[i].strip().startswith("#"):
            above.append(self.lines[i].strip()[1:].strip())
            i -= 1
        return " ".join(reversed(above))

    # ---- expressions ----------------------------------------------------------
    @v_args(meta=True)
    def int_lit(self, meta, children):
        digits = str(children[0]).replace("_", "")
        if len(digits) > 30:  # far beyond any size; int() refuses > 4300 digits anyway
            self._bad_number(meta, "integer literal too large")
        return A.Lit(int(digits), self._span(meta))

    @v_args(meta=True)
    def float_lit(self, meta, children):
        value = float(str(children[0]).replace("_", ""))
        if not math.isfinite(value):
            self._bad_number(meta, "number too large")
        return A.Lit(value, self._span(meta))

    def _bad_number(self, meta, message: str):
        span = self._span(meta)
        raise DslcError(
            [Diagnostic("E001", message, Span.at(self.path, span.line, span.col, min(span.end_col - span.col, 40)))]
        )

    @v_args(meta=True)
    def str_lit(self, meta, children):
        return A.Lit(_decode_string(children[0], self.path), self._span(meta))

    @v_args(meta=True)
    def true_lit(self, meta, children):
        return A.Lit(True, self._span(meta))

    @v_args(meta=True)
    def false_lit(self, meta, children):
        return A.Lit(False, self._span(meta))

    @v_args(meta=True)
    def none_lit(self, meta, children):
        return A.Lit(None, self._span(meta))

    @v_args(meta=True)
    def name(self, meta, children):
        return A.Name(str(children[0]), self._tspan(children[0]))

    @v_args(meta=True)
    def list_lit(self, meta, children):
        return A.ListLit(tuple(c for c in children if c is not None), self._span(meta))

    @v_args(meta=True)
    def ellipsis(self, meta, children):
        return A.Ellipsis_(self._span(meta))

    @v_args(meta=True)
    def index(self, meta, children):
        obj, index = children
        return A.Index(obj, index, self._span(meta))

    @v_args(meta=True)
    def attr(self, meta, children):
        obj, name = children
        return A.Attr(obj, str(name), self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, args = children
        pos, kws = [], []
        for a in args or ():
            (kws if isinstance(a, A.Kwarg) else pos).append(a)
        return A.Call(func, tuple(pos), tuple(kws), self._span(meta))

    def call_args(self, children):
        return [c for c in children if c is not None]

    @v_args(meta=True)
    def kwarg(self, meta, children):
        name, value = children
        return A.Kwarg(str(name), value, self._span(meta))

    @v_args(meta=True)
    def binop(self, meta, children):
        left, op, right = children
        return A.BinOp(str(op), left, right, self._span(meta))

    @v_args(meta=True)
    def compare(self, meta, children):
        left, op, right = children
        return A.BinOp(str(op), left, right, self._span(meta))

    @v_args(meta=True)
    def in_op(self, meta, children):
        return A.BinOp("in", children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def not_in_op(self, meta, children):
        return A.BinOp("not in", children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def and_op(self, meta, children):
        return A.BinOp("and", children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def or_op(self, meta, children):
        return A.BinOp("or", children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def not_op(self, meta, children):
        return A.UnaryOp("not", children[0], self._span(meta))

    @v_args(meta=True)
    def neg(self, meta, children):
        operand = children[-1]
        if (
            isinstance(operand, A.Lit)
            and isinstance(operand.value, (int, float))
            and not isinstance(operand.value, bool)
        ):
            return A.Lit(-operand.value, self._span(meta))
        return A.UnaryOp("-", operand, self._span(meta))

    @v_args(meta=True)
    def cond_expr(self, meta, children):
        then, test, orelse = children
        return A.Cond(then, test, orelse, self._span(meta))

    # ---- types ----------------------------------------------------------------
    @v_args(meta=True)
    def type_ref(self, meta, children):
        name, item, opt = children
        name = f"{name}[{item}]" if item is not None else str(name)  # list[int]: a list-typed config field
        return A.TypeRef(name, opt is not None, self._span(meta))

    def shape(self, children):
        return [c for c in children if c is not None]

    @v_args(meta=True)
    def tensor_type(self, meta, children):
        dims, dtype = children
        return A.TensorType(tuple(dims), str(dtype) if dtype is not None else None, self._span(meta))

    # ---- config -----------------------------------------------------------------
    @v_args(meta=True)
    def field_decl(self, meta, children):
        name, type_, default = children
        return A.Field(str(name), type_, default, self._doc(meta.line), self._span(meta))

    @v_args(meta=True)
    def alias_decl(self, meta, children):
        key, field = children
        return A.Alias(".".join(key), str(field), self._span(meta))

    @v_args(meta=True)
    def require_decl(self, meta, children):
        test, msg = children
        return A.Require(test, _decode_string(msg, self.path) if msg is not None else None, self._span(meta))

    @v_args(meta=True)
    def config_base(self, meta, children):
        return A.Name(str(children[0]), self._tspan(children[0]))

    @v_args(meta=True)
    def config_decl(self, meta, children):
        name, base, *members = children
        return A.ConfigDecl(
            str(name),
            tuple(m for m in members if isinstance(m, A.Field)),
            tuple(m for m in members if isinstance(m, A.Alias)),
            tuple(m for m in members if isinstance(m, A.Require)),
            self._doc(meta.line),
            self._span(meta),
            base,
        )

    @v_args(meta=True)
    def override(self, meta, children):
        return A.Override(str(children[0]), children[1], self._span(meta))

    @v_args(meta=True)
    def arch_decl(self, meta, children):
        name, base, *overrides = children
        return A.ArchDecl(
            _decode_string(name, self.path),
            _decode_string(base, self.path) if base is not None else None,
            tuple(o for o in overrides if o is not None),
            self._span(meta),
        )

    # ---- modules ----------------------------------------------------------------
    @v_args(meta=True)
    def param(self, meta, children):
        name, type_, default = children
        return A.Param(str(name), type_, default, self._span(meta))

    def param_list(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def weight_decl(self, meta, children):
        name, dims, dtype, init, cond = children
        shape_span = Span(self.path, meta.line, meta.column, meta.line, meta.column)
        shape = A.TensorType(tuple(dims), str(dtype) if dtype is not None else None, shape_span)
        return A.WeightDecl(str(name), shape, init, cond, self._doc(meta.line), self._span(meta))

    @v_args(meta=True)
    def submodule_decl(self, meta, children):
        name, ctor, *rest, cond = children
        if not rest:
            return A.SubmoduleDecl(str(name), ctor, cond, self._doc(meta.line), self._span(meta))
        # `A() if c1 else B() if c2 else C() [if c3]`: children are A, c1, B, c2, C, c3 (c3 None without it)
        sides = [ctor, *rest[1::2]]
        tests = [*rest[0::2], cond]
        return A.SubmoduleDecl(
            str(name),
            sides[0],
            tests[0],
            self._doc(meta.line),
            self._span(meta),
            alternatives=tuple(zip(sides[1:], tests[1:])),
        )

    def dotted(self, children):
        return tuple(str(c) for c in children)

    @v_args(meta=True)
    def tie_decl(self, meta, children):
        target, source, cond = children
        return A.TieDecl(target, source, cond, self._span(meta))

    @v_args(meta=True)
    def router_decl(self, meta, children):
        word, pattern, *options = children
        if str(word) != "router":
            raise DslcError(
                [
                    Diagnostic(
                        "E001",
                        f"unexpected string after `{word}`",
                        self._tspan(pattern),
                        ('a member is `name: [shape]`, `name = Module(...)` or `router "pattern": options`',),
                    )
                ]
            )
        return A.RouterDecl(_decode_string(pattern, self.path), tuple(options), self._span(meta))

    @v_args(meta=True)
    def loss_decl(self, meta, children):
        word, kind, args = children
        if str(word) != "loss":
            raise DslcError(
                [
                    Diagnostic(
                        "E001",
                        f"unexpected name `{kind}` after `{word}`",
                        self._tspan(kind),
                        ("a member is `name: [shape]`, `name = Module(...)` or `loss kind(option = value, ...)`",),
                    )
                ]
            )
        args = args or ()
        return A.LossDecl(
            str(kind),
            self._tspan(kind),
            tuple(a for a in args if not isinstance(a, A.Kwarg)),
            tuple(a for a in args if isinstance(a, A.Kwarg)),
            self._span(meta),
        )

    @v_args(meta=True)
    def arg(self, meta, children):
        return A.Arg(str(children[0]), children[1], self._span(meta))

    @v_args(meta=True)
    def result(self, meta, children):
        return (children[0],)

    @v_args(meta=True)
    def result_tuple(self, meta, children):
        return tuple(children)

    @v_args(meta=True)
    def signature(self, meta, children):
        *args, results = children
        return A.Signature(tuple(a for a in args if a is not None), results, self._span(meta))

    def body(self, children):
        return tuple(children)

    @v_args(meta=True)
    def assign_stmt(self, meta, children):
        *targets, value = children
        return A.Assign(tuple(str(t) for t in targets), value, self._span(meta))

    @v_args(meta=True)
    def for_stmt(self, meta, children):
        first, second, iterable, body = children
        if second is None:  # `for layer in layers`
            return A.For(str(first), str(iterable), body, self._span(meta))
        return A.For(str(second), str(iterable), body, self._span(meta), index=str(first))

    @v_args(meta=True)
    def return_stmt(self, meta, children):
        return A.Return(tuple(children), self._span(meta))

    @v_args(meta=True)
    def forward_decl(self, meta, children):
        sig, body = children
        return A.ForwardDecl(sig, body, self._span(meta))

    @v_args(meta=True)
    def fn_decl(self, meta, children):
        name, sig, body = children
        return A.FnDecl(str(name), sig, body, self._doc(meta.line), self._span(meta))

    def _module(self, meta, name, params, members, config=None, task=None):
        forwards = [m for m in members if isinstance(m, A.ForwardDecl)]
        if len(forwards) > 1:
            raise DslcError([Diagnostic("E011", "module has more than one forward", forwards[1].span)])
        return A.ModuleDecl(
            name=str(name),
            params=params or (),
            weights=tuple(m for m in members if isinstance(m, A.WeightDecl)),
            submodules=tuple(m for m in members if isinstance(m, A.SubmoduleDecl)),
            ties=tuple(m for m in members if isinstance(m, A.TieDecl)),
            forward=forwards[0] if forwards else None,
            config=config,
            task=task,
            doc=self._doc(meta.line),
            span=self._span(meta),
            routers=tuple(m for m in members if isinstance(m, A.RouterDecl)),
            losses=tuple(m for m in members if isinstance(m, A.LossDecl)),
        )

    @v_args(meta=True)
    def module_decl(self, meta, children):
        name, params, *members = children
        return self._module(meta, name, params, members)

    @v_args(meta=True)
    def model_decl(self, meta, children):
        name, config, task, *members = children
        return self._module(meta, name, (), members, config=str(config), task=str(task))

    # ---- checkpoint, train, file -------------------------------------------------
    @v_args(meta=True)
    def ckpt_transform(self, meta, children):
        name, args = children
        pos = tuple(a for a in args or () if not isinstance(a, A.Kwarg))
        kws = tuple(a for a in args or () if isinstance(a, A.Kwarg))
        return A.Call(A.Name(str(name), self._tspan(name)), pos, kws, self._span(meta))

    def names(self, children):
        return tuple(_decode_string(c, self.path) for c in children)

    @v_args(meta=True)
    def layout_rule(self, meta, children):
        sources, *transforms, targets = children
        return A.LayoutRule(sources, tuple(transforms), targets, self._span(meta))

    @v_args(meta=True)
    def ignore_rule(self, meta, children):
        return A.IgnoreRule(_decode_string(children[0], self.path), self._span(meta))

    @v_args(meta=True)
    def checkpoint_decl(self, meta, children):
        name = children[0] if children and isinstance(children[0], Token) and children[0].type == "STRING" else None
        return A.CheckpointDecl(
            tuple(c for c in children if isinstance(c, A.LayoutRule)),
            tuple(c for c in children if isinstance(c, A.IgnoreRule)),
            self._span(meta),
            _decode_string(name, self.path) if name is not None else None,
        )

    @v_args(meta=True)
    def checkpointing_hint(self, meta, children):
        return ("checkpointing", tuple((str(c), self._tspan(c)) for c in children))

    @v_args(meta=True)
    def save_hint(self, meta, children):
        return ("save", tuple((str(c), self._tspan(c)) for c in children))

    @v_args(meta=True)
    def parallel_hint(self, meta, children):
        return ("parallel", (_decode_string(children[0], self.path), str(children[1]), self._span(meta)))

    @v_args(meta=True)
    def train_decl(self, meta, children):
        ckpt, par, save = [], [], []
        for kind, value in children:
            if kind == "checkpointing":
                ckpt.extend(value)
            elif kind == "save":
                save.extend(value)
            else:
                par.append(value)
        return A.TrainDecl(tuple(ckpt), tuple(par), self._span(meta), tuple(save))

    @v_args(meta=True)
    def use_decl(self, meta, children):
        return A.Use(str(children[0]), self._span(meta))

    @v_args(meta=True)
    def start(self, meta, children):
        def of(t):
            return tuple(c for c in children if isinstance(c, t))

        return A.File(
            self.path,
            of(A.Use),
            of(A.ConfigDecl),
            of(A.ArchDecl),
            of(A.ModuleDecl),
            of(A.FnDecl),
            of(A.CheckpointDecl),
            of(A.TrainDecl),
            self._span(meta),
        )


def to_ast(tree, text: str, path: str) -> A.File:
    from lark.exceptions import VisitError

    try:
        return _ToAst(text, path).transform(tree)
    except VisitError as e:  # Lark wraps what a rule raises; a DslcError must reach the caller as it is
        if isinstance(e.orig_exc, (DslcError, RecursionError)):
            raise e.orig_exc from None
        raise
