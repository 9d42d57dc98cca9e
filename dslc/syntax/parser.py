"""Text -> AST. Builds (and caches) the Lark LALR parser; wraps every failure in a located diagnostic.

No input, however broken, escapes as a Python traceback: bytes that are not UTF-8, NUL bytes, tabs
in indentation, runaway nesting and Lark's own errors all become `DslcError`s with a file:line:col.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from dslc.diagnostics import Diagnostic, DslcError, Span
from dslc.resources import grammar_path

MAX_NESTING = 64  # brackets open at once; deeper input is refused before parsing
MAX_INDENT_LEVELS = 32


@lru_cache(maxsize=1)
def _parser():
    from lark import Lark
    from lark.indenter import Indenter

    class ModelIndenter(Indenter):
        NL_type = "_NL"
        OPEN_PAREN_types = ["LPAR", "LSQB"]
        CLOSE_PAREN_types = ["RPAR", "RSQB"]
        INDENT_type = "_INDENT"
        DEDENT_type = "_DEDENT"
        tab_len = 8

    return Lark(
        grammar_path("model.lark").read_text(),
        parser="lalr",
        postlex=ModelIndenter(),
        propagate_positions=True,
        maybe_placeholders=True,
        cache=True,
    )


def decode_source(data: bytes, path: str) -> str:
    """Decode a spec's bytes as UTF-8, refusing NUL bytes and other encodings with a location."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DslcError(
            [
                Diagnostic(
                    "E003",
                    "file is UTF-16 encoded (it starts with a UTF-16 byte-order mark)",
                    Span.at(path, 1, 1),
                    ("save the file as UTF-8 text",),
                )
            ]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DslcError(
            [
                Diagnostic(
                    "E003",
                    f"file is not valid UTF-8 (byte 0x{data[e.start]:02x})",
                    Span.at(path, line, col),
                    ("save the file as UTF-8 text",),
                )
            ]
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        col = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise DslcError(
            [Diagnostic("E003", "NUL byte in source", Span.at(path, line, col), ("is this a binary file?",))]
        )
    return text


def _brackets(text: str):
    """Every bracket outside strings and comments, in order: (line, col, char)."""
    for lineno, line in enumerate(text.split("\n"), 1):
        in_str = escaped = False
        for col, ch in enumerate(line, 1):
            if escaped:
                escaped = False
            elif in_str and ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = not in_str
            elif in_str:
                continue
            elif ch == "#":
                break
            elif ch in "([)]":
                yield lineno, col, ch


def _precheck(text: str, path: str) -> None:
    """Refuse what the grammar would report badly: tabs in indentation, runaway nesting or indentation."""
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.lstrip(" ")
        if stripped.startswith("\t") or (line[: len(line) - len(stripped)].count("\t")):
            col = len(line) - len(stripped) + 1
            raise DslcError(
                [Diagnostic("E004", "tab in indentation", Span.at(path, lineno, col), ("indent with spaces only",))]
            )
        indent = len(line) - len(stripped)
        if stripped and not stripped.startswith("#") and indent > MAX_INDENT_LEVELS * 8:
            raise DslcError([Diagnostic("E005", "indentation too deep", Span.at(path, lineno, 1, indent))])
    depth = 0
    for lineno, col, ch in _brackets(text):
        if ch in ")]":
            depth = max(0, depth - 1)
            continue
        depth += 1
        if depth > MAX_NESTING:
            raise DslcError(
                [
                    Diagnostic(
                        "E005",
                        f"brackets nested more than {MAX_NESTING} deep",
                        Span.at(path, lineno, col),
                        ("split the expression into named steps",),
                    )
                ]
            )


_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "_NL": "a new line",
    "_INDENT": "an indented block",
    "_DEDENT": "the end of the block",
    "$END": "the end of input",
    "COMP_OP": "a comparison",
}


@lru_cache(maxsize=1)
def _terminal_texts() -> dict[str, str]:
    texts = dict(_TERMINAL_WORDS)
    for t in _parser().terminals:
        if t.name not in texts and t.pattern.type == "str":
            texts[t.name] = f"`{t.pattern.value}`"
    return texts


def _describe(names) -> str:
    texts = _terminal_texts()
    words = sorted({texts.get(n, n.lower()) for n in names})
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _token_text(tok) -> str:
    if tok.type == "$END":
        return "end of input"
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "_INDENT":
        return "indentation"
    if tok.type == "_DEDENT":
        return "end of block"
    value = str(tok.value)
    return f"`{value[:40]}`"


def _open_brackets(text: str, upto: tuple[int, int] | None = None) -> list[tuple[int, int, str]]:
    """Brackets still open (line, col, char), innermost last, at `upto` (line, col) or at the end."""
    stack: list[tuple[int, int, str]] = []
    for lineno, col, ch in _brackets(text):
        if upto is not None and (lineno, col) >= upto:
            break
        if ch in "([":
            stack.append((lineno, col, ch))
        elif stack:
            stack.pop()
    return stack


def _unclosed(stack: list[tuple[int, int, str]], path: str) -> DslcError:
    line, col, ch = stack[-1]
    close = ")" if ch == "(" else "]"
    return DslcError([Diagnostic("E002", f"unclosed `{ch}`", Span.at(path, line, col), (f"close it with `{close}`",))])


