"""`dslc serve` as a user runs it: a subprocess on the bundled default, answering the `openai` client, with
`--set` reaching the context limit, and a graceful exit on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from tests.serve_helpers import ROOT, SPEC, WEIGHTS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dslc_serve_answers_the_openai_client_and_stops_on_sigint(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "dslc", "serve", str(SPEC), "--weights", str(WEIGHTS), "--port", str(port)]
    argv += ["--build-dir", str(tmp_path / "build"), "--set", "max_position_embeddings=64", "--slots", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
                time.sleep(0.1)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            got = client.completions.create(model="tiny-qwen2", prompt="def parse_args(", max_tokens=8, temperature=0)
            assert got.choices[0].text and got.usage.completion_tokens <= 8
            with pytest.raises(openai.BadRequestError, match=r"max_position_embeddings=64"):
                client.completions.create(model="tiny-qwen2", prompt="def parse_args(", max_tokens=60)
            assert client.models.list().data[0].max_model_len == 64
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert rc == 0, (tmp_path / "stderr.txt").read_text()


def test_dslc_serve_refuses_bad_arguments(tmp_path, capsys):
    from dslc.cli import main

    rc = main(["serve", str(SPEC), "--weights", str(WEIGHTS), "--slots", "0", "--build-dir", str(tmp_path)])
    assert rc == 2 and "--slots must be in 1 .. 1024, got 0" in capsys.readouterr().err
    rc = main(["serve", str(SPEC), "--weights", str(tmp_path / "nope"), "--build-dir", str(tmp_path)])
    assert rc == 2 and "weights folder not found" in capsys.readouterr().err


def test_max_len_caps_the_slots_below_the_context(tmp_path):
    from dslc.serve.command import build_server
    from tests.serve_helpers import running, serve_args

    runtime, app = build_server(serve_args(WEIGHTS, tmp_path / "build", "--max-len", "32", "--slots", "2"))
    assert runtime.max_len == 32
    with running(app) as url:
        body = {"model": "tiny-qwen2", "prompt": "def f(", "max_tokens": 40}
        response = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 400
        assert "past the server's --max-len 32 (the model's context: max_position_embeddings=512" in response.text
        body["max_tokens"] = 20
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).json()["usage"]["completion_tokens"] <= 20
