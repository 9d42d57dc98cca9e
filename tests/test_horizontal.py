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
    groups = {
        m.name: dict(m.projection_groups)
        for m in optimize(check_file(ROOT / "models" / "qwen2.model").program, verify=True).program.modules
    }
    assert groups["Attention"] == {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # o_proj reads another input
    assert groups["GatedMLP"] == {"gate_up_proj": ("gate_proj", "up_proj")}  # down_proj too


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("build"), (MODELS / "qwen2.model", "qwen2_hfuse")):
        yield importlib.import_module("qwen2_hfuse")


def _refuse(*_args, **_kwargs):
    raise AssertionError("the part was called on its own")


def test_fused_projections_match_and_keep_the_parts(qwen2, tmp_path):
    folder = hf_oracle.make_hf_model("qwen2", tmp_path / "ckpt", tie=True, seed=11)
    plain = qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    fused = qwen2.Qwen2ForCausalLM.from_pretrained(folder, fuse_projections=True)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    attn = fused.model.layers[0].self_attn
    assert attn.qkv_proj is not None and attn.q_proj.weight.data_ptr() == attn.qkv_proj.weight.data_ptr()
    ids = torch.randint(0, hf_oracle.VOCAB, (2, 9))
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        attn.q_proj.forward = _refuse  # inference takes the fused matmul: the part's own forward never runs
        torch.testing.assert_close(fused(input_ids=ids).logits, want)
        del attn.q_proj.forward
        fused.double()  # moving the model fuses again from the moved parameters
        assert attn.qkv_proj.weight.dtype == torch.float64
        assert attn.q_proj.weight.data_ptr() == attn.qkv_proj.weight.data_ptr()
        torch.testing.assert_close(fused(input_ids=ids).logits.float(), want, rtol=1e-5, atol=1e-5)
        fused.float()
        seen = []
        attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # a hooked part runs on its own
        torch.testing.assert_close(fused(input_ids=ids).logits, want)
        assert seen, "the hook on a fused part did not fire"
    labels = ids.clone()
    a, b = plain(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    a.loss.backward()
    b.loss.backward()  # training calls each part: each parameter gets its own gradient
    fused_params = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")
    fused.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    original = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(original)
    for k in original:
        torch.testing.assert_close(saved[k], original[k], rtol=0, atol=0)
    hf = hf_oracle.load_hf(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, want)


def test_a_replaced_part_is_called_on_its_own(qwen2, tmp_path):
    """A swapped module or a new weight on a part: the fused tensor is stale, so it must not be used."""
    folder = hf_oracle.make_hf_model("qwen2", tmp_path / "ckpt", tie=True, seed=12)
    model = qwen2.Qwen2ForCausalLM.from_pretrained(folder, fuse_projections=True)
    ids = torch.randint(0, hf_oracle.VOCAB, (1, 5))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        up = model.model.layers[0].mlp.up_proj
        up.weight = torch.nn.Parameter(up.weight * 2)
        assert not torch.allclose(model(input_ids=ids).logits, base)
        up.weight = torch.nn.Parameter(up.weight / 2)
        torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_peft_on_a_fused_model_takes_effect(qwen2, tmp_path):
    """LoRA on q_proj of a model whose q/k/v were fused: the wrapped part runs on its own, so the adapter counts."""
    peft = pytest.importorskip("peft")
    folder = hf_oracle.make_hf_model("qwen2", tmp_path / "ckpt", tie=True, seed=13)
    model = qwen2.Qwen2ForCausalLM.from_pretrained(folder, fuse_projections=True)
    ids = torch.randint(0, hf_oracle.VOCAB, (1, 6))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
        assert (lora(input_ids=ids).logits - base).abs().max() > 1e-3
