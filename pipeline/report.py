"""The run report: what a finished job produced, readable at a glance.

``python -m pipeline.report DIR [--group_column edit]`` (the job's command line runs it after every job
unless ``--no_report``) reads the job's outputs through :mod:`transforms.layout` (``DIR/scores/*.parquet``,
``DIR/errors/*.parquet``, and the flat ``DIR/scores-*.parquet`` / ``DIR/errors-*.parquet`` of older
releases), only the few columns it needs, never the image bytes, takes the job's counters when it has them,
and writes into ``DIR/report/``:

- ``report.md``: counts (input rows, skipped, scored, non-finite scores, errors by stage and type, duplicate
  ids, rows whose per-row scope was neither ``unedit_area`` nor ``edit_area``), LPIPS quantiles per mask
  mode and per group, the measured-fraction distribution, time per pipeline stage (the slowest first) when
  the runner reported it;
- ``histogram.png``: LPIPS per mask mode (or group) and measured fraction, labelled axes;
- ``report.json``: the same numbers for machines (and for re-rendering the report later).

Scored and error counts come from the output files (the truth even when a runner's counters double-count
retried bundles); rows skipped, model loads and pixels come from the counters. A score that is NaN, infinite
or null (scores files of older runs; the job now writes such rows to the errors as stage ``model``, type
``NonFiniteScore``) is counted as a *non-finite score*, not as scored, and is in no quantile. Group keys and
ids of any type (float16, decimal, timestamp, date, lists) are shown as text; null and NaN keys form one
group, ``null/NaN``. A scores file that cannot be read is left out with a note naming it.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import io
import json
import logging
import math
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw, ImageFont

from lpips_pipe.transforms import layout, paths, score_math, settings
from lpips_pipe.transforms.messages import one_line

_LOGGER = logging.getLogger("lpips_pipe.report")
REPORT_MD = layout.REPORT_MD
REPORT_JSON = layout.REPORT_JSON
HISTOGRAM_PNG = layout.HISTOGRAM_PNG
REPORT_FILES = layout.REPORT_FILES
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
QUANTILE_NAMES = ("min", "p5", "p25", "median", "p75", "p95", "max")
# measured_fraction buckets: nothing measured, four quarters, the whole image
FRACTION_BUCKETS = ("0 (nothing measured)", "(0, 0.25]", "(0.25, 0.5]", "(0.5, 0.75]", "(0.75, 1)", "1 (whole image)")
MAX_HISTOGRAM_SERIES = 8
DUPLICATE_EXAMPLES = 5
# One group for every missing key: None (null) and NaN alike.
NULL_LABEL = "null/NaN"
KNOWN_SCOPES = score_math.MASKED_SCOPES
SCORE_COLUMNS = (layout.ID_FIELD, layout.LPIPS_FIELD, layout.MEASURED_FRACTION_FIELD, layout.MASK_MODE_FIELD)
ERROR_COLUMNS = (layout.ID_FIELD, layout.ERROR_STAGE_FIELD, layout.ERROR_TYPE_FIELD)
PROG = "lpips-pipe-report"
DEFAULT_REPORT_K = 12  # rows per gallery of the page (--report_k; 0 = no galleries)
# The filter's rule for rows that measured nothing (pipeline.filter), stated where the report shows cuts.
NOTHING_MEASURED_RULE = ("lpips-pipe-filter never keeps a row that measured nothing (measured_fraction 0 under a "
                         "mask, box flag nothing_measured: its LPIPS of 0.0 means nothing), whatever the cut, unless "
                         "--keep_nothing_measured; --min_measured_fraction F also refuses rows measuring less than F "
                         "of the image.")


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows: options of the job and of ``lpips-pipe-report``, declared once
    (:mod:`transforms.settings`)."""

    report_group_column: Optional[str] = settings.option(
        None, "Also tabulate LPIPS per value of this (passed-through) column, and show a gallery of the worst rows "
              "of each of its largest groups (lpips-pipe-report: --group_column is the same option).",
        aliases=("--group_column",))
    report_k: int = settings.option(
        DEFAULT_REPORT_K, f"Rows per gallery of report/index.html (worst per mask mode and group, nearest "
                          f"--report_threshold, random from the better half, errors); default {DEFAULT_REPORT_K}, "
                          "0 = no galleries.", settings.count(0))
    report_threshold: Optional[float] = settings.option(
        None, "The report page also shows the rows whose LPIPS is nearest X.", settings.finite(), metavar="X")
    report_seed: int = settings.option(0, "Seed of the report's random gallery (rows with LPIPS <= the median); "
                                          "default 0.", settings.whole())

    def __post_init__(self) -> None:
        settings.check(self)


