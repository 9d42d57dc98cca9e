"""bench/gpu.sh's last step: every step's status and results in one JSON (gpu.json) and one markdown (gpu.md).

    python3 bench/gpu_report.py --out DIR --steps STEPS.tsv --logs LOGDIR --command "..." --wall SECONDS [--dry-run]

Reads DIR/kernels.json, train.json, decode.json and cuda_tests.xml (whichever exist), the steps table that
gpu.sh wrote (name, status, exit code, seconds) and each step's log (its last lines become the error of a failed
step). Exits non-zero only when it cannot write its own output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SECTIONS = ("kernels", "train", "decode")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod, key in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers")):
        try:
            out[key] = __import__(mod).__version__
        except Exception:
            out[key] = None
    try:
        from importlib.metadata import version

        out["liger_kernel"] = version("liger-kernel")
    except Exception:
        out["liger_kernel"] = None
    try:
        out["dslc_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=common.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        out["dslc_commit"] += " (uncommitted changes)" if dirty else ""
    except Exception:
        out["dslc_commit"] = None
    return out


def device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return f"CPU: {common.cpu_model()}, {common.usable_cores()} cores"


def cuda_tests(path: Path) -> dict:
    if not path.exists():
        return {"error": "no cuda_tests.xml (pytest did not run to the end)"}
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    skips = sorted(
        {
            (case.find("skipped").get("message") or "")
            for s in suites
            for case in s.iter("testcase")
            if case.find("skipped") is not None
        }
    )
    return {
        "tests": n["tests"],
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"],
        "errors": n["errors"],
        "skipped": n["skipped"],
        "failed_tests": failed,
        "skip_reasons": skips,
    }


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---- markdown ----------------------------------------------------------------------------------------------------
def cell(r: dict | None) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "error"
    gbps = f"{r['GBps']:,.0f}" if r["GBps"] >= 10 else f"{r['GBps']:.2g}"
    return f"{r['ms']:.3f} ms, {gbps} GB/s ({100 * r['copy_fraction']:.0f}%)"


def md_kernels(k: dict) -> list[str]:
    bw = k.get("copy_bandwidth_bytes_per_s")
    lines = [f"Copy bandwidth (device to device, read + write): {bw / 1e9:.0f} GB/s." if bw else ""]
    notes = [k[key] for key in ("compile_skipped", "liger_skipped") if k.get(key)]
    if notes:
        lines.append("Skipped: " + "; ".join(notes) + ".")
    impls = []
    for c in k.get("cases", []):
        impls += [i for i in c["impls"] if i not in impls]
    rows = []
    for c in k.get("cases", []):
        dslc = c["impls"].get("dslc")
        best_other = [
            r["ms"]
            for name, r in c["impls"].items()
            if not name.startswith("dslc") and r and "error" not in r and "ms" in r
        ]
        speed = common.fmt_ratio(min(best_other) / dslc["ms"]) if dslc and "error" not in dslc and best_other else "-"
        rows.append(
            [
                f"{c['region']} {c['mode']}",
                "x".join(map(str, c["shape"])),
                *(cell(c["impls"].get(i)) for i in impls),
                speed,
            ]
        )
    lines += ["", "Time, minimum-traffic GB/s and fraction of the copy bandwidth (bf16):", ""]
    lines.append(common.markdown_table(["region", "shape", *impls, "best other / dslc"], rows))
    errors = [
        f"* {c['region']} {c['mode']} {c['shape']} {name}: {r['error']}"
        for c in k.get("cases", [])
        for name, r in c["impls"].items()
        if "error" in r
    ]
    if errors:
        lines += ["", "Errors:", "", *sorted(set(errors))]
    warm = k.get("jit_warmup", {})
    if warm:
        lines += ["", "Triton JIT warm-up of a fresh build (first call, empty cache):", ""]
        lines.append(
            common.markdown_table(
                ["region", "first forward", "first backward"],
                [
                    [n, "error", v["error"][:80]]
                    if "error" in v
                    else [n, common.fmt_s(v["fwd_s"]), common.fmt_s(v["bwd_s"])]
                    for n, v in warm.items()
                ],
            )
        )
    ce = k.get("fused_linear_ce", {})
    if ce:
        lines += [
            "",
            f"Fused linear cross-entropy, forward+backward, {ce.get('tokens')} tokens, hidden "
            f"{ce.get('hidden')}, vocab {ce.get('vocab')}, {ce.get('dtype')}:",
            "",
        ]
        if "error" in ce and "tokens" not in ce:
            lines.append(f"error: {ce['error']}")
        else:
            rows = []
            for name in ("dslc", "torch", "torch.compile", "liger"):
                r = ce.get(name)
                if not r:
                    continue
                if "error" in r:
                    rows.append([name, "error", "-", r["error"][:80]])
                else:
                    peak = r.get("peak_extra_bytes")
                    rows.append(
                        [
                            name,
                            f"{r['fwd+bwd_ms']:.2f} ms",
                            f"{r['TFLOPs']:.1f}",
                            "-" if peak is None else common.fmt_mib(peak),
                        ]
                    )
            lines.append(common.markdown_table(["impl", "fwd+bwd", "TFLOP/s (3 GEMMs)", "peak extra memory"], rows))
    return lines


def md_train(t: dict) -> list[str]:
    impls = list(t.get("median_step_seconds", {}))
    lines = [
        f"{t.get('batch')}x{t.get('seq')} tokens, {t.get('dtype')}, {t.get('device')}, "
        f"{t.get('config', {}).get('num_hidden_layers')} layers, hidden {t.get('config', {}).get('hidden_size')}, "
        f"vocab {t.get('config', {}).get('vocab_size')}; fwd+bwd+AdamW, median of the interleaved repeats.",
        "",
    ]
    rows = []
    for n in impls:
        med = t["median_step_seconds"][n]
        rows.append(
            [
                n,
                common.fmt_s(med),
                f"{t['tokens_per_second'][n]:,.0f}",
                common.fmt_ratio(t["speedup_vs"][n]),
                common.fmt_mib(t["peak_bytes"].get(n)),
                common.fmt_s(t["first_step_seconds"].get(n)),
            ]
        )
    lines.append(
        common.markdown_table(["impl", "step", "tokens/s", "time / dslc's", "peak memory", "first step"], rows)
    )
    build = common.median(t.get("dslc_build_seconds") or [])
    warm = t.get("compile_warmup_seconds")
    lines += ["", f"`dslc build`: {common.fmt_s(build)}; torch.compile warm-up: {common.fmt_s(warm)}."]
    if t.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in t["skipped"].items()) + ".")
    return lines


def md_decode(d: dict) -> list[str]:
    lines = [
        f"prompt {d.get('prompt')}, {d.get('new_tokens')} new tokens, {d.get('model', {}).get('dtype')}, best of "
        f"{d.get('repeats')} repeats; copy bandwidth {d.get('copy_bandwidth_bytes_per_s', 0) / 1e9:.0f} GB/s.",
        "",
    ]
    rows = []
    runs = d.get("runs", {})
    for key, r in runs.items():
        base = runs.get(f"hf b{r['batch']}")
        rows.append(
            [
                key,
                f"{r['decode_tokens_per_s']:,.0f}",
                f"{r['step_s'] * 1000:.2f} ms",
                f"{100 * r['roofline_fraction']:.0f}%",
                common.fmt_ratio(common.ratio(r["decode_tokens_per_s"], base and base["decode_tokens_per_s"])),
                "yes" if r["tokens_equal_dslc_eager"] else f"{100 * r['token_agreement_with_dslc_eager']:.0f}%",
            ]
        )
    lines.append(
        common.markdown_table(
            ["impl / batch", "decode tok/s", "step", "roofline", "vs hf", "tokens = dslc-eager"], rows
        )
    )
    if d.get("skipped"):
        lines.append("\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in d["skipped"].items()) + ".")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--wall", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    out, logs = Path(args.out), Path(args.logs)

    steps = []
    for line in Path(args.steps).read_text().splitlines():
        name, status, rc, seconds = line.split("\t")
        s = {"name": name, "status": status, "exit_code": int(rc), "seconds": float(seconds)}
        if status != "ok":
            s["error"] = tail(logs / f"{name}.log")
        steps.append(s)
    report: dict = {
        "command": args.command,
        "dry_run": args.dry_run,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
        "wall_s": args.wall,
        "steps": steps,
        "ok": all(s["status"] == "ok" for s in steps),
        "cuda_tests": cuda_tests(out / "cuda_tests.xml"),
    }
    for name in SECTIONS:
        path = out / f"{name}.json"
        step = next((s for s in steps if s["name"] == name), None)
        if path.exists():
            report[name] = json.loads(path.read_text())
        else:
            why = step["error"].splitlines()[-1] if step and step.get("error") else "no output"
            report[name] = {"error": f"{name} wrote no results: {why}"}
    common.write_json(out / "gpu.json", report)

    v = report["versions"]
    md = [
        f"# dslc GPU run{' (dry run on the CPU, tiny shapes)' if args.dry_run else ''}",
        "",
        common.markdown_table(
            ["", ""],
            [
                ["device", report["device"]],
                ["date", report["date"]],
                ["command", f"`{args.command}`"],
                ["dslc commit", v.get("dslc_commit") or "-"],
                [
                    "versions",
                    f"Python {v['python']}, torch {v['torch']}, triton {v['triton']}, transformers "
                    f"{v['transformers']}, liger-kernel {v['liger_kernel'] or 'not installed'}",
                ],
                ["wall time", common.fmt_s(args.wall)],
                [
                    "result",
                    "all steps ok"
                    if report["ok"]
                    else "FAILED: " + ", ".join(s["name"] for s in steps if s["status"] != "ok"),
                ],
            ],
        ),
        "",
        "## Steps",
        "",
        common.markdown_table(
            ["step", "status", "exit", "seconds", "last line of its output when not ok"],
            [
                [
                    s["name"],
                    s["status"],
                    s["exit_code"],
                    f"{s['seconds']:.0f}",
                    (s.get("error") or "").splitlines()[-1:][0][:120].replace("|", "/") if s.get("error") else "",
                ]
                for s in steps
            ],
        ),
        "",
        "## CUDA tests (`pytest -m cuda`)",
        "",
    ]
    ct = report["cuda_tests"]
    if "error" in ct:
        md.append(f"error: {ct['error']}")
    else:
        md.append(
            f"{ct['passed']} passed, {ct['failed']} failed, {ct['errors']} errors, {ct['skipped']} skipped ({ct['tests']} tests)."
        )
        if ct["skip_reasons"]:
            md.append("Skipped because: " + "; ".join(ct["skip_reasons"]) + ".")
        md += [f"* failed: `{t}`" for t in ct["failed_tests"]]
    for name, title, render in (
        ("kernels", "Kernels (`bench/kernels.py`)", md_kernels),
        ("train", "Training step (`bench/train.py`)", md_train),
        ("decode", "Decode (`bench/decode.py`)", md_decode),
    ):
        md += ["", f"## {title}", ""]
        section = report[name]
        if "error" in section and len(section) == 1:
            md.append(f"error: {section['error']}")
            continue
        try:
            md += render(section)
        except Exception as e:  # a half-written section still leaves the rest of the report
            md.append(f"(could not render: {type(e).__name__}: {e})")
    (out / "gpu.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
