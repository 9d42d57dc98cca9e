"""Losses declared in the spec (`loss cross_entropy(label_smoothing =, weight =)`, `loss z_loss(coef =)`, `mse`,
`bce`), against torch.nn's losses and a hand-computed z-loss over the logits of the real transformers models
(tiny, random, float32 on CPU): the loss and every gradient, the fused linear cross-entropy of a causal LM
against its unfused loss, the options read from the config at run time, and a classifier trained by
transformers.Trainer, whose logged loss is the declared one."""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import MODELS, built_packages

from dslc.ir import nodes as N

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "qwen2_losses.model"
WEIGHTS = [1.0, 2.0, 0.5]

# models/qwen2.model with declared losses: options from config fields, class weights unset (none) by default
LM_FIELDS = """    label_smoothing: float = 0.1                # CrossEntropyLoss(label_smoothing=)
    class_weights: list[float]? = none          # one weight per token of the vocabulary
    z_loss_coef: float = 0.01                   # loss += z_loss_coef * z_loss
"""
LM_LOSSES = """    loss cross_entropy(label_smoothing = label_smoothing, weight = class_weights)
    loss z_loss(coef = z_loss_coef)
"""


def _qwen2_with_losses(path: Path) -> Path:
    text = (MODELS / "qwen2.model").read_text()
    field = "    tie_word_embeddings: bool = false"
    tie = "    tie lm_head.weight = model.embed_tokens.weight if tie_word_embeddings\n"
    assert field in text and tie in text
    text = text.replace(field, LM_FIELDS + field, 1).replace(tie, tie + LM_LOSSES, 1)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("losses")
    lm = _qwen2_with_losses(tmp / "qwen2_declared.model")
    with built_packages(tmp / "build", (lm, "loss_lm"), (SPEC, "loss_cls")):
        yield importlib.import_module("loss_lm"), importlib.import_module("loss_cls")


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return hf_oracle.make_hf_model("qwen2", tmp_path_factory.mktemp("loss_lm_hf"), seed=3)


@pytest.fixture(scope="module")
def cls_folder(tmp_path_factory):
    """A tiny random transformers Qwen2ForSequenceClassification (3 labels), saved."""
    from transformers import Qwen2ForSequenceClassification

    config = hf_oracle._config("qwen2", False)
    config.num_labels, config.pad_token_id = 3, 0  # pad 0: the ids below never hold it, so HF pools position -1
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config).float()
    hf_oracle.randomize_(model, 5)
    folder = tmp_path_factory.mktemp("loss_cls_hf")
    model.save_pretrained(folder)
    return folder


def _ids(batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, hf_oracle.VOCAB, (batch, length), generator=g)


def _grads(model, loss) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(loss, params)))


def _assert_grads(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}", **tol)


def _z_by_hand(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """mean over the kept rows of logsumexp(logits)^2, written out."""
    top = logits.amax(dim=-1, keepdim=True)
    lse = (top + (logits - top).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
    return (lse[keep] ** 2).sum() / keep.sum()


# ---- the registry and the package agree ------------------------------------------------------------


def test_every_registry_kind_is_implemented(pkgs):
    losses = pkgs[1].losses
    main = {k for k, v in N.LOSSES.items() if v.role == "main"}
    aux = {k for k, v in N.LOSSES.items() if v.role == "aux" and v.declared_by is None}
    assert main == set(losses.LOSS_PROBLEM_TYPES) and aux == set(losses.AUX_LOSSES)
    assert {v.output for k, v in N.LOSSES.items() if k in aux} == aux  # each aux term's output field is its name
    for name in aux:
        assert all(name in cls.fields for cls in pkgs[1].outputs.TASK_OUTPUTS.values() if "loss" in cls.fields)


# ---- a causal LM: label smoothing, class weights and z-loss, against transformers' Qwen2 ------------


def _lm_reference(hf, ids, labels, smoothing, weight, coef):
    """The declared loss over transformers' logits: CrossEntropyLoss on the shifted labels + coef * z-loss."""
    logits = hf(input_ids=ids).logits.float()  # [B, T, V]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    w = torch.tensor(weight) if weight is not None else None
    ce = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing)(flat, target)
    z = _z_by_hand(flat, target != -100)
    return ce + coef * z, z


@pytest.mark.parametrize("weighted", [False, True])
def test_causal_lm_declared_loss_equals_torch_on_hf_logits(pkgs, lm_folder, weighted):
    ours = pkgs[0].Qwen2ForCausalLM.from_pretrained(lm_folder).eval()
    hf = hf_oracle.load_hf(lm_folder)
    weight = None
    if weighted:
        weight = torch.rand(hf_oracle.VOCAB, generator=torch.Generator().manual_seed(1)).mul(2).tolist()
        ours.config.class_weights = weight  # read from the config when the loss is computed
    ids = _ids()
    labels = ids.clone()
    labels[0, :4] = -100
    out = ours(input_ids=ids, labels=labels)
    assert list(out.keys()) == ["loss", "logits", "z_loss"]
    want, want_z = _lm_reference(hf, ids, labels, 0.1, weight, 0.01)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.z_loss, want_z)
    assert out.loss.item() != pytest.approx(hf(input_ids=ids, labels=labels).loss.item())  # not HF's plain CE
    _assert_grads(_grads(ours, out.loss), _grads(hf, want))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_items", [None, 40])
