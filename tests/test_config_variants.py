"""`dslc check` checks other configs the `require`s allow (dslc/check/configs.py), not only the one given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dslc.api import check_file, check_source
from dslc.check import configs
from dslc.cli import main
from dslc.diagnostics import DslcError
from dslc.ir import ops

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(ROOT.glob("models/*.model")) + sorted(ROOT.glob("tests/specs/*.model"))

CONFIG = """use std

config C:
    vocab_size: int = 64
    hidden_size: int = 32
    num_heads: int = 4
    act: str = "silu"
    require act == "silu" or act == "gelu", "act is silu or gelu"
"""

HARD_CODED = (
    CONFIG
    + """
model M(C): base
    embed = Embedding(vocab_size, hidden_size)
    proj = Linear(32, hidden_size)

    forward(input_ids: [B, T] i64) -> [B, T, hidden_size]:
        return proj(embed(input_ids))
"""
)

HEADS = """
model M(C): base
    embed = Embedding(vocab_size, hidden_size)

    forward(input_ids: [B, T] i64) -> [B, T, hidden_size]:
        q = split_heads(embed(input_ids), num_heads)
        return merge_heads(attention(q, q, q, causal = true))
"""


def _changes(message: str) -> dict[str, str]:
    """`with a = 1, b = "x": ...` -> {"a": "1", "b": "x"}, as `--set` takes them."""
    m = re.match(r"with (.*?): ", message)
    assert m, message
    return {k: v.strip('"') for k, v in (part.split(" = ") for part in m.group(1).split(", "))}


def _as_set(v) -> str:
    """A value as `--set` reads it."""
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_shipped_spec_checks_for_the_configs_its_requires_allow(path):
    checked = check_file(path, variants=64)
    assert checked.variants_checked > 10  # a spec with few free fields has fewer variants than the limit


def test_a_size_written_as_a_number_passes_its_own_config_and_fails_for_another():
    check_source(HARD_CODED, "hard.model")  # the default config: hidden_size is 32, as written
    with pytest.raises(DslcError) as e:
        check_source(HARD_CODED, "hard.model", variants=64)
    [d] = e.value.diagnostics
    assert d.code == "E033"
    assert d.message.startswith(
        "with hidden_size = 1: argument `x` of `Linear` is [B, T, hidden_size], but its weight `weight` "
        "[hidden_size, 32] needs size 32 where it has 1"
    )
    assert "satisfies every `require` of `C`" in d.help[-1]


def test_a_missing_require_is_reported_with_a_config_that_reproduces_it_by_set():
    with pytest.raises(DslcError) as e:
        check_source(CONFIG + HEADS, "heads.model", variants=64)
    [d] = e.value.diagnostics
    changes = _changes(d.message)
    assert len(changes) == 1 and set(changes) <= {"hidden_size", "num_heads"}  # shrunk to one field that matters
    with pytest.raises(DslcError) as again:  # the config named reproduces the error without any search
        check_source(CONFIG + HEADS, "heads.model", overrides=changes)
    [d2] = again.value.diagnostics
    assert (d2.code, d2.span) == (d.code, d.span)
    assert d.message.endswith(d2.message)


def test_the_require_that_rules_the_configs_out_makes_the_spec_check():
    fixed = CONFIG + '    require hidden_size % num_heads == 0, "hidden_size splits into heads"\n' + HEADS
    assert check_source(fixed, "heads.model", variants=64).variants_checked > 10


def test_every_variant_satisfies_every_require_as_the_compiler_evaluates_them():
    checked = check_file(ROOT / "models/qwen2.model")
    program = checked.program
    derived = configs.derived_fields(program.config, set(checked.config_eval.fixed))
    tried = list(
        configs.variants(program.config, program.config_values, set(), derived, configs.compared_strings(program))
    )
    assert len(tried) > 100
    for changes in tried[:: len(tried) // 20]:
        got = check_file(ROOT / "models/qwen2.model", overrides={k: _as_set(v) for k, v in changes.items()})
        assert all(got.program.config_values[k] == v for k, v in changes.items())


def test_candidates_cover_sizes_both_bools_compared_strings_and_none():
    checked = check_file(ROOT / "models/gpt2.model")
    fields = {f.name: f for f in checked.program.config.fields}
    strings = configs.compared_strings(checked.program)
    # read as an activation's name (`activation(c_fc(x), activation_function)`): every name of the table
    assert strings["activation_function"] == set(ops.ACTIVATIONS)
    assert configs.candidates(fields["n_head"], 12, set()) == [1, 2, 3, 5, 7, 13, 24, 6]
    assert configs.candidates(fields["tie_word_embeddings"], True, set()) == [False]
    assert configs.candidates(fields["activation_function"], "gelu_new", strings["activation_function"]) == sorted(
        set(ops.ACTIVATIONS) - {"gelu_new"}
    )
    assert configs.compared_strings(check_file(ROOT / "models/qwen2.model").program)["rope_type"] >= {"yarn", "llama3"}
    assert configs.candidates(fields["n_inner"], None, set()) == [1, 2, 3, 5, 7]  # int? = none: sizes


def test_variants_are_repeatable():
    checked = check_file(ROOT / "models/llama.model")
    p = checked.program
    derived = configs.derived_fields(p.config, set())
    runs = [list(configs.variants(p.config, p.config_values, set(), derived, {}, seed=0)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_shrink_drops_every_field_the_failure_does_not_need():
    fails = lambda c: c.get("a") == 3  # noqa: E731
    assert configs.shrink({"x": 1, "a": 3, "y": True}, fails, lambda c: True) == {"a": 3}
    # a field whose removal would leave an invalid config stays
    assert configs.shrink({"x": 1, "a": 3}, fails, lambda c: "x" in c) == {"x": 1, "a": 3}


def test_set_fields_are_not_varied():
    with pytest.raises(DslcError):
        check_source(HARD_CODED, "hard.model", variants=64)
    # with hidden_size pinned by --set, no variant changes it, and the others all check
    assert check_source(HARD_CODED, "hard.model", overrides={"hidden_size": "32"}, variants=64).variants_checked > 5


def test_len_counts_a_list_in_requires():
    spec = (ROOT / "tests/specs/layer_types.model").read_text()
    with pytest.raises(DslcError) as e:
        check_source(spec, "layer_types.model", overrides={"n": "5"})
    assert [d.code for d in e.value.diagnostics] == ["E020"]
    assert "layer_types names one kind per layer" in e.value.diagnostics[0].message
    bad = CONFIG.replace('    act: str = "silu"', '    act: str = "silu"\n    n: int = len(hidden_size)')
    with pytest.raises(DslcError) as e:
        check_source(bad + HEADS, "bad.model")
    assert "`len()` needs a list, got int `32`" in e.value.diagnostics[0].message


def test_cli_check_reports_the_failing_config_and_counts_the_others(tmp_path, capsys):
    spec = tmp_path / "hard.model"
    spec.write_text(HARD_CODED)
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "error[E033]: with hidden_size = 1: argument `x` of `Linear`" in err
    assert main(["check", str(spec), "--configs", "0"]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {spec}: M, ")
    assert main(["check", str(ROOT / "models/gpt2.model"), "--configs", "5"]) == 0
    assert capsys.readouterr().out.endswith("0 warnings; 5 other configs checked\n")


def test_rules_for_weights_only_other_configs_have_are_not_errors():
    # all layers dense: no `mlp.experts` / `mlp.gate` here, yet the rules and the router name real paths
    checked = check_file(
        ROOT / "models/qwen2_moe.model", overrides={"num_hidden_layers": "2", "decoder_sparse_step": "3"}
    )
    assert not any("experts" in w.name for w in checked.program.weights)
    with pytest.raises(DslcError) as e:  # a misspelt path is still one
        check_source(
            (ROOT / "models/qwen2_moe.model")
            .read_text()
            .replace('router "model.layers.{i}.mlp.gate"', 'router "model.layers.{i}.mlp.gat"'),
            "qwen2_moe.model",
        )
    assert [d.code for d in e.value.diagnostics] == ["E010"]
