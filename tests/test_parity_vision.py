"""Images: models/vit.model against transformers' ViTForImageClassification (float32, CPU: logits, loss, every
gradient by HF's parameter name, the Triton path, the save -> HF load round trip), and tests/specs/cnn.model (an
Oumi-style CNN over the `conv2d` / `max_pool2d` primitives) against the same network in plain torch.nn."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=4,
    num_channels=3, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    specs = [(ROOT / "models" / "vit.model", None), (ROOT / "tests" / "specs" / "cnn.model", None)]
    with built_packages(tmp_path_factory.mktemp("build"), *specs):
        yield importlib.import_module("vit"), importlib.import_module("cnn")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("vit")
    model = ViTForImageClassification(ViTConfig(**TINY_VIT)).eval()
    hf_oracle.randomize_(model, seed=11)
    model.save_pretrained(folder)
    return folder


def _hf(folder):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()


def _images(batch: int = 3, size: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


def _by_value(hf: nn.Module, ours: nn.Module) -> dict[str, str]:
    """HF's parameter name -> ours: transformers 5 renames ViT's modules in memory (`vit.layers.0.attention.q_proj`)
    but not in the file (`vit.encoder.layer.0.attention.attention.query`), which our names follow; the random
    values, loaded from one file, pair them."""
    theirs = dict(hf.named_parameters())
    pairs = {}
    for name, p in ours.named_parameters():
        match = [n for n, q in theirs.items() if q.shape == p.shape and torch.equal(q, p)]
        assert len(match) == 1, f"{name}: {len(match)} HF parameters hold its values"
        pairs[match[0]] = name
    assert sorted(pairs) == sorted(theirs), "parameters without a counterpart"
    return pairs


def test_vit_checkpoint_loads_with_the_files_names(packages, vit_folder):
    vit, _ = packages
    model = vit.ViTForImageClassification.from_pretrained(vit_folder)
    assert model.config.num_labels == 5  # config.json has id2label only
    names = dict(model.named_parameters())
    assert names["vit.encoder.layer.1.attention.attention.query.weight"].shape == (32, 32)
    assert names["vit.embeddings.patch_embeddings.projection.weight"].shape == (32, 3, 4, 4)
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, nn.Conv2d)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vit_logits_loss_and_gradients_match_hf(packages, vit_folder, backend):
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set: the Triton path cannot run")
    vit, _ = packages
    hf = _hf(vit_folder)
    ours = vit.ViTForImageClassification.from_pretrained(vit_folder)
    pairs = _by_value(hf, ours)
    images, labels = _images(), torch.tensor([0, 4, 2])
    kernels = importlib.import_module("vit.kernels")
    kernels.set_backend(backend)
    try:
        got = ours(pixel_values=images, labels=labels)
        got.loss.backward()
    finally:
        kernels.set_backend("auto")
    want = hf(pixel_values=images, labels=labels)
    want.loss.backward()
    assert got.logits.shape == (3, 5)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    grads = dict(ours.named_parameters())
    for theirs, p in hf.named_parameters():
        torch.testing.assert_close(grads[pairs[theirs]].grad, p.grad, msg=lambda m, n=theirs: f"gradient of {n}: {m}")


@pytest.mark.parametrize(
    ("problem_type", "labels"),
    [
        ("multi_label_classification", torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 1, 0]])),
        ("regression", torch.randn(3, 5, generator=torch.Generator().manual_seed(1))),
        (None, torch.tensor([[0.0, 1, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]])),  # float labels: multi-label
    ],
)
def test_vit_loss_follows_the_configs_problem_type(packages, vit_folder, tmp_path, problem_type, labels):
    """config.json's `problem_type` (not a spec field) picks HF's loss: BCE with logits, MSE, or inferred."""
    import json

    vit, _ = packages
    folder = tmp_path / "folder"
    folder.mkdir()
    for f in vit_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["problem_type"] = problem_type
    (folder / "config.json").write_text(json.dumps(config))
    ours = vit.ViTForImageClassification.from_pretrained(folder)
    images = _images()
    with torch.no_grad():
        want = _hf(folder)(pixel_values=images, labels=labels).loss
        got = ours(pixel_values=images, labels=labels).loss
    torch.testing.assert_close(got, want)


def test_vit_refuses_an_unknown_problem_type(packages, vit_folder):
    vit, _ = packages
    ours = vit.ViTForImageClassification.from_pretrained(vit_folder)
    ours.config.extra["problem_type"] = "ranking"
    with pytest.raises(ValueError, match="problem_type 'ranking': use one of regression"):
        ours(pixel_values=_images(), labels=torch.tensor([0, 1, 2]))


def test_vit_save_round_trips_through_hf(packages, vit_folder, tmp_path):
    vit, _ = packages
    ours = vit.ViTForImageClassification.from_pretrained(vit_folder)
    ours.save_pretrained(tmp_path)
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(
            _hf(tmp_path)(pixel_values=images).logits, _hf(vit_folder)(pixel_values=images).logits
        )


def test_vit_refuses_images_of_the_wrong_size(packages, vit_folder):
    vit, _ = packages
    ours = vit.ViTForImageClassification.from_pretrained(vit_folder)
    with pytest.raises(RuntimeError):
        ours(pixel_values=_images(size=20))  # 25 patches + [CLS] against 17 position embeddings


class TorchCNN(nn.Module):
    """The reference: the same network written with torch.nn, as an Oumi recipe would."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def test_cnn_equals_torch_nn(packages):
    _, cnn = packages
    ours = cnn.CNN(cnn.CNNConfig())
    ref = TorchCNN()
    ref.load_state_dict(ours.state_dict())
    images, labels = _images(4, 28, 1), torch.tensor([1, 9, 0, 3])
    out = ours(pixel_values=images, labels=labels)
    logits = ref(images)
    torch.testing.assert_close(out.logits, logits)
    loss = nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(out.loss, loss)
    out.loss.backward()
    loss.backward()
    mine = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(mine[name].grad, p.grad)
    assert type(out).__name__ == "ImageClassifierOutput"


