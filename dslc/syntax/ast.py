"""AST of a .model file: frozen dataclasses, each with the `Span` it was parsed from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from dslc.diagnostics import Span

# ---- expressions -------------------------------------------------------------


@dataclass(frozen=True)
class Lit:
    value: int | float | str | bool | None
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Attr:
    obj: Expr
    name: str
    span: Span


@dataclass(frozen=True)
class Index:
    """`seq[i]`: an item of a build-time list (a list-typed config field)."""

    obj: Expr
    index: Expr
    span: Span


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Call:
    func: Expr
    args: tuple[Expr, ...]
    kwargs: tuple[Kwarg, ...]
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // % @ ** == != < <= > >= and or
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True)
class UnaryOp:
    op: str  # "-" or "not"
    operand: Expr
    span: Span


@dataclass(frozen=True)
class Cond:
    then: Expr
    test: Expr
    orelse: Expr
    span: Span


@dataclass(frozen=True)
class ListLit:
    items: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class Ellipsis_:
    span: Span


Expr = Union[Lit, Name, Attr, Call, BinOp, UnaryOp, Cond, ListLit, Ellipsis_]

# ---- types -------------------------------------------------------------------


@dataclass(frozen=True)
class TypeRef:
    """A scalar type: int, float, bool, str; `optional` for `int?`."""

    name: str
    optional: bool
    span: Span


@dataclass(frozen=True)
class TensorType:
    dims: tuple[Expr, ...]  # Ellipsis_ allowed
    dtype: str | None  # None: the model's float dtype
    span: Span


# ---- declarations ------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    type: TypeRef
    default: Expr | None
    doc: str
    span: Span


@dataclass(frozen=True)
class Alias:
    hf_key: str
    field: str
    span: Span


@dataclass(frozen=True)
class Require:
    test: Expr
    message: str | None
    span: Span


@dataclass(frozen=True)
class ConfigDecl:
    name: str
    fields: tuple[Field, ...]
    aliases: tuple[Alias, ...]
    requires: tuple[Require, ...]
    doc: str
    span: Span
    base: Name | None = None  # `config C(Base):` takes Base's fields, aliases and requires


@dataclass(frozen=True)
class Override:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class ArchDecl:
    name: str
    base: str | None
    overrides: tuple[Override, ...]
    span: Span


@dataclass(frozen=True)
class Param:
    name: str
    type: TypeRef
    default: Expr | None
    span: Span


@dataclass(frozen=True)
class WeightDecl:
    name: str
    shape: TensorType
    init: Expr | None
    condition: Expr | None
    doc: str
    span: Span


@dataclass(frozen=True)
class SubmoduleDecl:
    name: str
    ctor: Expr  # a Call: Linear(...), repeat(n, Block())
    condition: Expr | None
    doc: str
    span: Span
    # `mlp = A() if c else B()`: (ctor, condition) of each later side; condition None on the final `else`
    alternatives: tuple[tuple[Expr, Expr | None], ...] = ()


@dataclass(frozen=True)
class TieDecl:
    target: tuple[str, ...]
    source: tuple[str, ...]
    condition: Expr | None
    span: Span


@dataclass(frozen=True)
class RouterDecl:
    """`router "model.layers.{i}.mlp.gate": num_experts = E, top_k = K, coef = c` in a model."""

    pattern: str
    options: tuple  # Override(name, value)
    span: Span


@dataclass(frozen=True)
class LossDecl:
    """`loss cross_entropy(label_smoothing = ls, weight = class_weights)` in a model."""

    kind: str
    kind_span: Span
    args: tuple  # positional Exprs (refused by the lowering: options are named)
    options: tuple  # Kwarg(name, value)
    span: Span


@dataclass(frozen=True)
class Arg:
    name: str
    type: TensorType | TypeRef
    span: Span


@dataclass(frozen=True)
class Assign:
    targets: tuple[str, ...]
    value: Expr
    span: Span


@dataclass(frozen=True)
class For:
    var: str
    iterable: str
    body: tuple[Stmt, ...]
    span: Span
    index: str | None = None  # `for i, layer in layers`: the layer index, a build-time int per pass


@dataclass(frozen=True)
class Return:
    values: tuple[Expr, ...]
    span: Span


Stmt = Union[Assign, For, Return]


@dataclass(frozen=True)
class Signature:
    args: tuple[Arg, ...]
    results: tuple[TensorType, ...] | None
    span: Span


@dataclass(frozen=True)
class ForwardDecl:
    sig: Signature
    body: tuple[Stmt, ...]
    span: Span


@dataclass(frozen=True)
class FnDecl:
    name: str
    sig: Signature
    body: tuple[Stmt, ...]
    doc: str
    span: Span


@dataclass(frozen=True)
class ModuleDecl:
    name: str
    params: tuple[Param, ...]
    weights: tuple[WeightDecl, ...]
    submodules: tuple[SubmoduleDecl, ...]
    ties: tuple[TieDecl, ...]
    forward: ForwardDecl | None
    config: str | None  # set for `model` declarations
    task: str | None  # causal_lm, masked_lm, sequence_classification, embedding, base
    doc: str
    span: Span
    routers: tuple[RouterDecl, ...] = ()
    losses: tuple[LossDecl, ...] = ()

    @property
    def is_model(self) -> bool:
        return self.config is not None


@dataclass(frozen=True)
class LayoutRule:
    """`sources -> transforms -> targets`: checkpoint tensor(s) to parameter(s)."""

    sources: tuple[str, ...]
    transforms: tuple[Call, ...]
    targets: tuple[str, ...]
    span: Span


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    span: Span


@dataclass(frozen=True)
class CheckpointDecl:
    rules: tuple[LayoutRule, ...]
    ignores: tuple[IgnoreRule, ...]
    span: Span
    layout: str | None = None  # `checkpoint "name":` a foreign layout; None: Hugging Face's own format


@dataclass(frozen=True)
class TrainDecl:
    checkpointing: tuple[tuple[str, Span], ...]
    parallel: tuple[tuple[str, str, Span], ...]  # (pattern, style, span)
    span: Span
    save: tuple[tuple[str, Span], ...] = ()  # `save_activations linear, attention`: kept, not recomputed


@dataclass(frozen=True)
class Use:
    name: str
    span: Span


@dataclass(frozen=True)
class File:
    path: str
    uses: tuple[Use, ...]
    configs: tuple[ConfigDecl, ...]
    archs: tuple[ArchDecl, ...]
    modules: tuple[ModuleDecl, ...]
    fns: tuple[FnDecl, ...]
    checkpoints: tuple[CheckpointDecl, ...]
    trains: tuple[TrainDecl, ...]
    span: Span
