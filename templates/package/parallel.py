"""Scale out on torch.distributed: the spec's tensor-parallel plan and FSDP2 in one call, full-tensor saves of a
sharded model, and distributed checkpoints (DCP) of model + optimizer that resume at any world size.

    mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp_shard", "tp"))
    model.parallelize(mesh)                        # TP on "tp" (the spec's `parallel` plan), FSDP2 on "dp_shard"
    save_checkpoint("ckpt/step3", model, optimizer, extra={"step": 3, "scheduler": sched.state_dict()})
    extra = load_checkpoint("ckpt/step3", model, optimizer)   # any world size, any mesh
    model.save_pretrained("out")                   # every rank calls it; rank 0 writes the Hugging Face folder
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

STYLES = ("colwise", "rowwise", "sequence")  # the styles a spec's `parallel` lines take
TP_NAMES = ("tp",)
DP_SHARD_NAMES = ("dp_shard", "dp", "fsdp")
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads")


def parallelize(
    model: nn.Module,
    mesh,
    tp: str | None = None,
    dp_shard: str | None = None,
    *,
    sequence_parallel: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    offload: bool = False,
) -> nn.Module:
    """Shard `model` in place over `mesh` (a `torch.distributed.device_mesh.DeviceMesh`) and return it.

    `tp` / `dp_shard`: names of the mesh dimensions for tensor parallelism and FSDP2. Left None, a mesh
    dimension named "tp" is the tensor-parallel one and one named "dp_shard" (or "dp", "fsdp") the FSDP one;
    a 1-D mesh without names needs one of them given (its one name, or `tp=0` / `dp_shard=0`).

    Tensor parallelism applies the spec's `parallel` plan (`model.tp_plan`, `{i}` standing for each block of the
    repeat stack) with torch's ColwiseParallel / RowwiseParallel; attention splits the heads
    it receives (the specs split by head_dim), so each rank runs its local heads. Norms the plan marks `sequence`
    run torch's SequenceParallel (see `_sequence_styles`): between blocks each rank then holds its slice of the
    sequence, and `sequence_parallel=False` turns that off (plain TP; the `sequence` lines are skipped).
    FSDP2 (`fully_shard`) wraps each block of the repeat stack (the spec's activation-checkpointing unit), then
    the whole model, so tied embeddings stay one parameter; `param_dtype` / `reduce_dtype` are its
    MixedPrecisionPolicy (compute in bf16, reduce gradients in fp32), `reshard_after_forward` frees each block's
    gathered weights after its forward (False: keep them for backward, more memory, fewer all-gathers),
    `offload` keeps the shards and their optimizer state in CPU memory (CPUOffloadPolicy). Both together are
    2-D (FSDP x TP). Refused with a ValueError naming the key or size: fused projections (`fuse_projections()`;
    call `unfuse_projections()` first), a plan key that matches no module, an unknown style, a mesh dimension
    that does not divide a sharded width or a head count, a model already parallelized."""
    name = type(model).__name__
    if getattr(model, "_parallel_mesh", None) is not None:
        raise ValueError(f"{name} is already parallelized; build or load a fresh model to parallelize it again")
    fused = [
        f"{prefix}.{f}" if prefix else f
        for prefix, m in model.named_modules()
        for f in getattr(m, "projection_groups", {})
        if getattr(m, f, None) is not None
    ]
    if fused:
        raise ValueError(
            f"{name}.parallelize: fused projections ({', '.join(fused[:4])}{', ...' if len(fused) > 4 else ''}) "
            "cannot be sharded; call model.unfuse_projections() first (or load without fuse_projections=True)"
        )
    tp_mesh, dp_mesh = _meshes(name, mesh, tp, dp_shard)
    if tp_mesh is not None:
        _tensor_parallel(model, tp_mesh, sequence_parallel)
    if dp_mesh is not None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        options = {
            "mesh": dp_mesh,
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
        }
        for block in _blocks(model):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
        # the root reshards after forward too (FSDP2 keeps a root's gathered parameters by default): after a
        # no_grad forward (an eval) they would stay gathered and the next training step would not update them
        fully_shard(model, reshard_after_forward=True, **options)
    model._parallel_mesh = mesh
    return model


def _dim(name: str, mesh, dim, role: str):
    names = tuple(mesh.mesh_dim_names or ())
    if isinstance(dim, int) and not isinstance(dim, bool):
        if mesh.ndim != 1 or dim != 0:
            raise ValueError(f"{name}.parallelize: {role}={dim}: an index is for a 1-D mesh (0); name the dims")
        return mesh
    if dim not in names:
        raise ValueError(f"{name}.parallelize: {role}={dim!r} is not a dimension of the mesh (its names: {names})")
    return mesh if mesh.ndim == 1 else mesh[dim]


def _meshes(name: str, mesh, tp, dp_shard):
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"{name}.parallelize takes a torch.distributed.device_mesh.DeviceMesh, got {type(mesh)}")
    if mesh.ndim > 2:
        raise ValueError(f"{name}.parallelize takes a 1-D or 2-D mesh, got {mesh.ndim} dims")
    names = tuple(mesh.mesh_dim_names or ())
    if tp is None and dp_shard is None:
        tp = next((n for n in names if n in TP_NAMES), None)
        dp_shard = next((n for n in names if n in DP_SHARD_NAMES), None)
        if tp is None and dp_shard is None:
            raise ValueError(
                f"{name}.parallelize: which mesh dimension is which? Name them (mesh_dim_names=('dp_shard', 'tp')) "
                f"or pass tp= / dp_shard= (the mesh's names: {names or 'none'})"
            )
    if tp is not None and tp == dp_shard:
        raise ValueError(f"{name}.parallelize: tp and dp_shard are the same mesh dimension {tp!r}")
    if mesh.ndim == 2 and (tp is None) != (dp_shard is None):
        raise ValueError(f"{name}.parallelize: a 2-D mesh needs both tp= and dp_shard= (names {names})")
    tp_mesh = _dim(name, mesh, tp, "tp") if tp is not None else None
    dp_mesh = _dim(name, mesh, dp_shard, "dp_shard") if dp_shard is not None else None
    return tp_mesh, dp_mesh


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the model's one repeat stack (an nn.ModuleList of one block type); [] when it has none."""
    stacks = [
        child
        for owner in model.modules()
        for child in owner.children()
        if isinstance(child, nn.ModuleList) and len(child) and len({type(b) for b in child}) == 1
    ]
    return list(stacks[0]) if len(stacks) == 1 else []


def expand_plan(model: nn.Module) -> dict[str, str]:
    """The spec's plan (`model.tp_plan`) over the model's module names: `{i}` is each block of the stack."""
    name = type(model).__name__
    modules = [n for n, _ in model.named_modules()]
    plan: dict[str, str] = {}
    for key, style in getattr(model, "tp_plan", {}).items():
        if style not in STYLES:
            raise ValueError(f"{name}.parallelize: plan key {key!r} has style {style!r}; known: {', '.join(STYLES)}")
        pattern = re.compile(re.escape(key).replace(r"\{i\}", r"\d+"))
        found = [n for n in modules if pattern.fullmatch(n)]
        if not found:
            raise ValueError(f"{name}.parallelize: plan key {key!r} matches no module of the model")
        plan.update(dict.fromkeys(found, style))
    if not plan:
        raise ValueError(f"{name}.parallelize: the spec has no `parallel` plan (train: section), so no tp dimension")
    return plan


def _tensor_parallel(model: nn.Module, mesh, sequence_parallel: bool = True) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    name = type(model).__name__
    size = mesh.size()
    plan = expand_plan(model)
    if not sequence_parallel:
        plan = {key: style for key, style in plan.items() if style != "sequence"}
    config = getattr(model, "config", None)
    heads = {f: getattr(config, f) for f in HEAD_FIELDS if isinstance(getattr(config, f, None), int)}
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int):
        width = getattr(config, "hidden_size", getattr(config, "n_embd", None))
        count = heads.get("num_attention_heads", heads.get("n_head"))
        head_dim = width // count if isinstance(width, int) and count else None
    for key, style in plan.items():
        module = model.get_submodule(key)
        if style == "sequence":
            continue  # a norm: checked by _sequence_styles
        if isinstance(module, nn.Embedding):
            width, what = (module.num_embeddings, "rows") if style == "rowwise" else (module.embedding_dim, "columns")
        elif isinstance(module, nn.Linear):
            width, what = (
                (module.out_features, "out_features") if style == "colwise" else (module.in_features, "in_features")
            )
        else:
            raise ValueError(
                f"{name}.parallelize: `{key}` ({type(module).__name__}) is not a Linear or an Embedding; "
                f"{style} needs one"
            )
        if width % size:
            raise ValueError(f"{name}.parallelize: `{key}` {what}={width} does not split over a tp mesh of {size}")
        for field, count in heads.items():  # a projection of `count` heads: each rank must hold whole heads
            if isinstance(module, nn.Linear) and head_dim and width == count * head_dim and count % size:
                raise ValueError(
                    f"{name}.parallelize: {field}={count} heads do not split over a tp mesh of {size} (`{key}`)"
                )
    _check_ties(name, model, plan)
    blocks = _block_names(model)
    switch = SequenceSwitch(mesh.size()) if any(style == "sequence" for style in plan.values()) else None
    dt = _dtensor_styles()
    styles = {}
    for key, style in plan.items():
        inside = _owner_block(key, blocks) is not None
        module = model.get_submodule(key)
        if style == "colwise":
            # a projection inside a block leaves its heads local; one outside (the LM head) gathers its output
            styles[key] = ColwiseParallel() if inside else ColwiseParallel(output_layouts=Replicate())
        elif style == "rowwise" and isinstance(module, nn.Embedding):
            # each rank looks up its rows of the vocabulary; the sum is scattered over the sequence under SP
            styles[key] = (
                dt.Embedding(switch, input_layouts=Replicate())
                if switch is not None
                else RowwiseParallel(input_layouts=Replicate())
            )
        elif style == "rowwise":
            styles[key] = dt.Rowwise(switch) if switch is not None and inside else RowwiseParallel()
    if switch is not None:
        styles.update(_sequence_styles(name, model, plan, blocks, switch, dt))
    styles.update({key: dt.Heads(key) for key in _head_sharded(model, plan, blocks)})
    parallelize_module(model, mesh, styles)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the head's sharded weight is the embedding's again (both shard the vocabulary)


