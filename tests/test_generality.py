"""Generality: layer variants written only in the DSL get fused kernels with no hand kernel code.

tests/specs/gemma_like.model is a small Gemma-style decoder: Gemma's offset RMSNorm `norm(x) * (1 + w)`,
a LayerNorm with bias, a gelu_tanh gated MLP, sqrt(hidden)-scaled embeddings, soft-capped attention
logits and a final logit soft-cap `cap * tanh(logits / cap)` written as elementwise ops. These tests
check that
  - the fusion pass forms regions out of each variant's ops (the report is printed for the log);
  - the generated Triton module holds exactly one forward and one backward kernel per region, named
    after the region, and each kernel computes its region's op list (no per-layer hand kernels);
  - the PyTorch path agrees with an independent plain-torch implementation of the same model (logits,
    loss, gradients; one block in bfloat16), so the spec's semantics are checked, not only consistency;
  - the Triton path (the interpreter on CPU) agrees with the PyTorch path: logits, loss and every
    parameter's gradient, in training mode with labels.
"""

from __future__ import annotations

import ast
import copy
import importlib
import math
import os
import re
import sys
from pathlib import Path

import pytest
from packages import built_packages

torch = pytest.importorskip("torch")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton path runs on the CPU

import torch.nn.functional as F  # noqa: E402

from dslc.api import check_file  # noqa: E402
from dslc.passes.pipeline import optimize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "gemma_like.model"
PKG = "gemma_like"
# small caps so both soft-caps saturate with the random weights below (Gemma 2 uses 50 and 30)
ATTN_CAP, FINAL_CAP = 1.5, 2.0
B, T = 2, 8


# ---- the fusion report ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    rep = optimize(check_file(SPEC).program).report
    print("\nfusion report for", SPEC.name)
    for module, name, region, nbytes in rep.regions:
        ops = " ".join(o.op for o in region.ops)
        print(f"  {module:22} {name:44} {ops}   [{region.source}]  bytes/row {nbytes['before']} -> {nbytes['after']}")
    for module, where, why in rep.rejected:
        print(f"  not fused: {module:22} {where:22} {why}")
    return rep


def _regions(rep, module: str):
    return [r for m, _, r, _ in rep.regions if m == module]


def _producers(region) -> dict:
    return {o.result: o for o in region.ops}


def _is_weight_offset(region, op) -> bool:
    """`add(1.0, w)` where w is a weight input or a cast of one: the `1 + weight` of Gemma's RMSNorm."""
    if op.op != "add" or 1.0 not in op.args:
        return False
    other = next(a for a in op.args if a != 1.0)
    prod = _producers(region).get(other)
    if prod is not None and prod.op == "cast":
        other = prod.args[0]
    return isinstance(other, str) and other in {i.name for i in region.inputs} and "weight" in other


def _has_rms_core(region) -> bool:
    ops = [o.op for o in region.ops]
    return "mean" in ops and "rsqrt" in ops and "sub" not in ops


def _spec_line(text: str) -> str:
    lines = SPEC.read_text().splitlines()
    return f"{SPEC.name}:{next(i for i, line in enumerate(lines, 1) if text in line)}"


