"""Parser tests, one construct at a time: text -> `dslc.syntax.ast` nodes with spans and docs."""

from __future__ import annotations

import pytest

from dslc.diagnostics import DslcError
from dslc.syntax import ast as A
from dslc.syntax.parser import parse_text


def parse(text: str) -> A.File:
    return parse_text(text, "t.model")


def sexp(e) -> str:
    """A compact, fully parenthesized form of an expression, to assert precedence and associativity."""
    if isinstance(e, A.Lit):
        if e.value is None or isinstance(e.value, bool):
            return {None: "none", True: "true", False: "false"}[e.value]
        return repr(e.value)
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.BinOp):
        return f"({sexp(e.left)} {e.op} {sexp(e.right)})"
    if isinstance(e, A.UnaryOp):
        return f"({e.op} {sexp(e.operand)})"
    if isinstance(e, A.Cond):
        return f"({sexp(e.then)} if {sexp(e.test)} else {sexp(e.orelse)})"
    if isinstance(e, A.ListLit):
        return "[" + ", ".join(sexp(i) for i in e.items) + "]"
    if isinstance(e, A.Attr):
        return f"{sexp(e.obj)}.{e.name}"
    if isinstance(e, A.Call):
        args = [sexp(a) for a in e.args] + [f"{k.name}={sexp(k.value)}" for k in e.kwargs]
        return f"{sexp(e.func)}({', '.join(args)})"
    if isinstance(e, A.Ellipsis_):
        return "..."
    raise TypeError(type(e))


def expr(text: str):
    """Parse one expression (as a config default)."""
    return parse(f"config C:\n    x: int = {text}\n").configs[0].fields[0].default


def fwd_body(lines: str, sig: str = "(x: [B, T, dim]) -> [B, T, dim]") -> tuple:
    body = "".join(f"        {ln}\n" for ln in lines.strip("\n").split("\n"))
    return parse(f"module M:\n    forward{sig}:\n{body}").modules[0].forward


# ---- config -------------------------------------------------------------------------------------


CONFIG = """# The config of a tiny model.
config TinyConfig:
    vocab_size: int = 32_000          # tokens in the vocabulary
    # width of the residual stream
    hidden: int = 512
    eps: float = 1e-6
    tie: bool = true
    name: str = "tiny"
    inner: int?                       # optional: none means 4 * hidden
    head_dim: int = hidden // 8
    from_hf n_embd -> hidden
    from_hf rope_parameters.rope_theta -> eps
    require hidden % 8 == 0, "hidden must split into 8 heads"
    require vocab_size > 0
"""


def test_config_fields_types_defaults():
    c = parse(CONFIG).configs[0]
    assert c.name == "TinyConfig"
    got = [(f.name, f.type.name, f.type.optional, sexp(f.default) if f.default else None) for f in c.fields]
    assert got == [
        ("vocab_size", "int", False, "32000"),
        ("hidden", "int", False, "512"),
        ("eps", "float", False, "1e-06"),
        ("tie", "bool", False, "true"),
        ("name", "str", False, "'tiny'"),
        ("inner", "int", True, None),
        ("head_dim", "int", False, "(hidden // 8)"),
    ]


def test_config_docs_from_comments():
    c = parse(CONFIG).configs[0]
    docs = {f.name: f.doc for f in c.fields}
    assert docs["vocab_size"] == "tokens in the vocabulary"  # trailing comment
    assert docs["hidden"] == "width of the residual stream"  # comment line above
    assert docs["inner"] == "optional: none means 4 * hidden"
    assert docs["eps"] == ""
    assert c.doc == "The config of a tiny model."


def test_doc_comment_keeps_hash_inside_strings():
    c = parse('config C:\n    s: str = "a # b"   # the real doc\n').configs[0]
    assert c.fields[0].default.value == "a # b"
    assert c.fields[0].doc == "the real doc"


def test_from_hf_aliases():
    c = parse(CONFIG).configs[0]
    assert [(a.hf_key, a.field) for a in c.aliases] == [("n_embd", "hidden"), ("rope_parameters.rope_theta", "eps")]