def _block_names(model: nn.Module) -> list[str]:
    """Module names of the blocks of the repeat stack (`model.layers.0`, ...)."""
    ids = {id(block) for block in _blocks(model)}
    return [n for n, m in model.named_modules() if id(m) in ids]


def _owner_block(key: str, blocks: list[str]) -> str | None:
    return next((b for b in blocks if key.startswith(b + ".")), None)


def _head_sharded(model: nn.Module, plan: dict[str, str], blocks: list[str]) -> list[str]:
    """Children with weights and no `parallel` line inside a block's module that holds colwise projections
    (Qwen3's q_norm / k_norm in attention): they run on this rank's heads, between the colwise and rowwise
    projections. (A colwise LM head's owner is the model itself: its other children see whole tensors.)"""
    owners = {key.rpartition(".")[0] for key, style in plan.items() if style == "colwise"}
    modules = dict(model.named_modules())
    found = []
    for owner in sorted(o for o in owners if o in modules and _owner_block(o, blocks) is not None):
        for child_name, child in modules[owner].named_children():
            key = f"{owner}.{child_name}"
            if key not in plan and any(True for _ in child.parameters()):
                found.append(key)
    return found


def _check_ties(name: str, model: nn.Module, plan: dict[str, str]) -> None:
    """A tied pair (embedding and LM head) is sharded alike, on the vocabulary (embedding rowwise, head colwise),
    or not at all: one parameter cannot hold two layouts."""
    tied = model.tied_parameters() if hasattr(model, "tied_parameters") else {}
    for target, source in tied.items():
        a, b = target.rpartition(".")[0], source.rpartition(".")[0]
        shards = {plan.get(a), plan.get(b)}
        if shards == {None} or shards == {"rowwise", "colwise"} and plan.get(a) != plan.get(b):
            continue
        raise ValueError(
            f"{name}.parallelize: `{target}` is tied to `{source}`, so `{a}` and `{b}` must both shard the "
            f"vocabulary (the embedding rowwise, the head colwise) or neither; the plan gives `{a}` "
            f"{plan.get(a) or 'no line'} and `{b}` {plan.get(b) or 'no line'}"
        )


