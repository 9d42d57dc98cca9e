"""Hugging Face semantics of the generated packages' outputs and forward, float32 on CPU, tiny random models.

ModelOutput as transformers' (positional / dict construction, to_tuple, indexing, a pytree node); forward's
return_dict, keyword checking, output_hidden_states, inputs_embeds and logits_to_keep against HF; HF Trainer
and accelerate in bf16 mixed precision; torch.export with dynamic batch and sequence; a BERT folder that
still holds the `embeddings.position_ids` buffer.
"""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    specs = [(ROOT / "models" / f"{family}.model", f"hfsem_{family}") for family in SPECS]
    with built_packages(tmp_path_factory.mktemp("hfsem_build"), *specs):
        yield {family: importlib.import_module(f"hfsem_{family}") for family in SPECS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {f: hf_oracle.make_hf_model(f, tmp_path_factory.mktemp(f"hfsem_{f}"), seed=7) for f in SPECS}


def _ours(pkgs, folders, family):
    return getattr(pkgs[family], SPECS[family]).from_pretrained(folders[family])


@pytest.fixture()
def qwen2(pkgs, folders):
    return _ours(pkgs, folders, "qwen2")


def _ids(batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, hf_oracle.VOCAB, (batch, length), generator=g)


def _main(out):
    return out.last_hidden_state if "last_hidden_state" in out else out.logits


# ---- ModelOutput ---------------------------------------------------------------------------------------------


def test_model_output_constructs_as_hf(pkgs):
    outputs = importlib.import_module("hfsem_qwen2.outputs")
    Out = outputs.CausalLMOutput
    loss, logits = torch.tensor(2.5), torch.randn(2, 3, 5)
    pos = Out(loss, logits)  # positional, in field order (how Trainer-side code rebuilds outputs)
    assert list(pos.keys()) == ["loss", "logits"]
    assert pos.loss is loss and pos["logits"] is logits and pos[0] is loss and pos[1] is logits and pos[-1] is logits
    assert pos[:2] == (loss, logits) and pos.to_tuple() == (loss, logits)
    assert pos.hidden_states is None and "hidden_states" not in pos
    # one dict or one iterable of (name, value) pairs fills the fields by name (accelerate: type(out)({...}))
    for rebuilt in (
        Out({"logits": logits, "loss": loss}),
        Out((k, v) for k, v in [("loss", loss), ("logits", logits)]),
    ):
        assert list(rebuilt.keys()) == ["loss", "logits"] and rebuilt.to_tuple() == (loss, logits)
    # None fields are left out of the dict, the tuple and the positions
    no_loss = Out(None, logits)
    assert list(no_loss.keys()) == ["logits"] and no_loss[0] is logits and no_loss.loss is None and len(no_loss) == 1
    assert Out(logits=logits, loss=loss).to_tuple() == (loss, logits)  # field order, not keyword order
    assert list(Out(logits).keys()) == ["loss"]  # one tensor is the first field's value, as in HF
    with pytest.raises(TypeError, match="no field `foo`"):
        Out(foo=logits)
    with pytest.raises(TypeError, match="both by position and by name"):
        Out(loss, loss=loss)
    with pytest.raises(AttributeError):
        pos.not_a_field  # noqa: B018
    with pytest.raises(KeyError):
        no_loss["loss"]
    pos.hidden_states = (logits,)  # attributes and keys are one
    assert pos["hidden_states"] == (logits,) and pos.to_tuple()[-1] == (logits,)
    pos.hidden_states = None
    assert "hidden_states" not in pos
    free = outputs.ModelOutput(b=1, a=None, c=2)  # the plain class takes any names, keeps their order
    assert list(free.keys()) == ["b", "c"] and free[1] == 2 and free.c == 2
    import pickle

    back = pickle.loads(pickle.dumps(Out(loss, logits)))
    assert type(back) is Out and torch.equal(back.logits, logits)


def test_accelerate_rebuilds_outputs(pkgs):
    from accelerate.utils import convert_to_fp32, send_to_device

    Out = importlib.import_module("hfsem_qwen2.outputs").CausalLMOutput
    out = Out(torch.tensor(1.0, dtype=torch.bfloat16), torch.randn(2, 3, dtype=torch.bfloat16))
    fp32 = convert_to_fp32(out)
    assert type(fp32) is Out and list(fp32.keys()) == ["loss", "logits"]
    assert fp32.loss.dtype == torch.float32 and fp32.logits.dtype == torch.float32
    torch.testing.assert_close(fp32.logits, out.logits.float())
    moved = send_to_device(out, "cpu")
    assert type(moved) is Out and torch.equal(moved.logits, out.logits)


def test_model_output_is_a_pytree_node(pkgs):
    import torch.utils._pytree as pytree

    Out = importlib.import_module("hfsem_qwen2.outputs").CausalLMOutput
    h = (torch.randn(2, 3), torch.randn(2, 3))
    out = Out(torch.tensor(1.0), torch.randn(2, 3, 5), h)
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 4 and leaves[0] is out.loss and leaves[2] is h[0]
    back = pytree.tree_unflatten([x * 2 for x in leaves], spec)
    assert type(back) is Out and list(back.keys()) == ["loss", "logits", "hidden_states"]
    torch.testing.assert_close(back.logits, out.logits * 2)
    assert isinstance(back.hidden_states, tuple) and torch.equal(back.hidden_states[1], h[1] * 2)
    paths = [path for path, _ in pytree.tree_flatten_with_path(out)[0]]
    assert paths[0] == (pytree.MappingKey("loss"),) and paths[2] == (
        pytree.MappingKey("hidden_states"),
        pytree.SequenceKey(0),
    )
    doubled = pytree.tree_map(lambda t: t + 1, out)
    assert type(doubled) is Out and torch.equal(doubled.loss, out.loss + 1)


# ---- forward's arguments ---------------------------------------------------------------------------------------


def test_return_dict_false_is_hf_tuple(pkgs, folders, qwen2):
    hf = hf_oracle.load_hf(folders["qwen2"])
    ids = _ids()
    with torch.no_grad():
        ours = qwen2(ids, labels=ids, return_dict=False)
        theirs = hf(ids, labels=ids, return_dict=False, use_cache=False)
        as_dict = qwen2(ids, labels=ids)
        plain = qwen2(ids, return_dict=False)
    assert type(ours) is tuple and len(ours) == len(theirs) == 2  # (loss, logits): loss first as HF
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert ours[0].dim() == 0 and torch.equal(ours[1], as_dict.logits)
    assert type(plain) is tuple and len(plain) == 1 and plain[0].shape == (2, 9, hf_oracle.VOCAB)
    with torch.no_grad():
        bert = _ours(pkgs, folders, "bert")(ids, return_dict=False)
    assert len(bert) == 2 and bert[0].shape == (2, 9, hf_oracle.HIDDEN) and bert[1].shape == (2, hf_oracle.HIDDEN)


def test_unknown_keywords_are_refused(qwen2):
    ids = _ids()
    with pytest.raises(TypeError, match="unexpected keyword arguments: atention_mask, foo"):
        qwen2(ids, foo=1, atention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = qwen2(ids, labels=ids).loss
        # what HF Trainer and peft pass: num_items_in_batch, flags set to None, use_cache
        got = qwen2(
            input_ids=ids,
            labels=ids,
            num_items_in_batch=None,
            inputs_embeds=None,
            output_attentions=None,
            output_hidden_states=None,
            return_dict=None,
            use_cache=False,
            past_key_values=None,
        )
        cached = qwen2(ids, use_cache=True)  # no cache is returned; the logits are the same
    torch.testing.assert_close(got.loss, want)
    assert list(cached.keys()) == ["logits"]
    torch.testing.assert_close(cached.logits, qwen2(ids).logits)


def test_what_forward_cannot_do_is_refused_clearly(pkgs, folders, qwen2):
    ids = _ids()
    with pytest.raises(ValueError, match="output_attentions"):
        qwen2(ids, output_attentions=True)
    with pytest.raises(ValueError, match="generate"):
        qwen2(ids, past_key_values=object())
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        qwen2(ids, inputs_embeds=torch.randn(2, 9, hf_oracle.HIDDEN))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        qwen2(attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="embedding width"):
        qwen2(inputs_embeds=torch.randn(2, 9, hf_oracle.HIDDEN + 1))
    with pytest.raises(ValueError, match="logits_to_keep and labels"):
        qwen2(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        _ours(pkgs, folders, "bert")(ids, logits_to_keep=1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in qwen2.modules())


@pytest.mark.parametrize("family", list(SPECS))
def test_output_hidden_states_match_hf(pkgs, folders, family):
    hf = hf_oracle.load_hf(folders[family])
    ours = _ours(pkgs, folders, family)
    ids = _ids()
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, 6:] = 0
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert len(got.hidden_states) == len(theirs.hidden_states) == hf_oracle.LAYERS + 1
    for i, (a, b) in enumerate(zip(got.hidden_states, theirs.hidden_states)):
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"hidden_states[{i}]: {m}")
    torch.testing.assert_close(_main(got), _main(theirs))
    assert list(got.keys())[-1] == "hidden_states"  # after the task's outputs, as HF
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ours.modules())
    if family != "bert":
        as_tuple = ours(ids, output_hidden_states=True, return_dict=False)
        assert len(as_tuple) == 2 and len(as_tuple[1]) == hf_oracle.LAYERS + 1
        assert ours.generate(ids[:1, :4], max_new_tokens=3).shape == (1, 7)  # decoding unaffected


