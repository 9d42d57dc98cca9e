"""Scale out on torch.distributed: the spec's tensor-parallel plan and FSDP2 in one call, full-tensor saves of a
sharded model, and distributed checkpoints (DCP) of model + optimizer that resume at any world size.

    mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp_shard", "tp"))
    model.parallelize(mesh)                        # TP on "tp" (the spec's `parallel` plan), FSDP2 on "dp_shard"
    save_checkpoint("ckpt/step3", model, optimizer, extra={"step": 3, "scheduler": sched.state_dict()})
    extra = load_checkpoint("ckpt/step3", model, optimizer)   # any world size, any mesh
    model.save_pretrained("out")                   # every rank calls it; rank 0 writes the Hugging Face folder
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

STYLES = ("colwise", "rowwise")  # the styles a spec's `parallel` lines take
TP_NAMES = ("tp",)
DP_SHARD_NAMES = ("dp_shard", "dp", "fsdp")
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads")


def parallelize(model: nn.Module, mesh, tp: str | None = None, dp_shard: str | None = None) -> nn.Module:
    """Shard `model` in place over `mesh` (a `torch.distributed.device_mesh.DeviceMesh`) and return it.

    `tp` / `dp_shard`: names of the mesh dimensions for tensor parallelism and FSDP2. Left None, a mesh
    dimension named "tp" is the tensor-parallel one and one named "dp_shard" (or "dp", "fsdp") the FSDP one;
    a 1-D mesh without names needs one of them given (its one name, or `tp=0` / `dp_shard=0`).

    Tensor parallelism applies the spec's `parallel` plan (`model.tp_plan`, `{i}` standing for each block of the
    repeat stack) with torch's ColwiseParallel / RowwiseParallel; attention splits the heads
    it receives (the specs split by head_dim), so each rank runs its local heads. FSDP2 (`fully_shard`) wraps each
    block of the repeat stack (the spec's activation-checkpointing unit), then the whole model, so tied
    embeddings stay one parameter. Both together are 2-D (FSDP x TP). Refused with a ValueError naming the key or
    size: fused projections (`fuse_projections()`; call `unfuse_projections()` first), a plan key that matches no
    module, an unknown style, a mesh dimension that does not divide a sharded width or a head count, a model
    already parallelized."""
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
        _tensor_parallel(model, tp_mesh)
    if dp_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        blocks = _blocks(model)
        for block in blocks:
            fully_shard(block, mesh=dp_mesh)
        # the root reshards after forward too (FSDP2 keeps a root's gathered parameters by default): after a
        # no_grad forward (an eval) they would stay gathered and the next training step would not update them
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=True)
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


def _tensor_parallel(model: nn.Module, mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    name = type(model).__name__
    size = mesh.size()
    plan = expand_plan(model)
    config = getattr(model, "config", None)
    heads = {f: getattr(config, f) for f in HEAD_FIELDS if isinstance(getattr(config, f, None), int)}
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int):
        width = getattr(config, "hidden_size", getattr(config, "n_embd", None))
        count = heads.get("num_attention_heads", heads.get("n_head"))
        head_dim = width // count if isinstance(width, int) and count else None
    for key, style in plan.items():
        module = model.get_submodule(key)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{name}.parallelize: `{key}` ({type(module).__name__}) is not a Linear; {style} needs one"
            )
        width, what = (
            (module.out_features, "out_features") if style == "colwise" else (module.in_features, "in_features")
        )
        if width % size:
            raise ValueError(f"{name}.parallelize: `{key}` {what}={width} does not split over a tp mesh of {size}")
        for field, count in heads.items():  # a projection of `count` heads: each rank must hold whole heads
            if head_dim and width == count * head_dim and count % size:
                raise ValueError(
                    f"{name}.parallelize: {field}={count} heads do not split over a tp mesh of {size} (`{key}`)"
                )
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, mesh, {key: styles[style]() for key, style in plan.items()})


# ---- saving -----------------------------------------------------------------------------------------------
def load_sharded(cls, folder, mesh, tp: str | None = None, dp_shard: str | None = None, dtype=None, device=None):
    """A Hugging Face folder straight into a sharded model, without the whole model on any rank.

    The model is built on the meta device (no memory), cast to `dtype`, sharded there (`parallelize`), then
    given empty storage for its shards only. Rank 0 reads the checkpoint (memory-mapped safetensors, the spec's
    layout rules and size checks, as `from_pretrained`) and torch.distributed.checkpoint's
    `set_model_state_dict(..., broadcast_from_rank0=True)` sends it tensor by tensor: each rank keeps its
    shard. Every rank calls this; the other ranks never open the folder."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .checkpoint import CheckpointError, CheckpointReader, read_state

    folder = Path(folder)
    config = cls.config_class.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    shapes, tied = model.parameter_shapes(), model.tied_parameters()
    dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
    parallelize(model, mesh, tp=tp, dp_shard=dp_shard)
    device = torch.device(device) if device is not None else mesh.device_type
    model.to_empty(device=device)
    state: dict = {}
    if dist.get_rank() == 0:
        tensors, problems = read_state(
            CheckpointReader(folder), shapes, cls.layout_rules, cls.ignored_keys, tied, dtypes
        )
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