def _sequence_styles(name: str, model: nn.Module, plan: dict[str, str], blocks: list[str], switch, dt) -> dict:
    """The layouts of sequence parallelism (Megatron-LM's, as torchtitan applies it): the residual stream between
    blocks is sharded on the sequence (dim 1); each `sequence` norm runs on its rank's tokens with replicated
    weights whose gradients are summed over the tp ranks; the module holding a block's colwise projections
    (attention, MLP) all-gathers its input once; rowwise projections reduce-scatter (their styles, set by the
    caller). The norm after the last block gathers the sequence again, so the model's outputs and the fused loss
    see every token. The plan must cover the stream: the input embedding and every block child with weights.
    A call whose length T is not a multiple of the tp size (a decode step of one token) runs as plain TP: see
    SequenceSwitch."""

    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_key = next((n for n, m in model.named_modules() if m is embedding), None)
    if embedding_key is not None and plan.get(embedding_key) != "rowwise":
        raise ValueError(
            f"{name}.parallelize: sequence parallelism shards the sequence from the input embedding on; add "
            f'`parallel "{embedding_key}" -> rowwise` to the spec\'s train: section (or sequence_parallel=False)'
        )
    styles: dict = {}
    for key, style in plan.items():
        if style != "sequence":
            continue
        if any(n != key and n.startswith(key + ".") for n in plan):
            raise ValueError(f"{name}.parallelize: `{key}` is `sequence` but holds projections of the plan")
        styles[key] = dt.Norm(switch, gather=_owner_block(key, blocks) is None)
    for block in blocks:
        for child_name, child in model.get_submodule(block).named_children():
            key = f"{block}.{child_name}"
            sharded = [n for n, s in plan.items() if n.startswith(key + ".") and s == "colwise"]
            if sharded:
                styles[key] = dt.Gather(switch, _positional_count(child))
            elif key not in plan and any(True for _ in child.parameters()):
                pattern = re.sub(r"\.\d+\.", ".{i}.", key + ".", count=1).rstrip(".")
                raise ValueError(
                    f"{name}.parallelize: `{key}` has weights but no `parallel` line; under sequence parallelism "
                    f'it sees one slice of the sequence: add `parallel "{pattern}" -> sequence` (a norm) to the '
                    "spec, or call parallelize(..., sequence_parallel=False)"
                )
        owned = [n for n, s in plan.items() if s == "colwise" and n.rpartition(".")[0] == block]
        if owned:
            raise ValueError(
                f"{name}.parallelize: sequence parallelism gathers the input of the module that holds a block's "
                f"colwise projections, but `{owned[0]}` belongs to the block itself; move it into a submodule "
                "(attention, MLP) or call parallelize(..., sequence_parallel=False)"
            )
    return styles


