"""`dslc build --target hf`: the generated modules on transformers' PreTrainedModel, GenerationMixin and caches.

The oracle is transformers' own Qwen2ForCausalLM on the bundled tiny checkpoint (models/tiny-qwen2): HF's
`generate` (greedy, beam search, repetition penalty, min_new_tokens, stopping criteria, streamers, static
cache) gives the same tokens on both, `pipeline("text-generation")` the same text, and the Auto classes
load the package's model once `register()` ran. Both targets render the same modeling and kernel code.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from packages import built_packages  # noqa: E402

from dslc.build import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-qwen2"
BASE_LAYER = {"model_base.py", "model_core.py", "config.py", "config_spec.py", "__init__.py", "build.json"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("targets")
    standalone = build(ROOT / "models" / "qwen2.model", out / "standalone", name="qwen2_standalone")
    with built_packages(out / "hf", (ROOT / "models" / "qwen2.model", "qwen2_hf"), target="hf"):
        yield {"standalone": standalone, "hf": out / "hf" / "qwen2_hf"}, importlib.import_module("qwen2_hf")


@pytest.fixture(scope="module")
def pair(built):
    """(the hf-target model, transformers' model) on the tiny checkpoint, float32, eval mode."""
    _, pkg = built
    ours = pkg.Qwen2ForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    ref = transformers.Qwen2ForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    return ours, ref


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(TINY / "tokenizer.json"), eos_token="<|endoftext|>")


def _prompts(batch=2, length=7, seed=0):
    ids = torch.randint(1, 2048, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # left padding
    return ids, mask


def test_both_targets_render_the_same_modeling_and_kernel_code(built):
    paths, _ = built
    standalone, hf = paths["standalone"], paths["hf"]
    names = {p.name for p in standalone.iterdir() if p.is_file()} - BASE_LAYER
    assert {"modeling.py", "kernels.py", "kernels_triton.py", "attention.py", "losses.py"} <= names
    for name in sorted(names):
        a, b = (standalone / name).read_text(), (hf / name).read_text()
        assert a.replace("qwen2_standalone", "qwen2_hf") == b, f"{name} differs between the targets"
    # the base layer moved, not rewritten: the standalone base and config are the core of the hf target
    assert (standalone / "model_base.py").read_text() == (hf / "model_core.py").read_text()
    assert (standalone / "config.py").read_text() == (hf / "config_spec.py").read_text()


def test_the_model_is_a_transformers_model(built, pair):
    _, pkg = built
    ours, _ = pair
    assert isinstance(ours, transformers.PreTrainedModel) and isinstance(ours, transformers.GenerationMixin)
    assert isinstance(ours.config, transformers.PretrainedConfig)
    assert ours.config.model_type == "dslc_qwen2_hf" and type(ours).can_generate()  # dslc_ + the package name
    assert ours.config.head_dim == 32  # config.json's value, checked by the spec's config class
    assert ours._no_split_modules == ["DecoderLayer"] and ours.base_model_prefix == "model"
    assert ours.config.base_model_tp_plan["layers.*.self_attn.q_proj"] == "colwise"
    assert ours.config.base_model_tp_plan["layers.*.mlp.down_proj"] == "rowwise"
    assert ours.supports_gradient_checkpointing and ours._supports_sdpa


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=8),
        dict(max_new_tokens=8, num_beams=3),
        dict(max_new_tokens=8, repetition_penalty=1.3),
        dict(max_new_tokens=8, min_new_tokens=8, num_beams=2, num_return_sequences=2),
        dict(max_length=12),
        dict(max_new_tokens=6, cache_implementation="static"),
    ],
    ids=["greedy", "beams", "repetition_penalty", "min_new_tokens+num_return_sequences", "max_length", "static"],
)
def test_generate_equals_transformers_token_for_token(pair, options):
    ours, ref = pair
    ids, mask = _prompts()
    got = ours.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **options)
    want = ref.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **options)
    assert torch.equal(got, want), (got, want)


def test_stopping_criteria_and_generation_config(pair):
    ours, ref = pair
    ids, mask = _prompts(seed=1)

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 10, dtype=torch.bool)

    config = transformers.GenerationConfig(max_new_tokens=9, do_sample=False, pad_token_id=0, no_repeat_ngram_size=2)
    kwargs = dict(attention_mask=mask, generation_config=config)
    got = ours.generate(ids, stopping_criteria=transformers.StoppingCriteriaList([StopAfter()]), **kwargs)
    want = ref.generate(ids, stopping_criteria=transformers.StoppingCriteriaList([StopAfter()]), **kwargs)
    assert got.shape[1] == 10 and torch.equal(got, want)


