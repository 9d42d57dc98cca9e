"""The typed, immutable IR.

Two layers, as codegen and checking need them:
- definitions (`ModuleDef`, `FnDef`): parametric in module params and config fields, one per source
  declaration; codegen renders each as one class or function;
- the instance tree (`WeightInfo` list in `Program.weights`): the model instantiated for one
  evaluated config, with exact checkpoint names and concrete shapes.

Static values inside definitions are `E` trees (no spans: the enclosing node carries the span).
Forward bodies are SSA: every `Op` defines fresh value names; `Loop` runs a body over a `repeat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union

from dslc.diagnostics import Span

# ---- expressions ---------------------------------------------------------------


@dataclass(frozen=True)
class Const:
    value: int | float | bool | str | None


@dataclass(frozen=True)
class Ref:
    """A name: kind is 'value' (SSA tensor), 'param' (module param), 'config' (config field),
    'dtype' (a dtype literal such as f32), or 'dtype_of' (the dtype of an SSA value)."""

    kind: str
    name: str


@dataclass(frozen=True)
class BinE:
    op: str
    left: E
    right: E


@dataclass(frozen=True)
class UnE:
    op: str  # "-" | "not"
    operand: E


@dataclass(frozen=True)
class CondE:
    then: E
    test: E
    orelse: E


@dataclass(frozen=True)
class ListE:
    items: tuple[E, ...]


E = Union[Const, Ref, BinE, UnE, CondE, ListE]

DTYPES = ("f32", "f16", "bf16", "f64", "i64", "i32", "bool", "float")
"""`float` is the model's compute dtype, chosen at load time (float32, bfloat16, ...)."""

# ---- types ---------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSig:
    """A declared tensor type: dims are E (static sizes), Ref('sym', B) symbols, or Const('...')."""

    dims: tuple[E, ...]
    dtype: str


@dataclass(frozen=True)
class ArgDef:
    name: str
    tensor: TensorSig | None  # None for a scalar argument (fn only)
    scalar_type: str | None
    span: Span = field(compare=True)