class ReportError(Exception):
    """A mistake in the report command (no such directory, no scores); nothing is written."""


@dataclass
class ScoreSummary:
    """LPIPS of one slice of the scores (all, one mask mode, one group)."""

    label: str
    count: int
    mean: Optional[float]
    quantiles: dict[str, Optional[float]]


@dataclass
class Report:
    """Everything report.md / report.json / the printed table show."""

    output: str
    counts: dict[str, int]
    errors_by_type: list[tuple[str, str, int]]
    by_mask_mode: list[ScoreSummary]
    by_group: list[ScoreSummary]
    group_column: Optional[str]
    measured_fraction: dict[str, int]
    measured_fraction_quantiles: dict[str, Optional[float]]
    duplicate_examples: list[tuple[Any, int]]
    stage_seconds: list[tuple[str, float]] = field(default_factory=list)
    wall_s: Optional[float] = None
    counters: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # {"rows": N, "values": {value: rows}} from the job's unknown_scope counters; empty when there were none
    unknown_scope: dict[str, Any] = field(default_factory=dict)
    # the page's galleries (pipeline.gallery.Gallery.to_json): name, title, rule, k, available, color_scale_max,
    # notes, tiles (id, lpips, measured_fraction, mask_mode, group, source_file, source_row, notes, images)
    galleries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def slowest_stage(self) -> Optional[tuple[str, float]]:
        return self.stage_seconds[0] if self.stage_seconds else None


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


def _json_value(value: Any) -> Any:
    """An id as report.json can hold it: strings and integers as they are, anything else as text."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return label(value)


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.chunked_array([pa.array([None if value is None else label(value) for value in column.to_pylist()],
                                          pa.string())])


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table; columns whose types disagree between files (a float16 id here, a string id there) become
    text rather than stopping the report."""
    if not tables:
        return pa.table({})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        types: dict[str, set] = {}
        for table in tables:
            for item in table.schema:
                types.setdefault(item.name, set()).add(item.type)
        clashing = {name for name, kinds in types.items() if len(kinds) > 1}
        fixed = []
        for table in tables:
            for name in clashing & set(table.column_names):
                table = table.set_column(table.column_names.index(name), name, _as_text(table.column(name)))
            fixed.append(table)
        return pa.concat_tables(fixed, promote_options="permissive")


def _read_columns(paths: Sequence[str], wanted: Sequence[str], notes: list[str],
                  required: Optional[str] = None) -> pa.Table:
    """``wanted`` columns (those present) of ``paths``, as one table. A file that is not readable Parquet,
    or lacks ``required``, is left out with a note naming it."""
    tables = []
    for path in paths:
        try:
            with layout.open_parquet(path) as parquet:
                names = parquet.schema_arrow.names
                if required and required not in names:
                    raise ValueError(f"no {required!r} column")
                if required == layout.LPIPS_FIELD:
                    kind = parquet.schema_arrow.field(required).type
                    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind)):
                        raise ValueError(f"column {required!r} has type {kind}, not a number")
                tables.append(parquet.read(columns=[name for name in wanted if name in names]))
        except Exception as error:  # not Parquet, truncated, unreadable: say so, report the rest
            reason = one_line(error) or type(error).__name__
            _LOGGER.warning("report: leaving out %s (%s)", path, reason)
            notes.append(f"left out {path}: {reason}")
    return _concat(tables)


def read_outputs(output: str, group_column: Optional[str] = None,
                 notes: Optional[list[str]] = None) -> tuple[pa.Table, pa.Table]:
    """The columns the report needs of ``output``'s scores and errors (never the image bytes): the
    ``OUT/scores/`` and ``OUT/errors/`` folders and older flat ``OUT/scores-*.parquet`` files
    (:func:`transforms.layout.kind_files`). Unreadable files are left out; ``notes`` gets a line for each."""
    notes = notes if notes is not None else []
    wanted = list(SCORE_COLUMNS) + ([group_column] if group_column and group_column not in SCORE_COLUMNS else [])
    wanted.append(layout.BOX_FLAGS_FIELD)  # counted (box_flag_counts), never shown as a group
    scores = _read_columns(layout.kind_files(output, layout.SCORES), wanted, notes, required=layout.LPIPS_FIELD)
    errors = _read_columns(layout.kind_files(output, layout.ERRORS), ERROR_COLUMNS, notes)
    return scores, errors


def _summary(name: str, values: np.ndarray) -> ScoreSummary:
    values = values[np.isfinite(values)]
    if not len(values):
        return ScoreSummary(name, 0, None, {quantile: None for quantile in QUANTILE_NAMES})
    quantiles = np.quantile(values, QUANTILES)
    return ScoreSummary(name, int(len(values)), float(values.mean()),
                        {quantile: float(value) for quantile, value in zip(QUANTILE_NAMES, quantiles)})


