"""Scale out on torch.distributed, on the CPU with gloo: `model.parallelize(mesh)` (the spec's tensor-parallel
plan, FSDP2 per block, both as 2x2) gives the unsharded model's logits and, over 5 AdamW steps, its losses;
a sharded `save_pretrained` writes a folder transformers loads with equal logits; DCP checkpoints of model +
optimizer resume (after step 3) to the uninterrupted run's steps 4-6, at the same or another world size.

Each multi-process run is a few `tests/dist_worker.py` processes (RANK / WORLD_SIZE / MASTER_PORT as torchrun
sets them) on a free port, killed past a timeout; the single-process reference is `dist_worker.train` here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker
import hf_oracle
import pytest
import torch
from packages import built_packages

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
PACKAGE = "dist_qwen2"
TIMEOUT = 120  # seconds per launch; each takes 5-15 s on 2 cores

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    with built_packages(out / "pkg", (ROOT / "models" / "qwen2.model", PACKAGE)):
        folders = {
            "untied": hf_oracle.make_hf_model("qwen2", out / "untied", tie=False, seed=3),
            "tied": hf_oracle.make_hf_model("qwen2", out / "tied", tie=True, seed=3),
        }
        yield {"packages": str(out / "pkg"), "folders": folders, "refs": {}}


def _args(setup, folder: str, **kw) -> dict:
    return {
        "packages": setup["packages"],
        "package": PACKAGE,
        "cls": "Qwen2ForCausalLM",
        "folder": str(setup["folders"][folder]),
        **kw,
    }


def _reference(setup, folder: str) -> dict:
    """One process, no process group, 6 steps: the results every sharded run must equal."""
    if folder not in setup["refs"]:
        setup["refs"][folder] = dist_worker.train(_args(setup, folder, steps=6))
    return setup["refs"][folder]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args: dict, tmp_path: Path) -> dict:
    """Run `n` worker processes; rank 0's results. A failure or timeout shows every rank's output."""
    args = {**args, "out": str(tmp_path / f"result-{os.urandom(4).hex()}.pt")}
    port = _free_port()
    logs, procs = [], []
    for rank in range(n):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        log = open(tmp_path / f"rank{rank}-{port}.log", "w+")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], env=env, stdout=log, stderr=log))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        output = []
        for rank, log in enumerate(logs):
            log.seek(0)
            output.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-4000:]}")
            log.close()
    assert all(p.returncode == 0 for p in procs), "\n".join(output)
    return torch.load(args["out"], weights_only=True)


def _same_losses(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) < 2e-5, f"step {step}: {got[step]} vs {want[step]} ({got} / {want})"


def _hf_logits(folder: Path) -> torch.Tensor:
    hf = hf_oracle.load_hf(folder)
    with torch.no_grad():
        return hf(input_ids=dist_worker.probe(hf_oracle.VOCAB)).logits


MESHES = {  # name: (processes, mesh sizes, dim names, checkpoint, sequence parallelism)
    "tp2": (2, [2], ["tp"], "untied", True),
    "tp2_tied_no_sp": (2, [2], ["tp"], "tied", False),
    "fsdp2": (2, [2], ["dp_shard"], "tied", True),
    "fsdp2x_tp2": (4, [2, 2], ["dp_shard", "tp"], "untied", True),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_logits_training_and_save_equal_one_process(setup, name, tmp_path):
    n, sizes, names, folder, sequence = MESHES[name]
    ref = _reference(setup, folder)
    saved = tmp_path / "saved"
    args = _args(setup, folder, mesh=sizes, names=names, steps=5, save_hf=str(saved), sequence_parallel=sequence)
    got = launch(n, args, tmp_path)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-5)
    assert torch.equal(got["greedy"], ref["greedy"])  # KV-cached decoding, one token at a time (T=1 < tp)
    _same_losses(got["losses"], ref["losses"], range(1, 6))
    assert sorted(got["losses"]) == [1, 2, 3, 4, 5]
    # the spec's `sequence` lines: between blocks each tp rank holds its half of the 10 probe tokens, and the
    # norms' weights are replicated DTensors (their gradients summed over the tp ranks)
    tp = sizes[names.index("tp")] if "tp" in names else 1
    assert got["block_input"] == (2, 10 // tp if sequence else 10, 64), got["block_input"]
    if "tp" in names:
        assert got["norm_weight"] == ("DTensor" if sequence else "Parameter")
    # the sharded model's save is the full model: transformers loads it, with the sharded run's trained logits
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] == (folder == "tied")
    torch.testing.assert_close(_hf_logits(saved), got["trained"], rtol=1e-4, atol=1e-4)


def test_dcp_resume_at_same_and_smaller_world_size(setup, tmp_path):
    """2 processes (FSDP2) stop after step 3; 2 new ones resume to 6, and so does 1 process without sharding."""
    ref = _reference(setup, "untied")
    ckpt = tmp_path / "step3"
    fsdp = dict(mesh=[2], names=["dp_shard"])
    first = launch(2, _args(setup, "untied", **fsdp, steps=6, save_at=3, checkpoint=str(ckpt)), tmp_path)
    assert sorted(first["losses"]) == [1, 2, 3]
    _same_losses(first["losses"], ref["losses"], range(1, 4))
    resumed = launch(2, _args(setup, "untied", **fsdp, steps=6, resume=str(ckpt)), tmp_path)
    assert sorted(resumed["losses"]) == [4, 5, 6]
    _same_losses(resumed["losses"], ref["losses"], range(4, 7))
    alone = dist_worker.train(_args(setup, "untied", steps=6, resume=str(ckpt)))
    _same_losses(alone["losses"], ref["losses"], range(4, 7))


def test_dcp_resume_at_larger_world_size(setup, tmp_path):
    """1 process (no process group) stops after step 3; 2 processes (tensor parallel) resume to 6."""
    ref = _reference(setup, "untied")
    ckpt = tmp_path / "step3"
    first = dist_worker.train(_args(setup, "untied", steps=6, save_at=3, checkpoint=str(ckpt)))
    assert sorted(first["losses"]) == [1, 2, 3]
    resumed = launch(2, _args(setup, "untied", mesh=[2], names=["tp"], steps=6, resume=str(ckpt)), tmp_path)
    _same_losses(resumed["losses"], ref["losses"], range(4, 7))


# ---- refusals, in this process ------------------------------------------------------------------------------
class _Mesh:
    """What `_tensor_parallel`'s checks read of a mesh (its size), to check the refusals for sizes > 1 here."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def test_parallelize_refuses_bad_input(setup, tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, setup["packages"])
    try:
        import dist_qwen2 as package
        import dist_qwen2.parallel  # noqa: F401 (package.parallel, imported by the package only when used)
    finally:
        sys.path.remove(setup["packages"])
    load = lambda: package.Qwen2ForCausalLM.from_pretrained(setup["folders"]["untied"])  # noqa: E731
    model = load()
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 heads do not split over a tp mesh of 4"):
        package.parallel._tensor_parallel(model, _Mesh(4))
    with pytest.raises(ValueError, match=r"`model.layers.0.self_attn.q_proj` out_features=64 .* tp mesh of 3"):
        package.parallel._tensor_parallel(model, _Mesh(3))
    # sequence parallelism needs the whole residual stream in the plan: each gap is named with the line to add
    plan = dict(model.tp_plan)
    cases = [
        (
            "untied",
            "model.layers.{i}.post_attention_layernorm",
            r"`model.layers.0.post_attention_layernorm` has weights but "
            r'no `parallel` line.*add `parallel "model.layers.\{i\}.post_attention_layernorm" -> sequence`',
        ),
        ("untied", "model.embed_tokens", r'add `parallel "model.embed_tokens" -> rowwise`'),
        (
            "tied",
            "lm_head",
            r"`lm_head.weight` is tied to `model.embed_tokens.weight`.*gives `lm_head` no line and `model.embed_tokens` rowwise",
        ),
    ]
    for folder, dropped, message in cases:
        sharded = package.Qwen2ForCausalLM.from_pretrained(setup["folders"][folder])
        sharded.tp_plan = {k: v for k, v in plan.items() if k != dropped}
        with pytest.raises(ValueError, match=message):
            package.parallel._tensor_parallel(sharded, _Mesh(2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        with pytest.raises(ValueError, match="call model.unfuse_projections"):
            load().fuse_projections().parallelize(mesh)
        with pytest.raises(ValueError, match="takes a torch.distributed.device_mesh.DeviceMesh"):
            load().parallelize("tp")
        with pytest.raises(ValueError, match=r"tp='model' is not a dimension of the mesh"):
            load().parallelize(mesh, tp="model")
        with pytest.raises(ValueError, match="which mesh dimension is which"):
            load().parallelize(init_device_mesh("cpu", (1,)))
        odd = load()
        odd.tp_plan = {**odd.tp_plan, "model.layers.{i}.mlp.gate_proj": "diagonal"}
        with pytest.raises(ValueError, match=r"plan key 'model.layers.\{i\}.mlp.gate_proj' has style 'diagonal'"):
            odd.parallelize(mesh)
        odd.tp_plan = {"model.layers.{i}.attn.q": "colwise"}
        with pytest.raises(ValueError, match=r"plan key 'model.layers.\{i\}.attn.q' matches no module"):
            odd.parallelize(mesh)
        once = load().parallelize(mesh)
        with pytest.raises(ValueError, match="already parallelized"):
            once.parallelize(mesh)
        # a one-rank mesh: the same logits, and the tied-copy-free save of a DTensor model
        plain = load()
        with torch.no_grad():
            probe = dist_worker.probe(hf_oracle.VOCAB)
            torch.testing.assert_close(once(input_ids=probe).logits, plain(input_ids=probe).logits)
        once.save_pretrained(tmp_path / "one")
        torch.testing.assert_close(_hf_logits(tmp_path / "one"), plain(input_ids=probe).logits.detach())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["fsdp2x_tp2", "tp2"])
def test_a_folder_loads_straight_into_the_shards(setup, name, tmp_path):
    """`from_pretrained_sharded`: built on meta, sharded there, filled from rank 0's reading (the other ranks never
    open the folder): logits and training equal the one-process model's."""
    n, sizes, names, folder, _ = MESHES[name]
    ref = _reference(setup, folder)
    got = launch(n, _args(setup, folder, mesh=sizes, names=names, steps=3, sharded_load=True), tmp_path)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-5)
    _same_losses(got["losses"], ref["losses"], range(1, 4))


def test_tensor_parallel_reduces_per_head_norm_gradients(tmp_path):
    """Qwen3's q_norm / k_norm sit between the sharded projections, on each rank's heads: their weights are
    replicated DTensors over a head-sharded input, so their gradients are summed over the tp ranks. 2-process TP
    gives the one-process logits and 5 AdamW losses (without the sum the replicas drift from step 2)."""
    folder = hf_oracle.make_hf_model("qwen3", tmp_path / "hf", seed=3)
    with built_packages(tmp_path / "pkg", (ROOT / "models" / "qwen3.model", "dist_qwen3")):
        args = {"packages": str(tmp_path / "pkg"), "package": "dist_qwen3", "cls": "Qwen3ForCausalLM",
                "folder": str(folder)}  # fmt: skip
        ref = dist_worker.train({**args, "steps": 5})
        got = launch(2, {**args, "mesh": [2], "names": ["tp"], "steps": 5}, tmp_path)
    sys.modules.pop("dist_qwen3", None)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-5)
    _same_losses(got["losses"], ref["losses"], range(1, 6))
    assert torch.equal(got["greedy"], ref["greedy"])
