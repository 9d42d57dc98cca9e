"""Mixture of experts before anything runs: the routing primitives' type rules, the `router` line and the
`{j}` / `stack` checkpoint rules are checked by `dslc check` (each error with its code and place), survive the
IR text round trip, and the package's rule inversion writes every rule of `checkpoint:` back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dslc.api import check_file, check_source
from dslc.diagnostics import DslcError
from dslc.ir import ops
from dslc.ir.printer import print_program
from dslc.ir.reader import read_program

ROOT = Path(__file__).resolve().parents[1]

SPEC = """use std

config C:
    dim: int = 16
    vocab: int = 50
    experts: int = 4
    k: int = 2
    inner: int = 8
    coef: float = 0.01

module Experts:
    gate_up: [experts, 2 * inner, dim] = normal(std = 0.02)
    down: [experts, dim, inner] = normal(std = 0.02)

    forward(x: [N, dim], chosen: [N, K] i64, w: [N, K] f32) -> [N, dim]:
        rows, slots, counts = moe_dispatch(x, chosen, experts)
        g, u = chunk(grouped_linear(rows, gate_up, counts), 2, dim = -1)
        return moe_combine(grouped_linear(silu(g) * u, DOWN, counts), slots, w)

module Moe:
    gate = Linear(dim, experts)
    experts = Experts()

    forward(x: [B, T, dim]) -> [B, T, dim]:
        h = reshape(x, [B * T, dim])
        top, chosen = topk(softmax(cast(gate(h), f32), dim = -1), k)
        return reshape(experts(h, chosen, top), [B, T, dim])

model M(C): causal_lm
    embed = Embedding(vocab, dim)
    layers = repeat(2, Moe())
    head = Linear(dim, vocab)
    ROUTER

    forward(ids: [B, T] i64) -> [B, T, vocab]:
        x = embed(ids)
        for layer in layers:
            x = x + layer(x)
        return head(x)
