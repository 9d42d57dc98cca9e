"""Hostile and careless specs against the front end (issue 9, items 11-15 and 19): each is answered with a
located diagnostic (also with `--json`), never a traceback, a hang or a runaway allocation, and what is
accepted builds a package that agrees with the check.

- every arch is checked, and the generated config's archs and defaults are the values the check evaluated;
- recursion and deep nesting (fns, submodules), loop variables reused;
- big inputs stay near-linear (`extends` chains, long forwards) and absurd stacks are refused before any
  layer is instantiated, with parameter counts exact for what is accepted;
- names that collide with what generated code binds are refused (E012) with the reason, and a walk over the
  code of built packages proves that every name it binds is covered by `dslc/ir/names.py`;
- ties, `from_hf` keys, op operands and options, checkpoint `{i}` patterns, sizes in result types.

No assertion is on time; the big inputs are sized so the file runs in seconds.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dslc.api import check_source
from dslc.cli import main
from dslc.diagnostics import DslcError
from dslc.ir import names as reserved
from dslc.ir.lower import MAX_NESTING, MAX_REPEAT

ROOT = Path(__file__).resolve().parents[1]
PATH = "hostile.model"
QWEN2 = (ROOT / "models" / "qwen2.model").read_text()

BLOCK = """
module Block:
    w: [dim] = ones

    forward(x: [B, T, dim]) -> [B, T, dim]:
        return x * w
"""


def spec(config="", archs="", decls="", members="", body="", tail="", result="[B, T, vocab]") -> str:
    """A small valid spec with room for hostile parts."""
    return f"""use std