def test_causal_lm_fused_declared_loss_equals_unfused(pkgs, lm_folder, weighted, num_items):
    ours = pkgs[0].Qwen2ForCausalLM.from_pretrained(lm_folder)
    if weighted:
        ours.config.class_weights = torch.rand(hf_oracle.VOCAB, generator=torch.Generator().manual_seed(2)).tolist()
    ids = _ids(seed=4)
    labels = ids.clone()
    labels[1, 2:6] = -100
    kwargs = dict(input_ids=ids, labels=labels, num_items_in_batch=num_items)
    plain = ours.eval()(**kwargs)
    plain_grads = _grads(ours, plain.loss)
    fused = ours.train()(**kwargs)  # training: the chunked fused loss, no [tokens, vocab] logits
    assert "logits" not in fused and fused.z_loss is not None
    torch.testing.assert_close(fused.loss, plain.loss)
    torch.testing.assert_close(fused.z_loss, plain.z_loss)
    _assert_grads(_grads(ours, fused.loss), plain_grads)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_declared_rows_equal_unfused(pkgs, chunk, dtype):
    """The fused loss's declared path, chunk by chunk, against losses.causal_lm_loss + z_loss on the logits;
    bf16 within bf16 rounding of the float32 reference."""
    mod = pkgs[0].losses
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(301, 16, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(301, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 301, (3, 11), generator=g)
    labels[0, :4] = -100
    w = torch.rand(301, generator=g).mul(2).tolist()
    loss, z = mod.fused_causal_lm_losses(
        hidden, weight, bias, labels, chunk=chunk, label_smoothing=0.2, class_weight=w, z_coef=0.1
    )
    got = torch.autograd.grad(loss * 2.5, (hidden, weight, bias))
    h, wt, b = (x.detach().float().requires_grad_() for x in (hidden, weight, bias))
    logits = h @ wt.T + b
    ref_z = mod.z_loss(logits, labels, shift=True)
    ref = mod.causal_lm_loss(logits, labels, label_smoothing=0.2, weight=w) + 0.1 * ref_z
    want = torch.autograd.grad(ref * 2.5, (h, wt, b))
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(z, ref_z, **tol)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e, **tol)


def test_default_spec_keeps_the_plain_fused_loss(pkgs):
    """Without `loss` lines nothing changes: fused_causal_lm_loss is fused_causal_lm_losses' plain path."""
    mod = pkgs[0].losses
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    loss = mod.fused_causal_lm_loss(hidden, weight, None, labels, chunk=3)
    torch.testing.assert_close(loss, mod.causal_lm_loss(hidden @ weight.T, labels))
    loss, z = mod.fused_causal_lm_losses(hidden, weight, None, labels, chunk=3)
    assert z.item() == 0.0 and not z.requires_grad


# ---- a classifier: tests/specs/qwen2_losses.model against transformers' Qwen2ForSequenceClassification ---


def test_classifier_declared_loss_equals_torch_on_hf_logits(pkgs, cls_folder):
    from transformers import AutoModelForSequenceClassification

    ours = pkgs[1].Qwen2ForSequenceClassification.from_pretrained(cls_folder).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(cls_folder, dtype=torch.float32).eval()
    ids, labels = _ids(batch=5), torch.tensor([0, 2, 1, -100, 2])
    out = ours(input_ids=ids, labels=labels)
    assert list(out.keys()) == ["loss", "logits", "z_loss"]
    logits = hf(input_ids=ids).logits.float()
    torch.testing.assert_close(out.logits, logits)
    ce = torch.nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS), label_smoothing=0.1)(logits, labels)
    z = _z_by_hand(logits, labels != -100)
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.loss, ce + 1e-3 * z)
    _assert_grads(_grads(ours, out.loss), _grads(hf, ce + 1e-3 * z))
    # HF Trainer's num_items_in_batch: the weighted sum divided by it, as transformers' fixed_cross_entropy
    counted = ours(input_ids=ids, labels=labels, num_items_in_batch=4)
    loss_sum = torch.nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS), label_smoothing=0.1, reduction="sum")
    lse2 = torch.logsumexp(logits, -1)[labels != -100].square().sum()
    torch.testing.assert_close(counted.loss, loss_sum(logits, labels) / 4 + 1e-3 * lse2 / 4)


