"""Fast checks of the numerical-oracle helper (tests/hf_oracle.py) and of the HF facts in docs/hf-families.md."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_oracle as O  # noqa: E402

# Import the model modules at collection time so no single test pays transformers' lazy-import cost.
_ = (transformers.Qwen2ForCausalLM, transformers.LlamaForCausalLM, transformers.GPT2LMHeadModel, transformers.BertModel)

V, H, I = O.VOCAB, O.HIDDEN, O.INTERMEDIATE
KV = O.KV_HEADS * (O.HIDDEN // O.HEADS)  # k/v projection width under GQA

_DECODER_LAYER0 = {
    "model.layers.0.input_layernorm.weight": (H,),
    "model.layers.0.mlp.down_proj.weight": (H, I),
    "model.layers.0.mlp.gate_proj.weight": (I, H),
    "model.layers.0.mlp.up_proj.weight": (I, H),
    "model.layers.0.post_attention_layernorm.weight": (H,),
    "model.layers.0.self_attn.k_proj.weight": (KV, H),
    "model.layers.0.self_attn.o_proj.weight": (H, H),
    "model.layers.0.self_attn.q_proj.weight": (H, H),
    "model.layers.0.self_attn.v_proj.weight": (KV, H),
}
_QWEN2_BIASES = {
    "model.layers.0.self_attn.q_proj.bias": (H,),
    "model.layers.0.self_attn.k_proj.bias": (KV,),
    "model.layers.0.self_attn.v_proj.bias": (KV,),
}
_DECODER_TOP = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}

# Layer-0 keys plus the non-layer keys, exactly as listed in docs/hf-families.md.
EXPECTED = {
    ("qwen2", True): {**_DECODER_TOP, **_DECODER_LAYER0, **_QWEN2_BIASES},
    ("qwen2", False): {**_DECODER_TOP, **_DECODER_LAYER0, **_QWEN2_BIASES, "lm_head.weight": (V, H)},
    ("llama", False): {**_DECODER_TOP, **_DECODER_LAYER0, "lm_head.weight": (V, H)},
    ("gpt2", True): {
        "transformer.wte.weight": (V, H),
        "transformer.wpe.weight": (O.MAX_POS, H),
        "transformer.ln_f.weight": (H,),
        "transformer.ln_f.bias": (H,),
        "transformer.h.0.ln_1.weight": (H,),
        "transformer.h.0.ln_1.bias": (H,),
        "transformer.h.0.attn.c_attn.weight": (H, 3 * H),  # Conv1D: [in, out]
        "transformer.h.0.attn.c_attn.bias": (3 * H,),
        "transformer.h.0.attn.c_proj.weight": (H, H),
        "transformer.h.0.attn.c_proj.bias": (H,),
        "transformer.h.0.ln_2.weight": (H,),
        "transformer.h.0.ln_2.bias": (H,),
        "transformer.h.0.mlp.c_fc.weight": (H, 4 * H),
        "transformer.h.0.mlp.c_fc.bias": (4 * H,),
        "transformer.h.0.mlp.c_proj.weight": (4 * H, H),
        "transformer.h.0.mlp.c_proj.bias": (H,),
    },
    ("bert", True): {
        "embeddings.word_embeddings.weight": (V, H),
        "embeddings.position_embeddings.weight": (O.MAX_POS, H),
        "embeddings.token_type_embeddings.weight": (2, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
        "encoder.layer.0.attention.self.query.weight": (H, H),
        "encoder.layer.0.attention.self.query.bias": (H,),
        "encoder.layer.0.attention.self.key.weight": (H, H),
        "encoder.layer.0.attention.self.key.bias": (H,),
        "encoder.layer.0.attention.self.value.weight": (H, H),
        "encoder.layer.0.attention.self.value.bias": (H,),
        "encoder.layer.0.attention.output.dense.weight": (H, H),
        "encoder.layer.0.attention.output.dense.bias": (H,),
        "encoder.layer.0.attention.output.LayerNorm.weight": (H,),
        "encoder.layer.0.attention.output.LayerNorm.bias": (H,),
        "encoder.layer.0.intermediate.dense.weight": (I, H),
        "encoder.layer.0.intermediate.dense.bias": (I,),
        "encoder.layer.0.output.dense.weight": (H, I),
        "encoder.layer.0.output.dense.bias": (H,),
        "encoder.layer.0.output.LayerNorm.weight": (H,),
        "encoder.layer.0.output.LayerNorm.bias": (H,),
        "pooler.dense.weight": (H, H),
        "pooler.dense.bias": (H,),
    },
}
CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}
CASES = [("qwen2", True), ("qwen2", False), ("llama", None), ("gpt2", None), ("bert", None)]


def _expected(family, tie):
    return EXPECTED[(family, O._DEFAULT_TIE[family] if tie is None else tie)]


@pytest.mark.parametrize("family,tie", CASES)
def test_builds_loads_and_runs(tmp_path, family, tie):
    folder = O.make_hf_model(family, tmp_path / "m", tie=tie)
    assert folder == tmp_path / "m"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == family
    assert cfg["num_hidden_layers" if family != "gpt2" else "n_layer"] == O.LAYERS
    model = O.load_hf(folder)
    assert type(model).__name__ == CLASSES[family]
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(0, O.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
    y = out.last_hidden_state if family == "bert" else out.logits
    assert torch.isfinite(y).all()
    assert y.std() > 0.1  # weights are O(1)-scaled, not HF's near-zero init


@pytest.mark.parametrize("family,tie", CASES)
def test_saved_keys_match_doc(tmp_path, family, tie):
    keys = O.saved_keys(O.make_hf_model(family, tmp_path / "m", tie=tie))
    layer0_and_top = {k: s for k, s in keys.items() if ".1." not in k}
    assert layer0_and_top == _expected(family, tie)
    # layer 1 mirrors layer 0 exactly
    layer1 = {k.replace(".1.", ".0.", 1): s for k, s in keys.items() if ".1." in k}
    assert layer1 == {k: s for k, s in layer0_and_top.items() if ".0." in k}
    if family in ("qwen2", "gpt2") and (tie or tie is None):
        assert "lm_head.weight" not in keys  # tied: the head is not stored


def test_norms_and_biases_randomized_and_roundtrip(tmp_path):
    from safetensors.torch import load_file

    for family, tie in CASES:
        folder = O.make_hf_model(family, tmp_path / f"{family}-{tie}", tie=tie)
        sd = load_file(str(folder / "model.safetensors"))
        norms = [k for k in sd if O._is_norm(k) and k.endswith("weight")]
        biases = [k for k in sd if k.endswith("bias")]
        assert norms, family
        for k in norms:
            assert not torch.allclose(sd[k], torch.ones_like(sd[k])), k
            assert (sd[k] - 1).abs().max() < 1.0, k  # centred on 1, not on 0
        for k in biases:
            assert not torch.allclose(sd[k], torch.zeros_like(sd[k])), k
        # what HF loads is exactly what was saved
        model_sd = O.load_hf(folder).state_dict()
        for k, t in sd.items():
            assert torch.equal(model_sd[k], t), k


def test_deterministic_under_seed(tmp_path):
    from safetensors.torch import load_file

    a = load_file(str(O.make_hf_model("qwen2", tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(O.make_hf_model("qwen2", tmp_path / "b", seed=3) / "model.safetensors"))
    c = load_file(str(O.make_hf_model("qwen2", tmp_path / "c", seed=4) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="v5 config layout")
def test_config_json_layout_v5(tmp_path):
    q = json.loads((O.make_hf_model("qwen2", tmp_path / "q") / "config.json").read_text())
    assert q["rope_parameters"] == {"rope_theta": 1000000.0, "rope_type": "default"}
    assert "rope_theta" not in q and "head_dim" not in q
    assert q["layer_types"] == ["full_attention"] * O.LAYERS
    assert q["use_sliding_window"] is False and q["sliding_window"] is None
    ll = json.loads((O.make_hf_model("llama", tmp_path / "l") / "config.json").read_text())
    assert ll["head_dim"] == O.HIDDEN // O.HEADS and "layer_types" not in ll
    assert "_attn_implementation" not in q and "attn_implementation" not in q


def test_generate_left_padding_matches_unpadded(tmp_path):
    """docs/hf-families.md (e): generate() uses position_ids = cumsum(mask) - 1 (pads -> 0)."""
    model = O.load_hf(O.make_hf_model("qwen2", tmp_path / "q"))
    prompt = torch.tensor([[5, 17, 99, 3, 42]])
    ids = torch.tensor([[0, 0, 0, 5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    alone = model.generate(prompt, **kw)[0, 5:]
    batched = model.generate(ids, attention_mask=mask, **kw)[0, 8:]
    assert alone.tolist() == batched.tolist()

    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"].tolist()), with_kwargs=True)
    model.generate(ids, attention_mask=mask, **{**kw, "max_new_tokens": 2})
    hook.remove()
    assert seen[0] == [[0, 0, 0, 0, 1, 2, 3, 4], list(range(8))]
    assert seen[1] == [[5], [8]]


def test_plain_forward_ignores_mask_for_positions(tmp_path):
    """docs/hf-families.md (e): forward() without position_ids uses arange(T) (+ cache length) for every row."""
    model = O.load_hf(O.make_hf_model("gpt2", tmp_path / "g"))  # absolute positions make the difference visible
    ids = torch.tensor([[0, 0, 0, 5, 17, 99], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        implicit = model(ids, attention_mask=mask).logits
        arange = model(ids, attention_mask=mask, position_ids=torch.arange(6)[None].expand(2, -1)).logits
        cumsum = model(ids, attention_mask=mask, position_ids=torch.tensor([[0, 0, 0, 0, 1, 2], list(range(6))])).logits
        alone = model(ids[:1, 3:]).logits
    assert torch.equal(implicit, arange)
    assert torch.allclose(cumsum[0, 3:], alone[0], atol=1e-5)
    assert not torch.allclose(implicit[0, 3:], alone[0], atol=1e-2)
