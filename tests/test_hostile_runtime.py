"""Hostile inputs to the generated package's runtime and to `dslc generate` (issue 9, items 10, 13, 16-18).

Every case is refused up front with a message that names the file, key or tensor and the fix: no traceback,
no hang, no silent wrong result. Checkpoints are models/tiny-qwen2 (4 layers, 2 MB), copied before any change.
A FIFO is never opened (a watchdog writer unblocks a reader that would wait forever, so a regression fails
instead of hanging).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from packages import built_packages
from safetensors.torch import load_file, save_file

from dslc.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "models" / "qwen2.model"
TINY = ROOT / "models" / "tiny-qwen2"
PKG = "hostile_qwen2"


# ---- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("hostile_build"), (SPEC, PKG)):
        yield importlib.import_module(PKG)


@pytest.fixture(scope="module")
def model(pkg):
    return pkg.Qwen2ForCausalLM.from_pretrained(TINY)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """A private copy of tiny-qwen2 (config, weights, tokenizer)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(TINY, dst)
    return dst


def refused(fn, exc, *words):
    """Call fn; it must raise `exc` (not another exception type, not nothing) with each of `words` in the message."""
    try:
        fn()
    except exc as e:
        message = str(e)
        for w in words:
            assert w in message, f"UNCLEAR: {w!r} not in {message!r}"
        return message
    except Exception as e:  # noqa: BLE001 - the point: any other exception is a crash
        pytest.fail(f"CRASH: {type(e).__name__}: {e}")
    pytest.fail("SILENT: accepted")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def shard(folder: Path, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")) -> dict:
    """Split folder/model.safetensors into two shards and an index (the single file removed); returns the map."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for name, part in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: tensors[k] for k in part}, str(path), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    write_index(folder, {"metadata": {}, "weight_map": weight_map})
    return weight_map


def write_index(folder: Path, index) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def relocate(folder: Path, weight_map: dict, old: str, new: str) -> None:
    write_index(folder, {"weight_map": {k: (new if v == old else v) for k, v in weight_map.items()}})


def edit_weights(folder: Path, fn) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


class Watchdog:
    """Opens `fifo` for writing after `seconds` from another process (a reader blocked in native code may hold
    the GIL), so a reader blocked on it wakes and the test fails instead of hanging."""

    def __init__(self, fifo: Path, seconds: float = 10.0):
        self.fifo, self.seconds = fifo, seconds

    def __enter__(self):
        code = (
            "import os, time\n"
            f"time.sleep({self.seconds})\n"
            f"fd = os.open({str(self.fifo)!r}, os.O_WRONLY | os.O_NONBLOCK)\n"  # fails (ENXIO) with no reader
            "os.close(fd)\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        fired = time.monotonic() - self.start >= self.seconds
        self.proc.kill()
        self.proc.wait()
        assert not fired, "HANG: the FIFO was opened and blocked a reader"


def fifo_at(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)
    return path


# ---- item 10: shard names in the index ------------------------------------------------------------------------


def test_sharded_copy_loads(pkg, model, folder):
    shard(folder)
    loaded = pkg.Qwen2ForCausalLM.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_shard_outside_the_folder_by_dotdot(pkg, folder, tmp_path):
    wm = shard(folder)
    (tmp_path / "outside").mkdir()
    shutil.move(folder / "model-00002-of-00002.safetensors", tmp_path / "outside" / "zeros.safetensors")
    relocate(folder, wm, "model-00002-of-00002.safetensors", "../outside/zeros.safetensors")
    refused(
        lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder),
        pkg.CheckpointError,
        "../outside/zeros.safetensors",
        "inside",
    )


def test_shard_by_absolute_path(pkg, folder, tmp_path):
    wm = shard(folder)
    outside = tmp_path / "abs.safetensors"
    shutil.move(folder / "model-00002-of-00002.safetensors", outside)
    relocate(folder, wm, "model-00002-of-00002.safetensors", str(outside))
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, str(outside), "relative")


def test_shard_etc_passwd_is_not_opened(pkg, folder):
    wm = shard(folder)
    relocate(folder, wm, "model-00002-of-00002.safetensors", "/etc/passwd")
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, "/etc/passwd", "relative")


def test_shard_symlink_out_of_the_folder(pkg, folder, tmp_path):
    shard(folder)
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "model-00002-of-00002.safetensors", moved)
    (folder / "model-00002-of-00002.safetensors").symlink_to(moved)
    refused(
        lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder),
        pkg.CheckpointError,
        "model-00002-of-00002.safetensors",
        "outside",
    )


def test_shard_that_is_a_fifo_does_not_hang(pkg, folder):
    shard(folder)
    fifo = fifo_at(folder / "model-00002-of-00002.safetensors")
    with Watchdog(fifo):
        refused(
            lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder),
            pkg.CheckpointError,
            "model-00002-of-00002.safetensors",
            "regular file",
        )


def test_shard_that_is_a_directory(pkg, folder):
    shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    (folder / "model-00002-of-00002.safetensors").mkdir()
    refused(
        lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder),
        pkg.CheckpointError,
        "model-00002-of-00002.safetensors",
        "regular file",
    )


def test_shard_name_with_a_nul_byte(pkg, folder):
    wm = shard(folder)
    relocate(folder, wm, "model-00002-of-00002.safetensors", "model\x00.safetensors")
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, "index")


def test_tensor_in_two_shards(pkg, folder):
    wm = shard(folder)
    key = next(k for k, v in wm.items() if v.startswith("model-00001"))
    first = load_file(str(folder / "model-00002-of-00002.safetensors"))
    first[key] = torch.zeros(load_file(str(folder / "model-00001-of-00002.safetensors"))[key].shape)
    save_file(first, str(folder / "model-00002-of-00002.safetensors"))
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, key, "both")


def test_single_file_wins_over_an_index(pkg, model, folder):
    """transformers reads model.safetensors when both are present; the index here names a missing shard."""
    write_index(folder, {"weight_map": {"model.norm.weight": "gone.safetensors"}})
    loaded = pkg.Qwen2ForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)


def test_single_file_that_is_a_fifo_does_not_hang(pkg, folder):
    fifo = fifo_at(folder / "model.safetensors")
    with Watchdog(fifo):
        refused(
            lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder),
            pkg.CheckpointError,
            "model.safetensors",
            "regular file",
        )


def test_hub_cache_symlinks_into_blobs_load(pkg, model, tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>; those links stay allowed."""
    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    wm = shard(src)
    for name in [*sorted(set(wm.values())), "model.safetensors.index.json", "config.json"]:
        shutil.move(src / name, blobs / name.replace(".", "_"))
        (snap / name).symlink_to(Path("../../blobs") / name.replace(".", "_"))
    loaded = pkg.Qwen2ForCausalLM.from_pretrained(snap)
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)


