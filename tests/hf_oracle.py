"""Numerical oracle: tiny, fully random Hugging Face models saved to disk.

Helper module imported by tests (not a test file). Nothing is downloaded: every model is built from
a config written here, randomized deterministically from ``seed`` and saved with ``save_pretrained``.

* ``make_hf_model(family, tmp_dir, tie=None, seed=0)`` writes ``config.json`` + ``model.safetensors``
  (+ ``generation_config.json`` for the causal LMs) into ``tmp_dir`` and returns it.
* ``load_hf(folder)`` loads it back as the matching HF class, float32, eval mode.

Attention implementation: ``"eager"``. It is HF's reference path: the explicit
``softmax(q k^T * scale + additive_mask)`` that the docs in ``docs/hf-families.md`` describe, with a finite
additive mask (``finfo(float32).min``), so fully-masked (padding) query rows come out finite and
deterministic (uniform attention) instead of depending on which SDPA kernel torch picks. Pass
``attn_implementation="sdpa"`` to ``load_hf`` to compare against the SDPA path as well.

Every parameter is overwritten (HF inits norms to 1 and biases to 0, which hides bugs such as a
forgotten norm weight, a swapped bias or a Gemma-style ``1 + w``):

* norm weights (RMSNorm / LayerNorm ``weight``): ``1 + N(0, 0.1)``
* every bias (LayerNorm bias, linear / Conv1D bias): ``N(0, 0.1)``
* embedding tables (token, position, token type): ``N(0, 0.5)``
* matrices: ``N(0, fan_in ** -0.5)`` so activations stay O(1) and attention is not near-uniform
  (fan_in is ``shape[1]`` for ``nn.Linear`` and ``shape[0]`` for GPT-2's ``Conv1D``, whose weight is
  ``[in, out]``).

Parameters are visited in sorted-name order with a private ``torch.Generator`` seeded from ``seed``,
so the weights depend only on ``(family, tie, seed)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FAMILIES = (
    "qwen2",
    "llama",
    "gpt2",
    "bert",
    "mistral",
    "qwen3",
    "olmo2",
    "gemma",
    "gemma2",
    "llama3",
    "phi3",
    "gpt_neox",
    "gpt_neox_seq",
    "qwen2_sliding",
    "llama_gelu",
    "qwen2_relu",
)
# families that are another family with a non-default activation (config.json's hidden_act, HF's ACT2FN name)
ACTIVATION_VARIANTS = {"llama_gelu": ("llama", "gelu_pytorch_tanh"), "qwen2_relu": ("qwen2", "relu")}

# Sizes shared by all families (tiny: each model builds + saves in well under a second).
VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4  # head_dim = 16
KV_HEADS = 2  # GQA for qwen2 / llama: 2 query heads per kv head
INTERMEDIATE = 96
MAX_POS = 64
BOS, EOS = 1, 2

ATTN_IMPL = "eager"

# tie_word_embeddings default per family when ``tie`` is None (HF's config defaults).
_DEFAULT_TIE = {
    "qwen2": False,
    "llama": False,
    "gpt2": True,
    "bert": True,
    "mistral": False,
    "qwen3": False,
    "olmo2": False,
    "gemma": True,
    "gemma2": True,
    "llama3": False,
    "phi3": False,
    "gpt_neox": False,
    "gpt_neox_seq": False,
    "qwen2_sliding": False,
    "llama_gelu": False,
    "qwen2_relu": False,
}
WINDOW = 4  # sliding window of the tiny mistral / qwen3: shorter than the test sequences (12 + 16 generated)


def _transformers():
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    return tf


def _rope(theta: float, rope_type: str = "default", **scaling) -> dict:
    """RoPE settings as the installed transformers wants them: v5 ``rope_parameters``, v4 ``rope_theta`` and
    ``rope_scaling``."""
    import transformers as tf

    if int(tf.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **scaling}}
    if rope_type == "default":
        return {"rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": rope_type, **scaling}}


def _config(family: str, tie: bool):
    tf = _transformers()

    if family in ACTIVATION_VARIANTS:
        base, act = ACTIVATION_VARIANTS[family]
        config = _config(base, tie)
        config.hidden_act = act
        return config
    common = dict(vocab_size=VOCAB, tie_word_embeddings=tie)
    if family in ("qwen2", "qwen2_sliding"):
        # qwen2_sliding: use_sliding_window on, layer 0 full and layer 1 sliding (HF's layer_types from
        # max_window_layers), the window shorter than the test sequences.
        sliding = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        return tf.Qwen2Config(
            **(sliding if family == "qwen2_sliding" else {}),
            **common,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POS,
            rms_norm_eps=1e-6,
            # Qwen2 checkpoints use 1e6 (not the 1e4 default): catches a hard-coded base.
            **_rope(1000000.0),
            attention_dropout=0.0,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    if family in ("llama", "llama3"):
        # llama3: Llama 3.1's rotary scaling with a 16-token original context, so the test sequences (12 + 16
        # generated) use scaled low frequencies; the llama.model spec reads it from the rope dict.
        rope = (
            _rope(
                500000.0,
                "llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
            if family == "llama3"
            else _rope(10000.0)
        )
        return tf.LlamaConfig(
            **common,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POS,
            rms_norm_eps=1e-5,
            **rope,
            attention_dropout=0.0,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            **common,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POS,
            n_inner=None,  # as in the real GPT-2 checkpoints: 4 * n_embd = 256
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            layer_norm_epsilon=1e-5,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    if family == "bert":
        return tf.BertConfig(
            **common,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            type_vocab_size=2,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=1e-12,
            pad_token_id=0,
        )
    decoder = dict(
        **common,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        attention_dropout=0.0,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    if family == "mistral":
        return tf.MistralConfig(**decoder, head_dim=HIDDEN // HEADS, sliding_window=WINDOW, **_rope(10000.0))
    if family == "qwen3":
        # Layer 0 full attention, layer 1 sliding (HF's layer_types from max_window_layers): per-layer windows.
        return tf.Qwen3Config(
            **decoder,
            head_dim=HIDDEN // HEADS,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            **_rope(1000000.0),
        )
    if family == "olmo2":
        return tf.Olmo2Config(**decoder, rms_norm_eps=1e-6, pad_token_id=0, **_rope(500000.0))
    if family == "gemma":
        return tf.GemmaConfig(
            **decoder, head_dim=HIDDEN // HEADS, hidden_act="gelu_pytorch_tanh", pad_token_id=0, **_rope(10000.0)
        )
    if family == "gemma2":
        # HF's default layer_types: layer 0 slides, layer 1 is global. Small caps, so both bend the random
        # model's scores and logits; query_pre_attn_scalar is not head_dim, so the scale must come from it.
        return tf.Gemma2Config(
            **decoder,
            head_dim=HIDDEN // HEADS,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=5.0,
            pad_token_id=0,
            **_rope(10000.0),
        )
    if family == "phi3":
        # Phi-3.5-style longrope over half of each head (partial rotary), a 16-token original context (the
        # prompt uses short_factor, generation past it long_factor) and a sliding window.
        rope = _rope(
            10000.0,
            "longrope",
            partial_rotary_factor=0.5,
            short_factor=[1.0, 1.25, 1.5, 2.0],
            long_factor=[2.0, 4.0, 6.0, 8.0],
        )
        return tf.Phi3Config(
            **decoder, original_max_position_embeddings=16, sliding_window=WINDOW, pad_token_id=0, **rope
        )
    if family in ("gpt_neox", "gpt_neox_seq"):
        # Pythia's shape: rotary on a quarter of each head (rotary_pct), biases everywhere; gpt_neox_seq is the
        # sequential residual (use_parallel_residual false).
        return tf.GPTNeoXConfig(
            **common,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            hidden_act="gelu",
            use_parallel_residual=family == "gpt_neox",
            attention_dropout=0.0,
            hidden_dropout=0.0,
            bos_token_id=BOS,
            eos_token_id=EOS,
            **_rope(10000.0, partial_rotary_factor=0.25),
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _model_class(family: str):
    tf = _transformers()

    return {
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen2_sliding": tf.Qwen2ForCausalLM,
        "qwen2_relu": tf.Qwen2ForCausalLM,
        "llama_gelu": tf.LlamaForCausalLM,
        "llama": tf.LlamaForCausalLM,
        "llama3": tf.LlamaForCausalLM,
        "phi3": tf.Phi3ForCausalLM,
        "gpt_neox": tf.GPTNeoXForCausalLM,
        "gpt_neox_seq": tf.GPTNeoXForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
        "bert": tf.BertModel,
        "mistral": tf.MistralForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "olmo2": tf.Olmo2ForCausalLM,
        "gemma": tf.GemmaForCausalLM,
        "gemma2": tf.Gemma2ForCausalLM,
    }[family]


def _is_norm(name: str) -> bool:
    low = name.lower()
    return "norm" in low or ".ln_" in low or low.startswith("ln_") or "layernorm" in low


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter of ``model`` deterministically (see the module docstring)."""
    from transformers.pytorch_utils import Conv1D

    conv1d_weights = {f"{mn}.weight" for mn, m in model.named_modules() if isinstance(m, Conv1D)}
    gen = torch.Generator().manual_seed(seed)
    # named_parameters() drops duplicates, so a tied lm_head is randomized once, through the embedding.
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("bias"):
            value = noise * 0.1
        elif _is_norm(name):
            value = 1.0 + noise * 0.1
        elif p.ndim == 2 and ("embed" in name or name.split(".")[-2] in ("wte", "wpe")):
            value = noise * 0.5
        elif p.ndim == 2:
            fan_in = p.shape[0] if name in conv1d_weights else p.shape[1]
            value = noise / math.sqrt(fan_in)
        else:
            value = noise * 0.1
        p.copy_(value.to(p.dtype))


