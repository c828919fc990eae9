"""Values as text for tables and pages: group keys and ids of any Arrow type, numbers with a dash for none,
Markdown table cells."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, Optional

import numpy as np

from lpips_pipe.transforms.messages import one_line

NULL_LABEL = "null/NaN"
NONE = "—"  # a number that is not there (or not finite)


def label(value: Any) -> str:
    """A group key / id as text, whatever its Arrow type (float16, decimal, timestamp, date, list, struct);
    null and NaN are both :data:`NULL_LABEL`."""
    if value is None:
        return NULL_LABEL
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return NULL_LABEL
    if isinstance(value, Decimal) and value.is_nan():
        return NULL_LABEL
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    try:
        return str(value)
    except Exception:  # a value whose __str__ fails must not stop the report
        return object.__repr__(value)


def json_value(value: Any) -> Any:
    """An id as JSON can hold it: strings and integers as they are, anything else as text (:func:`label`)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return label(value)


def finite(value: Any) -> Optional[float]:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        return None
    return float(value)


def number(value: Any, digits: int = 4) -> str:
    """A finite number with ``digits`` decimals, else :data:`NONE`."""
    value = finite(value)
    return NONE if value is None else f"{value:.{digits}f}"


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no column break)."""
    return one_line(text).replace("|", "\\|")
