"""`dslc generate`: builds (or reuses) the package, loads a folder, streams text; clear errors for bad inputs.
Runs on the bundled default, models/tiny-qwen2, against Hugging Face's own generate as the oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dslc.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "models" / "qwen2.model")
WEIGHTS = ROOT / "models" / "tiny-qwen2"


def run(capsys, *args, build_dir) -> tuple[int, str, str]:
    rc = main(["generate", SPEC, *args, "--build-dir", str(build_dir)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_greedy_text_equals_hf_generate(capsys, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    prompt = "def parse_args("
    rc, out, err = run(
        capsys, "--weights", str(WEIGHTS), "--prompt", prompt, "--max-new-tokens", "12", build_dir=tmp_path
    )
    assert rc == 0, err
    assert "tokens/s" in err and "built" in err
    tok = Tokenizer.from_file(str(WEIGHTS / "tokenizer.json"))
    hf = AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt).ids])
    eos = json.loads((WEIGHTS / "config.json").read_text())["eos_token_id"]
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    text = tok.decode(expected[0, ids.shape[1] :].tolist())
    assert out == prompt + text + "\n"
    assert len(out.strip()) > len(prompt), "the bundled model wrote nothing"


def test_sampling_is_reproducible_and_the_build_is_reused(capsys, tmp_path):
    args = (
        "--weights",
        str(WEIGHTS),
        "--prompt",
        "import ",
        "--max-new-tokens",
        "10",
        "--do-sample",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "3",
    )
    rc1, out1, err1 = run(capsys, *args, build_dir=tmp_path)
    rc2, out2, err2 = run(capsys, *args, build_dir=tmp_path)
    assert rc1 == rc2 == 0
    assert out1 == out2
    assert "built" in err1 and "reused" in err2


def test_missing_folder(capsys, tmp_path):
    rc, _, err = run(capsys, "--weights", str(tmp_path / "nope"), build_dir=tmp_path / "b")
    assert rc == 2 and "weights folder not found" in err and "Traceback" not in err


def test_missing_tokenizer(capsys, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(WEIGHTS, folder)
    (folder / "tokenizer.json").unlink()
    rc, _, err = run(capsys, "--weights", str(folder), build_dir=tmp_path / "b")
    assert rc == 2 and "tokenizer.json" in err


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("model_type", "llama", "model_type"),
        ("hidden_size", "128", "hidden_size"),
    ],
)
def test_config_that_does_not_fit_names_the_key(capsys, tmp_path, key, value, expect):
    folder = tmp_path / "w"
    shutil.copytree(WEIGHTS, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    rc, _, err = run(capsys, "--weights", str(folder), build_dir=tmp_path / "b")
    assert rc == 2 and expect in err and "does not fit" in err and "Traceback" not in err


def test_checkpoint_that_does_not_fit_names_the_tensor(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "w"
    shutil.copytree(WEIGHTS, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    rc, _, err = run(capsys, "--weights", str(folder), build_dir=tmp_path / "b")
    assert rc == 2 and "model.norm.weight" in err


def test_set_overrides_config_json_and_the_context_is_enforced(capsys, tmp_path):
    rc, out, err = run(
        capsys,
        "--weights",
        str(WEIGHTS),
        "--prompt",
        "def f(",
        "--max-new-tokens",
        "20",
        "--set",
        "max_position_embeddings=16",
        build_dir=tmp_path,
    )
    assert rc == 2
    assert "past the model's context (max_position_embeddings=16" in err and "lower --max-new-tokens" in err
    rc, out, err = run(capsys, "--weights", str(WEIGHTS), "--set", "no_such_field=1", build_dir=tmp_path)
    assert rc == 2 and "--set no_such_field: qwen2.model's config has no field 'no_such_field'" in err
    rc, out, err = run(capsys, "--weights", str(WEIGHTS), "--set", "num_hidden_layers=true", build_dir=tmp_path)
    assert rc == 2 and "(with --set overrides) does not fit qwen2.model" in err and "num_hidden_layers" in err


def test_int8_weight_only_generates(capsys, tmp_path):
    pytest.importorskip("torchao")
    args = ("--weights", str(WEIGHTS), "--prompt", "def parse_args(", "--max-new-tokens", "12")
    rc, out_int8, err = run(capsys, *args, "--dtype", "int8", build_dir=tmp_path)
    assert rc == 0, err
    rc, out_fp32, err = run(capsys, *args, build_dir=tmp_path)
    assert rc == 0, err
    assert out_int8.startswith("def parse_args(") and len(out_int8) > len("def parse_args(\n")
    assert out_int8 == out_fp32  # weight-only int8 keeps this prompt's greedy tokens (bench/serve.py: agreement)
    rc, out, err = run(capsys, *args, "--dtype", "int4", build_dir=tmp_path)
    if rc != 0:  # int4 needs torchao's int4 kernels (CUDA, or the mslk package): a clear refusal
        assert "--dtype int4" in err and "use --dtype int8" in err
