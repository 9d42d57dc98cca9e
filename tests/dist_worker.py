"""One process of a tests/test_distributed.py run (not a test file): `python dist_worker.py ARGS_JSON`, with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as torchrun sets them; or `train(args)` in the test's own process
(no process group: the single-process reference).

ARGS_JSON: packages (folder on sys.path), package, cls, folder (HF checkpoint), mesh ([sizes] or null),
names (mesh dim names), sequence_parallel (parallelize's, default true), steps (train up to this step), resume (a DCP folder or null), save_at (step at which
to write a DCP folder, then stop) and checkpoint, save_hf (folder or null), out (rank 0's results, a .pt).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch

BATCH, LENGTH = 4, 12


def batch(step: int, vocab: int) -> torch.Tensor:
    """The training batch of `step`: the same on every rank (each data-parallel rank takes its rows)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(3, vocab, (BATCH, LENGTH), generator=g)


def probe(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(7))


def main() -> None:
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    result = train(args)
    if result is not None:
        torch.save(result, args["out"])


def train(args: dict) -> dict | None:
    """Load, parallelize, take the probe's logits, train to `steps` (resuming / checkpointing as asked);
    rank 0's results: {"logits" (before training), "trained" (after), "losses": {step: loss}}."""
    if args["packages"] not in sys.path:
        sys.path.insert(0, args["packages"])
    package = importlib.import_module(args["package"])
    importlib.import_module(f"{args['package']}.parallel")  # package.parallel: the DCP helpers
    distributed = "RANK" in os.environ
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        result = _train(package, args, distributed)
        if distributed:
            dist.barrier()  # every rank done with its collectives before any tears the group down
        return result
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(package, args: dict, distributed: bool) -> dict | None:
    cls = getattr(package, args["cls"])
    model = None if args.get("sharded_load") else cls.from_pretrained(args["folder"])
    rank, dp, dp_rank = 0, 1, 0
    if args.get("mesh"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", tuple(args["mesh"]), mesh_dim_names=tuple(args["names"]))
        if model is None:  # straight into the shards; only rank 0 may open the folder
            reader = importlib.import_module(f"{args['package']}.checkpoint").CheckpointReader
            opened = []
            original = reader.__init__

            def counting(self, *a, **kw):
                opened.append(1)
                original(self, *a, **kw)

            reader.__init__ = counting
            model = cls.from_pretrained_sharded(args["folder"], mesh)
            reader.__init__ = original
            if dist.get_rank() != 0 and opened:
                raise AssertionError(f"rank {dist.get_rank()} opened the checkpoint")
        else:
            model.parallelize(mesh, sequence_parallel=args.get("sequence_parallel", True))
        rank = dist.get_rank()
        if "dp_shard" in args["names"]:
            dp_mesh = mesh["dp_shard"] if mesh.ndim == 2 else mesh
            dp, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()
    vocab = model.config.vocab_size
    seen = {}  # what the first block receives: [B, T] or, under sequence parallelism, this rank's [B, T / tp]
    block = model.model.layers[0]

    def record(module, args, output) -> None:
        seen.setdefault("block_input", tuple(args[0].shape))

    hook = block.register_forward_hook(record)
    with torch.no_grad():
        logits = model(input_ids=probe(vocab)).logits
        greedy = model.generate(probe(vocab)[:, :6], max_new_tokens=4, do_sample=False)
    hook.remove()
    norm = type(block.input_layernorm.weight).__name__
    model.train()
    # not the key biases: their gradient is zero in exact arithmetic (a softmax ignores a shift of every score of a
    # query), so AdamW would scale rounding noise, which differs with the sharding, up to steps of size lr
    params = [p for n, p in model.named_parameters() if not n.endswith("k_proj.bias")]
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    start = 0
    if args.get("resume"):
        extra = package.parallel.load_checkpoint(args["resume"], model, optimizer)
        start = extra["step"]
    losses = {}
    for step in range(start + 1, args["steps"] + 1):
        ids = batch(step, vocab)
        rows = BATCH // dp
        ids = ids[dp_rank * rows : (dp_rank + 1) * rows]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(value)  # tp ranks hold equal losses, dp ranks their rows' means: the world's mean
            value /= dist.get_world_size()
        losses[step] = float(value)
        if args.get("save_at") == step:
            package.parallel.save_checkpoint(args["checkpoint"], model, optimizer, extra={"step": step})
            break
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe(vocab)).logits
    if args.get("save_hf"):
        model.save_pretrained(args["save_hf"])
    result = {"logits": logits.detach(), "trained": trained.detach(), "losses": losses, "greedy": greedy}
    return {**result, **seen, "norm_weight": norm} if rank == 0 else None


if __name__ == "__main__":
    main()
    # Done and the group destroyed: leave without interpreter finalization, where gloo's worker threads can
    # still hold work objects and abort the process ("terminate called without an active exception",
    # pytorch/pytorch#179291), failing a rank whose results are already written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
