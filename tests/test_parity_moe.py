"""Mixture-of-experts specs (models/mixtral.model, qwen2_moe.model, qwen3_moe.model) against Hugging Face transformers,
float32 on CPU: logits, loss with the router's load-balancing loss, every gradient by HF's parameter name,
left-padded masks, greedy generation, the save -> HF load round trip in HF's per-expert file layout, and
that each expert runs only on the tokens routed to it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import MODELS, built_packages
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

EXPERTS, TOP_K = 4, 2
# family -> (spec, generated class, HF class name, tiny config)
CASES = {
    "mixtral": (
        "mixtral.model",
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, rms_norm_eps=1e-5),
    ),
    "qwen2_moe": (
        "qwen2_moe.model",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            intermediate_size=96,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            rms_norm_eps=1e-6,
        ),
    ),
    "qwen3_moe": (
        "qwen3_moe.model",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(
            intermediate_size=96, moe_intermediate_size=20, num_experts=EXPERTS, num_experts_per_tok=TOP_K, head_dim=24
        ),
    ),
}
# (family, config overrides): Mixtral with a sliding window too, Qwen2-MoE with and without renormalized top-k
# weights, and the Qwens with dense layers among the sparse ones (`mlp_only_layers`, `decoder_sparse_step`)
PARAMS = [
    ("mixtral", {}),
    ("mixtral", {"sliding_window": 4}),  # each query sees itself and the 3 keys before it
    ("qwen2_moe", {}),
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [1]}),  # experts in layers 0, 2, 3
    ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),  # experts in layers 1, 3
    ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [1], "decoder_sparse_step": 2}),  # in layer 3 only
]


def sparse_layers(hf) -> list[int]:
    """The layers of an HF model that hold experts (its SparseMoeBlock), by transformers' own rule."""
    return [i for i, layer in enumerate(hf.model.layers) if type(layer.mlp).__name__.endswith("SparseMoeBlock")]


def make_hf_model(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random HF model of `family` (4 experts, top-2, hidden 64), every weight randomized, saved."""
    import transformers as tf

    _, _, config_name, sizes = CASES[family]
    values = dict(
        vocab_size=hf_oracle.VOCAB,
        hidden_size=hf_oracle.HIDDEN,
        num_hidden_layers=hf_oracle.LAYERS,
        num_attention_heads=hf_oracle.HEADS,
        num_key_value_heads=hf_oracle.KV_HEADS,
        max_position_embeddings=hf_oracle.MAX_POS,
        bos_token_id=hf_oracle.BOS,
        eos_token_id=hf_oracle.EOS,
        **sizes,
    )
    config = getattr(tf, config_name)(**{**values, **overrides})
    config._attn_implementation = hf_oracle.ATTN_IMPL
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    hf_oracle.randomize_(model, seed)
    model.save_pretrained(folder)
    return folder


def load_hf(folder: Path, experts: str | None = None):
    """The HF model, float32; `experts`: transformers' experts implementation (default: its own default, the
    `grouped_mm` kernel; "eager": the reference loop over experts)."""
    import transformers as tf

    extra = {"experts_implementation": experts} if experts else {}
    model = tf.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation=hf_oracle.ATTN_IMPL, **extra
    )
    return model.eval()


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    specs = [(MODELS / spec, None) for spec, *_ in CASES.values()]
    with built_packages(tmp_path_factory.mktemp("build"), *specs):
        yield {family: importlib.import_module(spec.removesuffix(".model")) for family, (spec, *_) in CASES.items()}


@pytest.fixture(scope="module", params=PARAMS, ids=lambda p: p[0] + "".join(f"-{k}={v}" for k, v in p[1].items()))
def pair(request, packages, tmp_path_factory):
    family, overrides = request.param
    folder = make_hf_model(family, tmp_path_factory.mktemp(family), seed=3, **overrides)
    ours = getattr(packages[family], CASES[family][1]).from_pretrained(folder)
    return family, folder, load_hf(folder), ours


def _inputs(left_pad: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, hf_oracle.VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _labels(kw: dict) -> torch.Tensor:
    labels = kw["input_ids"].clone()
    labels[0, :5] = -100  # the padded positions (and the one whose next token is the first real one)
    return labels


def _compare_grads(hf, ours) -> None:
    """Our parameter names are HF's in-memory names (the stacked `mlp.experts.gate_up_proj` too): compare each."""
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours_grads = dict(ours.named_parameters())
    assert set(ours_grads) == set(hf_grads), sorted(set(ours_grads) ^ set(hf_grads))
    for name, p in ours_grads.items():
        assert p.grad is not None, f"no gradient reached {name}"
        torch.testing.assert_close(p.grad, hf_grads[name], msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_outputs_match(pair):
    _, _, hf, ours = pair
    kw = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**kw).logits, hf(**kw).logits)


