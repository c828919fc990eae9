"""Each group's precision / recall / F1 curve against the threshold, drawn with Pillow."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Iterable, Mapping, Optional
import numpy as np
from lpips_pipe.pipeline.render import charts
from lpips_pipe.pipeline.render.text import finite, number
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.messages import one_line

GROUP_CHARS = 40  # a group's name in a curve's picture


def curve_names(groups: Iterable[str]) -> dict[Optional[str], str]:
    """File names of the curves: ``pr-curve-overall.png`` (key ``None``) and ``pr-curve-<group>.png`` with
    the group made file-safe (letters, digits, ``.``, ``_``, ``-``); a name that had to change, or that
    would collide, gets a short digest of the group's name."""
    prefix, suffix = layout.CALIBRATION_CURVE_PREFIX, layout.CALIBRATION_CURVE_SUFFIX
    names: dict[Optional[str], str] = {None: f"{prefix}-{layout.CALIBRATION_CURVE_OVERALL}{suffix}"}
    taken = {names[None].lower()}
    for group in sorted(set(groups)):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", group)[:48].strip("._-") or "group"
        name = f"{prefix}-{safe}{suffix}"
        if safe != group or name.lower() in taken:
            name = f"{prefix}-{safe}-{hashlib.sha256(group.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}{suffix}"
        taken.add(name.lower())
        names[group] = name
    return names


# --------------------------------------------------------------------------- pictures
CURVE_SIZE = (860, 460)
CURVE_BOX = (70, 52, 590, 392)  # the plot area
COLORS = {"precision": "#1f77b4", "recall": "#ff7f0e", "f1": "#2ca02c", "chosen": "#d62728", "band": "#f6d2d2",
          "target": "#7f7f7f"}


def render_curve(entry: Mapping[str, Any], title: str) -> bytes:
    """A PNG of one entry's curve: precision, recall and F1 against the threshold (step lines: a threshold
    between two labelled scores keeps the same rows), the target precision as a dotted line, the chosen
    threshold as a red line (its interval shaded) with its precision and recall marked, the F1-best point as a
    green diamond. An entry without a curve gets its note instead."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    image = Image.new("RGB", CURVE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    small, medium = charts.fonts()
    left, top, right, bottom = CURVE_BOX
    draw.text((CURVE_SIZE[0] / 2, 10), title, fill="black", font=medium, anchor="ma")
    curve = entry.get("curve") or {}
    xs = [finite(value) for value in curve.get("threshold") or []]
    series = {name: [finite(value) for value in curve.get(name) or []] for name in ("precision", "recall", "f1")}
    if not xs or any(value is None for value in xs) or any(len(values) != len(xs) for values in series.values()):
        draw.rectangle(CURVE_BOX, outline="black")
        note = str(entry.get("note") or "no curve")
        draw.text(((left + right) / 2, (top + bottom) / 2), note[:90], fill="black", font=small, anchor="mm")
        return charts.png(image)
    chosen, f1_at = finite(entry.get("threshold")), finite(entry.get("f1_threshold"))
    band = entry.get("threshold_ci") if isinstance(entry.get("threshold_ci"), list) else None
    low, high = min(xs), max(xs)
    for extra in [chosen, f1_at] + [finite(value) for value in (band or [])]:
        if extra is not None:
            low, high = min(low, extra), max(high, extra)
    pad = (high - low) * 0.04 or max(abs(high) * 0.05, 0.01)
    low, high = max(0.0, low - pad) if low >= 0 else low - pad, high + pad
    x_of = lambda x: left + (x - low) / (high - low) * (right - left)  # noqa: E731
    y_of = lambda y: bottom - y / 1.04 * (bottom - top)  # noqa: E731
    if band and len(band) == 2 and all(finite(value) is not None for value in band):
        draw.rectangle((x_of(band[0]), top + 1, max(x_of(band[1]), x_of(band[0]) + 1), bottom - 1),
                       fill=COLORS["band"])
    target = finite(entry.get("target_precision"))
    if target is not None:
        for x in range(left, right, 8):
            draw.line((x, y_of(target), min(x + 4, right), y_of(target)), fill=COLORS["target"])
    for name, width in (("f1", 1), ("recall", 2), ("precision", 2)):
        points = []
        for index, (x, y) in enumerate(zip(xs, series[name])):
            nxt = xs[index + 1] if index + 1 < len(xs) else high
            points += [(x_of(x), y_of(y)), (x_of(nxt), y_of(y))]
        if len(points) > 1:
            draw.line(points, fill=COLORS[name], width=width)
    if chosen is not None:
        draw.line((x_of(chosen), top, x_of(chosen), bottom), fill=COLORS["chosen"], width=2)
        for name in ("precision", "recall"):
            value = finite(entry.get(name))
            if value is not None:
                x, y = x_of(chosen), y_of(value)
                draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=COLORS["chosen"], fill=COLORS[name], width=2)
    if f1_at is not None and finite(entry.get("f1")) is not None:
        x, y = x_of(f1_at), y_of(float(entry["f1"]))
        draw.polygon([(x, y - 7), (x + 7, y), (x, y + 7), (x - 7, y)], fill=COLORS["f1"], outline="black")
    draw.rectangle(CURVE_BOX, outline="black")
    charts.y_ticks(draw, y_of, np.arange(0.0, 1.0001, 0.2), left, small, ".1f")
    step = charts.tick_step(high - low, 6)
    charts.x_ticks(draw, x_of, math.ceil(low / step) * step, high, step, bottom, small)
    draw.text(((left + right) / 2, bottom + 26), "threshold t (keep a pair if lpips <= t)", fill="black",
              font=medium, anchor="mt")
    charts.y_label(image, "precision / recall / F1", medium, left, top, bottom, 200)
    rows = [("precision (good among kept)", COLORS["precision"]), ("recall (kept among good)", COLORS["recall"]),
            ("F1", COLORS["f1"])]
    if target is not None:
        rows.append((f"target precision {target:g}", COLORS["target"]))
    x0, y0 = right + 18, top
    for index, (text, color) in enumerate(rows):
        draw.rectangle((x0, y0 + 20 * index + 4, x0 + 16, y0 + 20 * index + 12), fill=color)
        draw.text((x0 + 22, y0 + 20 * index + 8), text, fill="black", font=small, anchor="lm")
    facts = [f"{entry.get('n_labels')} labels: {entry.get('n_keep')} keep, {entry.get('n_reject')} reject"]
    if chosen is not None:
        facts += [f"chosen t = {chosen:.4g} (red)", f"  precision {number(entry.get('precision'))}, "
                  f"recall {number(entry.get('recall'))}"]
        if band:
            facts.append(f"  95% interval of t: {number(band[0])} to {number(band[1])}")
    else:
        facts.append("no threshold reaches the target")
    if f1_at is not None:
        facts.append(f"F1-best t = {f1_at:.4g} (diamond), F1 {number(entry.get('f1'))}")
    for index, text in enumerate(facts):
        draw.text((x0, y0 + 20 * len(rows) + 16 + 18 * index), text, fill="black", font=small, anchor="lm")
    return charts.png(image)


def curve_title(group_column: Optional[str], group: Optional[str]) -> str:
    if group is None:
        return "Overall: precision and recall of keeping pairs with lpips <= t"
    name = group if len(group) <= GROUP_CHARS else group[:GROUP_CHARS] + "..."
    return f"{group_column or 'group'} = {one_line(name)}: precision and recall of lpips <= t"
