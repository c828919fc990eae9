"""A calibration as Markdown (calibration.md) and as the report page's section (HTML, between marks)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping, Optional, Sequence
from apache_beam.io.filesystems import FileSystems
from lpips_pipe.pipeline.render.html import esc
from lpips_pipe.pipeline.render.text import cell, number
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.pipeline.calibrate.curves import CURVE_SIZE

SECTION_BEGIN = f"<!-- {layout.CALIBRATION_SECTION_MARK}:begin -->"
SECTION_END = f"<!-- {layout.CALIBRATION_SECTION_MARK}:end -->"
_CURVE_NAME = re.compile(re.escape(layout.CALIBRATION_CURVE_PREFIX) + r"-[A-Za-z0-9._-]{1,80}"
                         + re.escape(layout.CALIBRATION_CURVE_SUFFIX))
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")


def calibration_name(output: str) -> str:
    """What the report page calls a calibration: the name of its ``--output`` folder."""
    return paths.basename(output.rstrip("/")) or output


def calibration_key(output: str) -> str:
    """The folder of a calibration beside a report page (``calibrations/<key>/``): its name made file-safe,
    and a short digest of its whole ``--output`` (two folders of one name stay two calibrations; the same
    folder calibrated again replaces its own)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", calibration_name(output))[:48].strip("._-") or "calibration"
    return f"{safe}-{hashlib.sha256(paths.absolute(output.rstrip('/')).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def interval(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"[{number(value[0])}, {number(value[1])}]"
    return "—"


# --------------------------------------------------------------------------- markdown and HTML
TABLE_HEAD = ("group", "labels", "keep", "reject", "threshold", "95% interval", "precision", "recall",
              "F1-best t", "95% interval", "F1", "note")