def test_output_hidden_states_in_training_with_the_fused_loss(qwen2):
    ids = _ids()
    qwen2.train()
    out = qwen2(ids, labels=ids, output_hidden_states=True)
    qwen2.eval()
    with torch.no_grad():
        ref = qwen2(ids, output_hidden_states=True)
    assert list(out.keys()) == ["loss", "hidden_states"]
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b)
    out.loss.backward()
    assert qwen2.lm_head.weight.grad is not None


@pytest.mark.parametrize("family", list(SPECS))
def test_inputs_embeds_match_hf(pkgs, folders, family):
    hf = hf_oracle.load_hf(folders[family])
    ours = _ours(pkgs, folders, family)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 9, hf_oracle.HIDDEN, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    if family == "qwen2":
        mask[0, :3] = 0  # left padding (GPT-2 and BERT positions would need position_ids to follow it)
    e_hf, e_ours = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    theirs = hf(inputs_embeds=e_hf, attention_mask=mask)
    got = ours(inputs_embeds=e_ours, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(_main(got)[real], _main(theirs)[real])
    weight = torch.randn(_main(got).shape, generator=g) * real[..., None]
    (_main(theirs) * weight).sum().backward()
    (_main(got) * weight).sum().backward()
    torch.testing.assert_close(e_ours.grad, e_hf.grad)  # gradients reach inputs_embeds (soft prompts, peft)
    # the same as giving the token ids whose embeddings they are
    ids = _ids()
    table = ours.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(_main(ours(inputs_embeds=table[ids])), _main(ours(ids)))


def test_inputs_embeds_refused_where_input_ids_feed_more_than_the_embedding(qwen2):
    graph = qwen2.forward_graph

    def reads_ids(input_ids, position_ids, ctx):  # as a spec that also reads token values elsewhere
        return graph(input_ids, position_ids, ctx) + (input_ids == 0).float()[..., None]

    qwen2.forward_graph = reads_ids
    with pytest.raises(ValueError, match="reads input_ids beyond its token embedding"):
        qwen2(inputs_embeds=torch.randn(2, 9, hf_oracle.HIDDEN))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in qwen2.modules())
    assert torch.isfinite(qwen2(_ids()).logits).all()  # input_ids still work


