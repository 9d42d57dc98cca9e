"""The IR's text form, its exact round trip, the verifier, and `dslc show`."""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from dslc.api import check_file, check_source
from dslc.cli import main
from dslc.diagnostics import Span
from dslc.ir import nodes as N
from dslc.ir.printer import RESERVED, print_program
from dslc.ir.reader import IRSyntaxError, read_program
from dslc.ir.verify import verify_program
from dslc.resources import grammar_path

ROOT = Path(__file__).resolve().parents[1]
QWEN2 = str(ROOT / "models" / "qwen2.model")

# Every node kind: repeat + loop with two carried values, a loop carrying nothing, ties, conditional
# weights and submodules, fns with scalar args and tuple results, x.dtype of values and weights,
# checkpoint rules with transforms, train hints, negative / float / string constants, escapes.
TINY = r"""
# A tiny model exercising every IR node kind.
use std

config TinyConfig:
    vocab: int = 32                        # tokens
    dim: int = 16                          # width
    layers: int = 2                        # blocks
    heads: int = 2
    eps: float = 1e-5                      # "norm" epsilon \ with a backslash
    scale: float = -0.5                    # negative float
    offset: int = -3
    tie: bool = true
    use_bias: bool = false
    use_extra: bool = true
    name: str = "tiny \"model\" \\ v1\n\ttab"
    spare: int? = none
    derived: int = dim * 2 if not use_bias and dim > 4 else -(dim - 1) // 2 ** 2
    from_hf n_embd -> dim
    from_hf a.b -> layers
    require dim % heads == 0, "dim must split into \"heads\""
    require (dim - 1) * -2 < 0 or tie, "odd"

arch "small": dim = 8, layers = 1
arch "big" extends "small": dim = 32, scale = 1.5e-10, name = "big"

module Block(d: int, eps: float = 1e-6, bias: bool = false):
    norm = RMSNorm(d, eps = eps)
    proj = Linear(d, d, bias = bias)
    gate: [d] = ones
    extra: [d, 2] f32 = normal(std = 0.5 * -1.0) if bias

    forward(x: [B, T, d], pos: [B, T] i64) -> [B, T, d]:
        h = norm(x)
        a, b = pair(h, 2)
        h = proj(a) * cast(gate, gate.dtype) + b
        return x + cast(h, x.dtype)

fn pair(x: [B, T, D], n: int) -> ([B, T, D] float, [B, T, D]):
    y = x * (1.0 / n) - -2.5
    z = reshape(y, [B, T, D])
    return z, neg(x)

module Extra:
    w: [dim] = zeros

    forward(x: [B, T, dim]) -> [B, T, dim]:
        return x + w

model Tiny(TinyConfig): causal_lm
    embed = Embedding(vocab, dim)
    blocks = repeat(layers, Block(dim, eps = eps, bias = use_bias))
    extra = Extra() if use_extra
    head = Linear(dim, vocab)
    tie head.weight = embed.weight if tie

    forward(ids: [B, T] i64, pos: [B, T] i64) -> [B, T, vocab]:
        x = embed(ids)
        y = x
        for blk in blocks:
            x = blk(x, pos)
            y = y + x
        for blk in blocks:
            _unused = blk(y, pos)
        return head(extra(y))

checkpoint:
    "blk.{i}.w" -> transpose -> "blocks.{i}.proj.weight"
    "a.{i}", "b.{i}" -> concat(dim = 0) -> split(dim = -1) -> "blocks.{i}.gate", "blocks.{i}.norm.weight"
    ignore "rotary.inv_freq"

train:
    activation_checkpointing Block, Extra
    parallel "blocks.{i}.proj" -> colwise
    parallel "head" -> rowwise
"""

# A second shape of spec: no std, no archs, no ties, no checkpoint; a forward without a loop.
PLAIN = """
config C:
    n: int = 4

model M(C): base
    w: [n, n] = normal(std = 0.1)
    b: [n] = zeros

    forward(x: [B, n]) -> [B, n]:
        y = x @ w
        return y + b
"""


@cache
def _checked(source: str, arch: str | None):
    if source == "qwen2":
        return check_file(QWEN2, arch)
    return check_source({"tiny": TINY, "plain": PLAIN}[source], f"{source}.model", arch)


