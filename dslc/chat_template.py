"""A checkpoint folder's chat template (tokenizer_config.json's `chat_template`), rendered with jinja2 as
transformers' `apply_chat_template` does (a sandbox, trim_blocks + lstrip_blocks, `tojson`, `raise_exception`,
`strftime_now`, the special tokens as variables); a plain `role: text` layout when the folder has none."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

ROLES = ("system", "user", "assistant")


class ChatTemplateError(Exception):
    """A chat template that cannot be read or rendered, with the file in the message."""


def _token(value) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """`render(messages)` -> the prompt text, ending where the assistant's reply starts."""

    def __init__(self, source: str | None, tokens: dict[str, str], origin: str):
        self.source, self.tokens, self.origin = source, tokens, origin
        self._template = None
        if source is not None:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
                json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(source)
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"{origin}: chat_template is not a valid jinja2 template ({e})") from None

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate:
        """The template of `folder`'s tokenizer_config.json (or chat_template.jinja), else the plain layout."""
        path = folder / "tokenizer_config.json"
        data: dict = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:
                raise ChatTemplateError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise ChatTemplateError(f"{path}: must be a JSON object")
        tokens = {k: t for k in ("bos_token", "eos_token", "pad_token", "unk_token") if (t := _token(data.get(k)))}
        source = data.get("chat_template")
        if isinstance(source, list):  # named templates, as transformers writes them: take "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja = folder / "chat_template.jinja"
        if source is None and jinja.is_file():
            return cls(jinja.read_text(encoding="utf-8"), tokens, str(jinja))
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"{path}: chat_template must be a string, got {type(source).__name__}")
        return cls(source, tokens, str(path))

    def render(self, messages: list[dict]) -> str:
        """The conversation as prompt text, with the assistant's turn opened (add_generation_prompt=True)."""
        if self._template is None:
            return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: the chat template refused the conversation ({e})") from None

    @property
    def stop_text(self) -> str | None:
        """The plain layout's end of a reply (the next `User:` line); None for a real template."""
        return "\nUser:" if self._template is None else None


def _raise(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)