def test_text_streamer_prints_what_transformers_prints(pair, tokenizer, capsys):
    ours, ref = pair
    ids = torch.tensor([tokenizer("def add(a, b):")["input_ids"]])
    texts = []
    for model in (ours, ref):
        model.generate(ids, max_new_tokens=10, do_sample=False, streamer=transformers.TextStreamer(tokenizer))
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_pipeline_text_generation(pair, tokenizer):
    ours, ref = pair
    outs = [
        transformers.pipeline("text-generation", model=m, tokenizer=tokenizer, device="cpu")(
            "x = 1\ny =", max_new_tokens=8, do_sample=False
        )
        for m in (ours, ref)
    ]
    assert outs[0] == outs[1] and outs[0][0]["generated_text"].startswith("x = 1\ny =")


def test_incremental_decoding_with_a_cache_equals_the_full_forward(pair):
    ours, _ = pair
    ids, mask = _prompts(length=9, seed=2)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        first = ours(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        rest = ours(ids[:, 6:], attention_mask=mask, cache=cache, use_cache=True).logits
    stepped = torch.cat([first.logits, rest], 1)
    real = mask.bool()  # a padding position's logits are arbitrary (it attends to every key, HF's to none)
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-4)


def test_logits_loss_and_gradients_equal_transformers(pair):
    ours, ref = pair
    ids, mask = _prompts(length=11, seed=3)
    mask[1] = 1  # no padding: a padding position would predict the first real token from arbitrary logits
    labels = ids.clone()
    labels[0, :3] = -100
    a = ours(ids, attention_mask=mask, labels=labels)
    b = ref(ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    torch.testing.assert_close(a.logits[keep], b.logits[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.loss, [ours.get_parameter("model.layers.0.self_attn.q_proj.weight")])[0]
    gb = torch.autograd.grad(b.loss, [ref.get_parameter("model.layers.0.self_attn.q_proj.weight")])[0]
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_auto_classes_load_the_package_after_register(built, pair, tmp_path):
    _, pkg = built
    ours, _ = pair
    pkg.register()
    ours.save_pretrained(tmp_path / "saved")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "saved")
    assert type(config) is pkg.Qwen2Config
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert type(loaded) is pkg.Qwen2ForCausalLM
    ids, mask = _prompts()
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)
    fresh = transformers.AutoModelForCausalLM.from_config(
        pkg.Qwen2Config(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    )
    assert type(fresh) is pkg.Qwen2ForCausalLM and fresh.config.head_dim == 8  # derived: hidden_size // heads


def test_the_config_keeps_the_spec_checks(built):
    _, pkg = built
    with pytest.raises(pkg.ConfigError, match="num_attention_heads"):
        pkg.Qwen2Config(num_attention_heads=0)
    with pytest.raises(pkg.ConfigError, match="hidden_size"):
        pkg.Qwen2Config(hidden_size="wide")


def test_peft_lora_causal_lm_trains_and_generates(built):
    peft = pytest.importorskip("peft")
    _, pkg = built
    model = pkg.Qwen2ForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    ids, mask = _prompts(length=8, seed=4)
    loss = lora(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    out = lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)


REMOTE = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):  # dslc and the built package are not importable here
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dslc", "qwen2_hf"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
import torch, transformers
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
out = model.generate(ids, max_new_tokens=5, do_sample=False, num_beams=2)
print(json.dumps({"class": type(model).__module__, "tokens": out.tolist(),
                  "dslc": any(m.split(".")[0] in ("dslc", "qwen2_hf") for m in sys.modules)}))
"""


def test_a_saved_folder_loads_with_trust_remote_code_where_dslc_is_not_installed(pair, tmp_path):
    import json
    import os
    import subprocess
    import sys

    ours, ref = pair
    ours.save_pretrained(tmp_path / "remote")
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "config.Qwen2Config",
        "AutoModelForCausalLM": "modeling.Qwen2ForCausalLM",
    }
    ids = _prompts(batch=1)[0]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, "-c", REMOTE, str(tmp_path / "remote"), json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["class"].startswith("transformers_modules.") and not got["dslc"]
    want = ref.generate(ids, max_new_tokens=5, do_sample=False, num_beams=2)
    assert got["tokens"] == want.tolist()


# ---- the tools users train and evaluate with ---------------------------------------------------------------------


def test_base_model_returns_the_last_hidden_state(pair):
    ours, ref = pair
    ids, mask = _prompts(seed=5)
    got = ours.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    want = ref.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert ours.get_decoder()(input_ids=ids).last_hidden_state.shape == (2, 7, 128)
    assert not any(p is q for p in ours.base_model.parameters() for q in [])  # a view: no second parameter path
    assert len(list(ours.parameters())) == len(set(map(id, ours.parameters())))


def _sft_losses(model, tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    data = datasets.Dataset.from_dict({"text": [f"def f{i}(x):\n    return x + {i}\n" for i in range(12)]})
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=64,
        seed=0,
        data_seed=0,
        bf16=False,  # TRL's default autocasts to bf16 where it can: float32 compares the two models exactly
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trl_sft_trainer_trains_as_on_the_transformers_model(built, tokenizer, tmp_path):
    """TRL's SFTTrainer, no patches: 3 steps, each step's loss equal to the same run on transformers' model."""
    _, pkg = built
    ours = pkg.Qwen2ForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    ref = transformers.Qwen2ForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    got = _sft_losses(ours, tokenizer, tmp_path / "ours")
    want = _sft_losses(ref, tokenizer, tmp_path / "ref")
    assert len(got) == 3
    assert got == pytest.approx(want, rel=1e-4), (got, want)


