"""Text from models, data sets, recipes and clusters, made safe to print on a terminal.

Such text is never markup: a prediction holding ``[/INST]`` (chat models write it) or ``[bold]`` is shown as it
is, not parsed by rich (where ``[/INST]`` raises MarkupError after the stages finished). Nor is it a terminal
command: control characters (ESC starts colour, cursor, title and hyperlink sequences; CR overwrites the line)
and Unicode's bidirectional overrides (which reorder what a reader sees) are shown as ``\\x1b``-style escapes.
"""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, C1 controls (U+009B is a one-character CSI), bidi embeddings/isolates.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``, ``\\u202e``)."""
    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(escape, str(text))


def literal(text: object, style: str = ""):
    """``text`` as a rich Text: printed as is (no markup), control characters escaped."""
    from rich.text import Text

    return Text(printable(text), style=style)
