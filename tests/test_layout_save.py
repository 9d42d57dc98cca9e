"""Saving writes the model's own names (Hugging Face's) whatever layout a checkpoint was loaded through: a
folder in a foreign key layout (q, k and v apart, as Meta-style and nanoGPT checkpoints keep them) loads
through a `concat` rule, and `save_pretrained` then writes a folder HF loads with equal logits."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import hf_oracle
import torch
from packages import MODELS, built_packages
from safetensors.torch import load_file, save_file

NATIVE_RULE = (  # a named section: a foreign layout that loading translates from, not written back on save
    'checkpoint "native":\n'
    '    "transformer.h.{i}.attn.wq", "transformer.h.{i}.attn.wk", "transformer.h.{i}.attn.wv" -> concat(dim = 0) -> '
    '"transformer.h.{i}.attn.c_attn.weight"\n\ncheckpoint:\n'
)


def _native_folder(hf_folder: Path, out: Path) -> Path:
    """The HF GPT-2 folder with each c_attn weight ([in, 3 * out], Conv1D) as three [out, in] tensors."""
    out.mkdir()
    tensors = load_file(str(hf_folder / "model.safetensors"))
    native = {}
    for key, t in tensors.items():
        if key.endswith("attn.c_attn.weight"):
            prefix = key.removesuffix("c_attn.weight")
            for name, part in zip(("wq", "wk", "wv"), t.t().chunk(3, dim=0)):
                native[prefix + name] = part.contiguous()
        else:
            native[key] = t
    save_file(native, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(hf_folder / "config.json", out / "config.json")
    return out


def test_a_foreign_layout_loads_and_saves_as_hf(tmp_path):
    spec = tmp_path / "gpt2_native.model"
    spec.write_text((MODELS / "gpt2.model").read_text().replace("checkpoint:\n", NATIVE_RULE, 1))
    hf_folder = hf_oracle.make_hf_model("gpt2", tmp_path / "hf", seed=4)
    native = _native_folder(hf_folder, tmp_path / "native")
    with built_packages(tmp_path / "build", (spec, "gpt2_native")):
        pkg = importlib.import_module("gpt2_native")
        model = pkg.GPT2LMHeadModel.from_pretrained(native)
        hf = hf_oracle.load_hf(hf_folder)
        ids = torch.randint(0, hf_oracle.VOCAB, (2, 9))
        with torch.no_grad():
            want = hf(input_ids=ids).logits
            torch.testing.assert_close(model(input_ids=ids).logits, want)
        model.save_pretrained(tmp_path / "saved")
        saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
        original = load_file(str(hf_folder / "model.safetensors"))
        assert set(saved) == set(original), sorted(set(saved) ^ set(original))
        for key in original:  # the HF layout, Conv1D's [in, out] included, bit for bit
            torch.testing.assert_close(saved[key], original[key], rtol=0, atol=0)
        assert json.loads((tmp_path / "saved" / "config.json").read_text())["n_embd"] == hf_oracle.HIDDEN
        with torch.no_grad():
            torch.testing.assert_close(hf_oracle.load_hf(tmp_path / "saved")(input_ids=ids).logits, want)
