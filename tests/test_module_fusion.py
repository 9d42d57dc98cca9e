"""Fusion inside the module that owns the weights: each norm runs its kernel from its own forward, alone or
with the residual add before it (`norm(x, residual=r)` returns the norm and the sum), with or without its
optional bias; both backends (Triton under the interpreter) agree with plain PyTorch, forward and backward."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from packages import built_packages

SPEC = Path(__file__).resolve().parent / "specs" / "norms.model"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("norms"), (SPEC, None)):
        yield importlib.import_module("norms")
    for name in [n for n in sys.modules if n == "norms" or n.startswith("norms.")]:
        del sys.modules[name]


def _model(pkg):
    torch.manual_seed(0)
    model = pkg.NormsModel(pkg.NormsConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model


def _reference(model, ids):
    """The spec's Block in plain torch.nn.functional terms."""
    b = model.block
    x = F.embedding(ids, model.embed.weight)
    s1 = x + F.linear(x, b.lin.weight, b.lin.bias)
    h = F.layer_norm(s1, (s1.shape[-1],), b.n1.weight, None, b.n1.eps)
    g = h + F.layer_norm(h, (h.shape[-1],), b.n2.weight, b.n2.bias, b.n2.eps)
    s3 = g + x
    n3 = b.n3.weight * (s3 * torch.rsqrt(s3.pow(2).mean(-1, keepdim=True) + b.n3.eps))
    return n3 * 2.0 + g


def test_norm_classes_and_their_residual_forward(pkg):
    model = _model(pkg)
    assert model.block.n1.bias is None and model.block.n2.bias is not None
    x, r = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    normed, total = model.block.n2(x, residual=r)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(normed, model.block.n2(x + r))
    torch.testing.assert_close(model.block.n1(x), F.layer_norm(x, (24,), model.block.n1.weight, None, 1e-5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_match_plain_torch(pkg, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model = _model(pkg)
    ids = torch.randint(0, 32, (3, 7))
    want = _reference(model, ids)
    (want * torch.linspace(-1, 1, 24)).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pkg.kernels.set_backend(backend)
    try:
        got = model(input_ids=ids).last_hidden_state
        (got * torch.linspace(-1, 1, 24)).sum().backward()
    finally:
        pkg.kernels.set_backend("auto")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