def test_fusion_report_has_every_variant(report):
    # Gemma's offset RMSNorm fuses in its own forward, alone and with the residual add before it (its
    # `residual=` form): the row reduction (mean, rsqrt) and `1 + weight` in each
    layer = _regions(report, "OffsetRMSNorm")
    rms = [r for r in layer if _has_rms_core(r)]
    offsets = [r for r in layer if any(_is_weight_offset(r, o) for o in r.ops)]
    assert sorted(r.name for r in rms) == ["offset_rms_norm", "offset_rms_norm_residual"], [r.name for r in rms]
    (residual,) = [r for r in rms if r.name.endswith("_residual")]
    assert residual.ops[0].op == "add" and len(residual.outputs) == 2, "the residual add and both outputs"
    assert len(offsets) == 2, f"expected both `1 + weight` epilogues fused, got {[r.name for r in offsets]}"
    for r in offsets:
        ops = [o.op for o in r.ops]
        assert "mul" in ops and ops[-1] == "cast", (
            f"{r.name}: the offset weight must scale the normed row and cast back"
        )

    # LayerNorm with bias: mean, centre, variance, rsqrt, weight and bias in one region
    (ln,) = [r for r in _regions(report, "LayerNorm") if "rsqrt" in [o.op for o in r.ops]]
    ops = [o.op for o in ln.ops]
    assert ops.count("mean") == 2 and "sub" in ops and "rsqrt" in ops, ops
    inputs = {i.name for i in ln.inputs}
    bias = [i for i in inputs if "bias" in i]
    weight = [i for i in inputs if "weight" in i]
    assert bias and weight, f"{ln.name}: weight and bias must be region inputs, got {sorted(inputs)}"
    assert any(o.op == "add" and bias[0] in o.args for o in ln.ops), f"{ln.name}: no `+ bias`"
    assert any(o.op == "mul" and weight[0] in o.args for o in ln.ops), f"{ln.name}: no `* weight`"

    # gelu_tanh(gate) * up
    mlp = [r for r in _regions(report, "GeluGatedMLP") if any(o.op == "gelu_tanh" for o in r.ops)]
    assert len(mlp) == 1, [r.name for r in _regions(report, "GeluGatedMLP")]
    gelu = next(o for o in mlp[0].ops if o.op == "gelu_tanh")
    assert any(o.op == "mul" and gelu.result in o.args for o in mlp[0].ops), "gelu_tanh(gate) * up is not one region"

    # the final logit soft-cap: cap * tanh(logits / cap), one scalar cap
    (cap,) = _regions(report, "GemmaLikeForCausalLM")
    assert [o.op for o in cap.ops] == ["div", "tanh", "mul"], [o.op for o in cap.ops]
    div, tanh, mul = cap.ops
    scalars = {i.name for i in cap.inputs if i.kind == "scalar"}
    assert div.args[1] in scalars and tanh.args == (div.result,) and set(mul.args) == {div.args[1], tanh.result}

    # none of the variants' own lines was left unfused
    for text in ("gelu_tanh(gate_proj(x))", "tanh(logits / final_logit_softcapping)"):
        where = _spec_line(text)
        assert not [r for r in report.rejected if r[1] == where], f"{where} left unfused: {report.rejected}"


def test_offset_rmsnorm_is_one_region(report):
    layer = _regions(report, "OffsetRMSNorm")
    whole = [r for r in layer if _has_rms_core(r) and any(_is_weight_offset(r, o) for o in r.ops)]
    assert len(whole) == 2, (
        "each offset RMSNorm (mean, rsqrt, `1 + weight`, cast back) should be one region: "
        + ", ".join(f"{r.name}: {' '.join(o.op for o in r.ops)}" for r in layer)
    )


# ---- the generated package -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    try:
        with built_packages(tmp_path_factory.mktemp("generality"), (SPEC, None)):
            yield importlib.import_module(PKG)
    finally:
        for name in [n for n in sys.modules if n == PKG or n.startswith(PKG + ".")]:
            del sys.modules[name]


def _region_names(kernels_source: str) -> set[str]:
    """Regions of the generated kernels.py: each has `<name>` and its PyTorch rendering `<name>_torch`."""
    defs = {n.name for n in ast.parse(kernels_source).body if isinstance(n, ast.FunctionDef)}
    return {d for d in defs if f"{d}_torch" in defs}