# ---- the image primitives' type rules ---------------------------------------------------------------------------
IMAGE_SPEC = """use std

config C:
    channels: int = 3
    size: int = 8
    labels: int = 4

model M(C): image_classification
    conv = Conv2d(channels, 6, 3, stride = 2, padding = 1)
    head = Linear(6, labels, bias = true)

    forward(pixel_values: [B, channels, size, size]) -> [B, labels]:
        x = {body}
        return head(mean(mean(x, dim = -1), dim = -1))
"""


def _check(body: str):
    from dslc.api import check_source

    return check_source(IMAGE_SPEC.format(body=body), "t.model", None, {})


def _error(body: str):
    from dslc.diagnostics import DslcError

    with pytest.raises(DslcError) as e:
        _check(body)
    (diag,) = e.value.diagnostics
    return diag.code, diag.message


def test_image_ops_shapes():
    _check("conv(pixel_values)")  # (8 + 2 - 3) // 2 + 1 = 4
    _check("max_pool2d(conv(pixel_values), 2)")
    _check("max_pool2d(conv(pixel_values), 3, stride = 1, padding = 1)")
    _check("conv(pixel_values) + expand(reshape(mean(conv(pixel_values), dim = -1), [B, 6, 4, 1]), [B, 6, 4, 4])")


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ("conv(reshape(pixel_values, [B, 1, 3 * size, size]))", "E033", "needs size 3 where it has 1"),
        ("conv(mean(pixel_values, dim = -1))", "E031", "argument `x` of `Conv2d` must have rank 4"),
        ("max_pool2d(conv(pixel_values), 5)", "E031", "a window of 5 does not fit"),
        ("max_pool2d(conv(pixel_values), 2, padding = 2)", "E041", "padding 2 is more than half its kernel 2"),
        ("max_pool2d(conv(pixel_values), 0)", "E041", "`max_pool2d`'s kernel must be an int >= 1"),
        ("expand(conv(pixel_values), [B, 6, 8, 8])", "E034", "only size-1 dims broadcast"),
        ("expand(conv(pixel_values), [B, 6])", "E034", "needs 4 sizes"),
    ],
)
def test_image_ops_refuse_bad_shapes(body, code, message):
    got_code, got_message = _error(body)
    assert got_code == code and message in got_message, (got_code, got_message)
