"""Helpers shared by the benchmark scripts in bench/ (scripts, not tests).

* machine description: CPU model, cores, threads, versions, date, load average;
* interleaved timing (A B C A B C ...) of several implementations, so that slow drift of the machine
  (thermal, other processes) hits every implementation alike;
* whole-process wall time of a command, and peak RSS of a child process;
* deterministic random weights for a Hugging Face model;
* a results table (rich when it is installed, plain text otherwise) and JSON output.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Qwen2 shapes shared by the benchmarks (transformers Qwen2Config fields; each script adds its own extras)
QWEN2_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
)
QWEN2_TINY = dict(  # --tiny / --dry-run: seconds on the CPU, through the Triton interpreter too
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


# ---- machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg_start": load_average(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        import dslc

        info["dslc"] = dslc.__version__
    except ImportError:
        info["dslc"] = None
    return info


# ---- timing --------------------------------------------------------------------------------------
def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def interleaved(
    fns: dict[str, Callable[[int], dict[str, float]]],
    repeats: int,
    warmup: int = 1,
    after_warmup: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Run each implementation once per round, in the same order every round: A B C A B C ...

    Each fn takes the round index (warm-up rounds included, from 0) and returns {phase: seconds}.
    Warm-up rounds are run but not kept; `after_warmup` runs once after them (correctness checks).
    Returns {name: {phase: [seconds of each kept round]}}.
    """
    out: dict[str, dict[str, list[float]]] = {name: {} for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            phases = fn(r)
            if log:
                kind = "warm-up" if r < warmup else f"rep {r - warmup + 1}/{repeats}"
                log(f"  {kind:>10} {name:<9} " + "  ".join(f"{k} {v:.3f}s" for k, v in phases.items()))
            if r >= warmup:
                for phase, seconds in phases.items():
                    out[name].setdefault(phase, []).append(seconds)
        if r + 1 == warmup and after_warmup is not None:
            after_warmup()
    return out


def wall_times(cmd: list[str], n: int, cwd: Path | None = None) -> list[float]:
    """Whole-process wall time of `cmd`, `n` times (it must exit 0 each time)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return times


# A tiny Python that starts the real child. Linux carries the peak RSS of the process that forks into the
# ru_maxrss of the exec'd child (exec records the old address space's high-water mark), so a child started
# straight from a big benchmark process would report the parent's peak; started from this launcher, it
# inherits only the launcher's few MiB.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def child_json(cmd: list[str], env: dict | None = None, clean_rss: bool = False) -> dict:
    """Run a child that prints one JSON object as its last stdout line; return it.

    clean_rss: start it through a small launcher process, so its ru_maxrss is its own (see _LAUNCHER).
    """
    if clean_rss:
        cmd = [sys.executable, "-I", "-c", _LAUNCHER, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def vm_hwm_bytes() -> int | None:
    """VmHWM of /proc/self/status: the peak RSS of this address space alone (Linux), a cross-check."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- weights -------------------------------------------------------------------------------------
@contextlib.contextmanager
def hf_no_init():
    """Skip transformers' own (slow, discarded) weight init while building a model to randomize."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4.x
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def randomize_(model, seed: int = 0) -> None:
    """Overwrite every parameter deterministically, in sorted-name order from a private generator.

    norm weights 1 + N(0, 0.1); biases N(0, 0.1); embeddings N(0, 0.02) (HF's initializer_range, so the
    tied LM head gives O(1) logits); other matrices N(0, fan_in ** -0.5), so activations stay O(1).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                noise.mul_(0.1)
            elif "norm" in name:
                noise.mul_(0.1).add_(1.0)
            elif "embed" in name:
                noise.mul_(0.02)
            elif p.ndim == 2:
                noise.mul_(p.shape[1] ** -0.5)
            else:
                noise.mul_(0.1)
            p.copy_(noise)


def unique_parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips tied copies


# ---- output --------------------------------------------------------------------------------------
def fmt_s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.2f} s"


def fmt_mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}x"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        return
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[str(c) for c in r])
    # wide enough that no cell wraps (the output is usually a log or a file, not a narrow terminal)
    need = sum(max(len(str(r[i])) for r in [columns, *rows]) + 3 for i in range(len(columns))) + 1
    Console(width=max(need, len(title) + 2)).print(table)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
