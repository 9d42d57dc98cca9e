"""`dslc convert SPEC --layout NAME IN OUT` and the `permute` transform: a tiny Llama written in Meta's own layout
(`tok_embeddings`, `layers.{i}.attention.wq`, q/k rows in interleaved rotary pairs; permuted here by hand, the
way Meta's checkpoints hold them) loads through models/llama.model's `checkpoint "meta":` rules and converts to a
folder transformers loads with the original model's logits. Refusals name the layout, the folder or the rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hf_oracle
import pytest
import torch
from safetensors.torch import load_file, save_file

from dslc.api import check_source
from dslc.cli import main
from dslc.diagnostics import DslcError

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "models" / "llama.model"


def _to_meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary halves -> Meta's interleaved pairs, per head (the inverse of HF's conversion)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _meta_names(hf: dict[str, torch.Tensor], heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    out = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
        "rope.freqs": torch.ones(8),
    }
    parts = {
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    layers = {int(k.split(".")[2]) for k in hf if k.startswith("model.layers.")}
    for i in layers:
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = _to_meta_rows(hf[p + "self_attn.q_proj.weight"], heads)
        out[f"layers.{i}.attention.wk.weight"] = _to_meta_rows(hf[p + "self_attn.k_proj.weight"], kv_heads)
        for ours, meta in parts.items():
            out[f"layers.{i}.{meta}.weight"] = hf[p + ours + ".weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    hf = hf_oracle.make_hf_model("llama", root / "hf", tie=False, seed=9)
    config = json.loads((hf / "config.json").read_text())
    meta = root / "meta"
    meta.mkdir()
    state = load_file(hf / "model.safetensors")
    save_file(
        _meta_names(state, config["num_attention_heads"], config["num_key_value_heads"]), meta / "model.safetensors"
    )
    shutil.copyfile(hf / "config.json", meta / "config.json")
    (meta / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    assert not set(load_file(meta / "model.safetensors")) & set(state)  # not one name in common
    return {"hf": hf, "meta": meta, "root": root}


def _logits(folder: Path) -> torch.Tensor:
    ids = torch.randint(3, hf_oracle.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return hf_oracle.load_hf(folder)(input_ids=ids).logits


def test_meta_folder_converts_to_one_transformers_loads(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["convert", str(LLAMA), "--layout", "meta", str(folders["meta"]), str(out), "--build-dir", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    assert "layout meta, 22 tensors" in capsys.readouterr().err
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert sorted(load_file(out / "model.safetensors")) == sorted(load_file(folders["hf"] / "model.safetensors"))
    torch.testing.assert_close(_logits(out), _logits(folders["hf"]), rtol=0, atol=0)


def test_meta_folder_loads_directly(folders, tmp_path):
    from dslc.generate import cached_build

    pkg, _ = cached_build(LLAMA, str(tmp_path))
    ids = torch.randint(3, hf_oracle.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pkg.LlamaForCausalLM.from_pretrained(folders["meta"])(input_ids=ids).logits
    torch.testing.assert_close(ours, _logits(folders["hf"]))


@pytest.mark.parametrize(
    ("layout", "src", "make_dst", "message"),
    [
        ("native", "meta", False, "declares no checkpoint layout 'native'; its layouts: \"meta\""),
        ("meta", "hf", False, "holds no tensor of layout 'meta' (such as `tok_embeddings.weight`)"),
        ("meta", "meta", True, "exists and is not empty"),
        ("meta", "missing", False, "checkpoint folder not found"),
    ],
)
def test_convert_refusals_write_nothing(folders, tmp_path, capsys, layout, src, make_dst, message):
    out = tmp_path / "out"
    if make_dst:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    source = folders.get(src, tmp_path / src)
    code = main(["convert", str(LLAMA), "--layout", layout, str(source), str(out), "--build-dir", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == (["keep.txt"] if make_dst else [])


def test_a_folder_without_config_needs_an_arch(folders, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(folders["meta"] / "model.safetensors", bare / "model.safetensors")
    code = main(
        ["convert", str(LLAMA), "--layout", "meta", str(bare), str(tmp_path / "o"), "--build-dir", str(tmp_path)]
    )
    assert code == 2
    assert "has no config.json: name the model's sizes with --arch (archs: 7b, 13b" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("permute(heads = num_attention_heads)", "permute()", "`permute` needs the head count"),
        ("permute(heads = num_attention_heads)", "permute(heads = 3)", "each head's rows must be an even whole number"),
        ("permute(heads = num_attention_heads)", "permute(dim = 0)", "`permute` has no option `dim`"),
        (
            "permute(heads = num_attention_heads)",
            "permute(heads = num_attention_heads // 2)",
            "heads must be a number or a config field",
        ),
    ],
)
def test_permute_rule_errors_are_found_by_check(old, new, message):
    with pytest.raises(DslcError) as e:
        check_source(LLAMA.read_text().replace(old, new, 1), "llama.model")
    assert any(d.code == "E050" and message in d.message for d in e.value.diagnostics), [
        d.message for d in e.value.diagnostics
    ]
