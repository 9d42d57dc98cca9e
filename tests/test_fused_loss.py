"""The fused linear cross-entropy of generated packages: exact against the unfused loss, and its peak
memory measured against the unfused loss at Qwen2's vocabulary (CPU, separate processes)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from packages import MODELS, built_packages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("build"), (MODELS / "qwen2.model", "qwen2_loss")) as out:
        yield importlib.import_module("qwen2_loss.losses"), out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_loss_equals_unfused(losses, bias, chunk):
    mod, _ = losses
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(301, 16, generator=g, requires_grad=True)
    b = torch.randn(301, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, 301, (3, 11), generator=g)
    labels[0, :4] = -100
    fused = mod.fused_causal_lm_loss(hidden, weight, b, labels, chunk=chunk)
    grads = torch.autograd.grad(fused * 2.5, [hidden, weight] + ([b] if bias else []))
    logits = hidden @ weight.T + (b if bias else 0)
    plain = mod.causal_lm_loss(logits, labels)
    ref = torch.autograd.grad(plain * 2.5, [hidden, weight] + ([b] if bias else []))
    torch.testing.assert_close(fused, plain)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want)


PEAK = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    from qwen2_loss.losses import causal_lm_loss, fused_causal_lm_loss
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 1024, 64, 151936
    hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[2] == "fused":
        loss = fused_causal_lm_loss(hidden, weight, None, labels)
    else:
        loss = causal_lm_loss(hidden @ weight.T, labels)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_kib": peak - base, "loss": loss.item()}))
""")


def _peak(out: Path, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PEAK, str(out), mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_fused_loss_peak_memory_is_a_fraction_of_unfused(losses):
    _, out = losses
    fused, plain = _peak(out, "fused"), _peak(out, "plain")
    logits_kib = 1024 * 151936 * 4 // 1024
    print(
        f"peak extra memory: fused {fused['peak_extra_kib'] / 1024:.0f} MiB, "
        f"unfused {plain['peak_extra_kib'] / 1024:.0f} MiB (float32 logits alone: {logits_kib / 1024:.0f} MiB)"
    )
    assert abs(fused["loss"] - plain["loss"]) < 1e-3
    assert plain["peak_extra_kib"] > logits_kib  # the unfused loss does hold the logits
    assert fused["peak_extra_kib"] < plain["peak_extra_kib"] / 4
