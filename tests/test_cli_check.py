"""`dslc check` as users run it: exit codes, what goes to stdout and stderr, --json, --arch, --set, and no
Python traceback for any input (a few real subprocesses prove the in-process runs of the other tests)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dslc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def dslc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python3 -m dslc ARGS` in a subprocess, from the repo root."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "dslc", *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )


def run_main(*args: str) -> tuple[int, str, str]:
    """`dslc ARGS` in-process, from the repo root: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int):
                    err.write(str(e.code))
    finally:
        os.chdir(cwd)
    return rc, out.getvalue(), err.getvalue()


# ---- real subprocesses ---------------------------------------------------------------------------


def test_check_ok_subprocess():
    r = dslc("check", "models/qwen2.model")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(
        r"ok: models/qwen2.model: Qwen2ForCausalLM, [\d,]+ parameters, 0 warnings; 64 other configs checked\n", r.stdout
    )
    assert r.stderr == ""


def test_check_error_subprocess_matches_golden():
    r = dslc("check", "tests/ui/e010_unknown_name.model")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == (ROOT / "tests/ui/e010_unknown_name.stderr").read_text()


HOSTILE_FILES = [
    ("binary.model", bytes(range(256)) * 8),
    ("nul.model", b"config C:\n    x: int = 1\x00\n"),
    ("utf16.model", "config C:\n    x: int = 1\n".encode("utf-16")),
    ("deep.model", b"config C:\n    x: int = " + b"- " * 5000 + b"1\n"),
    ("long.model", b"config C:\n    x: int = " + b" + ".join([b"1"] * 10000) + b"\n"),
]


@pytest.mark.parametrize("name, data", HOSTILE_FILES, ids=[case[0] for case in HOSTILE_FILES])
def test_hostile_files_give_no_traceback(tmp_path: Path, name: str, data: bytes):
    (tmp_path / name).write_bytes(data)
    r = dslc("check", name, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert r.stderr.startswith("error[E00"), r.stderr
    assert f"--> {name}:" in r.stderr


def test_json_subprocess():
    r = dslc("check", "tests/ui/e020_require_set.model", "--set", "heads=5", "--json")
    assert r.returncode == 1 and r.stderr == ""
    (d,) = json.loads(r.stdout)
    assert d == {
        "severity": "error",
        "code": "E020",
        "message": "requirement failed: dim must split evenly into heads",
        "file": "tests/ui/e020_require_set.model",
        "line": 9,
        "column": 5,
        "end_line": 9,
        "end_column": 65,
        "help": ["with dim = 64, heads = 5", "change the arch or the `--set` values so the condition holds"],
        "notes": [],
    }


# ---- in-process ---------------------------------------------------------------------------------------


def test_arch_flag():
    rc, out, err = run_main("check", "models/qwen2.model", "--arch", "7b")
    assert rc == 0 and err == ""
    assert out.startswith("ok: models/qwen2.model: Qwen2ForCausalLM (arch 7b), 7,615,616,512 parameters")


def test_set_flag():
    rc, out, _ = run_main("check", "models/qwen2.model", "--set", "num_hidden_layers=2", "--set", "vocab_size=1000")
    assert rc == 0 and "Qwen2ForCausalLM, " in out
    rc2, out2, _ = run_main("check", "models/qwen2.model")
    assert out != out2


def test_unknown_arch_flag():
    rc, _, err = run_main("check", "models/qwen2.model", "--arch", "7c")
    assert rc == 1
    assert err.startswith("error[E022]: `--arch 7c`: no arch named `7c`\n  --> models/qwen2.model:")
    assert "= help: did you mean `7b`?" in err


def test_warnings_go_to_stderr_and_exit_zero():
    rc, out, err = run_main("check", "tests/ui/w001_unused_variable.model", "--configs", "0")
    assert rc == 0
    assert out == "ok: tests/ui/w001_unused_variable.model: M, 12,800 parameters, 1 warning\n"
    assert err.startswith("warning[W001]: `y` is never used")


def test_warnings_as_json():
    rc, out, err = run_main("check", "tests/ui/w002_unused_member.model", "--json")
    assert rc == 0 and err == ""
    diags = json.loads(out)
    assert [(d["severity"], d["code"]) for d in diags] == [("warning", "W002"), ("warning", "W002")]


def test_clean_json_is_an_empty_list():
    rc, out, _ = run_main("check", "models/qwen2.model", "--json")
    assert rc == 0 and json.loads(out) == []


def test_unreadable_file_is_e000(tmp_path: Path):
    rc, out, err = run_main("check", "no/such/file.model")
    assert rc == 1 and out == ""
    assert err.startswith("error[E000]: cannot read file: No such file or directory\n  --> no/such/file.model:1:1")
    rc, out, _ = run_main("check", str(tmp_path), "--json")
    (d,) = json.loads(out)
    assert d["code"] == "E000" and d["line"] == 1


def test_malformed_set_flag_is_refused_without_traceback():
    rc, _, err = run_main("check", "models/qwen2.model", "--set", "hidden_size")
    assert rc != 0 and "error[E024]" in err and "is not `key=value`" in err and "Traceback" not in err


def test_bad_package_name_is_e070(tmp_path: Path):
    rc, _, err = run_main("build", "models/qwen2.model", "--name", "9-bad", "-o", str(tmp_path))
    assert rc == 1
    assert err.startswith("error[E070]: `9-bad` is not a valid package name")
    assert not any(tmp_path.iterdir())


def test_every_model_checks_clean():
    for spec in sorted((ROOT / "models").glob("*.model")):
        rc, out, err = run_main("check", str(spec.relative_to(ROOT)), "--json")
        assert rc == 0 and json.loads(out) == [], (spec.name, out)


def test_show_archs_lists_each_arch_what_it_sets_and_its_parameter_count():
    """`dslc show SPEC --archs`: fairseq2-style registry of the named presets (counts as HF reports them)."""
    run = subprocess.run(
        [sys.executable, "-m", "dslc", "show", str(ROOT / "models" / "gpt2.model"), "--archs"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode == 0, run.stderr
    rows = {line.split("│")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("│")}
    assert set(rows) >= {"(default)", "124m", "355m", "774m", "1558m"}
    assert "124,439,808" in rows["124m"] and "354,823,168" in rows["355m"]  # GPT-2 and GPT-2 medium
    assert "n_embd = 1024" in rows["355m"] and "n_layer = 24" in rows["355m"]
    assert "import torch" not in run.stderr
