"""`dslc train` on the bundled default (models/tiny-qwen2) with a small text file written here: the loss goes
down, resume is exact, the exported folder loads in transformers with equal logits, a classifier fine-tuned from
the causal LM names its new head, LoRA trains only LoRA, and bad inputs are one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dslc.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "models" / "qwen2.model")
CLASSIFIER = str(ROOT / "tests" / "specs" / "qwen2_classifier.model")
MASKED = str(ROOT / "tests" / "specs" / "qwen2_mlm.model")
WEIGHTS = ROOT / "models" / "tiny-qwen2"
FAST = ["--set", "data.seq_len=32", "--set", "train.batch_size=4", "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text("".join(f"def add_{i}(a, b):\n    return a + b + {i}\n\n" for i in range(120)))
    return path


def train(capsys, build_dir, *args, spec=SPEC, data=None) -> tuple[int, str]:
    rc = main(["train", spec, "--weights", str(WEIGHTS), "--data", str(data), "--build-dir", str(build_dir), *args])
    out, err = capsys.readouterr()
    return rc, out + err


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(folder) if "loss" in r]


@pytest.fixture(scope="module")
def trained(build_dir, text_file, tmp_path_factory):
    """One 20-step run (progress bar on), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    import contextlib
    import io

    err = io.StringIO()  # a module fixture cannot take capsys
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        rc = main(
            ["train", SPEC, "--weights", str(WEIGHTS), "--data", str(text_file), "--build-dir", str(build_dir)]
            + ["--out", str(out), "--set", "data.seq_len=32", "--set", "train.batch_size=4"]
            + ["--set", "train.steps=20", "--set", "train.eval_every=10", "--set", "optim.lr=2e-3"]
            + ["--set", "optim.warmup_steps=2"]
        )
    return rc, err.getvalue(), out


def test_loss_decreases(trained):
    rc, log, out = trained
    assert rc == 0, log
    curve = [loss for _, loss in losses(out)]
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3, curve
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(2.718281828 ** evals[1]["eval_loss"], rel=1e-3)
    assert "tok/s" in log and "eval loss" in log
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20"]