def _wrap_lark_error(e: Exception, text: str, path: str) -> DslcError:
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken
    from lark.indenter import DedentError

    lines = text.split("\n")
    last_line = len(lines)
    # the end of input is just after the last character of the file (parse_tree appended a newline)
    content = text[:-1].split("\n") if text.endswith("\n") else lines
    end = Span.at(path, len(content), len(content[-1]) + 1)
    at_end = isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type in ("$END", "_DEDENT"))
    if at_end:
        stack = _open_brackets(text)
        if stack:
            return _unclosed(stack, path)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type in ("$END", "_DEDENT") or tok.line is None:
            line, col = (tok.line, tok.column) if tok.line else (end.line, end.col)
            if tok.type == "$END":
                return DslcError(
                    [Diagnostic("E002", "unexpected end of input", end, (f"expected {_describe(e.expected)}",))]
                )
            return DslcError(
                [
                    Diagnostic(
                        "E001",
                        "unexpected end of block",
                        Span.at(path, line, col),
                        (f"expected {_describe(e.expected)}",),
                    )
                ]
            )
        width = len(str(tok.value)) if tok.type not in ("_NL", "_INDENT") else 1
        line, col = tok.line, tok.column
        help_: tuple[str, ...] = ()
        if tok.type == "_NL":
            # point at the end of the line that ended too early
            col = len(lines[line - 1]) + 1 if line <= last_line else 1
        elif tok.type == "_INDENT":
            # point at the indentation of the next code line, the one indented too far
            for nxt in range(line + 1, last_line + 1):
                stripped = lines[nxt - 1].strip()
                if stripped and not stripped.startswith("#"):
                    indent = len(lines[nxt - 1]) - len(lines[nxt - 1].lstrip(" "))
                    line, col, width = nxt, 1, max(indent, 1)
                    break
            help_ = ("this line is indented more than the lines before it",)
        opened = _open_brackets(text, (tok.line, tok.column))
        if opened and opened[-1][0] < tok.line:
            o_line, o_col, o_ch = opened[-1]
            help_ += (f"the `{o_ch}` at line {o_line}, column {o_col} is not closed",)
        return DslcError(
            [
                Diagnostic(
                    "E001",
                    f"unexpected {_token_text(tok)}",
                    Span.at(path, line, col, min(width, 80)),
                    help_ + (f"expected {_describe(e.expected)}",),
                )
            ]
        )
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        shown = ch if ch.isprintable() else f"\\u{ord(ch):04x}" if ch else "?"
        if ch == '"':
            return DslcError(
                [
                    Diagnostic(
                        "E001",
                        "unterminated string",
                        Span.at(path, e.line, e.column, len(lines[e.line - 1]) - e.column + 1),
                        ('a string ends with `"` on the same line',),
                    )
                ]
            )
        help_ = "strings use double quotes" if ch == "'" else ""
        return DslcError(
            [
                Diagnostic(
                    "E001",
                    f"unexpected character `{shown}`",
                    Span.at(path, e.line, e.column),
                    tuple(h for h in (help_, f"expected {_describe(e.allowed)}" if e.allowed else "") if h),
                )
            ]
        )
    if isinstance(e, UnexpectedEOF):
        return DslcError([Diagnostic("E002", "unexpected end of input", end, (f"expected {_describe(e.expected)}",))])
    if isinstance(e, DedentError):
        # find the offending line: a dedent to a column no enclosing block uses
        stack = [0]
        for lineno, line in enumerate(lines, 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            indent = len(line) - len(line.lstrip(" "))
            if indent > stack[-1]:
                stack.append(indent)
            else:
                levels = " or ".join(str(n) for n in stack)
                while indent < stack[-1]:
                    stack.pop()
                if indent != stack[-1]:
                    return DslcError(
                        [
                            Diagnostic(
                                "E004",
                                "dedent does not match any outer indentation level",
                                Span.at(path, lineno, 1, max(indent, 1)),
                                (f"indent this line by {levels} spaces to match an enclosing block",),
                            )
                        ]
                    )
        return DslcError([Diagnostic("E004", "inconsistent indentation", end)])
    return DslcError([Diagnostic("E001", f"syntax error: {type(e).__name__}", Span.at(path, 1, 1))])


def parse_tree(text: str, path: str):
    """Parse text into a Lark tree; raises DslcError with a located diagnostic on any failure."""
    from lark.exceptions import LarkError

    _precheck(text, path)
    if not text.endswith("\n"):
        text += "\n"
    try:
        return _parser().parse(text)
    except LarkError as e:
        raise _wrap_lark_error(e, text, path) from None
    except RecursionError:
        raise DslcError([Diagnostic("E005", "input nested too deeply", Span.at(path, 1, 1))]) from None


def parse_text(text: str, path: str = "<input>"):
    """Parse .model source text into an `ast.File`."""
    from dslc.syntax.transform import to_ast

    tree = parse_tree(text, path)
    try:
        return to_ast(tree, text, path)
    except RecursionError:
        line, col = _deep_point(tree)
        raise DslcError(
            [
                Diagnostic(
                    "E005",
                    "expression nested too deeply",
                    Span.at(path, line, col),
                    ("split the expression into named steps",),
                )
            ]
        ) from None


def _deep_point(tree, depth_limit: int = 100) -> tuple[int, int]:
    """(line, col) of the first node nested `depth_limit` deep (else of the deepest), found without recursion."""
    from lark import Tree

    best, best_depth = (1, 1), -1
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        meta = node.meta
        if not getattr(meta, "empty", True) and depth > best_depth:
            best, best_depth = (meta.line, meta.column), depth
            if depth >= depth_limit:
                break
        stack.extend((c, depth + 1) for c in node.children)
    return best


def parse_file(path: str | Path):
    """Read and parse a .model file (bytes decoded strictly as UTF-8)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DslcError([Diagnostic("E000", f"cannot read file: {e.strerror}", Span.at(str(path), 1, 1))]) from None
    return parse_text(decode_source(data, str(path)), str(path))
