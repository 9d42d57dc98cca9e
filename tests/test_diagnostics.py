"""Golden diagnostics: every `tests/ui/<name>.model` fails (or warns) exactly as annotated.

A case marks each line a diagnostic must point at with `# ERROR E0xx` or `# WARNING W00x`; an optional
`# dslc-args: --arch a --set k=v` line gives the command-line arguments. The test runs
`dslc check tests/ui/<name>.model ARGS` from the repo root and checks
- the reported (code, line) pairs equal the annotations (from `--json`),
- stderr equals `tests/ui/<name>.stderr` byte for byte (regenerate with `python3 scripts/bless_ui.py`),
- every rendered diagnostic has a location and a caret line.
Every code the compiler can emit has at least one case; docs/errors.md documents each of them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "tests" / "ui"

_spec = importlib.util.spec_from_file_location("bless_ui", ROOT / "scripts" / "bless_ui.py")
bless_ui = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bless_ui)

CASES = sorted(UI.glob("*.model"))
CODE_RE = re.compile(r'"([EW]0\d\d)"')
# codes with no .model case, and where they are covered instead
COVERED_ELSEWHERE = {
    "E000": "tests/test_cli_check.py::test_unreadable_file_is_e000",  # no file to annotate
    "E070": "tests/test_cli_check.py::test_bad_package_name_is_e070",  # a `dslc build` error
}


def emitted_codes() -> set[str]:
    """Every diagnostic code that appears as a string literal in the compiler's source."""
    codes = set()
    for py in (ROOT / "dslc").rglob("*.py"):
        codes |= set(CODE_RE.findall(py.read_text()))
    return codes


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_ui_case(case: Path):
    rc, stderr, diags = bless_ui.run_case(case)
    want = bless_ui.annotations(case)
    assert want, f"{case.name} has no `# ERROR`/`# WARNING` annotation"
    got = {(d["code"], d["line"]) for d in diags}
    assert got == want, f"{case.name}: reported {sorted(got)}, annotated {sorted(want)}\n{stderr}"
    assert rc == (1 if any(code.startswith("E") for code, _ in want) else 0)
    golden = case.with_suffix(".stderr")
    assert golden.exists(), f"missing {golden.name}: run `python3 scripts/bless_ui.py {case.stem}`"
    assert stderr == golden.read_text(), (
        f"{case.name}: output changed; if intended, run `python3 scripts/bless_ui.py {case.stem}`"
    )


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_rendered_diagnostics_are_located(case: Path):
    text = case.with_suffix(".stderr").read_text()
    blocks = [b for b in text.split("\n\n") if re.match(r"(error|warning)\[[EW]0\d\d\]: ", b)]
    assert blocks
    for block in blocks:
        lines = block.split("\n")
        header = lines[0]
        message = header.split(": ", 1)[1]
        assert message[:1].islower() or message[:1] == "`", f"messages start lowercase: {header}"
        assert not message.endswith("."), f"messages have no trailing period: {header}"
        assert re.match(r"  --> tests/ui/[\w.]+:\d+:\d+$", lines[1]), block
        assert any(re.match(r"\s+\| *\^+$", ln) for ln in lines), f"no caret line:\n{block}"


def test_every_emitted_code_has_a_case():
    covered = {code for case in CASES for code, _ in bless_ui.annotations(case)}
    missing = emitted_codes() - covered - set(COVERED_ELSEWHERE)
    assert not missing, f"codes without a tests/ui case: {sorted(missing)}"


def test_no_case_expects_a_code_the_compiler_lacks():
    covered = {code for case in CASES for code, _ in bless_ui.annotations(case)}
    assert covered <= emitted_codes()


def test_golden_files_match_cases():
    stems = {c.stem for c in CASES}
    orphans = [p.name for p in UI.glob("*.stderr") if p.stem not in stems]
    assert not orphans, f".stderr files without a .model: {orphans}"


def test_errors_md_documents_every_code():
    doc = (ROOT / "docs" / "errors.md").read_text()
    documented = set(re.findall(r"^## ([EW]0\d\d)\b", doc, re.M))
    assert emitted_codes() <= documented, f"undocumented: {sorted(emitted_codes() - documented)}"
    assert documented <= emitted_codes(), f"documented but never emitted: {sorted(documented - emitted_codes())}"


def test_language_md_lists_every_primitive():
    from dslc.check.primitives import PRIMITIVES

    doc = (ROOT / "docs" / "language.md").read_text()
    missing = [name for name in PRIMITIVES if f"`{name}" not in doc]
    assert not missing, f"primitives missing from docs/language.md: {missing}"


def test_language_md_lists_std_library():
    from dslc.api import parse_std

    std = parse_std()
    doc = (ROOT / "docs" / "language.md").read_text()
    names = [m.name for m in std.modules] + [f.name for f in std.fns]
    missing = [n for n in names if not re.search(rf"`(module |fn )?{n}\b", doc)]
    assert not missing, f"std declarations missing from docs/language.md: {missing}"


def test_language_md_example_checks_clean():
    from dslc.api import check_source

    doc = (ROOT / "docs" / "language.md").read_text()
    example = re.search(r"```text\n(.*?)```", doc, re.S).group(1)
    checked = check_source(example, "language.md")
    assert checked.warnings == [] and checked.program.model == "TinyForCausalLM"
    assert check_source(example, "language.md", "small-tied").program.config_values["hidden_size"] == 128


def test_errors_md_examples_match_golden_output():
    """The rendered examples in docs/errors.md are the ui cases' output (annotation comments removed)."""
    doc = (ROOT / "docs" / "errors.md").read_text()
    for block in re.findall(r"```text\n(error\[.*?|warning\[.*?)```", doc, re.S):
        m = re.search(r"--> (tests/ui/[\w.]+):", block)
        if not m:
            continue
        golden = (ROOT / m.group(1)).with_suffix(".stderr").read_text()
        golden = re.sub(r"  # (ERROR|WARNING) [EW]\d+", "", golden)
        assert block.strip() in golden, f"docs/errors.md is stale for {m.group(1)}:\n{block}"
