"""Pillow charts' common parts: fonts, tick steps, ticks on the axes, the rotated y label, PNG bytes."""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def fonts() -> tuple[Any, Any]:
    """(small, medium): Pillow's default font at 12 and 14 px (no font file needed)."""
    return ImageFont.load_default(size=12), ImageFont.load_default(size=14)


def tick_step(span: float, most: int, whole: bool = False) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10^k tick step cutting ``span`` into at most ``most`` parts (whole numbers
    when ``whole``)."""
    raw = max(span / most, 1.0 if whole else 1e-12)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(factor * power for factor in (1, 2, 2.5, 5, 10)
                if factor * power >= raw * (1 - 1e-9) and not (whole and factor * power % 1))


def x_ticks(draw: ImageDraw.ImageDraw, x_of: Callable[[float], float], start: float, stop: float, step: float,
            bottom: int, font: Any) -> None:
    """Ticks and ``%.3g`` labels under the x axis at ``bottom``, from ``start`` to ``stop`` every ``step``."""
    for x in np.arange(start, stop + step * 1e-6, step):
        draw.line((x_of(x), bottom, x_of(x), bottom + 4), fill="black")
        draw.text((x_of(x), bottom + 7), f"{x:.3g}", fill="black", font=font, anchor="mt")


def y_ticks(draw: ImageDraw.ImageDraw, y_of: Callable[[float], float], values: Iterable[float], left: int,
            font: Any, spec: str) -> None:
    """Ticks and labels (format ``spec``) left of the y axis at ``left``, at each of ``values``."""
    for y in values:
        draw.line((left - 4, y_of(y), left, y_of(y)), fill="black")
        draw.text((left - 7, y_of(y)), format(y, spec), fill="black", font=font, anchor="rm")


def y_label(image: Image.Image, text: str, font: Any, left: int, top: int, bottom: int, width: int) -> None:
    """``text`` turned 90°, centred on the plot's height, left of the tick labels of a plot at ``left``."""
    label = Image.new("RGB", (width, 20), "white")
    ImageDraw.Draw(label).text((width // 2, 10), text, fill="black", font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (left - 62, (top + bottom) // 2 - width // 2))


def png(image: Image.Image) -> bytes:
    """The image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