def _labels(table: pa.Table, name: str) -> list[str]:
    if name not in table.column_names:
        return [NULL_LABEL] * table.num_rows
    return [label(value) for value in table.column(name).to_pylist()]


def _by(keys: Sequence[str], values: np.ndarray) -> list[ScoreSummary]:
    """One summary per distinct key label, most rows first (ties by label)."""
    rows: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        rows.setdefault(key, []).append(index)
    summaries = [_summary(key, values[np.asarray(index, dtype=np.int64)]) for key, index in rows.items()]
    return sorted(summaries, key=lambda summary: (-summary.count, summary.label))


def fraction_buckets(fractions: np.ndarray) -> dict[str, int]:
    """Counts of measured fractions in :data:`FRACTION_BUCKETS`."""
    fractions = fractions[np.isfinite(fractions)]
    edges = [
        fractions <= 0,
        (fractions > 0) & (fractions <= 0.25),
        (fractions > 0.25) & (fractions <= 0.5),
        (fractions > 0.5) & (fractions <= 0.75),
        (fractions > 0.75) & (fractions < 1),
        fractions >= 1,
    ]
    return {name: int(mask.sum()) for name, mask in zip(FRACTION_BUCKETS, edges)}


def box_flag_counts(scores: pa.Table, counters: Mapping[str, int]) -> dict[str, int]:
    """``{"box_flags.<flag>": rows}`` for every box flag: from the scores' ``box_flags`` column, else (scores of
    older releases) from the job's counters."""
    names = {flag: layout.CounterName.box_flag(flag) for flag in layout.BOX_FLAGS}
    if layout.BOX_FLAGS_FIELD not in scores.column_names:
        return {name: layout.Counters(counters).value(name) for name in names.values()}
    column = scores.column(layout.BOX_FLAGS_FIELD)
    found: collections.Counter = collections.Counter()
    try:
        found.update(pc.list_flatten(column).to_pylist())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # not a list column
        pass
    return {name: int(found.get(flag, 0)) for flag, name in names.items()}


def box_flag_rows(counts: Mapping[str, int]) -> list[tuple[str, str, int]]:
    """``(flag, counts key, rows)`` of the box flags with rows, for the report's count tables."""
    return [(flag, layout.CounterName.box_flag(flag), int(counts.get(layout.CounterName.box_flag(flag), 0)))
            for flag in layout.BOX_FLAGS if counts.get(layout.CounterName.box_flag(flag))]


def unknown_scopes(counters: Mapping[str, int]) -> dict[str, Any]:
    """``{"rows": N, "values": {value: rows}}`` from the job's ``unknown_scope_rows`` and
    ``unknown_scope.<value>`` counters (at most 20 values are counted by the job); ``{}`` when none."""
    counters = layout.Counters(counters)
    rows, values = counters.unknown_scope_rows, counters.unknown_scope_values()
    if not rows and not values:
        return {}
    values = dict(sorted(values.items(), key=lambda item: (-item[1], item[0])))
    return {"rows": max(rows, sum(values.values())), "values": values}


def build_report(output: str, scores: pa.Table, errors: pa.Table, counters: Optional[dict[str, int]] = None,
                 group_column: Optional[str] = None, stage_msecs: Optional[dict[str, float]] = None,
                 wall_s: Optional[float] = None, notes: Optional[Sequence[str]] = None) -> Report:
    """Summarise :func:`read_outputs`'s tables and the job's counters / stage times (milliseconds)."""
    counters = dict(counters or {})
    notes = list(notes or [])
    lpips_all = _column(scores, layout.LPIPS_FIELD)
    finite = np.isfinite(lpips_all)
    non_finite = int((~finite).sum())
    finite_rows = scores.filter(pa.array(finite)) if non_finite else scores
    lpips = lpips_all[finite]
    fractions = _column(finite_rows, layout.MEASURED_FRACTION_FIELD)
    by_group: list[ScoreSummary] = []
    if group_column and scores.num_rows:
        if group_column in scores.column_names:
            by_group = _by(_labels(finite_rows, group_column), lpips)
        else:
            notes.append(f"group column {group_column!r} is not in the scores; no per-group table")
    error_types: dict[tuple[str, str], int] = {}
    if errors.num_rows:
        stages = _labels(errors, layout.ERROR_STAGE_FIELD)
        kinds = _labels(errors, layout.ERROR_TYPE_FIELD)
        for stage, kind in zip(stages, kinds):
            error_types[(stage, kind)] = error_types.get((stage, kind), 0) + 1
    id_columns = [table.column(layout.ID_FIELD) for table in (scores, errors)
                  if table.num_rows and layout.ID_FIELD in table.column_names]
    stages_s = sorted(((str(name), float(msecs) / 1000.0) for name, msecs in (stage_msecs or {}).items()),
                      key=lambda item: (-item[1], item[0]))
    by_mask_mode = [_summary("all", lpips)]
    if finite_rows.num_rows:
        by_mask_mode += _by(_labels(finite_rows, layout.MASK_MODE_FIELD), lpips)
    repeated = repeated_ids(id_columns)
    return Report(
        output=output, counts={**_counts(counters, len(lpips), non_finite, errors.num_rows, repeated),
                               **box_flag_counts(scores, counters)},
        errors_by_type=sorted(((stage, kind, n) for (stage, kind), n in error_types.items()),
                              key=lambda item: (-item[2], item[0], item[1])),
        by_mask_mode=by_mask_mode, by_group=by_group, group_column=group_column,
        measured_fraction=fraction_buckets(fractions),
        measured_fraction_quantiles=_summary(layout.MEASURED_FRACTION_FIELD, fractions).quantiles,
        duplicate_examples=[(_json_value(value), n) for value, n in repeated[:DUPLICATE_EXAMPLES]],
        stage_seconds=stages_s, wall_s=wall_s, counters=counters, notes=notes,
        unknown_scope=unknown_scopes(counters),
    )