def test_require_with_and_without_message():
    c = parse(CONFIG).configs[0]
    assert [(sexp(r.test), r.message) for r in c.requires] == [
        ("((hidden % 8) == 0)", "hidden must split into 8 heads"),
        ("(vocab_size > 0)", None),
    ]


def test_string_escapes():
    c = parse('config C:\n    s: str = "say \\"hi\\"\\n"\n').configs[0]
    assert c.fields[0].default.value == 'say "hi"\n'


# ---- arch ---------------------------------------------------------------------------------------


def test_arch_with_extends_and_overrides():
    f = parse('arch "small": hidden = 256, tie = false\narch "big" extends "small": hidden = 2 * 1024\narch "base":\n')
    small, big, base = f.archs
    assert (small.name, small.base) == ("small", None)
    assert [(o.name, sexp(o.value)) for o in small.overrides] == [("hidden", "256"), ("tie", "false")]
    assert (big.name, big.base) == ("big", "small")
    assert [(o.name, sexp(o.value)) for o in big.overrides] == [("hidden", "(2 * 1024)")]
    assert base.overrides == ()


# ---- modules ------------------------------------------------------------------------------------


MODULE = """use std

# A block with every kind of member.
module Block(dim: int, hidden: int = 4 * dim, bias: bool = false, eps: float = 1e-5):
    weight: [dim] = ones                          # the scale
    bias: [dim] f32 = zeros if bias
    table: [hidden, dim] bf16 = normal(std = 0.02)
    plain: [dim, ...]
    proj = Linear(dim, hidden, bias = bias)       # up projection
    layers = repeat(2 * 3, Layer(dim))
    extra = Linear(dim, dim) if hidden > dim
    tie proj.weight = table if not bias
    tie a.b.c = d.e

    forward(x: [B, T, dim], pos: [B, T] i64) -> ([B, T, dim], [B, T, dim] f32):
        h, g = chunk(x, 2, dim = -1)
        for layer in layers:
            h = layer(h)
        return h, cast(g, f32)
"""


def test_use():
    assert [u.name for u in parse(MODULE).uses] == ["std"]


def test_module_params():
    m = parse(MODULE).modules[0]
    assert m.name == "Block" and not m.is_model
    assert m.doc == "A block with every kind of member."
    got = [(p.name, p.type.name, sexp(p.default) if p.default else None) for p in m.params]
    assert got == [
        ("dim", "int", None),
        ("hidden", "int", "(4 * dim)"),
        ("bias", "bool", "false"),
        ("eps", "float", "1e-05"),
    ]


def test_module_without_params():
    m = parse("module M:\n    forward(x: [B]) -> [B]:\n        return x\n").modules[0]
    assert m.params == ()
    m = parse("module M():\n    forward(x: [B]) -> [B]:\n        return x\n").modules[0]
    assert m.params == ()


def test_weights_shape_dtype_init_condition():
    ws = {w.name: w for w in parse(MODULE).modules[0].weights}
    w = ws["weight"]
    assert [sexp(d) for d in w.shape.dims] == ["dim"] and w.shape.dtype is None
    assert sexp(w.init) == "ones" and w.condition is None and w.doc == "the scale"
    b = ws["bias"]
    assert b.shape.dtype == "f32" and sexp(b.init) == "zeros" and sexp(b.condition) == "bias"
    t = ws["table"]
    assert [sexp(d) for d in t.shape.dims] == ["hidden", "dim"] and t.shape.dtype == "bf16"
    assert sexp(t.init) == "normal(std=0.02)"
    p = ws["plain"]
    assert [sexp(d) for d in p.shape.dims] == ["dim", "..."] and p.init is None


def test_submodules_repeat_and_conditions():
    subs = {s.name: s for s in parse(MODULE).modules[0].submodules}
    assert sexp(subs["proj"].ctor) == "Linear(dim, hidden, bias=bias)" and subs["proj"].doc == "up projection"
    assert sexp(subs["layers"].ctor) == "repeat((2 * 3), Layer(dim))"
    assert sexp(subs["extra"].condition) == "(hidden > dim)"


