"""Diagnostics: located, coded errors rendered rustc-style or as JSON.

Every stage reports problems as `Diagnostic`s with a `Span`; `DslcError` carries a batch of them.
Rendering never fails: a long line is cut around the caret, unprintable characters are escaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_SHOWN_LINE = 120


@dataclass(frozen=True)
class Span:
    """A source range: 1-based line/column of start and end (end exclusive)."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    @staticmethod
    def at(file: str, line: int, col: int, width: int = 1) -> Span:
        return Span(file, line, col, line, col + max(width, 1))

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    code: str  # "E010" for errors, "W001" for warnings
    message: str  # lowercase, no trailing period
    span: Span
    help: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def is_error(self) -> bool:
        return self.code.startswith("E")

    def to_dict(self) -> dict:
        s = self.span
        return {
            "severity": "error" if self.is_error else "warning",
            "code": self.code,
            "message": self.message,
            "file": s.file,
            "line": s.line,
            "column": s.col,
            "end_line": s.end_line,
            "end_column": s.end_col,
            "help": list(self.help),
            "notes": list(self.notes),
        }


class DslcError(Exception):
    """One or more error diagnostics; raised by any compiler stage."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(f"{d.code} {d.span}: {d.message}" for d in self.diagnostics))


@dataclass
class Reporter:
    """Collects diagnostics for one stage; `raise_if_errors` ends the stage."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, span: Span, *help: str, notes: tuple[str, ...] = ()) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, tuple(h for h in help if h), notes))

    def warn(self, code: str, message: str, span: Span, *help: str) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, tuple(h for h in help if h)))

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self.diagnostics)

    def raise_if_errors(self) -> None:
        if self.has_errors:
            raise DslcError([d for d in self.diagnostics if d.is_error])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (small strings only)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`help` text naming the closest candidate, or "" when none is close."""
    best, best_d = None, None
    for c in sorted(set(candidates)):
        if len(c) > 64:
            continue
        d = edit_distance(name.lower(), c.lower())
        if best_d is None or d < best_d:
            best, best_d = c, d
    if best is not None and best_d is not None and best_d <= max(1, min(3, len(name) // 3)):
        return f"did you mean `{best}`?"
    return ""


def _printable(text: str) -> str:
    return "".join(
        ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" if ord(ch) < 256 else "?" for ch in text
    )


def comment_start(line: str) -> int:
    """Index of the `#` that starts a trailing comment on a source line (len(line) if none).

    A `#` inside a string literal does not start one; backslash escapes inside strings are skipped.
    """
    in_str, i = False, 0
    while i < len(line):
        ch = line[i]
        if in_str and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_str = not in_str
        elif ch == "#" and not in_str:
            return i
        i += 1
    return len(line)


def _code_len(line: str) -> int:
    """Length of `line` without a trailing comment and trailing blanks (carets of a multi-line span stop there)."""
    return len(line[: comment_start(line)].rstrip())


def render(diag: Diagnostic, source_lines: list[str] | None) -> str:
    """Render one diagnostic as text: header, location, source line with carets, help."""
    kind = "error" if diag.is_error else "warning"
    s = diag.span
    out = [f"{kind}[{diag.code}]: {diag.message}", f"  --> {s.file}:{s.line}:{s.col}"]
    if source_lines is not None and 1 <= s.line <= len(source_lines):
        raw = source_lines[s.line - 1].rstrip("\r\n")
        col0 = max(s.col - 1, 0)
        width = (s.end_col - s.col) if s.end_line == s.line else _code_len(raw) - col0
        width = max(1, min(width, MAX_SHOWN_LINE // 2))
        start = 0
        if len(raw) > MAX_SHOWN_LINE:  # show a window around the caret
            start = max(0, col0 - MAX_SHOWN_LINE // 2)
            raw = ("..." if start else "") + raw[start : start + MAX_SHOWN_LINE] + "..."
            col0 = col0 - start + (3 if start else 0)
        text = _printable(raw)
        gutter = " " * len(str(s.line))
        out += [f"{gutter} |", f"{s.line} | {text}", f"{gutter} | {' ' * col0}{'^' * width}"]
    for h in diag.help:
        out.append(f"  = help: {h}")
    for n in diag.notes:
        out.append(f"  = note: {n}")
    return "\n".join(out)


def render_all(diags: Iterable[Diagnostic], sources: dict[str, list[str]]) -> str:
    return "\n\n".join(render(d, sources.get(d.span.file)) for d in diags)


def to_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_dict() for d in diags], indent=2)
