"""The generated packages are real PyTorch module trees, tested with the real libraries that check for one:
PEFT LoRA (qwen2, gpt2, bert) trains, merges and saves into a folder HF loads; a forward hook on every
submodule fires; a swapped Linear takes effect; torch's tensor-parallel styles accept the layers; every
parameter name equals Hugging Face's."""

from __future__ import annotations

import importlib
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}
SPECS = {"qwen2": "qwen2.model", "llama": "llama.model", "gpt2": "gpt2.model", "bert": "bert.model"}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    specs = [(ROOT / "models" / spec, f"citizen_{family}") for family, spec in SPECS.items()]
    with built_packages(tmp_path_factory.mktemp("build"), *specs):
        yield {family: importlib.import_module(f"citizen_{family}") for family in SPECS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {f: hf_oracle.make_hf_model(f, tmp_path_factory.mktemp(f), seed=5) for f in SPECS}


def _load(packages, folders, family: str):
    return getattr(packages[family], CLASSES[family]).from_pretrained(folders[family])


def _batch(family: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf_oracle.VOCAB, (2, 10), generator=g)
    kwargs = {"input_ids": ids}
    if family == "bert":
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    return kwargs


def _main(family: str, out) -> torch.Tensor:
    return out.last_hidden_state if family == "bert" else out.logits


def _every_output(out) -> torch.Tensor:
    return torch.cat([v.flatten() for v in out.values() if isinstance(v, torch.Tensor)])


def _loss(family: str, model, batch, target=None) -> torch.Tensor:
    if family == "bert":  # no head: regress the hidden states onto a fixed random target
        return ((model(**batch).last_hidden_state - target) ** 2).mean()
    return model(**batch, labels=batch["input_ids"]).loss


# ---- the layers are torch's ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(SPECS))
def test_standard_layers_are_torch_classes(packages, folders, family):
    model = _load(packages, folders, family)
    kinds = {type(m).__name__: m for m in model.modules()}
    assert isinstance(kinds["Linear"], nn.Linear) and isinstance(kinds["Embedding"], nn.Embedding)
    if "LayerNorm" in kinds:
        assert isinstance(kinds["LayerNorm"], nn.LayerNorm)
    hf = hf_oracle.load_hf(folders[family])
    ours = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    theirs = {n.removeprefix("bert."): tuple(p.shape) for n, p in hf.named_parameters(remove_duplicate=False)}
    assert set(ours) == set(theirs), f"names differ: {sorted(set(ours) ^ set(theirs))[:8]}"
    if family != "gpt2":  # GPT-2's Conv1D weights are [in, out]: the checkpoint rules transpose them
        assert ours == theirs


def test_bert_pad_row_gets_no_gradient(packages, folders):
    model = _load(packages, folders, "bert")
    emb = model.embeddings.word_embeddings
    pad = model.config.pad_token_id
    assert emb.padding_idx == pad
    batch = _batch("bert")
    batch["input_ids"][:, -3:] = pad
    model(**batch).last_hidden_state.sum().backward()
    assert emb.weight.grad[pad].abs().max() == 0
    assert emb.weight.grad[batch["input_ids"][0, 0]].abs().max() > 0


# ---- PEFT --------------------------------------------------------------------------------------------------
LORA_CASES = [  # (family, target_modules); None: PEFT's default for the model type (`c_attn` for GPT-2)
    ("qwen2", ["q_proj", "v_proj"]),
    ("gpt2", None),
    ("gpt2", ["c_fc"]),
    ("bert", ["query", "value"]),
]


@pytest.mark.parametrize(
    "family,targets", LORA_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v or ["default"])
)
def test_peft_lora_trains_merges_and_saves(packages, folders, family, targets, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _load(packages, folders, family).train()
    for key in ("hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attention_dropout"):  # deterministic steps
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    batch = _batch(family)
    with torch.no_grad():
        base = _main(family, model(**batch)).clone()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    lora = peft.get_peft_model(model, config)
    wrapped = [n for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    want = tuple(targets or ["c_attn"])
    assert wrapped and all(n.rsplit(".", 1)[-1] in want for n in wrapped), wrapped
    assert len(wrapped) == len(want) * hf_oracle.LAYERS
    with torch.no_grad():  # LoRA B starts at zero: same output; a non-zero B must change it
        torch.testing.assert_close(_main(family, lora(**batch)), base)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        assert (_main(family, lora(**batch)) - base).abs().max() > 1e-3, "LoRA B did not reach the output"
    target = torch.randn_like(base) if family == "bert" else None
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad for n, p in lora.named_parameters() if "lora_" in n)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(10):
        loss = _loss(family, lora, batch, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95, f"10 LoRA steps did not lower the loss: {losses}"
    lora.eval()
    with torch.no_grad():
        adapted = _main(family, lora(**batch)).clone()
    merged = lora.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(_main(family, merged(**batch)), adapted, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    hf = hf_oracle.load_hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(_main(family, hf(**batch)), adapted, rtol=1e-4, atol=1e-5)


# ---- hooks and swaps ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(SPECS))
def test_a_forward_hook_on_every_submodule_fires(packages, folders, family):
    model = _load(packages, folders, family)
    fired: set[str] = set()
    for name, m in model.named_modules():
        if name and not isinstance(m, nn.ModuleList):
            m.register_forward_hook(lambda mod, args, out, name=name: fired.add(name))
    with torch.no_grad():
        model(**_batch(family))
    expected = {n for n, m in model.named_modules() if n and not isinstance(m, nn.ModuleList)}
    assert fired == expected, f"never called through forward: {sorted(expected - fired)}"


class _PlusConstant(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.25 + 0.5  # a scale too: keys shifted by a constant give the same softmax


@pytest.mark.parametrize("family", list(SPECS))
def test_swapping_any_linear_changes_the_output(packages, folders, family):
    model = _load(packages, folders, family)
    batch = _batch(family)
    with torch.no_grad():
        base = _every_output(model(**batch))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears
    for name in linears:
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        original = getattr(parent, leaf)
        setattr(parent, leaf, _PlusConstant(original))
        try:
            with torch.no_grad():
                got = _every_output(model(**batch))
        finally:
            setattr(parent, leaf, original)
        assert (got - base).abs().max() > 1e-4, f"swapping {name} changed nothing"


def test_changed_norm_eps_takes_effect(packages, folders):
    model = _load(packages, folders, "qwen2")
    batch = _batch("qwen2")
    with torch.no_grad():
        base = model(**batch).logits
        for m in model.modules():
            if type(m).__name__ == "RMSNorm":
                m.eps = 10.0
        assert (model(**batch).logits - base).abs().max() > 1e-3


# ---- tensor parallel styles --------------------------------------------------------------------------------
def test_tensor_parallel_styles_accept_the_layers(packages, folders, tmp_path):
    """`parallelize_module` with torch's Colwise/Rowwise styles on the spec's plan, on a one-process gloo mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for family in ("qwen2", "gpt2", "bert"):
            model = _load(packages, folders, family)
            batch = _batch(family)
            with torch.no_grad():
                want = _main(family, model(**batch))
            styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            plan = {}
            for pattern, style in model.tp_plan.items():
                if style == "sequence":
                    continue  # the norms' SequenceParallel needs parallel.py's layouts (tests/test_distributed.py)
                for name, _ in model.named_modules():
                    if _matches(pattern, name):
                        plan[name] = styles[style]()
            assert plan, family
            parallelize_module(model, mesh, plan)
            assert all(isinstance(model.get_submodule(n).weight, DTensor) for n in plan)
            with torch.no_grad():
                torch.testing.assert_close(_main(family, model(**batch)), want)
    finally:
        dist.destroy_process_group()


def _matches(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(re.escape(pattern).replace(r"\{i\}", r"\d+"), name) is not None