def test_ties_with_condition():
    ties = parse(MODULE).modules[0].ties
    assert [(t.target, t.source, sexp(t.condition) if t.condition else None) for t in ties] == [
        (("proj", "weight"), ("table",), "(not bias)"),
        (("a", "b", "c"), ("d", "e"), None),
    ]


def test_forward_signature_tuple_results():
    sig = parse(MODULE).modules[0].forward.sig
    assert [(a.name, [sexp(d) for d in a.type.dims], a.type.dtype) for a in sig.args] == [
        ("x", ["B", "T", "dim"], None),
        ("pos", ["B", "T"], "i64"),
    ]
    assert [([sexp(d) for d in r.dims], r.dtype) for r in sig.results] == [
        (["B", "T", "dim"], None),
        (["B", "T", "dim"], "f32"),
    ]


def test_forward_single_result_and_no_result():
    f = fwd_body("return x")
    assert len(f.sig.results) == 1
    f = fwd_body("return x", sig="(x: [B])")
    assert f.sig.results is None


def test_forward_body_multi_assign_for_return():
    body = parse(MODULE).modules[0].forward.body
    assign, loop, ret = body
    assert isinstance(assign, A.Assign) and assign.targets == ("h", "g")
    assert sexp(assign.value) == "chunk(x, 2, dim=-1)"
    assert isinstance(loop, A.For) and (loop.var, loop.iterable) == ("layer", "layers")
    assert [sexp(s.value) for s in loop.body] == ["layer(h)"]
    assert isinstance(ret, A.Return) and [sexp(v) for v in ret.values] == ["h", "cast(g, f32)"]


def test_model_declaration():
    f = parse(
        "model Net(Cfg): causal_lm\n    head = Linear(1, 2)\n\n    forward(x: [B, 1]) -> [B, 2]:\n"
        "        return head(x)\n"
    )
    m = f.modules[0]
    assert m.is_model and (m.name, m.config, m.task) == ("Net", "Cfg", "causal_lm")


def test_fn_declaration_with_scalar_args():
    f = parse(
        "# split into heads\nfn split(x: [B, T, HD], heads: int) -> [B, heads, T, HD // heads]:\n"
        "    return transpose(reshape(x, [B, T, heads, HD // heads]), 1, 2)\n"
    )
    fn = f.fns[0]
    assert fn.name == "split" and fn.doc == "split into heads"
    assert isinstance(fn.sig.args[1].type, A.TypeRef) and fn.sig.args[1].type.name == "int"
    assert [sexp(d) for d in fn.sig.results[0].dims] == ["B", "heads", "T", "(HD // heads)"]
    assert sexp(fn.body[0].values[0]) == "transpose(reshape(x, [B, T, heads, (HD // heads)]), 1, 2)"


# ---- checkpoint and train -----------------------------------------------------------------------


def test_checkpoint_rules_transforms_ignore():
    f = parse(
        "checkpoint:\n"
        '    "h.{i}.attn.c_attn.weight" -> transpose() -> split(dim = 0) -> "h.{i}.q.weight", "h.{i}.k.weight"\n'
        '    "a.weight", "b.weight" -> concat(dim = 1) -> "ab.weight"\n'
        '    "x" -> "y"\n'
        '    ignore "attn.masked_bias"\n'
    )
    ck = f.checkpoints[0]
    r1, r2, r3 = ck.rules
    assert r1.sources == ("h.{i}.attn.c_attn.weight",)
    assert [sexp(t) for t in r1.transforms] == ["transpose()", "split(dim=0)"]
    assert r1.targets == ("h.{i}.q.weight", "h.{i}.k.weight")
    assert r2.sources == ("a.weight", "b.weight") and [sexp(t) for t in r2.transforms] == ["concat(dim=1)"]
    assert (r3.sources, r3.transforms, r3.targets) == (("x",), (), ("y",))
    assert [i.pattern for i in ck.ignores] == ["attn.masked_bias"]