def _diff(a, b, path="program") -> str | None:
    """The first place two IR values differ, for a readable assertion message."""
    if a == b:
        return None
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        for f in dataclasses.fields(a):
            d = _diff(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
            if d:
                return d
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _diff(x, y, f"{path}[{i}]")
            if d:
                return d
    return f"{path}: {a!r} != {b!r}"


def _round_trip(p: N.Program, types=None) -> None:
    text = print_program(p, types)
    back = read_program(text)
    assert back == p, _diff(p, back)
    assert print_program(back, types) == text


# ---- round trip ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,arch",
    [("qwen2", None), ("qwen2", "0.5b"), ("tiny", None), ("tiny", "small"), ("tiny", "big"), ("plain", None)],
)
def test_round_trip_and_verify(source, arch):
    c = _checked(source, arch)
    _round_trip(c.program)
    _round_trip(c.program, c.types)  # type comments are ignored by the reader
    assert verify_program(c.program) == []


def test_text_shape():
    c = _checked("qwen2", "0.5b")
    text = print_program(c.program, c.types)
    assert 'arch "0.5b"' in text
    assert re.search(
        r"%t\d+ = call q_proj\(%x\)  @\S*qwen2\.model:\d+:\d+-\d+:\d+  # %t\d+: \[B, T, num_attention_heads \* head_dim\]",
        text,
    )
    assert "%t3 = mean(%t2) {dim=-1, keepdim=true}" in text
    assert "%x_3 = for layer in layers (%x_1 = %x) {" in text
    assert "tie lm_head.weight = model.embed_tokens.weight if tie_word_embeddings" in text
    assert "lm_head.weight: [151936, 896] float normal tied_to model.embed_tokens.weight" in text
    assert "field head_dim: int = hidden_size // num_attention_heads => 64" in text
    # every declaration and op carries its span
    for line in text.splitlines():
        if re.match(r"\s*(%|field|param|weight |sub |tie |require|module|fn |rule)", line):
            assert re.search(r"  @\S+:\d+:\d+-\d+:\d+", line), line


def test_tiny_covers_every_node_kind():
    p = _checked("tiny", None).program
    text = print_program(p)
    loops = [st for m in p.modules if m.forward for st in m.forward.body if isinstance(st, N.Loop)]
    assert [len(lp.results) for lp in loops] == [2, 0]
    assert p.module("Tiny").ties and p.module("Block").weights[-1].condition is not None
    assert p.fn("pair").graph.result_sigs is not None and len(p.fn("pair").graph.result_sigs) == 2
    assert any(r.transforms for r in p.checkpoint.rules) and p.checkpoint.ignores
    assert p.train.checkpointing and p.train.parallel
    assert "dtype(&gate)" in text and "dtype(%x)" in text
    assert "-(dim - 1) // 2 ** 2" in text and "(dim - 1) * -2 < 0 or tie" in text
    assert r'"tiny \"model\" \\ v1\n\ttab"' in text
    assert any(w.tied_to for w in p.weights)


# ---- hand-made programs: the corners of the text form --------------------------------------------------------

_S = Span('odd dir/with "quotes" and: colon.model', -1, 0, 2, 3)