@pytest.mark.parametrize(
    "index",
    [
        [],
        None,
        "x",
        {"weight_map": []},
        {"weight_map": {"a": 1}},
        {"weight_map": {}},
        {"weight_map": {"model.norm.weight": ""}},
    ],
    ids=["list", "null", "string", "map-list", "int-value", "empty-map", "empty-name"],
)
def test_malformed_index(pkg, folder, index):
    shard(folder)
    write_index(folder, index)
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, "model.safetensors.index.json")


def test_deeply_nested_index(pkg, folder):
    shard(folder)
    (folder / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, "model.safetensors.index.json")


# ---- item 13: config sizes against the checkpoint, before allocating ------------------------------------------


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_hidden_layers", 1_000_000_000),
        ("hidden_size", 10**9),
        ("intermediate_size", 10**12),
        ("vocab_size", 10**15),
    ],
)
def test_huge_config_sizes_are_compared_with_the_checkpoint_first(pkg, folder, key, value):
    edit_config(folder, **{key: value}, head_dim=32)
    start = time.perf_counter()
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.ConfigError, "config.json", key)
    assert time.perf_counter() - start < 5


def test_fewer_layers_than_the_checkpoint(pkg, folder):
    edit_config(folder, num_hidden_layers=2)
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, "model.layers.3")


# ---- item 16: checkpoint dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.int16, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.uint8, torch.int64], ids=str
)
def test_tensor_of_a_non_float_dtype_is_refused(pkg, folder, dtype):
    def change(t):
        w = t["model.norm.weight"]
        t["model.norm.weight"] = (w != 0) if dtype == torch.bool else w.float().to(dtype)

    edit_weights(folder, change)
    name = str(dtype).removeprefix("torch.")
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.CheckpointError, "model.norm.weight", name)


