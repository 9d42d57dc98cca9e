"""No spec text can inject code: adversarial docs (every place a doc reaches generated code), arch names and
spec file names are built into packages; each package imports and runs forward in a fresh process, and the
marker file every payload tries to create never appears."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dslc.build import build

# each payload tries to end the comment or docstring it lands in and run `open(MARKER, "w")`
CODE = '__import__("builtins").open(__import__("os").environ["DSLC_MARKER"], "w")'
PAYLOADS = {
    "cr": f"doc\r{CODE}",
    "cr_indented": f"doc\r    {CODE}",
    "line_separator": f"doc\u2028{CODE}",
    "paragraph_separator": f"doc\u2029{CODE}",
    "form_feed": f"doc\x0c{CODE}",
    "vertical_tab": f"doc\x0b{CODE}",
    "next_line": f"doc\x85{CODE}",
    "triple_quote": f'doc """; {CODE}; """',
    "triple_quote_end": f'doc """\r{CODE}\r"""',
    "single_triple_quote": f"doc '''; {CODE}; '''",
    "backslashes": r"see C:\Users\N\x here \N and \u12 and \ ",
    "trailing_backslash": "ends in a backslash \\",
    "quote_at_end": 'ends in a quote "',
    "bidi": "access \u202e } \u2066 if admin \u2069 \u2067 begin",
    "nul_like_controls": "bell \x07 escape \x1b[31m red",
}

SPEC = """use std

# {p}
config C:
    vocab_size: int = 16   # {p}
    dim: int = 8           # {p}

# {p}
arch "{arch}": dim = 8

# {p}
fn flip(x: [B, T, D]) -> [B, T, D]:
    return transpose(transpose(x, 1, 2), 1, 2)

# {p}
module Block:
    scale: [dim] = ones    # {p}
    norm = RMSNorm(dim)    # {p}

    # {p}
    forward(x: [B, T, dim]) -> [B, T, dim]:
        return norm(flip(x) * scale)   # {p}

# {p}
model M(C): base
    embed = Embedding(vocab_size, dim)   # {p}
    block = Block()                      # {p}

    forward(input_ids: [B, T] i64) -> [B, T, dim]:
        return block(embed(input_ids))
"""

FILE_NAMES = {
    "quotes": 'x"""+__import__("os")+""".model',
    "cr": "x\rimport os.model",
    "newline": "x\nimport os.model",
    "bidi": "x\u202eledom.model",
    "backslash": "x\\N.model",
}

RUN = textwrap.dedent("""
    import importlib, sys, torch
    sys.path.insert(0, sys.argv[1])
    for name in sys.argv[2:]:
        pkg = importlib.import_module(name)
        model = pkg.M(pkg.C())
        out = model(input_ids=torch.zeros(1, 3, dtype=torch.long)).last_hidden_state
        assert out.shape == (1, 3, 8), out.shape
        pkg.C.for_arch(list(pkg.C.ARCHS)[0])
    print("ok", len(sys.argv) - 2)
""")


def _arch_name(payload: str) -> str:
    """The payload as the content of a DSL string literal (its escapes are JSON's), so the arch name holds it."""
    return json.dumps(payload)[1:-1]


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("marker") / "PWNED"


def _import_all(out: Path, names: list[str], marker: Path) -> None:
    env = {**__import__("os").environ, "DSLC_MARKER": str(marker)}
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(out), *names], capture_output=True, text=True, env=env, cwd=out, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"ok {len(names)}"
    assert not marker.exists(), "a payload ran when the package was imported or run"


def test_adversarial_docs_and_arch_names_never_run(tmp_path, marker):
    out = tmp_path / "build"
    names = []
    for key, payload in PAYLOADS.items():
        spec = tmp_path / f"{key}.model"
        spec.write_bytes(SPEC.format(p=payload, arch=_arch_name(payload)).encode("utf-8"))
        build(spec, out, name=f"inj_{key}")
        names.append(f"inj_{key}")
        for path in (out / f"inj_{key}").glob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert not any(ch in text for ch in "\r\x0b\x0c\x85\u2028\u2029\u202e\u2066"), f"{path.name}: {key}"
    _import_all(out, names, marker)


@pytest.mark.parametrize("key", list(FILE_NAMES))
def test_adversarial_spec_file_names_never_run(tmp_path, marker, key):
    spec = tmp_path / FILE_NAMES[key]
    spec.write_text(SPEC.format(p="plain", arch="a"), encoding="utf-8")
    out = tmp_path / "build"
    target = build(spec, out, name="inj_file")
    assert (target / "spec.model").read_text(encoding="utf-8") == spec.read_text(encoding="utf-8")
    _import_all(out, ["inj_file"], marker)
