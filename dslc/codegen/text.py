"""The one way spec text reaches generated code: one escaping function per target context.

Docs (comments above a declaration), file names and arch names are the user's text; pasted raw into a
`# comment` or a docstring they could end the comment (a lone CR, U+2028, a form feed: Python and editors
break lines there) or the docstring (`\"\"\"`) and run as code when the package is imported, break the
package (a `\\N` escape in a docstring), or show different code than runs (bidi controls: Trojan Source).
Names never need this: the grammar and the checker admit only identifiers. Values go through `repr`.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

# characters some reader (Python's tokenizer, str.splitlines, an editor) takes as a line break
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# characters that reorder how text is displayed (Trojan Source, CVE-2021-42574)
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _visible(ch: str) -> str:
    """A character as it may appear in generated text: line breaks become spaces, bidi and other control
    characters become their code point (`<U+202E>`), so the text shows that something was there."""
    if ch in LINE_BREAKS or ch == "\t":
        return " "
    if ch in BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
        return f"<U+{ord(ch):04X}>"
    return ch


def comment(text: str) -> str:
    """Text for a `# comment`: one line, no control characters."""
    return "".join(_visible(ch) for ch in str(text)).strip()


def docstring(text: str) -> str:
    """Text for the inside of a `\"\"\"docstring\"\"\"`: one line per line of `text`, backslashes and quotes
    escaped, so nothing can end the string or form an escape sequence."""
    lines = []
    for line in str(text).split("\n"):
        line = comment(line).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(line)
    return "\n".join(lines).strip()


def source_name(path: str | Path) -> str:
    """A spec's file name as cited in comments and docstrings (`qwen2.model`)."""
    return comment(Path(str(path)).name)


def where(span) -> str:
    """`qwen2.model:42`: where a line of generated code comes from."""
    return f"{source_name(span.file)}:{span.line}"
