"""Generated packages against Hugging Face transformers, float32 on CPU: logits, loss, gradients,
padding masks, greedy generation and the save -> HF load round trip, for every spec in models/."""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import hf_oracle
import pytest
import torch
from dispatch_log import TensorOutputs
from packages import built_packages

ROOT = Path(__file__).resolve().parents[1]
# family -> (spec, generated class, HF's tie default for the tiny model)
CASES = {
    "qwen2": ("qwen2.model", "Qwen2ForCausalLM"),
    "llama": ("llama.model", "LlamaForCausalLM"),
    "gpt2": ("gpt2.model", "GPT2LMHeadModel"),
    "bert": ("bert.model", "BertModel"),
    "mistral": ("mistral.model", "MistralForCausalLM"),
    "qwen3": ("qwen3.model", "Qwen3ForCausalLM"),
    "olmo2": ("olmo2.model", "Olmo2ForCausalLM"),
    "gemma": ("gemma.model", "GemmaForCausalLM"),
    "gemma2": ("gemma2.model", "Gemma2ForCausalLM"),
    "llama3": ("llama.model", "LlamaForCausalLM"),  # Llama 3.1's rotary scaling (rope_type llama3)
    "phi3": ("phi3.model", "Phi3ForCausalLM"),
    "gpt_neox": ("gpt_neox.model", "GPTNeoXForCausalLM"),
    "gpt_neox_seq": ("gpt_neox.model", "GPTNeoXForCausalLM"),  # use_parallel_residual false
    "qwen2_sliding": ("qwen2.model", "Qwen2ForCausalLM"),  # use_sliding_window: layer 1 of 2 slides
    "llama_gelu": ("llama.model", "LlamaForCausalLM"),  # hidden_act = "gelu_pytorch_tanh" from config.json
    "qwen2_relu": ("qwen2.model", "Qwen2ForCausalLM"),  # hidden_act = "relu"
}
PARAMS = [
    ("qwen2", False),
    ("qwen2", True),
    ("llama", None),
    ("gpt2", None),
    ("bert", None),
    ("mistral", None),
    ("qwen3", None),
    ("olmo2", None),
    ("gemma", None),
    ("gemma2", None),
    ("llama3", None),
    ("phi3", None),
    ("gpt_neox", None),
    ("gpt_neox_seq", None),
    ("qwen2_sliding", None),
    ("llama_gelu", None),
    ("qwen2_relu", None),
]


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """Build every spec once; return {family: imported package}."""
    specs = [(ROOT / "models" / spec, None) for spec in dict.fromkeys(spec for spec, _ in CASES.values())]
    with built_packages(tmp_path_factory.mktemp("build"), *specs):
        yield {family: importlib.import_module(spec.removesuffix(".model")) for family, (spec, _) in CASES.items()}


@pytest.fixture(scope="module", params=PARAMS, ids=lambda p: f"{p[0]}-tie{p[1]}" if p[1] is not None else p[0])
def pair(request, packages, tmp_path_factory):
    family, tie = request.param
    folder = hf_oracle.make_hf_model(family, tmp_path_factory.mktemp(family), tie=tie, seed=3)
    hf = hf_oracle.load_hf(folder)
    cls = getattr(packages[family], CASES[family][1])
    ours = cls.from_pretrained(folder)
    return family, folder, hf, ours, packages[family]


def _inputs(family: str, left_pad: bool = False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, hf_oracle.VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :4] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        kwargs["token_type_ids"] = (torch.arange(12) >= 6).long().expand(2, 12).contiguous()
    return kwargs


def _main_output(family: str, out):
    return out.last_hidden_state if family == "bert" else out.logits


def test_outputs_match(pair):
    family, _, hf, ours, _ = pair
    kw = _inputs(family)
    with torch.no_grad():
        a, b = hf(**kw), ours(**kw)
    torch.testing.assert_close(_main_output(family, b), _main_output(family, a))
    if family == "bert":
        torch.testing.assert_close(b.pooler_output, a.pooler_output)


