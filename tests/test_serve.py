"""`dslc serve` on the bundled tiny-qwen2 (with a ChatML template), driven by the official `openai` client on
127.0.0.1: greedy results equal `dslc generate` and the prompt run alone, 8 concurrent streams each get their
own, a disconnect frees its slot, bad requests get a 4xx with a message and harm nobody else."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from dslc.cli import main  # noqa: E402
from dslc.serve.command import build_server  # noqa: E402
from tests.serve_helpers import SPEC, folder_with_template, running, serve_args  # noqa: E402

MODEL = "tiny-qwen2"
PROMPTS = [
    "def parse_args(",
    "import os\n",
    "class Node:",
    "for i in range(",
    "# Compute the sum of a list\ndef total(xs):",
    "x = [",
    'if __name__ == "__main__":',
    "return",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    weights = folder_with_template(tmp)
    runtime, app = build_server(serve_args(weights, tmp / "build", "--slots", "8", "--max-body", "4096"))
    reference = (
        type(runtime.model).from_pretrained(weights, dtype=torch.float32).eval()
    )  # its own caches: the server owns runtime.model
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield SimpleNamespace(
            url=url, runtime=runtime, weights=weights, build=tmp / "build", client=client, ref=reference
        )


def alone(served, ids: list[int], n: int) -> str:
    """The greedy continuation of `ids` by itself (the package's generate, no server), as text."""
    out = served.ref.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=served.runtime.eos)[0, len(ids) :]
    tokens = [t for t in out.tolist() if t not in served.runtime.eos]
    return served.runtime.decode(tokens)


def health(served) -> dict:
    return httpx.get(served.url + "/health", timeout=10).json()


def test_greedy_completion_equals_dslc_generate(served, capsys):
    prompt = PROMPTS[0]
    rc = main(
        ["generate", str(SPEC), "--weights", str(served.weights), "--prompt", prompt, "--max-new-tokens", "12"]
        + ["--build-dir", str(served.build)]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    got = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out == prompt + got.choices[0].text + "\n"
    assert got.usage.prompt_tokens == len(served.runtime.encode(prompt))
    assert got.choices[0].finish_reason in ("length", "stop")
    chunks = list(
        served.client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == got.choices[0].text
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_chat_completion_renders_the_template_as_transformers(served):
    from transformers import PreTrainedTokenizerFast

    from dslc.chat_template import ChatTemplate

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a parser"}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(served.weights / "tokenizer.json"))
    hf.chat_template = ChatTemplate.from_folder(served.weights).source
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.from_folder(served.weights).render(messages) == text
    assert text.endswith("<|im_start|>assistant\n")
    got = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    expected = alone(served, served.runtime.encode(text, special=False), 16)
    assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"
    chunks = served.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_eight_concurrent_streams_each_get_their_own_greedy_result(served):
    n = 24
    expected = [alone(served, served.runtime.encode(p), n) for p in PROMPTS]
    results: dict[int, str] = {}
    bad: list[int] = []
    start = threading.Barrier(len(PROMPTS) + 1)

    def client(i: int) -> None:
        start.wait()
        stream = served.client.completions.create(
            model=MODEL, prompt=PROMPTS[i], max_tokens=n, temperature=0, stream=True
        )
        results[i] = "".join(c.choices[0].text for c in stream)

    def bad_client() -> None:  # a bad request among them harms nobody
        start.wait()
        try:
            served.client.completions.create(model=MODEL, prompt="x", max_tokens=n, temperature=-1)
        except openai.BadRequestError as e:
            bad.append(e.status_code)

    before = health(served)["steps"]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    threads.append(threading.Thread(target=bad_client))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected
    assert bad == [400]
    stats = health(served)
    assert stats["peak_batch"] >= 2, "the requests were never decoded together"  # (8 here, unloaded)
    assert stats["steps"] > before
    assert stats["busy_slots"] == 0


def test_a_disconnect_mid_stream_frees_its_slot(served):
    before = health(served)["cancelled"]
    body = {"model": MODEL, "prompt": "def main(", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the stream started; leave after the first chunk
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = health(served)
        if stats["cancelled"] > before and stats["busy_slots"] == 0:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == before + 1 and stats["busy_slots"] == 0


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b'{"model": "tiny-qwen2", "prompt": ', 400, "not valid JSON"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "'gpt-4' is not served here; this server serves 'tiny-qwen2'"),
        (
            {"model": MODEL, "prompt": "hi", "max_tokens": 600},
            400,
            "past the model's context (max_position_embeddings=512",
        ),
        (
            {"model": MODEL, "prompt": "hi", "temperature": -0.5},
            400,
            "temperature: Input should be greater than or equal to 0",
        ),
        ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": "hi", "n": 2}, 400, "only n=1"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": [99999]}, 400, "token ids must be in 0 .. 2047"),
        ({"model": MODEL, "prompt": "x" * 5000}, 413, "larger than 4096 bytes"),
        ({"prompt": "hi"}, 400, "model: Field required"),
    ],
)
def test_bad_completion_requests_get_a_4xx_with_a_message(served, body, status, message):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    response = httpx.post(served.url + "/v1/completions", timeout=30, **kw)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": MODEL, "messages": []}, "messages: List should have at least 1 item"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000},
            "past the model's context",
        ),
    ],
)
def test_bad_chat_requests_get_a_400(served, body, message):
    response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_the_openai_client_sees_the_errors(served):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        served.client.completions.create(model="nope", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="past the model's context"):
        served.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9999
        )


def test_models_health_and_the_page(served):
    assert [m.id for m in served.client.models.list()] == [MODEL]
    stats = health(served)
    assert stats["status"] == "ok" and stats["slots"] == 8
    page = httpx.get(served.url + "/", timeout=10)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and f">{MODEL}<" in page.text


def test_stop_strings_end_the_completion(served):
    full = served.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[4:6]
    cut = served.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible(served):
    kw = dict(model=MODEL, prompt="import ", max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    first = served.client.completions.create(**kw).choices[0].text
    assert served.client.completions.create(**kw).choices[0].text == first
