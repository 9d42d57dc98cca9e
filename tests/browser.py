"""Helper for tests and scripts (not a test file): headless Chromium driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ended by NUL on fds 3 and 4), so no driver package is needed."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _high(fd: int) -> int:
    """`fd` moved to a number of 10 or more (the old one closed)."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def find_chromium() -> str | None:
    """The first Chromium-like binary on PATH (Debian's package installs `chromium`), else None."""
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


class Browser:
    """One headless Chromium with one page; `call(method, **params)` sends a command to the page and waits."""

    def __init__(self, binary: str, width: int = 1000, height: int = 700, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="dslc-chromium-")
        commands_r, self.commands = os.pipe()
        self.events, events_w = os.pipe()
        commands_r, events_w = (_high(fd) for fd in (commands_r, events_w))
        flags = [
            "--headless=new",
            "--no-sandbox",  # as root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]

        def wire():  # in the child: the pipe ends become fds 3 and 4 (above 9 now, so neither is overwritten)
            os.dup2(commands_r, 3)
            os.dup2(events_w, 4)

        self.proc = subprocess.Popen(
            [binary, *flags],
            preexec_fn=wire,
            close_fds=False,  # (only inheritable fds pass: Python opens none so, the two dup2'd ones are)
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_r)
        os.close(events_w)
        self.next_id, self.buffer, self.session = 0, b"", None
        target = self._send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self._send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _send(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self.buffer:
                raw, _, self.buffer = self.buffer.partition(b"\0")
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.events], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} within {self.timeout} s")
            chunk = os.read(self.events, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self.buffer += chunk

    call = _send

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def wait_for(self, condition: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(condition)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"never true in the page: {condition}")

    def type_text(self, selector: str, text: str) -> None:
        """Focus `selector` and type `text` as keyboard input, then press Enter."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            os.close(self.commands)
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self.events)
            shutil.rmtree(self.profile, ignore_errors=True)


def chat_on_page(browser: Browser, base_url: str, message: str, timeout: float = 60.0) -> dict:
    """Open the chat page, type `message`, wait for the streamed reply; its text and how many chunks came."""
    browser.open(base_url + "/")
    browser.type_text("#input", message)
    browser.wait_for("document.querySelector('.msg.assistant, .msg.error')?.dataset.done === 'true'", timeout)
    return browser.evaluate(
        "(() => { const m = document.querySelector('.msg.assistant, .msg.error');"
        " return {text: m.textContent, chunks: Number(m.dataset.chunks || 0), error: m.classList.contains('error'),"
        " user: document.querySelector('.msg.user').textContent}; })()"
    )
