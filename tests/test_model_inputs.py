"""A spec's model runs whatever its forward's inputs are called and whether or not it has attention: a first
integer input of any name is the token ids, other inputs are passed by name; forward, loss, training and
generate all work."""

from __future__ import annotations

import importlib

import pytest
import torch
from packages import built_packages

SPECS = {
    "bag_lm": """use std

config C:
    vocab: int = 32
    dim: int = 16

model BagLM(C): causal_lm
    embed = Embedding(vocab, dim)
    norm = RMSNorm(dim)
    head = Linear(dim, vocab)

    forward(ids: [B, T] i64) -> [B, T, vocab]:
        return head(norm(embed(ids)))
""",
    "float_in": """use std

config C:
    vocab: int = 32
    dim: int = 16

model Scorer(C): base
    proj = Linear(dim, dim)

    forward(x: [B, T, dim], scale: [B, T, 1]) -> [B, T, dim]:
        return proj(x) * scale
""",
}


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    specs = []
    for name, text in SPECS.items():
        (root / f"{name}.model").write_text(text)
        specs.append((root / f"{name}.model", f"inputs_{name}"))
    with built_packages(root / "build", *specs):
        yield {name: importlib.import_module(f"inputs_{name}") for name in SPECS}


def test_a_model_without_attention_and_ids_named_otherwise_runs(pkgs):
    pkg = pkgs["bag_lm"]
    assert pkg.BagLM.graph_inputs == ("input_ids",)
    torch.manual_seed(0)
    model = pkg.BagLM(pkg.C()).eval()
    ids = torch.randint(0, 32, (2, 6))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 6, 32) and torch.isfinite(out.loss)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    tokens = model.generate(ids[:, :3], max_new_tokens=4)
    assert tokens.shape == (2, 7)
    # no attention: each position depends on its own token only, so greedy decoding is the argmax per step
    with torch.no_grad():
        step = model(input_ids=tokens[:, 2:3]).logits.argmax(-1)
    assert torch.equal(tokens[:, 3:4], step)


def test_other_inputs_are_passed_by_name(pkgs):
    pkg = pkgs["float_in"]
    model = pkg.Scorer(pkg.C())
    x, scale = torch.randn(2, 5, 16), torch.rand(2, 5, 1)
    out = model(x=x, scale=scale).last_hidden_state
    torch.testing.assert_close(out, model.proj(x) * scale)
    with pytest.raises(ValueError, match="needs `scale`"):
        model(x=x)
