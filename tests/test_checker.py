"""Lowering and the shape checker on small inline specs: what checks clean, and what fails with which code,
where and with what message. `check_source(text, path, arch, overrides)` is the API the CLI uses."""

from __future__ import annotations

import pytest

from dslc.api import check_source
from dslc.diagnostics import DslcError

CONFIG = """use std

config C:
    dim: int = 64                  # width
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = dim // heads   # derived
    vocab: int = 100
    layers: int = 2
    eps: float = 1e-5
    bias: bool = false
    inner: int?
    require dim % heads == 0, "dim must split evenly into heads"
    require heads % kv_heads == 0, "heads must be a multiple of kv_heads"

arch "small": dim = 32, layers = 1
arch "wide" extends "small": dim = 128, vocab = 256
arch "wider" extends "wide": heads = 8
"""

ATTENTION = """
module Attention:
    q_proj = Linear(dim, heads * head_dim, bias = true)
    k_proj = Linear(dim, kv_heads * head_dim, bias = true)
    v_proj = Linear(dim, kv_heads * head_dim, bias = true)
    o_proj = Linear(heads * head_dim, dim)

    forward(x: [B, T, dim]) -> [B, T, dim]:
        q = split_heads(q_proj(x), heads)
        k = split_heads(k_proj(x), kv_heads)
        v = split_heads(v_proj(x), kv_heads)
        return o_proj(merge_heads(attention(q, k, v, causal = true)))

module Layer:
    norm = RMSNorm(dim, eps = eps)
    attn = Attention()
    mlp = GatedMLP(dim, 4 * dim, bias = bias)

    forward(x: [B, T, dim]) -> [B, T, dim]:
        x = x + attn(norm(x))
        return x + mlp(norm(x))
"""

MODEL = """
model Net(C): causal_lm
    embed = Embedding(vocab, dim)
    layers = repeat(layers, Layer())
    norm = LayerNorm(dim, eps = eps, bias = bias)
    head = Linear(dim, vocab)
    tie head.weight = embed.weight if inner == none

    forward(ids: [B, T] i64) -> [B, T, vocab]:
        x = embed(ids)
        for layer in layers:
            x = layer(x)
        return head(norm(x))
"""

SPEC = CONFIG + ATTENTION + MODEL


def check(text: str, arch: str | None = None, **overrides):
    return check_source(text, "t.model", arch, {k: str(v) for k, v in overrides.items()})


def errors(text: str, arch: str | None = None, **overrides):
    with pytest.raises(DslcError) as e:
        check(text, arch, **overrides)
    return e.value.diagnostics


def one_error(text: str, arch: str | None = None, **overrides):
    diags = errors(text, arch, **overrides)
    assert len(diags) == 1, "\n".join(f"{d.code} {d.span}: {d.message}" for d in diags)
    return diags[0]


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    return next(i for i, ln in enumerate(text.split("\n"), 1) if needle in ln)


def weights(checked) -> dict:
    return {w.name: w for w in checked.program.weights}


# ---- clean specs --------------------------------------------------------------------------------


def test_spec_checks_clean():
    c = check(SPEC)
    assert c.warnings == []
    p = c.program
    assert p.model == "Net" and p.arch is None
    v = p.config_values
    assert (v["dim"], v["head_dim"], v["inner"], v["eps"]) == (64, 16, None, 1e-5)
    w = weights(c)
    assert w["layers.0.attn.q_proj.weight"].shape == (64, 64)
    assert w["layers.1.attn.k_proj.weight"].shape == (32, 64)  # kv_heads * head_dim
    assert w["layers.0.attn.k_proj.bias"].shape == (32,)
    assert "layers.0.mlp.gate_proj.bias" not in w  # bias = false
    assert w["head.weight"].tied_to == "embed.weight"  # inner == none


def test_param_count_counts_tied_weights_once():
    untied = check(SPEC, inner=7).program
    tied = check(SPEC).program
    assert untied.param_count - tied.param_count == 100 * 64


def test_minimal_fn_and_module_check():
    text = """use std
config C:
    d: int = 8
fn double(x: [..., D]) -> [..., D]:
    return x + x
model M(C): base
    w: [d, d] = zeros
    forward(x: [B, d]) -> [B, d]:
        return double(x @ w)
"""
    assert check(text).program.param_count == 64


# ---- --set, --arch and inheritance ---------------------------------------------------------------


