"""Fast decode: the decode step over static buffers (cuda_graphs.CUDAGraphDecoder), captured in a CUDA graph.

On the CPU: the decoder's eager mode runs the same buffer-copy logic as the graph (tokens equal plain
`generate`, greedy and sampled); the decode step is graph-safe (no host sync, no host tensor, the same
ops on the same shapes at every step, the same buffers and KV caches throughout); the reuse of a kept
decoder across calls. On CUDA (skipped without it): graph greedy == eager greedy == Hugging Face
greedy on a tiny random Qwen2, float32 and bfloat16, batch 1 and a left-padded batch 4; graph sampling
== eager sampling for a seed; one replay per decoded token; fallback when the capture fails; reuse.
"""

from __future__ import annotations

import importlib
import shutil
import warnings
from pathlib import Path

import hf_oracle
import pytest
import torch
from packages import built_packages
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
NAME = "dectest_qwen2"


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    with built_packages(tmp_path_factory.mktemp("dectest_build"), (ROOT / "models" / "qwen2.model", NAME)) as out:
        yield out


@pytest.fixture(scope="session")
def pkg(built):
    if not (built / NAME / "cuda_graphs.py").exists():
        # dslc/codegen/package.py does not ship it yet (STATIC_FILES): test_cuda_graphs_ships says so;
        # the other tests still run against the template
        shutil.copy(ROOT / "templates" / "package" / "cuda_graphs.py", built / NAME / "cuda_graphs.py")
    return importlib.import_module(NAME)


@pytest.fixture(scope="session")
def cg(pkg):
    return importlib.import_module(f"{NAME}.cuda_graphs")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return hf_oracle.make_hf_model("qwen2", tmp_path_factory.mktemp("dec_hf_qwen2"), tie=False, seed=3)


@pytest.fixture()
def model(pkg, qwen2_dir, cg):
    m = pkg.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    yield m
    cg.release(m)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, hf_oracle.VOCAB, (batch, length), generator=g)


def _left_padded(batch: int, length: int, seed: int = 0, device="cpu"):
    """Ids [batch, length] and a mask where row i has i * 3 left pads (row 0 none)."""
    ids = _ids(batch, length, seed)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, : min(3 * i, length - 1)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def _decode_with(cg, model, ids, mask, new: int, graph: bool):
    """generate()'s loop by hand: prefill, then every step through a CUDAGraphDecoder. Returns (tokens, decoder)."""
    batch, prompt = ids.shape
    total = prompt + new
    key_mask = torch.ones(batch, total, dtype=torch.bool, device=ids.device)
    key_mask[:, :prompt] = mask.bool()
    pos = (key_mask[:, :prompt].long().cumsum(-1) - 1).masked_fill(~key_mask[:, :prompt], 0)
    model.eval()
    model.setup_cache(batch, total)
    try:
        with torch.no_grad():
            logits = model.decode_step(ids, pos, key_mask, torch.arange(prompt, device=ids.device))
            decoder = cg.CUDAGraphDecoder(model, key_mask, logits.shape[-1], graph=graph)
            token = logits[:, -1].float().argmax(-1)
            out = [token]
            next_pos = pos[:, -1:] + 1
            for t in range(prompt, total - 1):
                token = decoder.step(token[:, None], next_pos, t)
                out.append(token)
                next_pos = next_pos + 1
    finally:
        model.clear_cache()
    return torch.cat([ids, torch.stack(out, 1)], 1), decoder


# ---- CPU: the static-buffer decode loop ---------------------------------------------------------------------
def test_cuda_graphs_ships_with_the_package():
    from dslc.codegen import package

    assert "cuda_graphs.py" in package.STATIC_FILES, (
        "add 'cuda_graphs.py' to STATIC_FILES in dslc/codegen/package.py: generate(cuda_graph=...) imports it"
    )


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused_projections"])
@pytest.mark.parametrize("batch", [1, 3])
def test_eager_decoder_equals_generate(cg, model, batch, fused):
    if fused:
        model.fuse_projections()
    ids, mask = _left_padded(batch, 9, seed=batch)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, cuda_graph=False)
    got, decoder = _decode_with(cg, model, ids, mask, 12, graph=False)
    assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    assert decoder.graph is None and decoder.replays == 0 and decoder.steps == 11


