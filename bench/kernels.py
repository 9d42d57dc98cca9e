"""Kernel microbenchmarks of the fused regions dslc generates for Qwen2, against torch eager, torch.compile
and Liger-Kernel, in GB/s of minimum traffic and as a fraction of the device's copy bandwidth.

    python3 bench/kernels.py [--json out.json] [--dry-run]

The package is built with `python3 -m dslc build models/qwen2.model` into a temporary folder (with a fresh
Triton cache, so the first call of each region times the JIT compile), and its modules are imported:
`kernels` (each region's PyTorch rendering, `<name>_torch`) and `kernels_triton` (`<name>_triton`: the
generated Triton forward and derived backward under torch.autograd).

Regions: rms_norm, rms_norm_residual (residual add + norm), attention_apply_rope (q and k, as the model calls
it) and gated_mlp_pointwise (SwiGLU), at rows x hidden = 2048 x 4096 and 8192 x 4096 in bf16 (rope: q and k
of [B, 16, T, 128] each, the same element count), forward and forward+backward. Implementations:

* dslc: the generated Triton kernels (rope: q and k in one grouped launch, `attention_apply_rope_x2`);
* dslc (2 launches): rope only, q and k as two launches, to show what the grouping saves;
* torch: the region's PyTorch rendering, eager (what the package runs off CUDA);
* torch.compile: the same function under torch.compile (inductor);
* liger: LigerRMSNorm, LigerFusedAddRMSNorm, liger_rotary_pos_emb, LigerSiLUMulFunction (when importable).

GB/s counts the minimum traffic of the case, the same for every implementation: each input read once and
each output written once (forward+backward: the forward's inputs and the output gradients read, the outputs
and the input gradients written). `copy_fraction` divides by the bandwidth of a large device-to-device copy
(read + write counted). Also the fused linear cross-entropy (hidden 896, vocab 151936, 8192 tokens, bf16):
the package's `losses.fused_causal_lm_loss` against logits + F.cross_entropy (eager and compiled) and
LigerFusedLinearCrossEntropyLoss, in time, TFLOP/s of its three GEMMs and peak memory.

Every implementation is checked against torch eager before it is timed (an implementation that disagrees
is reported as an error, not timed). On CUDA the times are triton.testing.do_bench medians. `--dry-run`
runs the same code on the CPU at tiny shapes (the Triton path through TRITON_INTERPRET=1, torch.compile on
the first shape of rms_norm only, Liger only where CUDA is present), timed by a plain median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SPEC = common.ROOT / "models" / "qwen2.model"
NAME = "qwen2_bench_kernels"
GPU_SHAPES = [(2048, 4096), (8192, 4096)]
DRY_SHAPES = [(32, 128), (64, 128)]
HEAD_DIM = 128
GPU_CE = dict(tokens=8192, hidden=896, vocab=151936)
DRY_CE = dict(tokens=64, hidden=32, vocab=512)


def log(msg: str) -> None:
    print(f"[kernels {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:500]


# ---- timing ----------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: str, dry: bool):
        self.device, self.dry = device, dry

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        """Seconds per call: do_bench's median on CUDA, a plain median of a few calls elsewhere."""
        if self.device == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1000
        fn()
        times = []
        for _ in range(3 if self.dry else 10):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return common.median(times)


def copy_bandwidth(device: str, dry: bool, timer: Timer) -> float:
    """Bytes per second of a large device-to-device copy, read + write counted."""
    import torch

    n = (16 if dry else 256) * 2**20  # float32 elements: 1 GiB on the GPU
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / seconds


def nbytes(*xs) -> int:
    import torch

    return sum(x.numel() * x.element_size() for x in xs if isinstance(x, torch.Tensor))


# ---- cases -----------------------------------------------------------------------------------------------------
class Case:
    """One region at one shape: its inputs, which of them take a gradient, and its implementations."""

    def __init__(self, region: str, shape: tuple[int, int], inputs: list, needs: list[bool], impls: dict):
        self.region, self.shape, self.inputs, self.needs, self.impls = region, shape, inputs, needs, impls