def _positional_count(module: nn.Module) -> int:
    parameters = inspect.signature(module.forward).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


class SequenceSwitch:
    """Whether the current call is sequence-sharded: set by the input embedding from the call's length T, on
    when T is a multiple of the tp size. Otherwise (a decode step of one token, an odd prompt) the same
    modules run as plain tensor parallelism: every rank holds every token, norms see them all."""

    def __init__(self, size: int):
        self.size = size
        self.active = False

    def update(self, ids: torch.Tensor) -> None:
        self.active = ids.dim() == 2 and ids.shape[1] % self.size == 0


@functools.cache
def _dtensor_styles():
    """The DTensor ParallelStyles parallelize adds to torch's, built on first use (torch.distributed.tensor imports
    late): for sequence parallelism, torch's RowwiseParallel, PrepareModuleInput and SequenceParallel with their
    layouts chosen per call by a SequenceSwitch (torch's own take them fixed at parallelize time); and `Heads`,
    SequenceParallel over the heads for weights between a block's sharded projections."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel, SequenceParallel

    def sequence_or_whole(switch: SequenceSwitch) -> tuple:
        return (Shard(1),) if switch.active else (Replicate(),)

    class Rowwise(RowwiseParallel):
        """A block's rowwise projection: its partial sums reduce-scattered over the sequence (or all-reduced)."""

        def __init__(self, switch: SequenceSwitch, **kwargs):
            super().__init__(**kwargs)
            self.switch = switch

        def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
            layouts = sequence_or_whole(self.switch)
            return RowwiseParallel._prepare_output_fn(layouts, use_local_output, mod, outputs, device_mesh)

    class Embedding(Rowwise):
        """The input embedding, rowwise over the vocabulary; it reads the call's length into the switch."""

        def _prepare_input_fn(self, input_layouts, desired_input_layouts, mod, inputs, device_mesh):
            self.switch.update(inputs[0])
            return RowwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh)

    class Gather(PrepareModuleInput):
        """The module holding a block's colwise projections all-gathers its first input (a sequence shard) once;
        the gathered DTensor stays one, so backward reduce-scatters its gradient."""

        def __init__(self, switch: SequenceSwitch, count: int):
            rest = (None,) * (count - 1)
            super().__init__(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest))
            self.switch = switch

        def _prepare_input_fn(self, inputs, device_mesh):
            return super()._prepare_input_fn(inputs, device_mesh) if self.switch.active else inputs

    class Norm(SequenceParallel):
        """A `sequence` norm: torch's SequenceParallel (weights replicated, gradients summed over the tp ranks),
        also for the fused add's `residual=` input and the (normed, sum) output; outputs are local tensors again
        (the residual stream stays plain tensors) or, with `gather` (the norm after the last block), the whole
        sequence on every rank."""

        def __init__(self, switch: SequenceSwitch, gather: bool):
            super().__init__(use_local_output=True)
            self.switch, self.gather = switch, gather

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            self._replicate_module_fn("", module, device_mesh)

            def wrap(x):
                if isinstance(x, DTensor):
                    return x
                return DTensor.from_local(x, device_mesh, sequence_or_whole(self.switch), run_check=False)

            def to_dtensors(_, args, kwargs):
                if kwargs.get("residual") is not None:
                    kwargs = {**kwargs, "residual": wrap(kwargs["residual"])}
                return (wrap(args[0]), *args[1:]), kwargs

            def to_local(_, args, outputs):
                def local(x):
                    gather = self.gather and self.switch.active
                    return (x.redistribute(placements=(Replicate(),)) if gather else x).to_local()

                return tuple(local(x) for x in outputs) if isinstance(outputs, tuple) else local(outputs)

            module.register_forward_pre_hook(to_dtensors, with_kwargs=True)
            module.register_forward_hook(to_local)
            return module

    class Heads(SequenceParallel):
        """A module with weights between a block's colwise and rowwise projections (Qwen3's per-head q_norm): its
        input holds this rank's heads (dim 1 of [B, heads, T, D]), so its weights are replicated DTensors over a
        head-sharded input, and their gradients are summed over the tp ranks; the output is local again."""

        def __init__(self, key: str):
            super().__init__(sequence_dim=1, use_local_output=True)
            self.key = key

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            self._replicate_module_fn("", module, device_mesh)
            key = self.key

            def to_dtensor(_, args):
                x = args[0]
                if isinstance(x, DTensor) or x.dim() != 4:
                    raise ValueError(
                        f"`{key}` sits between tensor-parallel projections, so it must take this rank's heads "
                        f"[B, heads, T, D]; it got {'a DTensor' if isinstance(x, DTensor) else list(x.shape)}"
                    )
                return (DTensor.from_local(x, device_mesh, (Shard(1),), run_check=False), *args[1:])

            module.register_forward_pre_hook(to_dtensor)
            module.register_forward_hook(lambda _, args, out: out.to_local())
            return module

    return SimpleNamespace(Rowwise=Rowwise, Embedding=Embedding, Gather=Gather, Norm=Norm, Heads=Heads)