def test_padded_outputs_match_on_real_tokens(pair):
    family, _, hf, ours, _ = pair
    kw = _inputs(family, left_pad=family != "bert")
    if family == "bert":
        kw["attention_mask"][1, 9:] = 0  # right padding for the encoder
    real = kw["attention_mask"].bool()
    if family == "gpt2":  # GPT-2's learned positions follow the padding only when given explicitly
        kw["position_ids"] = (real.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = hf(**kw), ours(**kw)
    torch.testing.assert_close(_main_output(family, b)[real], _main_output(family, a)[real])


def test_loss_and_gradients_match(pair):
    family, _, hf, ours, pkg = pair
    if family == "bert":
        pytest.skip("BertModel has no task head, so no loss; its gradients are checked in test_bert_gradients")
    kw = _inputs(family)
    labels = kw["input_ids"].clone()
    labels[0, :5] = -100
    hf.zero_grad()
    ours.zero_grad()
    a = hf(**kw, labels=labels)
    b = ours(**kw, labels=labels)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    _compare_grads(hf, ours, pkg)


def test_bert_gradients(packages, tmp_path):
    folder = hf_oracle.make_hf_model("bert", tmp_path, seed=5)
    hf = hf_oracle.load_hf(folder)
    pkg = packages["bert"]
    ours = pkg.BertModel.from_pretrained(folder)
    kw = _inputs("bert")
    a, b = hf(**kw), ours(**kw)
    weight = torch.randn_like(a.last_hidden_state)
    ((a.last_hidden_state * weight).sum() + a.pooler_output.sum()).backward()
    ((b.last_hidden_state * weight).sum() + b.pooler_output.sum()).backward()
    _compare_grads(hf, ours, pkg)


# checkpoint key -> transformers' in-memory name, where transformers 5 renames on load only (its conversion
# mapping): GPT-NeoX's head is `embed_out.weight` in the file (ours too, saved through the spec's rule)
FILE_NAMES = {"embed_out.weight": "lm_head.weight"}


def _compare_grads(hf, ours, pkg):
    """Map our gradients to checkpoint names through the spec's layout rules, then compare each."""
    from importlib import import_module

    write_state = import_module(f"{pkg.__name__}.checkpoint").write_state
    grads = {n: p.grad for n, p in ours.named_parameters(remove_duplicate=False)}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    ours_by_ckpt = write_state(grads, type(ours).layout_rules, ours.tied_parameters())
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    prefix = getattr(hf, "base_model_prefix", "")
    for name, g in ours_by_ckpt.items():
        name = FILE_NAMES.get(name, name)
        ref = hf_grads.get(name, hf_grads.get(name.removeprefix(prefix + ".")))
        assert ref is not None, f"HF has no parameter {name}"
        torch.testing.assert_close(g, ref, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_greedy_generation_matches(pair):
    family, _, hf, ours, _ = pair
    if family == "bert":
        pytest.skip("BertModel is an encoder: no generation")
    kw = _inputs(family, left_pad=True)
    expected = hf.generate(**kw, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = ours.generate(kw["input_ids"], attention_mask=kw["attention_mask"], max_new_tokens=16, pad_token_id=0)
    assert torch.equal(got, expected), f"generated {got.tolist()} != HF {expected.tolist()}"


def test_save_pretrained_round_trips_through_hf(pair, tmp_path):
    family, folder, hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    again = hf_oracle.load_hf(tmp_path)
    kw = _inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(_main_output(family, again(**kw)), _main_output(family, hf(**kw)), rtol=0, atol=0)


def test_training_mode_uses_fused_loss_and_matches(pair):
    """In training, causal LMs compute the loss chunk by chunk (no logits); loss and gradients still match."""
    family, _, hf, ours, pkg = pair
    if family == "bert":
        pytest.skip("no causal-LM head")
    kw = _inputs(family)
    labels = kw["input_ids"].clone()
    labels[1, :7] = -100
    hf.zero_grad()
    ours.zero_grad()
    a = hf(**kw, labels=labels)
    ours.train()
    try:
        b = ours(**kw, labels=labels)
    finally:
        ours.eval()
    assert b.logits is None, "training with labels must not materialize the logits"
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    _compare_grads(hf, ours, pkg)


def test_gemma2_final_softcap_runs_in_the_fused_loss_chunks(packages, tmp_path, monkeypatch):
    """Gemma 2's final soft-cap follows its head, inside the chunks of the fused loss: training with labels
    never allocates the [tokens, vocab] logits (forward or backward; chunks of 8 of the 24 tokens), the cap
    runs per chunk, and loss and gradients match HF. The kept positions' logits are capped too."""
    pkg = packages["gemma2"]
    folder = hf_oracle.make_hf_model("gemma2", tmp_path, seed=3)
    hf = hf_oracle.load_hf(folder)
    ours = pkg.Gemma2ForCausalLM.from_pretrained(folder)
    assert ours.loss_head == ("lm_head", "weight", "bias") and ours.logit_softcap() == 5.0
    losses = importlib.import_module(f"{pkg.__name__}.losses")
    chunk, vocab, hidden = 8, hf_oracle.VOCAB, hf_oracle.HIDDEN
    budget = chunk * losses.chunk_buffer_bytes(vocab, torch.float32, softcap=True)
    monkeypatch.setattr(losses, "MIN_CHUNK_BYTES", budget)  # small chunks at this tiny size: 3 of 8 tokens
    monkeypatch.setattr(losses, "MAX_CHUNK_BYTES", budget)
    kw = _inputs("gemma2")
    labels = kw["input_ids"].clone()
    labels[0, :4] = -100
    ours.train()
    try:
        with TensorOutputs() as shapes:
            out = ours(**kw, labels=labels)
            out.loss.backward()
    finally:
        ours.eval()
    a = hf(**kw, labels=labels)
    a.loss.backward()
    torch.testing.assert_close(out.loss, a.loss)
    _compare_grads(hf, ours, pkg)
    weights = {(vocab, hidden), (hidden, vocab)}  # the head / embedding matrix and its transpose
    wide = [(s, f) for _, f, s in shapes.outputs if vocab in s and s not in weights]
    rows = max(math.prod(s) // vocab for s, _ in wide)
    assert rows == chunk, f"a tensor holds the logits of {rows} tokens: {max(wide, key=lambda w: math.prod(w[0]))}"
    assert any("tanh" in f and s == (chunk, vocab) for s, f in wide), "the cap did not run on a chunk"
    with torch.no_grad():
        torch.testing.assert_close(ours(**kw, logits_to_keep=3).logits, hf(**kw, logits_to_keep=3).logits)


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama_gelu", "qwen2_relu"])
def test_triton_path_matches_hf(packages, family, tmp_path):
    """Every fused region through its generated Triton kernels (TRITON_INTERPRET=1 on CPU): logits,
    loss and all gradients still match Hugging Face."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set: the Triton path cannot run")
    pkg = packages[family]
    folder = hf_oracle.make_hf_model(family, tmp_path, seed=7)
    hf = hf_oracle.load_hf(folder)
    ours = getattr(pkg, CASES[family][1]).from_pretrained(folder)
    kernels = importlib.import_module(f"{pkg.__name__}.kernels")
    kw = _inputs(family)
    labels = kw["input_ids"].clone()
    labels[0, :3] = -100
    kernels.set_backend("triton")
    try:
        b = ours(**kw, labels=labels)
        b.loss.backward()
    finally:
        kernels.set_backend("auto")
    a = hf(**kw, labels=labels)
    a.loss.backward()
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.loss, a.loss)
    _compare_grads(hf, ours, pkg)


def test_gpt_neox_loads_the_hub_name_embed_out(packages, tmp_path):
    """transformers 5 writes GPT-NeoX's head as the hub's `embed_out.weight` (its state dict says lm_head); the
    spec's rename rule loads it, and our save writes it back under that file name, as transformers does."""
    folder = hf_oracle.make_hf_model("gpt_neox", tmp_path / "hf", seed=11)
    keys = hf_oracle.saved_keys(folder)
    assert "embed_out.weight" in keys and "lm_head.weight" not in keys
    hf = hf_oracle.load_hf(folder)
    ours = packages["gpt_neox"].GPTNeoXForCausalLM.from_pretrained(folder)
    kw = _inputs("gpt_neox")
    with torch.no_grad():
        torch.testing.assert_close(ours(**kw).logits, hf(**kw).logits)
    ours.save_pretrained(tmp_path / "saved")
    assert hf_oracle.saved_keys(tmp_path / "saved") == keys  # the very keys transformers wrote
    with torch.no_grad():
        torch.testing.assert_close(hf_oracle.load_hf(tmp_path / "saved")(**kw).logits, hf(**kw).logits)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_embedding_scale_is_rounded_to_the_dtype(packages, family, tmp_path):
    """In bfloat16 transformers multiplies the embeddings by sqrt(hidden_size) rounded to bf16 (6.9375 for a
    width of 48, not 6.928; 55.5 for Gemma 7B's 3072): the first layer's input is bitwise HF's hidden_states[0]."""
    config = hf_oracle._config(family, True)
    config.hidden_size = 48  # sqrt(48) is not a bfloat16 number
    config._attn_implementation = hf_oracle.ATTN_IMPL
    hf = hf_oracle._model_class(family)(config).eval()
    hf_oracle.randomize_(hf, seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    hf = hf.to(torch.bfloat16)
    ours = getattr(packages[family], CASES[family][1]).from_pretrained(tmp_path, dtype=torch.bfloat16)
    seen = []
    handle = ours.model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    kw = _inputs(family)
    try:
        with torch.no_grad():
            want = hf(**kw, output_hidden_states=True).hidden_states[0]
            ours(**kw)
    finally:
        handle.remove()
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], want)


@pytest.mark.parametrize("legacy", ["su", "yarn"])
def test_phi3_legacy_rope_types_load_as_longrope(packages, tmp_path, legacy):
    """Older Phi-3 config.json files write transformers 4's `rope_scaling` with type "su" (longrope's old name)
    or "yarn" (Phi-3's own, the same short/long factors): transformers' Phi3Config reads both as longrope, and
    so does ours; logits match HF's with the prompt inside the 16-token original context (short factors) and
    past it (long factors), and greedy generation across the switch matches."""
    import json

    folder = hf_oracle.make_hf_model("phi3", tmp_path, seed=5)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    rope = data.pop("rope_parameters", None) or data.pop("rope_scaling")
    data["rope_theta"] = rope.pop("rope_theta", data.get("rope_theta", 10000.0))
    data["partial_rotary_factor"] = rope.pop("partial_rotary_factor", data.get("partial_rotary_factor"))
    rope.pop("rope_type", None)
    data["rope_scaling"] = {"type": legacy, **rope}  # as microsoft/Phi-3-mini-128k-instruct's first config.json
    path.write_text(json.dumps(data))
    hf = hf_oracle.load_hf(folder)
    assert hf.config.rope_parameters["rope_type"] == "longrope"  # transformers' own reading of the legacy type
    ours = packages["phi3"].Phi3ForCausalLM.from_pretrained(folder)
    assert ours.config.rope_type == "longrope" and ours.config.hf_rope_type == legacy
    assert ours.config.rope_long_factor == rope["long_factor"]
    g = torch.Generator().manual_seed(1)
    for length in (12, 24):  # short factors; past original_max_position_embeddings = 16: long factors
        ids = torch.randint(3, hf_oracle.VOCAB, (2, length), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, hf(ids).logits)
    ids = torch.randint(3, hf_oracle.VOCAB, (1, 10), generator=g)
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, pad_token_id=0), expected)