def test_train_hints():
    f = parse(
        'train:\n    activation_checkpointing Block, Layer\n    parallel "layers.{i}.q" -> colwise\n'
        '    parallel "layers.{i}.o" -> rowwise\n'
    )
    t = f.trains[0]
    assert [n for n, _ in t.checkpointing] == ["Block", "Layer"]
    assert [(p, s) for p, s, _ in t.parallel] == [("layers.{i}.q", "colwise"), ("layers.{i}.o", "rowwise")]


# ---- expressions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("1 + 2 * 3", "(1 + (2 * 3))"),
        ("(1 + 2) * 3", "((1 + 2) * 3)"),
        ("a - b - c", "((a - b) - c)"),
        ("a / b // c % d @ e", "((((a / b) // c) % d) @ e)"),
        ("2 ** 3 ** 2", "(2 ** (3 ** 2))"),  # right associative
        ("-a ** 2", "(- (a ** 2))"),  # unary minus binds looser than **
        ("a ** -b", "(a ** (- b))"),
        ("-2 ** 2", "(- (2 ** 2))"),
        ("-3", "-3"),  # a negative literal folds
        ("- - a", "(- (- a))"),
        ("- -3", "3"),
        ("-a * b", "((- a) * b)"),
        ("a * -b", "(a * (- b))"),
        ("a < b", "(a < b)"),
        ("a + 1 >= b * 2", "((a + 1) >= (b * 2))"),
        ("a == b and c != d", "((a == b) and (c != d))"),
        ("a or b and c", "(a or (b and c))"),
        ("not a and b", "((not a) and b)"),
        ("not not a", "(not (not a))"),
        ("not a == b", "(not (a == b))"),
        ("a if c else b", "(a if c else b)"),
        ("a if c else b if d else e", "(a if c else (b if d else e))"),
        ("a + 1 if c or d else 2", "((a + 1) if (c or d) else 2)"),
        ("4 * n if n == none else n", "((4 * n) if (n == none) else n)"),
        ("[1, a, 2 * b]", "[1, a, (2 * b)]"),
        ("[]", "[]"),
        ("f(x, 2, k = 3, m = a + b)", "f(x, 2, k=3, m=(a + b))"),
        ("f(x,)", "f(x)"),
        ("f()", "f()"),
        ("x.dtype", "x.dtype"),
        ("f(x).dtype", "f(x).dtype"),
        ("true", "true"),
        ("false", "false"),
        ("none", "none"),
        ("1_000_000", "1000000"),
        ("1e-6", "1e-06"),
        ("2.5E3", "2500.0"),
        (".5", "0.5"),
        ("1.", "1.0"),
        ('"s"', "'s'"),
    ],
)
def test_expression_precedence(text, want):
    assert sexp(expr(text)) == want


@pytest.mark.parametrize("text", ["a < b < c", "a == b == c", "not", "a +", "f(x", "[1, 2", "a if b", "1 2"])
def test_expression_syntax_errors(text):
    with pytest.raises(DslcError) as e:
        expr(text)
    assert e.value.diagnostics[0].code in ("E001", "E002")


def test_ellipsis_in_shapes():
    f = fwd_body("return x", sig="(x: [..., dim], y: [...] i64) -> [..., dim]")
    assert [sexp(d) for d in f.sig.args[0].type.dims] == ["...", "dim"]
    assert [sexp(d) for d in f.sig.args[1].type.dims] == ["..."]
    assert [sexp(d) for d in f.sig.results[0].dims] == ["...", "dim"]


def test_line_continuation_inside_brackets():
    f = fwd_body("y = concat(x,\n              x,\n    dim = -1)\nreturn [y,\n  y]")
    assert sexp(f.body[0].value) == "concat(x, x, dim=-1)"
    m = parse(
        "module M(a: int,\n         b: int):\n    w: [a,\n        b]\n"
        "    forward(x: [B,\n               a]) -> [B, b]:\n        return x @ w\n"
    ).modules[0]
    assert [p.name for p in m.params] == ["a", "b"]
    assert [sexp(d) for d in m.weights[0].shape.dims] == ["a", "b"]