def test_classifier_options_follow_the_config(pkgs, cls_folder):
    ours = pkgs[1].Qwen2ForSequenceClassification.from_pretrained(cls_folder).eval()
    ids, labels = _ids(batch=4), torch.tensor([0, 2, 1, 1])
    ours.config.label_smoothing, ours.config.class_weights, ours.config.z_loss_coef = 0.0, None, 0.0
    out = ours(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    ours.config.class_weights = [1.0, 2.0]  # config.json may set a list that does not fit
    with pytest.raises(ValueError, match="2 entries, but the logits have 3 classes"):
        ours(input_ids=ids, labels=labels)
    ours.config.class_weights = WEIGHTS
    ours.config.problem_type = "regression"
    with pytest.raises(ValueError, match="declares `loss cross_entropy`"):
        ours(input_ids=ids, labels=labels)


@pytest.mark.parametrize(
    "line,labels,reference",
    [
        ("loss mse", lambda g: torch.randn(4, 3, generator=g), lambda x, y: torch.nn.MSELoss()(x, y)),
        (
            "loss bce(pos_weight = [1.0, 3.0, 0.5])",
            lambda g: torch.randint(0, 2, (4, 3), generator=g).float(),
            lambda x, y: torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0, 0.5]))(x, y),
        ),
    ],
)
def test_classifier_mse_and_bce(tmp_path, line, labels, reference):
    text = SPEC.read_text().replace(
        "    loss cross_entropy(label_smoothing = label_smoothing, weight = class_weights)", "    " + line
    )
    spec = tmp_path / "variant.model"
    spec.write_text(text)
    name = "loss_" + line.split()[1].split("(")[0]
    with built_packages(tmp_path / "build", (spec, name)):
        pkg = importlib.import_module(name)
    model = pkg.Qwen2ForSequenceClassification(pkg.ClassifierConfig()).eval()
    hf_oracle.randomize_(model, 0)
    y = labels(torch.Generator().manual_seed(3))
    out = model(input_ids=_ids(batch=4), labels=y)
    z = _z_by_hand(out.logits.float(), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(out.loss, reference(out.logits, y) + 1e-3 * z)


# ---- transformers.Trainer sees the declared loss ------------------------------------------------------


def test_trainer_trains_on_the_declared_loss(pkgs, tmp_path):
    from transformers import Trainer, TrainingArguments

    cls = pkgs[1].Qwen2ForSequenceClassification
    model = cls(pkgs[1].ClassifierConfig())
    hf_oracle.randomize_(model, 0)
    ids = _ids(batch=6, seed=9)
    labels = torch.tensor([0, 1, 2, 2, 1, -100])
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(6)]
    with torch.no_grad():  # the declared loss of the first step's batch (all six rows), by hand
        logits = model.eval()(input_ids=ids).logits
        ce = torch.nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS), label_smoothing=0.1, reduction="sum")
        keep = labels != -100
        want = (ce(logits, labels) + 1e-3 * torch.logsumexp(logits, -1)[keep].square().sum()) / keep.sum()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=6,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            trainer = Trainer(model=model, args=args, train_dataset=rows)
            trainer.train()
    finally:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(want.item(), rel=1e-4)
    assert losses[-1] < losses[0]


def test_loss_stays_a_free_name(tmp_path):
    """`loss` starts a loss line only before a kind: a submodule or a variable may still be called `loss`."""
    from dslc.api import check_file

    spec = tmp_path / "free.model"
    spec.write_text(
        "use std\n\nconfig C:\n    vocab: int = 20\n    dim: int = 8\n\n"
        "model M(C): causal_lm\n    embed = Embedding(vocab, dim)\n    loss = Linear(dim, vocab)\n"
        "    loss z_loss(coef = 0.5)\n\n"
        "    forward(ids: [B, T] i64) -> [B, T, vocab]:\n        h = embed(ids)\n        return loss(h)\n"
    )
    program = check_file(str(spec)).program
    assert [(d.kind, [k for k, _ in d.options]) for d in program.losses] == [("z_loss", ["coef"])]