def test_set_overrides_and_derived_defaults_follow():
    v = check(SPEC, dim=128, heads=8).program.config_values
    assert (v["dim"], v["heads"], v["head_dim"]) == (128, 8, 16)


def test_set_int_into_float_field_and_bool():
    v = check(SPEC, eps=1, bias="true").program.config_values
    assert v["eps"] == 1.0 and isinstance(v["eps"], float) and v["bias"] is True


def test_set_changes_weights():
    w = weights(check(SPEC, layers=3, vocab=50))
    assert "layers.2.norm.weight" in w and w["embed.weight"].shape == (50, 64)


def test_arch_selection():
    p = check(SPEC, "small").program
    assert p.arch == "small"
    v = p.config_values
    assert (v["dim"], v["layers"], v["head_dim"]) == (32, 1, 8)
    assert "layers.1.norm.weight" not in weights(check(SPEC, "small"))


def test_arch_inheritance_chain():
    v = check(SPEC, "wider").program.config_values
    # wider: heads = 8; from wide: dim = 128, vocab = 256; from small: layers = 1
    assert (v["heads"], v["dim"], v["vocab"], v["layers"], v["head_dim"]) == (8, 128, 256, 1, 16)


def test_set_wins_over_arch():
    v = check(SPEC, "wide", dim=256).program.config_values
    assert (v["dim"], v["vocab"]) == (256, 256)


def test_unknown_arch_with_did_you_mean():
    d = one_error(SPEC, "smal")
    assert d.code == "E022" and "smal" in d.message
    assert d.help == ("did you mean `small`?",)
    assert d.span.line == line_of(SPEC, "config C:")


def test_unknown_arch_lists_archs():
    d = one_error(SPEC, "zzzzzz")
    assert d.help == ("archs: small, wide, wider",)


def test_unknown_set_key():
    d = one_error(SPEC, dimm=3)
    assert d.code == "E024" and d.help == ("did you mean `dim`?",)


def test_set_value_of_wrong_type():
    d = one_error(SPEC, dim="wide")
    assert d.code == "E021" and d.message == "config field `dim` is int, got 'wide'"
    assert d.span.line == line_of(SPEC, "dim: int = 64")


def test_arch_cycle_and_unknown_base():
    text = SPEC.replace('arch "small": dim = 32, layers = 1', 'arch "small" extends "wider": dim = 32')
    d = one_error(text)
    assert d.code == "E023" and "cycle" in d.message
    d = one_error(SPEC.replace('extends "small"', 'extends "smal"'))
    assert d.code == "E022" and d.message == "unknown base arch `smal`" and d.help == ("did you mean `small`?",)


# ---- require ----------------------------------------------------------------------------------------


def test_require_failure_shows_values():
    d = one_error(SPEC, heads=6)
    assert d.code == "E020"
    assert d.message == "requirement failed: dim must split evenly into heads"
    assert d.help[0] == "with dim = 64, heads = 6"
    assert d.span.line == line_of(SPEC, "require dim % heads")


def test_require_failure_through_arch():
    d = one_error(SPEC.replace("heads = 8", "heads = 6"), "wider")
    assert d.code == "E020" and d.help[0] == "with dim = 128, heads = 6"


def test_require_without_message():
    text = SPEC.replace(
        '    require heads % kv_heads == 0, "heads must be a multiple of kv_heads"', "    require heads % kv_heads == 0"
    )
    d = one_error(text, kv_heads=3)
    assert d.message == "requirement failed: condition is false" and d.help[0] == "with heads = 4, kv_heads = 3"


# ---- shapes and dtypes ----------------------------------------------------------------------------


def body(lines: str, members: str = "") -> str:
    """A spec whose model forward runs `lines` on x: [B, T, dim] before the head."""
    extra = "".join(f"        {ln}\n" for ln in lines.strip("\n").split("\n"))
    return (
        CONFIG
        + f"""
model Net(C): causal_lm
    embed = Embedding(vocab, dim)
    head = Linear(dim, vocab)
{members}
    forward(ids: [B, T] i64) -> [B, T, vocab]:
        x = embed(ids)
{extra}        return head(x)
"""
    )


def test_mismatched_dims_in_add():
    text = body("x = x + up(x)", "    up = Linear(dim, 2 * dim)\n")
    d = one_error(text)
    assert d.code == "E030"
    assert d.message == "`add` of [B, T, dim] and [B, T, 2 * dim]: dim 64 does not match 128"
    assert (d.span.line, d.span.col) == (line_of(text, "x = x + up(x)"), 13)