def make_hf_model(family: str, tmp_dir: Path, *, tie: bool | None = None, seed: int = 0) -> Path:
    """Build a tiny random HF model of ``family`` and ``save_pretrained`` it into ``tmp_dir``.

    ``tie`` sets ``tie_word_embeddings`` (``None``: the family's HF default, False for qwen2/llama,
    True for gpt2; BertModel has no LM head so it only changes config.json). Returns ``tmp_dir``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    tie = _DEFAULT_TIE[family] if tie is None else bool(tie)
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)

    config = _config(family, tie)
    config._attn_implementation = ATTN_IMPL
    torch.manual_seed(seed)  # HF's own init draws from the global RNG; we overwrite it anyway
    model = _model_class(family)(config).to(torch.float32).eval()
    randomize_(model, seed)
    if tie and hasattr(model, "lm_head"):
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_dir, safe_serialization=True)
    return tmp_dir


def family_of(folder: Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text())["model_type"]


def load_hf(folder: Path, *, attn_implementation: str = ATTN_IMPL):
    """Load a folder written by ``make_hf_model`` as the HF model (float32, eval mode).

    qwen2 -> Qwen2ForCausalLM, llama -> LlamaForCausalLM, gpt2 -> GPT2LMHeadModel, bert -> BertModel.
    """
    tf = _transformers()

    family = family_of(folder)
    auto = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    model = auto.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn_implementation)
    expected = _model_class(family)
    if type(model) is not expected:  # pragma: no cover - a transformers change
        raise TypeError(f"{folder}: loaded {type(model).__name__}, expected {expected.__name__}")
    return model.eval()


def saved_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of ``folder/model.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
