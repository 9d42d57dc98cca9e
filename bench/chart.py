"""Draw the speed ratios of a benchmark run (the JSON files of cpu_qwen2.py, train.py, decode.py) as one PNG.

    python3 bench/chart.py --cpu-qwen2 a.json --train b.json --decode c.json -o docs/benchmarks.png

Each bar is (the other tool's time) / (dslc's time) for one scenario: above 1, dslc is faster.
"""

from __future__ import annotations

import argparse
import json
import sys


def bars(cpu_qwen2: dict | None, train: dict | None, decode: dict | None) -> list[tuple[str, str, float]]:
    """(scenario, compared with, ratio) rows from whichever results are given."""
    out = []
    if cpu_qwen2:
        speed = cpu_qwen2["summary"]["speed"]
        for scenario, label in (
            ("forward 1x256 (no grad)", "forward 1x256"),
            ("train 2x128: forward+backward", "fwd+bwd 2x128"),
        ):
            out.append((f"{label}\n(0.5B shape, 4 layers)", "HF eager (sdpa)", speed[scenario]["hf_sdpa_over_dslc"]))
            out.append(
                (f"{label}\n(0.5B shape, 4 layers)", "HF eager attention", speed[scenario]["hf_eager_over_dslc"])
            )
    if train:
        med = train["median_step_seconds"]
        label = f"train step {train['batch']}x{train['seq']}\n(fwd+bwd+AdamW)"
        for impl, name in (("hf", "HF eager (sdpa)"), ("hf+compile", "HF + torch.compile"), ("hf+liger", "HF + Liger")):
            if impl in med:
                out.append((label, name, med[impl] / med["dslc"]))
    if decode:
        runs = decode["runs"]
        for key, run in runs.items():
            if not key.startswith("dslc"):
                continue
            batch = run["batch"]
            for other, name in (("hf", "HF generate"), ("hf-static-compile", "HF static cache + compile")):
                ref = runs.get(f"{other} b{batch}")
                if ref:
                    out.append((f"decode b{batch}\n({run['impl']})", name, ref["step_s"] / run["step_s"]))
    return out


def draw(rows: list[tuple[str, str, float]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r[0] for r in rows))
    others = list(dict.fromkeys(r[1] for r in rows))
    width = 0.8 / len(others)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(scenarios)), 4.2), dpi=120)
    for i, other in enumerate(others):
        xs, ys = [], []
        for j, s in enumerate(scenarios):
            for r in rows:
                if r[0] == s and r[1] == other:
                    xs.append(j + (i - (len(others) - 1) / 2) * width)
                    ys.append(r[2])
        container = ax.bar(xs, ys, width, label=f"vs {other}")
        ax.bar_label(container, labels=[f"{y:.2f}x" for y in ys], fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(scenarios)), scenarios, fontsize=8)
    ax.set_ylabel("other time / dslc time  (> 1: dslc faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylim(0, max(r[2] for r in rows) * 1.25)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-qwen2")
    p.add_argument("--train")
    p.add_argument("--decode")
    p.add_argument("--title", default="dslc vs Hugging Face, same weights, one process per scenario")
    p.add_argument("-o", "--out", default="docs/benchmarks.png")
    args = p.parse_args(argv)

    def load(path):
        return json.load(open(path)) if path else None

    rows = bars(load(args.cpu_qwen2), load(args.train), load(args.decode))
    if not rows:
        print("no results given", file=sys.stderr)
        return 2
    draw(rows, args.title, args.out)
    print(f"wrote {args.out} ({len(rows)} bars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