def test_kernels_come_from_region_op_lists(pkg, report):
    folder = Path(pkg.__file__).parent
    regions = {name: r for _, name, r, _ in report.regions}
    assert _region_names((folder / "kernels.py").read_text()) == set(regions)

    source = (folder / "kernels_triton.py").read_text()
    tree = ast.parse(source)
    jitted = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and any(ast.unparse(d).startswith("triton.jit") for d in n.decorator_list)
    ]
    # regions whose calls the region-group pass paired (`<name>_x2` in kernels.py) also get the body as a
    # `_rows` function and a two-problem `_kernel_x2`
    grouped = {name for name in regions if f"def {name}_x2(" in (folder / "kernels.py").read_text()}
    assert grouped, "q and k rope should launch together"
    expected = {f"{name}_{kind}_kernel" for name in regions for kind in ("fwd", "bwd")}
    expected |= {
        f"{name}_{kind}_{what}" for name in grouped for kind in ("fwd", "bwd") for what in ("rows", "kernel_x2")
    }
    names = [n.name for n in jitted]
    assert sorted(names) == sorted(expected), "one forward and one backward kernel per region, nothing else"

    # every top-level name is a region's (its kernels, autograd Function, launcher): nothing per layer
    camel = {"".join(p.capitalize() for p in name.split("_")): name for name in regions}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            base = re.sub(
                r"(_(fwd|bwd)_(kernel|kernel_x2|rows)|_x2_triton|_triton|PairFunction|Function)$", "", node.name
            )
            assert base in regions or base in camel, f"{node.name} is not named after a fused region"
    # region names come from the spec's modules and values, so the only layer words are the spec's own
    modules = {
        "decoder_layer",
        "attention",
        "gelu_gated_mlp",
        "gemma_like_model",
        "gemma_like_for_causal_lm",
        "offset_rms_norm",
        "layer_norm",
    }
    for name in regions:
        assert any(name == m or name.startswith(m + "_") for m in modules), f"region {name} is not named after a module"
    runtime = (folder / "kernels_runtime.py").read_text()
    helpers = [n.name for n in ast.parse(runtime).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not [h for h in helpers if re.search(r"norm|gelu|softcap|rope|silu", h, re.I)], helpers

    # each forward kernel computes its region's ops, in order (the generator comments each line with its op)
    by_name = {n.name: n for n in jitted}
    for name, region in regions.items():
        body = ast.get_source_segment(source, by_name[f"{name}_fwd_{'rows' if name in grouped else 'kernel'}"])
        pos = 0
        for op in region.ops:
            m = re.search(rf"# \[.*?\] {op.op}\(", body[pos:])
            assert m, f"{name}: forward kernel does not compute `{op.result} = {op.op}(...)` in order"
            pos += m.end()


# ---- an independent plain-torch implementation of the spec --------------------------------------------
def _rope(pos, dim, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device).float() / dim)
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()  # [B, T, dim] f32


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def gemma_rmsnorm(x, w, eps):
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), in float32, cast back."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def _attention(x, P, pre, cfg, cos, sin, softcap):
    b, t, _ = x.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = F.linear(x, P[pre + "q_proj.weight"]).view(b, t, H, D).transpose(1, 2)
    k = F.linear(x, P[pre + "k_proj.weight"]).view(b, t, KV, D).transpose(1, 2)
    v = F.linear(x, P[pre + "v_proj.weight"]).view(b, t, KV, D).transpose(1, 2)
    c, s = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).float().softmax(-1).to(x.dtype)
    return F.linear((probs @ v).transpose(1, 2).reshape(b, t, H * D), P[pre + "o_proj.weight"])