def test_export_loads_in_transformers_with_equal_logits(trained, build_dir):
    from transformers import AutoModelForCausalLM

    from dslc.generate import cached_build

    rc, log, out = trained
    assert rc == 0, log
    folder = out / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    pkg, reused = cached_build(Path(SPEC), str(build_dir))
    assert reused
    model = pkg.Qwen2ForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32)  # then the trained weights
    state = torch.load(out / "checkpoints" / "step-20" / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(input_ids=ids).logits, hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    original = load_file(WEIGHTS / "model.safetensors")
    assert not torch.equal(
        hf.model.layers[0].self_attn.q_proj.weight, original["model.layers.0.self_attn.q_proj.weight"].float()
    )


def test_resume_is_exact(capsys, build_dir, text_file, tmp_path):
    common = [*FAST, "--set", "train.steps=6", "--set", "train.grad_accum=2", "--set", "train.eval_every=2"]
    rc, log = train(capsys, build_dir, *common, "--out", str(tmp_path / "a"), data=text_file)
    assert rc == 0, log
    rc, log = train(
        capsys, build_dir, *common, "--out", str(tmp_path / "b"), "--set", "train.stop_at=3", data=text_file
    )
    assert rc == 0 and "stopped at step 3" in log, log
    assert not (tmp_path / "b" / "model").exists()
    rc, log = train(capsys, build_dir, *common, "--out", str(tmp_path / "b"), "--resume", data=text_file)
    assert rc == 0 and "resumed from" in log and "at step 3" in log, log
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    evals = [[r["eval_loss"] for r in metrics(tmp_path / run) if "eval_loss" in r] for run in "ab"]
    assert evals[0] == evals[1] and len(evals[0]) == 3
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a resume with other training settings is refused
    rc, log = train(
        capsys, build_dir, *common, "--set", "optim.lr=1e-2", "--out", str(tmp_path / "b"), "--resume", data=text_file
    )
    assert rc == 2 and "optim.lr" in log and "Traceback" not in log


def test_classifier_from_causal_lm_reports_new_head(capsys, build_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "labels.jsonl"
    prose, code = "the cat sat on a mat".split(), "def return import class lambda".split()
    with data.open("w") as f:
        for i in range(48):
            words = code if i % 2 else prose
            text = " ".join(words[(i + j) % len(words)] for j in range(6))
            f.write(json.dumps({"text": text, "label": "code" if i % 2 else "prose"}) + "\n")
    out = tmp_path / "run"
    rc, log = train(
        capsys,
        build_dir,
        *FAST,
        "--set",
        "data.seq_len=12",
        "--set",
        "train.steps=8",
        "--set",
        "optim.lr=2e-3",
        "--out",
        str(out),
        spec=CLASSIFIER,
        data=data,
    )
    assert rc == 0, log
    assert "newly initialized" in log and "score.weight [2, 128]" in log
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert evals[-1]["eval_accuracy"] == 1.0, evals
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["num_labels"] == 2
    assert config["id2label"] == {"0": "code", "1": "prose"}
    # transformers loads the exported classifier; on an unpadded row it pools the same last token
    from dslc.generate import cached_build

    pkg, _ = cached_build(Path(CLASSIFIER), str(build_dir))
    ours = pkg.Qwen2ForSequenceClassification.from_pretrained(out / "model", dtype=torch.float32)
    hf = AutoModelForSequenceClassification.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.randint(1, 2048, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_masked_lm(capsys, build_dir, tmp_path):
    data = tmp_path / "code.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"def add_{i}(a, b):\n    return a + b + {i}\n"}) + "\n" for i in range(40))
    )
    out = tmp_path / "run"
    args = [*FAST, "--set", "data.seq_len=24", "--set", "train.steps=8", "--set", "train.eval_every=4"]
    args += ["--set", "optim.lr=2e-3", "--out", str(out)]
    rc, log = train(capsys, build_dir, *args, spec=MASKED, data=data)
    assert rc == 2 and "no [MASK] or <mask> token: set data.mask_token" in log, log
    rc, log = train(capsys, build_dir, *args, "--set", "data.mask_token=<|endoftext|>", spec=MASKED, data=data)
    assert rc == 0, log
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1]["eval_loss"] < evals[0]["eval_loss"] and "eval_ppl" in evals[1]


def test_lora_trains_only_lora_and_exports_merged_and_adapter(capsys, build_dir, text_file, tmp_path):
    out = tmp_path / "run"
    rc, log = train(
        capsys,
        build_dir,
        *FAST,
        "--set",
        "train.steps=4",
        "--set",
        "optim.lr=1e-2",
        "--lora",
        "r=4,alpha=8,targets=q_proj,v_proj,export=adapter",
        "--out",
        str(out),
        data=text_file,
    )
    assert rc == 0, log
    assert "LoRA r=4 on q_proj, v_proj" in log
    state = torch.load(out / "checkpoints" / "step-4" / "state.pt", weights_only=True)["model"]
    original = {k: v.float() for k, v in load_file(WEIGHTS / "model.safetensors").items()}
    lora = [k for k in state if "lora_" in k]
    assert lora and all("q_proj" in k or "v_proj" in k for k in lora)
    assert any(k.endswith("lora_B.default.weight") and state[k].abs().sum() > 0 for k in lora)
    base = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k
    }
    assert all(torch.equal(base[k], v) for k, v in original.items()), "a frozen weight changed"
    merged = load_file(out / "model" / "model.safetensors")
    changed = sorted(k for k, v in original.items() if not torch.equal(merged[k], v))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "optim.lrr=1e-3"], "unknown key optim.lrr (did you mean `lr`?)"),
        (["--set", "trian.steps=3"], "unknown section [trian]"),
        (["--set", "train.steps=0"], "train.steps = 0: must be at least 1"),
        (["--set", "optim.lr=fast"], "optim.lr = 'fast': must be a number"),
        (["--set", "train.bf16=yes"], "must be true or false"),
        (["--set", "steps=3"], "is not section.key=value"),
        (["--lora", "r=4,rank=3"], "unknown key 'rank'"),
        (["--set", "lora.export=both"], "must be one of merged, adapter"),
        (["--data", "nope.txt"], "--data nope.txt: file not found"),
        (["--weights", "no-such-folder"], "folder not found"),
        (["--config", "missing.toml"], "--config missing.toml: file not found"),
        (["--config", "BAD_TOML"], "not valid TOML"),
        (["--config", "BAD_KEY_TOML"], "unknown key data.seq_length (did you mean `seq_len`?)"),
        (["--tp", "2"], "--tp 2 needs 2 processes"),
        (["--fsdp"], "--fsdp needs several processes"),
        (["--set", "data.seq_len=4096"], "past the model's context"),
        (["--set", "train.stop_at=9", "--set", "train.steps=3"], "train.stop_at = 9 is past train.steps = 3"),
        (["--resume"], "--resume: no checkpoint in"),
        (["--set", "lora.targets=qkv", "--set", "lora.r=2"], "no module named 'qkv'"),
        (["--set", "model.no_such_field=1"], "has no field 'no_such_field'"),
    ],
)
def test_bad_inputs_are_one_line_errors(capsys, build_dir, text_file, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD_TOML").write_text("[train\nsteps = 3\n")
    (tmp_path / "BAD_KEY_TOML").write_text("[data]\nseq_length = 3\n")
    base = ["train", SPEC, "--weights", str(WEIGHTS), "--data", str(text_file), "--build-dir", str(build_dir)]
    base += ["--out", str(tmp_path / "run"), "--set", "train.steps=1"]
    rc = main(base + args)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert message in err, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().endswith(errors[0]), err


def test_torchrun_data_parallel(build_dir, text_file, tmp_path):
    """Two processes under torchrun (gloo on CPU, DistributedDataParallel): each takes half of every global batch."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dslc"]
    cmd += ["train", SPEC, "--weights", str(WEIGHTS), "--data", str(text_file), "--build-dir", str(build_dir)]
    cmd += [*FAST, "--set", "train.batch_size=2", "--set", "train.steps=3", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["tokens"] == 2 * 2 * 32 for r in records)  # world 2 x batch 2 x seq_len 32
    assert (out / "model" / "model.safetensors").is_file()
    assert done.stderr.count("eval loss") == 1  # rank 0 alone reports


def test_train_does_not_load_torch_for_check():
    import subprocess
    import sys

    code = "import sys, dslc.cli, dslc.train, dslc.train_config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})


@pytest.mark.parametrize(
    "flags,per_rank,single",
    [(["--fsdp"], 2, 4), (["--tp", "2"], 2, 2)],
    ids=["fsdp2 over 2 processes", "tensor parallel over 2 processes"],
)
def test_torchrun_sharded_training_equals_one_process(build_dir, text_file, tmp_path, flags, per_rank, single):
    """`--fsdp` (FSDP2: each process half of a global batch of 4) and `--tp 2` (both processes the same batch
    of 2, the weights split): every step's loss equals one process on the same global batch."""
    import os
    import subprocess
    import sys

    base = ["train", SPEC, "--weights", str(WEIGHTS), "--data", str(text_file), "--build-dir", str(build_dir)]
    base += [*FAST, "--set", "train.steps=3", "--set", "train.eval_every=0", "--set", "optim.grad_clip=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dslc"]
    sharded = subprocess.run(
        [*run, *base, *flags, "--set", f"train.batch_size={per_rank}", "--out", str(tmp_path / "sharded")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    one = subprocess.run(
        [sys.executable, "-m", "dslc", *base, "--set", f"train.batch_size={single}", "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    got = [r["loss"] for r in metrics(tmp_path / "sharded") if "loss" in r]
    want = [r["loss"] for r in metrics(tmp_path / "one") if "loss" in r]
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-4, abs=1e-5), (got, want)
    assert (tmp_path / "sharded" / "model" / "model.safetensors").is_file()
