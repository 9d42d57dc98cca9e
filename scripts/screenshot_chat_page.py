"""Write docs/chat-page.png: `dslc serve` on the bundled tiny-qwen2, its chat page in headless Chromium, one
message typed and its streamed reply. Run from the repo root: `python3 scripts/screenshot_chat_page.py`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dslc.serve.command import build_server  # noqa: E402
from tests.browser import Browser, chat_on_page, find_chromium  # noqa: E402
from tests.serve_helpers import WEIGHTS, running, serve_args  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "chat-page.png"))
    parser.add_argument("--message", default="def parse_args(")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no chromium binary on PATH: apt-get install chromium", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        _, app = build_server(serve_args(WEIGHTS, Path(tmp) / "build"))
        with running(app) as url:
            browser = Browser(chromium, width=900, height=520)
            try:
                seen = chat_on_page(browser, url, args.message)
                browser.screenshot(args.out)
            finally:
                browser.close()
    print(f"wrote {args.out}: {seen['chunks']} streamed chunks, reply {seen['text'][:60]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
