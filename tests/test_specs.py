"""Every spec in models/: checks clean, gives the published parameter counts, and names its weights as
Hugging Face's own model of that family does (through the spec's checkpoint layout rules, if any)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dslc.api import check_file

MODELS = Path(__file__).resolve().parent.parent / "models"
SPECS = sorted(p.stem for p in MODELS.glob("*.model"))


def spec(name: str) -> Path:
    return MODELS / f"{name}.model"


# ---- every spec checks clean -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_spec_checks_clean(name):
    checked = check_file(spec(name))
    assert checked.warnings == [], [d.message for d in checked.warnings]
    assert checked.program.param_count > 0


def test_every_family_has_a_spec():
    assert {
        "qwen2",
        "llama",
        "gpt2",
        "bert",
        "mistral",
        "qwen3",
        "olmo2",
        "gemma",
        "gemma2",
        "phi3",
        "gpt_neox",
    } <= set(SPECS)


# ---- published parameter counts (tied weights counted once, as safetensors stores them) ------------

PUBLISHED = [
    ("qwen2", "0.5b", 494_032_768),  # Qwen/Qwen2-0.5B
    ("qwen2", "1.5b", 1_543_714_304),  # Qwen/Qwen2-1.5B
    ("qwen2", "7b", 7_615_616_512),  # Qwen/Qwen2-7B
    ("llama", "7b", 6_738_415_616),  # meta-llama/Llama-2-7b-hf
    ("llama", "13b", 13_015_864_320),  # meta-llama/Llama-2-13b-hf
    ("llama", "3-8b", 8_030_261_248),  # meta-llama/Meta-Llama-3-8B
    ("llama", "3.1-8b", 8_030_261_248),  # meta-llama/Llama-3.1-8B
    ("llama", "3.2-1b", 1_235_814_400),  # meta-llama/Llama-3.2-1B
    ("gpt2", "124m", 124_439_808),  # openai-community/gpt2
    ("gpt2", "355m", 354_823_168),  # openai-community/gpt2-medium
    ("gpt2", "774m", 774_030_080),  # openai-community/gpt2-large
    ("gpt2", "1558m", 1_557_611_200),  # openai-community/gpt2-xl
    ("bert", "base", 109_482_240),  # google-bert/bert-base-uncased
    ("bert", "large", 335_141_888),  # google-bert/bert-large-uncased
    ("bert", "base-cased", 108_310_272),  # google-bert/bert-base-cased
    ("mistral", "7b-v0.1", 7_241_732_096),  # mistralai/Mistral-7B-v0.1
    ("mistral", "7b-v0.3", 7_248_023_552),  # mistralai/Mistral-7B-v0.3
    ("mistral", "nemo-12b", 12_247_782_400),  # mistralai/Mistral-Nemo-Base-2407
    ("qwen3", "0.6b", 596_049_920),  # Qwen/Qwen3-0.6B
    ("qwen3", "4b", 4_022_468_096),  # Qwen/Qwen3-4B
    ("qwen3", "8b", 8_190_735_360),  # Qwen/Qwen3-8B
    ("qwen3", "32b", 32_762_123_264),  # Qwen/Qwen3-32B
    ("olmo2", "1b", 1_484_916_736),  # allenai/OLMo-2-0425-1B
    ("olmo2", "7b", 7_298_617_344),  # allenai/OLMo-2-1124-7B
    ("olmo2", "13b", 13_716_198_400),  # allenai/OLMo-2-1124-13B
    ("gemma", "2b", 2_506_172_416),  # google/gemma-2b
    ("gemma", "7b", 8_537_680_896),  # google/gemma-7b
    ("gemma2", "2b", 2_614_341_888),  # google/gemma-2-2b
    ("gemma2", "9b", 9_241_705_984),  # google/gemma-2-9b
    ("gemma2", "27b", 27_227_128_320),  # google/gemma-2-27b
    ("phi3", "mini-4k", 3_821_079_552),  # microsoft/Phi-3-mini-4k-instruct (and mini-128k, Phi-3.5-mini)
    ("phi3", "medium-4k", 13_960_238_080),  # microsoft/Phi-3-medium-4k-instruct
    ("gpt_neox", "pythia-70m", 70_426_624),  # EleutherAI/pythia-70m
    ("gpt_neox", "pythia-160m", 162_322_944),  # EleutherAI/pythia-160m
    ("gpt_neox", "pythia-1b", 1_011_781_632),  # EleutherAI/pythia-1b
    ("gpt_neox", "pythia-6.9b", 6_857_302_016),  # EleutherAI/pythia-6.9b
    ("gpt_neox", "20b", 20_554_567_680),  # EleutherAI/gpt-neox-20b
]


@pytest.mark.parametrize("name,arch,count", PUBLISHED, ids=[f"{n}-{a}" for n, a, _ in PUBLISHED])
def test_published_param_count(name, arch, count):
    checked = check_file(spec(name), arch)
    assert checked.warnings == []
    assert checked.program.param_count == count


# ---- weight names equal Hugging Face's -----------------------------------------------------------------

V, H, L, NH, KV, I, P = 96, 64, 3, 4, 2, 80, 40  # tiny sizes; head_dim 16, GQA 2:1

_DECODER = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=I,
    num_hidden_layers=L,
    num_attention_heads=NH,
    num_key_value_heads=KV,
    max_position_embeddings=P,
)

# (id, spec, config values): the spec's field names equal the HF config keys, so one dict serves as the
# `--set` overrides of the spec and as the HF config's keyword arguments.
TINY = [
    ("qwen2", "qwen2", dict(_DECODER, tie_word_embeddings=False)),
    ("qwen2-tied", "qwen2", dict(_DECODER, tie_word_embeddings=True)),
    ("llama", "llama", dict(_DECODER)),
    (
        "llama-bias-tied-headdim",
        "llama",
        dict(_DECODER, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    ("gpt2", "gpt2", dict(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=P)),
    (
        "gpt2-untied-inner",
        "gpt2",
        dict(vocab_size=V, n_embd=H, n_layer=L, n_head=NH, n_positions=P, n_inner=I, tie_word_embeddings=False),
    ),
    (
        "bert",
        "bert",
        dict(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=NH,
            intermediate_size=I,
            max_position_embeddings=P,
            type_vocab_size=3,
        ),
    ),
]
TINY += [
    ("mistral", "mistral", dict(_DECODER, sliding_window=8)),
    ("qwen3", "qwen3", dict(_DECODER, head_dim=24, tie_word_embeddings=True)),
    ("olmo2", "olmo2", dict(_DECODER, attention_bias=True, pad_token_id=1)),
    ("gemma", "gemma", dict(_DECODER, head_dim=24)),
    ("gemma2", "gemma2", dict(_DECODER, head_dim=24)),
    ("phi3", "phi3", dict(_DECODER, pad_token_id=0)),
    (
        "gpt_neox",
        "gpt_neox",
        dict(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=L,
            num_attention_heads=NH,
            intermediate_size=I,
            max_position_embeddings=P,
            tie_word_embeddings=True,
        ),
    ),
]
HF_CLASSES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "bert": ("BertConfig", "BertModel"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
}


def _dsl_program(spec_name: str, values: dict):
    text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}
    checked = check_file(spec(spec_name), None, text)
    assert checked.warnings == []
    return checked.program


_HF_MODELS: dict = {}


def _hf_model(case_id: str, spec_name: str, values: dict):
    """HF's own model of the family with the same tiny config (built once per case)."""
    if case_id not in _HF_MODELS:
        transformers = pytest.importorskip("transformers")
        torch = pytest.importorskip("torch")
        torch.manual_seed(0)
        config_class, model_class = HF_CLASSES[spec_name]
        config = getattr(transformers, config_class)(**values)
        _HF_MODELS[case_id] = getattr(transformers, model_class)(config).eval()
    return _HF_MODELS[case_id]