def _column(table: pa.Table, name: str) -> np.ndarray:
    """``name`` as float64 (null → NaN); all NaN when the table has no such column or it is not numeric."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    column = table.column(name)
    try:
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            column = pc.cast(column, pa.float64())
        return np.asarray(column.to_numpy(), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError, ValueError):
        return np.full(table.num_rows, np.nan)


def _id_key(value: Any) -> Any:
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return "NaN"
    try:
        hash(value)
        return value
    except TypeError:  # list / struct ids
        return label(value)


def repeated_ids(columns: Sequence[pa.ChunkedArray]) -> list[tuple[Any, int]]:
    """``(id, rows)`` of every non-null id found on more than one output row, most repeated first. Ids of
    any type: when Arrow cannot count them (float16, ids typed differently in scores and errors), they are
    counted in Python."""
    columns = [column for column in columns if len(column) and not pa.types.is_null(column.type)]
    if not columns:
        return []
    pairs: list[tuple[Any, int]]
    try:
        if len({column.type for column in columns}) != 1:
            raise pa.ArrowTypeError("ids typed differently")
        counted = pc.value_counts(pa.chunked_array([chunk for column in columns for chunk in column.chunks],
                                                   type=columns[0].type).combine_chunks())
        pairs = list(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        counter: collections.Counter = collections.Counter()
        for column in columns:
            counter.update(_id_key(value) for value in column.to_pylist())
        pairs = list(counter.items())
    repeated = [(value, int(n)) for value, n in pairs if n > 1 and value is not None]
    return sorted(repeated, key=lambda item: (-item[1], label(item[0])))


def _counts(counters: Mapping[str, int], scored: int, non_finite: int, errors: int,
            repeated: list[tuple[Any, int]]) -> dict[str, int]:
    counters = layout.Counters(counters)
    name = layout.CounterName
    skipped, kept = counters.rows_skipped, counters.rows_kept
    return {
        "input_rows": counters.rows_read if counters.has(name.ROWS_READ) else scored + non_finite + errors + skipped,
        "skipped": skipped,
        # finished by an interrupted run into the same output and kept in place (restart)
        "kept": kept,
        "scored": scored,
        # rows of scores files (older runs) whose lpips is NaN, infinite or null: in no quantile
        "non_finite_scores": non_finite,
        "errors": errors,
        # counted by the job when it has an id column; else (or without counters) read off the outputs
        "duplicate_ids": counters.duplicate_ids if counters.has(name.DUPLICATE_IDS) else len(repeated),
        "duplicate_id_rows": (counters.duplicate_id_rows if counters.has(name.DUPLICATE_ID_ROWS)
                              else sum(n for _, n in repeated)),
        "model_loads": counters.model_loads,
        "pixels_scored": counters.pixels_scored,
    }


def _number(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no column break)."""
    return one_line(text).replace("|", "\\|")


def _quantile_table(summaries: list[ScoreSummary], heading: str) -> list[str]:
    lines = [f"| {_cell(heading)} | n | mean | " + " | ".join(QUANTILE_NAMES) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in QUANTILE_NAMES) + " |"]
    for summary in summaries:
        lines.append(f"| {_cell(summary.label)} | {summary.count} | {_number(summary.mean)} | "
                     + " | ".join(_number(summary.quantiles[name]) for name in QUANTILE_NAMES) + " |")
    return lines


