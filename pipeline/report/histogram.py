"""histogram.png, drawn with Pillow: LPIPS stacked per mask mode (or group), and the measured fraction."""

from __future__ import annotations

import collections
from typing import Any, Optional, Sequence
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from lpips_pipe.pipeline.render import charts
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.pipeline.report.facts import float_column, text_labels

MAX_HISTOGRAM_SERIES = 8


# Matplotlib's tab10: the series colours of the LPIPS panel (8 series + "other" fit).
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
HISTOGRAM_SIZE = (1100, 420)


def _panel(image: Image.Image, box: tuple[int, int, int, int], edges: np.ndarray, stacks: Sequence[np.ndarray],
           colors: Sequence[str], title: str, xlabel: str, fonts: tuple[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Stacked bars of ``stacks`` (counts per bin of ``edges``) in ``box``, the plot area, with a frame,
    ticks, tick labels (whole numbers on y), title, x label and the y label "pairs". Returns the bins' pixel
    edges on x and their stacked totals."""
    draw, (small, medium) = ImageDraw.Draw(image), fonts
    left, top, right, bottom = box
    totals = np.sum(stacks, axis=0) if len(stacks) else np.zeros(len(edges) - 1)
    high = max(1.0, float(totals.max()) * 1.05)
    x_of = lambda x: round(left + (x - edges[0]) / (edges[-1] - edges[0]) * (right - left))  # noqa: E731
    y_of = lambda y: round(bottom - y / high * (bottom - top))  # noqa: E731
    base = np.zeros(len(edges) - 1)
    for counts, color in zip(stacks, colors):
        for i in np.flatnonzero(counts):
            draw.rectangle((x_of(edges[i]), y_of(base[i] + counts[i]), x_of(edges[i + 1]), y_of(base[i])),
                           fill=color)
        base = base + counts
    draw.rectangle(box, outline="black")
    step = charts.tick_step(high, 6, whole=True)
    charts.y_ticks(draw, y_of, np.arange(0.0, high + step * 1e-6, step), left, small, ".0f")
    step = charts.tick_step(edges[-1] - edges[0], 6)
    charts.x_ticks(draw, x_of, edges[0], edges[-1], step, bottom, small)
    draw.text(((left + right) / 2, top - 8), title, fill="black", font=medium, anchor="md")
    draw.text(((left + right) / 2, bottom + 26), xlabel, fill="black", font=medium, anchor="mt")
    charts.y_label(image, "pairs", medium, left, top, bottom, 60)
    return np.array([x_of(edge) for edge in edges]), totals


def render_histogram(scores: pa.Table, group_column: Optional[str] = None) -> bytes:
    """histogram.png, drawn with Pillow: LPIPS stacked per mask mode (or per group, largest first), and
    measured fraction."""
    split_by = group_column if group_column and group_column in scores.column_names else layout.MASK_MODE_FIELD
    lpips = float_column(scores, layout.LPIPS_FIELD)
    finite = np.isfinite(lpips)
    fractions = float_column(scores, layout.MEASURED_FRACTION_FIELD)[finite]
    image = Image.new("RGB", HISTOGRAM_SIZE, "white")
    draw = ImageDraw.Draw(image)
    fonts = charts.fonts()
    left_box, right_box = (70, 30, 640, 350), (750, 30, 1080, 350)  # plot areas, about 3 : 2 wide
    xlabel = "LPIPS (area-normalised; lower = closer to the reference)"
    if finite.any():
        values = lpips[finite]
        top = float(np.quantile(values, 0.99)) if len(values) > 20 else float(values.max())
        top = top if top > 0 else 1.0
        clipped = int((values > top).sum())
        bins = np.linspace(0.0, top, 41)
        all_keys = text_labels(scores, split_by)
        value_keys = [key for key, keep in zip(all_keys, finite) if keep]
        sizes = collections.Counter(value_keys)
        shown = sorted(sizes, key=lambda key: (-sizes[key], key))[:MAX_HISTOGRAM_SERIES]
        position = {key: index for index, key in enumerate(shown)}  # the rest share the last code: "other"
        codes = np.fromiter((position.get(key, len(shown)) for key in value_keys), dtype=np.int64,
                            count=len(value_keys))
        labels, series = [], []
        for code, key in enumerate(shown + ["other"]):
            if (codes == code).any():
                series.append(np.histogram(np.minimum(values[codes == code], top), bins=bins)[0])
                labels.append(f"{key[:40]} (n={int((codes == code).sum())})")
        note = f"; {clipped} above {top:.3g} in the last bin" if clipped else ""
        pixels, totals = _panel(image, left_box, bins, series, SERIES_COLORS,
                                f"LPIPS of {len(values)} scored pairs{note}", xlabel, fonts)
        # legend: title and one swatch per series, in the upper corner whose bars are lower
        rows = [split_by.replace("_", " ")[:40]] + labels
        width = 30 + max(int(draw.textlength(row, font=fonts[0])) for row in rows)
        height = 8 + 18 * len(rows)
        corners = [(left_box[0] + 8, left_box[1] + 8), (left_box[2] - 8 - width, left_box[1] + 8)]
        under = [totals[(pixels[1:] > x) & (pixels[:-1] < x + width)].max(initial=0) for x, _ in corners]
        x, y = corners[int(under[1] <= under[0])]
        draw.rectangle((x, y, x + width, y + height), fill="white", outline="#999999")
        draw.text((x + width / 2, y + 5), rows[0], fill="black", font=fonts[0], anchor="ma")
        for index, (row, color) in enumerate(zip(rows[1:], SERIES_COLORS), start=1):
            draw.rectangle((x + 6, y + 7 + 18 * index, x + 20, y + 17 + 18 * index), fill=color)
            draw.text((x + 26, y + 12 + 18 * index), row, fill="black", font=fonts[0], anchor="lm")
    else:
        _panel(image, left_box, np.linspace(0.0, 1.0, 41), [], SERIES_COLORS, "LPIPS", xlabel, fonts)
        draw.text(((left_box[0] + left_box[2]) / 2, (left_box[1] + left_box[3]) / 2), "no scored pairs",
                  fill="black", font=fonts[1], anchor="mm")
    fraction_bins = np.linspace(0.0, 1.0, 21)
    counts = np.histogram(fractions[np.isfinite(fractions)], bins=fraction_bins)[0]
    _panel(image, right_box, fraction_bins, [counts], ["#7f7f7f"], "Share of each image that was measured",
           "measured fraction (mask pixels / image pixels)", fonts)
    return charts.png(image)