def test_float64_and_float16_tensors_still_load(pkg, folder):
    edit_weights(
        folder,
        lambda t: t.update(
            {
                "model.norm.weight": t["model.norm.weight"].double(),
                "model.embed_tokens.weight": t["model.embed_tokens.weight"].half(),
            }
        ),
    )
    loaded = pkg.Qwen2ForCausalLM.from_pretrained(folder)
    assert loaded.model.norm.weight.dtype == torch.float64


# ---- item 17: config.json -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["[]", "null", '"qwen2"', "42", "[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000 + "1" + "}" * 100_000],
    ids=["list", "null", "string", "number", "deep-list", "deep-dict"],
)
def test_config_json_that_is_not_an_object(pkg, folder, text):
    (folder / "config.json").write_text(text)
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.ConfigError, "config.json")


def test_config_json_not_utf8(pkg, folder):
    (folder / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.ConfigError, "config.json")


def test_config_json_fifo(pkg, folder):
    fifo = fifo_at(folder / "config.json")
    with Watchdog(fifo):
        refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.ConfigError, "config.json", "regular file")


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(num_attention_heads=0), ["num_attention_heads"]),
        (dict(num_attention_heads=0, head_dim=32), ["num_attention_heads"]),
        (dict(num_key_value_heads=0), ["num_key_value_heads"]),
        (dict(hidden_size=-128), ["hidden_size"]),
        (dict(intermediate_size=-1), ["intermediate_size"]),
        (dict(num_hidden_layers=-4), ["num_hidden_layers"]),
        (dict(vocab_size=0), ["vocab_size"]),
        (dict(head_dim=-32), ["head_dim"]),
        (dict(rms_norm_eps=float("nan")), ["rms_norm_eps", "finite"]),
        (dict(rms_norm_eps=float("inf")), ["rms_norm_eps", "finite"]),
        (dict(rms_norm_eps=-1e-6), ["rms_norm_eps"]),
        (dict(rope_theta=float("nan")), ["rope_theta", "finite"]),
        (dict(rope_theta=float("-inf")), ["rope_theta", "finite"]),
        (dict(rope_theta=-10000.0), ["rope_theta"]),
        (dict(rope_theta=10**400), ["rope_theta"]),
        (dict(initializer_range=float("nan")), ["initializer_range", "finite"]),
    ],
    ids=lambda v: ",".join(f"{k}={str(v[k])[:12]}" for k in v) if isinstance(v, dict) else "",
)
def test_config_values_out_of_range(pkg, folder, changes, words):
    edit_config(folder, **changes)  # json writes NaN, Infinity and 401-digit ints as they are; json reads them back
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), (pkg.ConfigError, pkg.CheckpointError), *words)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rms_norm_eps=float("nan")),
        dict(rope_theta=float("inf")),
        dict(num_attention_heads=0),
        dict(rms_norm_eps=-1.0),
    ],
    ids=str,
)
def test_config_class_refuses_the_same_values(pkg, kw):
    refused(lambda: pkg.Qwen2Config(**kw), pkg.ConfigError, next(iter(kw)))


@pytest.mark.parametrize("data", [[], None, "x", 3], ids=["list", "none", "str", "int"])
def test_config_from_dict_needs_a_dict(pkg, data):
    refused(lambda: pkg.Qwen2Config.from_dict(data), pkg.ConfigError, "object")


# ---- item 17: non-finite weights are warned about ---------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_warn(pkg, folder, value):
    def change(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = value

    edit_weights(folder, change)
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*1 non-finite"):
        pkg.Qwen2ForCausalLM.from_pretrained(folder)


def test_float16_overflow_warns(pkg, folder):
    edit_weights(folder, lambda t: t["model.norm.weight"].__setitem__(0, 1e30))
    with pytest.warns(UserWarning, match=r"model\.norm\.weight.*float16"):
        pkg.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float16)


