"""Robustness: no input, however broken, gets anything out of the compiler but a result or a located DslcError.

Two parts:
- hostile inputs written by hand (empty, binary, NUL, Latin-1, UTF-16, 5000-deep nesting, a 40k-char line, ...),
  each answered with located diagnostics in well under a second;
- Hypothesis: (a) programs composed from the grammar's constructs with random names, numbers, operators and
  indentation, and random token soups; (b) mutations of models/*.model and the standard library (lines
  deleted, duplicated, swapped, re-indented, characters inserted, text truncated).
The property: `check_source(text, path)` returns, or raises DslcError whose every diagnostic has a span with
1 <= line <= lines in the file and 1 <= col <= that line's length + 1. Runs are derandomized (CI is deterministic).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslc.api import check_source, parse_std
from dslc.diagnostics import DslcError
from dslc.resources import std_path
from dslc.syntax.parser import decode_source, parse_text

ROOT = Path(__file__).resolve().parents[1]
PATH = "fuzz.model"
STD_TEXT = std_path().read_text()
SOURCES = [p.read_text() for p in sorted((ROOT / "models").glob("*.model"))] + [STD_TEXT]

FUZZ = settings(
    max_examples=30,
    deadline=10_000,  # a hang guard, not a speed test (small, busy CI machines)
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def assert_located(diag, text: str, path: str = PATH) -> None:
    s = diag.span
    if s.file == str(std_path()):  # a spec may break the std library it uses (e.g. by redefining Linear)
        text = STD_TEXT
    else:
        assert s.file == path, diag
    lines = text.split("\n")
    assert 1 <= s.line <= len(lines), f"line out of range: {diag}"
    assert 1 <= s.col <= len(lines[s.line - 1]) + 1, f"column out of range: {diag} (line {lines[s.line - 1]!r})"
    assert (s.end_line, s.end_col) >= (s.line, s.col), diag
    assert diag.code[0] in "EW" and diag.message, diag


HANG_GUARD_S = 10.0  # catches hangs and runaway backtracking, not speed: CI machines are small and busy


def outcome(text: str, path: str = PATH, limit_s: float = HANG_GUARD_S):
    """Check `text`; returns the DslcError or None. Any other exception fails the test."""
    start = time.perf_counter()
    try:
        check_source(text, path)
        err = None
    except DslcError as e:
        assert e.diagnostics, "a DslcError without diagnostics"
        for d in e.diagnostics:
            assert_located(d, text, path)
        err = e
    elapsed = time.perf_counter() - start
    assert elapsed < limit_s, f"took {elapsed:.2f}s"
    return err


def codes(err) -> list[str]:
    return [d.code for d in err.diagnostics]


@pytest.fixture(scope="module", autouse=True)
def _warm():
    parse_std()  # parse the std library once, outside the timed calls


# ---- hand-written hostile inputs ----------------------------------------------------------------


QWEN = (ROOT / "models" / "qwen2.model").read_text()


HOSTILE_TEXTS = [
    ("empty", "", "E014"),
    ("whitespace only", "   \n\n      \n  ", "E014"),
    ("comments only", "# nothing\n   # here\n", "E014"),
    ("5000-deep parens", "config C:\n    x: int = " + "(" * 5000 + "1" + ")" * 5000 + "\n", "E005"),
    ("5000-deep brackets", "config C:\n    x: int = " + "[" * 5000 + "]" * 5000 + "\n", "E005"),
    ("5000 unary minus", "config C:\n    x: int = " + "- " * 5000 + "x\n", "E005"),
    ("5000 not", "config C:\n    x: bool = " + "not " * 5000 + "true\n", "E005"),
    ("40k-char sum", "config C:\n    x: int = " + " + ".join(["1"] * 10000) + "\n", "E005"),
    ("40k-char string", 'config C:\n    x: str = "' + "a" * 40000 + '"\n', "E014"),
    ("40k-digit number", "config C:\n    x: int = " + "9" * 40000 + "\n", "E001"),
    ("40k-char name", "config C:\n    " + "a" * 40000 + ": int = 1\n", "E014"),
    ("tab indentation", "config C:\n\tx: int = 1\n", "E004"),
    ("mixed tabs and spaces", "config C:\n    x: int = 1\n  \t  y: int = 2\n", "E004"),
    ("unterminated string", 'config C:\n    x: str = "abc\n', "E001"),
    ("unterminated string at end", 'config C:\n    x: str = "abc', "E001"),
    ("unclosed bracket at EOF", "config C:\n    x: int = (1 + 2\n", "E002"),
    ("unclosed bracket then more lines", "config C:\n    x: int = f(1,\n    y: int = 2\n", "E001"),
    ("dedent to unknown level", "config C:\n        x: int = 1\n    y: int = 2\n", "E004"),
    ("unexpected indent", "config C:\n    x: int = 1\n        y: int = 2\n", "E001"),
    ("indentation too deep", "config C:\n" + " " * 400 + "x: int = 1\n", "E005"),
    ("lone carriage returns", "config C:\r    x: int = 1\r", "E001"),
    ("unicode identifiers", "config C:\n    größe: int = 1\n", "E001"),
    ("control characters", "config C:\n    x: int = 1\x0b\x0c\n", "E001"),
    ("only a keyword", "model", "E001"),
    ("stray closer", ")\n", "E001"),
    ("huge float", "config C:\n    x: float = 1e999\n", "E001"),
    (
        "float overflow",
        "config C:\n    x: float = 10.0 ** 400\nmodel M(C): base\n    forward(x: [B]) -> [B]:\n        return x\n",
        "E021",
    ),
]


@pytest.mark.parametrize("name, text, code", HOSTILE_TEXTS, ids=[case[0] for case in HOSTILE_TEXTS])
def test_hostile_text(name, text, code):
    err = outcome(text)
    assert err is not None and codes(err)[0] == code, (name, err)


def test_crlf_line_endings_check_clean():
    assert outcome(QWEN.replace("\n", "\r\n")) is None


def test_no_trailing_newline_checks_clean():
    assert outcome(QWEN.rstrip("\n")) is None


def test_crlf_error_is_located():
    text = QWEN.replace("hidden_size: int = 896", "hidden_size: int = 896 +").replace("\n", "\r\n")
    err = outcome(text)
    d = err.diagnostics[0]
    assert d.code == "E001" and text.split("\n")[d.span.line - 1].startswith("    hidden_size")


def decoded_outcome(data: bytes):
    start = time.perf_counter()
    try:
        text = decode_source(data, PATH)
    except DslcError as e:
        assert time.perf_counter() - start < 1.0
        for d in e.diagnostics:
            s = d.span
            lines = data.split(b"\n")
            assert 1 <= s.line <= len(lines) and 1 <= s.col <= len(lines[s.line - 1]) + 1, d
        return e
    return outcome(text)


HOSTILE_BYTES = [
    ("random bytes", bytes(random.Random(0).randrange(256) for _ in range(4000)), "not valid UTF-8"),
    ("NUL byte", b"config C:\n    x: int = 1\x00\n", "NUL byte"),
    ("NUL bytes only", b"\x00" * 64, "NUL byte"),
    ("Latin-1", "config C:\n    x: int = 1  # café\n".encode("latin-1"), "not valid UTF-8"),
    ("UTF-16 with BOM", QWEN.encode("utf-16"), "UTF-16"),
    ("UTF-16 big-endian BOM", "config C:\n".encode("utf-16-be").join([b"\xfe\xff", b""]), "UTF-16"),
    ("truncated UTF-8", 'config C:\n    x: str = "é'.encode()[:-1], "not valid UTF-8"),
]


@pytest.mark.parametrize("name, data, message", HOSTILE_BYTES, ids=[case[0] for case in HOSTILE_BYTES])
def test_hostile_bytes(name, data, message):
    err = decoded_outcome(data)
    assert err is not None and err.diagnostics[0].code == "E003" and message in err.diagnostics[0].message


def test_utf8_bom_is_accepted():
    assert decoded_outcome(b"\xef\xbb\xbf" + QWEN.encode()) is None


def test_error_positions_in_nul_file():
    err = decoded_outcome(b"config C:\n    x: int\x00 = 1\n")
    assert (err.diagnostics[0].span.line, err.diagnostics[0].span.col) == (2, 11)


def test_all_random_byte_strings_are_refused_or_checked():
    rng = random.Random(1)
    for _ in range(30):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        decoded_outcome(data)
    for _ in range(30):  # printable ASCII soup
        data = bytes(rng.choice(b' \n()[]:=,.+-*/#"abcxyz0123456789') for _ in range(rng.randrange(1, 300)))
        decoded_outcome(data)


# ---- (a) grammar-derived programs ---------------------------------------------------------------

KEYWORDS = """use config arch extends module model fn forward return for in tie if else and or not true false none
    from_hf require checkpoint ignore train parallel activation_checkpointing repeat""".split()
POOL = """x y h dim heads vocab B T D w proj Linear RMSNorm Embedding split_heads silu attention cast f32 i64 bf16
    int float bool str training class __x _t layers layer weight bias std causal_lm C M""".split()

names = st.one_of(st.sampled_from(POOL), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True))
numbers = st.one_of(
    st.integers(-3, 300).map(str),
    st.sampled_from(["0", "1_000", "1e-6", "0.5", ".5", "2.", "1e999", "99999999999999999999", "-1"]),
)
atoms = st.one_of(names, numbers, st.sampled_from(['"s"', '"a{i}.b"', "true", "false", "none", "..."]))
OPS = ["+", "-", "*", "/", "//", "%", "@", "**", "==", "!=", "<", ">=", "and", "or"]


def _compound(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(OPS), children).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        children.map(lambda c: f"-{c}"),
        children.map(lambda c: f"not {c}"),
        children.map(lambda c: f"({c})"),
        st.tuples(children, children, children).map(lambda t: f"{t[0]} if {t[1]} else {t[2]}"),
        st.tuples(names, st.lists(children, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        st.tuples(names, children, names, children).map(lambda t: f"{t[0]}({t[1]}, {t[2]} = {t[3]})"),
        st.lists(children, max_size=3).map(lambda xs: f"[{', '.join(xs)}]"),
        children.map(lambda c: f"{c}.dtype"),
    )


exprs = st.recursive(atoms, _compound, max_leaves=12)
shapes = st.lists(st.one_of(names, numbers, st.just("..."), exprs), max_size=4).map(lambda ds: f"[{', '.join(ds)}]")
dtypes = st.sampled_from(["", " f32", " i64", " bf16", " bool", " float", " int8"])
indents = st.sampled_from([4, 4, 4, 4, 8, 2, 0, 6])


def _line(indent: int, text: str) -> str:
    return " " * indent + text


config_lines = st.one_of(
    st.tuples(names, st.sampled_from(["int", "float", "bool", "str", "int?", "tensor"]), exprs).map(
        lambda t: f"{t[0]}: {t[1]} = {t[2]}"
    ),
    st.tuples(names, st.sampled_from(["int", "float?"])).map(lambda t: f"{t[0]}: {t[1]}"),
    st.tuples(names, names).map(lambda t: f"from_hf {t[0]} -> {t[1]}"),
    exprs.map(lambda e: f'require {e}, "msg"'),
    exprs.map(lambda e: f"require {e}"),
)
member_lines = st.one_of(
    st.tuples(
        names,
        shapes,
        dtypes,
        st.sampled_from(["", " = zeros", " = ones", " = normal(std = 0.02)", " = xavier"]),
        st.sampled_from(["", " if bias"]),
    ).map(lambda t: f"{t[0]}: {t[1]}{t[2]}{t[3]}{t[4]}"),
    st.tuples(names, names, st.lists(exprs, max_size=3)).map(lambda t: f"{t[0]} = {t[1]}({', '.join(t[2])})"),
    st.tuples(names, exprs, names).map(lambda t: f"{t[0]} = repeat({t[1]}, {t[2]}())"),
    st.tuples(names, names).map(lambda t: f"tie {t[0]}.weight = {t[1]}.weight"),
)
stmt_lines = st.one_of(
    st.tuples(names, exprs).map(lambda t: f"{t[0]} = {t[1]}"),
    st.tuples(names, names, exprs).map(lambda t: f"{t[0]}, {t[1]} = {t[2]}"),
    st.lists(exprs, min_size=1, max_size=2).map(lambda es: "return " + ", ".join(es)),
    st.tuples(names, names).map(lambda t: f"for {t[0]} in {t[1]}:"),
)
args = st.lists(st.tuples(names, shapes, dtypes).map(lambda t: f"{t[0]}: {t[1]}{t[2]}"), max_size=3)


@st.composite
def block(draw):
    kind = draw(st.sampled_from(["use", "config", "arch", "module", "model", "fn", "checkpoint", "train"]))
    ind = draw(indents)
    if kind == "use":
        return [f"use {draw(names)}"]
    if kind == "arch":
        ovs = draw(st.lists(st.tuples(names, exprs).map(lambda t: f"{t[0]} = {t[1]}"), max_size=3))
        base = draw(st.sampled_from(["", ' extends "a"', ' extends "b"']))
        return [f'arch "{draw(st.sampled_from(["a", "b", "c"]))}"{base}: {", ".join(ovs)}']
    if kind == "config":
        body = draw(st.lists(config_lines, min_size=1, max_size=5))
        return [f"config {draw(names)}:"] + [_line(draw(indents) if draw(st.booleans()) else ind, b) for b in body]
    if kind == "checkpoint":
        rules = draw(
            st.lists(
                st.sampled_from(
                    [
                        '"a.{i}.w" -> "b.{i}.w"',
                        '"a", "b" -> concat(dim = 0) -> "c"',
                        '"c" -> split(dim = 0) -> "a", "b"',
                        '"w" -> transpose() -> "v"',
                        'ignore "x.*"',
                        '"w" -> bogus(1) -> "v"',
                    ]
                ),
                min_size=1,
                max_size=3,
            )
        )
        return ["checkpoint:"] + [_line(ind, r) for r in rules]
    if kind == "train":
        items = draw(
            st.lists(
                st.one_of(
                    names.map(lambda n: f"activation_checkpointing {n}"),
                    st.tuples(names, names).map(lambda t: f'parallel "{t[0]}" -> {t[1]}'),
                ),
                min_size=1,
                max_size=3,
            )
        )
        return ["train:"] + [_line(ind, i) for i in items]
    sig = f"({', '.join(draw(args))})" + draw(st.sampled_from(["", " -> [B, T, dim]", " -> ([B] i64, [B])"]))
    stmts = draw(st.lists(stmt_lines, min_size=1, max_size=5))
    body = []
    depth = 2 * ind if kind != "fn" else ind
    for s in stmts:
        body.append(_line(depth, s))
        if s.endswith(":"):
            depth += 4 if draw(st.booleans()) else draw(indents)
    if kind == "fn":
        return [f"fn {draw(names)}{sig}:"] + body
    head = (
        f"module {draw(names)}" + draw(st.sampled_from(["", "(dim: int)", "(n: int = 2, bias: bool = false)"]))
        if kind == "module"
        else f"model {draw(names)}({draw(names)}): {draw(st.sampled_from(['causal_lm', 'base', 'xyz']))}"
    )
    members = [_line(ind, m) for m in draw(st.lists(member_lines, max_size=4))]
    return [head + ":"] + members + [_line(ind, f"forward{sig}:")] + body


@st.composite
def programs(draw):
    blocks = draw(st.lists(block(), min_size=1, max_size=5))
    lines = ["use std"] if draw(st.booleans()) else []
    for b in blocks:
        lines += b
        if draw(st.booleans()):
            lines.append("")
    sep = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    text = sep.join(lines)
    return text + (sep if draw(st.booleans()) else "")


@FUZZ
@given(programs())
def test_fuzz_grammar_programs(text):
    outcome(text)


TOKENS = KEYWORDS + POOL + OPS + '( ) [ ] : , = -> . ... ? # "s" 1 2.5 \''.split()
TOKENS += ["\n", "\n    ", "\n        ", "\n  ", "\\\n"]  # newlines, indentation, a line continuation


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=60), st.sampled_from([" ", ""]))
def test_fuzz_token_soup(tokens, sep):
    outcome(sep.join(tokens))


# ---- (b) mutations of real specs --------------------------------------------------------------------

MUTATIONS = "delete duplicate swap insert indent dedent truncate replace_char tabify join split".split()


@st.composite
def mutated_sources(draw):
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        op = draw(st.sampled_from(MUTATIONS))
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = " " * draw(st.integers(1, 8)) + lines[i]
        elif op == "dedent":
            lines[i] = lines[i][draw(st.integers(1, 8)) :]
        elif op == "tabify":
            lines[i] = "\t" + lines[i].lstrip(" ")
        elif op == "join" and i + 1 < len(lines):
            lines[i : i + 2] = [lines[i] + " " + lines[i + 1].lstrip()]
        elif op == "split" and lines[i]:
            k = draw(st.integers(0, len(lines[i])))
            lines[i : i + 1] = [lines[i][:k], lines[i][k:]]
        text = "\n".join(lines)
        pos = draw(st.integers(0, len(text)))
        if op == "insert":
            text = (
                text[:pos]
                + draw(
                    st.text(alphabet=st.sampled_from(list("()[]:,=.+-*#\"'\\ \n\tx1_?@~é\x00")), min_size=1, max_size=4)
                )
                + text[pos:]
            )
        elif op == "truncate":
            text = text[:pos]
        elif op == "replace_char" and text:
            pos = min(pos, len(text) - 1)
            text = text[:pos] + draw(st.sampled_from(list("x1 (:\n-"))) + text[pos + 1 :]
    return text


@settings(FUZZ, max_examples=60)
@given(mutated_sources())
def test_fuzz_mutated_specs(text):
    outcome(text)


@FUZZ
@given(st.sampled_from(SOURCES), st.data())
def test_fuzz_std_and_specs_parse_after_word_swaps(text, data):
    """Swap one identifier for another: most results parse; lowering and checking must stay well-behaved."""
    words = sorted({w for w in text.replace("(", " ").replace(")", " ").replace(",", " ").split() if w.isidentifier()})
    a = data.draw(st.sampled_from(words))
    b = data.draw(st.sampled_from(words + POOL))
    outcome(text.replace(a, b, data.draw(st.integers(1, 3))))


def test_models_and_std_parse():
    for text in SOURCES:
        parse_text(text, PATH)
