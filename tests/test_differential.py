"""Differential test: generated packages against a direct evaluation of the unoptimized IR.

Many small specs, some written out (the shapes of past miscompiles: two calls of one submodule whose results
are not named, a `[1]` flag computed beside an embedding scale, a row sum of a per-row value, user variables
named like the generated code's own names) and the rest generated from a seeded random program builder
(chains of elementwise ops, broadcasts of [B, T, d] against [d], [1] and [B, T, 1], reductions, casts,
residual adds before norms, repeated submodule and fn calls, unrelated lines side by side). Each spec is
built with dslc into a package and run on both region backends (`kernels.set_backend("torch")` and
`("triton")`, the latter under TRITON_INTERPRET=1 on the CPU), forward and backward; the outputs and the
gradients of every input and parameter are compared with `tests/ir_reference.py`, which walks the checked
program before any pass ran and evaluates each primitive with torch, sharing the package's parameter tensors.

Only the model's outputs and gradients are compared, so the test does not depend on which module a fused
region ends up in or how the passes are arranged.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the Triton path runs on the CPU

import importlib
import random
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ir_reference import Reference  # noqa: E402

from dslc.api import check_file  # noqa: E402
from dslc.build import build  # noqa: E402
from dslc.passes.pipeline import optimize  # noqa: E402

B, T, D, V = 2, 3, 8, 11
PREFIX = "dslc_diff_"

HEADER = f"""use std

config C:
    d: int = {D}
    v: int = {V}
"""

SHAPES = {"full": "[B, T, d]", "row": "[B, T, 1]", "vec": "[d]", "one": "[1]"}  # a generated value's type


@dataclass
class Case:
    name: str
    text: str  # the whole spec
    args: tuple  # the model's forward arguments: (shape, dtype) each


def model(forward_args: str, body: str, members: str = "", modules: str = "") -> str:
    """A spec: `modules`, then `model M(C): base` with `members` and a forward over `forward_args`."""
    members = "".join(f"    {m.strip()}\n" for m in members.strip().splitlines() if m.strip())
    body = "".join(f"        {line.rstrip()}\n" for line in body.strip().splitlines() if line.strip())
    args, result = forward_args.split(" -> ")
    return f"{HEADER}\n{modules.strip()}\n\nmodel M(C): base\n{members}\n    forward({args}) -> {result}:\n{body}"


def args_of(forward: str) -> tuple[tuple[tuple[int, ...], str], ...]:
    """(shape, dtype) of each forward argument, from `x: [B, T, d], ids: [B, T] i64 -> ...`."""
    sizes = {"B": B, "T": T, "d": D, "v": V}
    out = []
    for dims, dtype in re.findall(r"\w+: \[([^\]]*)\] ?(\w*)", forward.split("->")[0]):
        out.append((tuple(sizes[x] if x in sizes else int(x) for x in dims.split(", ")), dtype or "float"))
    return tuple(out)


def case(name: str, forward: str, body: str, members: str = "", modules: str = "") -> Case:
    return Case(name, model(forward, body, members, modules), args_of(forward))


# ---- written-out cases ----------------------------------------------------------------------------------------
LEAF_SCALE = """
module Scale:
    w: [d] = ones

    forward(x: [B, T, d]) -> [B, T, d]:
        h = x * w
        return h + 1.0
"""
BLOCK = """
module Block:
    proj = Linear(d, d)
    norm = RMSNorm(d)

    forward(x: [B, T, d]) -> [B, T, d]:
        return x + silu(proj(norm(x)))
"""
GATE_FN = """
fn gate(a: [..., D], b: [..., D]) -> [..., D]:
    h = silu(a)
    return h * b
