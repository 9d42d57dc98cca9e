#!/usr/bin/env python3
"""`dslc serve` throughput and time to first token, and the cost of `--dtype int8`.

    python3 bench/serve.py [--spec S --weights DIR] [--requests 32] [--max-tokens 48] [--clients 1,8,32]
                           [--device cpu|cuda] [--dtype float32] [--json out.json] [--skip-quant]

Serving: the server runs in this process (uvicorn on 127.0.0.1, `--slots` = the most clients), the official
`openai` client streams greedy completions of `--requests` distinct prompts, `--max-tokens` each, sent by
1 (one by one), 8 or 32 concurrent clients. tokens/s = completion tokens (from the usage chunk) / wall time
of the whole set; TTFT = request sent -> first text chunk, p50 / p99 over the set. A warm-up request first.

Quantization: the same weights as float32, bfloat16 and int8 (torchao weight-only on every nn.Linear):
parameter memory (the bytes of every tensor, the int8 ones' data and scales), decode tokens/s of
`generate` at batch 1, and against float32 the greedy-token agreement (teacher-forced argmax over a fixed
text, dslc/serve/app.py's source) and the perplexity on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEDS = ["def ", "import ", "class ", "for ", "# ", "if ", "return ", "x = ", "with ", "print(", "try:", "@"]


def prompts(n: int) -> list[str]:
    return [f"{SEEDS[i % len(SEEDS)]}{'item' * (i // len(SEEDS))}_{i}(" for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_set(client, model: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    """Stream every text's completion with `clients` threads taking from one list; wall time, tokens, TTFTs."""
    todo = list(enumerate(texts))
    lock = threading.Lock()
    ttft, tokens, outputs = [], [], {}

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, text = todo.pop(0)
            sent = time.perf_counter()
            first, parts, used = None, [], 0
            stream = client.completions.create(
                model=model,
                prompt=text,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    first = first or time.perf_counter()
                    parts.append(chunk.choices[0].text)
                if chunk.usage:
                    used = chunk.usage.completion_tokens
            with lock:
                ttft.append((first or time.perf_counter()) - sent)
                tokens.append(used)
                outputs[i] = "".join(parts)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(texts),
        "tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "ttft_p50_ms": 1000 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
        "outputs": [outputs[i] for i in range(len(texts))],
    }


def serving(args) -> list[dict]:
    import openai

    from dslc.cli import make_parser
    from dslc.serve.command import build_server
    from tests.serve_helpers import running

    levels = [int(c) for c in args.clients.split(",")]
    extra = ["--slots", str(max(levels)), "--dtype", args.dtype] + (["--device", args.device] if args.device else [])
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["serve", args.spec, "--weights", args.weights, "--build-dir", str(Path(tmp) / "build"), *extra]
        runtime, app = build_server(make_parser().parse_args(argv))
        with running(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            run_set(client, runtime.name, prompts(2), 1, 4)  # warm-up
            texts = prompts(args.requests)
            rows = [run_set(client, runtime.name, texts, c, args.max_tokens) for c in levels]
    base = dict(rows[0])
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["same_text_as_one_by_one"] = row.pop("outputs") == base["outputs"]
    return rows


def _bytes(tensor) -> int:
    """Storage of a tensor, a torchao tensor subclass counted by its inner tensors (data and scales)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def quantization(args) -> list[dict]:
    import torch

    from dslc.runtime import load_runtime

    text = (ROOT / "dslc" / "serve" / "app.py").read_text()[:3000]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16", "int8"):
            rt = load_runtime(Path(args.spec), Path(args.weights), dtype=dtype, device=args.device, build_dir=tmp)
            model = rt.model
            ids = torch.tensor([rt.encode(text)[: rt.max_len]], device=model.device)
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].float()  # [T - 1, V]
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
            picks = logits.argmax(-1)
            reference = picks if reference is None else reference
            prompt = ids[:, :16]
            model.generate(prompt, max_new_tokens=4, eos_token_id=[])  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                model.generate(prompt, max_new_tokens=args.max_tokens, eos_token_id=[])
                times.append(time.perf_counter() - start)
            seen = set()
            memory = 0
            for t in list(model.parameters()) + list(model.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    memory += _bytes(t.data if hasattr(t, "data") else t)
            rows.append(
                {
                    "dtype": dtype,
                    "param_mib": memory / 2**20,
                    "decode_tokens_per_s": args.max_tokens / min(times),
                    "agreement": float((picks == reference).float().mean()),
                    "perplexity": float(nll.exp()),
                }
            )
    return rows


def markdown(serve_rows: list[dict], quant_rows: list[dict]) -> str:
    lines = [
        "| clients | requests | tokens | wall s | tokens/s | vs one by one | TTFT p50 ms | TTFT p99 ms | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in serve_rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{'yes' if r['same_text_as_one_by_one'] else 'NO'} |"
        )
    if quant_rows:
        lines += [
            "",
            "| dtype | parameter MiB | decode tokens/s (batch 1) | greedy agreement vs float32 | perplexity |",
            "|---|---|---|---|---|",
        ]
        for r in quant_rows:
            lines.append(
                f"| {r['dtype']} | {r['param_mib']:.2f} | {r['decode_tokens_per_s']:.0f} | "
                f"{100 * r['agreement']:.1f}% | {r['perplexity']:.2f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "models" / "qwen2.model"))
    parser.add_argument("--weights", default=str(ROOT / "models" / "tiny-qwen2"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-quant", action="store_true")
    args = parser.parse_args()
    serve_rows = serving(args)
    quant_rows = [] if args.skip_quant else quantization(args)
    print(markdown(serve_rows, quant_rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"serve": serve_rows, "quant": quant_rows}, indent=2))
    return 0 if all(r["same_text_as_one_by_one"] for r in serve_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
