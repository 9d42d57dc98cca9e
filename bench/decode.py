#!/usr/bin/env python3
"""Decode speed: the dslc-generated Qwen2 package's `generate` against Hugging Face's, same weights.

    python3 bench/decode.py [--json out.json] [--device cpu|cuda] [--repeats N] [--new N] [--prompt N] [--tiny]

One random Qwen2 checkpoint written by HF `save_pretrained`, loaded by both. On CUDA: the Qwen2-0.5B
shape (24 layers, hidden 896, vocab 151936, tied), bfloat16, prompt 128, 128 new tokens. On the CPU a
reduced config (4 layers, hidden 512, vocab 32000), float32, prompt 32, 24 new tokens, so it runs in
well under two minutes; --tiny: a toy config (2 layers, hidden 64, vocab 256), prompt 8, 4 new tokens, for a
seconds-long check of the script (bench/gpu.sh --dry-run). Greedy decoding at batch 1 and 8 (no EOS, so every call decodes all tokens):

* dslc-eager: `generate(cuda_graph=False)`: static KV cache, one Python decode step per token;
* dslc-graph (CUDA): `generate()`: the decode step (argmax included) replayed from a CUDA graph;
* hf: HF `generate` with its default dynamic cache (sdpa attention);
* hf-static-compile (CUDA): HF `generate(cache_implementation="static")` with its forward compiled
  (torch.compile mode="reduce-overhead", fullgraph).

Decode time = time(generate n new tokens) - time(generate 1 new token) (both include the same
prefill), i.e. n - 1 decode steps; decode tokens/s = batch * (n - 1) / decode time. Warm-up calls
(captures, compiles) are not timed; repeats are interleaved across implementations; the table leads
with the best repeat (interference on a shared machine only slows runs down) and shows the median.

Roofline: a decode step must read every weight once (the tied LM head / embedding matrix included)
and each row's KV cache up to its length (mean over the steps), so its floor is bytes / bandwidth, with
the bandwidth measured here as a large device-to-device copy (read + write). `roofline` is
floor / measured step time: 100% would be a step at copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SPEC = common.ROOT / "models" / "qwen2.model"
NAME = "bench_decode_qwen2"
CONFIGS = {
    "cuda": common.QWEN2_0_5B,
    "tiny": common.QWEN2_TINY,
    "cpu": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
}
COMMON = dict(
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
)
DEFAULTS = {
    "cuda": dict(dtype="bfloat16", prompt=128, new=128, repeats=5),
    "cpu": dict(dtype="float32", prompt=32, new=24, repeats=3),
    "tiny": dict(prompt=8, new=4, repeats=1),
}
ROPE_THETA = 1_000_000.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hf_config(config: str):
    import transformers as tf

    rope = (
        {"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}}
        if int(tf.__version__.split(".")[0]) >= 5
        else {"rope_theta": ROPE_THETA}
    )
    return tf.Qwen2Config(**CONFIGS[config], **COMMON, **rope)


def make_checkpoint(folder: Path, config: str, seed: int) -> None:
    import torch
    import transformers as tf

    with common.hf_no_init():
        model = tf.Qwen2ForCausalLM(hf_config(config))
    model.tie_weights()
    model = model.to(torch.float32).eval()
    common.randomize_(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large copy (read + write counted), best of several."""
    import torch

    n = (256 if device == "cuda" else 64) * 2**20  # float32 elements: 1 GiB on CUDA, 256 MiB on the CPU
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(8):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / best


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def step_bytes(ours, batch: int, context: float) -> int:
    """What a decode step must read: every weight once, the embedding rows aside, plus the KV cache."""
    c = ours.config
    weights = common.unique_parameter_bytes(ours)
    emb = ours.model.embed_tokens.weight
    if ours.lm_head.weight is not emb:  # untied: the embedding table itself is only gathered (B rows)
        weights -= emb.numel() * emb.element_size()
    kv = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * c.head_dim * context * emb.element_size()
    return int(weights + kv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write every number (raw times included) to this JSON file")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation (after 1 warm-up)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length")
    p.add_argument("--new", type=int, default=None, help="new tokens per call")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a toy config, prompt 8, 4 new tokens: a quick check")
    p.add_argument("--no-compile", action="store_true", help="leave out hf-static-compile (CUDA)")
    args = p.parse_args(argv)

    started = time.perf_counter()
    import torch
    import transformers as tf

    from dslc.build import build

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = "tiny" if args.tiny else device
    d = {**DEFAULTS[device], **(DEFAULTS["tiny"] if args.tiny else {})}
    dtype_name = args.dtype or d["dtype"]
    dtype = getattr(torch, dtype_name)
    prompt, new, repeats = args.prompt or d["prompt"], args.new or d["new"], args.repeats or d["repeats"]
    if device == "cpu":
        torch.set_num_threads(args.threads or common.usable_cores())
    tf.utils.logging.disable_progress_bar()
    tf.utils.logging.set_verbosity_error()

    results: dict = {
        "benchmark": "decode",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": common.machine_info(),
        "device": device,
        "model": {**CONFIGS[config], **COMMON, "rope_theta": ROPE_THETA, "dtype": dtype_name},
        "prompt": prompt,
        "new_tokens": new,
        "repeats": repeats,
        "runs": {},
    }
    if device == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_bytes_per_s"] = bandwidth
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    with tempfile.TemporaryDirectory(prefix="dslc-decode-") as tmp:
        tmp = Path(tmp)
        pkg_dir, folder = tmp / "pkg", tmp / "checkpoint"
        build(SPEC, pkg_dir, name=NAME)
        if not (pkg_dir / NAME / "cuda_graphs.py").exists():  # until STATIC_FILES ships it
            shutil.copy(common.ROOT / "templates" / "package" / "cuda_graphs.py", pkg_dir / NAME)
        sys.path.insert(0, str(pkg_dir))
        generated = __import__(NAME)
        t0 = time.perf_counter()
        make_checkpoint(folder, config, args.seed)
        log(f"random checkpoint written ({time.perf_counter() - t0:.1f} s)")
        ours = generated.Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
        hf = tf.Qwen2ForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa").to(device).eval()
        hf.generation_config.eos_token_id = None  # decode every token, as dslc does without eos_token_id
        hf.generation_config.pad_token_id = 0
        results["weight_bytes"] = common.unique_parameter_bytes(ours)

        impls = {
            "dslc-eager": lambda ids, n: ours.generate(ids, max_new_tokens=n, cuda_graph=False),
            "hf": lambda ids, n: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
            ),
        }
        if device == "cuda":
            impls["dslc-graph"] = lambda ids, n: ours.generate(ids, max_new_tokens=n, cuda_graph=True)
        else:
            results["skipped"] = {"dslc-graph": "CUDA only", "hf-static-compile": "CUDA only"}
        if device == "cuda" and args.no_compile:
            results["skipped"] = {"hf-static-compile": "--no-compile"}
        elif device == "cuda":
            compile_config = tf.CompileConfig(fullgraph=True, mode="reduce-overhead")
            impls["hf-static-compile"] = lambda ids, n: hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                cache_implementation="static",
                compile_config=compile_config,
            )

        for batch in args.batches:
            ids = torch.randint(
                3,
                CONFIGS[config]["vocab_size"],
                (batch, prompt),
                generator=torch.Generator().manual_seed(args.seed + batch),
            ).to(device)
            outputs = {}

            def run(name, ids=ids, outputs=outputs):
                def fn(r):
                    with torch.no_grad():
                        times = {}
                        for phase, n in (("prefill", 1), ("total", new)):
                            sync(device)
                            t0 = time.perf_counter()
                            out = impls[name](ids, n)
                            sync(device)
                            times[phase] = time.perf_counter() - t0
                    if r == 0:
                        outputs[name] = out.cpu()
                    times["decode"] = times["total"] - times["prefill"]
                    return times

                return fn

            log(f"batch {batch}: {', '.join(impls)}")
            times = common.interleaved({n: run(n) for n in impls}, repeats, warmup=1, log=log)
            ref = outputs["dslc-eager"]
            match = {n: bool(torch.equal(o, ref)) for n, o in outputs.items()}
            agree = {n: float((o[:, prompt:] == ref[:, prompt:]).float().mean()) for n, o in outputs.items()}
            context = prompt + new / 2  # mean cache length over the decode steps
            floor = step_bytes(ours, batch, context) / bandwidth
            for name in impls:
                # the best repeat leads: on a shared machine, interference only ever slows a run down
                dec, dec_median = min(times[name]["decode"]), common.median(times[name]["decode"])
                step = dec / (new - 1)
                results["runs"][f"{name} b{batch}"] = {
                    "impl": name,
                    "batch": batch,
                    "times": times[name],
                    "prefill_s": min(times[name]["prefill"]),
                    "decode_s": dec,
                    "decode_median_s": dec_median,
                    "step_s": step,
                    "step_median_s": dec_median / (new - 1),
                    "decode_tokens_per_s": batch * (new - 1) / dec,
                    "decode_tokens_per_s_median": batch * (new - 1) / dec_median,
                    "roofline_step_s": floor,
                    "roofline_fraction": floor / step,
                    "tokens_equal_dslc_eager": match[name],
                    "token_agreement_with_dslc_eager": agree[name],
                }
        impls.clear()

    results["wall_s"] = time.perf_counter() - started
    runs = results["runs"]
    rows = []
    for key, r in runs.items():
        base = runs.get(f"hf b{r['batch']}")
        rows.append(
            [
                key,
                common.fmt_s(r["prefill_s"]),
                f"{r['step_s'] * 1000:.2f} ms",
                f"{r['step_median_s'] * 1000:.2f} ms",
                f"{r['decode_tokens_per_s']:,.0f}",
                f"{100 * r['roofline_fraction']:.0f}%",
                common.fmt_ratio(common.ratio(r["decode_tokens_per_s"], base and base["decode_tokens_per_s"])),
                "yes" if r["tokens_equal_dslc_eager"] else f"{100 * r['token_agreement_with_dslc_eager']:.0f}%",
            ]
        )
    m = results["machine"]
    where = m.get("gpu") or f"{m['cpu_model']}, {m['usable_cores']} cores, {m['torch_threads']} threads"
    common.print_table(
        f"Decode, {device} ({where}), {dtype_name}, prompt {prompt}, {new} new tokens, best of {repeats} "
        f"interleaved repeats (median too); weights {results['weight_bytes'] / 2**20:,.0f} MiB, copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s",
        [
            "impl / batch",
            "prefill+1",
            "decode step",
            "step (median)",
            "decode tok/s",
            "roofline",
            "vs hf",
            "= dslc-eager",
        ],
        rows,
    )
    print(f"torch {m['torch']}, transformers {m['transformers']}, dslc {m['dslc']}; total {results['wall_s']:.0f} s")
    if args.json:
        common.write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
