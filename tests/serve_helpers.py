"""Helper for tests (not a test file): `dslc serve`'s app on 127.0.0.1 (a free port) in a thread, always stopped."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "models" / "qwen2.model"
WEIGHTS = ROOT / "models" / "tiny-qwen2"
# ChatML, as Qwen2's tokenizer_config.json has it (the bundled folder has no chat template)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def folder_with_template(tmp: Path) -> Path:
    """A copy of the bundled tiny-qwen2 (same name) with a ChatML chat template in tokenizer_config.json."""
    import json

    out = tmp / "tiny-qwen2"
    shutil.copytree(WEIGHTS, out)
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|endoftext|>"}))
    return out


def serve_args(weights: Path, build_dir: Path, *extra: str):
    from dslc.cli import make_parser

    return make_parser().parse_args(
        ["serve", str(SPEC), "--weights", str(weights), "--build-dir", str(build_dir), "--port", "0", *extra]
    )


@contextmanager
def running(app, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 (port 0: a free one) in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "the server did not shut down"
