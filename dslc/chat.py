"""`dslc chat SPEC --weights DIR`: a multi-turn chat in the terminal, streamed.

Each turn renders the whole conversation with the folder's chat template (dslc/chat_template.py) and prefills
only the tokens past the part already in the KV cache (the generated package's SlotDecoder, one slot), so
the cache is kept across turns. Commands: `/reset` (a new conversation), `/system TEXT` (set the system
message and start over), `/exit` (or end of input).
"""

from __future__ import annotations

import importlib
import sys

from dslc.generate import GenerateError

HELP = "commands: /reset starts over, /system TEXT sets the system message (and starts over), /exit quits"


class ChatSession:
    """A conversation over one cache slot: `reply(text, write)` streams the assistant's answer to `write`."""

    def __init__(self, runtime, template, sampling, system: str | None = None):
        import torch

        self.runtime, self.template, self.sampling = runtime, template, sampling
        pkg = runtime.pkg.__name__
        self.decoder = importlib.import_module(pkg + ".serving").SlotDecoder(runtime.model, 1, runtime.max_len)
        self.warp = importlib.import_module(pkg + ".generation")._warp
        self.generator = torch.Generator(device=runtime.model.device).manual_seed(sampling.seed or 0)
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []  # the token ids whose keys and values are in the slot, from position 0

    def _prompt(self) -> list[int]:
        text = self.template.render(self.messages)
        return self.runtime.encode(text, special=self.template.source is None)

    def reply(self, text: str, write) -> str:
        """Add the user's `text`, generate the answer (streamed through `write`), return it."""
        import torch

        from dslc.serve.scheduler import pick
        from dslc.serve.text import TextStream

        self.messages.append({"role": "user", "content": text})
        ids = self._prompt()
        problem = self.runtime.context_error(len(ids), self.sampling.max_tokens, "the conversation", "--max-new-tokens")
        if problem:
            self.messages.pop()
            raise GenerateError(problem + " (or /reset to start a new conversation)")
        same = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)  # at least one token to prefill: its logits give the first new token
        logits = self.decoder.prefill(0, ids[same:], start=same)
        self.cached = list(ids)
        stream = TextStream(self.runtime.decode, [self.template.stop_text] if self.template.stop_text else [])
        out, stopped = [], False
        device = self.runtime.model.device
        for _ in range(self.sampling.max_tokens):
            token = pick(self.warp, logits[None], self.sampling, self.generator)[0]
            if token in self.runtime.eos:
                break
            piece, stopped = stream.push(token)
            out.append(piece)
            write(piece)
            if stopped or len(self.cached) >= self.runtime.max_len:
                break
            position = torch.tensor([len(self.cached)], device=device)
            logits = self.decoder.step(torch.tensor([token], device=device), position)[0]
            self.cached.append(token)
        if not stopped:
            out.append(stream.flush())
            write(out[-1])
        answer = "".join(out)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def chat_command(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from dslc.chat_template import ChatTemplate, ChatTemplateError
    from dslc.generate import _check_args
    from dslc.runtime import runtime_from_args
    from dslc.serve.scheduler import Sampling

    console = Console(stderr=True, soft_wrap=True)

    def error(message: str) -> int:
        console.print(f"[red]error[/red]: {escape(message)}")
        return 2

    try:
        args.prompt = args.system or ""
        _check_args(args)
        runtime = runtime_from_args(args, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
        template = ChatTemplate.from_folder(runtime.weights)
    except (GenerateError, ChatTemplateError) as e:
        return error(str(e))
    temperature = args.temperature if args.do_sample else 0.0
    sampling = Sampling(args.max_new_tokens, temperature, args.top_p or 1.0, args.top_k, args.seed)
    session = ChatSession(runtime, template, sampling, args.system)
    kind = "its chat template" if template.source else "a plain `Role: text` layout (the folder has no chat template)"
    console.print(f"[dim]chatting with {escape(runtime.name)} using {kind}; {HELP}[/dim]")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        write(">>> ")  # on stdout (input()'s own prompt goes to stderr on a terminal)
        try:
            line = input()
        except EOFError:
            write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            console.print("[dim]conversation reset[/dim]")
            continue
        if line.startswith("/system"):
            session.system = line[len("/system") :].strip() or None
            session.reset()
            console.print("[dim]system message set; conversation reset[/dim]")
            continue
        if line.startswith("/"):
            console.print(f"[yellow]unknown command {escape(line.split()[0])}[/yellow]; {HELP}")
            continue
        try:
            session.reply(line, write)
        except (GenerateError, ChatTemplateError) as e:
            error(str(e))
            continue
        write("\n")
