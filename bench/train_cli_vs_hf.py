"""Tokens/s of `dslc train` against Hugging Face `Trainer` on the same tiny run.

Same checkpoint (models/tiny-qwen2, float32 weights), same packed text blocks, steps, batch, AdamW settings,
warmup + cosine schedule and grad clipping; `dslc train` trains the package built from models/qwen2.model,
Trainer trains transformers' own Qwen2ForCausalLM. Each side's rate is tokens over its training-loop wall time
(dslc: metrics.jsonl's last elapsed_s; Trainer: train_runtime), with no eval and no checkpoint inside the loop.

    python3 bench/train_cli_vs_hf.py [--steps 30 --batch 8 --seq 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "tiny-qwen2"


def corpus(path: Path) -> None:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path.write_text("".join((stdlib / n).read_text() for n in ("textwrap.py", "shlex.py", "glob.py")))


def run_dslc(data: Path, out: Path, args) -> dict:
    from dslc.cli import main

    sets = {
        "data.seq_len": args.seq,
        "data.eval_fraction": 0.0,
        "train.steps": args.steps,
        "train.batch_size": args.batch,
        "train.eval_every": 0,
        "train.progress": "false",
        "optim.lr": 1e-3,
        "optim.warmup_steps": 2,
        "optim.weight_decay": 0.0,
    }
    argv = ["train", str(ROOT / "models" / "qwen2.model"), "--weights", str(WEIGHTS), "--data", str(data)]
    argv += ["--out", str(out), "--build-dir", str(out.parent / "build")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        rc = main(argv)
    if rc:
        raise SystemExit(log.getvalue())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    tokens = sum(r["tokens"] for r in records)
    seconds = records[-1]["elapsed_s"]
    later = records[-1]["elapsed_s"] - records[1]["elapsed_s"]  # steps 3.. (past the first steps' warm-up)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_after_warmup": sum(r["tokens"] for r in records[2:]) / later,
        "final_loss": records[-1]["loss"],
    }


def run_hf(data: Path, out: Path, args) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    tok = Tokenizer.from_file(str(WEIGHTS / "tokenizer.json"))
    ids = tok.encode(data.read_text()).ids
    blocks = torch.tensor(ids[: len(ids) // args.seq * args.seq]).view(-1, args.seq)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return blocks.shape[0]

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            import time

            times.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=args.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[Clock()])
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        result = trainer.train()
    tokens = args.steps * args.batch * args.seq
    seconds = result.metrics["train_runtime"]
    later = times[-1] - times[1]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_after_warmup": (args.steps - 2) * args.batch * args.seq / later,
        "final_loss": result.training_loss,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the fastest is reported")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "corpus.txt"
        corpus(data)
        runs: dict[str, list[dict]] = {"dslc train": [], "HF Trainer": []}
        for i in range(args.repeats):  # alternating, so neither side alone gets the warm caches or a quiet machine
            runs["dslc train"].append(run_dslc(data, tmp / f"dslc{i}", args))
            runs["HF Trainer"].append(run_hf(data, tmp / f"hf{i}", args))
        results = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}
    print("(loss: dslc's is the last step's, Trainer's the mean over the run)")
    print(f"{args.steps} steps x batch {args.batch} x seq {args.seq} on models/tiny-qwen2 (best of {args.repeats}):")
    for name, r in results.items():
        print(
            f"  {name:11s} {r['tokens_per_s']:9,.0f} tokens/s overall, {r['tokens_per_s_after_warmup']:9,.0f} after "
            f"2 warm-up steps ({r['seconds']:.2f} s), loss {r['final_loss']:.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