@contextlib.contextmanager
def root_unsharded(model: nn.Module):
    """The root's own FSDP2 shards (embedding, final norm, LM head) gathered while the block runs: generation
    calls the model's parts, not its forward, so FSDP2's forward hooks do not gather them. The blocks gather
    their own in their forward hooks. A model without FSDP2: nothing to do."""
    from_fsdp = "torch.distributed.fsdp" in sys.modules and isinstance(
        model, sys.modules["torch.distributed.fsdp"].FSDPModule
    )
    if not from_fsdp:
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ---- saving -----------------------------------------------------------------------------------------------
def load_sharded(
    cls, folder, mesh, tp: str | None = None, dp_shard: str | None = None, dtype=None, device=None, **options
):
    """A Hugging Face folder straight into a sharded model, without the whole model on any rank.

    The model is built on the meta device (no memory), cast to `dtype`, sharded there (`parallelize`), then
    given empty storage for its shards only. Rank 0 reads the checkpoint (memory-mapped safetensors, the spec's
    layout rules and size checks, as `from_pretrained`) and torch.distributed.checkpoint's
    `set_model_state_dict(..., broadcast_from_rank0=True)` sends it tensor by tensor: each rank keeps its
    shard. Every rank calls this; the other ranks never open the folder."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .checkpoint import CheckpointError, CheckpointReader, bind_rules, read_state

    folder = Path(folder)
    config = cls.config_class.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    shapes, tied = model.parameter_shapes(), model.tied_parameters()
    dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
    parallelize(model, mesh, tp=tp, dp_shard=dp_shard, **options)
    device = torch.device(device) if device is not None else mesh.device_type
    model.to_empty(device=device)
    state: dict = {}
    if dist.get_rank() == 0:
        rules = bind_rules(cls.layout_rules, config)
        tensors, problems = read_state(CheckpointReader(folder), shapes, rules, cls.ignored_keys, tied, dtypes)
        if problems:
            raise CheckpointError(f"{folder} does not fit {cls.__name__}:\n  - " + "\n  - ".join(problems))
        state = {n: t for n, t in tensors.items() if n not in tied}  # a tied weight is its source's parameter
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state, options=options)
    return model.eval()


def is_distributed(tensors) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def full_state(model: nn.Module, state_dict=None) -> tuple[dict[str, torch.Tensor], bool]:
    """(full tensors by name, whether this rank writes): DTensor shards (TP, FSDP2) are gathered with
    `full_tensor()`, a collective every rank joins; rank 0 writes. A model that is not sharded: itself, True."""
    state = dict(model.named_parameters(remove_duplicate=False)) if state_dict is None else dict(state_dict)
    if not is_distributed(state.values()):
        return state, True
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    full = {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for n, t in state.items()}
    return full, dist.get_rank() == 0


def model_class(model: nn.Module) -> type:
    """The generated class under FSDP2's dynamic `FSDP<Name>` subclass (what config.json's architectures names)."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith("torch."))