def test_broadcasting_is_allowed():
    check(body("x = x * ones_row", "    ones_row: [dim] = ones\n"))


def test_wrong_rank_to_a_module():
    text = (
        CONFIG
        + """
module Mix:
    w: [dim, dim]
    forward(x: [B, dim]) -> [B, dim]:
        return x @ w
"""
        + body("x = mix(x)", "    mix = Mix()\n").replace(CONFIG, "")
    )
    d = one_error(text)
    assert d.code == "E031"
    assert d.message == "argument `x` of `Mix` must have rank 2, got [B, T, dim]"
    assert d.help == ("declared as [B, dim]",)


def test_dtype_mixing_without_cast():
    d = one_error(body("x = x + cast(x, f32)"))
    assert d.code == "E032" and d.message == "`add` mixes dtypes float and f32"
    assert "cast" in d.help[0]


def test_dtype_mixing_fixed_by_cast():
    check(body("h = cast(x, f32)\nx = cast(h * h, x.dtype) + x"))


def test_integer_tensor_into_float_op():
    d = one_error(body("y = exp(ids)\nx = x"))
    assert d.code == "E032" and "i64" in d.message


def test_heads_not_dividing_hidden_reshape():
    text = body("q = split_heads(x, 5)\nx = merge_heads(q)")
    d = one_error(text)
    assert d.code == "E034"
    assert d.message == "cannot reshape [B, T, dim] (64*B*T elements) into [B, T, 5, 12] (60*B*T elements)"
    # reported at the spec's call, not inside the standard library
    assert d.span.file == "t.model" and d.span.line == line_of(text, "split_heads(x, 5)")
    assert d.notes and d.notes[0].startswith("inside fn `split_heads`, std.model:")


def test_explicit_reshape_with_inferred_dim():
    check(body("h = reshape(x, [B, T, heads, -1])\nx = reshape(h, [B, T, dim])"))
    d = one_error(body("h = reshape(x, [B, T, 5, -1])\nx = x"))
    assert d.code == "E034" and "not divisible" in d.message


def test_gqa_heads_not_a_multiple():
    text = CONFIG + ATTENTION + MODEL
    d = one_error(text, kv_heads=3, dim=48, heads=4)
    # the require catches it first, with the values
    assert d.code == "E020" and d.help[0] == "with heads = 4, kv_heads = 3"
    no_require = text.replace('    require heads % kv_heads == 0, "heads must be a multiple of kv_heads"\n', "")
    d = one_error(no_require, kv_heads=3, dim=48, heads=4)
    assert d.code == "E034"
    assert d.message == "`attention`: 4 query heads are not a multiple of 3 key/value heads"
    assert d.span.line == line_of(no_require, "attention(q, k, v")


def test_linear_in_features_disagrees_with_input():
    text = body("x = x").replace("head = Linear(dim, vocab)", "head = Linear(2 * dim, vocab)")
    d = one_error(text)
    assert d.code == "E033"
    assert d.message == (
        "argument `x` of `Linear` is [B, T, dim], but its weight `weight` [vocab, 2 * dim] needs size 128 where it has 64"
    )
    assert d.help[0] == "declared as [..., in_features] where in_features = 128"
    assert d.span.line == line_of(text, "return head(x)")


def test_linear_primitive_weight_shape():
    d = one_error(body("x = linear(x, w)", "    w: [dim, 3 * dim]\n"))
    assert d.code == "E033"
    assert "input width 64 does not match weight in_features 192" in d.message


def test_result_type_mismatch():
    text = body("x = x").replace("-> [B, T, vocab]:", "-> [B, T, dim]:")
    d = one_error(text)
    assert d.code == "E042" and d.message == "result 1 is [B, T, vocab], but the signature declares [B, T, dim]"


def test_loop_must_keep_carried_shape():
    text = (
        CONFIG
        + """
module Grow:
    up = Linear(dim, 2 * dim)
    forward(x: [B, T, dim]) -> [B, T, 2 * dim]:
        return up(x)
"""
        + MODEL.replace("repeat(layers, Layer())", "repeat(layers, Grow())")
    )
    d = one_error(text)
    assert d.code == "E030" and "changes type across a loop pass" in d.message