def test_generate_with_cuda_graph_true_on_cpu_warns_and_decodes_eagerly(model):
    ids, mask = _left_padded(3, 8, seed=5)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=10, cuda_graph=False)
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, cuda_graph=True)
    assert torch.equal(got, plain)
    assert all(getattr(m, "kv_cache", None) is None for m in model.modules())


def test_default_on_cpu_is_the_plain_loop(model, cg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(_ids(2, 5), max_new_tokens=4)
    assert cg.decoder_of(model) is None


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=1.5), dict(temperature=0.8, top_k=20), dict(top_p=0.9)],
    ids=["temperature", "top_k", "top_p"],
)
def test_static_buffer_sampling_equals_multinomial(model, kw):
    """argmax(probs / Exp(1) noise), noise drawn from the caller's generator, equals torch.multinomial."""
    ids, mask = _left_padded(3, 6, seed=2)

    def run(cuda_graph):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=12,
                do_sample=True,
                generator=torch.Generator().manual_seed(7),
                cuda_graph=cuda_graph,
                **kw,
            )

    plain, buffered = run(False), run(True)
    assert torch.equal(buffered, plain)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert not torch.equal(plain, greedy)


def test_eos_and_pads_through_the_decoder(model):
    ids = _ids(2, 6, seed=7)
    greedy = model.generate(ids, max_new_tokens=10)
    eos = int(greedy[0, 6 + 3])
    plain = model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, cuda_graph=False)
    with pytest.warns(UserWarning):
        got = model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, cuda_graph=True)
    assert torch.equal(got, plain)


def test_decoder_needs_the_prefilled_caches(cg, model):
    key_mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="filled by the prefill"):
        cg.CUDAGraphDecoder(model, key_mask, hf_oracle.VOCAB, graph=False)
    model.setup_cache(1, 8)  # set up, but not yet allocated: allocation happens at the first decode_step
    try:
        with pytest.raises(ValueError, match="filled by the prefill"):
            cg.CUDAGraphDecoder(model, key_mask, hf_oracle.VOCAB, graph=False)
    finally:
        model.clear_cache()


