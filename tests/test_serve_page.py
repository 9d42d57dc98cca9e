"""The chat page of `dslc serve`, in headless Chromium (Debian's `chromium` package): type a message, see the
reply streamed from /v1/chat/completions, take a screenshot (into tmp; scripts/screenshot_chat_page.py writes
docs/chat-page.png)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from dslc.serve.command import build_server  # noqa: E402
from tests.browser import Browser, chat_on_page, find_chromium  # noqa: E402
from tests.serve_helpers import folder_with_template, running, serve_args  # noqa: E402

CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_the_page_streams_a_reply(tmp_path):
    weights = folder_with_template(tmp_path)
    runtime, app = build_server(serve_args(weights, tmp_path / "build"))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        message = "def add(a, b):"
        expected = client.chat.completions.create(
            model="tiny-qwen2", messages=[{"role": "user", "content": message}], max_tokens=128, temperature=0
        )
        browser = Browser(CHROMIUM)
        try:
            seen = chat_on_page(browser, url, message)
            browser.screenshot(tmp_path / "chat-page.png")
        finally:
            browser.close()
    assert not seen["error"], seen["text"]
    assert seen["user"] == message
    assert seen["text"] == expected.choices[0].message.content and seen["text"].strip()
    assert seen["chunks"] > 1, "the reply came in one piece: not streamed"
    png = (tmp_path / "chat-page.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
