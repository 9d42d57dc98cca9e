"""The cheap, expected parts of the Hugging Face model API in the standalone package, against transformers itself:
`device` / `dtype` / `can_generate` / input and output embeddings, `resize_token_embeddings` (vs HF's resize),
`generation_config` (from config.json and generation_config.json, written back; eos stops where HF's generate
stops), generate()'s HF argument names (max_length, generation_config=, the no-op options, the refused ones),
HF streamers (TextStreamer, TextIteratorStreamer) on the bundled tiny Qwen2 with its tokenizer, and
save_pretrained's state_dict / max_shard_size / keywords (sharded saves load in HF and back).
"""

from __future__ import annotations

import importlib
import json
import shutil
import warnings
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-qwen2"
SPECS = {"qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    specs = [(ROOT / "models" / f"{family}.model", f"apitest_{family}") for family in SPECS]
    with built_packages(tmp_path_factory.mktemp("apitest_build"), *specs):
        yield {family: importlib.import_module(f"apitest_{family}") for family in SPECS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {f: hf_oracle.make_hf_model(f, tmp_path_factory.mktemp(f"api_{f}"), seed=11) for f in SPECS}
    out["qwen2_tied"] = hf_oracle.make_hf_model("qwen2", tmp_path_factory.mktemp("api_qwen2_tied"), tie=True, seed=12)
    return out


def _cls(pkgs, family):
    return getattr(pkgs[family], SPECS[family])


def _ours(pkgs, folders, key):
    return _cls(pkgs, key.split("_")[0]).from_pretrained(folders[key])


def _ids(batch=1, length=6, seed=0, high=hf_oracle.VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, high, (batch, length), generator=g)


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _refused(fn, exc, *words):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


# ---- device, dtype, can_generate, embeddings ----------------------------------------------------------------


def test_device_dtype_and_heads(pkgs, folders):
    model = _ours(pkgs, folders, "qwen2")
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.to(torch.bfloat16).dtype == torch.bfloat16
    assert model.can_generate() and type(model).can_generate()
    assert model.get_output_embeddings() is model.lm_head
    assert model.get_input_embeddings() is model.model.embed_tokens
    bert = _ours(pkgs, folders, "bert")
    assert not bert.can_generate() and bert.get_output_embeddings() is None and bert.generation_config is None
    gpt2 = _ours(pkgs, folders, "gpt2")
    assert gpt2.get_input_embeddings() is gpt2.transformer.wte  # not the position embedding


def test_set_input_embeddings(pkgs, folders):
    model = _ours(pkgs, folders, "qwen2")
    ids = _ids()
    new = torch.nn.Embedding(hf_oracle.VOCAB, hf_oracle.HIDDEN)
    with torch.no_grad():
        new.weight.copy_(model.get_input_embeddings().weight)
    before = model(ids).logits
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.model.embed_tokens is new
    torch.testing.assert_close(model(ids).logits, before)


# ---- resize_token_embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["qwen2", "qwen2_tied"])
@pytest.mark.parametrize(
    "new_num_tokens,multiple", [(150, None), (150, 64), (100, None)], ids=["grow", "pad", "shrink"]
)
def test_resize_token_embeddings_as_hf(pkgs, folders, tmp_path, key, new_num_tokens, multiple):
    ours = _ours(pkgs, folders, key)
    hf = hf_oracle.load_hf(folders[key])
    ids = _ids(2, 7, high=min(new_num_tokens, hf_oracle.VOCAB))
    old_logits = ours(ids).logits
    old_embedding = ours.get_input_embeddings().weight.detach().clone()
    returned = ours.resize_token_embeddings(new_num_tokens, pad_to_multiple_of=multiple)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.resize_token_embeddings(new_num_tokens, pad_to_multiple_of=multiple)
    rows = hf.get_input_embeddings().weight.shape[0]
    assert returned is ours.get_input_embeddings()
    assert returned.weight.shape == hf.get_input_embeddings().weight.shape and returned.num_embeddings == rows
    assert ours.lm_head.weight.shape == hf.lm_head.weight.shape and ours.lm_head.out_features == rows
    assert ours.config.vocab_size == hf.config.vocab_size == rows
    kept = min(rows, hf_oracle.VOCAB)
    assert torch.equal(returned.weight[:kept], old_embedding[:kept])
    if key == "qwen2_tied":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    new_logits = ours(ids).logits
    assert new_logits.shape[-1] == rows
    torch.testing.assert_close(new_logits[..., :kept], old_logits[..., :kept])
    torch.testing.assert_close(new_logits, hf(ids).logits, atol=2e-3, rtol=1e-3)  # new rows: near the mean, as HF
    if rows > hf_oracle.VOCAB:  # HF's mean resizing: new rows near the old rows' mean
        mean = old_embedding.mean(0)
        torch.testing.assert_close(returned.weight[kept:], mean.expand(rows - kept, -1), atol=1e-3, rtol=0)
    ours.save_pretrained(tmp_path / "resized")
    back = hf_oracle.load_hf(tmp_path / "resized")
    torch.testing.assert_close(back(ids).logits, new_logits)
    again = type(ours).from_pretrained(tmp_path / "resized")
    torch.testing.assert_close(again(ids).logits, new_logits)


def test_resize_grows_a_head_bias_and_without_arguments_does_nothing(pkgs, folders):
    model = _ours(pkgs, folders, "qwen2")
    embedding = model.get_input_embeddings()
    assert model.resize_token_embeddings() is embedding and embedding.weight.shape[0] == hf_oracle.VOCAB
    model.lm_head.bias = torch.nn.Parameter(torch.randn(hf_oracle.VOCAB))
    bias = model.lm_head.bias.detach().clone()
    model.resize_token_embeddings(140)
    assert model.lm_head.bias.shape == (140,)
    assert torch.equal(model.lm_head.bias[: hf_oracle.VOCAB], bias)
    torch.testing.assert_close(model.lm_head.bias[hf_oracle.VOCAB :], bias.mean().expand(12))
    model.resize_token_embeddings(150, mean_resizing=False)
    assert torch.equal(model.lm_head.bias[140:], torch.zeros(10))
    assert model(_ids()).logits.shape[-1] == 150
    _refused(lambda: model.resize_token_embeddings(0), ValueError, "new_num_tokens")
    _refused(lambda: model.resize_token_embeddings(10, pad_to_multiple_of=2.5), ValueError, "pad_to_multiple_of")


# ---- generation_config ----------------------------------------------------------------------------------------


def test_generation_config_comes_from_the_folder_and_is_written_back(pkgs, folders, tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig

    model = _ours(pkgs, folders, "qwen2")
    assert model.generation_config.eos_token_id == hf_oracle.EOS and model.generation_config.bos_token_id == 1
    folder = _copy(folders["qwen2"], tmp_path / "q")
    data = json.loads((folder / "generation_config.json").read_text())
    data.update(eos_token_id=[5, 6], max_new_tokens=4, top_k=7, custom_key={"kept": True})
    (folder / "generation_config.json").write_text(json.dumps(data))
    model = type(model).from_pretrained(folder)
    gc = model.generation_config
    assert gc.eos_token_id == [5, 6] and gc.max_new_tokens == 4 and gc.top_k == 7
    assert gc.extra["custom_key"] == {"kept": True}
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert written["custom_key"] == {"kept": True} and written["eos_token_id"] == [5, 6]
    hf_gc = HFGenerationConfig.from_pretrained(tmp_path / "saved")
    assert hf_gc.eos_token_id == [5, 6] and hf_gc.max_new_tokens == 4 and hf_gc.top_k == 7
    (folder / "generation_config.json").unlink()  # without the file: the config's special tokens
    assert type(model).from_pretrained(folder).generation_config.eos_token_id == hf_oracle.EOS
    assert not (tmp_path / "bert").exists()
    _ours(pkgs, folders, "bert").save_pretrained(tmp_path / "bert")
    assert not (tmp_path / "bert" / "generation_config.json").exists()  # a model that does not generate


@pytest.mark.parametrize(
    "text,words",
    [
        ("{ not json", ["not valid JSON"]),
        ("[]", ["JSON object"]),
        ('{"eos_token_id": {}}', ["eos_token_id"]),
        ('{"eos_token_id": [1, "a"]}', ["eos_token_id"]),
        ('{"pad_token_id": -1}', ["pad_token_id"]),
        ('{"max_new_tokens": 0}', ["max_new_tokens"]),
        ('{"do_sample": "yes"}', ["do_sample"]),
        ('{"temperature": -1}', ["temperature"]),
        ('{"top_k": 2.5}', ["top_k"]),
        ('{"top_p": 1.5}', ["top_p"]),
    ],
    ids=[
        "not-json",
        "list",
        "eos-object",
        "eos-str",
        "pad-negative",
        "max-new-0",
        "do-sample",
        "temp",
        "top-k",
        "top-p",
    ],
)
def test_malformed_generation_config_is_refused_naming_file_and_key(pkgs, folders, tmp_path, text, words):
    folder = _copy(folders["qwen2"], tmp_path / "q")
    (folder / "generation_config.json").write_text(text)
    _refused(
        lambda: _cls(pkgs, "qwen2").from_pretrained(folder),
        pkgs["qwen2"].ConfigError,
        "generation_config.json",
        *words,
    )


def _first_new(tokens: list[int], start: int) -> tuple[int, int]:
    """(step, token) of the first generated token at or after `start` that was not generated before it."""
    step = next(s for s in range(start, len(tokens)) if tokens[s] not in tokens[:s])
    return step, tokens[step]


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_eos_from_the_folder_stops_where_hf_stops(pkgs, folders, tmp_path, where):
    """Before, config.json's eos_token_id was ignored (20 tokens where HF stopped after 5)."""
    ids = _ids(1, 6, seed=4)
    free = _ours(pkgs, folders, "qwen2").generate(ids, max_new_tokens=20, eos_token_id=[])
    step, eos = _first_new(free[0, 6:].tolist(), 4)
    folder = _copy(folders["qwen2"], tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    if where == "config.json":
        (folder / "generation_config.json").unlink()
        config["eos_token_id"] = eos
    else:
        config["eos_token_id"] = 0  # the generation config wins
        data = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({**data, "eos_token_id": [eos, 127]}))
    (folder / "config.json").write_text(json.dumps(config))
    ours = _cls(pkgs, "qwen2").from_pretrained(folder).generate(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_oracle.load_hf(folder).generate(ids, do_sample=False)
    assert ours.tolist() == hf.tolist()
    assert ours.shape[1] == 6 + step + 1 and int(ours[0, -1]) == eos


# ---- generate(): HF's argument names -------------------------------------------------------------------------


def test_generate_takes_hf_names(pkgs, folders):
    from transformers import GenerationConfig as HFGenerationConfig

    model = _ours(pkgs, folders, "qwen2")
    gen = pkgs["qwen2"].generation
    ids = _ids(1, 6, seed=1)
    base = model.generate(ids, max_new_tokens=7, eos_token_id=[])
    assert base.shape == (1, 13)
    assert torch.equal(model.generate(ids, max_length=13, eos_token_id=[]), base)
    assert torch.equal(model.generate(inputs=ids, max_new_tokens=7, eos_token_id=[]), base)
    hf_config = HFGenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=None)
    ours_config = gen.GenerationConfig(max_new_tokens=7)
    for config in (hf_config, ours_config, {"max_new_tokens": 7}):
        assert torch.equal(model.generate(ids, generation_config=config, eos_token_id=[]), base)
    # an argument wins over the generation config passed; that one over model.generation_config
    assert model.generate(ids, generation_config=ours_config, max_new_tokens=3, eos_token_id=[]).shape == (1, 9)
    model.generation_config.max_new_tokens = 5
    assert model.generate(ids, eos_token_id=[]).shape == (1, 11)
    assert model.generate(ids, generation_config=ours_config, eos_token_id=[]).shape == (1, 13)
    no_ops = dict(
        num_beams=1,
        repetition_penalty=1.0,
        num_return_sequences=1,
        return_dict_in_generate=False,
        output_scores=False,
        use_cache=True,
        min_new_tokens=0,
        logits_processor=None,
        stopping_criteria=[],
        synced_gpus=None,
    )
    assert torch.equal(model.generate(ids, max_new_tokens=7, eos_token_id=[], **no_ops), base)


HINT = "--target hf"


@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(num_beams=4), ValueError, ["num_beams=4", HINT]),
        (dict(repetition_penalty=1.2), ValueError, ["repetition_penalty=1.2", HINT]),
        (dict(min_new_tokens=3), ValueError, ["min_new_tokens=3", HINT]),
        (dict(num_return_sequences=2), ValueError, ["num_return_sequences", HINT]),
        (dict(return_dict_in_generate=True), ValueError, ["return_dict_in_generate", HINT]),
        (dict(output_scores=True), ValueError, ["output_scores", HINT]),
        (dict(stopping_criteria=[lambda ids, scores: True]), ValueError, ["stopping_criteria", HINT]),
        (dict(logits_processor=[lambda ids, scores: scores]), ValueError, ["logits_processor", HINT]),
        (dict(use_cache=False), ValueError, ["use_cache", HINT]),
        (dict(no_such_option=1), TypeError, ["no_such_option", HINT]),
        (dict(generation_config={"num_beams": 3}), ValueError, ["num_beams=3", "generation_config", HINT]),
        (dict(generation_config="greedy"), ValueError, ["generation_config", "str"]),
        (dict(max_length=6), ValueError, ["max_length=6", "prompt"]),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else "",
)
def test_generate_refuses_what_it_does_not_implement(pkgs, folders, kw, exc, words):
    from transformers import GenerationConfig as HFGenerationConfig

    model = _ours(pkgs, folders, "qwen2")
    _refused(lambda: model.generate(_ids(), **kw), exc, *words)
    if HINT in words and exc is ValueError and all(k in HFGenerationConfig().to_dict() for k in kw):
        try:  # the same option set in a transformers GenerationConfig passed to generate()
            hf_config = HFGenerationConfig(**kw)
        except ValueError:  # transformers refuses it itself (num_return_sequences=2 without sampling)
            return
        _refused(lambda: model.generate(_ids(), generation_config=hf_config), ValueError, *words)


def test_unimplemented_options_of_the_folders_generation_config_warn(pkgs, folders, tmp_path):
    """A checkpoint's own generation_config.json (Qwen2-Instruct sets repetition_penalty=1.05) still generates."""
    folder = _copy(folders["qwen2"], tmp_path / "q")
    data = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**data, "repetition_penalty": 1.05}))
    model = _cls(pkgs, "qwen2").from_pretrained(folder)
    with pytest.warns(UserWarning, match="repetition_penalty=1.05"):
        assert model.generate(_ids(), max_new_tokens=2).shape[1] <= 8