def test_line_continuation_with_backslash():
    c = parse(
        'config C:\n    a: int = 1\n    require a > 0 and \\\n        a < 10, \\\n        "a in range"\n'
    ).configs[0]
    assert sexp(c.requires[0].test) == "((a > 0) and (a < 10))" and c.requires[0].message == "a in range"


def test_comments_and_blank_lines_anywhere():
    f = parse(
        "# top\n\n\nconfig C:   # trailing\n\n    # above\n    a: int = 1\n\n\n    # between\n"
        "    b: int = 2\n# at the end\n"
    )
    assert [x.name for x in f.configs[0].fields] == ["a", "b"]


def test_crlf_line_endings_parse():
    text = "config C:\r\n    a: int = 1   # doc\r\n    b: int = a * 2\r\n"
    c = parse(text).configs[0]
    assert [(x.name, sexp(x.default)) for x in c.fields] == [("a", "1"), ("b", "(a * 2)")]
    assert c.fields[0].doc == "doc"


def test_file_without_trailing_newline():
    assert parse("config C:\n    a: int = 1").configs[0].fields[0].name == "a"


def test_empty_file_parses_to_nothing():
    f = parse("")
    assert (f.configs, f.modules, f.archs) == ((), (), ())
    assert parse("\n\n   \n# only a comment\n").modules == ()


# ---- spans --------------------------------------------------------------------------------------


def test_spans_are_one_based_and_end_at_code():
    f = parse("config C:\n    a: int = 1 + 22   # doc\n    b: int = 2\n")
    a = f.configs[0].fields[0]
    assert (a.span.file, a.span.line, a.span.col) == ("t.model", 2, 5)
    # a statement's span stops at its last code character, not at the newline or the comment
    assert (a.span.end_line, a.span.end_col) == (2, 20)
    d = a.default
    assert (d.span.line, d.span.col, d.span.end_line, d.span.end_col) == (2, 14, 2, 20)


def test_name_spans():
    f = fwd_body("y = silu(x)\nreturn y")
    call = f.body[0].value
    assert (call.func.span.line, call.func.span.col, call.func.span.end_col) == (3, 13, 17)
    assert (call.args[0].span.line, call.args[0].span.col) == (3, 18)


def test_multiline_declaration_span_ends_on_its_last_line():
    m = parse(MODULE).modules[0]
    assert m.span.line == 4 and m.span.end_line == 19
    assert m.forward.span.line == 15 and m.forward.span.end_line == 19


def test_two_forwards_is_an_error():
    with pytest.raises(DslcError) as e:
        parse(
            "module M:\n    forward(x: [B]) -> [B]:\n        return x\n    forward(x: [B]) -> [B]:\n        return x\n"
        )
    d = e.value.diagnostics[0]
    assert (d.code, d.span.line) == ("E011", 4)


@pytest.mark.parametrize(
    "text, code, line",
    [
        ('config C:\n    s: str = "\\q"\n', "E001", 2),  # invalid escape
        ('config C:\n    s: str = "abc\n', "E001", 2),  # unterminated string
        ("config C:\n    a: int = 'x'\n", "E001", 2),  # single quotes
        ("config C:\n    a: int = (1 +\n", "E002", 2),  # unclosed bracket at the end
        ("config C:\n    a: int = 1\n      b: int = 2\n", "E001", 3),  # unexpected indent
        ("config C:\n        a: int = 1\n    b: int = 2\n", "E004", 3),  # dedent to an unknown level
        ("config C:\n\ta: int = 1\n", "E004", 2),  # tab
        ("config C:\n", "E002", 1),  # end of input where a block must start
    ],
)
def test_syntax_error_locations(text, code, line):
    with pytest.raises(DslcError) as e:
        parse(text)
    d = e.value.diagnostics[0]
    assert (d.code, d.span.line) == (code, line), d