def test_padded_outputs_match_on_real_tokens(pair):
    _, _, hf, ours = pair
    kw = _inputs(left_pad=True)
    real = kw["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(**kw).logits[real], hf(**kw).logits[real])


def test_loss_and_gradients_match(pair):
    _, _, hf, ours = pair
    kw = _inputs()
    hf.zero_grad()
    ours.zero_grad()
    a, b = hf(**kw, labels=_labels(kw)), ours(**kw, labels=_labels(kw))
    assert b.aux_loss is None and b.router_logits is None  # output_router_logits is off by default, as in HF
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    _compare_grads(hf, ours)


def test_loss_and_gradients_match_the_eager_experts_loop(pair):
    """The same against transformers' reference implementation of the experts (a loop over the experts hit)."""
    _, folder, _, ours = pair
    hf = load_hf(folder, experts="eager")
    assert hf.config._experts_implementation == "eager"
    kw = _inputs()
    ours.zero_grad()
    a, b = hf(**kw, labels=_labels(kw)), ours(**kw, labels=_labels(kw))
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    _compare_grads(hf, ours)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-fused-loss"])
def test_router_logits_aux_loss_and_gradients_match(pair, training):
    """output_router_logits=True on a left-padded batch: each layer's router logits, the load-balancing loss over
    the real tokens, the loss with router_aux_loss_coef * aux_loss added, and every gradient through it."""
    _, _, hf, ours = pair
    kw = _inputs(left_pad=True)
    hf.zero_grad()
    ours.zero_grad()
    a = hf(**kw, labels=_labels(kw), output_router_logits=True)
    ours.train(training)
    try:
        b = ours(**kw, labels=_labels(kw), output_router_logits=True)
    finally:
        ours.eval()
    assert type(b).__name__ == "MoeCausalLMOutput" and (b.logits is None) == training
    real = kw["attention_mask"].reshape(-1).bool()
    assert len(b.router_logits) == len(a.router_logits) == len(sparse_layers(hf))  # the sparse layers' routers only
    for x, y in zip(b.router_logits, a.router_logits):
        assert x.shape == (24, EXPERTS)
        torch.testing.assert_close(x[real], y[real])
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    assert b.aux_loss > 0
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    _compare_grads(hf, ours)


def test_output_router_logits_reads_the_config(pair, tmp_path):
    family, folder, hf, _ = pair
    config = json.loads((folder / "config.json").read_text())
    config["output_router_logits"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    pkg = importlib.import_module(CASES[family][0].removesuffix(".model"))
    ours = getattr(pkg, CASES[family][1]).from_pretrained(tmp_path)
    kw = _inputs()
    with torch.no_grad():
        out = ours(**kw)
        torch.testing.assert_close(out.aux_loss, hf(**kw, output_router_logits=True).aux_loss)
        assert ours(**kw, output_router_logits=False).aux_loss is None


def test_greedy_generation_matches(pair):
    _, _, hf, ours = pair
    kw = _inputs(left_pad=True)
    expected = hf.generate(**kw, max_new_tokens=16, do_sample=False, pad_token_id=0)
    # the same settings as HF's call: a row that reaches EOS is padded with pad_token_id
    got = ours.generate(kw["input_ids"], attention_mask=kw["attention_mask"], max_new_tokens=16, pad_token_id=0)
    assert torch.equal(got, expected), f"generated {got.tolist()} != HF {expected.tolist()}"


def test_save_pretrained_writes_hf_files_back_through_the_rules(pair, tmp_path):
    """save_pretrained unstacks the experts into the per-expert keys (and Mixtral's `block_sparse_moe` names)
    that transformers itself saves, bit for bit, and transformers loads them with equal logits."""
    _, folder, hf, ours = pair
    ours.save_pretrained(tmp_path)
    saved, original = load_file(str(tmp_path / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(original), sorted(set(saved) ^ set(original))
    assert any(".experts.3." in k for k in saved)
    for key in original:
        torch.testing.assert_close(saved[key], original[key], rtol=0, atol=0, msg=key)
    kw = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path)(**kw).logits, hf(**kw).logits, rtol=0, atol=0)


class _ExpertRows(TorchDispatchMode):
    """The rows of every matmul against one expert's [2 * I, H] gate-up slice, in call order."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            if b.shape[-1] == self.width and a.shape[-1] == hf_oracle.HIDDEN:
                self.rows.append(a.shape[0])
        return func(*args, **(kwargs or {}))


def test_each_expert_runs_only_on_its_tokens(pair):
    """Each expert's gate-up matmul takes exactly the tokens routed to it (no expert sees every token): per
    layer, the row counts are the router's top-k counts per expert, N * k rows in all instead of N * E."""
    family, _, hf, ours = pair
    kw = _inputs()
    width = 2 * CASES[family][3].get("moe_intermediate_size", CASES[family][3]["intermediate_size"])
    with torch.no_grad():
        routed = ours(**kw, output_router_logits=True).router_logits
        counter = _ExpertRows(width)
        with counter:
            ours(**kw)
    tokens = kw["input_ids"].numel()
    want = []
    for logits in routed:
        chosen = torch.topk(torch.softmax(logits.float(), dim=-1), TOP_K, dim=-1).indices
        want += [c for c in torch.bincount(chosen.reshape(-1), minlength=EXPERTS).tolist() if c]
    assert counter.rows == want
    sparse = len(sparse_layers(hf))
    assert sum(counter.rows) == sparse * tokens * TOP_K < sparse * tokens * EXPERTS


def test_a_missing_expert_is_reported(pair, tmp_path):
    family, folder, hf, _ = pair
    tensors = load_file(str(folder / "model.safetensors"))
    layer = sparse_layers(hf)[-1]
    gone = [k for k in tensors if f".layers.{layer}." in k and ".experts.2." in k]
    assert gone
    save_file({k: v for k, v in tensors.items() if k not in gone}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    pkg = importlib.import_module(CASES[family][0].removesuffix(".model"))
    with pytest.raises(pkg.CheckpointError, match=r"experts must be numbered 0 to 3, but 2 is missing"):
        getattr(pkg, CASES[family][1]).from_pretrained(tmp_path)


def test_triton_path_matches_hf(packages, tmp_path):
    """The fused regions of an MoE model (norms, rotary, the experts' silu(gate) * up) through their Triton
    kernels (TRITON_INTERPRET=1 on CPU): logits, loss and every gradient still match."""
    import os

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set: the Triton path cannot run")
    pkg = packages["mixtral"]
    folder = make_hf_model("mixtral", tmp_path, seed=7)
    hf, ours = load_hf(folder), pkg.MixtralForCausalLM.from_pretrained(folder)
    kernels = importlib.import_module(f"{pkg.__name__}.kernels")
    kw = _inputs()
    kernels.set_backend("triton")
    try:
        b = ours(**kw, labels=_labels(kw))
        b.loss.backward()
    finally:
        kernels.set_backend("auto")
    a = hf(**kw, labels=_labels(kw))
    a.loss.backward()
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.loss, a.loss)
    _compare_grads(hf, ours)


def test_cuda_graph_decoding_is_refused_with_the_reason(pair):
    """Each expert's token count is read on the host, which a CUDA graph cannot capture: generate() never picks
    the CUDA-graph decoder for an MoE model and says why when asked for it."""
    _, _, _, ours = pair
    assert type(ours).graph_capturable is False
    kw = _inputs()
    with pytest.raises(ValueError, match="cuda_graph=True: .* reads sizes on the host"):
        ours.generate(kw["input_ids"], max_new_tokens=2, cuda_graph=True)


def test_hidden_states_and_router_logits_together(pair):
    _, _, hf, ours = pair
    kw = _inputs()
    with torch.no_grad():
        a = hf(**kw, output_hidden_states=True, output_router_logits=True)
        b = ours(**kw, output_hidden_states=True, output_router_logits=True)
    assert len(b.hidden_states) == len(a.hidden_states) == hf.config.num_hidden_layers + 1
    for x, y in zip(b.hidden_states, a.hidden_states):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    assert list(b.keys()) == ["aux_loss", "logits", "hidden_states", "router_logits"]  # HF's field order


def test_each_layer_holds_the_mlp_transformers_chose(pair):
    """`mlp = SparseMoeBlock() if sparse else GatedMLP(...)`: layer by layer, experts where transformers'
    DecoderLayer puts them (mlp_only_layers, decoder_sparse_step) and its dense MLP elsewhere, under its names."""
    family, _, hf, ours = pair
    if family == "mixtral":
        pytest.skip("Mixtral has experts in every layer")
    kinds = [type(layer.mlp).__name__ for layer in ours.model.layers]
    sparse = sparse_layers(hf)
    assert kinds == ["SparseMoeBlock" if i in sparse else "GatedMLP" for i in range(len(kinds))]
    dense = [i for i in range(len(kinds)) if i not in sparse]
    names = dict(ours.named_parameters())
    for i in dense:
        assert f"model.layers.{i}.mlp.gate_proj.weight" in names and f"model.layers.{i}.mlp.gate.weight" not in names
        assert names[f"model.layers.{i}.mlp.gate_proj.weight"].shape == (
            CASES[family][3]["intermediate_size"],
            hf_oracle.HIDDEN,
        )


def test_a_config_without_routed_layers_loads_and_its_aux_loss_is_zero(packages, tmp_path):
    """Every layer dense (decoder_sparse_step beyond the layer count): the expert rules and the router line
    apply to no layer, which is not an error. transformers' own loss raises IndexError here with
    output_router_logits; ours is 0, there being nothing to balance."""
    folder = make_hf_model("qwen2_moe", tmp_path, seed=3, decoder_sparse_step=3)
    hf = load_hf(folder)
    assert sparse_layers(hf) == []
    ours = packages["qwen2_moe"].Qwen2MoeForCausalLM.from_pretrained(folder)
    kw = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**kw).logits, hf(**kw).logits, rtol=1e-4, atol=1e-5)
        out = ours(**kw, labels=_labels(kw), output_router_logits=True)
        expected = hf(**kw, labels=_labels(kw)).loss
    assert out.router_logits == () and float(out.aux_loss) == 0.0
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