def _pattern(p: str) -> re.Pattern:
    """A layout-rule name with `{i}` (a layer index) as a regex with a named group."""
    return re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _fill(p: str, i: str | None) -> str:
    return p.replace("{i}", i) if i is not None else p


def _static(e):
    """A transform argument: a build-time constant (layout rules cannot name config fields)."""
    from dslc.ir.evaluate import evaluate

    def no_names(r):
        raise AssertionError(f"name `{r.name}` in a layout transform")

    return evaluate(e, no_names)


def map_checkpoint(program, ckpt: dict) -> tuple[dict, set[int]]:
    """Checkpoint tensors (name -> tensor) -> parameter tensors via the spec's layout rules.

    Follows the rules' meaning: sources matched by `{i}` patterns, `transpose` swaps the two dims of a
    matrix, `split(dim = d)` cuts along d into the targets' sizes, `concat(dim = d)` joins the sources;
    `ignore` patterns drop keys; every other key is a parameter of the same name. Returns the mapped
    tensors and the indices of the rules that matched at least once.
    """
    import torch

    shapes = {w.name: w.shape for w in program.weights}
    rules = program.checkpoint.rules
    out: dict = {}
    consumed: set[str] = set()
    fired: set[int] = set()
    for n, rule in enumerate(rules):
        first = _pattern(rule.sources[0])
        for key in sorted(ckpt):
            m = first.match(key)
            if not m:
                continue
            i = m.groupdict().get("i")
            sources = [_fill(s, i) for s in rule.sources]
            targets = [_fill(t, i) for t in rule.targets]
            assert all(s in ckpt for s in sources), f"rule {n}: checkpoint lacks one of {sources}"
            assert all(t in shapes for t in targets), f"rule {n}: unknown parameter in {targets}"
            tensors = [ckpt[s] for s in sources]
            for name, kwargs in rule.transforms:
                kw = {k: _static(v) for k, v in kwargs}
                if name == "transpose":
                    assert all(t.dim() == 2 for t in tensors), "transpose applies to matrices"
                    tensors = [t.t() for t in tensors]
                elif name == "concat":
                    tensors = [torch.cat(tensors, dim=kw.get("dim", 0))]
                elif name == "split":
                    dim = kw.get("dim", 0)
                    (t,) = tensors
                    tensors = list(torch.split(t, [shapes[x][dim] for x in targets], dim=dim))
                else:
                    raise AssertionError(f"unknown transform {name}")
            assert len(tensors) == len(targets)
            out.update(zip(targets, tensors))
            consumed.update(sources)
            fired.add(n)
    ignores = [_pattern(p) for p in program.checkpoint.ignores]
    for key, t in ckpt.items():
        if key not in consumed and not any(p.match(key) for p in ignores):
            assert key not in out, f"`{key}` is both a rule target and a checkpoint key"
            out[key] = t
    return out, fired


