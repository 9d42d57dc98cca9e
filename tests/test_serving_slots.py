"""The generated package's serving.SlotDecoder and dslc's Scheduler on it: sequences in the rows of one static
KV cache, each at its own position, decode as each does alone (the package's generate is the oracle)."""

from __future__ import annotations

import importlib
import threading

import pytest

torch = pytest.importorskip("torch")

from dslc.serve.scheduler import QueueFull, Request, Sampling, Scheduler, ShuttingDown  # noqa: E402
from tests.packages import MODELS, built_packages  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [100, 200], [3] * 11, [42, 43, 44, 45], [7]]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    with built_packages(tmp_path_factory.mktemp("slots"), (MODELS / "qwen2.model", "qwen2_slots")):
        for sub in ("serving", "attention"):
            importlib.import_module(f"qwen2_slots.{sub}")
        yield importlib.import_module("qwen2_slots")


@pytest.fixture
def model(pkg):
    return pkg.Qwen2ForCausalLM.from_pretrained(MODELS / "tiny-qwen2", dtype=torch.float32).eval()


def alone(model, ids: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[])[0, len(ids) :].tolist()


def test_slots_decode_together_as_each_alone(pkg, model):
    n = 10
    expected = [alone(model, p, n) for p in PROMPTS]
    decoder = pkg.serving.SlotDecoder(model, len(PROMPTS), 64)
    # slot 4 first held a longer sequence: its stale keys past the new prompt must never be read
    decoder.prefill(4, list(range(30, 60)))
    out = [[int(decoder.prefill(i, p).argmax())] for i, p in enumerate(PROMPTS)]
    for step in range(n - 1):
        tokens = torch.tensor([o[-1] for o in out])
        positions = torch.tensor([len(p) + step for p in PROMPTS])
        for o, t in zip(out, decoder.step(tokens, positions).argmax(-1).tolist()):
            o.append(t)
    assert out == expected
    decoder.close()
    assert all(site.kv_cache is None for site in pkg.attention.cache_sites(model))


def test_extending_a_slot_equals_prefilling_the_whole_sequence(pkg, model):
    decoder = pkg.serving.SlotDecoder(model, 2, 64)
    whole = decoder.prefill(1, PROMPTS[2] + PROMPTS[0])
    decoder.prefill(0, PROMPTS[2])
    extended = decoder.prefill(0, PROMPTS[0], start=len(PROMPTS[2]))  # a chat's next turn
    torch.testing.assert_close(extended, whole)


def test_slot_decoder_refuses_what_does_not_fit(pkg, model):
    decoder = pkg.serving.SlotDecoder(model, 2, 16)
    with pytest.raises(ValueError, match="does not fit the cache's 16"):
        decoder.prefill(0, list(range(10)), start=8)
    with pytest.raises(ValueError, match="slot 2 is outside 0 .. 1"):
        decoder.prefill(2, [1])


def _collect(request_events: list):
    return lambda kind, value: request_events.append((kind, value))


def test_scheduler_runs_requests_and_bounds_its_queue(model):
    scheduler = Scheduler(model, slots=2, max_len=64, eos=[], max_queue=1)
    try:
        done = threading.Event()
        events: list = []

        def emit(kind, value):
            events.append((kind, value))
            if kind != "token":
                done.set()

        with scheduler.cond:  # the scheduler thread cannot take from the queue meanwhile
            scheduler.submit(Request(PROMPTS[0], Sampling(max_tokens=6), emit))
            with pytest.raises(QueueFull, match="queue bound is 1"):
                scheduler.submit(Request(PROMPTS[1], Sampling(max_tokens=6), _collect([])))
        assert done.wait(60)
        assert [v for k, v in events if k == "token"] == alone(model, PROMPTS[0], 6)
        assert events[-1] == ("done", "length")
    finally:
        scheduler.stop()
    with pytest.raises(ShuttingDown):
        scheduler.submit(Request(PROMPTS[0], Sampling(max_tokens=2), _collect([])))


def test_a_failing_request_does_not_stop_the_scheduler(model):
    scheduler = Scheduler(model, slots=2, max_len=64, eos=[], max_queue=4)
    try:
        bad, good = [], []
        finished = threading.Semaphore(0)

        def into(out):
            def emit(kind, value):
                out.append((kind, value))
                if kind != "token":
                    finished.release()

            return emit

        scheduler.submit(Request([10**9], Sampling(max_tokens=3), into(bad)))  # an id past the embedding
        scheduler.submit(Request(PROMPTS[1], Sampling(max_tokens=3), into(good)))
        assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
        assert bad[-1][0] == "error" and "generation failed" in bad[-1][1]
        assert [v for k, v in good if k == "token"] == alone(model, PROMPTS[1], 3)
    finally:
        scheduler.stop()