def test_finite_weights_do_not_warn(pkg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pkg.Qwen2ForCausalLM.from_pretrained(TINY)


# ---- item 18: generate() inputs -------------------------------------------------------------------------------


def ids(n=5, batch=1):
    return torch.arange(10, 10 + batch * n).reshape(batch, n)


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(do_sample=True, temperature=0.0), ["temperature", "do_sample=False"]),
        (dict(do_sample=True, temperature=float("nan")), ["temperature"]),
        (dict(do_sample=True, temperature=-1.0), ["temperature"]),
        (dict(do_sample=True, temperature=float("inf")), ["temperature"]),
        (dict(temperature=float("nan")), ["temperature"]),
        (dict(temperature="hot"), ["temperature"]),
        (dict(max_new_tokens=-1), ["max_new_tokens"]),
        (dict(max_new_tokens=0), ["max_new_tokens"]),
        (dict(max_new_tokens=10**9), ["max_new_tokens", "512"]),
        (dict(max_new_tokens=2.5), ["max_new_tokens"]),
        (dict(max_new_tokens=True), ["max_new_tokens"]),
        (dict(do_sample=True, top_k=2.5), ["top_k"]),
        (dict(do_sample=True, top_k=-1), ["top_k"]),
        (dict(do_sample=True, top_p=0.0), ["top_p"]),
        (dict(do_sample=True, top_p=1.5), ["top_p"]),
        (dict(do_sample=True, top_p=float("nan")), ["top_p"]),
        (dict(do_sample="yes"), ["do_sample"]),
        (dict(eos_token_id=2048), ["eos_token_id", "2048"]),
        (dict(eos_token_id=-1), ["eos_token_id"]),
        (dict(eos_token_id=[1, "a"]), ["eos_token_id"]),
        (dict(eos_token_id=2.0), ["eos_token_id"]),
        (dict(pad_token_id=5000), ["pad_token_id"]),
        (dict(generator="seed"), ["generator"]),
    ],
    ids=lambda v: ",".join(f"{k}={v[k]!r}" for k in v) if isinstance(v, dict) else "",
)
def test_generate_refuses_bad_options(model, kw, words):
    refused(lambda: model.generate(ids(), **kw), ValueError, *words)


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: ids(600), ["512", "max_position_embeddings"]),
        (lambda: torch.tensor([[5, 2048]]), ["2048", "vocab"]),
        (lambda: torch.tensor([[5, -1]]), ["-1", "vocab"]),
        (lambda: torch.zeros(1, 0, dtype=torch.long), ["empty"]),
        (lambda: torch.zeros(0, 4, dtype=torch.long), ["empty"]),
        (lambda: torch.tensor([5, 6, 7]), ["[batch, length]"]),
        (lambda: torch.tensor([[5.0, 6.0]]), ["integer"]),
        (lambda: [[5, 6]], ["tensor"]),
    ],
    ids=["past-context", "id-too-big", "negative-id", "no-tokens", "no-rows", "1d", "float", "list"],
)
def test_generate_refuses_bad_input_ids(model, make, words):
    refused(lambda: model.generate(make(), max_new_tokens=4), ValueError, *words)


def test_prompt_plus_new_tokens_past_the_context(model):
    refused(lambda: model.generate(ids(500), max_new_tokens=20), ValueError, "520", "512")
    assert model.generate(ids(500), max_new_tokens=12).shape == (1, 512)


@pytest.mark.parametrize(
    "mask,words",
    [
        (torch.ones(1, 4, dtype=torch.long), ["attention_mask", "[1, 4]", "[1, 5]"]),
        (torch.ones(5, dtype=torch.long), ["attention_mask"]),
        (torch.tensor([[1, 1, 1, 0, 0]]), ["left"]),
        (torch.tensor([[0, 0, 0, 0, 0]]), ["row 0"]),
        (torch.tensor([[0, 2, 1, 1, 1]]), ["0 or 1"]),
        (torch.full((1, 5), 0.5), ["0 or 1"]),
    ],
    ids=["short", "1d", "right-padded", "empty-row", "two", "half"],
)
def test_generate_refuses_a_bad_attention_mask(model, mask, words):
    refused(lambda: model.generate(ids(), attention_mask=mask, max_new_tokens=3), ValueError, *words)