def entry_rows(calibration: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    rows: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(calibration.get("overall"), Mapping):
        rows.append(("overall (all labels)", calibration["overall"]))
    groups = calibration.get("groups")
    if isinstance(groups, Mapping):
        rows += [(str(name), entry) for name, entry in groups.items() if isinstance(entry, Mapping)]
    return rows


def _row_cells(name: str, entry: Mapping[str, Any]) -> list[str]:
    return [name, str(entry.get("n_labels", "—")), str(entry.get("n_keep", "—")), str(entry.get("n_reject", "—")),
            number(entry.get("threshold")), interval(entry.get("threshold_ci")),
            f"{number(entry.get('precision'))} {interval(entry.get('precision_ci'))}",
            f"{number(entry.get('recall'))} {interval(entry.get('recall_ci'))}",
            number(entry.get("f1_threshold")), interval(entry.get("f1_threshold_ci")), number(entry.get("f1")),
            str(entry.get("note") or "")]


def render_markdown(calibration: Mapping[str, Any]) -> str:
    """calibration.md: the settings, the counts, one table row per group and overall, the curves."""
    group_column = calibration.get("group_column")
    provenance = calibration.get("provenance") or {}
    source = f"`{group_column}` (from the {calibration.get('group_source')})" if group_column else "none"
    lines = ["# LPIPS cut-offs calibrated against labels", "",
             f"Rule: {calibration.get('rule')}. Target precision (good pairs among the kept ones): "
             f"{calibration.get('target_precision')}; the threshold is the one reaching it with the best recall; "
             f"intervals: 2.5-97.5 percentiles of {calibration.get('bootstrap')} bootstrap resamples (seed "
             f"{calibration.get('seed')}).", "",
             f"- labels: `{calibration.get('labels')}` (columns `{calibration.get('id_column')}`, "
             f"`{calibration.get('label_column')}`)",
             f"- scores: {', '.join(f'`{path}`' for path in (calibration.get('scores') or [])[:4])}"
             + (" ..." if len(calibration.get("scores") or []) > 4 else ""),
             f"- group column: {source}",
             "- provenance: " + ", ".join(f"{name} `{value}`" if value is not None else f"{name} not recorded"
                                          for name, value in provenance.items()), ""]
    counts = calibration.get("counts") or {}
    lines += ["## Counts", "", "| what | count |", "| --- | ---: |"]
    lines += [f"| {cell(name.replace('_', ' '))} | {value} |" for name, value in counts.items()]
    lines += ["", "## Thresholds", "", "| " + " | ".join(TABLE_HEAD) + " |",
              "| " + " | ".join(["---"] + ["---:"] * (len(TABLE_HEAD) - 2) + ["---"]) + " |"]
    lines += ["| " + " | ".join(cell(text) for text in _row_cells(name, entry)) + " |"
              for name, entry in entry_rows(calibration)]
    lines += ["", "Precision and recall shown with their 95% intervals at the chosen threshold.", "",
              "Apply them: `lpips-pipe-filter --scores RUN --output FILTERED --calibration calibration.json` "
              "(`--calibration_fallback overall` for groups without their own threshold).", "", "## Curves", ""]
    for name, entry in entry_rows(calibration):
        png = entry.get("curve_png")
        if isinstance(png, str) and _CURVE_NAME.fullmatch(png):
            lines += [f"### {cell(name)}", "", f"![precision and recall against the threshold: {cell(name)}]({png})",
                      ""]
    warnings = calibration.get("warnings") or []
    if warnings:
        lines += ["## Warnings", ""] + [f"- {cell(text)}" for text in warnings] + [""]
    return "\n".join(lines)


def report_section(calibration: dict, name: Optional[str] = None, folder: str = "") -> str:
    """An HTML fragment for a report page: the calibration's thresholds per group and overall (escaped text)
    and its curves as ``<img>`` of the ``pr-curve-*.png`` files expected next to the page, or in its
    ``folder`` beside it (names checked: never a path from data), between the comments :data:`SECTION_BEGIN`
    and :data:`SECTION_END`; ``name`` names it."""
    return "\n".join([SECTION_BEGIN, _calibration_html(calibration, name, folder), SECTION_END])


def report_sections(calibrations: Sequence[tuple[Optional[str], str, Any]]) -> str:
    """One page section holding every ``(name, folder, calibration)``, each as :func:`report_section` draws
    it, between :data:`SECTION_BEGIN` and :data:`SECTION_END`."""
    return "\n".join([SECTION_BEGIN, *(_calibration_html(calibration, name, folder)
                                       for name, folder, calibration in calibrations), SECTION_END])


def _calibration_html(calibration: Any, name: Optional[str], folder: str) -> str:
    if not isinstance(calibration, Mapping):
        calibration = {}
    if folder and not all(_KEY.fullmatch(part) for part in folder.split("/")):  # never a path from data
        folder = ""
    prefix = f"{folder}/" if folder else ""
    group_column = calibration.get("group_column")
    head = "".join(f"<th>{esc(cell)}</th>" for cell in TABLE_HEAD)
    body = "".join("<tr>" + "".join(f'<td class="{"n" if 0 < index < len(TABLE_HEAD) - 1 else ""}">{esc(cell)}</td>'
                                    for index, cell in enumerate(_row_cells(name, entry))) + "</tr>"
                   for name, entry in entry_rows(calibration))
    images, without = [], []
    for group, entry in entry_rows(calibration):
        png = entry.get("curve_png")
        if isinstance(png, str) and _CURVE_NAME.fullmatch(png):
            images.append(f'<figure class="curve"><img src="{esc(prefix + png)}" width="{CURVE_SIZE[0]}" '
                          f'height="{CURVE_SIZE[1]}" alt="precision and recall against the threshold: {esc(group)}">'
                          f"<figcaption>{esc(group)}</figcaption></figure>")
        elif entry.get("threshold") is None:
            without.append(group)
    if without:
        images.append(f"<p class=\"sub\">No chart for {esc(', '.join(without))}: no threshold (the table's note "
                      "says why).</p>")
    warnings = [str(text) for text in (calibration.get("warnings") or []) if isinstance(text, str)]
    anchor = f"calibration-{folder.split('/')[-1]}" if folder else "calibration"
    title = f"Calibration against labels: {esc(name)}" if name else "Calibration against labels"
    source = (f"<p class=\"sub\">Calibration <code>{esc(calibration.get('output'))}</code>, labels "
              f"<code>{esc(calibration.get('labels'))}</code>.</p>" if calibration.get("output") else "")
    parts = [f'<section id="{esc(anchor)}" class="calibration">', f"<h2>{title}</h2>", source,
             f"<p class=\"sub\">{esc(calibration.get('rule') or 'keep if lpips <= threshold')}; target precision "
             f"{esc(calibration.get('target_precision'))} (good pairs among the kept ones), best recall; "
             f"{esc(calibration.get('bootstrap'))} bootstrap resamples for the 95% intervals; group column "
             f"{esc(group_column or 'none')}. Apply with <code>lpips-pipe-filter --calibration "
             f"calibration.json</code>.</p>",
             f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>", *images]
    if warnings:
        parts.append('<ul class="notes-page">' + "".join(f"<li>{esc(text)}</li>" for text in warnings) + "</ul>")
    parts.append("</section>")
    return "\n".join(part for part in parts if part)


def _saved(path: str) -> Optional[dict]:
    try:
        if not FileSystems.exists(path):
            return None
        data = json.loads(paths.read_bytes(path).decode("utf-8"))
        return data if isinstance(data, dict) else None
    except Exception:  # pylint: disable=broad-except  # a broken copy: the page goes without it
        return None


def saved_report_section(folder: str) -> str:
    """The calibration section for the report page in ``folder`` (``OUT/report``): every calibration given
    to it, from the copies of calibration.json they left in ``folder/calibrations/<name>/`` (and the one an
    older release left in ``folder`` itself), each named, for the page written again; ``""`` when there is
    none or none can be read. The curves it shows are already beside the copies."""
    found: list[tuple[Optional[str], str, Any]] = []
    legacy = _saved(FileSystems.join(folder, layout.REPORT_CALIBRATION_JSON))
    if legacy is not None:
        found.append((legacy.get("name") if isinstance(legacy.get("name"), str) else None, "", legacy))
    pattern = FileSystems.join(paths.escape_glob(FileSystems.join(folder, layout.REPORT_CALIBRATIONS_DIR)), "*",
                               layout.REPORT_CALIBRATION_JSON)
    try:
        copies = paths.match(pattern)
    except Exception:  # pylint: disable=broad-except  # an unreadable folder: no section
        copies = []
    saved = []
    for path in copies:
        key = paths.basename(paths.dirname(path))
        data = _saved(path)
        if data is not None and _KEY.fullmatch(key):
            name = data.get("name") if isinstance(data.get("name"), str) else key
            saved.append((name, f"{layout.REPORT_CALIBRATIONS_DIR}/{key}", data))
    found += sorted(saved, key=lambda item: (str(item[0]), item[1]))
    return report_sections(found) if found else ""


def insert_section(page: str, section: str) -> str:
    """``page`` with ``section`` in place of an earlier calibration section, else before ``</body>`` (else at
    the end)."""
    begin, end = page.find(SECTION_BEGIN), page.find(SECTION_END)
    if begin >= 0 and end > begin:
        return page[:begin] + section + page[end + len(SECTION_END):]
    close = page.lower().rfind("</body>")
    if close < 0:
        return page + "\n" + section + "\n"
    return page[:close] + section + "\n" + page[close:]
