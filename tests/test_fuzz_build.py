"""Grammar-aware mutants of every spec in models/: each one `dslc check` accepts must also build, import and run.

Mutations a user makes while editing (an activation swapped, an operator changed, a bias or causal flag
flipped, a statement duplicated or deleted, a size changed). The property: a mutant is refused with a
located DslcError, or its package builds without any other exception, imports in a fresh process, and runs
forward (and backward for a causal LM) at a tiny config with finite outputs. Fixed seed and count (CI).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dslc.api import check_source
from dslc.build import build
from dslc.diagnostics import DslcError

ROOT = Path(__file__).resolve().parents[1]
SEED, PER_SPEC = 20261201, 12
TINY = {  # spec -> config values that make its model small enough to run here
    "modernbert": dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0
    ),
    "vit": dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=8, patch_size=4
    ),
    "qwen2": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "llama": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64),
    "mixtral": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        max_position_embeddings=64,
    ),
    "qwen3_moe": dict(
        vocab_size=64,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    ),
    "qwen2_moe": dict(
        vocab_size=64,
        hidden_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        intermediate_size=24,
        num_hidden_layers=2,
        mlp_only_layers=[1],  # layer 1 dense: the choice `mlp = SparseMoeBlock() if sparse else GatedMLP(...)`
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        max_position_embeddings=64,
    ),
    "bert": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
}
TINY["mistral"] = dict(TINY["llama"], sliding_window=4)
TINY["olmo2"] = dict(TINY["llama"], pad_token_id=0)  # its default, 100277, is past the tiny vocabulary
TINY["qwen3"] = dict(TINY["llama"], head_dim=8)
TINY["gemma"] = dict(TINY["llama"], head_dim=8)
TINY["gemma2"] = dict(TINY["llama"], head_dim=8, sliding_window=4)
TINY["phi3"] = dict(TINY["llama"], pad_token_id=0, sliding_window=4)
TINY["gpt_neox"] = dict(TINY["bert"])
ACTIVATIONS = ["silu", "gelu", "relu", "tanh", "sigmoid", "gelu_tanh"]
SWAPS = [(" + ", " * "), (" * ", " + "), (" + ", " - "), ("true", "false"), ("false", "true")]


def _forward_lines(lines: list[str]) -> list[int]:
    """Indexes of statements inside forward bodies (indented 8 spaces, not comments)."""
    return [
        i
        for i, line in enumerate(lines)
        if line.startswith("        ") and line.strip() and not line.strip().startswith("#")
    ]


def mutate(text: str, rng: random.Random) -> tuple[str, str]:
    lines = text.split("\n")
    body = _forward_lines(lines)
    kind = rng.choice(["activation", "operator", "duplicate", "delete", "size", "flag"])
    if kind == "activation":
        spots = [i for i, line in enumerate(lines) if any(f"{a}(" in line for a in ACTIVATIONS)]
        if spots:
            i = rng.choice(spots)
            old = next(a for a in sorted(ACTIVATIONS, key=len, reverse=True) if f"{a}(" in lines[i])
            lines[i] = lines[i].replace(f"{old}(", f"{rng.choice([a for a in ACTIVATIONS if a != old])}(", 1)
    elif kind == "operator" and body:
        i = rng.choice(body)
        a, b = rng.choice(SWAPS[:3])
        lines[i] = lines[i].replace(a, b, 1)
    elif kind == "duplicate" and body:
        i = rng.choice(body)
        lines.insert(i, lines[i])
    elif kind == "delete" and body:
        del lines[rng.choice(body)]
    elif kind == "size":
        spots = [i for i, line in enumerate(lines) if re.search(r": int = \d+", line)]
        if spots:
            i = rng.choice(spots)
            lines[i] = re.sub(
                r"(: int = )\d+", lambda m: m.group(1) + str(rng.choice([1, 2, 3, 8, 64])), lines[i], count=1
            )
    else:
        spots = [i for i, line in enumerate(lines) if "true" in line or "false" in line]
        if spots:
            i = rng.choice(spots)
            a, b = ("true", "false") if "true" in lines[i] else ("false", "true")
            lines[i] = lines[i].replace(a, b, 1)
    return kind, "\n".join(lines)


RUN = textwrap.dedent("""
    import importlib, json, sys, torch
    sys.path.insert(0, sys.argv[1])
    report = {}
    for name, config in json.loads(sys.argv[2]).items():
        pkg = importlib.import_module(name)
        model_cls = next(getattr(pkg, n) for n in pkg.__all__ if getattr(getattr(pkg, n), "config_class", None))
        model = model_cls(model_cls.config_class(**config)).eval()
        ids = torch.randint(0, 64, (2, 5))
        kwargs = {"input_ids": ids}
        if "pixel_values" in model.graph_inputs:  # an image model (vit): images of the config's size
            c = model.config
            kwargs = {"pixel_values": torch.randn(2, c.num_channels, c.image_size, c.image_size)}
        if "token_type_ids" in model.graph_inputs:
            kwargs["token_type_ids"] = torch.zeros_like(ids)
        out = model(**kwargs)
        first = out["logits"] if "logits" in out else out[0]  # (an MoE output may lead with aux_loss)
        # finite or not: a mutant may compute rsqrt(var - eps), as the spec then says
        if model.task == "causal_lm":
            model(**kwargs, labels=ids).loss.backward()
        report[name] = list(first.shape)
    print(json.dumps(report))
""")


def _mutants():
    rng = random.Random(SEED)
    out = []
    for spec in sorted((ROOT / "models").glob("*.model")):
        text = spec.read_text()
        for k in range(PER_SPEC):
            kind, mutant = mutate(text, rng)
            out.append((spec.stem, k, kind, mutant))
    return out


def test_accepted_mutants_build_import_and_run(tmp_path):
    accepted, refused, configs = [], 0, {}
    for stem, k, kind, text in _mutants():
        path = tmp_path / f"{stem}_{k}.model"
        path.write_text(text)
        try:
            check_source(text, str(path))
        except DslcError as e:
            assert all(d.span.line >= 1 for d in e.diagnostics)
            refused += 1
            continue
        name = f"fz_{stem}_{k}"
        build(path, tmp_path / "build", name=name)  # a checked spec must build: anything raised here is a bug
        accepted.append((name, kind))
        configs[name] = TINY[stem]
    assert accepted and refused, f"the mutations should produce both: {len(accepted)} accepted, {refused} refused"
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path / "build"), json.dumps(configs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    shapes = json.loads(done.stdout)
    assert set(shapes) == set(configs)
    bad = {n: s for n, s in shapes.items() if not (s[:2] == [2, 5] or s[:1] == [2])}
    assert not bad, bad


@pytest.mark.parametrize("stem", sorted(TINY))
def test_the_tiny_configs_fit_the_unmutated_specs(stem):
    """The TINY values are real fields of each spec (a mutant fails only because of its mutation)."""
    from dslc.api import check_file

    checked = check_file(ROOT / "models" / f"{stem}.model", overrides={k: str(v) for k, v in TINY[stem].items()})
    assert checked.program.param_count < 100_000