def test_valid_options_still_generate(model):
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(
        ids(5, 2),
        attention_mask=mask,
        max_new_tokens=3,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        eos_token_id=torch.tensor([0]),
        pad_token_id=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape[0] == 2 and 5 < out.shape[1] <= 8
    assert model.generate(ids(), max_new_tokens=2, temperature=0.0).shape == (1, 7)  # greedy ignores temperature


# ---- `dslc generate` and `dslc build --set` -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile_cli_build")


def cli(capsys, build_dir, weights, *args):
    rc = main(["generate", str(SPEC), "--weights", str(weights), *args, "--build-dir", str(build_dir)])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_refused(capsys, build_dir, weights, *args, words=()):
    try:
        rc, out, err = cli(capsys, build_dir, weights, *args)
    except SystemExit as e:  # argparse: a usage error, no traceback
        out, err = capsys.readouterr()
        assert e.code == 2, f"CRASH: exit {e.code}"
        rc = 2
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"CRASH: {type(e).__name__}: {e}")
    assert rc != 0, f"SILENT: rc 0, wrote {out[:200]!r}"
    assert "Traceback" not in err
    for w in words:
        assert w in err, f"UNCLEAR: {w!r} not in {err!r}"
    return err


def test_cli_still_generates(capsys, build_dir):
    rc, out, err = cli(capsys, build_dir, TINY, "--prompt", "def f(", "--max-new-tokens", "4")
    assert rc == 0, err
    assert out.startswith("def f(")


