"""Per-layer variation: `repeat(n, Block(i % 2 == 0))` gives each layer its own arguments through the layer
index `i` (tests/specs/alternating.model: even layers attend in a sliding window, odd ones globally).

The generated stack is `nn.ModuleList(Block(config, i % 2 == 0) for i in range(config.n))`; the model's logits
equal an independent PyTorch evaluation of the same weights with the window applied to even layers only, and
the checker types each distinct layer (a layer kind that breaks the carried shape is E030)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from packages import built_packages  # noqa: E402

from dslc.api import check_source  # noqa: E402
from dslc.diagnostics import DslcError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "alternating.model"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("perlayer"), (SPEC, "alternating_pkg")):
        yield importlib.import_module("alternating_pkg")


def _reference(model, ids, window: int):
    """The spec's math written out: layer i attends causally, within `window` positions when i is even."""
    cfg = model.config
    x = model.embed.weight[ids]
    T = ids.shape[1]
    q_pos, k_pos = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for i, layer in enumerate(model.layers):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        h = layer.norm.weight * h.to(x.dtype)
        q, k, v = F.linear(h, layer.qkv.weight, layer.qkv.bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(*t.shape[:2], cfg.heads, -1).transpose(1, 2) for t in (q, k, v))
        allowed = k_pos <= q_pos
        if i % 2 == 0:
            allowed = allowed & (k_pos > q_pos - window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + F.linear(y.transpose(1, 2).reshape(*x.shape), layer.out.weight, layer.out.bias)
    return F.linear(x, model.head.weight, model.head.bias)


def test_the_stack_passes_each_layer_its_index(pkg):
    model = pkg.M(pkg.C())
    assert [layer.sliding for layer in model.layers] == [True, False, True, False]
    modeling = (Path(pkg.__file__).parent / "modeling.py").read_text()
    assert "nn.ModuleList(Block(config, i % 2 == 0) for i in range(config.n))" in modeling


def test_alternating_layers_compute_what_the_spec_says(pkg):
    torch.manual_seed(0)
    model = pkg.M(pkg.C()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        got = model(ids).logits
        want = _reference(model, ids, model.config.window)
        flat = _reference(model, ids, window=10**6)  # no window anywhere: must differ (the window matters)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, flat, atol=1e-3)


def test_each_layer_kind_is_checked():
    """The odd layers (sliding = false) get a wider output: the checker types that layer kind too and refuses it,
    though layer 0 alone would pass."""
    bad = SPEC.read_text().replace("        return x + out(merge_heads(y))", "        return out(merge_heads(y))")
    bad = bad.replace("    out = Linear(dim, dim)", "    out = Linear(dim, dim if sliding else 2 * dim)")
    with pytest.raises(DslcError) as info:
        check_source(bad, "bad.model")
    messages = [d.message for d in info.value.diagnostics]
    assert any("[B, T, 2 * dim]" in m for m in messages), messages


def test_the_layer_index_exists_only_in_a_repeat():
    bad = SPEC.read_text().replace("    head = Linear(dim, vocab_size)", "    head = Linear(dim + i, vocab_size)")
    with pytest.raises(DslcError) as info:
        check_source(bad, "bad.model")
    assert any(d.code == "E010" and "`i`" in d.message for d in info.value.diagnostics)


# ---- a list-typed config field picks each layer's kind (HF's layer_types) ----------------------------------------
LISTS = ROOT / "tests" / "specs" / "layer_types.model"


@pytest.fixture(scope="module")
def lists_pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("layer_types"), (LISTS, "layer_types_pkg")):
        yield importlib.import_module("layer_types_pkg")


def test_layer_types_from_the_spec_and_from_config_json(lists_pkg, tmp_path):
    import json

    model = lists_pkg.M(lists_pkg.C())
    assert [layer.sliding for layer in model.layers] == [True, False, True, False]
    config = lists_pkg.C(layer_types=["full_attention"] * 4)
    assert [layer.sliding for layer in lists_pkg.M(config).layers] == [False] * 4
    (tmp_path / "config.json").write_text(json.dumps({"layer_types": ["sliding_attention", 3]}))
    with pytest.raises(lists_pkg.ConfigError, match="layer_types"):
        lists_pkg.C.from_pretrained(tmp_path)
    modeling = (Path(lists_pkg.__file__).parent / "modeling.py").read_text()
    assert 'Block(config, config.layer_types[i] == "sliding_attention") for i in range(config.n)' in modeling


def test_layer_types_are_checked_for_every_layer():
    """Five layers but four layer types: the spec's `require len(layer_types) == n` refuses it; without that
    require, the index past the list is found by check at the layer that reads it."""
    with pytest.raises(DslcError) as info:
        check_source(LISTS.read_text(), "lists.model", overrides={"n": "5"})
    assert [d.message for d in info.value.diagnostics] == ["requirement failed: layer_types names one kind per layer"]
    unguarded = LISTS.read_text().replace(
        '    require len(layer_types) == n, "layer_types names one kind per layer"\n', ""
    )
    with pytest.raises(DslcError) as info:
        check_source(unguarded, "lists.model", overrides={"n": "5"})
    assert any("out of range" in d.message for d in info.value.diagnostics), [d.message for d in info.value.diagnostics]
    checked = check_source(
        LISTS.read_text(), "lists.model", overrides={"layer_types": '["full_attention", "x", "y", "z"]'}
    )
    assert checked.config_eval.values["layer_types"][0] == "full_attention"
    with pytest.raises(DslcError):
        check_source(LISTS.read_text(), "lists.model", overrides={"layer_types": "[1, 2]"})  # not a list[str]


def test_index_and_list_types_read_back_from_the_ir_text():
    from dslc.ir.printer import print_program
    from dslc.ir.reader import read_program

    program = check_source(LISTS.read_text(), "lists.model").program
    assert read_program(print_program(program)) == program