def test_logits_to_keep(folders, qwen2):
    hf = hf_oracle.load_hf(folders["qwen2"])
    ids = _ids()
    with torch.no_grad():
        full = qwen2(ids).logits
        for n in (1, 3):
            kept = qwen2(ids, logits_to_keep=n).logits
            assert kept.shape == (2, n, hf_oracle.VOCAB)
            torch.testing.assert_close(kept, full[:, -n:])
            torch.testing.assert_close(kept, hf(ids, logits_to_keep=n).logits)
        torch.testing.assert_close(qwen2(ids, logits_to_keep=0).logits, full)  # 0 keeps all, as HF
        where = torch.tensor([0, 4, 8])
        torch.testing.assert_close(qwen2(ids, logits_to_keep=where).logits, full[:, where])
        per_row = torch.tensor([[1, 2], [5, 7]])
        torch.testing.assert_close(
            qwen2(ids, logits_to_keep=per_row).logits, torch.stack([full[0, [1, 2]], full[1, [5, 7]]])
        )
        with_hidden = qwen2(ids, logits_to_keep=1, output_hidden_states=True)
    assert with_hidden.hidden_states[-1].shape == (2, 9, hf_oracle.HIDDEN)
    torch.testing.assert_close(with_hidden.logits, full[:, -1:])


