"""`dslc build`: deterministic output, atomic replacement, a standalone and valid generated package, the CLI.

Builds are cheap (the compiler does not import torch), so each test builds what it needs into its own tmp_path;
the two reference builds are made once per session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import dslc.build
import dslc.install
from dslc.build import build
from dslc.diagnostics import DslcError
from dslc.install import InstallError

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("qwen2", "gpt2")


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes); folders and caches are left out."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **extra}
    env.pop("FORCE_COLOR", None)
    return env


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """qwen2 and gpt2 built once, in process: the folder that holds both packages."""
    out = tmp_path_factory.mktemp("reference")
    for spec in SPECS:
        build(ROOT / "models" / f"{spec}.model", out)
    return out


def _broken_spec(folder: Path) -> Path:
    """A copy of qwen2.model (same file name, so the same package name) with a type error in its config."""
    text = (ROOT / "models" / "qwen2.model").read_text()
    broken, n = re.subn(r"rms_norm_eps: float = [^ ]+", 'rms_norm_eps: float = "tiny"', text)
    assert n == 1, "qwen2.model changed: update _broken_spec"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qwen2.model"
    path.write_text(broken)
    return path


def _import_as(package: Path, alias: str):
    """Import the package folder `package` under the module name `alias` (no sys.path change)."""
    spec = importlib.util.spec_from_file_location(
        alias, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for name in [m for m in sys.modules if m == alias or m.startswith(alias + ".")]:
            del sys.modules[name]
    return module


def _stray(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


# ---- determinism -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_builds_are_byte_identical(spec, reference, tmp_path):
    """Same spec, another folder, another process and another hash seed: the same bytes, file by file."""
    again = build(ROOT / "models" / f"{spec}.model", tmp_path / "in_process")
    other = tmp_path / "subprocess"
    code = "import sys; from dslc.build import build; build(sys.argv[1], sys.argv[2])"
    subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "models" / f"{spec}.model"), str(other)],
        check=True,
        env=_env(PYTHONHASHSEED="12345"),
        timeout=120,
    )
    want = _files(reference / spec)
    assert {"__init__.py", "config.py", "modeling.py", "build.json", f"{spec}.model"} <= set(want)
    for folder in (again, other / spec):
        got = _files(folder)
        assert sorted(got) == sorted(want), f"{folder}: files differ"
        for name, data in want.items():
            assert got[name] == data, f"{folder}/{name} differs between two builds of {spec}.model"


def test_build_output_does_not_name_its_folder(reference):
    """Nothing machine- or run-specific (the output path, the checkout path) lands in the package."""
    for spec in SPECS:
        for name, data in _files(reference / spec).items():
            text = data.decode("utf-8")
            assert str(reference) not in text and str(ROOT) not in text, f"{spec}/{name} names a local path"


# ---- atomic replacement -------------------------------------------------------------------------------------


def test_failed_build_leaves_the_previous_package(tmp_path):
    out = tmp_path / "out"
    target = build(ROOT / "models" / "qwen2.model", out)
    before = _files(target)
    with pytest.raises(DslcError) as e:
        build(_broken_spec(tmp_path / "broken"), out)
    assert any("rms_norm_eps" in d.message for d in e.value.diagnostics), e.value.diagnostics
    assert _files(target) == before
    assert _stray(out) == []
    pkg = _import_as(target, "build_test_after_failed_build")
    config = pkg.Qwen2Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=32,
        vocab_size=16,
    )
    assert pkg.Qwen2ForCausalLM(config).num_parameters() > 0


def _fail_after(n: int, monkeypatch, owner, names: tuple[str, ...], exc: BaseException) -> None:
    """Patch owner.<each name> so that the calls after the first `n` (counted together) raise `exc`."""
    calls = []
    for name in names:

        def fake(*args, _real=getattr(owner, name), **kwargs):
            calls.append(args)
            if len(calls) > n:
                raise exc
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, fake)


@pytest.mark.parametrize("exc", [OSError("simulated failure"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_interrupted_write_leaves_the_previous_package(exc, tmp_path, monkeypatch):
    out = tmp_path / "out"
    target = build(ROOT / "models" / "qwen2.model", out)
    before = _files(target)
    real = pathlib.Path.write_text
    written = []

    def failing(path, *args, **kwargs):  # the fourth file written into the staging folder fails
        if path.parent.name.startswith(".qwen2.new-"):
            written.append(path)
            if len(written) > 3:
                raise exc
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", failing)
    with pytest.raises(InstallError if isinstance(exc, OSError) else type(exc)):
        build(ROOT / "models" / "qwen2.model", out)
    monkeypatch.undo()
    assert _files(target) == before
    assert _stray(out) == [], "staging folders left behind"


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_failed_swap_leaves_the_previous_package(atomic, tmp_path, monkeypatch):
    """The swap fails: with the atomic exchange nothing moved; with the two-rename fallback the previous
    package is put back."""
    out = tmp_path / "out"
    target = build(ROOT / "models" / "qwen2.model", out)
    before = _files(target)
    if atomic:
        monkeypatch.setattr(dslc.install, "exchange", lambda a, b: (_ for _ in ()).throw(OSError("simulated failure")))
    else:
        monkeypatch.setattr(dslc.install, "exchange", lambda a, b: False)
        _fail_after(1, monkeypatch, dslc.install.os, ("rename",), OSError("simulated failure"))  # 2nd rename fails
    with pytest.raises(OSError, match="simulated"):
        build(ROOT / "models" / "qwen2.model", out)
    monkeypatch.undo()
    assert target.is_dir() and _files(target) == before
    assert _stray(out) == [], "staging folders left behind"


def test_the_swap_is_one_atomic_exchange_here(tmp_path):
    """On this platform (Linux renameat2, macOS renamex_np) two folders trade places in one step."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not dslc.install.exchange(a, b):
        pytest.skip("no atomic exchange on this platform or file system: the two-rename fallback is used")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_rebuild_replaces_the_package_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    target = build(ROOT / "models" / "qwen2.model", out)
    (target / "stale.py").write_text("# from an older build\n")  # a file the older build wrote and listed
    manifest = json.loads((target / "build.json").read_text())
    (target / "build.json").write_text(json.dumps({**manifest, "files": manifest["files"] + ["stale.py"]}))
    build(ROOT / "models" / "qwen2.model", out)
    assert not (target / "stale.py").exists(), "a rebuild must replace the folder, not merge into it"
    assert _stray(out) == []


