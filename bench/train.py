"""Training step (forward + backward + AdamW) tokens/s and peak memory, side by side on the same weights:
dslc's generated Qwen2 vs HF eager (sdpa attention) vs HF + torch.compile, and HF + Liger-Kernel when CUDA
and liger-kernel are present. Also `dslc build` wall time against torch.compile's warm-up for the model.

    python3 bench/train.py [--json out.json] [--device cpu|cuda] [--repeats N] [--tiny] [--no-compile]

CPU: a reduced Qwen2 (hidden 256, 4 layers, vocab 32000, float32), batch 2 x 128.
CUDA: the real Qwen2-0.5B config (random weights), bf16, batch 8 x 2048 (--batch/--seq to change).
--tiny: a toy config (hidden 64, 2 layers, vocab 256), batch 2 x 32, for a seconds-long check of the script
(bench/gpu.sh --dry-run); --no-compile leaves out HF + torch.compile (its warm-up is ~30 s on a CPU).
Speed runs interleave the implementations in one process (A B C A B C ...); each peak-memory figure comes
from a child process that builds one implementation and runs two steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CPU_CONFIG = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=32000,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
TINY_CONFIG = dict(**common.QWEN2_TINY, max_position_embeddings=128, tie_word_embeddings=True)
GPU_CONFIG = dict(**common.QWEN2_0_5B, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_config(args) -> dict:
    return TINY_CONFIG if args.tiny else GPU_CONFIG if args.device == "cuda" else CPU_CONFIG


def make_checkpoint(folder: Path, config: dict, dtype_name: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**config)
    with common.hf_no_init():
        model = Qwen2ForCausalLM(cfg)
    model.tie_weights()  # no_init_weights skips it: without it the "tied" checkpoint holds two tables
    common.randomize_(model, seed=0)
    model.to(getattr(torch, dtype_name)).save_pretrained(folder)


def build_impl(name: str, folder: Path, device: str, dtype_name: str):
    """One model, ready to train: 'dslc', 'hf', 'hf+compile' or 'hf+liger'."""
    import torch

    dtype = getattr(torch, dtype_name)
    if name == "dslc":
        from dslc.build import build

        out = Path(tempfile.mkdtemp())
        build(common.ROOT / "models" / "qwen2.model", out, name="qwen2_bench_train")
        sys.path.insert(0, str(out))
        import qwen2_bench_train

        return qwen2_bench_train.Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype, device=device).train()
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).train()
    if name == "hf+liger":
        patch_liger(model)
    if name == "hf+compile":
        model = torch.compile(model)
    return model


def patch_liger(model) -> None:
    """Liger's kernels on this model alone, not on the other HF models of the process.

    apply_liger_kernel_to_qwen2(model=...) swaps this instance's forward (fused linear cross-entropy), norms
    and MLPs, but it also rebinds module globals of transformers' qwen2 (the classes, which later models would
    be built from, and apply_rotary_pos_emb, which every Qwen2 attention looks up when it runs). Those are put
    back at once; the rope function is swapped in only around this model's own steps (step_fn).
    """
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    from transformers.models.qwen2 import modeling_qwen2 as m

    names = ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP")
    saved = {n: getattr(m, n) for n in names}
    forward = m.Qwen2ForCausalLM.forward
    apply_liger_kernel_to_qwen2(model=model)
    model._liger_rope = (m.apply_rotary_pos_emb, saved["apply_rotary_pos_emb"])
    for n, v in saved.items():
        setattr(m, n, v)
    m.Qwen2ForCausalLM.forward = forward


@contextlib.contextmanager
def liger_rope(model):
    if not hasattr(model, "_liger_rope"):
        yield
        return
    from transformers.models.qwen2 import modeling_qwen2 as m

    m.apply_rotary_pos_emb = model._liger_rope[0]
    try:
        yield
    finally:
        m.apply_rotary_pos_emb = model._liger_rope[1]


def step_fn(model, ids, device):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def step() -> float:
        t0 = time.perf_counter()
        with liger_rope(model):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def child_peak(args) -> int:
    """--child: build one implementation, run 2 steps, print its peak memory (bytes) as JSON."""
    import torch

    device = args.device
    torch.manual_seed(0)
    model = build_impl(args.child, Path(args.folder), device, args.dtype)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    step = step_fn(model, ids, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = common.vm_hwm_bytes() if device == "cpu" else 0
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else (common.vm_hwm_bytes() or 0) - base
    print(json.dumps({"peak_bytes": peak}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--tiny", action="store_true", help="a toy config and batch 2 x 32: a quick check of the script")
    p.add_argument("--no-compile", action="store_true", help="leave out HF + torch.compile")
    p.add_argument("--build-runs", type=int, default=3, help="whole-process `dslc build` runs timed")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device == "cuda"
    args.batch = args.batch or (2 if args.tiny else 8 if gpu else 2)
    args.seq = args.seq or (32 if args.tiny else 2048 if gpu else 128)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.child:
        return child_peak(args)
    if not gpu:
        torch.set_num_threads(common.usable_cores())

    config = model_config(args)
    impls = ["dslc", "hf"] + ([] if args.no_compile else ["hf+compile"])
    skipped = {"hf+compile": "--no-compile"} if args.no_compile else {}
    try:
        import liger_kernel  # noqa: F401

        if gpu:
            impls.append("hf+liger")
        else:
            skipped["hf+liger"] = "Liger-Kernel runs on CUDA only"
    except ImportError as e:
        skipped["hf+liger"] = f"liger-kernel is not importable ({e})"
    folder = Path(tempfile.mkdtemp())
    make_checkpoint(folder, config, args.dtype)
    log(f"checkpoint in {folder}; implementations: {', '.join(impls)}")

    # compile warm-up vs dslc build, for the same model
    t0 = time.perf_counter()
    models = {}
    torch.manual_seed(0)
    ids = torch.randint(0, min(1000, config["vocab_size"]), (args.batch, args.seq), device=args.device)
    steps = {}
    for name in impls:
        models[name] = build_impl(name, folder, args.device, args.dtype)
        steps[name] = step_fn(models[name], ids, args.device)
    log(f"built in {time.perf_counter() - t0:.1f}s")
    with torch.no_grad():  # never time a wrong model: the losses agree before any step
        losses = {name: models[name](input_ids=ids, labels=ids).loss.float().item() for name in ("dslc", "hf")}
    if abs(losses["dslc"] - losses["hf"]) > (1e-4 if args.dtype == "float32" else 2e-2) * abs(losses["hf"]):
        raise SystemExit(f"dslc and HF losses differ: {losses}")
    first = {name: steps[name]() for name in impls}  # includes torch.compile's warm-up for hf+compile
    times = common.interleaved(
        {name: (lambda r, s=steps[name]: {"step": s()}) for name in impls}, repeats=args.repeats, warmup=1, log=log
    )
    build_times = common.wall_times(
        [sys.executable, "-m", "dslc", "build", str(common.ROOT / "models" / "qwen2.model"), "-o", tempfile.mkdtemp()],
        args.build_runs,
    )
    tokens = args.batch * args.seq
    peaks = {}
    for name in impls:
        peaks[name] = common.child_json(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--folder",
                str(folder),
                "--device",
                args.device,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--dtype",
                args.dtype,
                *(["--tiny"] if args.tiny else []),
            ],
            clean_rss=True,
        ).get("peak_bytes")
    med = {name: common.median(times[name]["step"]) for name in impls}
    rows = []
    for name in impls:
        rows.append(
            [
                name,
                common.fmt_s(med[name]),
                f"{tokens / med[name]:,.0f}",
                common.fmt_ratio(common.ratio(med[name], med["dslc"])),
                common.fmt_mib(peaks[name]),
                common.fmt_ratio(common.ratio(peaks["dslc"], peaks[name])),
                common.fmt_s(first[name]),
            ]
        )
    common.print_table(
        f"Training step {args.batch}x{args.seq} ({args.device}, {args.dtype}): fwd+bwd+AdamW",
        [
            "impl",
            "step (median)",
            "tokens/s",
            "time / dslc's",
            "peak memory",
            "dslc peak / this",
            "first step (incl. warm-up)",
        ],
        rows,
    )
    dslc_build = common.median(build_times)
    warm = first["hf+compile"] - med["hf+compile"] if "hf+compile" in impls else None
    print(
        f"dslc build (whole process, median of {args.build_runs}): {dslc_build:.2f} s;  torch.compile warm-up "
        f"(first step minus a steady step): "
        + ("skipped" if warm is None else f"{warm:.1f} s;  ratio {warm / dslc_build:.0f}x")
    )
    machine = common.machine_info()
    if gpu:
        machine["gpu"] = torch.cuda.get_device_name()
    result = {
        "benchmark": "train",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "skipped": skipped,
        "losses_before_training": losses,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "config": config,
        "step_seconds": times,
        "median_step_seconds": med,
        "tokens_per_second": {n: tokens / med[n] for n in impls},
        "speedup_vs": {n: med[n] / med["dslc"] for n in impls},
        "peak_bytes": peaks,
        "first_step_seconds": first,
        "dslc_build_seconds": build_times,
        "compile_warmup_seconds": warm,
    }
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