def unknown_scope_line(report: Report) -> Optional[str]:
    """"N rows had a scope other than unedit_area/edit_area and were scored as full image: values ..."."""
    if not report.unknown_scope:
        return None
    values = report.unknown_scope.get("values") or {}
    rows = report.unknown_scope.get("rows", 0)
    listed = ", ".join(f"{name!r} ({n})" for name, n in values.items()) or "not recorded"
    more = " and others" if values and sum(values.values()) < rows else ""
    return (f"{rows} rows had a scope other than {'/'.join(KNOWN_SCOPES)} and were scored as full image: "
            f"values {listed}{more}")


def render_markdown(report: Report) -> str:
    """report.md: counts, errors, score quantiles, measured fraction, stage times, the histogram."""
    counts = report.counts
    lines = ["# lpips-pipe run report", "",
             f"Outputs: `{report.output}` (`{layout.SCORES}/`, `{layout.ERRORS}/`). LPIPS: lower is better; "
             "0 = the measured region is perceptually identical to the reference.", "",
             "## Counts", "", "| rows | count |", "| --- | ---: |",
             f"| input rows | {counts['input_rows']} |",
             f"| skipped (id already in earlier outputs, `--skip_existing`) | {counts['skipped']} |",
             *([f"| kept (finished by an interrupted run, not scored again) | {counts['kept']} |"]
               if counts.get("kept") else []),
             f"| scored | {counts['scored']} |"]
    if counts.get("non_finite_scores"):
        lines.append(f"| non-finite scores (NaN/inf/null lpips; not in the quantiles) | "
                     f"{counts['non_finite_scores']} |")
    lines.append(f"| errors | {counts['errors']} |")
    lines.append(f"| ids on more than one row (each row kept) | {counts['duplicate_ids']} id(s), "
                 f"{counts['duplicate_id_rows']} rows |")
    lines += [f"| rows with box flag `{flag}` | {n} |" for flag, _, n in box_flag_rows(counts)]
    lines += [f"| model loads | {counts['model_loads']} |", f"| pixels scored | {counts['pixels_scored']:,} |"]
    if report.wall_s is not None:
        rate = counts["scored"] / report.wall_s if report.wall_s > 0 else 0.0
        lines.append(f"| wall time | {report.wall_s:.1f} s ({rate:.2f} pairs/s) |")
    if counts.get("non_finite_scores"):
        lines += ["", f"non-finite scores: {counts['non_finite_scores']} (rows of the scores files whose lpips is "
                      "NaN, infinite or null, written by older releases; the job now sends them to the errors as "
                      "`model` / `NonFiniteScore`). They are not counted as scored."]
    scope = unknown_scope_line(report)
    if scope:
        lines += ["", _cell(scope) + "."]
    if report.duplicate_examples:
        examples = ", ".join(f"`{_cell(label(value))}` ×{n}" for value, n in report.duplicate_examples)
        lines += ["", f"Duplicated ids (first {len(report.duplicate_examples)}): {examples}."]
    lines += ["", "## Errors by stage and type", ""]
    if report.errors_by_type:
        lines += ["| stage | type | rows |", "| --- | --- | ---: |"]
        lines += [f"| {_cell(stage)} | {_cell(kind)} | {n} |" for stage, kind, n in report.errors_by_type]
    else:
        lines.append("No errors.")
    lines += ["", "## LPIPS by mask mode", ""] + _quantile_table(report.by_mask_mode, "mask mode")
    if report.by_group:
        lines += ["", f"## LPIPS by {_cell(report.group_column or '')}", ""] + _quantile_table(
            report.by_group, report.group_column or "")
    lines += ["", "## Measured fraction (mask pixels / image pixels)", "", "| measured fraction | rows |",
              "| --- | ---: |"]
    lines += [f"| {name} | {n} |" for name, n in report.measured_fraction.items()]
    quantiles = report.measured_fraction_quantiles
    lines += ["", "Quantiles: " + ", ".join(f"{name} {_number(quantiles[name])}" for name in QUANTILE_NAMES) + "."]
    lines += ["", NOTHING_MEASURED_RULE]
    lines += ["", "## Time per stage", "",
              "Processing time Beam measured inside each step, summed over workers (worker start-up and model "
              "loading are not in it).", ""]
    if report.stage_seconds:
        total = sum(seconds for _, seconds in report.stage_seconds) or 1.0
        lines += ["| stage | seconds | share |", "| --- | ---: | ---: |"]
        lines += [f"| {_cell(name)} | {seconds:.2f} | {100 * seconds / total:.0f}% |"
                  for name, seconds in report.stage_seconds]
        name, seconds = report.stage_seconds[0]
        lines += ["", f"Slowest stage: **{name}** ({seconds:.2f} s)."]
    else:
        lines.append("Not reported by this runner (the in-process runner reports it; see the runner's UI elsewhere).")
    lines += [f"- {_cell(note)}" for note in report.notes]
    lines += ["", "## Histogram", "", f"![LPIPS and measured fraction histograms]({HISTOGRAM_PNG})", ""]
    if report.galleries:
        listed = ", ".join(f"{_cell(item['title'])} ({len(item['tiles'])})" for item in report.galleries)
        lines += ["## Galleries", "", f"[{layout.REPORT_HTML}]({layout.REPORT_HTML}) shows the rows: {listed}.", ""]
    return "\n".join(lines)


