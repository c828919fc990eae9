"""Short error messages: one line, values quoted briefly, and the row error that carries them.

:class:`RecordError` is a row that cannot be scored (``stage``, ``error_type``, a message capped at
:data:`MAX_MESSAGE_CHARS`); the Beam layer turns it into an error row. :func:`quote_value` quotes at most
:data:`QUOTE_CHARS` characters of a value, so a huge value never makes a huge error row. :func:`one_line`
folds any text (an exception's, a file's) into one line for a one-line message. No import beyond the
standard library: every layer may use these.
"""

from __future__ import annotations

from typing import Any, Optional

QUOTE_CHARS = 80
MAX_MESSAGE_CHARS = 1000


def quote_value(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters plus ``... (N chars)`` when longer. A long
    string keeps its start and its end (``'/data/in/...0001.png' (N chars)``): a path's file name is the part a
    reader needs."""
    if isinstance(value, (bytes, bytearray)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} bytes)"
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        tail = limit // 2
        return f"{text[:limit - tail]}...{text[-tail:]} ({len(value)} chars)"
    return f"{text[:limit]}... ({len(text)} chars)"


def one_line(text: Any, limit: Optional[int] = None, *, first_line: bool = False,
             cut_to: Optional[int] = None) -> str:
    """``str(text)`` in one line: its runs of white space folded to single spaces, or, with ``first_line``,
    only its first non-empty line (stripped; ``""`` when there is none).

    Longer than ``limit`` characters (``None``: never cut), it is cut to ``cut_to`` characters (default
    ``limit``) followed by ``...``.
    """
    if first_line:
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        line = lines[0] if lines else ""
    else:
        line = " ".join(str(text).split())
    if limit is None or len(line) <= limit:
        return line
    return f"{line[:limit if cut_to is None else cut_to]}..."


def _cap_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} chars)"


class RecordError(Exception):
    """A row that cannot be scored: ``stage`` (where) and ``error_type`` (what kind).

    The message is capped at :data:`MAX_MESSAGE_CHARS` characters."""

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        message = _cap_message(message)
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message