def test_absent_optional_weight_is_skipped_by_add():
    text = body("x = x + b", "    b: [dim] = zeros if bias\n")
    assert check(text).program.param_count == check(text, bias="true").program.param_count - 64


# ---- names, structure, warnings -----------------------------------------------------------------------


def test_unknown_name_did_you_mean():
    text = body("x = silu(xx)")
    d = one_error(text)
    assert d.code == "E010" and d.message == "unknown name `xx`" and d.help == ("did you mean `x`?",)


def test_unknown_module_does_not_cascade():
    d = one_error(body("x = up(x)", "    up = Linaer(dim, dim)\n"))
    assert d.code == "E010" and d.message == "unknown module `Linaer`" and d.help == ("did you mean `Linear`?",)


def test_failed_config_default_does_not_cascade():
    d = one_error(SPEC.replace("vocab: int = 100", "vocab: int = round(100)"))
    assert d.code == "E016"


def test_independent_errors_are_all_reported_in_order():
    text = body("x = silu(xx)").replace("heads: int = 4", "heads: integer = 4")
    diags = errors(text)
    assert [d.code for d in diags] == ["E021"]  # config errors stop before modules are checked
    text = body("x = silu(xx)\nx = gelu(yy)")
    diags = errors(text)
    assert [d.code for d in diags] == ["E010", "E010"]
    assert diags[0].span.line < diags[1].span.line


def test_reserved_names():
    d = one_error(body("x = x", "    training = Linear(dim, dim)\n"))
    assert d.code == "E012" and "torch.nn.Module" in d.message
    d = one_error(body("lambda = silu(x)\nx = lambda"))
    assert d.code == "E012" and "Python keyword" in d.message


def test_module_contains_itself():
    text = (
        CONFIG
        + """
module Loop:
    inner = Loop()
    forward(x: [B, T, dim]) -> [B, T, dim]:
        return inner(x)
"""
        + body("x = loop(x)", "    loop = Loop()\n").replace(CONFIG, "")
    )
    d = one_error(text)
    assert d.code == "E060" and d.message == "module `Loop` contains itself"


def test_unused_variable_warning():
    text = body("y = silu(x)\n_z = gelu(x)")
    c = check(text)
    assert [(w.code, w.message, w.span.line) for w in c.warnings] == [
        ("W001", "`y` is never used", line_of(text, "y = silu(x)"))
    ]


def test_unused_member_warning():
    c = check(body("x = x", "    extra = Linear(dim, dim)\n    scale: [dim] = ones\n"))
    assert sorted((w.code, w.message) for w in c.warnings) == [
        ("W002", "submodule `extra` is never used in forward"),
        ("W002", "weight `scale` is never used in forward"),
    ]


def test_call_arity():
    d = one_error(body("x = head(x, x)\nx = x"))
    assert d.code == "E040" and d.message == "`Linear` takes 1 argument(s), got 2"
    d = one_error(body("x = x", "    up = Linear(dim)\n"))
    assert d.code == "E040" and d.message == "`Linear` needs parameter `out_features`"


def test_not_callable():
    d = one_error(body("x = x(x)"))
    assert d.code == "E041" and d.message == "`x` is a value, not a function"


def test_checkpoint_and_train_blocks_check():
    text = (
        SPEC
        + """
checkpoint:
    "model.embed_tokens.weight" -> "embed.weight"
    "qkv.{i}" -> split(dim = 0) -> "layers.{i}.attn.q_proj.weight", "layers.{i}.attn.k_proj.weight"
    ignore "rotary.*"

train:
    activation_checkpointing Layer
    parallel "layers.{i}.attn.q_proj" -> colwise
"""
    )
    p = check(text).program
    assert p.train.checkpointing == ("Layer",) and p.checkpoint.ignores == ("rotary.*",)
    d = one_error(text.replace("split(dim = 0) -> ", ""))
    assert d.code == "E050" and d.message == "several parameters need `split(dim = N)`"