def format_table(report: Report) -> str:
    """The short table printed after a run: LPIPS quantiles per mask mode, and the slowest stage."""
    header = f"  {'mask mode':<10} {'n':>7} {'mean':>8} {'p5':>8} {'median':>8} {'p95':>8} {'max':>8}"
    lines = [header]
    for summary in report.by_mask_mode:
        q = summary.quantiles
        lines.append(f"  {_cell(summary.label):<10} {summary.count:>7} {_number(summary.mean):>8} "
                     f"{_number(q['p5']):>8} {_number(q['median']):>8} {_number(q['p95']):>8} {_number(q['max']):>8}")
    if report.counts.get("non_finite_scores"):
        lines.append(f"  non-finite scores: {report.counts['non_finite_scores']} (not in the quantiles)")
    scope = unknown_scope_line(report)
    if scope:
        lines.append(f"  {_cell(scope)}")
    if report.slowest_stage:
        name, seconds = report.slowest_stage
        lines.append(f"  slowest stage: {name} ({seconds:.1f} s)")
    return "\n".join(lines)


# Matplotlib's tab10: the series colours of the LPIPS panel (8 series + "other" fit).
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
HISTOGRAM_SIZE = (1100, 420)


def _step(span: float, most: int, whole: bool = False) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10^k tick step cutting ``span`` into at most ``most`` parts (whole numbers
    when ``whole``)."""
    raw = max(span / most, 1.0 if whole else 1e-12)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(factor * power for factor in (1, 2, 2.5, 5, 10)
                if factor * power >= raw * (1 - 1e-9) and not (whole and factor * power % 1))


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
    step = _step(high, 6, whole=True)
    for y in np.arange(0.0, high + step * 1e-6, step):
        draw.line((left - 4, y_of(y), left, y_of(y)), fill="black")
        draw.text((left - 7, y_of(y)), f"{y:.0f}", fill="black", font=small, anchor="rm")
    step = _step(edges[-1] - edges[0], 6)
    for x in np.arange(edges[0], edges[-1] + step * 1e-6, step):
        draw.line((x_of(x), bottom, x_of(x), bottom + 4), fill="black")
        draw.text((x_of(x), bottom + 7), f"{x:.3g}", fill="black", font=small, anchor="mt")
    draw.text(((left + right) / 2, top - 8), title, fill="black", font=medium, anchor="md")
    draw.text(((left + right) / 2, bottom + 26), xlabel, fill="black", font=medium, anchor="mt")
    ylabel = Image.new("RGB", (60, 20), "white")
    ImageDraw.Draw(ylabel).text((30, 10), "pairs", fill="black", font=medium, anchor="mm")
    image.paste(ylabel.rotate(90, expand=True), (left - 62, (top + bottom) // 2 - 30))
    return np.array([x_of(edge) for edge in edges]), totals


def render_histogram(scores: pa.Table, group_column: Optional[str] = None) -> bytes:
    """histogram.png, drawn with Pillow: LPIPS stacked per mask mode (or per group, largest first), and
    measured fraction."""
    split_by = group_column if group_column and group_column in scores.column_names else layout.MASK_MODE_FIELD
    lpips = _column(scores, layout.LPIPS_FIELD)
    finite = np.isfinite(lpips)
    fractions = _column(scores, layout.MEASURED_FRACTION_FIELD)[finite]
    image = Image.new("RGB", HISTOGRAM_SIZE, "white")
    draw = ImageDraw.Draw(image)
    fonts = (ImageFont.load_default(size=12), ImageFont.load_default(size=14))
    left_box, right_box = (70, 30, 640, 350), (750, 30, 1080, 350)  # plot areas, about 3 : 2 wide
    xlabel = "LPIPS (area-normalised; lower = closer to the reference)"
    if finite.any():
        values = lpips[finite]
        top = float(np.quantile(values, 0.99)) if len(values) > 20 else float(values.max())
        top = top if top > 0 else 1.0
        clipped = int((values > top).sum())
        bins = np.linspace(0.0, top, 41)
        all_keys = _labels(scores, split_by)
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
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def report_paths(output: str) -> list[str]:
    """``OUT/report/report.md``, ``report.json``, ``histogram.png`` (:func:`transforms.layout.report_paths`)."""
    return layout.report_paths(output)


def page_path(output: str) -> str:
    """``OUT/report/index.html``: the page (counts, quantiles, histogram, galleries) that opens from disk."""
    return FileSystems.join(layout.report_dir(output), layout.REPORT_HTML)


def write_report(output: str, counters: Optional[dict[str, int]] = None, group_column: Optional[str] = None,
                 stage_msecs: Optional[dict[str, float]] = None, wall_s: Optional[float] = None, *,
                 report_k: int = DEFAULT_REPORT_K, report_threshold: Optional[float] = None,
                 report_seed: int = 0) -> Report:
    """Read ``output``'s outputs once and write report.md, report.json, histogram.png and index.html (with
    ``report_k`` rows per gallery, 0 = no galleries; ``report_threshold``: a gallery of the rows nearest it;
    ``report_seed``: the random gallery's seed) into ``OUT/report/``."""
    notes: list[str] = []
    scores, errors = read_outputs(output, group_column, notes)
    return _write_report(output, scores, errors, notes, counters, group_column, stage_msecs, wall_s,
                         report_k=report_k, report_threshold=report_threshold, report_seed=report_seed)