# ---- training in bf16 mixed precision --------------------------------------------------------------------------


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_hf_trainer_bf16_on_cpu(qwen2, tmp_path):
    from transformers import Trainer, TrainingArguments

    rows = []
    for i in range(6):
        ids = _ids(1, 10, seed=50 + i)[0]
        rows.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in qwen2.named_parameters()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            trainer = Trainer(model=qwen2, args=args, train_dataset=rows)
            result = trainer.train()
    finally:
        _reset_accelerate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    changed = [n for n, p in qwen2.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    assert all(p.dtype == torch.float32 for p in qwen2.parameters())  # mixed precision keeps fp32 weights


def test_accelerate_bf16_mixed_precision_on_cpu(qwen2):
    from accelerate import Accelerator

    Out = type(qwen2(_ids()))
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        model = qwen2.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        before = qwen2.lm_head.weight.detach().clone()
        losses = []
        for step in range(3):
            ids = _ids(2, 10, seed=step)
            out = model(ids, labels=ids)
            assert type(out) is Out and out.loss.dtype == torch.float32  # rebuilt by convert_to_fp32
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
        model.eval()
        with torch.no_grad():
            logits = model(_ids()).logits
    finally:
        _reset_accelerate()
    assert all(math.isfinite(x) for x in losses), losses
    assert not torch.equal(qwen2.lm_head.weight.detach(), before)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---- torch.export ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_torch_export_with_dynamic_batch_and_sequence(pkgs, folders, family):
    model = _ours(pkgs, folders, family).eval()
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=32)
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    dims = {0: batch, 1: seq}
    with torch.no_grad():
        program = torch.export.export(
            model, (ids,), {"attention_mask": mask}, dynamic_shapes={"input_ids": dims, "attention_mask": dims}
        )
    exported = program.module()
    other = _ids(3, 13, seed=5)
    other_mask = torch.ones_like(other)
    other_mask[0, :4] = 0  # left padding: the masked attention path
    with torch.no_grad():
        got = exported(other, attention_mask=other_mask)
        want = model(other, attention_mask=other_mask)
        got_plain = exported(_ids(1, 20, seed=6), attention_mask=torch.ones(1, 20, dtype=torch.long))
        want_plain = model(_ids(1, 20, seed=6))
    assert type(got) is type(want) and list(got.keys()) == ["logits"]
    assert got.logits.shape == (3, 13, hf_oracle.VOCAB)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got_plain.logits, want_plain.logits)


# ---- BERT folders with the position_ids buffer ----------------------------------------------------------------


def test_bert_folder_with_position_ids_buffer_loads_strictly(pkgs, folders, tmp_path):
    """Folders written by older transformers (sentence-transformers/all-MiniLM-L6-v2) hold the
    `embeddings.position_ids` buffer; they load with strict loading, and other extra tensors are still refused."""
    src = folders["bert"]
    tensors = load_file(str(src / "model.safetensors"))
    tensors["embeddings.position_ids"] = torch.arange(hf_oracle.MAX_POS)[None]
    tensors["embeddings.token_type_ids"] = torch.zeros(1, hf_oracle.MAX_POS, dtype=torch.long)
    folder = tmp_path / "with_buffer"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cls = pkgs["bert"].BertModel
    model = cls.from_pretrained(folder)  # strict by default
    assert "embeddings.position_ids" not in model.state_dict()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, cls.from_pretrained(src)(ids).last_hidden_state)
        torch.testing.assert_close(model(ids).last_hidden_state, hf_oracle.load_hf(folder)(ids).last_hidden_state)
    tensors["embeddings.something_else"] = torch.zeros(3)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="something_else"):
        cls.from_pretrained(folder)
