"""Activation checkpointing that composes: every block, every n-th block, selective (the spec's
`save_activations` op kinds kept) and CPU offload, each equal to the plain backward, and under
`torch.compile(fullgraph=True)` with a padding mask (no graph break)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from packages import built_packages  # noqa: E402

from dslc.api import check_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_class(tmp_path_factory):
    out = tmp_path_factory.mktemp("remat")
    spec = (ROOT / "models" / "qwen2.model").read_text()
    assert "    activation_checkpointing DecoderLayer\n" in spec
    spec = spec.replace(
        "    activation_checkpointing DecoderLayer\n",
        "    activation_checkpointing DecoderLayer\n    save_activations attention\n",
    )
    (out / "qwen2_remat.model").write_text(spec)
    with built_packages(out / "pkg", (out / "qwen2_remat.model", None)):
        yield importlib.import_module("qwen2_remat").Qwen2ForCausalLM


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from hf_oracle import make_hf_model

    return make_hf_model("qwen2", tmp_path_factory.mktemp("hf"))


def _batch():
    ids = torch.randint(1, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the attention masks are built inside the checkpointed blocks
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _loss_and_grads(model, step):
    model.zero_grad()
    loss = step(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


BATCH = _batch()  # made outside the compiled step (a Generator cannot be created inside torch.compile)


def _step(model):
    ids, mask, labels = BATCH
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


VARIANTS = {
    "every block": dict(),
    "every 2nd block": dict(every_n_layers=2),
    "selective (spec: attention)": dict(),  # remat_save comes from the spec's save_activations line
    "selective linear + attention": dict(save=("linear", "attention")),
    "offload": dict(offload=True),
}


def test_the_spec_names_the_saved_op_kinds(model_class):
    from dslc.diagnostics import DslcError

    assert model_class.remat_save == ("attention",)
    bad = (
        (ROOT / "models" / "qwen2.model")
        .read_text()
        .replace(
            "    activation_checkpointing DecoderLayer\n",
            "    activation_checkpointing DecoderLayer\n    save_activations linaer\n",
        )
    )
    with pytest.raises(DslcError) as info:
        check_source(bad, "bad.model")
    messages = [d.message for d in info.value.diagnostics]
    assert any("unknown op kind `linaer`" in m for m in messages), messages


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_remat_equals_the_plain_backward(model_class, folder, variant):
    model = model_class.from_pretrained(folder).train()
    want_loss, want = _loss_and_grads(model, _step)
    model.gradient_checkpointing_enable(**VARIANTS[variant])
    assert model.is_gradient_checkpointing
    loss, got = _loss_and_grads(model, _step)
    torch.testing.assert_close(loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_every_n_layers_recomputes_only_those_blocks(model_class, folder):
    model = model_class.from_pretrained(folder).train()
    model.gradient_checkpointing_enable(every_n_layers=2)
    flags = [getattr(b, "_dslc_recompute", None) for b in model.model.layers]
    assert flags == [i % 2 == 0 for i in range(len(flags))]
    with pytest.raises(ValueError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=0)
    with pytest.raises(ValueError, match="unknown op kind"):
        model.gradient_checkpointing_enable(save=("softmax",))


@pytest.mark.parametrize("variant", ["every block", "every 2nd block", "selective linear + attention"])
def test_remat_under_torch_compile_fullgraph_with_a_padding_mask(model_class, folder, variant):
    import torch._dynamo

    model = model_class.from_pretrained(folder).train()
    want_loss, want = _loss_and_grads(model, _step)
    model.gradient_checkpointing_enable(**VARIANTS[variant])
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True)  # fullgraph: any graph break is an error
    loss, got = _loss_and_grads(model, compiled)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def _attention_calls(model) -> int:
    """aten attention kernels run by one forward + backward (a recomputed block runs its attention again)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func) and "backward" not in str(func):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        _loss_and_grads(model, _step)
    return Count.calls


def test_selective_checkpointing_keeps_the_attention_output(model_class, folder):
    """Plain remat runs each block's attention twice (forward, recompute); with `save_activations attention`
    the recompute reuses the saved output."""
    model = model_class.from_pretrained(folder).train()
    layers = len(model.model.layers)
    assert _attention_calls(model) == layers
    model.gradient_checkpointing_enable(save=())
    assert _attention_calls(model) == 2 * layers
    model.gradient_checkpointing_enable()  # the spec's save_activations: attention
    assert _attention_calls(model) == layers