def _write_report(output: str, scores: pa.Table, errors: pa.Table, notes: list[str],
                  counters: Optional[dict[str, int]] = None, group_column: Optional[str] = None,
                  stage_msecs: Optional[dict[str, float]] = None, wall_s: Optional[float] = None, *,
                  report_k: int = DEFAULT_REPORT_K, report_threshold: Optional[float] = None,
                  report_seed: int = 0) -> Report:
    report = build_report(output, scores, errors, counters, group_column, stage_msecs, wall_s, notes)
    markdown, summary, histogram = report_paths(output)
    _write(histogram, render_histogram(scores, group_column))
    galleries = _galleries(output, report, report_k, report_threshold, report_seed)
    _write(markdown, render_markdown(report).encode("utf-8"))
    _write(summary, json.dumps(asdict(report), indent=2, default=str).encode("utf-8"))
    try:
        from lpips_pipe.pipeline import calibrate, report_page  # noqa: PLC0415

        page = report_page.render_run_page(report, galleries, report_k)
        section = calibrate.saved_report_section(layout.report_dir(output))  # a calibration of these scores
        _write(page_path(output), (calibrate.insert_section(page, section) if section else page).encode("utf-8"))
    except Exception as error:  # pylint: disable=broad-except  # the page is extra: the rest is written
        _LOGGER.warning("report: %s not written (%s: %s)", page_path(output), type(error).__name__,
                        one_line(error))
    return report


def _galleries(output: str, report: Report, k: int, threshold: Optional[float], seed: int) -> list[Any]:
    """The page's galleries (:mod:`pipeline.gallery`), their tiles written under ``report/tiles/``; failures
    are notes of ``report`` (and warnings), never exceptions. Stored in ``report.galleries`` for report.json."""
    try:
        from lpips_pipe.pipeline import gallery  # noqa: PLC0415  # images, and torch for the maps, only when galleries are on
    except Exception as error:  # pylint: disable=broad-except  # a broken installation: the rest is written
        _LOGGER.warning("report: galleries not made (%s: %s)", type(error).__name__, one_line(error))
        report.notes.append(f"galleries not made ({type(error).__name__}: {one_line(error)})")
        return []
    median = report.by_mask_mode[0].quantiles.get("median") if report.by_mask_mode else None
    mask_modes = [summary.label for summary in report.by_mask_mode[1:]]
    groups = [summary.label for summary in report.by_group]

    def select(notes: list[str]) -> list[Any]:
        if k <= 0:
            return []
        return gallery.run_galleries(output, k, mask_modes, groups, report.group_column if groups else None,
                                     median, threshold, seed, notes)

    galleries = gallery.build(select, layout.report_dir(output), report.notes)
    try:
        report.galleries = [item.to_json() for item in galleries]
    except Exception as error:  # pylint: disable=broad-except  # an odd value: the page still shows them
        report.notes.append(f"galleries left out of {REPORT_JSON} ({type(error).__name__})")
    return galleries