# ---- forward bodies ---------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """`results = op(args, kwargs)`.

    op is a primitive name (see dslc/check/primitives.py), 'call' (a submodule; attr `module`),
    or 'fn' (a function; attr `fn`). `var` names the source variable each result was assigned to
    ("" for temporaries), so generated code keeps the user's names.
    """

    op: str
    args: tuple[E, ...]
    kwargs: tuple[tuple[str, E], ...]
    results: tuple[str, ...]
    vars: tuple[str, ...]
    target: str  # submodule or fn name for 'call' / 'fn'; "" otherwise
    span: Span


LAYER_INDEX = Ref("layer", "i")  # `i` in `repeat(n, Block(i % 2 == 0))`: the layer's index, 0 .. n - 1


def loop_index_key(name: str) -> str:
    """The pseudo-value that stands for a `for i, layer in layers` index where values are named (no SSA name
    has a NUL)."""
    return f"\0index {name}"


def with_layer_index(lookup, i: int):
    """`lookup` (Ref -> value) with the layer index bound to `i`."""

    def bound(r: Ref):
        return i if r == LAYER_INDEX else lookup(r)

    return bound


def per_layer(sub) -> bool:
    """Whether a submodule is a `repeat` whose constructor arguments read the layer index (its layers differ)."""
    from dslc.ir.evaluate import free_refs

    exprs = [*sub.args, *(v for _, v in sub.kwargs)]
    return sub.repeat is not None and any(r == LAYER_INDEX for e in exprs for r in free_refs(e))


REGION_GROUP = "group"  # kwarg of a `region` op that makes several calls in one launch (passes/grouping.py)


def group_size(op: Op) -> int:
    """How many calls of its region a `region` op makes: 1, or its `group` kwarg."""
    value = dict(op.kwargs).get(REGION_GROUP)
    return int(value.value) if isinstance(value, Const) else 1


@dataclass(frozen=True)
class Loop:
    """`for var in submodule: body` over a `repeat` stack; `carried` pairs (outer value, body value)
    give, per loop-carried variable, the value entering the loop and the value leaving one pass;
    `results` names the values after the loop."""

    var: str
    over: str
    body: tuple[Stmt, ...]
    inputs: tuple[str, ...]  # value entering the loop, per carried variable
    params: tuple[str, ...]  # name of that variable inside the body
    yields: tuple[str, ...]  # value at the end of one pass
    results: tuple[str, ...]  # value after the loop
    vars: tuple[str, ...]
    span: Span
    index: str = ""  # `for i, layer in layers`: the name of the layer index (a `loop_index` Ref in the body)


@dataclass(frozen=True)
class Branch:
    """`then if test else orelse` whose `test` is a build-time value (config fields, a module's parameters) and
    whose sides are tensors: only the taken side's ops run. Each side is a body and the value it gives."""

    test: E
    then: tuple[Stmt, ...]
    then_value: E
    orelse: tuple[Stmt, ...]
    else_value: E
    results: tuple[str, ...]  # the value after, one name
    vars: tuple[str, ...]
    span: Span


Stmt = Union[Op, Loop, Branch]


def bodies(st) -> tuple[tuple[Stmt, ...], ...]:
    """The nested bodies of a statement: a loop's one, a branch's two, none for an op."""
    if isinstance(st, Loop):
        return (st.body,)
    if isinstance(st, Branch):
        return (st.then, st.orelse)
    return ()


def with_bodies(st, new: tuple) -> Stmt:
    """`st` with its nested bodies replaced (in `bodies` order)."""
    if isinstance(st, Loop):
        return replace(st, body=tuple(new[0]))
    if isinstance(st, Branch):
        return replace(st, then=tuple(new[0]), orelse=tuple(new[1]))
    return st


def iter_ops(body):
    """Every Op of a body, inside loops and branches too, in order."""
    for st in body:
        if isinstance(st, (Loop, Branch)):
            for inner in bodies(st):
                yield from iter_ops(inner)
        else:
            yield st


@dataclass(frozen=True)
class Graph:
    args: tuple[ArgDef, ...]
    body: tuple[Stmt, ...]
    outputs: tuple[str, ...]
    result_sigs: tuple[TensorSig, ...] | None
    span: Span


# ---- definitions --------------------------------------------------------------------


@dataclass(frozen=True)
class ParamDef:
    name: str
    type: str
    default: E | None
    span: Span
    optional: bool = False  # `int?`: none is a value too


@dataclass(frozen=True)
class WeightDef:
    name: str
    shape: tuple[E, ...]
    dtype: str
    init: str  # normal | zeros | ones
    init_std: E | None
    condition: E | None
    doc: str
    span: Span


@dataclass(frozen=True)
class SubmoduleDef:
    name: str
    module: str
    args: tuple[E, ...]
    kwargs: tuple[tuple[str, E], ...]
    repeat: E | None  # number of copies for `repeat(n, M())`
    condition: E | None
    doc: str
    span: Span
    # `mlp = A() if c else B()`: the modules taken, in order, when `condition` is false, each with its own
    # condition (None: the final `else`); without a final `else` none may be taken and the member is absent
    alternatives: tuple[SubmoduleDef, ...] = ()


def choices(sub: SubmoduleDef) -> tuple[SubmoduleDef, ...]:
    """The modules a submodule may be: itself, or for a choice `A() if c else B()` each side, in order."""
    return (sub, *sub.alternatives)


def modules_of(sub: SubmoduleDef) -> tuple[str, ...]:
    """The module definitions a submodule may instantiate (one, or a choice's sides), without repeats."""
    return tuple(dict.fromkeys(c.module for c in choices(sub)))


def chosen(sub: SubmoduleDef, lookup) -> SubmoduleDef | None:
    """The side of a submodule an instance takes (`lookup` binds its params and the config): the first whose
    condition holds; None when it is absent. Raises EvalError as `evaluate` does."""
    from dslc.ir.evaluate import evaluate

    for c in choices(sub):
        if c.condition is None or evaluate(c.condition, lookup):
            return c
    return None


@dataclass(frozen=True)
class TieDef:
    target: str  # dotted path from this module, e.g. lm_head.weight
    source: str
    condition: E | None
    span: Span


@dataclass(frozen=True)
class HeadSoftcap:
    """The final soft-cap after a model's LM head, logits -> cap * tanh(logits / cap) (Gemma 2's
    final_logit_softcapping): the training loss runs it inside the chunks of the fused linear cross-entropy."""

    logits: str  # the head call's result (the forward reads the cap's result)
    cap: E  # the cap, a build-time expression (config fields, constants)
    test: E | None  # when it applies (a build-time branch `... if test else logits`); None: always


@dataclass(frozen=True)
class ModuleDef:
    name: str
    params: tuple[ParamDef, ...]
    weights: tuple[WeightDef, ...]
    submodules: tuple[SubmoduleDef, ...]
    ties: tuple[TieDef, ...]
    forward: Graph | None
    uses_config: bool
    task: str | None
    doc: str
    span: Span
    projection_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (fused name, parts), by horizontal fusion
    # forward(x, residual) -> (forward(x + residual), x + residual), by the residual-norm pass: a norm that
    # also takes the residual add before it, called as `norm(h, residual = r)` (vLLM's and Liger's norms)
    residual: Graph | None = None
    # a model whose forward ends in a Linear-like head and a final soft-cap, by the loss-head pass
    head_softcap: HeadSoftcap | None = None


@dataclass(frozen=True)
class FnDef:
    name: str
    graph: Graph
    doc: str
    span: Span


# ---- config ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDef:
    name: str
    type: str  # int | float | bool | str
    optional: bool
    default: E | None
    doc: str
    span: Span


@dataclass(frozen=True)
class RequireDef:
    test: E
    message: str
    span: Span


@dataclass(frozen=True)
class ArchDef:
    name: str
    base: str | None
    overrides: tuple[tuple[str, E], ...]
    span: Span


@dataclass(frozen=True)
class ConfigDef:
    name: str
    fields: tuple[FieldDef, ...]
    aliases: tuple[tuple[str, str], ...]  # (config.json key, field)
    requires: tuple[RequireDef, ...]
    archs: tuple[ArchDef, ...]
    span: Span


# ---- checkpoint and training ------------------------------------------------------------


@dataclass(frozen=True)
class LayoutRuleDef:
    sources: tuple[str, ...]  # checkpoint key patterns, `{i}` for a layer index
    transforms: tuple[tuple[str, tuple[tuple[str, E], ...]], ...]  # (transpose | split | concat, kwargs)
    targets: tuple[str, ...]  # parameter name patterns
    span: Span
    layout: str | None = None  # a foreign layout's name (`checkpoint "meta":`); None: HF's format, saved back


@dataclass(frozen=True)
class RouterDef:
    """The model's router logits: the outputs of the submodules `pattern` names (`{i}` a layer index), with the
    load-balancing loss's options (`num_experts`, `top_k`, `coef`) as expressions over the config."""

    pattern: str
    options: tuple[tuple[str, E], ...]
    span: Span


@dataclass(frozen=True)
class LossDef:
    """A `loss kind(option = value, ...)` line of the model: a LOSSES kind, its options as expressions over the
    config (the package reads them from the config when the loss is computed)."""

    kind: str
    options: tuple[tuple[str, E], ...]
    span: Span


@dataclass(frozen=True)
class LossKind:
    """One kind of declared loss. `role`: "main" (replaces the task's loss; at most one) or "aux" (an extra term
    reported as the output field `output` and added to `loss` times its `coef`). `options`: name -> (type, its
    default as source text, or None when the option is required); types are config types (`list[float]?`...).
    `tasks`: the tasks that take it. The package's losses.py implements each (LOSS_FUNCTIONS there)."""

    role: str
    options: tuple[tuple[str, str, str | None], ...]
    tasks: tuple[str, ...]
    doc: str
    output: str | None = None  # an aux term's output field
    declared_by: str | None = None  # another spec line that declares it (the router's load balance)


_CE_TASKS = ("causal_lm", "masked_lm", "sequence_classification", "image_classification")
_CLASSIFIERS = ("sequence_classification", "image_classification")
# the loss kinds a `loss` line names; docs/language.md gives each kind's formula
LOSSES: dict[str, LossKind] = {
    "cross_entropy": LossKind(
        "main",
        (("label_smoothing", "float", "0.0"), ("weight", "list[float]?", "none")),
        _CE_TASKS,
        "torch.nn.CrossEntropyLoss(weight=, label_smoothing=) over non-ignored labels (-100), HF's mean or sum / "
        "num_items_in_batch; a causal LM's labels shifted left",
    ),
    "mse": LossKind("main", (), _CLASSIFIERS, "mean squared error of the logits against float labels (regression)"),
    "bce": LossKind(
        "main",
        (("pos_weight", "list[float]?", "none"),),
        _CLASSIFIERS,
        "BCEWithLogitsLoss(pos_weight=) over float [B, num_labels] targets (multi-label)",
    ),
    "z_loss": LossKind(
        "aux",
        (("coef", "float", None),),
        _CE_TASKS,
        "mean over non-ignored labels of logsumexp(logits)^2 (PaLM, Fast-LLM); loss += coef * z_loss",
        output="z_loss",
    ),
    "load_balance": LossKind(
        "aux",
        (("num_experts", "int", None), ("top_k", "int", None), ("coef", "float", None)),
        _CE_TASKS,
        "Switch Transformer's router load balance over every layer's router logits; loss += coef * aux_loss",
        output="aux_loss",
        declared_by="router",
    ),
}


@dataclass(frozen=True)
class CheckpointDef:
    rules: tuple[LayoutRuleDef, ...]
    ignores: tuple[str, ...]


@dataclass(frozen=True)
class TrainDef:
    checkpointing: tuple[str, ...]  # module names whose calls recompute activations in backward
    parallel: tuple[tuple[str, str], ...]  # (module-path pattern, a PARALLEL_STYLES style)
    save: tuple[str, ...] = ()  # op kinds (SAVE_OPS) whose outputs checkpointed blocks keep instead of recomputing


# a model's task -> the names of its forward's outputs (HF's output fields); the package's model_base.py and
# outputs.py hold the loss and the ModelOutput class of each
TASKS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("logits",),
    "masked_lm": ("logits",),
    "sequence_classification": ("logits",),
    "image_classification": ("logits",),
    "embedding": ("embeddings",),
    "base": ("last_hidden_state", "pooler_output"),
}
# checkpoint-rule transforms -> the options each takes (templates/package/checkpoint.py applies and inverts them)
TRANSFORMS: dict[str, tuple[str, ...]] = {
    "transpose": (),
    "split": ("dim",),
    "concat": ("dim",),
    "stack": ("dim",),
    "permute": ("heads",),  # Meta's interleaved rotary rows <-> Hugging Face's halves, per head
}
PARALLEL_STYLES = (
    "colwise",
    "rowwise",
    "sequence",
)  # a `parallel` line's styles; the package's parallel.py applies them
SAVE_OPS = ("linear", "attention")  # `save_activations` names: matmuls, attention kernels (model_base.SAVE_OPS)