def _edge_program() -> N.Program:
    """Tiny's program with every awkward value the printer must keep exact."""
    p = _checked("tiny", None).program
    C, R, B, U = N.Const, N.Ref, N.BinE, N.UnE
    exprs = (
        C(-0.0),
        C(float("inf")),
        C(float("-inf")),
        C(1e300),
        C(5e-324),
        C(-(10**30)),
        C(""),
        C('a"b\\c\n\x00é\u2028'),
        U("-", C(1)),
        U("-", C(-1.5)),
        U("-", U("-", R("config", "dim"))),
        U("not", U("not", C(True))),
        B("**", C(-2), C(2)),
        B("**", C(2), U("-", C(1))),
        B("**", B("**", C(2), C(3)), C(2)),
        B("**", C(2), B("**", C(3), C(2))),
        B("-", C(1), B("-", C(2), C(3))),
        B("-", B("-", C(1), C(2)), C(3)),
        B("-", C(1), C(-1)),
        B("<", B("<", C(1), C(2)), C(3)),
        B("==", C(1), B("==", C(2), C(3))),
        N.CondE(N.CondE(C(1), C(True), C(2)), N.CondE(C(False), C(True), C(False)), N.CondE(C(3), C(False), C(4))),
        B("and", B("or", C(True), C(False)), U("not", B("and", C(True), C(False)))),
        N.ListE(()),
        N.ListE((N.ListE((C(1),)), C("..."), R("sym", "B"))),
        R("foo", "bar"),
        R("config", "in"),
        R("config", "weird name"),
        R("value", "a b"),
        R("param", '"q"'),
        R("dtype", "f32"),
        R("dtype_of", "weight:w w"),
        R("dtype_of", "x"),
        R("weight", "0"),
        R("sym", "?"),
        B("@", R("value", "a"), R("value", "b")),
        B("%", R("value", "a"), B("//", C(7), C(2))),
    )
    config = p.config
    requires = tuple(N.RequireDef(e, f'message {i} "q" \\', _S) for i, e in enumerate(exprs))
    fields = config.fields + (
        N.FieldDef("in", "int", True, None, "a keyword as a name", _S),
        N.FieldDef("weird name", "str", False, C("x"), "", _S),
        N.FieldDef("dots", "str", False, C("..."), "", _S),
    )
    config = replace(
        config,
        requires=config.requires + requires,
        fields=fields,
        aliases=config.aliases + (("with space", "in"),),
        archs=config.archs + (N.ArchDef('quote"arch', "small", (("weird name", C("y")),), _S),),
    )
    # values in an order the fields do not imply, with an extra float
    values = tuple(reversed(p.values)) + (("in", None), ("dots", "..."), ("nan", float("inf")))
    block = p.module("Block")
    g = block.forward
    odd_ops = (
        N.Op("identity", (C(1),), (), ("t99",), ("t99",), "", _S),  # a temporary-looking name with a var
        N.Op("identity", (C(2),), (), ("h_9",), ("",), "", _S),  # a user-looking name without one
        N.Op("identity", (C(3),), (("k", C(-1)), ("if", C("s"))), ("q r",), ("q r",), "", _S),
        N.Op("dropout", (), (), (), (), "", _S),  # no results, no args
        N.Op("weird op", (), (), ("u",), ("v",), "target name", _S),
    )
    odd_args = (N.ArgDef("both", N.TensorSig((C("..."),), "f32"), "int", _S), N.ArgDef("none", None, None, _S))
    block = replace(
        block,
        doc='line one\nline "two"\t\\',
        task=None,
        forward=replace(g, body=odd_ops + g.body, args=g.args + odd_args, result_sigs=()),
    )
    empty = N.ModuleDef("Empty Module", (), (), (), (), N.Graph((), (), (), None, _S), False, None, "", _S)
    modules = tuple(block if m.name == "Block" else m for m in p.modules)
    modules = (empty,) + modules
    weights = p.weights + (
        N.WeightInfo("weird.0.name with space", (1, 2), "f32", "ones", "embed.weight", _S),
        N.WeightInfo("plain", (), "float", "zeros", None, _S),
    )
    checkpoint = N.CheckpointDef(
        p.checkpoint.rules + (N.LayoutRuleDef((), (("x y", ()),), (), _S),), p.checkpoint.ignores + ('a"b',)
    )
    train = N.TrainDef(p.train.checkpointing + ("Empty Module",), p.train.parallel + (("p\\q", "odd style"),))
    extra = {"regions": _regions()} if HAS_REGIONS else {}
    return replace(
        p,
        source='dir with space/"x"\n.model',
        arch='quote"arch',
        config=config,
        values=values,
        modules=modules,
        weights=weights,
        checkpoint=checkpoint,
        train=train,
        **extra,
    )


HAS_REGIONS = "regions" in {f.name for f in dataclasses.fields(N.Program)}