def test_package_folder_has_the_usual_permissions(tmp_path):
    target = build(ROOT / "models" / "qwen2.model", tmp_path / "out")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)


# ---- standalone and valid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_generated_code_compiles_and_never_imports_dslc(spec, reference):
    files = sorted((reference / spec).glob("*.py"))
    assert files
    for path in files:
        source = path.read_text()
        compile(source, str(path), "exec")
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, flags=re.M)
        bad = [m for m in imports if m.split(".")[0] in ("dslc", "transformers", "jinja2", "lark")]
        assert not bad, f"{path.name} imports {bad}"


def test_generated_code_has_no_undefined_names(reference):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    # pyflakes and syntax errors; unused imports and variables in generated code are harmless, so left out
    args = ["--select", "F,E9", "--ignore", "F401,F841", "--output-format", "concise"]
    result = subprocess.run(
        [ruff, "check", "--isolated", "--no-cache", *args, str(reference)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


_STANDALONE = textwrap.dedent(
    """
    import json, sys
    import torch
    import qwen2

    config = qwen2.Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = qwen2.Qwen2ForCausalLM(config)
    ids = torch.randint(0, 32, (1, 5))
    model(ids, labels=ids).loss.backward()
    model.save_pretrained(sys.argv[1])
    again = qwen2.Qwen2ForCausalLM.from_pretrained(sys.argv[1])
    again.generate(ids, max_new_tokens=3, do_sample=True, top_k=5, top_p=0.9)
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("dslc", "transformers", "jinja2", "lark"))))
    """
)


def test_package_runs_without_dslc_or_transformers(reference, tmp_path):
    """Import, build, train a step, save, load and generate in a fresh interpreter: neither dslc nor
    transformers (nor the compiler's jinja2 / lark) gets imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _STANDALONE, str(tmp_path / "ckpt")],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(reference)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "qwen2" in imported and "torch" in imported
    assert not {m for m in imported if m.split(".")[0] in ("dslc", "transformers")}


# ---- the command line ------------------------------------------------------------------------------------------


def _cli(*args, cwd=ROOT) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dslc", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )
    return result, time.perf_counter() - start


def test_cli_build_and_a_failed_build(reference, tmp_path):
    out = tmp_path / "out"
    ok, seconds = _cli("build", "models/qwen2.model", "-o", str(out))
    print(f"\n`dslc build models/qwen2.model`: {seconds * 1000:.0f} ms for the whole process (info only)")
    assert ok.returncode == 0, ok.stderr
    said = ok.stdout + ok.stderr
    assert "built" in said and "qwen2" in said, said
    assert _files(out / "qwen2") == _files(reference / "qwen2")

    broken = _broken_spec(tmp_path / "broken")
    bad, _ = _cli("build", str(broken), "-o", str(out))
    said = bad.stdout + bad.stderr
    assert bad.returncode == 1, said
    assert "error[E" in said and "rms_norm_eps" in said and "qwen2.model:" in said, said
    assert "untouched" in said and "built" not in said.replace("build failed", ""), said
    assert _files(out / "qwen2") == _files(reference / "qwen2")
    assert _stray(out) == []


def test_cli_build_name_option(tmp_path):
    ok, _ = _cli("build", "models/qwen2.model", "-o", str(tmp_path), "--name", "my_qwen")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "my_qwen" / "__init__.py").is_file() and not (tmp_path / "qwen2").exists()
    bad, _ = _cli("build", "models/qwen2.model", "-o", str(tmp_path), "--name", "not-an-identifier")
    assert bad.returncode == 1 and "not a valid package name" in bad.stdout + bad.stderr