@pytest.mark.parametrize(
    "args,words",
    [
        (["--do-sample", "--temperature", "0"], ["--temperature", "do-sample"]),
        (["--do-sample", "--temperature", "nan"], ["--temperature"]),
        (["--do-sample", "--temperature", "-1"], ["--temperature"]),
        (["--temperature", "nan"], ["--temperature"]),
        (["--max-new-tokens", "-1"], ["--max-new-tokens"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--max-new-tokens", "1000000000"], ["--max-new-tokens", "512"]),
        (["--prompt", "x = 1\n" * 20_000], ["--prompt", "512"]),
        (["--prompt", "caf\udce9"], ["--prompt", "UTF-8"]),
        (["--seed", str(10**23)], ["--seed"]),
        (["--seed", "-1"], ["--seed"]),
        (["--device", "xyz"], ["--device", "xyz"]),
        (["--device", "meta"], ["--device", "meta"]),
        (
            ["--device", "cuda:7"]
            if not torch.cuda.is_available() or torch.cuda.device_count() < 8
            else ["--device", "q"],
            ["--device"],
        ),
        (["--top-k", "2.5"], ["--top-k"]),
        (["--do-sample", "--top-k", "-3"], ["--top-k"]),
        (["--do-sample", "--top-p", "1.5"], ["--top-p"]),
        (["--do-sample", "--top-p", "0"], ["--top-p"]),
        (["--dtype", "int3"], ["--dtype", "int8"]),  # the message lists the dtypes, int8 among them
    ],
    ids=lambda v: (
        " ".join(a[:12] for a in v).replace("\n", " ") if isinstance(v, list) and v[0].startswith("--") else ""
    ),
)
def test_cli_refuses_bad_arguments_up_front(capsys, build_dir, folder, args, words):
    (folder / "model.safetensors").write_bytes(b"corrupt: the arguments are checked before the weights load")
    args = args if "--prompt" in args else ["--prompt", "def f(", *args]
    cli_refused(capsys, build_dir, folder, *args, words=words)


def test_cli_empty_prompt_without_a_bos_token_is_refused(capsys, build_dir, folder):
    (folder / "model.safetensors").write_bytes(b"corrupt: the prompt is checked before the weights load")
    config = json.loads((folder / "config.json").read_text())
    del config["bos_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    cli_refused(capsys, build_dir, folder, "--prompt", "", words=["--prompt", "empty", "bos_token_id"])


def test_cli_empty_prompt_starts_from_the_bos_token(capsys, build_dir):
    """As transformers' generate() without input_ids: the first token is bos_token_id (0 in tiny-qwen2), said so."""
    rc, out, err = cli(capsys, build_dir, TINY, "--prompt", "", "--max-new-tokens", "3")
    assert rc == 0, err
    assert "bos_token_id 0" in err


TOKENIZERS = {
    "not-json": b"{ not json",
    "list": b"[]",
    "empty-object": b"{}",
    "unknown-model": json.dumps({"model": {"type": "Nope"}}).encode(),
    "truncated": None,  # the real file cut in half
    "not-utf8": b'{"model": "\xff\xfe"}',
    "vocab-not-a-map": None,  # a BPE model whose vocab is a list
}


@pytest.mark.parametrize("variant", list(TOKENIZERS) + ["directory", "fifo"])
def test_cli_malformed_tokenizer_is_refused_before_the_model_loads(capsys, build_dir, folder, variant):
    (folder / "model.safetensors").write_bytes(b"corrupt: the tokenizer must be checked before the weights load")
    path = folder / "tokenizer.json"
    data = TOKENIZERS.get(variant)
    if variant == "truncated":
        data = path.read_bytes()[: path.stat().st_size // 2]
    elif variant == "vocab-not-a-map":
        tok = json.loads(path.read_text())
        tok["model"]["vocab"] = list(tok["model"]["vocab"])
        data = json.dumps(tok).encode()
    if variant == "directory":
        path.unlink()
        path.mkdir()
    elif variant == "fifo":
        fifo_at(path)
    else:
        path.write_bytes(data)
    with Watchdog(path) if variant == "fifo" else _null():
        cli_refused(capsys, build_dir, folder, "--prompt", "def f(", words=["tokenizer.json"])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cli_prompt_token_outside_the_model_vocabulary(capsys, build_dir, folder):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens(["zzqqxx"])
    tok.save(str(folder / "tokenizer.json"))
    cli_refused(capsys, build_dir, folder, "--prompt", "a zzqqxx", words=["2048", "vocab"])


@pytest.mark.parametrize(
    "file,value,words",
    [
        ("config.json", "x", ["eos_token_id", "config.json"]),
        ("config.json", 10**6, ["eos_token_id", "1000000"]),
        ("config.json", -3, ["eos_token_id"]),
        ("config.json", [1, "a"], ["eos_token_id"]),
        ("config.json", 2.5, ["eos_token_id"]),
        ("config.json", True, ["eos_token_id"]),
        ("config.json", [[1]], ["eos_token_id"]),
        ("generation_config.json", 99999, ["eos_token_id", "generation_config.json"]),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_cli_bad_eos_token_id(capsys, build_dir, folder, file, value, words):
    path = folder / file
    data = json.loads(path.read_text()) if path.exists() else {}
    data["eos_token_id"] = value
    path.write_text(json.dumps(data))
    cli_refused(capsys, build_dir, folder, "--prompt", "def f(", words=words)


@pytest.mark.parametrize(
    "text",
    ["{ not json", "[]", "null", "[" * 100_000 + "]" * 100_000, '{"eos_token_id": {}}', '{"top_k": 2.5}'],
    ids=["not-json", "list", "null", "deep", "eos-object", "top-k"],
)
def test_cli_bad_generation_config(capsys, build_dir, folder, text):
    (folder / "generation_config.json").write_text(text)
    cli_refused(capsys, build_dir, folder, "--prompt", "def f(", words=["generation_config.json"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "NaN"])
@pytest.mark.parametrize("command", ["build", "check"])
def test_set_non_finite_is_an_error(capsys, tmp_path, command, value):
    args = [command, str(SPEC), "--set", f"rms_norm_eps={value}"]
    rc = main([*args, "-o", str(tmp_path)] if command == "build" else args)
    err = capsys.readouterr().err
    assert rc == 1, f"SILENT: `dslc {command} --set rms_norm_eps={value}` accepted"
    assert "E021" in err and "rms_norm_eps" in err and "finite" in err
    assert not (tmp_path / "qwen2").exists()


def test_nan_value_in_config_json_loads_as_json(pkg, folder):
    """Python's json reads NaN; the config refuses it, naming the key (not a NaN logit later)."""
    text = (folder / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')
    (folder / "config.json").write_text(text)
    assert math.isnan(json.loads(text)["rms_norm_eps"])
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.ConfigError, "rms_norm_eps", "finite")


def test_size_past_int64_is_a_config_error(pkg, folder):
    edit_config(folder, vocab_size=10**50)
    refused(lambda: pkg.Qwen2ForCausalLM.from_pretrained(folder), pkg.ConfigError, "config.json", "vocab_size")