def _regions() -> tuple:
    from dslc.ir.regions import RegionInput, RegionOp, RowRegion

    norm = RowRegion(
        "rms_norm_0",
        (RegionInput("x"), RegionInput("w"), RegionInput("eps", "scalar", False)),
        (
            RegionOp("cast", ("x",), "h", (("dtype", "f32"),)),
            RegionOp("mul", ("h", "h"), "t1"),
            RegionOp("mean", ("t1",), "t2"),
            RegionOp("add", ("t2", "eps"), "t3"),
            RegionOp("rsqrt", ("t3",), "t4"),
            RegionOp("mul", ("h", "t4"), "t5"),
            RegionOp("cast", ("t5",), "t6", (("dtype", "input:x"),)),
            RegionOp("mul", ("w", "t6"), "y"),
            RegionOp("pow", ("y", -0.5), "z"),
            RegionOp("add", ("z", 2), "zz"),
        ),
        ("y", "t4"),
        ("input:x", "f32"),
        "std.model:24-27",
        ('fused "norm"', "second note"),
    )
    return (norm, RowRegion("empty", (), (), ()))


def test_round_trip_corner_cases():
    p = _edge_program()
    _round_trip(p)
    text = print_program(p)
    assert "-(1)" in text and "(-2) ** 2" in text and "(1 < 2) < 3" in text
    assert "values {" in text  # the evaluated values' order differs from the fields'
    assert '%t99 as "t99"' in text and '%h_9 as ""' in text
    assert 'ref("config", "in")' in text and 'ref("foo", "bar")' in text
    if HAS_REGIONS:
        assert "row_region rms_norm_0 {" in text and '%t6 = cast(%t5) {dtype="input:x"}' in text


def test_round_trip_random_expressions():
    rng = random.Random(1234)
    leaves = [
        N.Const(0),
        N.Const(-3),
        N.Const(2.5),
        N.Const(-1e-3),
        N.Const(True),
        N.Const(None),
        N.Const('s"\\'),
        N.Ref("config", "dim"),
        N.Ref("param", "p"),
        N.Ref("value", "v"),
        N.Ref("sym", "B"),
    ]
    binops = ["or", "and", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "//", "%", "@", "**"]

    def gen(depth: int) -> N.E:
        r = rng.random()
        if depth == 0 or r < 0.2:
            return rng.choice(leaves)
        if r < 0.65:
            return N.BinE(rng.choice(binops), gen(depth - 1), gen(depth - 1))
        if r < 0.8:
            return N.UnE(rng.choice(["-", "not"]), gen(depth - 1))
        if r < 0.92:
            return N.CondE(gen(depth - 1), gen(depth - 1), gen(depth - 1))
        return N.ListE(tuple(gen(depth - 1) for _ in range(rng.randrange(3))))

    p = _checked("plain", None).program
    requires = tuple(N.RequireDef(gen(5), "", _S) for _ in range(300))
    _round_trip(replace(p, config=replace(p.config, requires=requires)))


def test_grammar_keywords_as_names():
    """A name spelled like a keyword of the IR grammar reads back as a name, wherever names appear."""
    words = sorted(set(re.findall(r'"([a-z_]+)"', grammar_path("ir.lark").read_text())) | RESERVED)
    assert {"module", "weight", "for", "yield", "none", "tied_to", "std"} <= set(words)
    base = _checked("plain", None).program
    for w in words:
        m = base.modules[-1]
        g = m.forward
        op = N.Op(w, (N.Ref("config", w), N.Ref("param", w)), ((w, N.Ref("weight", w)),), (w,), (w,), w, _S)
        sub = N.SubmoduleDef(w, w, (N.Ref("config", w),), ((w, N.Const(w)),), N.Ref("config", w), None, w, _S)
        loop = N.Loop(w, w, (op,), (), (), (), (), (), _S)
        m2 = replace(
            m,
            name=w,
            task=w,
            params=(N.ParamDef(w, w, None, _S),),
            weights=m.weights + (N.WeightDef(w, (N.Ref("param", w),), w, w, None, None, w, _S),),
            submodules=(sub,),
            ties=(N.TieDef(w, f"{w}.{w}", None, _S),),
            forward=replace(
                g, args=(N.ArgDef(w, N.TensorSig((N.Ref("sym", w),), w), None, _S),), body=(loop,) + g.body
            ),
        )
        fn = N.FnDef(w, N.Graph((N.ArgDef(w, None, w, _S),), (), (), (N.TensorSig((), w),), _S), w, _S)
        config = replace(
            base.config,
            name=w,
            fields=base.config.fields + (N.FieldDef(w, w, False, None, w, _S),),
            aliases=((w, w),),
            archs=(N.ArchDef(w, w, ((w, N.Ref("config", w)),), _S),),
        )
        p = replace(
            base,
            model=w,
            arch=w,
            config=config,
            modules=(m2,),
            fns=(fn,),
            values=base.values + ((w, w),),
            checkpoint=N.CheckpointDef((N.LayoutRuleDef((w,), ((w, ((w, N.Const(1)),)),), (w,), _S),), (w,)),
            train=N.TrainDef((w,), ((w, w),)),
            weights=(N.WeightInfo(w, (1,), w, w, w, _S),),
        )
        if HAS_REGIONS:
            from dslc.ir.regions import RegionInput, RegionOp, RowRegion

            p = replace(
                p,
                regions=(
                    RowRegion(
                        w, (RegionInput(w, w, True),), (RegionOp(w, (w, 1.0), w, ((w, w),)),), (w,), (w,), w, (w,)
                    ),
                ),
            )
        _round_trip(p)