"""

XY = "x: [B, T, d], y: [B, T, d]"
XR = "x: [B, T, d], r: [B, T, 1]"

WRITTEN = [
    # two unnamed calls of one submodule: one Python name for both results computed the wrong numbers
    case("repeated_call", "x: [B, T, d] -> [B, T, d]", "return silu(proj(x)) * proj(x * 2.0)", "proj = Linear(d, d)"),
    case(
        "repeated_call_3x",
        f"{XY} -> [B, T, d]",
        "return proj(x) + silu(proj(y * 2.0)) * proj(x - y)",
        "proj = Linear(d, d, bias = true)",
    ),
    case("repeated_block_call", "x: [B, T, d] -> [B, T, d]", "return blk(x) * blk(x * 0.5)", "blk = Block()", BLOCK),
    case("repeated_leaf_module", f"{XY} -> [B, T, d]", "return sc(x) * sc(tanh(y))", "sc = Scale()", LEAF_SCALE),
    case(
        "repeated_call_swapped_use",
        f"{XY} -> ([B, T, d], [B, T, d])",
        "a = proj(x)\nb = proj(y)\nreturn tanh(b) - a, silu(a) * b",
        "proj = Linear(d, d)",
    ),
    # a spec variable with `__` beside one named like its generated form (issue 9: `y_out, y_out = ...`)
    case(
        "dunder_variable_beside_out",
        "x: [B, T, d] -> [B, T, d]",
        "y__a = p1(x)\ny_out = p2(x)\nreturn y__a * 3.0 + y_out",
        "p1 = Linear(d, d)\n    p2 = Linear(d, d)",
    ),
    # user variables named like the names the generated code makes up (`proj_out`, `proj_out_2`, `x_2`)
    case(
        "user_names_like_generated",
        "x: [B, T, d] -> [B, T, d]",
        "proj_out = x * 2.0\nproj_out_2 = silu(x) + 1.0\nx_2 = proj(x) * proj_out\n"
        "return x_2 + proj(proj_out_2) * proj(x)",
        "proj = Linear(d, d)",
    ),
    # a [1] flag computed beside an embedding scale: it joined the scale's region, which Triton then refused
    case(
        "embedding_scale_beside_flag",
        "ids: [B, T] i64 -> ([B, T, d], [1] f32)",
        "x = emb(ids) * (d ** 0.5)\nflag = cast(g, f32) + 1.0\nreturn x, flag",
        "emb = Embedding(v, d)\ng: [1] = ones",
    ),
    case(
        "weight_only_vector_beside",
        f"{XR} -> ([B, T, d], [d] f32, [B, T, d])",
        "h = x * r\ns = cast(w, f32) * 2.0\nreturn h + 1.0, s, tanh(h)",
        "w: [d] = ones",
    ),
    case(
        "flag_beside_norm",
        "x: [B, T, d] -> ([B, T, d], [1])",
        "f = g * 3.0\nreturn norm(x * 2.0), f + 1.0",
        "norm = RMSNorm(d)\ng: [1] = ones",
    ),
    # a row sum of a per-row value: PyTorch keeps it, the Triton row kernel would add N copies: refused at build
    case(
        "row_sum_of_per_row_value",
        f"{XR} -> [B, T, d]",
        "h = x + r\nq = r * 2.0\nreturn h * sum(q, dim = -1, keepdim = true)",
    ),
    case(
        "unrelated_lines_side_by_side",
        f"{XY} -> ([B, T, d], [B, T, d])",
        "a = silu(x) * 2.0\nb = tanh(y) + 1.0\nc = a * x\nreturn c, b * y",
    ),
    case("shared_input_siblings", f"{XY} -> [B, T, d]", "a = x * 2.0\nb = x + y\nc = exp(tanh(x))\nreturn a * b - c"),
    case(
        "broadcasts",
        f"{XR} -> ([B, T, d], [B, T, 1])",
        "h = x * r + w\nm = mean(h, dim = -1, keepdim = true)\nreturn (h - m) * g, m * r",
        "w: [d] = ones\ng: [1] = ones",
    ),
    case("residual_rmsnorm", f"{XY} -> ([B, T, d], [B, T, d])", "h = x + y\nreturn norm(h), h", "norm = RMSNorm(d)"),
    case(
        "residual_layernorm",
        f"{XY} -> [B, T, d]",
        "h = x + proj(y)\nreturn ln(h) * 2.0",
        "proj = Linear(d, d)\nln = LayerNorm(d)",
    ),
    case("offset_rmsnorm", f"{XY} -> [B, T, d]", "return norm(x + y) + norm(x)", "norm = OffsetRMSNorm(d)"),
    case(
        "two_norms_one_input", "x: [B, T, d] -> [B, T, d]", "return n1(x) * n2(x)", "n1 = RMSNorm(d)\nn2 = RMSNorm(d)"
    ),
    case(
        "softmax_by_hand",
        "x: [B, T, d] -> [B, T, d]",
        "e = exp(x - amax(x, dim = -1, keepdim = true))\nreturn e / sum(e, dim = -1, keepdim = true)",
    ),
    case(
        "softcap", "x: [B, T, d] -> [B, T, d]", "s = proj(x) * 4.0\nreturn 1.5 * tanh(s / 1.5)", "proj = Linear(d, d)"
    ),
    case(
        "casts_round_trip",
        f"{XR} -> ([B, T, d], [B, T, d] f32)",
        "h = cast(x, f32)\nh = h * rsqrt(mean(h * h, dim = -1, keepdim = true) + 0.001)\n"
        "return cast(h, x.dtype) * cast(r, x.dtype), h * 2.0",
    ),
    case(
        "loop_carried_and_residual",
        "x: [B, T, d] -> [B, T, d]",
        "h = x\nfor layer in layers:\n    x = layer(x)\nreturn x * h",
        "layers = repeat(3, Block())",
        BLOCK,
    ),
    # a copy of a weight read only inside a loop body: the schedule moved it below the loop
    case(
        "loop_reads_outer_copy",
        "x: [B, T, d] -> [B, T, d]",
        "v1 = w\nv2 = x * 2.0\nfor layer in layers:\n    x = layer(x) * v1\nreturn x + v2",
        "layers = repeat(2, Block())\nw: [d] = ones",
        BLOCK,
    ),
    case("fn_called_twice", f"{XY} -> [B, T, d]", "return gate(x, y) + gate(y, x)", "", GATE_FN),
    case(
        "fn_results_kept",
        f"{XY} -> ([B, T, d], [B, T, d])",
        "a = gate(x, y)\nb = gate(a, x)\nreturn b * a, a - y",
        "",
        GATE_FN,
    ),
    case(
        "tuple_results",
        "x: [B, T, d] -> [B, T, d]",
        "a, b = chunk(x, 2, dim = -1)\nreturn concat(b * 2.0, silu(a), dim = -1)",
    ),
    case(
        "maximum_minimum_pow",
        f"{XY} -> [B, T, d]",
        "m = maximum(x, y)\nn = minimum(x, 0.25)\nreturn m * n + (abs(y) + 1.0) ** 1.5 - x ** 2.0",
    ),
    case(
        "logs_and_roots",
        "x: [B, T, d] -> [B, T, d]",
        "a = abs(x) + 1.0\nreturn log(a) + sqrt(a) * rsqrt(a + 1.0) - gelu(x) / a",
    ),
    case(
        "reduce_other_dim",
        "x: [B, T, d] -> [B, T, d]",
        "m = mean(x, dim = 1, keepdim = true)\ns = sum(x, dim = -1)\nreturn (x - m) * unsqueeze(s, -1)",
    ),
    case(
        "bias_then_activation",
        "x: [B, T, d] -> [B, T, d]",
        "return gelu_tanh(up(x)) * 0.5 + x",
        "up = Linear(d, d, bias = true)",
    ),
    case(
        "rope_heads",
        "x: [B, T, d], cos: [B, T, 4] f32, sin: [B, T, 4] f32 -> [B, T, d]",
        "q = apply_rope(split_heads(qp(x), 2), cos, sin)\nk = apply_rope(split_heads(kp(x), 2), cos, sin)\n"
        "return merge_heads(q * k)",
        "qp = Linear(d, d)\nkp = Linear(d, d)",
    ),
]


# ---- generated cases ------------------------------------------------------------------------------------------
def _join(a: str, b: str) -> str:
    """The broadcast kind of two operands."""
    if a == b:
        return a
    order = {"one": 0, "vec": 1, "row": 1, "full": 2}
    if {a, b} == {"vec", "row"}:
        return "full"
    return a if order[a] > order[b] else b


class ProgramBuilder:
    """A random forward body over x, y: [B, T, d], r: [B, T, 1] and weights w: [d], g: [1], with submodules
    proj (Linear), norm (RMSNorm), sc (a leaf module), a repeat stack `layers` and a fn `gate`, all called
    possibly more than once."""

    UNARY = ["tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "relu", "cos", "sin", "abs", "erf"]

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pool = [("x", "full"), ("y", "full"), ("r", "row"), ("w", "vec"), ("g", "one")]

    def leaf(self) -> tuple[str, str]:
        names = [p for p in self.pool if p[1] != "one" or self.rng.random() < 0.3]
        return self.rng.choice(names)

    def expr(self, depth: int) -> tuple[str, str]:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.25:
            return self.leaf()
        pick = rng.random()
        a, ka = self.expr(depth - 1)
        if pick < 0.25:
            u = rng.choice(self.UNARY)
            return f"{u}({a})", ka
        if pick < 0.33:
            safe = rng.choice(["log", "sqrt", "rsqrt"])
            return f"{safe}(abs({a}) + 1.0)", ka
        if pick < 0.38:
            return f"exp(tanh({a}))", ka
        if pick < 0.62:
            b, kb = self.expr(depth - 1)
            op = rng.choice(["+", "-", "*", "*", "/"])
            if op == "/":
                return f"({a}) / (abs({b}) + 1.0)", _join(ka, kb)
            return f"({a}) {op} ({b})", _join(ka, kb)
        if pick < 0.70:
            c = rng.choice(["0.5", "2.0", "1.0", "3.0"])
            return rng.choice([f"({a}) * {c}", f"({a}) + {c}", f"{c} - ({a})", f"-({a})"]), ka
        if pick < 0.74:
            return rng.choice(
                [f"maximum({a}, 0.25)", f"minimum({a}, -0.5)", f"({a}) ** 2.0", f"(abs({a}) + 1.0) ** 1.5"]
            ), ka
        if pick < 0.82 and ka in ("full", "row"):
            red = rng.choice(["mean", "sum", "amax"])
            return f"{red}({a}, dim = -1, keepdim = true)", "row"
        if pick < 0.86:
            return f"cast(cast({a}, f32) * 2.0, x.dtype)", ka
        if ka == "full":
            return rng.choice([f"proj({a})", f"norm({a})", f"sc({a})", f"gate({a}, x)"]), "full"
        return f"tanh({a})", ka

    def body(self) -> tuple[str, list[tuple[str, str]]]:
        rng = self.rng
        lines, defined = [], []
        for i in range(rng.randint(2, 5)):
            e, k = self.expr(rng.randint(1, 3))
            if rng.random() < 0.2 and defined:  # rebind a name the body already used
                name = rng.choice(defined)[0]
                defined = [d for d in defined if d[0] != name]
            else:
                name = f"v{i}"
            lines.append(f"{name} = {e}")
            self.pool = [p for p in self.pool if p[0] != name] + [(name, k)]
            defined.append((name, k))
            full = [d for d in defined if d[1] == "full"]
            if full and rng.random() < 0.15:  # a repeat stack carrying one of the values
                carried = rng.choice(full)[0]
                other = rng.choice([p[0] for p in self.pool if p[1] in ("full", "row", "vec")])
                step = rng.choice([f"layer({carried})", f"layer({carried}) * {other}", f"{other} + layer({carried})"])
                lines += ["for layer in layers:", f"    {carried} = {step}"]
        last = defined[-1]
        others = [d for d in defined[:-1] if rng.random() < 0.4]
        outs = [last] + others
        return "\n".join(lines) + "\nreturn " + ", ".join(n for n, _ in outs), outs


RANDOM_MODULES = LEAF_SCALE + BLOCK + "\n" + GATE_FN
RANDOM_MEMBERS = """proj = Linear(d, d, bias = true)
norm = RMSNorm(d)
sc = Scale()
layers = repeat(2, Block())
w: [d] = ones
g: [1] = ones"""


def random_case(seed: int) -> Case:
    body, outs = ProgramBuilder(random.Random(seed)).body()
    sig = ", ".join(SHAPES[k] for _, k in outs)
    forward = f"x: [B, T, d], y: [B, T, d], r: [B, T, 1] -> {sig if len(outs) == 1 else f'({sig})'}"
    return case(f"random_{seed}", forward, body, RANDOM_MEMBERS, RANDOM_MODULES)


N_RANDOM = int(os.environ.get("DSLC_DIFF_RANDOM", "60"))  # more with DSLC_DIFF_RANDOM=n (a longer hunt)
CASES = WRITTEN + [random_case(s) for s in range(N_RANDOM)]


# ---- building and running -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every case's spec written and built into one folder: name -> (package, spec path) or the build error."""
    out = tmp_path_factory.mktemp("differential")
    specs = out / "specs"
    specs.mkdir()
    result = {}
    for c in CASES:
        path = specs / f"{c.name}.model"
        path.write_text(c.text)
        try:
            build(path, out, name=PREFIX + c.name)
            result[c.name] = path
        except Exception as e:  # reported by the case's own test
            result[c.name] = e
    sys.path.insert(0, str(out))
    yield result
    sys.path.remove(str(out))
    for name in [n for n in sys.modules if n.startswith(PREFIX)]:
        del sys.modules[name]


