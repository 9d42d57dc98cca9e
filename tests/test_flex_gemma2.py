"""A tiny Gemma 2 (models/gemma2.model: soft-capped logits, a sliding window shorter than the
sequence, grouped-query heads) against a random transformers Gemma2ForCausalLM, on every attention
path (`DSLC_ATTENTION`: FlexAttention unfused on the CPU, SDPA, eager, auto): forward logits with left
padding, parameter gradients, greedy decoding with the KV cache, and torch.export (which falls back
from FlexAttention to the standard ops)."""

from __future__ import annotations

import importlib
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages

ROOT = Path(__file__).resolve().parents[1]
NAME = "flex_gemma2"
IMPLS = ["flex", "sdpa", "eager", "auto"]
WINDOW = 4  # shorter than the sequences below


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("flex_build"), (ROOT / "models" / "gemma2.model", NAME)):
        yield importlib.import_module(NAME)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tf = hf_oracle._transformers()
    config = tf.Gemma2Config(
        vocab_size=hf_oracle.VOCAB,
        hidden_size=hf_oracle.HIDDEN,
        intermediate_size=hf_oracle.INTERMEDIATE,
        num_hidden_layers=hf_oracle.LAYERS,
        num_attention_heads=hf_oracle.HEADS,
        num_key_value_heads=hf_oracle.KV_HEADS,
        head_dim=16,
        query_pre_attn_scalar=24,  # not head_dim: the scale must come from it
        sliding_window=WINDOW,
        layer_types=["sliding_attention"] * hf_oracle.LAYERS,
        attn_logit_softcapping=1.5,  # small, so the cap bends the random model's scores
        final_logit_softcapping=5.0,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=hf_oracle.MAX_POS,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        bos_token_id=hf_oracle.BOS,
        eos_token_id=hf_oracle.EOS,
        pad_token_id=0,
        **hf_oracle._rope(10000.0),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(config).float().eval()
    hf_oracle.randomize_(model, seed=4)
    out = tmp_path_factory.mktemp("flex_hf_gemma2")
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def hf(folder):
    tf = hf_oracle._transformers()
    return tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture()
def flex_backward_on_cpu(monkeypatch):
    """torch 2.13 refuses FlexAttention backward on CPU (a device check); its eager backward runs there."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *tensors: None)


def _batch(batch=2, length=11, seed=0):
    """Ids [batch, length] and a mask where row 1 has 3 left pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, hf_oracle.VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_hf(pkg, folder, hf, impl, monkeypatch):
    monkeypatch.setenv("DSLC_ATTENTION", impl)
    ours = pkg.Gemma2ForCausalLM.from_pretrained(folder).eval()
    ids, mask = _batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = hf(ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions' logits are never used
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["flex", "eager"])
def test_gradients_match_hf(pkg, folder, hf, impl, monkeypatch, flex_backward_on_cpu):
    monkeypatch.setenv("DSLC_ATTENTION", impl)
    ours = pkg.Gemma2ForCausalLM.from_pretrained(folder).eval()
    ids, mask = _batch(seed=1)
    weight = torch.randn(hf_oracle.VOCAB, generator=torch.Generator().manual_seed(2))

    def backward(model):
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits  # [B, T, V]
        (logits[mask.bool()] @ weight).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    got, want = backward(ours), backward(hf)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("impl", ["flex", "auto"])
def test_greedy_decoding_matches_hf(pkg, folder, hf, impl, monkeypatch):
    """Prefill then single-token steps through the static KV cache, past the window."""
    monkeypatch.setenv("DSLC_ATTENTION", impl)
    ours = pkg.Gemma2ForCausalLM.from_pretrained(folder).eval()
    ids, mask = _batch(length=6, seed=3)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, cuda_graph=False)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_torch_export_falls_back_from_flex(pkg, folder, monkeypatch):
    monkeypatch.setenv("DSLC_ATTENTION", "flex")
    model = pkg.Gemma2ForCausalLM.from_pretrained(folder).eval()
    ids, mask = _batch()
    with torch.no_grad():
        program = torch.export.export(model, (ids,), {"attention_mask": mask})
        got = program.module()(ids, attention_mask=mask).logits
        want = model(ids, attention_mask=mask).logits
    assert "flex_attention" not in str(program.graph)
    torch.testing.assert_close(got, want)
