"""The generated package as its users meet it, float32 on CPU: checkpoint loading and its errors, sharded
checkpoints, the config class, dtypes and tied weights, peak memory while loading, torch.compile, activation
checkpointing, HF Trainer, generation options and ModelOutput.

Numerical parity with Hugging Face is tests/test_parity.py's job; here the tiny HF models of tests/hf_oracle.py
serve as checkpoints. Each spec is built once per session, under its own package name (`pkgtest_*`) so that
its modules never collide in sys.modules with the packages other test files import.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
QWEN2, GPT2 = "pkgtest_qwen2", "pkgtest_gpt2"


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """Build qwen2 and gpt2 once; return the folder that holds both packages (on sys.path meanwhile)."""
    specs = (ROOT / "models" / "qwen2.model", QWEN2), (ROOT / "models" / "gpt2.model", GPT2)
    with built_packages(tmp_path_factory.mktemp("pkgtest_build"), *specs) as out:
        yield out


@pytest.fixture(scope="session")
def qwen2(built):
    return importlib.import_module(QWEN2)


@pytest.fixture(scope="session")
def gpt2(built):
    return importlib.import_module(GPT2)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """A tiny untied HF Qwen2 checkpoint folder (read only: copy it before changing anything)."""
    return hf_oracle.make_hf_model("qwen2", tmp_path_factory.mktemp("hf_qwen2"), tie=False, seed=3)


@pytest.fixture(scope="session")
def qwen2_tied_dir(tmp_path_factory) -> Path:
    return hf_oracle.make_hf_model("qwen2", tmp_path_factory.mktemp("hf_qwen2_tied"), tie=True, seed=4)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return hf_oracle.make_hf_model("gpt2", tmp_path_factory.mktemp("hf_gpt2"), seed=5)


@pytest.fixture()
def model(qwen2, qwen2_dir):
    """A fresh float32 Qwen2ForCausalLM per test (tests train it, compile it, change its mode)."""
    return qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_dir)


def _ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, hf_oracle.VOCAB, (batch, length), generator=g)


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _variant(src: Path, dst: Path, mutate) -> Path:
    """A copy of checkpoint folder `src` whose tensors went through `mutate(dict)`."""
    _copy_config(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _write_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    data = json.loads((src / "config.json").read_text())
    data.update(changes)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


# ---- loading errors ------------------------------------------------------------------------------


def test_wrong_shape_names_the_tensor_and_both_shapes(qwen2, qwen2_dir, tmp_path):
    def pad(t):
        t["model.norm.weight"] = torch.cat([t["model.norm.weight"], torch.ones(1)])

    folder = _variant(qwen2_dir, tmp_path / "ckpt", pad)
    with pytest.raises(qwen2.CheckpointError) as e:
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    msg = str(e.value)
    assert "model.norm.weight" in msg and "[65]" in msg and "[64]" in msg, msg


def test_reshaped_tensor_is_refused(qwen2, qwen2_dir, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] stored as [32, 128]: same numel, wrong shape

    folder = _variant(qwen2_dir, tmp_path / "ckpt", lambda t: t.__setitem__(name, t[name].reshape(32, 128)))
    with pytest.raises(qwen2.CheckpointError, match=r"(?s)q_proj\.weight.*\[32, 128\].*\[64, 64\]"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)


def test_missing_tensor_is_named(qwen2, qwen2_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    folder = _variant(qwen2_dir, tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(qwen2.CheckpointError) as e:
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    assert f"`{name}`" in str(e.value) and "not in the checkpoint" in str(e.value) and "[96, 64]" in str(e.value)


def test_extra_tensor_is_refused_and_strict_false_warns(qwen2, qwen2_dir, tmp_path):
    folder = _variant(qwen2_dir, tmp_path / "ckpt", lambda t: t.__setitem__("model.extra.weight", torch.ones(3, 2)))
    with pytest.raises(qwen2.CheckpointError) as e:
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    assert "model.extra.weight" in str(e.value) and "[3, 2]" in str(e.value)

    with pytest.warns(UserWarning, match=r"model\.extra\.weight"):
        loose = qwen2.Qwen2ForCausalLM.from_pretrained(folder, strict=False)
    assert not any("extra" in n for n, _ in loose.named_parameters())
    reference = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    with torch.no_grad():
        torch.testing.assert_close(loose(_ids()).logits, reference(_ids()).logits, rtol=0, atol=0)


def test_strict_false_still_refuses_missing_tensors(qwen2, qwen2_dir, tmp_path):
    folder = _variant(qwen2_dir, tmp_path / "ckpt", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(qwen2.CheckpointError, match=r"model\.norm\.weight"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder, strict=False)


def test_every_problem_is_reported_at_once(qwen2, qwen2_dir, tmp_path):
    def mutate(t):
        t.pop("model.norm.weight")
        t["model.extra.weight"] = torch.ones(2)

    folder = _variant(qwen2_dir, tmp_path / "ckpt", mutate)
    with pytest.raises(qwen2.CheckpointError) as e:
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    assert "model.norm.weight" in str(e.value) and "model.extra.weight" in str(e.value)


def test_truncated_safetensors_is_a_clear_error(qwen2, qwen2_dir, tmp_path):
    folder = _copy_config(qwen2_dir, tmp_path / "ckpt")
    data = (qwen2_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(qwen2.CheckpointError) as e:
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    assert "model.safetensors" in str(e.value) and "truncated" in str(e.value)


def test_truncated_header_is_a_clear_error(qwen2, qwen2_dir, tmp_path):
    folder = _copy_config(qwen2_dir, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes((qwen2_dir / "model.safetensors").read_bytes()[:20])
    with pytest.raises(qwen2.CheckpointError, match="model.safetensors"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)


def test_pickle_only_folder_is_refused_without_unpickling(qwen2, qwen2_dir, tmp_path, monkeypatch):
    class Payload:  # unpickling this creates `marker`: proof that the file was unpickled
        def __reduce__(self):
            return (open, (str(marker), "w"))

    marker = tmp_path / "unpickled"
    folder = _copy_config(qwen2_dir, tmp_path / "ckpt")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(qwen2.CheckpointError) as e:
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    assert "pytorch_model.bin" in str(e.value) and "pickle" in str(e.value) and "safetensors" in str(e.value)
    assert not marker.exists() and not calls

    (folder / "pytorch_model.bin").write_bytes(os.urandom(4096))  # random bytes: the same refusal
    with pytest.raises(qwen2.CheckpointError, match="pytorch_model.bin"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)


def test_missing_folder_is_a_clear_error(qwen2, tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(qwen2.CheckpointError, match="not found") as e:
        qwen2.Qwen2ForCausalLM.from_pretrained(missing)
    assert str(missing) in str(e.value)


def test_folder_without_weights_is_a_clear_error(qwen2, qwen2_dir, tmp_path):
    folder = _copy_config(qwen2_dir, tmp_path / "ckpt")
    with pytest.raises(qwen2.CheckpointError, match=r"model\.safetensors"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)


def test_folder_without_config_is_a_clear_error(qwen2, qwen2_dir, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(qwen2_dir / "model.safetensors", folder)
    with pytest.raises(qwen2.ConfigError, match="config.json"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)


def test_gpt2_base_model_checkpoint_loads(gpt2, gpt2_dir, tmp_path):
    """The layout of openai-community/gpt2's model.safetensors: no `transformer.` prefix, mask buffers kept."""
    folder = _copy_config(gpt2_dir, tmp_path / "base")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(gpt2_dir / "model.safetensors")).items()}
    for i in range(hf_oracle.LAYERS):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, hf_oracle.MAX_POS, hf_oracle.MAX_POS))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    a = gpt2.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    b = gpt2.GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(b(_ids()).logits, a(_ids()).logits, rtol=0, atol=0)