def make_inputs(args, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, V, shape, generator=g) if dtype == "i64" else torch.randn(shape, generator=g)
        for shape, dtype in args
    ]


def randomize(module, seed: int) -> None:
    """Random values everywhere (ones / zeros, the default inits, would hide a wrong weight path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 1.0 / p.shape[-1] ** 0.5))


def forward_backward(fn, params: dict, inputs: list, grads_out: list | None):
    """Outputs and the gradients of every float input and parameter, for output gradients `grads_out`."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grads_out is None:
        g = torch.Generator().manual_seed(99)
        grads_out = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    wrt = [x for x in leaves if x.requires_grad] + list(params.values())
    got = torch.autograd.grad(outs, wrt, grads_out, allow_unused=True)
    got = [torch.zeros_like(w) if gr is None else gr for w, gr in zip(wrt, got)]
    names = [f"input {i}" for i, x in enumerate(leaves) if x.requires_grad] + [f"param {n}" for n in params]
    return [o.detach() for o in outs], dict(zip(names, got)), grads_out


def close(got, want, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_package_matches_reference(built, c: Case, backend: str):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed (the kernels run under its interpreter)")
    path = built[c.name]
    if isinstance(path, Exception):
        raise path
    pkg = importlib.import_module(PREFIX + c.name)
    kernels = importlib.import_module(PREFIX + c.name + ".kernels")
    m = pkg.M(pkg.C()).eval()
    randomize(m, seed=len(c.name))
    params = dict(m.named_parameters())
    inputs = make_inputs(c.args, seed=7)

    ref = Reference(check_file(path).program, params)
    want, want_grads, grads_out = forward_backward(ref, params, inputs, None)

    kernels.set_backend(backend)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow on masked lanes (interpreter only)
            got, got_grads, _ = forward_backward(m.forward_graph, params, inputs, grads_out)
    finally:
        kernels.set_backend("auto")
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        close(a, b, f"{c.name} [{backend}] output {i}")
    for name, b in want_grads.items():
        close(got_grads[name], b, f"{c.name} [{backend}] gradient of {name}")


# ---- what the fusion pass did with the written-out shapes ------------------------------------------------------
def _report(name: str):
    c = next(c for c in CASES if c.name == name)
    path = Path(f"{name}.model")
    from dslc.api import check_source

    return optimize(check_source(c.text, str(path)).program, verify=True).report


def test_unconnected_flag_does_not_join_the_embedding_scale():
    rep = _report("embedding_scale_beside_flag")
    for _, _, region, _ in rep.regions:
        ops = [o.op for o in region.ops]
        assert not ("mul" in ops and "cast" in ops), f"{region.name} mixes the scale and the flag: {ops}"


def test_region_triton_cannot_run_is_refused_at_build_time():
    rep = _report("row_sum_of_per_row_value")
    assert not rep.regions
    assert any("the Triton path could not run it" in why and "sum(" in why for _, _, why in rep.rejected), rep.rejected


@pytest.mark.skipif("DSLC_DIFF_RANDOM" in os.environ, reason="a longer hunt was asked for")
def test_case_count():
    assert len(WRITTEN) == 31 and len(CASES) == 91  # the file's budget: well under a minute on two cores
