"""The request bodies of the OpenAI-compatible endpoints, as pydantic models: ranges are checked here, so a bad
value is a 400 naming the field before anything reaches the scheduler. Fields of OpenAI's API that dslc does
not implement are accepted at their no-op values only (n=1, no logprobs, no tools...)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Sampled(BaseModel):
    """What both endpoints share: the model, the sampling settings, streaming, stop strings."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM and others take it
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported: send one request per completion")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported: leave them at 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(Sampled):
    """POST /v1/completions: a text prompt (or one list of token ids) to continue."""

    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request: a list of several prompts is not supported")
            return v[0]
        return v

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        """The content as text: a list of parts keeps its `text` parts (images are refused)."""
        if isinstance(self.content, str):
            return self.content
        if any(p.get("type") != "text" for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(str(p.get("text", "")) for p in self.content)


class ChatCompletionRequest(Sampled):
    """POST /v1/chat/completions: a conversation, rendered with the checkpoint's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.tools:
            raise ValueError("tools are not supported")
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as e:
                raise ValueError(f"messages[{i}]: {e}") from None
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
