"""`dslc chat` driven through a pseudo-terminal: two turns (the second extends the KV cache kept from the first),
`/reset`, `/system`; each reply equals the greedy continuation of the whole rendered conversation run alone."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from dslc.chat_template import ChatTemplate  # noqa: E402
from dslc.runtime import load_runtime  # noqa: E402
from tests.serve_helpers import ROOT, SPEC, folder_with_template  # noqa: E402

PROMPT = ">>> "


class Terminal:
    """A child process on a pty: `send(line)` types a line, `until(text)` reads until `text` (bounded)."""

    def __init__(self, argv: list[str], stderr):
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb", "COLUMNS": "200"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=stderr, env=env, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def until(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {text!r} from dslc chat; got {self.buffer!r}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.buffer += os.read(self.master, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:  # the child closed the pty
                    continue
        head, _, self.buffer = self.buffer.partition(text)
        return head

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def reply(self, line: str) -> str:
        """Type `line`, return what the chat printed before the next prompt (the echo of the line removed)."""
        self.send(line)
        self.until(line + "\n")
        return self.until(PROMPT).removesuffix("\n")

    def close(self) -> None:
        """Wait briefly for the child to exit (after /exit), else kill it."""
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self.master)


def test_chat_two_turns_reset_and_system(tmp_path):
    weights = folder_with_template(tmp_path)
    build = tmp_path / "build"
    n = 12
    argv = [sys.executable, "-m", "dslc", "chat", str(SPEC), "--weights", str(weights), "--build-dir", str(build)]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        term = Terminal([*argv, "--max-new-tokens", str(n)], stderr)
        try:
            term.until(PROMPT)
            first = term.reply("def add(a, b):")
            second = term.reply("now subtract")
            assert term.reply("/reset") == ""
            again = term.reply("def add(a, b):")
            term.reply("/system You answer in Python.")
            with_system = term.reply("def add(a, b):")
            term.send("/exit")
        finally:
            term.close()
    assert term.proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
    err = (tmp_path / "stderr.txt").read_text()
    assert "conversation reset" in err and "system message set" in err and "its chat template" in err

    runtime = load_runtime(SPEC, weights, build_dir=str(build))
    template = ChatTemplate.from_folder(weights)

    def alone(messages: list[dict]) -> str:
        ids = runtime.encode(template.render(messages), special=False)
        out = runtime.model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=runtime.eos)
        return runtime.decode([t for t in out[0, len(ids) :].tolist() if t not in runtime.eos])

    turn1 = [{"role": "user", "content": "def add(a, b):"}]
    assert first == alone(turn1)
    assert second == alone(
        turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "now subtract"}]
    )
    assert again == first
    system = [{"role": "system", "content": "You answer in Python."}]
    assert with_system == alone(system + turn1)


def test_chat_enforces_the_context_and_goes_on(tmp_path):
    from tests.serve_helpers import WEIGHTS

    argv = [sys.executable, "-m", "dslc", "chat", str(SPEC), "--weights", str(WEIGHTS)]
    argv += ["--build-dir", str(tmp_path / "build"), "--max-new-tokens", "4", "--set", "max_position_embeddings=24"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        term = Terminal(argv, stderr)
        try:
            term.until(PROMPT)
            assert term.reply("def f(x):") != ""  # the plain layout: "User: def f(x):\nAssistant:" fits
            term.reply("now write a much longer function that parses the arguments")
            term.send("/exit")
        finally:
            term.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert term.proc.returncode == 0, err
    assert "the conversation (" in err and "max_position_embeddings=24" in err and "/reset" in err
    assert "plain `Role: text` layout" in err