# ---- distributed checkpoints (DCP) --------------------------------------------------------------------------
EXTRA = "extra.pt"


def save_checkpoint(folder, model: nn.Module, optimizer=None, extra: dict | None = None) -> None:
    """Write a torch.distributed.checkpoint folder of `model` (sharded or not) and `optimizer`'s state; every rank
    calls it (each writes its shards). `extra`: what else the run needs to resume (step, scheduler.state_dict(),
    data position, RNG states): tensors, numbers, strings, lists and dicts of them, written by rank 0
    (`extra.pt`). `load_checkpoint` reads it back at any world size and mesh."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optim_state
    with warnings.catch_warnings():  # one process without a process group is what no_dist says
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(dict(extra or {}), folder / EXTRA)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(folder, model: nn.Module, optimizer=None) -> dict:
    """Load a `save_checkpoint` folder into `model` and `optimizer` (built and parallelized as the run wants: the
    world size and mesh may differ from the saving run's; DCP reshards) and return its `extra` dict. Every rank
    calls it. `extra.pt` is read with `weights_only=True` (no unpickling of code)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} is not a distributed checkpoint (no .metadata): see save_checkpoint")
    model_state, optim_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optim_state
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    set_state_dict(
        model,
        [optimizer] if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )
    path = folder / EXTRA
    return torch.load(path, weights_only=True) if path.is_file() else {}
