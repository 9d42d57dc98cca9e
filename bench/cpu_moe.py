#!/usr/bin/env python3
"""CPU benchmark: the dslc-generated Mixtral package against Hugging Face transformers, same weights.

    python3 bench/cpu_moe.py [--json out.json] [--repeats N] [--threads N]

A 2-layer Mixtral-shaped model (hidden 512, 8 experts of width 1024, top-2, vocab 4096, float32), written by
HF `save_pretrained` (per-expert files) and loaded by both from the same folder. Measures, after one warm-up
that checks logits, loss and every gradient against HF:

* forward 1x512 tokens (eval, no grad) and a train step's forward + backward 2x256 tokens with labels:
  dslc, HF with its default experts kernel (`grouped_mm`) and HF's eager loop over experts;
* the matmul FLOPs of one forward (torch's FlopCounterMode) next to what running every expert on every token
  would cost: each expert sees only its routed tokens.

Repetitions are interleaved (dslc, HF grouped_mm, HF eager, dslc, ...). Ratios are HF time / dslc time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CONFIG = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
)


def main(argv=None) -> int:
    import torch
    import transformers as tf
    from torch.utils.flop_counter import FlopCounterMode

    from dslc.build import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        tf.MixtralForCausalLM(tf.MixtralConfig(**CONFIG)).save_pretrained(tmp / "hf")
        build(common.ROOT / "models" / "mixtral.model", tmp / "pkg")
        sys.path.insert(0, str(tmp / "pkg"))
        import mixtral

        ours = mixtral.MixtralForCausalLM.from_pretrained(tmp / "hf")
        models = {
            "dslc": ours,
            "hf_grouped_mm": tf.MixtralForCausalLM.from_pretrained(tmp / "hf", attn_implementation="sdpa").eval(),
            "hf_eager_experts": tf.MixtralForCausalLM.from_pretrained(
                tmp / "hf", attn_implementation="sdpa", experts_implementation="eager"
            ).eval(),
        }
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, CONFIG["vocab_size"], (1, 512), generator=g)
        train_ids = torch.randint(0, CONFIG["vocab_size"], (2, 256), generator=g)

        # warm-up and check: equal logits, loss and gradients, so a wrong model is never timed
        outs = {}
        for name, m in models.items():
            m.zero_grad()
            out = m(input_ids=train_ids, labels=train_ids)
            out.loss.backward()
            outs[name] = (out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
        for name in ("hf_grouped_mm", "hf_eager_experts"):
            torch.testing.assert_close(outs["dslc"][0], outs[name][0])
            for n, grad in outs["dslc"][1].items():
                torch.testing.assert_close(grad, outs[name][1][n], rtol=1e-4, atol=1e-5)

        def forward(m):
            with torch.no_grad():
                m(input_ids=ids)

        def train_step(m):
            m.zero_grad()
            m(input_ids=train_ids, labels=train_ids).loss.backward()

        times = {kind: {name: [] for name in models} for kind in ("forward", "train_step")}
        for _ in range(args.repeats):
            for kind, fn in (("forward", forward), ("train_step", train_step)):
                for name, m in models.items():
                    start = time.perf_counter()
                    fn(m)
                    times[kind][name].append(time.perf_counter() - start)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ours(input_ids=ids)
        h, inner, e, k = (
            CONFIG[x] for x in ("hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok")
        )
        expert_flops = 2 * ids.numel() * 3 * h * inner * CONFIG["num_hidden_layers"]  # one expert on every token
        total = counter.get_total_flops()
        results = {
            "machine": common.machine_info(),
            "config": CONFIG,
            "median_ms": {
                kind: {name: round(common.median(ts) * 1e3, 2) for name, ts in by.items()} for kind, by in times.items()
            },
            "forward_gflop": round(total / 1e9, 3),
            "forward_gflop_if_every_expert_ran_on_every_token": round((total + (e - k) * expert_flops) / 1e9, 3),
        }
        for kind, by in results["median_ms"].items():
            for name in ("hf_grouped_mm", "hf_eager_experts"):
                results.setdefault("ratio_hf_over_dslc", {})[f"{kind}/{name}"] = round(by[name] / by["dslc"], 2)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