def test_default_length_is_20_new_tokens_capped_at_the_context(pkgs, folders):
    model = _ours(pkgs, folders, "qwen2")
    assert model.generate(_ids(1, 6), eos_token_id=[]).shape == (1, 26)
    assert model.generate(_ids(1, hf_oracle.MAX_POS - 5), eos_token_id=[]).shape == (1, hf_oracle.MAX_POS)


# ---- streamers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(pkgs):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TINY / "tokenizer.json"))
    ours = _cls(pkgs, "qwen2").from_pretrained(TINY, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    return tokenizer, ours, hf


def _stream_text(model, tokenizer, ids, **kw) -> str:
    from threading import Thread

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, **kw)
    thread = Thread(
        target=model.generate, args=(ids,), kwargs=dict(max_new_tokens=24, do_sample=False, streamer=streamer)
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    return text


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_iterator_streamer_gives_hf_text(tiny, skip_prompt):
    tokenizer, ours, hf = tiny
    ids = torch.tensor([tokenizer("def parse_args(").input_ids])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _stream_text(hf, tokenizer, ids, skip_prompt=skip_prompt)
    got = _stream_text(ours, tokenizer, ids, skip_prompt=skip_prompt)
    assert got == expected and len(got) > (0 if skip_prompt else len("def parse_args("))
    full = ours.generate(ids, max_new_tokens=24)
    assert got == tokenizer.decode(full[0, ids.shape[1] if skip_prompt else 0 :])


def test_text_streamer_prints_hf_text(tiny, capsys):
    from transformers import TextStreamer

    tokenizer, ours, hf = tiny
    ids = torch.tensor([tokenizer("import os\n").input_ids])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.generate(ids, max_new_tokens=16, do_sample=False, streamer=TextStreamer(tokenizer))
    expected = capsys.readouterr().out
    ours.generate(ids, max_new_tokens=16, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out == expected and expected.startswith("import os")


def test_streamer_protocol_order_and_plain_callables(pkgs, folders):
    model = _ours(pkgs, folders, "qwen2")
    ids = _ids(2, 5)
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(("put", value.device.type, value.tolist()))

        def end(self):
            calls.append(("end",))

    out = model.generate(ids, max_new_tokens=4, eos_token_id=[], streamer=Recorder())
    assert calls[0] == ("put", "cpu", ids.tolist()) and calls[-1] == ("end",)
    assert [c[2] for c in calls[1:-1]] == out[:, 5:].T.tolist()
    steps = []
    model.generate(ids, max_new_tokens=4, eos_token_id=[], streamer=steps.append)
    assert torch.equal(torch.stack(steps, 1), out[:, 5:])
    _refused(lambda: model.generate(ids, streamer=object()), ValueError, "streamer", "put")


# ---- save_pretrained ----------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_state_dict_given(pkgs, folders, tmp_path):
    model = _ours(pkgs, folders, "qwen2_tied")
    state = {k: v * 2 for k, v in model.state_dict().items()}
    assert "lm_head.weight" not in state
    model.save_pretrained(tmp_path / "s", state_dict=state)
    saved = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    back = type(model).from_pretrained(tmp_path / "s")
    assert torch.equal(back.lm_head.weight, state["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_sharded_save_loads_in_hf_and_back(pkgs, folders, tmp_path, family):
    model = _ours(pkgs, folders, family)
    ids = _ids(2, 6)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(load_file(str(tmp_path / "one" / "model.safetensors")))
    hf = hf_oracle.load_hf(tmp_path / "sharded")
    torch.testing.assert_close(hf(ids).logits, hf_oracle.load_hf(tmp_path / "one")(ids).logits, atol=0, rtol=0)
    back = type(model).from_pretrained(tmp_path / "sharded")
    for (name, p), q in zip(model.named_parameters(), back.parameters()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(hf(ids).logits, back(ids).logits)
    model.save_pretrained(tmp_path / "sharded", max_shard_size=10**9)  # over a sharded save: the shards go
    assert sorted(p.name for p in (tmp_path / "sharded").glob("model*")) == ["model.safetensors"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size=200_000)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()  # it would win over the new index


def test_save_pretrained_keywords(pkgs, folders, tmp_path):
    model = _ours(pkgs, folders, "qwen2")
    model.save_pretrained(tmp_path / "ok", safe_serialization=True, is_main_process=True, variant=None, token=None)
    assert (tmp_path / "ok" / "model.safetensors").is_file()
    model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
    _refused(lambda: model.save_pretrained(tmp_path / "x", safe_serialization=False), ValueError, "safetensors")
    _refused(lambda: model.save_pretrained(tmp_path / "x", push_to_hub=True), ValueError, "push_to_hub")
    _refused(lambda: model.save_pretrained(tmp_path / "x", bogus=1), TypeError, "bogus")
    _refused(lambda: model.save_pretrained(tmp_path / "x", variant="fp16"), ValueError, "variant")
    for size in ("5 parsecs", 0, -1, "GB", True):
        _refused(
            lambda size=size: model.save_pretrained(tmp_path / "x", max_shard_size=size), ValueError, "max_shard_size"
        )


def test_parse_size_as_huggingface_hub(pkgs):
    checkpoint = importlib.import_module("apitest_qwen2.checkpoint")
    assert checkpoint.parse_size("5GB") == 5 * 10**9 and checkpoint.parse_size("500MB") == 500 * 10**6
    assert checkpoint.parse_size("2GiB") == 2 * 2**30 and checkpoint.parse_size(1234) == 1234
    assert checkpoint.parse_size("1.5kb") == 1500