def _valid_facts(earlier: Any) -> Optional[str]:
    """Why an earlier report.json cannot give counters (``None`` when it can)."""
    if not isinstance(earlier, dict):
        return f"a JSON object was expected, got {type(earlier).__name__}"
    counters = earlier.get("counters", {})
    if counters is None:
        counters = {}
    if not isinstance(counters, dict):
        return f"'counters' is a {type(counters).__name__}, not an object"
    for name, value in counters.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int):
            return f"counter {name!r} is {value!r}, not a whole number"
    stages = earlier.get("stage_seconds", [])
    if stages is None:
        stages = []
    if not isinstance(stages, list):
        return f"'stage_seconds' is a {type(stages).__name__}, not a list"
    for item in stages:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or isinstance(item[1], bool) or not isinstance(item[1], (int, float)) or not math.isfinite(item[1])):
            return f"'stage_seconds' holds {item!r}, not a [name, seconds] pair"
    wall_s = earlier.get("wall_s")
    if wall_s is not None and (isinstance(wall_s, bool) or not isinstance(wall_s, (int, float))
                               or not math.isfinite(wall_s)):
        return f"'wall_s' is {wall_s!r}, not a number"
    return None


def _earlier_run_facts(output: str) -> dict[str, Any]:
    """Counters, stage times and wall time an earlier report.json in ``output`` recorded (``OUT/report/``, or
    ``OUT/`` for older releases); nothing (and a warning) when there is none or it has the wrong shape."""
    for path in (report_paths(output)[1], FileSystems.join(output, REPORT_JSON)):
        if not FileSystems.exists(path):
            continue
        try:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                earlier = json.loads(handle.read().decode("utf-8"))
        except (ValueError, OSError) as error:  # bad JSON, not UTF-8, a folder, unreadable
            _LOGGER.warning("ignoring %s (%s): the report will have no counters", path,
                            one_line(error) or type(error).__name__)
            return {}
        problem = _valid_facts(earlier)
        if problem:
            _LOGGER.warning("ignoring %s (%s): the report will have no counters", path, problem)
            return {}
        return {"counters": dict(earlier.get("counters") or {}),
                "stage_msecs": {name: seconds * 1000 for name, seconds in earlier.get("stage_seconds") or []},
                "wall_s": earlier.get("wall_s")}
    return {}


def check_output(output: str) -> None:
    """Raise :class:`ReportError` unless ``output`` is a run directory holding scores files."""
    if paths.is_local(output):
        if not os.path.exists(output):
            raise ReportError(f"{output}: no such directory")
        if not os.path.isdir(output):
            raise ReportError(f"{output} is a file; give a job's --output directory")
    try:
        found = layout.kind_files(output, layout.SCORES)
    except Exception as error:  # an unreachable bucket, a bad path
        raise ReportError(f"cannot list {output}: {one_line(error)}") from error
    if not found:
        raise ReportError(f"no scores in {output} (expected {layout.SCORES}/*.parquet or scores-*.parquet)")
    folder = layout.report_dir(output)
    if paths.is_local(output) and os.path.exists(folder) and not os.path.isdir(folder):
        raise ReportError(f"{folder} is a file: the report is written into a folder of that name; move the file")


def _preload_galleries() -> None:
    try:
        importlib.import_module("lpips")  # only loaded ahead: torch, the LPIPS package, the galleries' code
        importlib.import_module("lpips_pipe.pipeline.gallery")
    except Exception:  # pylint: disable=broad-except  # _galleries reports what is wrong
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lpips-pipe-report DIR``: (re)write DIR/report/report.md, report.json, histogram.png and index.html.

    Exit 0 when written, 2 on a mistake (no such directory, a file, no scores: one line, nothing written)."""
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("output", help="A job's --output directory (any Beam filesystem); the report goes to "
                                       "DIR/report/.")
    settings.add_arguments(parser, ReportConfig, aliases=True)
    args = parser.parse_args(argv)
    args.group_column = args.report_group_column
    paths.configure()  # object stores: credentials and endpoints from the environment
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.report_k > 0:  # the galleries' code (torch, the LPIPS package) loads while the outputs are read
        threading.Thread(target=_preload_galleries, name="report-preload", daemon=True).start()
    try:
        check_output(args.output)
        if args.group_column is not None and not args.group_column.strip():
            raise ReportError("--group_column must name a column")
        notes: list[str] = []
        scores, errors = read_outputs(args.output, args.group_column, notes)
        if layout.LPIPS_FIELD not in scores.column_names:
            raise ReportError(f"no readable scores in {args.output}: {notes[0] if notes else 'no lpips column'}")
    except ReportError as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        report = _write_report(args.output, scores, errors, notes, group_column=args.group_column,
                               report_k=args.report_k, report_threshold=args.report_threshold,
                               report_seed=args.report_seed, **_earlier_run_facts(args.output))
    except (OSError, IOError) as error:  # a read-only folder, a full disk: one line, not a traceback
        print(f"{PROG}: error: cannot write the report into {layout.report_dir(args.output)}: "
              f"{one_line(error) or type(error).__name__}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"  report: {', '.join(report_paths(args.output) + [page_path(args.output)])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