"""
ROUTER = 'router "layers.{i}.gate": num_experts = experts, top_k = k, coef = coef'


def _spec(down: str = "down", router: str = ROUTER, tail: str = "") -> str:
    return SPEC.replace("DOWN", down).replace("ROUTER", router) + tail


def _error(text: str) -> tuple[str, str, int]:
    with pytest.raises(DslcError) as e:
        check_source(text, "moe.model")
    d = e.value.diagnostics[0]
    return d.code, d.message, d.span.line


def test_the_sparse_spec_checks_and_types_each_step():
    c = check_source(_spec(), "moe.model")
    assert c.program.router is not None and c.program.router.pattern == "layers.{i}.gate"


def test_routing_ops_are_declared_once_with_their_index_results():
    assert {"topk", "moe_dispatch", "grouped_linear", "moe_combine"} <= set(ops.OPS)
    assert ops.index_results("topk") == (1,)
    assert ops.index_results("moe_dispatch") == (1, 2)
    assert ops.index_results("grouped_linear") == () and ops.OPS["grouped_linear"].grad == "autograd"
    assert ops.OPS["silu"].grad == "rule"
    assert not ({"moe_dispatch", "grouped_linear", "moe_combine"} & ops.FUSABLE)


@pytest.mark.parametrize(
    "down,code,words",
    [
        ("gate_up", "E033", "row width 8 does not match in_features 16"),  # [E, 2I, D] where [E, D, I] belongs
        ("cast(down, f32)", "E032", "`grouped_linear` mixes dtypes"),
    ],
)
def test_grouped_linear_shapes_and_dtypes(down, code, words):
    got_code, message, line = _error(_spec(down=down))
    assert (got_code, line) == (code, 18) and words in message, message


@pytest.mark.parametrize(
    "before,after,code,words",
    [
        ("moe_dispatch(x, chosen, experts)", "moe_dispatch(x, w, experts)", "E032", "must be integer indices"),
        ("moe_dispatch(x, chosen, experts)", "moe_dispatch(x, chosen, 0)", "E041", "positive int"),
        ("moe_dispatch(x, chosen, experts)", "moe_dispatch(x, reshape(chosen, [-1]), experts)", "E031", "[N, k]"),
        ("slots, w)", "slots, cast(chosen, i64))", "E032", "weights must be floating point"),
    ],
)
def test_dispatch_and_combine_errors(before, after, code, words):
    got_code, message, _ = _error(_spec().replace(before, after))
    assert got_code == code and words in message, message


def test_combine_counts_slots_against_the_weights():
    text = _spec().replace("return moe_combine(", "return moe_combine(x, slots, w) + 0.0 * moe_combine(")
    code, message, line = _error(text)
    assert (code, line) == ("E030", 18) and "moe_combine" in message, message


@pytest.mark.parametrize(
    "router,code,words",
    [
        ('router "layers.{i}.gaet": num_experts = experts, top_k = k, coef = coef', "E010", "layers.{i}.gate"),
        ('router "layers.{i}.gate": num_experts = experts, top_k = k', "E040", "needs `coef`"),
        ('router "layers.{i}.gate": num_experts = experts, topk = k, coef = coef', "E040", "did you mean `top_k`"),
        ('router "layers.{i}.gate": num_experts = experts, top_k = 5, coef = coef', "E041", "from 1 to num_experts"),
        ('router "layers.{i}.gate": num_experts = experts, top_k = k, coef = -1.0', "E041", "coef"),
        ('router "layers.{i}.gate": num_experts = experts, top_k = kk, coef = coef', "E010", "`kk`"),
        ('router "layers.{j}.gate": num_experts = experts, top_k = k, coef = coef', "E050", "`{j}`"),
    ],
)
def test_router_line_errors(router, code, words):
    with pytest.raises(DslcError) as e:
        check_source(_spec(router=router), "moe.model")
    d = e.value.diagnostics[0]
    text = " ".join([d.message, *d.help])
    assert (d.code, d.span.line) == (code, 33), d
    assert words in text, text


def test_a_router_outside_the_model_is_refused():
    text = _spec(router="").replace("    experts = Experts()\n", "    experts = Experts()\n    " + ROUTER + "\n")
    code, message, _ = _error(text)
    assert code == "E041" and "output of the model" in message


def test_a_named_layout_and_the_router_survive_the_ir_text():
    tail = (
        '\ncheckpoint:\n    "h.{i}.e.{j}.w1", "h.{i}.e.{j}.w3" -> stack(dim = 0) -> concat(dim = 1) -> "layers.{i}.experts.gate_up"\n'
        '\ncheckpoint "native":\n    "h.{i}.g" -> "layers.{i}.gate.weight"\n'
    )
    c = check_source(_spec(tail=tail), "moe.model")
    layouts = [r.layout for r in c.program.checkpoint.rules]
    assert layouts == [None, "native"]
    for p in (c.program, check_file(str(ROOT / "models" / "mixtral.model")).program):
        text = print_program(p)
        assert read_program(text) == p
        assert "router " in text


def _checkpoint_module():
    spec = importlib.util.spec_from_file_location("ckpt_template", ROOT / "templates" / "package" / "checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_write_state_inverts_every_rule_of_the_hf_section():
    torch = pytest.importorskip("torch")
    ck = _checkpoint_module()
    state = {
        "l.0.gate_up": torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2),  # 3 experts, [2 x 2] parts
        "l.0.qkv": torch.arange(6.0).reshape(3, 2),
        "l.0.a": torch.ones(2),
        "l.0.b": torch.zeros(3),
        "l.0.named": torch.ones(1),
    }
    rules = [
        {
            "sources": ["h.{i}.e.{j}.w1", "h.{i}.e.{j}.w3"],
            "transforms": [("stack", {"dim": 0}), ("concat", {"dim": 1})],
            "targets": ["l.{i}.gate_up"],
            "save": True,
        },
        {
            "sources": ["h.{i}.q", "h.{i}.k", "h.{i}.v"],
            "transforms": [("concat", {"dim": 0})],
            "targets": ["l.{i}.qkv"],
            "save": True,
        },
        {
            "sources": ["h.{i}.ab"],
            "transforms": [("split", {"dim": 0})],
            "targets": ["l.{i}.a", "l.{i}.b"],
            "save": True,
        },
        {"sources": ["foreign.{i}"], "transforms": [], "targets": ["l.{i}.named"], "save": False},
    ]
    out = ck.write_state(state, rules, {})
    assert sorted(out) == sorted(
        [f"h.0.e.{j}.w{n}" for j in range(3) for n in (1, 3)] + ["h.0.q", "h.0.k", "h.0.v", "h.0.ab", "l.0.named"]
    )
    torch.testing.assert_close(out["h.0.e.2.w3"], state["l.0.gate_up"][2, 2:])
    torch.testing.assert_close(out["h.0.k"], state["l.0.qkv"][1:2])
    torch.testing.assert_close(out["h.0.ab"], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    assert len({t.untyped_storage().data_ptr() for t in out.values()}) == len(out)  # safetensors refuses shared storage

    # and reading the files back through the same rules gives the parameters again
    class Reader:
        def __init__(self, tensors):
            self.tensors, self.location, self.renamed = tensors, dict.fromkeys(tensors, "x"), {}

        def keys(self):
            return list(self.tensors)

        def align_prefix(self, wanted):
            return None

        def header(self, key):
            return "F32", list(self.tensors[key].shape)

        def get(self, key):
            return self.tensors[key]

    shapes = {k: v.shape for k, v in state.items() if k != "l.0.named"}
    back, problems = ck.read_state(
        Reader({k: v for k, v in out.items() if k != "l.0.named"}), shapes, rules[:3], [], {}
    )
    assert problems == []
    for k in shapes:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)


def test_the_package_equals_a_row_by_row_reference(tmp_path):
    """The generated MoE code (sort, grouped matmul, index_add) against tests/ir_reference.py's definitions
    evaluated one row at a time: outputs and every gradient."""
    torch = pytest.importorskip("torch")
    import importlib

    from ir_reference import Reference
    from packages import built_packages
    from test_differential import close, forward_backward

    spec = tmp_path / "moe_ref.model"
    spec.write_text(_spec())
    with built_packages(tmp_path / "build", (spec, "moe_ref")):
        pkg = importlib.import_module("moe_ref")
        model = pkg.M(pkg.C()).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        params = dict(model.named_parameters())
        ids = torch.randint(0, 50, (2, 7), generator=gen)
        want, want_grads, grads_out = forward_backward(
            Reference(check_source(_spec(), "moe.model").program, params), params, [ids], None
        )
        got, got_grads, _ = forward_backward(model.forward_graph, params, [ids], grads_out)
    close(got[0], want[0], "logits")
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        close(got_grads[name], g, f"gradient of {name}")


def test_router_stays_free_as_a_member_name_and_a_misspelt_line_is_e001():
    renamed = _spec(router="").replace("    gate = Linear(dim, experts)", "    router = Linear(dim, experts)")
    check_source(renamed.replace("gate(h)", "router(h)"), "moe.model")  # `router` is not a reserved word
    code, message, line = _error(_spec(router=ROUTER.replace("router", "ruoter", 1)))
    assert (code, line) == ("E001", 33) and "unexpected string after `ruoter`" in message