def ref_block(x, P, i, cfg, cos, sin, softcap):
    pre = f"model.layers.{i}."
    x = x + _attention(
        gemma_rmsnorm(x, P[pre + "input_layernorm.weight"], cfg.rms_norm_eps),
        P,
        pre + "self_attn.",
        cfg,
        cos,
        sin,
        softcap,
    )
    h = gemma_rmsnorm(x, P[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    gate, up = F.linear(h, P[pre + "mlp.gate_proj.weight"]), F.linear(h, P[pre + "mlp.up_proj.weight"])
    return x + F.linear(F.gelu(gate, approximate="tanh") * up, P[pre + "mlp.down_proj.weight"])


def ref_logits(P, cfg, ids, attn_softcap):
    x = F.embedding(ids, P["model.embed_tokens.weight"]) * cfg.hidden_size**0.5
    cos, sin = _rope(torch.arange(ids.shape[1], device=ids.device).expand_as(ids), cfg.head_dim, cfg.rope_theta)
    for i in range(cfg.num_hidden_layers):
        x = ref_block(x, P, i, cfg, cos, sin, attn_softcap)
    x = F.layer_norm(x.float(), (cfg.hidden_size,), eps=cfg.layer_norm_eps).to(x.dtype)
    x = x * P["model.norm.weight"] + P["model.norm.bias"]
    logits = F.linear(x, P["lm_head.weight"])
    cap = cfg.final_logit_softcapping
    return cap * torch.tanh(logits / cap)


def ref_loss(logits, labels):
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def _params(model) -> dict:
    """Parameters by checkpoint name (the module tree's names)."""
    return dict(model.named_parameters())


# ---- the model under test ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(pkg):
    config = pkg.GemmaLikeConfig(attn_logit_softcapping=ATTN_CAP, final_logit_softcapping=FINAL_CAP)
    m = pkg.GemmaLikeForCausalLM(config)
    assert (m.config.vocab_size, m.config.hidden_size, m.config.num_hidden_layers) == (96, 32, 2)
    # random everything, norms included: ones / zeros (the default init) would hide a wrong weight path
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in sorted(m.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            p.copy_(r * 0.5 if p.ndim == 1 else r * 1.5 / math.sqrt(p.shape[-1]))
    return m.to(DEVICE).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids.to(DEVICE), labels.to(DEVICE)


@pytest.fixture(scope="module")
def kernels(pkg):
    k = importlib.import_module(f"{PKG}.kernels")
    yield k
    k.set_backend("auto")


def _run(model, kernels, backend, ids, labels):
    """Training-mode forward + backward on one backend: (eval logits, loss, {param: grad})."""
    kernels.set_backend(backend)
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        out = model(ids, labels=labels)
        out.loss.backward()
    finally:
        model.eval()
        kernels.set_backend("auto")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert out.logits is None, "training with labels must take the fused loss (the soft-cap inside its chunks)"
    kernels.set_backend(backend)
    try:
        with torch.no_grad():
            logits = model(ids).logits  # eval: the capped logits, the final cap's region on this backend
    finally:
        kernels.set_backend("auto")
    return logits, out.loss.detach(), grads


def test_torch_path_matches_plain_torch_reference(model, kernels, batch):
    ids, labels = batch
    kernels.set_backend("torch")
    try:
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels)
        out.loss.backward()
    finally:
        kernels.set_backend("auto")
    params = list(model.parameters())
    ref = ref_logits(_params(model), model.config, ids, ATTN_CAP)
    loss = ref_loss(ref, labels)
    ref_grads = torch.autograd.grad(loss, params)

    torch.testing.assert_close(out.logits, ref)
    torch.testing.assert_close(out.loss, loss)
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        assert p.grad is not None, f"no gradient reached {name}"
        torch.testing.assert_close(p.grad, g, msg=lambda m, n=name: f"gradient of {n}: {m}")

    # both soft-caps are live: logits reach toward the final cap, and the attention cap changes the result
    assert out.logits.abs().max() > 0.9 * FINAL_CAP and out.logits.abs().max() <= FINAL_CAP
    with torch.no_grad():
        uncapped = ref_logits(_params(model), model.config, ids, None)
    assert (uncapped - out.logits).abs().max() > 1e-2, "the attention soft-cap does not change the logits"


def test_one_block_in_bf16_matches_reference(pkg, model):
    """One DecoderLayer on the PyTorch path in bfloat16 against the hand-written block (norms in float32)."""
    attention = importlib.import_module(f"{PKG}.attention")
    layer = copy.deepcopy(model.model.layers[0]).to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(B, T, model.config.hidden_size, generator=g) * 3).to(DEVICE, torch.bfloat16)
    cos, sin = _rope(torch.arange(T, device=DEVICE).expand(B, T), model.config.head_dim, model.config.rope_theta)
    ctx = attention.AttentionContext(None, torch.arange(T, device=DEVICE))
    P = {k: v.detach().to(torch.bfloat16) for k, v in _params(model).items()}
    with torch.no_grad():
        got = layer(x, cos, sin, ctx)
        # the norm module on its own (the un-inlined rendering) is exactly Gemma's formula in float32
        ref_norm = gemma_rmsnorm(x, P["model.layers.0.input_layernorm.weight"], model.config.rms_norm_eps)
        got_norm = layer.input_layernorm(x)
    assert got.dtype == torch.bfloat16 and got_norm.dtype == torch.bfloat16
    torch.testing.assert_close(got_norm, ref_norm, rtol=0, atol=0)
    with torch.no_grad():
        ref = ref_block(x, P, 0, model.config, cos, sin, ATTN_CAP)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=4e-2)


def test_triton_path_matches_torch_path(pkg, model, kernels, batch):
    """Every fused region through its generated Triton kernels, in training mode with labels."""
    pytest.importorskip("triton", reason="triton is not installed")
    ids, labels = batch
    # the model ends in a soft-cap after its Linear head: the fused chunked loss caps each chunk
    assert pkg.GemmaLikeForCausalLM.loss_head == ("lm_head", "weight", "bias")
    assert model.logit_softcap() == FINAL_CAP
    t_logits, t_loss, t_grads = _run(model, kernels, "torch", ids, labels)
    k_logits, k_loss, k_grads = _run(model, kernels, "triton", ids, labels)
    assert sys.modules.get(f"{PKG}.kernels_triton") is not None, "the Triton path did not run"
    torch.testing.assert_close(k_logits, t_logits)
    torch.testing.assert_close(k_loss, t_loss)
    torch.testing.assert_close(t_loss, ref_loss(t_logits, labels))
    assert set(k_grads) == set(t_grads)
    for name, g in t_grads.items():
        torch.testing.assert_close(k_grads[name], g, msg=lambda m, n=name: f"gradient of {n}: {m}")
