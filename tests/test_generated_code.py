"""The generated code is what a careful hand-writer would commit: ruff-clean and formatted under the project's
config, no dead functions, shape comments in config names, one kernel per distinct region, and library code
inlined into a spec citing the spec's own line."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dslc.build import build

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "models").glob("*.model")) + sorted((ROOT / "tests" / "specs").glob("*.model"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("style")
    return {spec.stem: build(spec, out) for spec in SPECS}


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True)


def test_ruff_config_of_generated_code_is_the_projects():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    generated = tomllib.loads((ROOT / "templates" / "ruff.toml").read_text())
    assert generated["line-length"] == project["line-length"]
    assert generated["target-version"] == project["target-version"]
    assert generated["lint"]["select"] == project["lint"]["select"]
    assert generated["lint"]["ignore"] == project["lint"]["ignore"]


@pytest.mark.parametrize("spec", [s.stem for s in SPECS])
def test_generated_package_passes_ruff(built, spec):
    config = str(ROOT / "pyproject.toml")
    check = _ruff("check", "--no-cache", "--config", config, str(built[spec]))
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = _ruff("format", "--no-cache", "--check", "--config", config, str(built[spec]))
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.parametrize("spec", [s.stem for s in SPECS])
def test_no_dead_functions(built, spec):
    source = (built[spec] / "modeling.py").read_text()
    tree = ast.parse(source)
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not [f for f in defined if f not in called], "functions nothing calls"


@pytest.mark.parametrize("spec", [s.stem for s in SPECS])
def test_shape_comments_name_config_fields(built, spec):
    """No dim of one instantiation (`[B, 12, T, 64]`): every dim is a name, an expression of names, or 1."""
    seen = 0
    for name in ("modeling.py",):
        for line in (built[spec] / name).read_text().splitlines():
            for shape in re.findall(r"#.*?(\[[^\]]*\])", line):
                seen += 1
                for dim in shape.strip("[]").split(","):
                    dim = dim.strip().split(" ")[0] if dim.strip().endswith(("f32", "bf16", "i64")) else dim.strip()
                    assert not re.fullmatch(r"\d+", dim) or dim == "1", f"{name}: {line.strip()}"
    assert seen >= 3, "no shape comments found"


@pytest.mark.parametrize("spec", ["qwen2", "gemma_like"])
def test_identical_regions_share_one_kernel(built, spec):
    """q and k get the same rotary region: one kernel, both calls grouped into one launch."""
    kernels = (built[spec] / "kernels.py").read_text()
    torch_fns = re.findall(r"^def (\w+)_torch\(", kernels, re.M)
    bodies = {}
    for name in torch_fns:
        body = re.search(rf"^def {name}_torch\((.*?)\n\n\n", kernels, re.M | re.S).group(1)
        ops = re.findall(r"# \[.*?\] (\w+)\(", body)
        bodies.setdefault(tuple(ops), []).append(name)
    assert all(len(v) == 1 for v in bodies.values()), bodies
    modeling = (built[spec] / "modeling.py").read_text()
    assert modeling.count("kernels.attention_apply_rope_x2(") == 1
    assert "kernels.attention_apply_rope(" not in modeling


@pytest.mark.parametrize("spec", [s.stem for s in SPECS])
def test_inlined_library_code_cites_the_spec(built, spec):
    """Inside a class of the spec's own modules, every line cites the spec, never std.model."""
    tree = ast.parse((built[spec] / "modeling.py").read_text())
    source = (built[spec] / "modeling.py").read_text().splitlines()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        doc = ast.get_docstring(cls) or ""
        if "std.model:" in doc:
            continue  # a standard-library module: its own lines are the library's
        text = "\n".join(source[cls.lineno - 1 : cls.end_lineno])
        assert "std.model:" not in text, f"{cls.name} cites the standard library"
