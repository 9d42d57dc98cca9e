"""`dslc build --report` prints the fusion report; the generated package honours DSLC_BACKEND."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dslc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_build_report_lists_regions_and_rejections(tmp_path, capsys):
    assert main(["build", str(ROOT / "models" / "qwen2.model"), "-o", str(tmp_path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "fused regions" in out and "not fused" in out
    assert "gated_mlp_pointwise" in out and "activation mul" in out
    assert "no neighbour to fuse with" in out  # the last residual add, with its reason


PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from qwen2_env import kernels
x = torch.randn(3, 10)
w = torch.randn(10)
print(kernels._backend, kernels.use_triton(x))
if kernels.use_triton(x):  # the Triton path really runs (interpreter on CPU) and agrees with PyTorch
    got = kernels.rms_norm(x, 1e-6, w)
    want = kernels.rms_norm_torch(x, 1e-6, w)
    torch.testing.assert_close(got, want)
    print("triton ok")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from dslc.build import build

    out = tmp_path_factory.mktemp("build")
    build(ROOT / "models" / "qwen2.model", out, name="qwen2_env")
    return out


@pytest.mark.parametrize("value,expect", [("torch", "torch False"), ("auto", "auto False"), ("triton", "triton True")])
def test_dslc_backend_environment_variable(built, value, expect):
    if value == "triton":
        pytest.importorskip("triton")
    env = {**os.environ, "DSLC_BACKEND": value, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(built)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(expect)
    if value == "triton":
        assert "triton ok" in r.stdout


def test_unknown_backend_is_refused(built):
    env = {**os.environ, "DSLC_BACKEND": "cuda"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(built)], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "DSLC_BACKEND='cuda'" in r.stderr and "auto, torch, triton" in r.stderr