def test_reader_rejects_other_text():
    with pytest.raises(IRSyntaxError, match="line 1"):
        read_program("module x {")
    text = print_program(_checked("plain", None).program)
    with pytest.raises(IRSyntaxError):
        read_program(text.replace("return %t", "return %t,"))


# ---- the verifier --------------------------------------------------------------------------------------------


def _qwen2():
    return _checked("qwen2", "0.5b").program


def _with_module(p: N.Program, m: N.ModuleDef) -> N.Program:
    return replace(p, modules=tuple(m if x.name == m.name else x for x in p.modules))


def _with_body(p: N.Program, name: str, body) -> N.Program:
    m = p.module(name)
    return _with_module(p, replace(m, forward=replace(m.forward, body=tuple(body))))


def _one(errors: list[str], pattern: str) -> None:
    assert any(re.search(pattern, e) for e in errors), errors


def test_verify_ssa_defined_twice():
    p = _qwen2()
    body = list(p.module("Attention").forward.body)
    body[1] = replace(body[1], results=(body[0].results[0],))  # %q reuses %t3's name
    _one(
        verify_program(_with_body(p, "Attention", body)), r"module `Attention` forward: `%t3` is defined more than once"
    )


def test_verify_ssa_use_before_definition():
    p = _qwen2()
    body = list(p.module("Attention").forward.body)
    body[0], body[1] = body[1], body[0]
    errors = verify_program(_with_body(p, "Attention", body))
    _one(errors, r"`%t3` is used before it is defined \(at .*qwen2\.model:\d+:\d+\)")


def test_verify_loop_scope_and_outputs():
    p = _qwen2()
    body = list(p.module("Qwen2Model").forward.body)
    loop = next(st for st in body if isinstance(st, N.Loop))
    inner = loop.body[0].results[0]
    i = body.index(loop)
    body[i + 1] = replace(body[i + 1], args=(N.Ref("value", inner),))  # a loop body value used after the loop
    errors = verify_program(_with_body(p, "Qwen2Model", body))
    _one(errors, rf"`%{inner}` is used outside the loop that defines it")
    m = p.module("Qwen2Model")
    bad = _with_module(p, replace(m, forward=replace(m.forward, outputs=("nope",))))
    _one(verify_program(bad), r"output `%nope` is not defined")
    bad_loop = replace(loop, yields=("ghost",))
    _one(
        verify_program(_with_body(p, "Qwen2Model", [bad_loop if st is loop else st for st in body])),
        r"loop yield `%ghost` is not defined",
    )