# ---- sharded checkpoints -------------------------------------------------------------------------


def _shard(src: Path, dst: Path) -> Path:
    """Split src/model.safetensors into two shards plus model.safetensors.index.json, as HF writes them."""
    _copy_config(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst


def test_sharded_checkpoint_loads_like_the_single_file(qwen2, qwen2_dir, tmp_path):
    sharded = _shard(qwen2_dir, tmp_path / "sharded")
    assert not (sharded / "model.safetensors").exists()
    a = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    b = qwen2.Qwen2ForCausalLM.from_pretrained(sharded)
    with torch.no_grad():
        torch.testing.assert_close(b(_ids()).logits, a(_ids()).logits, rtol=0, atol=0)


def test_sharded_checkpoint_with_a_missing_shard_names_it(qwen2, qwen2_dir, tmp_path):
    sharded = _shard(qwen2_dir, tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(qwen2.CheckpointError, match="model-00002-of-00002.safetensors"):
        qwen2.Qwen2ForCausalLM.from_pretrained(sharded)


def test_sharded_checkpoint_with_a_broken_index_is_a_clear_error(qwen2, qwen2_dir, tmp_path):
    sharded = _shard(qwen2_dir, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(qwen2.CheckpointError, match="index"):
        qwen2.Qwen2ForCausalLM.from_pretrained(sharded)


# ---- config ----------------------------------------------------------------------------------------


def test_config_refuses_a_wrong_type_naming_the_key(qwen2, qwen2_dir, tmp_path):
    folder = _write_config(qwen2_dir, tmp_path / "c", hidden_size="64")
    with pytest.raises(qwen2.ConfigError, match=r"`hidden_size` must be int, got str '64'"):
        qwen2.Qwen2Config.from_pretrained(folder)
    with pytest.raises(qwen2.ConfigError, match="tie_word_embeddings"):  # 1 is not a bool
        qwen2.Qwen2Config.from_dict({"tie_word_embeddings": 1})
    with pytest.raises(qwen2.ConfigError, match="head_dim"):  # a derived field given explicitly is checked too
        qwen2.Qwen2Config.from_dict({"head_dim": 16.5})


def test_config_refuses_another_model_type(qwen2, qwen2_dir, tmp_path):
    folder = _write_config(qwen2_dir, tmp_path / "c", model_type="llama")
    with pytest.raises(qwen2.ConfigError, match=r"`model_type` is 'llama'.*'qwen2'"):
        qwen2.Qwen2Config.from_pretrained(folder)
    with pytest.raises(qwen2.ConfigError, match="model_type"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)


def test_config_failed_require_shows_the_values(qwen2):
    with pytest.raises(qwen2.ConfigError) as e:
        qwen2.Qwen2Config.from_dict({"hidden_size": 64, "num_attention_heads": 5, "num_key_value_heads": 1})
    msg = str(e.value)
    assert "hidden_size must split evenly" in msg and "hidden_size=64" in msg and "num_attention_heads=5" in msg
    with pytest.raises(qwen2.ConfigError, match="num_key_value_heads=3"):
        qwen2.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


def test_config_reads_the_nested_rope_theta_alias(qwen2, qwen2_dir, tmp_path):
    data = json.loads((qwen2_dir / "config.json").read_text())
    assert "rope_parameters" in data and "rope_theta" not in data  # transformers 5 nests it
    data["rope_parameters"]["rope_theta"] = 12345  # an int in JSON for a float field is fine
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = qwen2.Qwen2Config.from_pretrained(tmp_path)
    assert config.rope_theta == 12345.0 and isinstance(config.rope_theta, float)
    assert qwen2.Qwen2Config.from_dict({"seq_length": 77}).max_position_embeddings == 77
    # a top-level value wins over the nested alias
    assert qwen2.Qwen2Config.from_dict({"rope_theta": 5.0, "rope_parameters": {"rope_theta": 7.0}}).rope_theta == 5.0


def test_config_reads_the_hf_folder_as_it_is(qwen2, qwen2_dir):
    config = qwen2.Qwen2Config.from_pretrained(qwen2_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
    assert config.head_dim == 16 and config.rope_theta == 1e6 and config.tie_word_embeddings is False


def test_config_archs(qwen2):
    assert qwen2.Qwen2Config.for_arch("0.5b").tie_word_embeddings is True
    big = qwen2.Qwen2Config.for_arch("7b", num_hidden_layers=2)
    assert (big.hidden_size, big.num_key_value_heads, big.num_hidden_layers, big.head_dim) == (3584, 4, 2, 128)
    assert big.tie_word_embeddings is False  # 7b extends 1.5b and overrides its tie
    with pytest.raises(qwen2.ConfigError, match="0.5b"):
        qwen2.Qwen2Config.for_arch("70b")


def test_unknown_config_keys_are_kept_and_written_back(qwen2, qwen2_dir, tmp_path):
    src = _write_config(qwen2_dir, tmp_path / "src", my_custom_key={"a": [1, 2]})
    shutil.copy(qwen2_dir / "model.safetensors", src)
    config = qwen2.Qwen2Config.from_pretrained(src)
    assert config.extra["my_custom_key"] == {"a": [1, 2]} and "use_cache" in config.extra
    model = qwen2.Qwen2ForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    for key in (
        "my_custom_key",
        "use_cache",
        "use_sliding_window",
        "max_window_layers",
        "rope_parameters",
        "layer_types",
    ):
        assert saved[key] == original[key], key
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and saved["hidden_size"] == 64
    assert qwen2.Qwen2Config.from_pretrained(tmp_path / "out").extra["my_custom_key"] == {"a": [1, 2]}


# ---- dtypes and tied weights -----------------------------------------------------------------------


def test_bfloat16_load_runs(qwen2, qwen2_dir):
    ref = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    for dtype in (torch.bfloat16, "bfloat16"):
        model = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_dir, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            logits = model(_ids()).logits
            expected = ref(_ids()).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        torch.testing.assert_close(logits.float(), expected, rtol=0.1, atol=0.15)
    out = model.generate(_ids(1, 4), max_new_tokens=3)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("case", ["qwen2-tied", "gpt2"])
def test_tied_weights_share_storage_after_load(case, qwen2, gpt2, qwen2_tied_dir, gpt2_dir):
    if case == "gpt2":
        model = gpt2.GPT2LMHeadModel.from_pretrained(gpt2_dir)
        embed = model.transformer.wte
    else:
        model = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_tied_dir)
        embed = model.model.embed_tokens
    assert model.lm_head.weight is embed.weight
    assert model.lm_head.weight.data_ptr() == embed.weight.data_ptr()
    model = model.to(torch.float64)
    assert model.lm_head.weight is embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once, as optimizers and FSDP expect
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_untied_weights_are_separate(model):
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


# ---- peak memory while loading -----------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch

    sys.path.insert(0, sys.argv[1])
    pkg = __import__(sys.argv[2])

    def status(key):  # bytes
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    # warm up every lazy import and first-use cost on a tiny model first, so the baseline holds them
    warm = pkg.Qwen2ForCausalLM.from_pretrained(sys.argv[3])
    with torch.no_grad():
        warm(torch.ones(1, 4, dtype=torch.long))
    del warm
    try:  # reset the high-water mark to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
    except OSError:
        base = status("VmHWM")
    model = pkg.Qwen2ForCausalLM.from_pretrained(sys.argv[4])
    with torch.no_grad():  # read every weight, so lazily mapped pages count too
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    peak = status("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": peak, "weights": weights, "checksum": checksum}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc (Linux)")
def test_loading_holds_the_weights_once(qwen2, built, qwen2_dir, tmp_path):
    """Peak RSS growth of a fresh process loading ~100 MB of float32 weights stays well under two copies.

    The peak is /proc's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a
    large pytest process would report the parent's peak.
    """
    config = qwen2.Qwen2Config(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        shapes = qwen2.Qwen2ForCausalLM(config).parameter_shapes()
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes.items()}
    expected_checksum = float(sum(t.double().sum() for t in tensors.values()))
    big = tmp_path / "big"
    big.mkdir()
    save_file(tensors, str(big / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (big / "config.json").write_text(json.dumps(config.to_dict()))

    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(built), QWEN2, str(qwen2_dir), str(big)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["weights"] > 95e6, r
    assert math.isclose(r["checksum"], expected_checksum, rel_tol=1e-6, abs_tol=1e-3), "weights read back wrong"
    growth = r["peak"] - r["base"]
    print(
        f"\nload of {r['weights'] / 1e6:.0f} MB of weights: peak RSS grew {growth / 1e6:.0f} MB "
        f"({growth / r['weights']:.2f}x) over a {r['base'] / 1e6:.0f} MB baseline"
    )
    assert growth < 1.6 * r["weights"], f"loading grew the peak RSS by {growth / r['weights']:.2f}x the weights: {r}"


# ---- training ----------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager(model):
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
        got = compiled(ids, attention_mask=mask, labels=labels)
        got.loss.backward()
    finally:
        torch._dynamo.reset()
    want = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    assert torch.isfinite(got.loss)
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_fullgraph_in_training(model):
    """Train mode with labels (the fused LM-head loss, where the spec has one): same loss and gradients."""
    ids = _ids(2, 10)
    labels = ids.clone()
    labels[1, :4] = -100
    model.train()
    torch._dynamo.reset()
    try:
        loss = torch.compile(model, fullgraph=True, backend="eager")(ids, labels=labels).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = model(ids, labels=labels).loss
    want.backward()
    torch.testing.assert_close(loss, want)
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled[name], p.grad, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_gradient_checkpointing_gives_the_same_gradients(model, monkeypatch):
    import torch.utils.checkpoint as tuc

    ids = _ids(2, 10)
    labels = ids.clone()
    labels[1, :4] = -100
    model.train()

    def grads():
        model.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss0, grads0 = grads()
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.gradient_checkpointing_enable()
    loss1, grads1 = grads()
    assert len(calls) == model.config.num_hidden_layers, "activation checkpointing was not used"
    torch.testing.assert_close(loss1, loss0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, msg=lambda m, n=name: f"gradient of {n}: {m}")
    calls.clear()
    model.eval()  # in eval mode nothing is recomputed
    with torch.no_grad():
        model(ids)
    assert not calls
    model.gradient_checkpointing_disable()
    model.train()
    grads()
    assert not calls


def _dataset(n: int = 8, length: int = 10):
    rows = []
    for i in range(n):
        ids = _ids(1, length, seed=100 + i)[0]
        labels = ids.clone()
        labels[: i % 5] = -100  # a different count of labelled tokens per row
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _trainer(model, out: Path, **kwargs):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    args = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    args.update(kwargs)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=_dataset(), eval_dataset=_dataset(4))


def _checkpointing_arg() -> str:
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def test_hf_trainer_trains_two_steps(model, tmp_path):
    """Two steps with activation checkpointing on (as Trainer switches it on), then evaluate and predict."""
    before = model.lm_head.weight.detach().clone()
    trainer = _trainer(model, tmp_path, max_steps=2, **{_checkpointing_arg(): True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation notes
        result = trainer.train()
    assert model.is_activation_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(result.training_loss)
    assert not torch.equal(model.lm_head.weight.detach(), before), "the optimizer did not update the weights"
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    predictions = trainer.predict(_dataset(4)).predictions
    assert predictions.shape == (4, 10, hf_oracle.VOCAB)


def test_hf_trainer_saves_a_tied_model(qwen2, qwen2_tied_dir, tmp_path):
    model = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_tied_dir)
    _trainer(model, tmp_path, max_steps=1).save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_hf_trainer_checkpoints_reload_with_equal_weights(qwen2, qwen2_dir, tmp_path):
    """Trainer with save_steps writes checkpoint-N folders (for a model that is not a transformers class: the
    weights alone, through `state_dict()`); `from_pretrained(folder, config=...)` reloads them, strictly."""
    model = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    seen = {}

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer = _trainer(model, tmp_path, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    trainer.add_callback(Snapshot())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    assert sorted(seen) == [1, 2]
    for step, weights in seen.items():
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / "model.safetensors").is_file()
        back = qwen2.Qwen2ForCausalLM.from_pretrained(folder, config=model.config)
        for name, p in back.named_parameters():
            assert torch.equal(p, weights[name]), f"checkpoint-{step}: {name}"
        assert qwen2.Qwen2ForCausalLM.from_pretrained(folder, config=qwen2_dir).config == model.config
    assert not torch.equal(seen[1]["lm_head.weight"], seen[2]["lm_head.weight"])
    # what Trainer hands a transformers model's save_pretrained: state_dict= and is_main_process=
    model.save_pretrained(tmp_path / "saved", state_dict=model.state_dict(), is_main_process=True)
    back = qwen2.Qwen2ForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), back.parameters()))


def test_hf_trainer_gradient_accumulation_matches_hf(qwen2, qwen2_dir, tmp_path):
    """With gradient accumulation, Trainer hands the model `num_items_in_batch`: one SGD step on our model
    must move the weights exactly as it moves HF's Qwen2 (same data order, same loss normalization)."""
    ours = qwen2.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    hf = hf_oracle.load_hf(qwen2_dir)
    kwargs = dict(
        max_steps=1,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    for i, m in enumerate((ours, hf)):
        _trainer(m.train(), tmp_path / str(i), **kwargs).train()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.detach(), hf_params[name].detach(), msg=lambda m, n=name: f"{n} after a step: {m}")


@pytest.mark.parametrize("mode", ["eval", "train"])  # train mode takes the fused LM-head loss where there is one
def test_num_items_in_batch_normalizes_the_loss(model, mode):
    ids = _ids(2, 10)
    labels = ids.clone()
    labels[0, :6] = -100
    model.train(mode == "train")
    with torch.no_grad():
        mean = model(ids, labels=labels).loss
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
        as_int = model(ids, labels=labels, num_items_in_batch=7).loss
    counted = int((labels[:, 1:] != -100).sum())  # the causal shift drops position 0
    torch.testing.assert_close(summed * 7, mean * counted)
    torch.testing.assert_close(as_int, summed)
    assert model.loss_type == "ForCausalLM"  # what Trainer reads to count labels[..., 1:]


# ---- generation ----------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_differs_from_greedy(model):
    ids = _ids(2, 6)
    greedy = model.generate(ids, max_new_tokens=10)

    def sample(**kw):
        return model.generate(ids, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(0), **kw)

    a, b = sample(temperature=1.5), sample(temperature=1.5)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :6], ids) and a.shape == greedy.shape
    assert not torch.equal(a, greedy)
    assert torch.equal(sample(temperature=1.5, top_k=1), greedy)
    assert torch.equal(sample(top_p=1e-6), greedy)  # top_p keeps at least the most likely token
    c = model.generate(
        ids, max_new_tokens=10, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.equal(a, c), "the generator's seed has no effect"


def test_sampled_tokens_stay_in_top_k(model):
    ids = _ids(1, 6)
    out = model.generate(
        ids, max_new_tokens=1, do_sample=True, top_k=3, temperature=5.0, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        top3 = model(ids).logits[0, -1].topk(3).indices
    assert int(out[0, -1]) in top3.tolist()


def test_eos_stops_early_and_pads_finished_rows(model):
    ids = _ids(2, 6, seed=7)
    greedy = model.generate(ids, max_new_tokens=10)
    new = greedy[:, 6:]
    # EOS := the token row 0 emits at step 3, one it does not emit before
    step = next(s for s in range(3, 10) if int(new[0, s]) not in new[0, :s].tolist())
    eos = int(new[0, step])

    single = model.generate(ids[:1], max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(single, greedy[:1, : 6 + step + 1]), "generation did not stop at the EOS token"

    pad = 0
    batch = model.generate(ids, max_new_tokens=10, eos_token_id=[eos], pad_token_id=pad)
    expected = []
    for row in greedy.tolist():
        gen = row[6:]
        if eos in gen:
            k = gen.index(eos) + 1
            gen = gen[:k] + [pad] * (len(gen) - k)
        expected.append(row[:6] + gen)
    expected = torch.tensor(expected)
    ends = [r[6:].index(eos) + 1 if eos in r[6:] else 10 for r in greedy.tolist()]
    assert torch.equal(batch, expected[:, : 6 + max(ends)]), f"{batch.tolist()} != {expected.tolist()}"


def test_left_padded_batch_equals_rows_alone(model):
    pad = 0
    rows = [_ids(1, 7, seed=11)[0], _ids(1, 4, seed=12)[0], _ids(1, 2, seed=13)[0]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(batch[:, :width], ids)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=8)
        assert torch.equal(batch[i, width:], alone[0, len(r) :]), f"row {i}: {batch[i].tolist()} vs {alone[0].tolist()}"


def test_generate_keeps_the_training_mode_and_frees_the_cache(model):
    model.train()
    model.generate(_ids(1, 4), max_new_tokens=2)
    assert model.training
    assert all(getattr(m, "kv_cache", None) is None for m in model.modules())


# ---- ModelOutput --------------------------------------------------------------------------------------------------


def test_model_output_reads_as_hf_expects(model):
    ids = _ids()
    out = model(ids, labels=ids)
    assert "loss" in out and "logits" in out
    assert out["logits"] is out.logits and out["loss"] is out.loss
    assert out[0] is out.loss and out[1] is out.logits  # HF order: loss first
    assert out.to_tuple() == (out.loss, out.logits)
    assert list(out.keys()) == ["loss", "logits"]
    loss, logits = out.values()
    assert logits.shape == (2, 8, hf_oracle.VOCAB) and loss.dim() == 0

    plain = model(ids)
    assert "loss" not in plain and plain.loss is None
    assert plain[0] is plain.logits and len(plain) == 1
    with pytest.raises(KeyError):
        plain["loss"]
    with pytest.raises(AttributeError):
        plain.__missing_dunder__  # noqa: B018
    assert isinstance(plain, dict)


def test_the_package_warns_about_nothing(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(_ids(), attention_mask=torch.ones(2, 8, dtype=torch.long))
        model.generate(_ids(1, 3), max_new_tokens=2)


def test_tied_copy_that_differs_is_refused(qwen2, qwen2_tied_dir, tmp_path):
    """HF unties a config-tied pair whose tensors differ; silently using one of them would be wrong."""
    folder = _copy_config(qwen2_tied_dir, tmp_path / "differs")
    tensors = load_file(str(qwen2_tied_dir / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed + 1.0
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(qwen2.CheckpointError, match="lm_head.weight.*model.embed_tokens.weight.*differ"):
        qwen2.Qwen2ForCausalLM.from_pretrained(folder)
    tensors["lm_head.weight"] = embed.clone()  # an equal copy is fine
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    qwen2.Qwen2ForCausalLM.from_pretrained(folder)