config C:
    dim: int = 32
    heads: int = 4
    vocab: int = 16
{config}
{archs}
{decls}
model M(C): causal_lm
    embed = Embedding(vocab, dim)
    head = Linear(dim, vocab)
{members}

    forward(input_ids: [B, T] i64) -> {result}:
        x = embed(input_ids)
{body}
        return head(x)
{tail}"""


def stack(n="2", name="layers"):
    """A `repeat` stack of Block, looped over in forward."""
    return dict(
        decls=BLOCK,
        members=f"    {name} = repeat({n}, Block())",
        body=f"        for layer in {name}:\n            x = layer(x)",
    )


def fn_chain(n: int) -> str:
    return (
        "".join(f"fn f{i}(x: [B, T, D]) -> [B, T, D]:\n    return f{i + 1}(x)\n\n" for i in range(n))
        + f"fn f{n}(x: [B, T, D]) -> [B, T, D]:\n    return x * 2.0\n"
    )


def module_chain(n: int) -> str:
    out = "".join(
        f"module N{i}:\n    inner = N{i + 1}()\n\n    forward(x: [B, T, dim]) -> [B, T, dim]:\n"
        f"        return inner(x)\n\n"
        for i in range(n)
    )
    return out + BLOCK.replace("module Block:", f"module N{n}:")


def assert_located(diag, text: str, path: str = PATH) -> None:
    s = diag.span
    assert s.file == path, diag
    lines = text.split("\n")
    assert 1 <= s.line <= len(lines), diag
    assert 1 <= s.col <= len(lines[s.line - 1]) + 1, diag
    assert diag.code[0] == "E" and diag.message and diag.message[0].islower() or diag.message[0] == "`", diag


def refused(text: str, arch=None, overrides=None, path: str = PATH) -> list:
    """The diagnostics of a spec that must fail the check; any other exception fails the test."""
    with pytest.raises(DslcError) as e:
        check_source(text, path, arch, overrides or {})
    for d in e.value.diagnostics:
        assert_located(d, text, path)
    return e.value.diagnostics


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


# ---- every hostile case: (id, spec text, --arch, --set, code, a fragment of its message) ------------------------

CASES = [
    # 11: every arch checked; a failing default under --set
    (
        "arch never selected fails",
        spec(archs='arch "bad": dim = 1 // 0'),
        None,
        {},
        "E021",
        "arch `bad`: division by zero",
    ),
    (
        "arch extending a failing arch",
        spec(archs='arch "bad": dim = 1 // 0\narch "child" extends "bad": heads = 2'),
        None,
        {},
        "E021",
        "division by zero",
    ),
    (
        "arch failing a require",
        spec(config='    require dim % heads == 0, "dim splits into heads"', archs='arch "odd": heads = 5'),
        None,
        {},
        "E020",
        "arch `odd`: requirement failed",
    ),
    (
        "arch value of the wrong type",
        spec(archs='arch "f": dim = 2.5'),
        None,
        {},
        "E021",
        "arch `f`: config field `dim` is int",
    ),
    (
        "failing default under --set",
        spec(config="    extra_dim: int = 1 % 0"),
        None,
        {"extra_dim": "8"},
        "E021",
        "division by zero",
    ),
    (
        "failing default under --arch",
        spec(config="    extra_dim: int = 1 % 0", archs='arch "a": extra_dim = 8'),
        "a",
        {},
        "E021",
        "division by zero",
    ),
    ("arch sets a field twice", spec(archs='arch "a": dim = 8, dim = 16'), None, {}, "E011", "sets `dim` twice"),
    # 12: recursion, depth, loop variables
    (
        "self-recursive fn",
        spec(decls="fn f(x: [B, T, D]) -> [B, T, D]:\n    return f(x)\n", body="        x = f(x)"),
        None,
        {},
        "E060",
        "fn `f` calls itself",
    ),
    (
        "mutually recursive fns",
        spec(
            decls="fn f(x: [B, T, D]) -> [B, T, D]:\n    return g(x)\n\n"
            "fn g(x: [B, T, D]) -> [B, T, D]:\n    return f(x)\n",
            body="        x = f(x)",
        ),
        None,
        {},
        "E060",
        "calls itself through others",
    ),
    (
        "unused recursive fn",
        spec(decls="fn f(x: [B, T, D]) -> [B, T, D]:\n    return f(x)\n"),
        None,
        {},
        "E060",
        "calls itself",
    ),
    (
        "300-deep fn chain",
        spec(decls=fn_chain(300), body="        x = f0(x)"),
        None,
        {},
        "E005",
        "fn calls nested more than",
    ),
    (
        "3000-deep module nesting",
        spec(decls=module_chain(3000), members="    n0 = N0()", body="        x = n0(x)"),
        None,
        {},
        "E005",
        "submodules nested more than",
    ),
    (
        "modules containing each other 20 deep",
        spec(
            decls=module_chain(20).replace("inner = N20()", "inner = N0()"),
            members="    n0 = N0()",
            body="        x = n0(x)",
        ),
        None,
        {},
        "E060",
        "contains itself",
    ),
    (
        "nested loop reusing its variable",
        spec(
            decls=BLOCK,
            members="    ls = repeat(2, Block())\n    ms = repeat(2, Block())",
            body="        for layer in ls:\n            for layer in ms:\n                x = layer(x)",
        ),
        None,
        {},
        "E011",
        "already the variable of an enclosing loop",
    ),
    # 13: absurd sizes refused before instantiation
    ("repeat(10**9)", spec(**stack("10**9")), None, {}, "E021", "repeat count 1,000,000,000 is too large"),
    ("--set num_hidden_layers=10**9 on qwen2", QWEN2, None, {"num_hidden_layers": "1000000000"}, "E021", "too large"),
    (
        "nested stacks over the tensor limit",
        spec(
            decls=BLOCK + "\nmodule Stack:\n    inner = repeat(100000, Block())\n\n"
            "    forward(x: [B, T, dim]) -> [B, T, dim]:\n"
            "        for b in inner:\n            x = b(x)\n        return x\n",
            members="    outer = repeat(100000, Stack())",
            body="        for s in outer:\n            x = s(x)",
        ),
        None,
        {},
        "E021",
        "weight tensors",
    ),
    # 15: ties and from_hf keys
    ("tie to itself", spec(members="    tie head.weight = head.weight"), None, {}, "E060", "tied to itself"),
    (
        "tie cycle",
        spec(
            members="    h2 = Linear(dim, vocab)\n    tie head.weight = h2.weight\n    tie h2.weight = head.weight",
            body="        _y = h2(x)",
        ),
        None,
        {},
        "E060",
        "form a cycle",
    ),
    (
        "two ties on one target",
        spec(
            members="    h2 = Linear(dim, vocab)\n    h3 = Linear(dim, vocab)\n"
            "    tie head.weight = h2.weight\n    tie head.weight = h3.weight",
            body="        _y = h2(x) + h3(x)",
        ),
        None,
        {},
        "E011",
        "tied twice",
    ),
    (
        "tie to a tied weight",
        spec(
            members="    h2 = Linear(dim, vocab)\n    h3 = Linear(dim, vocab)\n"
            "    tie head.weight = h2.weight\n    tie h2.weight = h3.weight",
            body="        _y = h2(x) + h3(x)",
        ),
        None,
        {},
        "E041",
        "is itself tied",
    ),
    (
        "tie in a repeated layer, unknown weight",
        spec(
            decls=BLOCK.replace("    w: [dim] = ones", "    w: [dim] = ones\n    tie w = nope"),
            members="    layers = repeat(3, Block())",
            body="        for layer in layers:\n            x = layer(x)",
        ),
        None,
        {},
        "E010",
        "tie names unknown weight `nope`",
    ),
    (
        "two from_hf lines with one key",
        spec(config="    from_hf n_embd -> dim\n    from_hf n_embd -> heads"),
        None,
        {},
        "E011",
        "config.json key `n_embd` is mapped twice",
    ),
    # 19: checker gaps found at run time
    ("tensor + list", spec(body="        x = x + [1, 2]"), None, {}, "E041", "got the list"),
    ("tensor * str", spec(body='        x = x * "s"'), None, {}, "E041", "got the string"),
    ("tensor + none", spec(body="        x = x + none"), None, {}, "E041", "got `none`"),
    ("unary op of a str", spec(body='        x = silu("s")'), None, {}, "E041", "must be a tensor"),
    ("where with a str branch", spec(body='        x = where(x > 0.0, x, "s")'), None, {}, "E041", ""),
    ("x @ 2.0", spec(body="        x = x @ 2.0"), None, {}, "E041", "`@` needs tensors on both sides"),
    ("dropout(x, 5.0)", spec(body="        x = dropout(x, 5.0)"), None, {}, "E041", "probability"),
    ("dropout(x, p = -0.1)", spec(body="        x = dropout(x, p = -0.1)"), None, {}, "E041", "probability"),
    (
        "normal(std = -1.0)",
        spec(members="    s: [dim] = normal(std = -1.0)", body="        x = x * s"),
        None,
        {},
        "E021",
        "must be a number >= 0",
    ),
    (
        'attention causal = "yes"',
        spec(
            decls="module A:\n    forward(x: [B, T, dim]) -> [B, T, dim]:\n"
            "        q = split_heads(x, heads)\n"
            '        return merge_heads(attention(q, q, q, causal = "yes"))\n',
            members="    a = A()",
            body="        x = a(x)",
        ),
        None,
        {},
        "E041",
        "causal must be true or false",
    ),
    (
        "attention without causal",
        spec(
            decls="module A:\n    forward(x: [B, T, dim]) -> [B, T, dim]:\n"
            "        q = split_heads(x, heads)\n"
            "        return merge_heads(attention(q, q, q))\n",
            members="    a = A()",
            body="        x = a(x)",
        ),
        None,
        {},
        "E040",
        "needs `causal = true` or `causal = false`",
    ),
    (
        "attention window = 0",
        spec(
            decls="module A:\n    forward(x: [B, T, dim]) -> [B, T, dim]:\n"
            "        q = split_heads(x, heads)\n"
            "        return merge_heads(attention(q, q, q, causal = true, window = 0))\n",
            members="    a = A()",
            body="        x = a(x)",
        ),
        None,
        {},
        "E041",
        "window must be a positive int",
    ),
    (
        "{i} twice in a checkpoint key",
        spec(**stack(), tail='checkpoint:\n    "h.{i}.{i}.w" -> "layers.{i}.w"\n'),
        None,
        {},
        "E050",
        "appears 2 times",
    ),
    (
        "{i} twice in an ignore pattern",
        spec(tail='checkpoint:\n    ignore "h.{i}.{i}"\n'),
        None,
        {},
        "E050",
        "appears 2 times",
    ),
    (
        "{i} only on the target side",
        spec(**stack(), tail='checkpoint:\n    "h.w" -> "layers.{i}.w"\n'),
        None,
        {},
        "E050",
        "has none to give it",
    ),
    (
        "{i} only on the source side",
        spec(**stack(), tail='checkpoint:\n    "h.{i}.w" -> "head.weight"\n'),
        None,
        {},
        "E050",
        "no parameter of the rule does",
    ),
    ("misspelt size in a result type", spec(result="[B, T, vocabb]"), None, {}, "E010", "unknown size `vocabb`"),
]


@pytest.mark.parametrize("name, text, arch, overrides, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_hostile_case_is_a_located_diagnostic(name, text, arch, overrides, code, fragment):
    diags = refused(text, arch, overrides)
    hits = [d for d in diags if d.code == code and fragment in d.message]
    assert hits, f"{name}: wanted {code} with {fragment!r}, got {[(d.code, d.message) for d in diags]}"


JSON_CASES = [c for c in CASES if c[4] in ("E005", "E060", "E011") or c[0].startswith("repeat")]


@pytest.mark.parametrize("name, text, arch, overrides, code, fragment", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_hostile_case_as_json(tmp_path, name, text, arch, overrides, code, fragment):
    path = tmp_path / "hostile.model"
    path.write_text(text)
    args = ["check", str(path), "--json"] + (["--arch", arch] if arch else [])
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    rc, out, err = run_main(*args)
    assert rc == 1 and err == "", err
    diags = json.loads(out)
    assert any(d["code"] == code and fragment in d["message"] for d in diags), diags
    assert all(d["file"] == str(path) and d["line"] >= 1 and d["column"] >= 1 for d in diags)


def test_hostile_cases_through_the_cli_never_print_a_traceback(tmp_path):
    for name, text, arch, overrides, _, _ in CASES:
        path = tmp_path / "c.model"
        path.write_text(text)
        args = (
            ["check", str(path)] + (["--arch", arch] if arch else []) + [f"--set={k}={v}" for k, v in overrides.items()]
        )
        rc, _, err = run_main(*args)
        assert rc == 1 and "Traceback" not in err and err.startswith("error["), (name, err)


# ---- 11: one evaluation of every arch, shared by the check and the generated config ------------------------------


def _config_module(files: dict[str, str], tmp_path: Path, name: str):
    """The generated config.py, imported on its own (it needs nothing but the standard library)."""
    path = tmp_path / f"{name}_config.py"
    path.write_text(files["config.py"])
    spec_ = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = module
    spec_.loader.exec_module(module)
    return module


def _render(text: str, tmp_path: Path, name: str, arch=None, overrides=None):
    from dslc.build import render

    path = tmp_path / f"{name}.model"
    path.write_text(text)
    _, files, checked = render(path, arch, overrides or {}, name)
    return files, checked


ARCH_CHAIN = spec(
    archs='arch "a": vocab = 100, dim = vocab * 2\narch "b" extends "a": heads = 8\narch "c" extends "b": vocab = 50'
)


def test_arch_values_are_evaluated_in_their_arch_and_shared_with_the_generated_config(tmp_path):
    files, _ = _render(ARCH_CHAIN, tmp_path, "chain")
    config = _config_module(files, tmp_path, "chain")
    for arch in ("a", "b", "c"):
        checked = check_source(ARCH_CHAIN, PATH, arch).program.config_values
        made = config.C.for_arch(arch)
        assert {k: getattr(made, k) for k in checked} == checked, arch
    assert config.C.for_arch("a").dim == 200 and config.C.for_arch("c").dim == 100


def test_build_overrides_become_the_generated_defaults(tmp_path):
    files, checked = _render(ARCH_CHAIN, tmp_path, "over", arch="b", overrides={"heads": "2", "dim": "64"})
    config = _config_module(files, tmp_path, "over")
    values = checked.program.config_values
    default = config.C()
    assert {k: getattr(default, k) for k in values} == values == {"dim": 64, "heads": 2, "vocab": 100}
    for arch in ("a", "b", "c"):  # for_arch starts from the spec's own defaults, not the build's
        want = check_source(ARCH_CHAIN, PATH, arch).program.config_values
        made = config.C.for_arch(arch)
        assert {k: getattr(made, k) for k in want} == want, arch
    assert json.loads(files["build.json"])["parameters"] == checked.program.param_count


def test_derived_field_follows_the_build_and_the_archs(tmp_path):
    text = spec(config="    head_dim: int = dim // heads", archs='arch "wide": dim = 64')
    files, _ = _render(text, tmp_path, "derived", overrides={"heads": "2"})
    config = _config_module(files, tmp_path, "derived")
    assert config.C().head_dim == 16  # 32 // 2: derived from the build's heads
    assert config.C.for_arch("wide").head_dim == 16 and config.C.for_arch("wide").heads == 4  # 64 // 4


@pytest.mark.parametrize("model", sorted(p.name for p in (ROOT / "models").glob("*.model")))
def test_shipped_archs_in_the_generated_config_equal_the_check(tmp_path, model):
    text = (ROOT / "models" / model).read_text()
    files, checked = _render(text, tmp_path, model.removesuffix(".model"))
    config = _config_module(files, tmp_path, model.removesuffix(".model"))
    cls = getattr(config, checked.program.config.name)
    for arch in cls.ARCHS:
        want = check_source(text, model, arch).program.config_values
        made = cls.for_arch(arch)
        assert {k: getattr(made, k) for k in want} == want, arch


def test_build_of_a_failing_arch_is_a_diagnostic_not_a_traceback(tmp_path):
    path = tmp_path / "bad.model"
    path.write_text(spec(archs='arch "bad": dim = 1 // 0'))
    rc, _, err = run_main("build", str(path), "-o", str(tmp_path / "out"))
    assert rc == 1 and "Traceback" not in err and "error[E021]: arch `bad`: division by zero" in err
    assert not (tmp_path / "out" / "bad").exists()


# ---- 13: near-linear checking; stacks; exact parameter counts -------------------------------------------------------


def test_long_extends_chain_checks(tmp_path):
    archs = "\n".join(
        ['arch "a0": dim = 8'] + [f'arch "a{i}" extends "a{i - 1}": vocab = {i + 2}' for i in range(1, 2000)]
    )
    text = spec(archs=archs)
    assert check_source(text, PATH, "a1999").program.config_values == {"dim": 8, "heads": 4, "vocab": 2001}


def test_long_forward_checks():
    checked = check_source(spec(body="\n".join("        x = x + x" for _ in range(20_000))), PATH)
    assert checked.program.param_count == 16 * 32 * 2


def test_stack_limits_and_exact_counts():
    big = check_source(spec(**stack(str(20_000))), PATH).program
    assert big.param_count == 16 * 32 * 2 + 20_000 * 32
    refused(spec(**stack(str(MAX_REPEAT + 1))))
    assert check_source(spec(**stack(str(MAX_REPEAT))), PATH).program.param_count == 16 * 32 * 2 + MAX_REPEAT * 32


def test_ties_inside_a_repeat_apply_to_every_layer():
    block = BLOCK.replace("    w: [dim] = ones", "    w: [dim] = ones\n    v: [dim] = ones\n    tie v = w")
    block = block.replace("return x * w", "return x * w * v")
    program = check_source(
        spec(
            decls=block,
            members="    layers = repeat(3, Block())",
            body="        for layer in layers:\n            x = layer(x)",
        ),
        PATH,
    ).program
    tied = {w.name: w.tied_to for w in program.weights if w.tied_to}
    assert tied == {f"layers.{i}.v": f"layers.{i}.w" for i in range(3)}
    assert program.param_count == 16 * 32 * 2 + 3 * 32


def test_nesting_at_the_limit_checks():
    checked = check_source(
        spec(decls=module_chain(MAX_NESTING - 2), members="    n0 = N0()", body="        x = n0(x)"), PATH
    )
    assert checked.program.param_count == 16 * 32 * 2 + 32
    check_source(spec(decls=fn_chain(MAX_NESTING - 1), body="        x = f0(x)"), PATH)


# ---- 14: reserved names ------------------------------------------------------------------------------------------------


def _with_name(role: str, name: str) -> str:
    if role == "module":
        return spec(
            decls=BLOCK.replace("module Block:", f"module {name}:"),
            members=f"    b = {name}()",
            body="        x = b(x)",
        )
    if role == "model":
        return spec().replace("model M(C)", f"model {name}(C)")
    if role == "config":
        return spec().replace("config C:", f"config {name}:").replace("model M(C)", f"model M({name})")
    if role == "fn":
        return spec(decls=f"fn {name}(t: [B, T, D]) -> [B, T, D]:\n    return t * 2.0\n", body=f"        x = {name}(x)")
    if role == "config field":
        return spec(config=f"    {name}: int = 3")
    if role == "model member":
        return spec(members=f"    {name} = Linear(dim, dim)", body=f"        x = {name}(x)")
    if role == "weight":
        return spec(
            decls=BLOCK.replace("w: [dim] = ones", f"{name}: [dim] = ones").replace("x * w", f"x * {name}"),
            members="    b = Block()",
            body="        x = b(x)",
        )
    if role == "parameter":
        return spec(
            decls=f"module P({name}: float = 2.0):\n    forward(x: [B, T, dim]) -> [B, T, dim]:\n"
            f"        return x * {name}\n",
            members="    p = P()",
            body="        x = p(x)",
        )
    raise AssertionError(role)


RESERVED = (
    [
        ("module", n)
        for n in (
            "torch",
            "nn",
            "F",
            "kernels",
            "attention",
            "config",
            "PreTrainedModel",
            "self",
            "_",
            "checkpoint_call",
            "fused_linear",
            "modeling",
            "outputs",
            "json",
        )
    ]
    + [("model", "super"), ("model", "range"), ("model", "ConfigError")]
    + [("config", n) for n in ("fields", "json", "Path", "dataclass", "field", "ClassVar", "annotations")]
    + [("fn", n) for n in ("torch", "attention", "super", "isinstance", "self")]
    + [
        ("config field", n)
        for n in (
            "extra",
            "to_dict",
            "for_arch",
            "from_dict",
            "from_pretrained",
            "TYPES",
            "ARCHS",
            "ALIASES",
            "field",
            "dict",
            "classmethod",
            "dtype",
            "architectures",
        )
    ]
    + [
        ("model member", n)
        for n in (
            "generate",
            "from_pretrained",
            "register_forward_hook",
            "save_pretrained",
            "forward_graph",
            "tied",
            "kv_cache",
            "tie_weights",
            "task",
            "config",
            "state_dict",
            "loss_head",
            "forward_hidden",
            "_parameters",
            "decode_step",
            "gradient_checkpointing",
        )
    ]
    + [("weight", n) for n in ("tied", "kv_cache", "register_forward_hook", "reset_parameters", "training", "_modules")]
    + [("parameter", n) for n in ("self", "config", "training", "tied", "torch", "Block")]
)


@pytest.mark.parametrize("role, name", RESERVED, ids=[f"{r}-{n}" for r, n in RESERVED])
def test_reserved_name_is_refused_with_the_reason(role, name):
    text = (
        _with_name(role, name)
        if role != "parameter" or name != "Block"
        else _with_name(role, name).replace("module P(", BLOCK + "\nmodule P(")
    )
    diags = refused(text)
    assert any(d.code == "E012" and f"`{name}`" in d.message for d in diags), [(d.code, d.message) for d in diags]


@pytest.mark.parametrize(
    "role", ["module", "model", "config", "fn", "config field", "model member", "weight", "parameter"]
)
def test_ordinary_names_in_each_role_check_clean(role):
    check_source(_with_name(role, "proj2"), PATH)


def test_forward_flags_read_from_the_config_must_be_bool():
    assert check_source(spec(config="    output_hidden_states: bool = false"), PATH)
    diags = refused(spec(config="    return_dict: int = 1"))
    assert diags[0].code == "E021" and "must be bool" in diags[0].message


@pytest.mark.parametrize("name", ["json", "torch", "math", "typing", "safetensors"])
def test_package_name_shadowing_an_import_is_e070(tmp_path, name):
    rc, _, err = run_main("build", str(ROOT / "models" / "qwen2.model"), "--name", name, "-o", str(tmp_path))
    assert rc == 1 and err.startswith(f"error[E070]: package name `{name}` would shadow")
    assert not any(tmp_path.iterdir())


def test_spec_file_name_shadowing_an_import_is_e070(tmp_path):
    path = tmp_path / "json.model"
    path.write_text(spec())
    rc, _, err = run_main("build", str(path), "-o", str(tmp_path / "out"))
    assert rc == 1 and err.startswith("error[E070]") and "from the file name" in err


# ---- 14: every name the generated code binds is covered ------------------------------------------------------------


def _spec_names(program) -> tuple[set[str], dict[str, set[str]]]:
    """The spec's own declarations, and per module its members and parameters (what generated code binds for it)."""
    decls = {m.name for m in program.modules} | {f.name for f in program.fns} | {program.config.name}
    members = {}
    for m in program.modules:
        own = {w.name for w in m.weights} | {s.name for s in m.submodules} | {p.name for p in m.params}
        own |= {f"{p.name}_value" for p in m.params} | {fused for fused, _ in m.projection_groups}
        members[m.name] = own
    return decls, members


