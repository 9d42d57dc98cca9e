"""bench/gpu.sh --dry-run: the GPU script's every step, on the CPU at tiny shapes, writes numbers (not errors).

The GPU run itself cannot happen in CI; this keeps the script, bench/kernels.py, bench/train.py, bench/decode.py
and bench/gpu_report.py working until a GPU machine runs them (`bash bench/gpu.sh --out DIR` there).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("transformers")


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {k: v for k, v in os.environ.items() if k not in ("DSLC_BACKEND", "GPU_SH_BUDGET")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    return out, done


def test_exit_status_and_files(dry_run):
    out, done = dry_run
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    for name in ("gpu.json", "gpu.md", "gpu.log", "kernels.json", "train.json", "decode.json", "cuda_tests.xml"):
        assert (out / name).is_file(), name
    assert len(list(out.iterdir())) <= 8, "the device tool brings back at most 8 files"


def test_every_section_has_numbers(dry_run):
    out, _ = dry_run
    report = json.loads((out / "gpu.json").read_text())
    assert report["ok"] and report["dry_run"]
    assert [s["name"] for s in report["steps"]] == ["install", "cuda_tests", "kernels", "train", "decode"]
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert set(report["versions"]) >= {"torch", "triton", "transformers", "liger_kernel"}

    tests = report["cuda_tests"]
    assert tests["tests"] > 0 and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] == tests["tests"] and tests["skip_reasons"] == ["needs CUDA"]

    k = report["kernels"]
    assert number(k["copy_bandwidth_bytes_per_s"])
    regions = {"rms_norm", "rms_norm_residual", "attention_apply_rope", "gated_mlp_pointwise"}
    assert {c["region"] for c in k["cases"]} == regions
    assert {c["mode"] for c in k["cases"]} == {"fwd", "fwd+bwd"}
    for c in k["cases"]:
        assert number(c["min_bytes"]) and c["min_bytes"] > 0
        for impl in ("dslc", "torch"):
            r = c["impls"][impl]
            assert "error" not in r, (c["region"], impl, r)
            assert all(number(r[key]) and r[key] > 0 for key in ("ms", "GBps", "copy_fraction"))
        assert all("error" not in r for r in c["impls"].values()), c
    assert any("torch.compile" in c["impls"] for c in k["cases"]), "torch.compile ran on the first shape"
    assert set(k["jit_warmup"]) == regions and all(number(v["fwd_s"]) for v in k["jit_warmup"].values())
    ce = k["fused_linear_ce"]
    assert all(number(ce[impl]["fwd+bwd_ms"]) for impl in ("dslc", "torch"))

    t = report["train"]
    assert {"dslc", "hf"} <= set(t["tokens_per_second"])
    assert all(number(v) and v > 0 for v in t["tokens_per_second"].values())
    assert all(number(v) for v in t["peak_bytes"].values())

    d = report["decode"]
    assert {f"{impl} b{b}" for impl in ("dslc-eager", "hf") for b in (1, 8)} <= set(d["runs"])
    for r in d["runs"].values():
        assert number(r["decode_tokens_per_s"]) and r["tokens_equal_dslc_eager"]


def test_markdown_summarizes_it(dry_run):
    out, _ = dry_run
    md = (out / "gpu.md").read_text()
    for heading in ("## Steps", "## CUDA tests", "## Kernels", "## Training step", "## Decode"):
        assert heading in md
    assert "error" not in md.lower().replace("errors,", "")
    assert "torch 2." in md and "bash bench/gpu.sh --dry-run" in md