# ---- the whole program -------------------------------------------------------------------


@dataclass(frozen=True)
class WeightInfo:
    """One parameter of the instantiated model: checkpoint name, shape, dtype, tie source."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    init: str
    tied_to: str | None
    span: Span


@dataclass(frozen=True)
class Program:
    source: str  # spec path
    model: str  # the `model` declaration's name
    config: ConfigDef
    arch: str | None
    values: tuple[tuple[str, int | float | bool | str | None], ...]  # evaluated config
    modules: tuple[ModuleDef, ...]  # dependency order: callees first, the model last
    fns: tuple[FnDef, ...]
    checkpoint: CheckpointDef
    train: TrainDef
    weights: tuple[WeightInfo, ...]
    regions: tuple = ()  # RowRegion (dslc/ir/regions.py) made by the fusion passes; `region` ops call them
    router: RouterDef | None = None  # a mixture of experts' router logits and load-balancing loss
    losses: tuple[LossDef, ...] = ()  # the model's `loss` lines, main loss first (none: the task's own loss)

    def module(self, name: str) -> ModuleDef:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def fn(self, name: str) -> FnDef:
        for f in self.fns:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def config_values(self) -> dict:
        return dict(self.values)

    @property
    def param_count(self) -> int:
        """Parameters counted once per tensor (tied weights count once)."""
        total = 0
        for w in self.weights:
            if w.tied_to is None:
                n = 1
                for d in w.shape:
                    n *= d
                total += n
        return total
