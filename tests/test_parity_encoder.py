"""models/modernbert.model against transformers' ModernBertForMaskedLM (float32, CPU): logits, a right-padded
batch, the masked-LM loss and every gradient by HF's parameter name, the save -> HF load round trip. Three tiny
layers with a local window of 2 tokens each side over 12, so the global / local alternation, the two rotary bases,
layer 0's missing attention norm and the symmetric window all show in the numbers."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=hf_oracle.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=64, local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
    sep_token_id=2, global_rope_theta=1000.0, local_rope_theta=100.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("build"), (ROOT / "models" / "modernbert.model", None)):
        yield importlib.import_module("modernbert")


def _folder(tmp_path: Path, **overrides) -> Path:
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(**{**TINY, **overrides})
    model = ModernBertForMaskedLM(config).eval()
    hf_oracle.randomize_(model, seed=4)
    model.save_pretrained(tmp_path)
    return tmp_path


def _hf(folder: Path):
    from transformers import ModernBertForMaskedLM

    return ModernBertForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()


def _batch():
    ids = torch.randint(3, hf_oracle.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("modernbert"))


def test_layers_alternate_and_the_first_has_no_attention_norm(pkg, folder):
    ours = pkg.ModernBertForMaskedLM.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["layer_types"] == [
        "full_attention", "sliding_attention", "sliding_attention"
    ]  # fmt: skip
    assert [layer.attn_norm is None for layer in ours.model.layers] == [True, False, False]
    assert ours.decoder.weight is ours.model.embeddings.tok_embeddings.weight


def test_logits_loss_and_gradients_match_hf(pkg, folder):
    hf = _hf(folder)
    ours = pkg.ModernBertForMaskedLM.from_pretrained(folder)
    ids, mask = _batch()
    labels = ids.clone()
    labels[:, ::3] = -100
    labels[~mask.bool()] = -100  # padded rows' logits are not HF's (nor meaningful): no loss there
    want = hf(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real])
    torch.testing.assert_close(got.loss, want.loss)
    want.loss.backward()
    got.loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    for name, p in hf.named_parameters():
        assert grads.get(name) is not None, f"no gradient reached {name}"
        torch.testing.assert_close(grads[name], p.grad, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_the_window_and_the_bases_matter(pkg, folder, tmp_path):
    """A wider window and one rotary base change the logits: the tiny model exercises what it claims."""
    ours = pkg.ModernBertForMaskedLM.from_pretrained(folder)
    ids, _ = _batch()
    with torch.no_grad():
        base = ours(input_ids=ids).logits
        for field, value in (("local_attention", 64), ("local_rope_theta", 1000.0)):
            setattr(ours.config, field, value)
            assert not torch.allclose(ours(input_ids=ids).logits, base), field
            setattr(ours.config, field, TINY[field])


def test_transformers4_config_without_layer_types(pkg, folder, tmp_path):
    """A config.json with global_attn_every_n_layers and no layer_types (transformers 4) gives the same layers."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("layer_types")
    config["global_attn_every_n_layers"] = 3
    for name in folder.iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids, _ = _batch()
    with torch.no_grad():
        a = pkg.ModernBertForMaskedLM.from_pretrained(tmp_path)(input_ids=ids).logits
        b = _hf(folder)(input_ids=ids).logits
    torch.testing.assert_close(a, b)


def test_save_round_trips_through_hf(pkg, folder, tmp_path):
    ours = pkg.ModernBertForMaskedLM.from_pretrained(folder)
    ours.save_pretrained(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        again = _hf(tmp_path)(input_ids=ids, attention_mask=mask).logits
        want = _hf(folder)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again, want, rtol=0, atol=0)
