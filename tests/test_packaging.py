"""The wheel ships grammar/, templates/ and the std library, and the installed layout works on its own.

Builds one wheel per session with the already-installed hatchling (--no-build-isolation: no network, a few
seconds), then installs it into a --target folder and imports dslc from there, not from the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("hatchling", reason="scripts/setup.sh installs hatchling (test extra)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        timeout=120,
    )
    wheels = list(out.glob("dslc-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "dslc/resources.py" in names
        assert "dslc/_data/grammar/model.lark" in names
        assert "dslc/std/std.model" in names
        assert any(n.startswith("dslc/_data/templates/") for n in names), "templates folder missing"
        for tpl in (ROOT / "templates").rglob("*.j2"):
            assert f"dslc/_data/templates/{tpl.relative_to(ROOT / 'templates').as_posix()}" in names
        assert not any(n.startswith(("grammar/", "templates/", "tests/")) for n in names)
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "dslc = dslc.cli:main" in zf.read(entry_points).decode()


def test_installed_wheel_finds_its_data(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    code = (
        "import dslc.resources as r, pathlib, sys\n"
        "assert r.grammar_path('model.lark').is_file()\n"
        "assert r.templates_dir().is_dir()\n"
        "assert r.std_path().is_file()\n"
        "t = pathlib.Path(sys.argv[1]).resolve()\n"
        "for p in (r.__file__, r.grammar_path('model.lark'), r.templates_dir(), r.std_path()):\n"
        "    assert pathlib.Path(p).resolve().is_relative_to(t), (p, t)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # cwd outside the checkout, so '' on sys.path cannot pick up the source tree's dslc/.
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, env=env, cwd=tmp_path, timeout=60)
    # and the installed compiler builds a package from a spec: grammar, std library and templates all found
    spec = Path(__file__).resolve().parents[1] / "models" / "gpt2.model"
    built = subprocess.run(
        [sys.executable, "-m", "dslc", "build", str(spec), "-o", str(tmp_path / "out")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "out" / "gpt2" / "modeling.py").is_file() and (
        tmp_path / "out" / "gpt2" / "kernels.py"
    ).is_file()