def test_lm_eval_hflm_scores_as_the_transformers_model(pair, tokenizer):
    """lm-eval's HFLM on an already-built model: loglikelihood and generate_until requests of a small task."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    requests = [
        Instance("loglikelihood", {}, ("def add(a, b):", " return a + b"), 0),
        Instance("loglikelihood", {}, ("x = 1\n", "y = 2"), 1),
        Instance("loglikelihood", {}, ("import", " os"), 2),
    ]
    until = [Instance("generate_until", {}, ("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 12}), 0)]
    results = []
    for model in pair:
        lm = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
        results.append((lm.loglikelihood(requests), lm.generate_until(until)))
    (ll, text), (ref_ll, ref_text) = results
    assert [b for _, b in ll] == [b for _, b in ref_ll] and text == ref_text and text[0]
    assert [s for s, _ in ll] == pytest.approx([s for s, _ in ref_ll], rel=1e-5)


def test_trainer_bf16_checkpoints_reload_with_from_pretrained(built, tokenizer, tmp_path):
    """transformers' Trainer saves through the model's save_pretrained: every checkpoint folder has config.json
    and reloads with from_pretrained (and the Auto class), weights equal."""
    _, pkg = built
    model = pkg.Qwen2ForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    ids = torch.randint(1, 2048, (8, 16), generator=torch.Generator().manual_seed(6))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        save_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / "config.json").is_file()
        loaded = pkg.Qwen2ForCausalLM.from_pretrained(folder)
        if step == 2:
            for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
                torch.testing.assert_close(a.float(), b.float(), msg=name)


# ---- every shipped spec on the hf target, against transformers on a tiny random checkpoint -----------------------
SPECS = {  # spec -> hf_oracle family
    "qwen2": "qwen2",
    "llama": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "mistral": "mistral",
    "qwen3": "qwen3",
    "olmo2": "olmo2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "gpt_neox": "gpt_neox",
}


@pytest.fixture(scope="module")
def hf_packages(tmp_path_factory):
    specs = [(ROOT / "models" / f"{spec}.model", f"{spec}_hft") for spec in SPECS]
    with built_packages(tmp_path_factory.mktemp("hf_specs"), *specs, target="hf"):
        yield {spec: importlib.import_module(f"{spec}_hft") for spec in SPECS}


@pytest.mark.parametrize("spec", list(SPECS))
def test_every_spec_matches_transformers_on_the_hf_target(hf_packages, spec, tmp_path):
    """Outputs with a padding mask, loss and gradients, generate (greedy and beams) and a save/reload."""
    from hf_oracle import load_hf, make_hf_model

    folder = make_hf_model(SPECS[spec], tmp_path / "hf")
    pkg = hf_packages[spec]
    model_class = getattr(pkg, next(n for n in pkg.__all__ if n.endswith(("LMHeadModel", "ForCausalLM", "BertModel"))))
    ours, ref = model_class.from_pretrained(folder, dtype=torch.float32), load_hf(folder)
    assert isinstance(ours, transformers.PreTrainedModel)
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    real = mask.bool()
    a, b = ours(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
    name = "logits" if ours.task == "causal_lm" else "last_hidden_state"
    torch.testing.assert_close(a[name][real], b[name][real], rtol=1e-4, atol=1e-4)
    if ours.task == "causal_lm":
        full = torch.ones_like(ids)
        la, lb = ours(input_ids=ids, labels=ids).loss, ref(input_ids=ids, attention_mask=full, labels=ids).loss
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        ga = torch.autograd.grad(la, [ours.get_input_embeddings().weight])[0]
        gb = torch.autograd.grad(lb, [ref.get_input_embeddings().weight])[0]
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
        for options in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)):
            got = ours.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **options)
            want = ref.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **options)
            assert torch.equal(got, want), (spec, options)
    ours.save_pretrained(tmp_path / "saved")
    again = model_class.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    torch.testing.assert_close(again(input_ids=ids)[name], ours(input_ids=ids)[name])
    reloaded_by_hf = type(ref).from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded_by_hf(input_ids=ids)[name], b_full := ref(input_ids=ids)[name])
    assert b_full.shape == ours(input_ids=ids)[name].shape