def make_cases(K, KT, shape, device, dtype, liger):
    """The four regions at rows x hidden `shape`; each impl maps inputs -> a tuple of output tensors."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    R, N = shape

    def rn(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(dt).to(device)

    def tup(x):
        return x if isinstance(x, tuple) else (x,)

    eps = 1e-6
    cases = []

    w = 1 + rn(N, scale=0.1)
    impls = {
        "dslc": lambda x, w: tup(KT.rms_norm_triton(x, eps, w)),
        "torch": lambda x, w: tup(K.rms_norm_torch(x, eps, w)),
    }
    if liger is not None:
        impls["liger"] = liger_rms_norm(liger, N, eps, w)
    cases.append(Case("rms_norm", shape, [rn(R, N), w], [True, True], impls))

    impls = {
        "dslc": lambda x, r, w: tup(KT.rms_norm_residual_triton(x, r, eps, w)),
        "torch": lambda x, r, w: tup(K.rms_norm_residual_torch(x, r, eps, w)),
    }
    if liger is not None:
        impls["liger"] = liger_add_rms_norm(liger, N, eps, w)
    cases.append(Case("rms_norm_residual", shape, [rn(R, N), rn(R, N), w], [True, True, True], impls))

    # rope: q and k of [B, 16, T, 128] each (together R x N elements), cos/sin [B, 1, T, 128] float32 as the
    # model passes them (the region casts them to q's dtype)
    heads = 16
    T = min(2048, R * N // (2 * heads * HEAD_DIM))
    B = R * N // (2 * heads * HEAD_DIM * T)
    ang = torch.rand(B, 1, T, HEAD_DIM // 2, generator=g) * 6.0
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    q, k = rn(B, heads, T, HEAD_DIM), rn(B, heads, T, HEAD_DIM)
    impls = {
        "dslc": lambda c, q, k, s: KT.attention_apply_rope_x2_triton(c, q, s, c, k, s),  # one launch, as the model
        "dslc (2 launches)": lambda c, q, k, s: (
            KT.attention_apply_rope_triton(c, q, s),
            KT.attention_apply_rope_triton(c, k, s),
        ),
        "torch": lambda c, q, k, s: (K.attention_apply_rope_torch(c, q, s), K.attention_apply_rope_torch(c, k, s)),
    }
    if liger is not None:
        impls["liger"] = liger_rope(liger)
    cases.append(
        Case("attention_apply_rope", (B, heads, T, HEAD_DIM), [cos, q, k, sin], [False, True, True, False], impls)
    )

    impls = {
        "dslc": lambda a, b: tup(KT.gated_mlp_pointwise_triton(a, "silu", b)),
        "torch": lambda a, b: tup(K.gated_mlp_pointwise_torch(a, "silu", b)),
    }
    if liger is not None:
        impls["liger"] = lambda a, b: (liger.LigerSiLUMulFunction.apply(a, b),)
    cases.append(Case("gated_mlp_pointwise", shape, [rn(R, N), rn(R, N)], [True, True], impls))
    return cases


def liger_rms_norm(liger, N, eps, w):
    mod = liger.LigerRMSNorm(N, eps=eps, in_place=False).to(device=w.device, dtype=w.dtype)

    def fn(x, weight):
        mod.weight = weight  # the case's own weight leaf, so its gradient is the one asked for
        return (mod(x),)

    return fn


def liger_add_rms_norm(liger, N, eps, w):
    mod = liger.LigerFusedAddRMSNorm(N, eps=eps, in_place=False).to(device=w.device, dtype=w.dtype)

    def fn(x, r, weight):
        mod.weight = weight
        out, residual = mod(x, r)
        return residual, out  # the region's order: (x + residual, norm)

    return fn


def liger_rope(liger):
    def fn(c, q, k, s):
        # HF hands Liger cos/sin of [B, T, D] in the activations' dtype
        return tuple(liger.liger_rotary_pos_emb(q, k, c[:, 0].to(q.dtype), s[:, 0].to(q.dtype)))

    return fn


def load_liger(device: str):
    if device != "cuda":
        return None, "Liger-Kernel runs on CUDA only"
    try:
        import liger_kernel.ops as ops
        import liger_kernel.transformers as lt
    except ImportError as e:
        return None, f"liger-kernel is not importable ({e})"

    class L:
        LigerRMSNorm = lt.LigerRMSNorm
        LigerFusedAddRMSNorm = lt.LigerFusedAddRMSNorm
        liger_rotary_pos_emb = staticmethod(lt.liger_rotary_pos_emb)
        LigerSiLUMulFunction = ops.LigerSiLUMulFunction
        LigerFusedLinearCrossEntropyLoss = lt.LigerFusedLinearCrossEntropyLoss

    return L, None


# ---- running one case -------------------------------------------------------------------------------------------
def leaves(case):
    return [x.detach().clone().requires_grad_(n) if n else x for x, n in zip(case.inputs, case.needs)]


def output_grads(outs):
    import torch

    g = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outs]


def fwd_bwd(fn, xs, needs, grads):
    import torch

    outs = fn(*xs)
    wrt = [x for x, n in zip(xs, needs) if n]
    return outs, torch.autograd.grad(outs, wrt, grads)  # no .grad accumulation: the minimum traffic


def close(a, b) -> float | None:
    """None when a matches b within bf16-scale tolerances, else the max abs difference."""
    import torch

    a, b = a.float(), b.float()
    scale = b.abs().max().item() + 1e-6
    ok = a.shape == b.shape and torch.allclose(a, b, rtol=3e-2, atol=2e-2 * scale)
    return None if ok else float((a - b).abs().max()) if a.shape == b.shape else float("inf")


def run_case(case, timer, bandwidth, compile_ok: bool):
    """Check every implementation against torch eager, then time forward and forward+backward."""
    import torch

    out = []
    fns = dict(case.impls)
    if compile_ok:
        fns["torch.compile"] = torch.compile(case.impls["torch"], dynamic=False)
    # reference: torch eager
    xs = leaves(case)
    with torch.no_grad():
        grads = output_grads(case.impls["torch"](*xs))
    ref_out, ref_grads = fwd_bwd(case.impls["torch"], xs, case.needs, grads)
    wrt = [x for x, n in zip(xs, case.needs) if n]
    fwd_bytes = nbytes(*case.inputs) + nbytes(*ref_out)
    both_bytes = fwd_bytes + nbytes(*grads) + nbytes(*wrt)
    results = {"fwd": {}, "fwd+bwd": {}}
    for name, fn in fns.items():
        try:
            xs = leaves(case)
            got_out, got_grads = fwd_bwd(fn, xs, case.needs, grads)
            bad = [
                (f"output {i}", d) for i, (a, b) in enumerate(zip(got_out, ref_out)) if (d := close(a, b)) is not None
            ]
            bad += [
                (f"grad {i}", d) for i, (a, b) in enumerate(zip(got_grads, ref_grads)) if (d := close(a, b)) is not None
            ]
            if len(got_out) != len(ref_out) or bad:
                raise AssertionError(f"differs from torch eager: {bad or 'number of outputs'}")
            with torch.no_grad():
                t_f = timer(lambda fn=fn, xs=xs: fn(*xs))
            t_fb = timer(lambda fn=fn, xs=xs: fwd_bwd(fn, xs, case.needs, grads))
            for mode, t, b in (("fwd", t_f, fwd_bytes), ("fwd+bwd", t_fb, both_bytes)):
                results[mode][name] = {
                    "ms": t * 1000,
                    "GBps": b / t / 1e9,
                    "copy_fraction": b / t / bandwidth,
                }
        except Exception as e:  # one implementation failing does not end the benchmark
            log(f"  {case.region} {name}: {err(e)}")
            for mode in results:
                results[mode][name] = {"error": err(e)}
    for mode, b in (("fwd", fwd_bytes), ("fwd+bwd", both_bytes)):
        out.append(
            {"region": case.region, "shape": list(case.shape), "mode": mode, "min_bytes": b, "impls": results[mode]}
        )
    return out


# ---- fused linear cross-entropy --------------------------------------------------------------------------------
def fused_ce(L, device, dtype, dims, timer, liger, compile_ok):
    """The package's fused_causal_lm_loss against logits + cross_entropy, compiled, and Liger's."""
    import torch
    import torch.nn.functional as F

    n, H, V = dims["tokens"], dims["hidden"], dims["vocab"]
    g = torch.Generator(device="cpu").manual_seed(2)
    hidden = (torch.randn(1, n, H, generator=g)).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype).to(device)
    labels = torch.randint(0, V, (1, n), generator=g).to(device)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)

    def plain(h, w):
        return F.cross_entropy((h.reshape(-1, H) @ w.T).float(), shifted, ignore_index=-100)

    impls = {"dslc": lambda h, w: L.fused_causal_lm_loss(h, w, None, labels), "torch": plain}
    if compile_ok:
        impls["torch.compile"] = torch.compile(plain, dynamic=False)
    if liger is not None:
        lce = liger.LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = lambda h, w: lce(w, h.reshape(-1, H), shifted)
    flops = 3 * 2 * n * H * V  # logits, grad hidden, grad weight
    res = {"tokens": n, "hidden": H, "vocab": V, "dtype": str(dtype).replace("torch.", ""), "gemm_flops": flops}
    ref = None
    for name, fn in impls.items():
        try:
            h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()

            def step(fn=fn, h=h, w=w):
                loss = fn(h, w)
                return loss, torch.autograd.grad(loss, (h, w))

            loss, (gh, gw) = step()
            if ref is None:
                ref = (loss.float().item(), gh, gw)
            elif abs(loss.float().item() - ref[0]) > 2e-2 * abs(ref[0]) or close(gh, ref[1]) or close(gw, ref[2]):
                raise AssertionError(f"loss {loss.float().item():.5f} or gradients differ from dslc ({ref[0]:.5f})")
            t_fb = timer(step)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = None
            res[name] = {"fwd+bwd_ms": t_fb * 1000, "TFLOPs": flops / t_fb / 1e12, "peak_extra_bytes": peak}
        except Exception as e:
            log(f"  fused linear CE {name}: {err(e)}")
            res[name] = {"error": err(e)}
    return res


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, Triton through its interpreter")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = p.parse_args(argv)
    started = time.perf_counter()
    # a fresh Triton cache: the first call of each region times the JIT compile of this build
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dslc-kernels-triton-cache-")
    # and a fresh tile cache: the warm-up includes the tile tuning (kernels_runtime.tuned_tile) of this build
    tiles = Path(tempfile.mkdtemp(prefix="dslc-kernels-tiles-")) / "tiles.json"
    os.environ["DSLC_AUTOTUNE_CACHE"] = str(tiles)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernels.py: no CUDA device (use --dry-run on the CPU)")
    dtype = torch.bfloat16
    timer = Timer(device, args.dry_run)
    result: dict = {
        "benchmark": "kernels",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": common.machine_info(),
        "device": device,
        "dtype": "bfloat16",
        "dry_run": args.dry_run,
    }
    if device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        result["machine"]["triton"] = triton.__version__
    except ImportError:
        pass

    out = Path(tempfile.mkdtemp(prefix="dslc-kernels-"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dslc", "build", str(SPEC), "-o", str(out), "--name", NAME], check=True)
    result["build_seconds"] = time.perf_counter() - t0
    sys.path.insert(0, str(out))
    import importlib

    K = importlib.import_module(f"{NAME}.kernels")
    KT = importlib.import_module(f"{NAME}.kernels_triton")
    L = importlib.import_module(f"{NAME}.losses")
    liger, why = load_liger(device)
    result["machine"]["liger_kernel"] = _liger_version()
    if why:
        result["liger_skipped"] = why
    bandwidth = copy_bandwidth(device, args.dry_run, timer)
    result["copy_bandwidth_bytes_per_s"] = bandwidth
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; build {result['build_seconds']:.2f} s")

    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    # JIT warm-up: the first forward and the first backward of each region, fresh cache, first shape
    warm = {}
    for case in make_cases(K, KT, shapes[0], device, dtype, None):
        try:
            xs = leaves(case)
            timer.sync()
            t0 = time.perf_counter()
            outs = case.impls["dslc"](*xs)
            timer.sync()
            t1 = time.perf_counter()
            torch.autograd.grad(outs, [x for x, n in zip(xs, case.needs) if n], output_grads(outs))
            timer.sync()
            warm[case.region] = {"fwd_s": t1 - t0, "bwd_s": time.perf_counter() - t1}
        except Exception as e:
            warm[case.region] = {"error": err(e)}
    result["jit_warmup"] = warm
    # the tuned tiles (kernel|row width|rows|dtypes|flags|device -> [BLOCK_M, num_warps]); none off CUDA
    result["tuned_tiles"] = json.loads(tiles.read_text()) if tiles.exists() else {}
    log("JIT warm-up: " + ", ".join(f"{k} {v.get('fwd_s', 0) + v.get('bwd_s', 0):.2f}s" for k, v in warm.items()))

    result["cases"] = []
    compile_skipped = "--no-compile" if args.no_compile else None
    for i, shape in enumerate(shapes):
        for case in make_cases(K, KT, shape, device, dtype, liger):
            # the dry run compiles one region at its first shape only (inductor's CPU compile takes seconds)
            compile_ok = not args.no_compile and (not args.dry_run or (i == 0 and case.region == "rms_norm"))
            if not compile_ok and not compile_skipped:
                compile_skipped = "dry run: compiled for rms_norm at the first shape only"
            t0 = time.perf_counter()
            rows = run_case(case, timer, bandwidth, compile_ok)
            result["cases"] += rows
            log(f"{case.region} {list(case.shape)}: {time.perf_counter() - t0:.1f}s")
    if compile_skipped:
        result["compile_skipped"] = compile_skipped
    t0 = time.perf_counter()
    try:
        result["fused_linear_ce"] = fused_ce(
            L, device, dtype, DRY_CE if args.dry_run else GPU_CE, timer, liger, not args.no_compile and not args.dry_run
        )
    except Exception as e:
        traceback.print_exc()
        result["fused_linear_ce"] = {"error": err(e)}
    log(f"fused linear CE: {time.perf_counter() - t0:.1f}s")
    result["wall_s"] = time.perf_counter() - started

    rows = []
    for c in result["cases"]:
        for name, r in c["impls"].items():
            rows.append(
                [
                    f"{c['region']} {c['mode']}",
                    "x".join(map(str, c["shape"])),
                    name,
                    "error" if "error" in r else f"{r['ms']:.3f}",
                    "-" if "error" in r else f"{r['GBps']:.0f}",
                    "-" if "error" in r else f"{100 * r['copy_fraction']:.0f}%",
                ]
            )
    common.print_table(
        f"Fused regions ({device}, bf16), minimum-traffic GB/s; copy {bandwidth / 1e9:.0f} GB/s",
        ["region", "shape", "impl", "ms", "GB/s", "of copy"],
        rows,
    )
    if args.json:
        common.write_json(args.json, result)
    errors = [c for c in result["cases"] if any("error" in r for r in c["impls"].values())]
    return 1 if errors or "error" in result["fused_linear_ce"] else 0


def _liger_version():
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