def test_a_loop_carried_variable_read_inside_the_loop_is_not_unused():
    """W001 stays quiet for `local`: carried through the loop and read there, its value after the loop is unused."""
    from dslc.api import check_source

    text = """use std

config C:
    dim: int = 64
    vocab: int = 100

module Block:
    w: [dim] = ones

    forward(x: [B, T, dim]) -> [B, T, dim]:
        return x * w

model M(C): causal_lm
    embed = Embedding(vocab, dim)
    layers = repeat(2, Block())
    head = Linear(dim, vocab)

    forward(ids: [B, T] i64) -> [B, T, vocab]:
        x = embed(ids)
        local = x
        for layer in layers:
            local = layer(local)
            x = x + local
        return head(x)
"""
    assert [w.code for w in check_source(text, "carried.model").warnings] == []
    unused = text.replace("            local = layer(local)\n            x = x + local\n", "            x = layer(x)\n")
    assert [w.code for w in check_source(unused, "unused.model").warnings] == ["W001"]  # `local` never read


STATIC_CALLS_SPEC = """use std

config C:
    vocab_size: int = 64
    hidden_size: int = 48
    heads: int = 4
    head_dim: int = hidden_size // heads
    partial_rotary_factor: float = 0.5
    rotary_dim: int = int(head_dim * partial_rotary_factor)
    inner: int = max(2 * hidden_size, 64)
    narrow: int = min(hidden_size, 32)

model M(C): causal_lm
    embed = Embedding(vocab_size, hidden_size)
    up = Linear(hidden_size, inner)
    down = Linear(inner, narrow)
    head = Linear(narrow, vocab_size)

    forward(ids: [B, T] i64) -> [B, T, vocab_size]:
        return head(down(up(embed(ids))))
"""


def test_static_expressions_call_int_float_min_max():
    """Phi-3's `int(head_dim * partial_rotary_factor)`, and min/max, in config defaults (they follow --set)."""
    from dslc.api import check_source

    values = check_source(STATIC_CALLS_SPEC, "calls.model").config_eval.values
    assert (values["rotary_dim"], values["inner"], values["narrow"]) == (6, 96, 32)
    values = check_source(STATIC_CALLS_SPEC, "calls.model", overrides={"hidden_size": "16"}).config_eval.values
    assert (values["rotary_dim"], values["inner"], values["narrow"]) == (2, 64, 16)
    with pytest.raises(DslcError) as info:
        check_source(STATIC_CALLS_SPEC.replace("min(hidden_size, 32)", "min(hidden_size)"), "bad.model")
    assert any("`min` takes 2 argument(s)" in d.message for d in info.value.diagnostics)
    with pytest.raises(DslcError) as info:
        check_source(STATIC_CALLS_SPEC.replace("max(2 * hidden_size, 64)", "round(hidden_size)"), "bad.model")
    assert any(d.code == "E016" and "int()" in d.help[0] for d in info.value.diagnostics)


# ---- embedding padding rows ------------------------------------------------------------------------

PAD_SPEC = """use std
config C:
    vocab: int = 16
    dim: int = 8
    pad: int? = 3

model M(C): base
    embed = Embedding(vocab, dim, padding_idx = pad)

    forward(ids: [B, T] i64) -> [B, T, dim]:
        return embed(ids)
"""


def test_padding_idx_inside_the_table_checks_clean():
    assert check(PAD_SPEC).warnings == []
    assert check(PAD_SPEC, pad="none").warnings == []
    assert check(PAD_SPEC, pad=-16).warnings == []  # negative rows count from the end, as torch's


@pytest.mark.parametrize("pad", [16, 100277, -17])
def test_padding_idx_outside_the_table_is_found_by_check(pad):
    """OLMo 2's pad_token_id (100277) with a small --set vocab_size: torch would assert at construction."""
    d = one_error(PAD_SPEC, pad=pad)
    assert d.code == "E041" and f"padding_idx {pad} is not a row of the 16-row table" in d.message
    assert d.span.line == line_of(PAD_SPEC, "return embed(ids)")


def test_reshape_to_an_opaque_sum_of_symbols_is_checked():
    """`[B + T, dim]` is not `[B * T, dim]`: sizes the monomial form cannot compare are probed at a few symbol
    values (a fuzz mutant of qwen3_moe's router reshape passed check and failed in torch)."""
    body = """
module M:
    proj = Linear(dim, dim)

    forward(x: [B, T, dim]) -> [B, T, dim]:
        h = reshape(x, [{dims}, dim])
        return reshape(proj(h), [B, T, dim])

model Top(C): base
    m = M()

    forward(x: [B, T, dim]) -> [B, T, dim]:
        return m(x)
"""
    check(CONFIG + body.format(dims="B * T"))
    diag = one_error(CONFIG + body.format(dims="B + T"))
    assert diag.code == "E034" and "cannot reshape" in diag.message
