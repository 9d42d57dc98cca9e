"""Horizontal matmul fusion: projections of one input run as one matmul after `fuse_projections()`,
with the same outputs and gradients, and `save_pretrained` still writes the checkpoint's names."""

from __future__ import annotations

import importlib
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import MODELS, built_packages
from safetensors.torch import load_file

from dslc.api import check_file
from dslc.passes.pipeline import optimize

ROOT = Path(__file__).resolve().parents[1]


def test_pass_groups_projections_of_one_input():
    groups = {m.name: dict(m.projection_groups)
              for m in optimize(check_file(ROOT / "models" / "qwen2.model").program, verify=True).program.modules}
    assert groups["Attention"] == {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # o_proj reads another input
    assert groups["GatedMLP"] == {"gate_up_proj": ("gate_proj", "up_proj")}  # down_proj too


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("build"), (MODELS / "qwen2.model", "qwen2_hfuse")):
        yield importlib.import_module("qwen2_hfuse")


def test_fused_projections_match_and_save_original_names(qwen2, tmp_path):
    folder = hf_oracle.make_hf_model("qwen2", tmp_path / "ckpt", tie=True, seed=11)
    plain = qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    fused = qwen2.Qwen2ForCausalLM.from_pretrained(folder, fuse_projections=True)
    names = {n for n, _ in fused.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names), "the parts must not stay in memory"
    ids = torch.randint(0, hf_oracle.VOCAB, (2, 9))
    labels = ids.clone()
    a, b = plain(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(b.logits, a.logits)
    a.loss.backward()
    b.loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters(remove_duplicate=False)}
    fused_grads = fused.unfused_parameters()
    for name, g in grads.items():  # gradients of the fused weight, split back, equal the parts' gradients
        part = dict(fused.named_parameters(remove_duplicate=False)).get(name)
        got = part.grad if part is not None else _split_grad(fused, name)
        torch.testing.assert_close(got, g, msg=lambda m, n=name: f"{n}: {m}")
    assert set(fused_grads) == set(grads)
    fused.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    original = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(original)
    for k in original:
        torch.testing.assert_close(saved[k], original[k], rtol=0, atol=0)
    hf = hf_oracle.load_hf(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, a.logits.detach())


def _split_grad(model, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    parent, _, part = owner.rpartition(".")
    module = model.get_submodule(parent)
    for fused in getattr(module, "projection_groups", {}):
        layer = getattr(module, fused)
        if layer is not None and part in layer.parts:
            grad = getattr(layer, leaf).grad
            sizes = list(layer.parts.values())
            return dict(zip(layer.parts, grad.split(sizes, dim=0)))[part]
    raise KeyError(name)