@pytest.mark.parametrize("case", TINY, ids=[c[0] for c in TINY])
def test_weight_names_match_hf(case):
    case_id, spec_name, values = case
    program = _dsl_program(spec_name, values)
    hf = _hf_model(case_id, spec_name, values)
    state = hf.state_dict()

    mapped, fired = map_checkpoint(program, state)
    # every rule of the `checkpoint:` section matches HF's own state dict, except a plain rename of a legacy hub
    # name (gpt_neox's embed_out); named sections (`checkpoint "meta":`) are foreign layouts
    own = {n for n, r in enumerate(program.checkpoint.rules) if r.layout is None}
    legacy = {
        n
        for n in own
        if not program.checkpoint.rules[n].transforms and program.checkpoint.rules[n].sources[0] not in state
    }
    assert fired | legacy == own, "a layout rule of the `checkpoint:` section matches no checkpoint key"
    ours = {w.name: tuple(w.shape) for w in program.weights}
    theirs = {k: tuple(v.shape) for k, v in mapped.items()}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    # parameters counted once per tensor, tied ones once, as torch does
    assert program.param_count == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("case", TINY, ids=[c[0] for c in TINY])
def test_ties_match_hf(case):
    case_id, spec_name, values = case
    program = _dsl_program(spec_name, values)
    hf = _hf_model(case_id, spec_name, values)
    first_of: dict[int, str] = {}
    hf_ties = {}
    for name, p in hf.named_parameters(remove_duplicate=False):
        if id(p) in first_of:
            hf_ties[name] = first_of[id(p)]
        else:
            first_of[id(p)] = name
    ours = {w.name: w.tied_to for w in program.weights if w.tied_to is not None}
    assert ours == hf_ties


def test_gpt2_layout_rules_compute_what_conv1d_computes():
    """After the rules, Linear(x) with the mapped weights equals HF's Conv1D on the same input."""
    torch = pytest.importorskip("torch")
    case = next(c for c in TINY if c[0] == "gpt2-untied-inner")
    case_id, spec_name, values = case
    program = _dsl_program(spec_name, values)
    hf = _hf_model(case_id, spec_name, values)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_()
        mapped, _ = map_checkpoint(program, hf.state_dict())
        x = torch.randn(2, 5, H)
        for i, block in enumerate(hf.transformer.h):

            def lin(name, inp, i=i):
                pre = f"transformer.h.{i}.{name}"
                return torch.nn.functional.linear(inp, mapped[pre + ".weight"], mapped[pre + ".bias"])

            torch.testing.assert_close(lin("attn.c_attn", x), block.attn.c_attn(x))
            torch.testing.assert_close(lin("attn.c_proj", x), block.attn.c_proj(x))
            torch.testing.assert_close(lin("mlp.c_fc", x), block.mlp.c_fc(x))
            h = torch.randn(2, 5, I)
            torch.testing.assert_close(lin("mlp.c_proj", h), block.mlp.c_proj(h))


def test_map_checkpoint_expands_layer_patterns():
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from dslc.diagnostics import Span
    from dslc.ir import nodes as N

    rule = N.LayoutRuleDef(
        ("a.{i}.w",), (("split", (("dim", N.Const(0)),)),), ("b.{i}.x", "b.{i}.y"), Span.at("t.model", 1, 1)
    )
    program = SimpleNamespace(
        checkpoint=N.CheckpointDef((rule,), ("a.{i}.mask",)),
        weights=[SimpleNamespace(name=n, shape=(2,)) for n in ("b.0.x", "b.0.y", "b.1.x", "b.1.y", "c")],
    )
    ckpt = {"a.0.w": torch.arange(4.0), "a.1.w": torch.arange(4.0) + 4, "a.0.mask": torch.zeros(1), "c": torch.ones(2)}
    out, fired = map_checkpoint(program, ckpt)
    assert fired == {0}
    assert sorted(out) == ["b.0.x", "b.0.y", "b.1.x", "b.1.y", "c"]
    assert out["b.1.y"].tolist() == [6.0, 7.0]