def test_verify_unknown_targets_and_refs():
    p = _qwen2()
    body = list(p.module("Attention").forward.body)
    cases = [
        (replace(body[0], target="nope"), r"call of unknown submodule `nope`"),
        (replace(body[1], target="split_head"), r"call of unknown fn `split_head`"),
        (replace(body[0], op="frobnicate", target=""), r"unknown op `frobnicate`"),
        (replace(body[0], args=(N.Ref("weight", "w"),)), r"unknown weight `&w`"),
        (replace(body[0], args=(N.Ref("param", "p"),)), r"unknown module parameter `\$p`"),
        (
            replace(body[1], args=(N.Ref("value", "t3"), N.Ref("config", "num_heads"))),
            r"unknown config field `num_heads`",
        ),
        (replace(body[0], vars=()), r"1 result\(s\) but 0 var name\(s\)"),
        (replace(body[0], args=(N.Ref("weight", "q_proj.nope"),)), r"unknown weight `&q_proj.nope`: `Linear` has no "),
    ]
    for op, pattern in cases:
        _one(
            verify_program(
                _with_body(p, "Attention", [op] + body[1:] if op.span == body[0].span else [body[0], op] + body[2:])
            ),
            pattern,
        )
    # a submodule's weight by its path, as the inlining pass leaves it, is valid
    inlined = _with_body(
        p,
        "Attention",
        [replace(body[0], op="linear", target="", args=(N.Ref("value", "x"), N.Ref("weight", "q_proj.weight")))]
        + body[1:],
    )
    assert verify_program(inlined) == []
    _round_trip(inlined)
    assert "linear(%x, &q_proj.weight)" in print_program(inlined)
    # a repeat stack is called through a loop, not directly
    m = p.module("Qwen2Model")
    direct = replace(m.forward.body[0], target="layers")
    _one(verify_program(_with_body(p, "Qwen2Model", (direct,) + m.forward.body[1:])), r"`layers` is a repeat stack")


def test_verify_ties_and_weights():
    p = _qwen2()
    tied = next(i for i, w in enumerate(p.weights) if w.tied_to)
    weights = list(p.weights)
    weights[tied] = replace(weights[tied], tied_to="model.embed_tokens.weights")
    _one(verify_program(replace(p, weights=tuple(weights))), r"tied to unknown weight `model.embed_tokens.weights`")
    weights = list(p.weights)
    weights[0] = replace(weights[0], tied_to=weights[tied].name)  # tied to a weight that is tied itself
    _one(verify_program(replace(p, weights=tuple(weights))), r"which is itself tied")
    _one(verify_program(replace(p, weights=p.weights + (p.weights[0],))), r"appears twice in the weight tree")
    m = p.module(p.model)
    bad_tie = replace(m, ties=(replace(m.ties[0], source="model.embed.weight"),))
    _one(
        verify_program(_with_module(p, bad_tie)),
        r"tie path `model.embed.weight`: `Qwen2Model` has no submodule `embed`",
    )


def test_verify_program_structure():
    p = _qwen2()
    _one(verify_program(replace(p, modules=tuple(reversed(p.modules)))), r"dependency order")
    _one(verify_program(replace(p, modules=tuple(reversed(p.modules)))), r"must be the last module")
    phi3 = check_file(ROOT / "models" / "phi3.model").program  # apply_partial_rope calls apply_rope
    _one(verify_program(replace(phi3, fns=tuple(reversed(phi3.fns)))), r"listed after its caller")
    lin = p.module("Linear")
    dup = replace(lin, weights=lin.weights + (lin.weights[0],))
    _one(verify_program(_with_module(p, dup)), r"module `Linear`: member `weight` is defined twice")
    cfg = replace(p.config, archs=p.config.archs + (N.ArchDef("x", "nope", (), p.config.span),))
    _one(verify_program(replace(p, config=cfg)), r"arch `x` extends unknown arch `nope`")
    _one(verify_program(replace(p, train=N.TrainDef(("Nope",), ()))), r"activation checkpointing names unknown module")
    att = p.module("Attention")
    _one(verify_program(_with_module(p, replace(att, uses_config=False))), r"reads config fields but `uses_config`")


@pytest.mark.skipif(not HAS_REGIONS, reason="Program has no fused regions yet")
def test_verify_regions():
    p = _qwen2()
    norm = p.module("RMSNorm")
    g = norm.forward
    op = N.Op(
        "region",
        (N.Ref("value", "x"), N.Ref("weight", "weight"), N.Ref("param", "eps")),
        (),
        ("y", "r"),
        ("", ""),
        "rms_norm_0",
        g.span,
    )
    fused = replace(p, regions=_regions())
    fused = _with_module(fused, replace(norm, forward=replace(g, body=(op,), outputs=("y",))))
    assert verify_program(fused) == []
    _round_trip(fused)
    _one(verify_program(_with_body(fused, "RMSNorm", [replace(op, target="rms")])), r"call of unknown region `rms`")
    _one(
        verify_program(_with_body(fused, "RMSNorm", [replace(op, args=op.args[:2])])),
        r"region `rms_norm_0` takes 3 input\(s\), got 2",
    )
    region = fused.regions[0]
    broken = replace(region, ops=region.ops[1:])  # %h is read but no longer defined
    _one(
        verify_program(replace(fused, regions=(broken,) + fused.regions[1:])),
        r"region `rms_norm_0`: `%h` is used before it is defined",
    )
    twice = replace(region, ops=region.ops + (region.ops[0],))
    _one(verify_program(replace(fused, regions=(twice,) + fused.regions[1:])), r"`%h` is defined more than once")


