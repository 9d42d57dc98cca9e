"""Train the bundled default checkpoint, `models/tiny-qwen2/`, with dslc's own generated package.

A byte-level BPE tokenizer and a ~1M-parameter Qwen2-shaped model are trained on the Python
standard library's source (PSF-licensed text every Python install carries), so `dslc generate`
shows a new user real Python-looking text. Reproduce with:

    python3 scripts/train_default.py --out models/tiny-qwen2

Deterministic for a given Python version (its stdlib is the corpus) and torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
MODEL = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def corpus_files(limit_bytes: int) -> list[Path]:
    """The stdlib's top-level modules, sorted, up to `limit_bytes` of source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if path.name.startswith(("test", "_")):
            continue
        size = path.stat().st_size
        if total + size > limit_bytes:
            break
        files.append(path)
        total += size
    return files


def train_tokenizer(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in files], trainer)
    return tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "models" / "tiny-qwen2"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--corpus-mb", type=float, default=4.0)
    args = ap.parse_args()

    import torch

    from dslc.build import build

    torch.manual_seed(0)
    files = corpus_files(int(args.corpus_mb * 1e6))
    tokenizer = train_tokenizer(files, MODEL["vocab_size"])
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")).ids + [eos]
    data = torch.tensor(ids, dtype=torch.long)
    split = int(len(data) * 0.98)
    train, val = data[:split], data[split:]
    print(f"corpus: {len(files)} files, {len(data):,} tokens", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        build(ROOT / "models" / "qwen2.model", tmp, name="qwen2_train")
        sys.path.insert(0, tmp)
        import qwen2_train

        config = qwen2_train.Qwen2Config(**MODEL, extra={"bos_token_id": eos, "eos_token_id": eos})
        model = qwen2_train.Qwen2ForCausalLM(config)
        print(f"model: {model.num_parameters():,} parameters", flush=True)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(0)

        def batch(source):
            starts = torch.randint(0, len(source) - args.seq - 1, (args.batch,), generator=gen)
            return torch.stack([source[s : s + args.seq] for s in starts.tolist()])

        warmup = max(1, args.steps // 20)
        model.train()
        start = time.time()
        for step in range(args.steps):
            lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            x = batch(train)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - start:.0f}s", flush=True)
        model.eval()
        with torch.no_grad():
            val_loss = sum(model(input_ids=(b := batch(val)), labels=b).loss.item() for _ in range(8)) / 8
        print(f"validation loss {val_loss:.3f}", flush=True)
        out = Path(args.out)
        model.to(torch.bfloat16).save_pretrained(out)
        tokenizer.save(str(out / "tokenizer.json"))
        (out / "training.json").write_text(
            json.dumps(
                {
                    "script": "scripts/train_default.py",
                    "args": vars(args),
                    "corpus": f"Python {sys.version.split()[0]} stdlib, {len(files)} top-level modules",
                    "tokens": len(data),
                    "parameters": model.num_parameters(),
                    "final_train_loss": round(loss.item(), 4),
                    "validation_loss": round(val_loss, 4),
                    "seconds": round(time.time() - start, 1),
                },
                indent=2,
            )
            + "\n"
        )
        print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
