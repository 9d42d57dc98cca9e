"""The op vocabulary in one table: each primitive declared once, every stage's list derived from it.

An `OpDef` says what kind of op it is, whether the passes may merge or drop it (`pure`), whether it joins
fused row regions (`fusable`: it then has a Triton forward and a derivative rule in
`dslc/codegen/autodiff.py`, which `tests/test_op_registry.py` checks for every fusable op), and how
PyTorch spells it where that is one call. The checker's type rules (`dslc/check/primitives.py`), the
region op sets (`dslc/ir/regions.py`), the passes' sets (`dslc/passes/common.py`, `cleanup.py`) and the
PyTorch spellings of codegen and autodiff all read this table; adding a unary op is one line here plus
its type rule kind, its Triton spelling and its derivative.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("unary", "binary", "row", "shape", "other")


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str  # one of KINDS: unary / binary elementwise, row (last-dim reduction), shape (views, joins), other
    doc: str
    torch: str | None = None  # PyTorch spelling of a unary op in the generated modules (`F.` is torch.nn.functional)
    fusable: bool = False  # joins fused row regions: a Triton forward and a derivative rule exist
    pure: bool = True  # no state and no randomness: CSE may merge two calls and DCE drop an unused one
    # how gradients flow: "rule" (fusable: a derivative rule in autodiff.py), "autograd" (PyTorch's autograd through
    # the generated torch code), or "indices N, ..." naming results that are integer indices and carry no gradient
    grad: str = "autograd"

    def __post_init__(self):
        if self.fusable:
            object.__setattr__(self, "grad", "rule")


OPS: dict[str, OpDef] = {
    o.name: o
    for o in (
        # ---- unary elementwise --------------------------------------------------------------------------
        OpDef("exp", "unary", "e ** x", "torch.exp", fusable=True),
        OpDef("log", "unary", "natural log", "torch.log", fusable=True),
        OpDef("sqrt", "unary", "square root", "torch.sqrt", fusable=True),
        OpDef("rsqrt", "unary", "1 / sqrt(x)", "torch.rsqrt", fusable=True),
        OpDef("tanh", "unary", "hyperbolic tangent", "torch.tanh", fusable=True),
        OpDef("sigmoid", "unary", "1 / (1 + e ** -x)", "torch.sigmoid", fusable=True),
        OpDef("silu", "unary", "x * sigmoid(x)", "F.silu", fusable=True),
        OpDef("gelu", "unary", "x * Phi(x), the exact GELU", "F.gelu", fusable=True),
        OpDef("gelu_tanh", "unary", "the tanh approximation of GELU", fusable=True),
        OpDef("relu", "unary", "max(x, 0)", "F.relu", fusable=True),
        OpDef("cos", "unary", "cosine", "torch.cos", fusable=True),
        OpDef("sin", "unary", "sine", "torch.sin", fusable=True),
        OpDef("abs", "unary", "|x|", "torch.abs", fusable=True),
        OpDef("erf", "unary", "the error function", "torch.erf", fusable=True),
        OpDef("neg", "unary", "-x", fusable=True),
        OpDef("identity", "unary", "x itself", fusable=True),
        OpDef("activation", "unary", "activation(x, name): the activation `name` of ACTIVATIONS (below)", fusable=True),
        # ---- binary elementwise (broadcasting) -----------------------------------------------------------
        OpDef("add", "binary", "a + b", fusable=True),
        OpDef("sub", "binary", "a - b", fusable=True),
        OpDef("mul", "binary", "a * b", fusable=True),
        OpDef("div", "binary", "a / b", fusable=True),
        OpDef("pow", "binary", "a ** b (b a build-time number inside a fused region)", fusable=True),
        OpDef("maximum", "binary", "elementwise max", fusable=True),
        OpDef("minimum", "binary", "elementwise min", fusable=True),
        OpDef("matmul", "binary", "a @ b"),
        OpDef("where", "other", "where(cond, a, b)"),
        # ---- reductions --------------------------------------------------------------------------------
        OpDef("sum", "row", "sum over a dim", fusable=True),
        OpDef("mean", "row", "mean over a dim", fusable=True),
        OpDef("amax", "row", "max over a dim", fusable=True),
        OpDef("amin", "row", "min over a dim"),
        OpDef("softmax", "other", "softmax over a dim"),
        OpDef("log_softmax", "other", "log-softmax over a dim"),
        # ---- shapes and dtypes -------------------------------------------------------------------------
        OpDef("cast", "other", "cast(x, dtype): round to a dtype", fusable=True),
        OpDef("rotate_half", "shape", "(x1, x2) -> (-x2, x1) over the last dim", fusable=True),
        OpDef("reshape", "shape", "a view with new dims"),
        OpDef("transpose", "shape", "swap two dims"),
        OpDef("unsqueeze", "shape", "insert a dim of size 1"),
        OpDef("squeeze", "shape", "drop a dim of size 1"),
        OpDef("select", "shape", "index one position of a dim"),
        OpDef("chunk", "shape", "n equal parts of a dim"),
        OpDef("split", "shape", "parts of given sizes"),
        OpDef("concat", "shape", "join along a dim"),
        OpDef("expand", "shape", "broadcast size-1 dims to given sizes (a view)"),
        OpDef("arange", "other", "0, 1, ... n - 1 (build-time sizes)"),
        OpDef("constant", "other", "a [n] tensor of build-time numbers (a list config field: longrope's factors)"),
        # ---- layers ------------------------------------------------------------------------------------
        OpDef("linear", "other", "x @ weight.T (+ bias)"),
        OpDef("gather", "other", "embedding lookup: rows of a table by index"),
        OpDef("conv2d", "other", "2-D convolution of [B, C, H, W] images (patch embeddings, CNNs)"),
        OpDef("max_pool2d", "other", "2-D max pooling over [B, C, H, W]"),
        OpDef("attention", "other", "scaled dot-product attention (KV cache, masks)", pure=False),
        OpDef("dropout", "other", "random zeroing in training", pure=False),
        # ---- mixture of experts: routing, token dispatch, grouped matmul ----------------------------------
        OpDef("topk", "other", "the k largest values over the last dim and their indices", grad="indices 1"),
        OpDef(
            "moe_dispatch",
            "other",
            "tokens grouped by the expert each top-k slot routes them to: (rows, slot order, tokens per expert)",
            grad="indices 1, 2",
        ),
        OpDef("grouped_linear", "other", "each group of rows times its expert's weight of a stacked [E, out, in]"),
        OpDef("moe_combine", "other", "expert rows weighted by their routing weight and summed back per token"),
    )
}


@dataclass(frozen=True)
class Activation:
    """An activation chosen by name (`activation(x, hidden_act)`), as transformers' `ACT2FN[name]` computes it.

    `steps` are region ops (dslc/ir/regions.py) over the input `x`, each naming its result; the last step's
    result is the activation. The Triton kernels and their derivative are derived from them
    (dslc/codegen/activations.py); `torch` is the PyTorch spelling of the generated package, over `x`."""

    name: str  # the HF name, a value of config.json's `hidden_act`
    steps: tuple[tuple[str, str, tuple[str | float, ...]], ...]  # (result, op, args)
    torch: str
    doc: str


def _act(name: str, formula: str, torch: str, doc: str) -> Activation:
    """`formula`: `; `-separated `result = op(args)` steps over `x` (args are names or numbers)."""
    steps = []
    for step in formula.split("; "):
        result, call = (p.strip() for p in step.split("="))
        op, rest = call.rstrip(")").split("(")
        args = tuple(float(a) if a[0].isdigit() else a for a in (x.strip() for x in rest.split(",")))
        steps.append((result, op, args))
    return Activation(name, tuple(steps), torch, doc)


_GELU_TANH = 'F.gelu(x, approximate="tanh")'
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        _act("silu", "y = silu(x)", "F.silu(x)", "x * sigmoid(x)"),
        _act("swish", "y = silu(x)", "F.silu(x)", "silu"),
        _act("gelu", "y = gelu(x)", "F.gelu(x)", "x * Phi(x), the exact (erf) GELU"),
        _act("gelu_python", "y = gelu(x)", "F.gelu(x)", "gelu"),
        _act("gelu_pytorch_tanh", "y = gelu_tanh(x)", _GELU_TANH, "the tanh approximation of GELU"),
        _act("gelu_new", "y = gelu_tanh(x)", _GELU_TANH, "gelu_pytorch_tanh (HF writes the formula out)"),
        _act("gelu_fast", "y = gelu_tanh(x)", _GELU_TANH, "gelu_pytorch_tanh (sqrt(2 / pi) to 10 digits)"),
        _act("gelu_python_tanh", "y = gelu_tanh(x)", _GELU_TANH, "gelu_pytorch_tanh"),
        _act("gelu_accurate", "y = gelu_tanh(x)", _GELU_TANH, "gelu_pytorch_tanh"),
        _act(
            "quick_gelu",
            "t = mul(x, 1.702); s = sigmoid(t); y = mul(x, s)",
            "x * torch.sigmoid(1.702 * x)",
            "x * sigmoid(1.702 x)",
        ),
        _act("relu", "y = relu(x)", "F.relu(x)", "max(x, 0)"),
        _act("relu2", "r = relu(x); y = mul(r, r)", "torch.square(F.relu(x))", "relu(x) ** 2 (Primer)"),
        _act("sigmoid", "y = sigmoid(x)", "torch.sigmoid(x)", "1 / (1 + e ** -x)"),
        _act("tanh", "y = tanh(x)", "torch.tanh(x)", "hyperbolic tangent"),
        _act("linear", "y = identity(x)", "x", "x itself"),
    )
}


def names(kind: str, fusable: bool | None = None) -> tuple[str, ...]:
    """The ops of `kind` (optionally only the fusable or the non-fusable ones), in table order."""
    if kind not in KINDS:
        raise KeyError(kind)
    return tuple(n for n, o in OPS.items() if o.kind == kind and (fusable is None or o.fusable == fusable))


def torch_spellings() -> dict[str, str]:
    """Unary ops spelled as one PyTorch call in the generated modules."""
    return {n: o.torch for n, o in OPS.items() if o.torch is not None}


def index_results(name: str) -> tuple[int, ...]:
    """The results of op `name` that are integer indices (no gradient flows through them)."""
    grad = OPS[name].grad
    return tuple(int(i) for i in grad.removeprefix("indices ").split(",")) if grad.startswith("indices ") else ()


IMPURE = frozenset(n for n, o in OPS.items() if not o.pure)
FUSABLE = frozenset(n for n, o in OPS.items() if o.fusable)