# ---- dslc show -------------------------------------------------------------------------------------------------


def test_show_parameter_count_and_ir(capsys):
    assert main(["show", QWEN2, "--arch", "0.5b", "--ir", "--fusion"]) == 0
    out = capsys.readouterr().out
    assert "494,032,768" in out
    assert "total: 494,032,768 parameters" in out
    assert "layers.{1..23}  23 × DecoderLayer, identical to layers.0" in out
    assert "tied to model.embed_tokens.weight" in out
    assert "tie_word_embeddings" in out and "hidden_size // num_attention_heads" in out
    assert "fused regions" in out and "gated_mlp_pointwise" in out
    # the IR section is the exact text form: it reads back to the program
    ir = out[out.index("# dslc IR") : out.index("fused regions")]
    assert read_program(ir) == _qwen2()


def test_show_graph(tmp_path, capsys, monkeypatch):
    dot = tmp_path / "g.dot"
    main(["show", QWEN2, "--graph", str(dot)])
    after = dot.read_text()  # the IR after the pass pipeline: fused projections and regions
    assert 'label="fused_linear qkv_proj' in after and 'label="region ' in after
    text = (tmp_path / "g.before.dot").read_text()  # and before it, beside
    p = _checked("qwen2", None).program
    assert text.startswith("digraph dslc {") and text.rstrip().endswith("}")
    assert text.count("subgraph cluster_") == len(p.modules) + len(p.fns) + 1  # + the layer loop
    assert 'label="module Qwen2ForCausalLM"' in text and 'label="call q_proj"' in text
    nodes = set(re.findall(r"^\s*(n\d+) \[label=", text, re.M))
    for a, b in re.findall(r"(n\d+) -> (n\d+)", text):
        assert a in nodes and b in nodes
    capsys.readouterr()
    monkeypatch.setattr("shutil.which", lambda name: None)
    main(["show", QWEN2, "--graph", str(tmp_path / "g.svg")])
    err = capsys.readouterr().err
    assert "needs Graphviz" in err and "g.dot" in err
    assert not (tmp_path / "g.svg").exists()


ROTATE_SPEC = """use std

config C:
    dim: int = 8

model M(C): base
    forward(x: [B, T, dim]) -> [B, T, dim]:
        return rotate_half(x) + apply_rope_like(x)

fn apply_rope_like(x: [B, T, D]) -> [B, T, D]:
    return rotate_half(x) * 2.0
"""


def test_rotate_half_is_the_primitive_everywhere():
    """`rotate_half(x)` means the primitive op, with std used or not, in a module and in a fn (std declares no fn
    of that name; a spec's fn named like a primitive is E012, tests/ui/e012_fn_shadows_primitive), and it is
    transformers' rotate_half: cat(-x2, x1) of the halves of the last dim."""
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

    for text in (ROTATE_SPEC, ROTATE_SPEC.removeprefix("use std\n")):
        program = check_source(text, "rotate.model").program
        assert "rotate_half" not in {f.name for f in program.fns}
        ops = [op.op for op in program.module("M").forward.body] + [op.op for f in program.fns for op in f.graph.body]
        assert ops.count("rotate_half") == 2 and "fn" in ops  # the module's call and the fn's; the fn is called
    from ir_reference import Reference

    x = torch.randn(2, 3, 8)
    (got,) = Reference(check_source(ROTATE_SPEC, "rotate.model").program, {})(x)
    torch.testing.assert_close(got, hf_rotate_half(x) * 3.0, rtol=0, atol=0)