class _Trace(TorchDispatchMode):
    """Every aten op run: (name, input shapes/dtypes, output shapes/dtypes)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def sig(x):
            leaves = x if isinstance(x, (list, tuple)) else [x]
            return tuple((tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor))

        self.ops.append((str(func), sig(list(args) + list((kwargs or {}).values())), sig(out)))
        return out


# what cannot run inside a CUDA graph capture: a device -> host read, a host -> device tensor,
# output shapes that depend on the data
HOST_SYNC_OPS = (
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.lift_fresh",
    "aten.masked_select",
    "aten.unique",
    "aten._assert_async",
)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sample"])
def test_decode_step_is_graph_safe(cg, model, sample):
    ids, mask = _left_padded(2, 6, seed=1)
    batch, prompt, new = 2, 6, 8
    total = prompt + new
    key_mask = torch.ones(batch, total, dtype=torch.bool)
    key_mask[:, :prompt] = mask.bool()
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model.eval()
    model.setup_cache(batch, total)
    try:
        with torch.no_grad():
            model.decode_step(ids, pos, key_mask, torch.arange(prompt))
            decoder = cg.CUDAGraphDecoder(
                model,
                key_mask,
                hf_oracle.VOCAB,
                do_sample=sample,
                top_k=10,
                top_p=0.9,
                generator=torch.Generator().manual_seed(0),
                graph=False,
            )
            buffers = [
                decoder.input_ids,
                decoder.position_ids,
                decoder.cache_position,
                decoder.key_mask,
                decoder.next_token,
            ] + ([decoder.noise] if sample else [])
            addresses = [b.data_ptr() for b in buffers] + [t.data_ptr() for c in decoder.caches for t in (c.k, c.v)]
            traces = []
            token, next_pos = torch.tensor([[5], [9]]), pos[:, -1:] + 1
            for t in range(prompt, total - 1):
                # the captured part of a step: everything after the input copies
                decoder.input_ids.copy_(token)
                decoder.position_ids.copy_(next_pos)
                decoder.cache_position.fill_(t)
                with _Trace() as trace:
                    decoder._run()
                traces.append(trace.ops)
                token, next_pos = decoder.next_token[:, None].clone(), next_pos + 1
            after = [b.data_ptr() for b in buffers] + [t.data_ptr() for c in decoder.caches for t in (c.k, c.v)]
    finally:
        model.clear_cache()
    names = {op for op, _, _ in traces[0]}
    bad = sorted(n for n in names if n.startswith(HOST_SYNC_OPS))
    assert not bad, f"the decode step runs host-synchronizing or data-dependent ops: {bad}"
    assert any("index_copy" in n for n in names), "the KV cache write is not in the step"
    for t, trace in enumerate(traces[1:], start=1):
        assert trace == traces[0], f"step {t} runs other ops or shapes than step 0: not capturable once"
    assert after == addresses, "a static buffer or KV cache moved during decoding"


def test_kept_decoder_is_reused_with_new_prompts_and_masks(cg, model):
    """The reuse path, eagerly: a kept decoder (its KV caches holding an older call's k/v) decodes a new,
    shorter, differently padded prompt of the same total length exactly as a fresh cache does."""
    ids, mask = _left_padded(3, 8, seed=4)
    first, decoder = _decode_with(cg, model, ids, mask, 10, graph=False)  # fills the caches with call 1
    cg.keep(model, decoder)
    ids2, mask2 = _left_padded(3, 5, seed=9)
    mask2[0, :2] = 0  # another padding pattern
    ids2 = ids2.masked_fill(mask2 == 0, 0)
    plain = model.generate(ids2, attention_mask=mask2, max_new_tokens=13, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reused: no new decoder, so no CPU warning
        got = model.generate(ids2, attention_mask=mask2, max_new_tokens=13, cuda_graph=True)
    assert torch.equal(got, plain)
    assert cg.decoder_of(model) is decoder and decoder.steps == 9 + 12
    # another shape, other sampling settings or other weights: not reused
    key_mask = torch.ones(3, 18, dtype=torch.bool)
    assert cg.reuse(model, key_mask) is decoder
    assert cg.reuse(model, key_mask, do_sample=True) is None and cg.decoder_of(model) is None
    cg.keep(model, decoder)
    assert cg.reuse(model, torch.ones(2, 18, dtype=torch.bool)) is None
    cg.keep(model, decoder)
    model.to(torch.float64)
    assert cg.reuse(model, key_mask) is None
    model.clear_cache()


# ---- CUDA: the captured graph ------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def hf_cuda(qwen2_dir):
    return {name: hf_oracle.load_hf(qwen2_dir).to("cuda", dtype) for name, dtype in DTYPES.items()}


def _cuda_model(pkg, qwen2_dir, dtype):
    return pkg.Qwen2ForCausalLM.from_pretrained(qwen2_dir, dtype=DTYPES[dtype], device="cuda")


def _assert_near_greedy(hf, seq, mask, prompt, tol):
    """Each token of `seq` after `prompt` is, within `tol`, the argmax of HF's logits (teacher forcing):
    bfloat16 rounding differs between implementations, so near-ties may break either way."""
    full = torch.cat([mask, torch.ones_like(seq[:, prompt:])], 1)
    pos = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
    with torch.no_grad():
        logits = hf(input_ids=seq, attention_mask=full, position_ids=pos).logits.float()
    for t in range(prompt, seq.shape[1]):
        row = logits[:, t - 1]
        chosen = row.gather(1, seq[:, t : t + 1]).squeeze(1)
        gap = row.max(-1).values - chosen
        assert bool((gap <= tol).all()), f"position {t}: our token is {gap.max():.4f} below HF's argmax logit"


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graph_greedy_equals_eager_and_hf(pkg, cg, qwen2_dir, hf_cuda, dtype, batch):
    model = _cuda_model(pkg, qwen2_dir, dtype)
    ids, mask = _left_padded(batch, 12, seed=batch, device="cuda")
    new = 20
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=new, cuda_graph=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = model.generate(ids, attention_mask=mask, max_new_tokens=new)  # default: graphs on CUDA
    fallbacks = [str(w.message) for w in caught if "decoding eagerly" in str(w.message)]
    assert not fallbacks, f"the capture fell back: {fallbacks}"
    decoder = cg.decoder_of(model)
    assert decoder is not None and decoder.graph is not None, "generate on CUDA did not capture a graph"
    assert decoder.replays == new - 1, "one replay per decoded token (the first comes from the prefill)"
    assert torch.equal(graph, eager), f"graph {graph.tolist()} != eager {eager.tolist()}"
    hf = hf_cuda[dtype]
    if dtype == "fp32":
        expected = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=hf_oracle.EOS,
        )
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=hf_oracle.EOS, pad_token_id=0)
        assert torch.equal(ours, expected), f"ours {ours.tolist()} != HF {expected.tolist()}"
    else:
        _assert_near_greedy(hf, graph, mask, ids.shape[1], tol=0.1)
    cg.release(model)


@pytest.mark.cuda
def test_graph_replays_once_per_token_and_is_reused(pkg, cg, qwen2_dir):
    model = _cuda_model(pkg, qwen2_dir, "bf16")
    ids, mask = _left_padded(4, 10, seed=3, device="cuda")
    a = model.generate(ids, attention_mask=mask, max_new_tokens=16)
    decoder = cg.decoder_of(model)
    assert decoder.replays == 15 and decoder.steps == 15
    b = model.generate(ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=18)  # same total: reused
    assert cg.decoder_of(model) is decoder and decoder.replays == 15 + 17
    assert torch.equal(b, model.generate(ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=18, cuda_graph=False))
    assert torch.equal(a, model.generate(ids, attention_mask=mask, max_new_tokens=16, cuda_graph=False))
    model.generate(ids[:1], max_new_tokens=5)  # another batch: a new graph
    assert cg.decoder_of(model) is not decoder
    assert all(getattr(m, "kv_cache", None) is None for m in model.modules())
    cg.release(model)
    assert cg.decoder_of(model) is None


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [dict(temperature=1.3), dict(top_k=10, top_p=0.9)], ids=["temperature", "top_k_p"])
def test_graph_sampling_equals_eager_sampling(pkg, cg, qwen2_dir, kw):
    model = _cuda_model(pkg, qwen2_dir, "fp32")
    ids, mask = _left_padded(4, 8, seed=6, device="cuda")

    def run(cuda_graph, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=16, do_sample=True, generator=gen, cuda_graph=cuda_graph, **kw
        )

    eager, graph = run(False), run(True)
    assert cg.decoder_of(model).graph is not None
    assert torch.equal(graph, eager)
    assert torch.equal(run(True), graph), "reused graph, same seed: same tokens"
    assert not torch.equal(run(True, seed=1), graph)
    cg.release(model)


@pytest.mark.cuda
def test_failed_capture_warns_and_decodes_eagerly(pkg, cg, qwen2_dir, monkeypatch):
    model = _cuda_model(pkg, qwen2_dir, "fp32")
    ids, mask = _left_padded(2, 8, seed=8, device="cuda")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, cuda_graph=False)
    real = type(model).decode_step

    def syncing_step(self, *args):
        out = real(self, *args)
        out.sum().item()  # a host sync: fine eagerly, illegal while capturing
        return out

    monkeypatch.setattr(type(model), "decode_step", syncing_step)
    with pytest.warns(UserWarning, match="capture of the decode step failed"):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, cuda_graph=True)
    assert torch.equal(got, expected)
    assert cg.decoder_of(model) is None, "a failed capture is not kept"


@pytest.mark.cuda
def test_graph_decoder_by_hand_counts_replays(pkg, cg, qwen2_dir):
    model = _cuda_model(pkg, qwen2_dir, "bf16")
    ids, mask = _left_padded(4, 7, seed=2, device="cuda")
    got, decoder = _decode_with(cg, model, ids, mask, 9, graph=True)
    assert decoder.graph is not None and decoder.replays == 8
    eager, _ = _decode_with(cg, model, ids, mask, 9, graph=False)
    assert torch.equal(got, eager)
