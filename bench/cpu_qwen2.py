#!/usr/bin/env python3
"""CPU benchmark: the dslc-generated Qwen2 package against Hugging Face transformers, same weights.

    python3 bench/cpu_qwen2.py [--json out.json] [--repeats N]

One process, one set of random weights (a 4-layer Qwen2-0.5B-shaped model: hidden 896, intermediate
4864, 14 heads / 2 kv heads, vocab 151936, tied embeddings, float32), written by HF `save_pretrained`
and loaded by both implementations from the same folder. Measures

* forward 1x256 tokens (eval, no grad): dslc, HF sdpa (HF's default) and HF eager;
* train step 2x128 tokens with labels: forward + backward, and the AdamW step, timed separately;
* load peak memory, each in a fresh child process (peak RSS over an import-only baseline child);
* `dslc build models/qwen2.model` and `dslc check` whole-process wall time.

Timed repetitions are interleaved (dslc, HF sdpa, HF eager, dslc, ...) after one warm-up round; the
warm-up round also checks that dslc matches HF (logits, loss, gradients), so a wrong model is never timed.
Ratios are HF time / dslc time: above 1 means dslc is faster. See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SPEC = common.ROOT / "models" / "qwen2.model"
CONFIG = dict(
    common.QWEN2_0_5B,
    num_hidden_layers=4,  # Qwen2-0.5B's widths, 4 of its 24 layers
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151643,
)
ROPE_THETA = 1_000_000.0
FWD_SHAPE = (1, 256)
TRAIN_SHAPE = (2, 128)
IMPLS = ("dslc", "hf-sdpa", "hf-eager")
# parameters whose gradients are compared (the embedding also carries the tied LM head's gradient)
GRAD_PROBES = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.bias",
    "model.layers.3.mlp.down_proj.weight",
    "model.norm.weight",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def set_threads(n: int | None) -> int:
    import torch

    n = n or common.usable_cores()
    torch.set_num_threads(n)
    return n


def hf_config():
    import transformers as tf

    rope = (
        {"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}}
        if int(tf.__version__.split(".")[0]) >= 5
        else {"rope_theta": ROPE_THETA}
    )
    config = tf.Qwen2Config(**CONFIG, **rope)
    config._attn_implementation = "sdpa"
    return config


def make_checkpoint(folder: Path, seed: int) -> dict:
    """Random HF Qwen2ForCausalLM -> save_pretrained(folder). Returns sizes."""
    import torch
    import transformers as tf

    with common.hf_no_init():
        model = tf.Qwen2ForCausalLM(hf_config())
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head is not tied"
    model = model.to(torch.float32).eval()
    common.randomize_(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    sizes = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": common.unique_parameter_bytes(model),
        "safetensors_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
    }
    del model
    gc.collect()
    return sizes


def load_hf(folder: Path, attn: str = "sdpa"):
    import torch
    import transformers as tf

    return tf.Qwen2ForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn).eval()


def use_attn(hf, attn: str) -> None:
    if hf.config._attn_implementation != attn:
        hf.set_attn_implementation(attn)
    assert hf.config._attn_implementation == attn


# ---- speed ---------------------------------------------------------------------------------------
def bench_forward(ours, hf, repeats: int) -> tuple[dict, dict]:
    import torch

    ids = torch.randint(0, CONFIG["vocab_size"], FWD_SHAPE, generator=torch.Generator().manual_seed(1))
    ours.eval()
    hf.eval()
    reference = {}
    check = {}

    def run(name):
        def fn(r):
            if name != "dslc":
                use_attn(hf, name.removeprefix("hf-"))
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = ours(input_ids=ids).logits if name == "dslc" else hf(input_ids=ids, use_cache=False).logits
                dt = time.perf_counter() - t0
            if r == 0:  # warm-up: check against dslc before anything is timed
                if name == "dslc":
                    reference["logits"] = logits
                else:
                    ref = reference["logits"]
                    check[f"max_abs_logit_diff_vs_{name}"] = (ref - logits).abs().max().item()
                    torch.testing.assert_close(
                        ref, logits, rtol=1e-4, atol=1e-4, msg=lambda m: f"dslc logits differ from {name}: {m}"
                    )
            return {"forward": dt}

        return fn

    times = common.interleaved({n: run(n) for n in IMPLS}, repeats, warmup=1, log=log)
    check["logit_abs_max"] = reference["logits"].abs().max().item()
    return times, check


def bench_train(ours, hf, repeats: int, lr: float) -> tuple[dict, dict]:
    import torch

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, CONFIG["vocab_size"], TRAIN_SHAPE, generator=gen)
    labels = ids.clone()
    ours.train()
    hf.train()
    opts = {"dslc": torch.optim.AdamW(ours.parameters(), lr=lr), "hf": torch.optim.AdamW(hf.parameters(), lr=lr)}
    check = {}

    def run(name):
        model = ours if name == "dslc" else hf
        opt = opts["dslc" if name == "dslc" else "hf"]

        def fn(r):
            if name != "dslc":
                use_attn(hf, name.removeprefix("hf-"))
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if name == "dslc":
                loss = ours(input_ids=ids, labels=labels).loss
            else:
                loss = hf(input_ids=ids, labels=labels, use_cache=False).loss
            loss.backward()
            t1 = time.perf_counter()
            if r == 0 and name == "dslc":
                check["loss_dslc"] = loss.item()
            if r == 0 and name == "hf-sdpa":  # dslc's warm-up grads are still in place: compare before any step
                check["loss_hf"] = loss.item()
                torch.testing.assert_close(
                    torch.tensor(check["loss_dslc"]),
                    loss.detach(),
                    rtol=1e-5,
                    atol=1e-5,
                    msg=lambda m: f"dslc loss differs from HF: {m}",
                )
                ours_p = dict(ours.named_parameters())
                hf_p = dict(hf.named_parameters())
                for pname in GRAD_PROBES:
                    a, b = ours_p[pname].grad, hf_p[pname].grad
                    scale = b.abs().max().item()
                    diff = (a - b).abs().max().item()
                    check[f"grad_rel_diff:{pname}"] = diff / scale
                    assert diff <= 1e-3 * scale + 1e-7, (
                        f"dslc gradient of {pname} differs from HF: {diff} vs |g| {scale}"
                    )
            if name == "hf-eager":  # same model and optimizer as hf-sdpa: its step would time the same thing
                return {"fwd_bwd": t1 - t0}
            opt.step()
            t2 = time.perf_counter()
            return {"fwd_bwd": t1 - t0, "adamw_step": t2 - t1, "total": t2 - t0}

        return fn

    times = common.interleaved({n: run(n) for n in IMPLS}, repeats, warmup=1, log=log)
    for model in (ours, hf):
        model.zero_grad(set_to_none=True)
        model.eval()
    opts.clear()
    gc.collect()
    return times, check


# ---- memory (child processes) --------------------------------------------------------------------
def mem_probe(kind: str, folder: str, pkg_dir: str, threads: int) -> dict:
    """Run inside a child: import, optionally load, touch every weight; report peak RSS at each point."""
    set_threads(threads)
    import torch

    if kind.endswith("dslc"):
        sys.path.insert(0, pkg_dir)
        import qwen2

        cls = qwen2.Qwen2ForCausalLM
        load = lambda: cls.from_pretrained(folder)  # noqa: E731
    else:
        import transformers as tf

        tf.utils.logging.disable_progress_bar()
        cls = tf.Qwen2ForCausalLM
        load = lambda: load_hf(Path(folder))  # noqa: E731
    out = {"kind": kind, "peak_rss_import": common.peak_rss_bytes(), "vm_hwm_import": common.vm_hwm_bytes()}
    if kind.startswith("baseline"):
        return out
    dynamo_before = "torch._dynamo" in sys.modules
    t0 = time.perf_counter()
    model = load()
    out["load_s"] = time.perf_counter() - t0
    # importing torch._dynamo costs ~2 s and ~150 MiB; note when loading (not the import) pulled it in
    out["load_imported_torch_dynamo"] = not dynamo_before and "torch._dynamo" in sys.modules
    out["peak_rss_load"] = common.peak_rss_bytes()
    out["vm_hwm_load"] = common.vm_hwm_bytes()
    with torch.no_grad():  # page in every weight: a lazily mapped checkpoint becomes resident here
        total = sum(float(p.double().sum()) if p.numel() < 2**20 else float(p.sum()) for p in model.parameters())
    out["peak_rss_touched"] = common.peak_rss_bytes()
    out["vm_hwm_touched"] = common.vm_hwm_bytes()
    out["checksum"] = total
    out["unique_parameter_bytes"] = common.unique_parameter_bytes(model)
    return out


def bench_memory(folder: Path, pkg_dir: Path, threads: int) -> dict:
    res = {}
    for kind in ("baseline-dslc", "dslc", "baseline-hf", "hf"):
        cmd = [
            sys.executable,
            __file__,
            "--mem-probe",
            kind,
            "--folder",
            str(folder),
            "--pkg-dir",
            str(pkg_dir),
            "--threads",
            str(threads),
        ]
        res[kind] = common.child_json(cmd, clean_rss=True)
        log(f"  memory {kind}: {json.dumps(res[kind])}")
    return res


# ---- compiler ------------------------------------------------------------------------------------
def dslc_command() -> list[str]:
    exe = Path(sys.executable).with_name("dslc")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dslc"]


def dslc_source() -> dict:
    """Which dslc is being measured: its folder, and the git commit (+ dirty flag) when it is a checkout."""
    import subprocess

    import dslc

    root = Path(dslc.__file__).resolve().parents[1]
    out = {"path": str(root), "version": dslc.__version__}
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "dslc", "templates", "grammar"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = None
    return out


def bench_compiler(spec: Path, n: int, out_dir: Path) -> dict:
    """Wall times of `dslc build` and `dslc check`; a failing command is recorded, not raised."""
    cmd = dslc_command()
    out = {"command": cmd}
    for key, args in (("build_s", ["build", str(spec), "-o", str(out_dir)]), ("check_s", ["check", str(spec)])):
        try:
            out[key] = common.wall_times([*cmd, *args], n, cwd=spec.parent.parent)
        except RuntimeError as e:
            out[key] = []
            out[key.replace("_s", "_error")] = str(e)[-2000:]
            log(f"  dslc {args[0]} FAILED:\n{e}")
    return out


# ---- report --------------------------------------------------------------------------------------
def summarize(results: dict) -> dict:
    """Medians and ratios (HF / dslc) from the raw times."""
    m = common.median
    fwd, train = results["forward"]["times"], results["train"]["times"]
    rows = {}
    for label, times, phase in (
        ("forward 1x256 (no grad)", fwd, "forward"),
        ("train 2x128: forward+backward", train, "fwd_bwd"),
        ("train 2x128: AdamW step", train, "adamw_step"),
        ("train 2x128: fwd+bwd+AdamW", train, "total"),
    ):
        med = {name: m(times[name].get(phase, [])) for name in IMPLS}
        best = {name: min(times[name].get(phase, []), default=None) for name in IMPLS}
        rows[label] = {
            "median_s": med,
            "min_s": best,
            "hf_sdpa_over_dslc": common.ratio(med["hf-sdpa"], med["dslc"]),
            "hf_eager_over_dslc": common.ratio(med["hf-eager"], med["dslc"]),
            "min_hf_sdpa_over_dslc": common.ratio(best["hf-sdpa"], best["dslc"]),
            "min_hf_eager_over_dslc": common.ratio(best["hf-eager"], best["dslc"]),
        }
    mem = results["memory"]
    weights = results["checkpoint"]["weight_bytes"]
    memory = {}
    for impl in ("dslc", "hf"):
        base, run = mem[f"baseline-{impl}"]["peak_rss_import"], mem[impl]
        memory[impl] = {
            "baseline_peak_rss": base,
            "peak_rss_load": run["peak_rss_load"],
            "load_minus_baseline": run["peak_rss_load"] - base,
            "load_over_weights": (run["peak_rss_load"] - base) / weights,
            "peak_rss_touched": run["peak_rss_touched"],
            "touched_minus_baseline": run["peak_rss_touched"] - base,
            "touched_over_weights": (run["peak_rss_touched"] - base) / weights,
            "load_s": run["load_s"],
        }
    comp = results["compiler"]
    compiler = {
        "build_median_s": m(comp["build_s"]),
        "build_min_s": min(comp["build_s"], default=None),
        "check_median_s": m(comp["check_s"]),
        "check_min_s": min(comp["check_s"], default=None),
    }
    return {"speed": rows, "memory": memory, "compiler": compiler}


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    s = results["summary"]
    n = results["repeats"]
    speed = [
        [
            label,
            *(common.fmt_s(r["median_s"][i]) for i in IMPLS),
            common.fmt_ratio(r["hf_sdpa_over_dslc"]),
            common.fmt_ratio(r["hf_eager_over_dslc"]),
            common.fmt_ratio(r["min_hf_sdpa_over_dslc"]),
            common.fmt_ratio(r["min_hf_eager_over_dslc"]),
        ]
        for label, r in s["speed"].items()
    ]
    weights = results["checkpoint"]["weight_bytes"]
    mem = [
        [
            impl,
            common.fmt_mib(r["baseline_peak_rss"]),
            common.fmt_mib(r["peak_rss_load"]),
            common.fmt_mib(r["load_minus_baseline"]),
            common.fmt_ratio(r["load_over_weights"]),
            common.fmt_mib(r["touched_minus_baseline"]),
            common.fmt_ratio(r["touched_over_weights"]),
            common.fmt_s(r["load_s"]),
        ]
        for impl, r in (("dslc", s["memory"]["dslc"]), ("HF", s["memory"]["hf"]))
    ]
    c = s["compiler"]
    nb = results["compiler_runs"]
    comp = [
        [f"dslc {k} models/qwen2.model", common.fmt_s(c[f"{k}_median_s"]), common.fmt_s(c[f"{k}_min_s"])]
        if not results["compiler"].get(f"{k}_error")
        else [f"dslc {k} models/qwen2.model", "FAILED", "-"]
        for k in ("build", "check")
    ]
    return [
        (
            f"Speed: median of {n} interleaved repeats after 1 warm-up (ratio = HF / dslc, >1: dslc faster)",
            ["", "dslc", "HF sdpa", "HF eager", "HF sdpa/dslc", "HF eager/dslc", "sdpa/dslc (min)", "eager/dslc (min)"],
            speed,
        ),
        (
            f"Load memory: peak RSS of a fresh process; weights {common.fmt_mib(weights)}",
            [
                "",
                "baseline",
                "peak after load",
                "load - baseline",
                "/ weights",
                "touched - baseline",
                "/ weights",
                "load time",
            ],
            mem,
        ),
        (f"Compiler: whole-process wall time, {nb} runs", ["command", "median", "min"], comp),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write every number (raw times included) to this JSON file")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation (after 1 warm-up)")
    p.add_argument("--compiler-runs", type=int, default=5, help="runs of `dslc build` / `dslc check`")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", default=str(SPEC), help="the Qwen2 spec to build (default: models/qwen2.model)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    p.add_argument("--mem-probe", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--pkg-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.mem_probe:
        print(json.dumps(mem_probe(args.mem_probe, args.folder, args.pkg_dir, args.threads)))
        return 0

    started = time.perf_counter()
    spec = Path(args.spec).resolve()
    threads = set_threads(args.threads)
    import torch
    import transformers as tf

    from dslc.build import build

    tf.utils.logging.disable_progress_bar()
    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    results: dict = {
        "benchmark": "cpu_qwen2",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": common.machine_info(),
        "dslc_source": dslc_source(),
        "spec": str(spec),
        "repeats": args.repeats,
        "model": {**CONFIG, "rope_theta": ROPE_THETA, "dtype": "float32"},
        "shapes": {"forward": list(FWD_SHAPE), "train": list(TRAIN_SHAPE)},
    }
    with tempfile.TemporaryDirectory(prefix="dslc-bench-") as tmp:
        tmp = Path(tmp)
        pkg_dir, folder = tmp / "pkg", tmp / "checkpoint"
        pkg = build(spec, pkg_dir)
        sys.path.insert(0, str(pkg_dir))
        generated = __import__(pkg.name)
        log(f"built {pkg}; writing random weights to {folder}")
        t0 = time.perf_counter()
        results["checkpoint"] = make_checkpoint(folder, args.seed)
        log(f"checkpoint: {results['checkpoint']} ({time.perf_counter() - t0:.1f} s)")

        log("load memory (child processes)")
        results["memory"] = bench_memory(folder, pkg_dir, threads)
        log("compiler wall time")
        results["compiler_runs"] = args.compiler_runs
        results["compiler"] = bench_compiler(spec, args.compiler_runs, tmp / "build")

        ours = generated.Qwen2ForCausalLM.from_pretrained(folder)
        hf = load_hf(folder, "sdpa")
        assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()), "parameter counts differ"
        assert ours.lm_head.weight is ours.model.embed_tokens.weight, "dslc lm_head is not tied"

        log("forward 1x256 (warm-up round checks logits against HF)")
        fwd_times, fwd_check = bench_forward(ours, hf, args.repeats)
        results["forward"] = {"times": fwd_times, "check": fwd_check}
        log("train step 2x128 (warm-up round checks loss and gradients against HF)")
        train_times, train_check = bench_train(ours, hf, args.repeats, args.lr)
        results["train"] = {"times": train_times, "check": train_check, "optimizer": f"AdamW(lr={args.lr})"}
        del ours, hf
        gc.collect()

    results["machine"]["loadavg_end"] = common.load_average()
    results["wall_s"] = time.perf_counter() - started
    results["summary"] = summarize(results)
    for title, columns, rows in tables(results):
        common.print_table(title, columns, rows)
    m = results["machine"]
    print(
        f"\n{m['date']}  {m['cpu_model']}, {m['usable_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}, dslc {m['dslc']}; load average {m['loadavg_start']} -> {m['loadavg_end']}; "
        f"total {results['wall_s']:.0f} s"
    )
    print(
        "checks: "
        + ", ".join(f"{k} {v:.3g}" for k, v in {**results["forward"]["check"], **results["train"]["check"]}.items())
    )
    if args.json:
        common.write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