def _module_level(tree: ast.Module) -> set[str]:
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out


def _loaded_globals(fn: ast.FunctionDef) -> set[str]:
    """Names a function reads that are not its own locals (module-level names and builtins)."""
    local = {a.arg for a in fn.args.args + fn.args.kwonlyargs} | {
        n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    return {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - local


WALKED = ["qwen2.model", "gpt2.model", "bert.model", "llama.model"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(program, {file: ast}) of each shipped spec's package (rendered, not imported)."""
    from dslc.build import render

    out = []
    for model in WALKED:
        _, files, checked = render(ROOT / "models" / model, None, {}, None)
        trees = {name: ast.parse(text) for name, text in files.items() if name.endswith(".py")}
        out.append((checked.optimized.program, trees, files))
    return out


def test_module_level_names_of_generated_files_are_reserved_for_declarations(generated):
    for program, trees, _ in generated:
        decls, _ = _spec_names(program)
        for file in ("modeling.py", "config.py", "__init__.py"):
            tree = trees[file]
            bound = _module_level(tree) - decls
            loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            used_builtins = {n for n in loaded if hasattr(builtins, n)}
            for name in bound | used_builtins:
                if name.startswith("__"):
                    continue
                for role in ("module", "fn", "config"):
                    assert reserved.identifier_problem(name, role=role), (
                        f"{file} binds `{name}`: not reserved for {role}"
                    )


def test_package_files_are_reserved_for_exported_classes(generated):
    for _, _, files in generated:
        stems = {Path(f).stem for f in files if f.endswith(".py")}
        assert stems <= reserved.PACKAGE_FILES | {"__init__"}, stems - reserved.PACKAGE_FILES
        for stem in stems - {"__init__"}:
            assert reserved.identifier_problem(stem, role="module"), stem


def test_attributes_generated_modules_bind_are_reserved_for_members(generated):
    # torch's own nn.Module, from a fresh process: transformers patches names onto it at run time (`smart_apply`)
    probe = "import json, torch; print(json.dumps(sorted(set(dir(torch.nn.Module)) | set(vars(torch.nn.Module())))))"
    fresh = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    nn_names = {n for n in json.loads(fresh.stdout) if not n.startswith("__")}
    assert nn_names <= reserved.MODULE_ATTRIBUTES, sorted(nn_names - reserved.MODULE_ATTRIBUTES)
    for program, trees, _ in generated:
        decls, members = _spec_names(program)
        for cls in (n for n in trees["modeling.py"].body if isinstance(n, ast.ClassDef)):
            is_model = cls.name == program.model
            own = members.get(cls.name, set())
            bound = {
                n.attr
                for n in ast.walk(cls)
                if isinstance(n, ast.Attribute)
                and isinstance(n.ctx, ast.Store)
                and isinstance(n.value, ast.Name)
                and n.value.id == "self"
            }
            bound |= {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
            bound |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
            for name in bound - own:
                if name.startswith("__"):
                    continue
                for role in ("weight", "submodule"):
                    assert reserved.identifier_problem(name, role=role, is_model=is_model), (
                        f"{cls.name} binds self.{name}: not reserved for a {role}"
                    )
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                for arg in fn.args.args:  # generated parameters of generated methods
                    if arg.arg not in own and fn.name == "__init__":
                        assert reserved.identifier_problem(arg.arg, role="parameter"), f"__init__ takes `{arg.arg}`"
                for name in _loaded_globals(fn):  # forward arguments are bound as they are: none may hide these
                    if name in decls:
                        continue
                    assert reserved.identifier_problem(name, role="argument"), f"{cls.name}.{fn.name} reads `{name}`"
        tree = ast.parse((Path(reserved.__file__).parents[2] / "templates" / "package" / "model_base.py").read_text())
        base = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PreTrainedModel")
        for item in base.body:
            name = item.name if isinstance(item, ast.FunctionDef) else None
            if name and not name.startswith("__"):
                assert reserved.identifier_problem(name, role="submodule", is_model=True), name


def test_config_class_members_are_reserved_for_fields(generated):
    for program, trees, _ in generated:
        fields = {f.name for f in program.config.fields}
        cls = next(n for n in trees["config.py"].body if isinstance(n, ast.ClassDef) and n.name == program.config.name)
        bound = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
        bound |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        bound |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        # names the class body reads while the class is created (decorators, defaults, annotations aside)
        for n in cls.body:
            if isinstance(n, ast.FunctionDef):
                bound |= {d.id for d in n.decorator_list if isinstance(d, ast.Name)}
            elif isinstance(n, ast.AnnAssign) and n.value is not None:
                bound |= {x.id for x in ast.walk(n.value) if isinstance(x, ast.Name)}
        for name in bound - fields:
            if not name.startswith("__"):
                assert reserved.identifier_problem(name, role="config field"), f"config class binds `{name}`"


def test_imports_of_generated_files_are_reserved_package_names(generated):
    for _, trees, _ in generated:
        for file, tree in trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = {node.module.split(".")[0]}
                else:
                    continue
                for top in tops - {"__future__"}:
                    assert reserved.package_name_problem(top), f"{file} imports {top}: not a reserved package name"


def test_check_does_not_import_torch():
    code = (
        "import sys; from dslc.api import check_file; from dslc.ir import names; "
        "names.model_members(); names.config_members(); check_file('models/qwen2.model'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "spec,key,value",
    [
        ("qwen2", "rms_norm_eps", "-1"),
        ("qwen2", "rms_norm_eps", "0"),
        ("qwen2", "rope_theta", "-5"),
        ("llama", "rms_norm_eps", "-1e-6"),
        ("gpt2", "layer_norm_epsilon", "-1e-5"),
        ("bert", "layer_norm_eps", "0"),
    ],
)
def test_shipped_specs_refuse_nonpositive_epsilons_and_bases(spec, key, value):
    """A negative epsilon or rotary base computes NaN logits: the shipped specs `require` them positive (E020)."""
    from dslc.api import check_file
    from dslc.diagnostics import DslcError

    with pytest.raises(DslcError) as err:
        check_file(ROOT / "models" / f"{spec}.model", overrides={key: value})
    assert [d.code for d in err.value.diagnostics] == ["E020"] and key in err.value.diagnostics[0].message
