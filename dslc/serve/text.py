"""Incremental detokenization with stop strings: text is released as tokens arrive, never half a character,
and never the start of what may turn out to be a stop string."""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """`push(token)` -> (new text, stopped); `flush()` -> the text held back, once generation ended."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None):
        self.decode, self.stops = decode, list(stops or [])
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the whole text so far (may end in a held-back part)
        self.sent = 0  # characters of `text` released

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # the rest of a multi-byte character comes with the next token
            return "", False
        self.text = text
        cuts = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
        if cuts:
            out = text[self.sent : min(cuts)]
            self.sent = len(text)
            return out, True
        end = max(self.sent, len(text) - self.hold)
        out = text[self.sent : end]
        self.sent = end
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
