"""HTML from data: escaping, the one rule every page uses."""

from __future__ import annotations

import html
from typing import Any


def esc(value: Any) -> str:
    """Text from data, safe in HTML content and in quoted attributes."""
    return html.escape(str(value), quote=True)
