"""What the report says, read from a run's outputs: counts, errors by type, LPIPS and measured-fraction quantiles (per mask mode and group), box flags, repeated ids."""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lpips_pipe.pipeline.render.text import NULL_LABEL, json_value, label
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.rules import measured
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
DUPLICATE_EXAMPLES = 5
# One group for every missing key: None (null) and NaN alike.
KNOWN_SCOPES = score_math.MASKED_SCOPES
SCORE_COLUMNS = (layout.ID_FIELD, layout.LPIPS_FIELD, layout.MEASURED_FRACTION_FIELD, layout.MASK_MODE_FIELD)
ERROR_COLUMNS = (layout.ID_FIELD, layout.ERROR_STAGE_FIELD, layout.ERROR_TYPE_FIELD)
# The filter's rule for rows that measured nothing (pipeline.filter), stated where the report shows cuts.
NOTHING_MEASURED_RULE = ("lpips-pipe-filter never keeps a row that measured nothing (measured_fraction 0 under a "
                         "mask, box flag nothing_measured: its LPIPS of 0.0 means nothing), whatever the cut, unless "
                         "--keep_nothing_measured; --min_measured_fraction F also refuses rows measuring less than F "
                         "of the image.")


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
    # "Where to cut": per suggested threshold (:func:`cut_shares`) its quantile, the threshold as the page prints
    # it, and the rows lpips-pipe-filter --threshold keeps with it, counted from the scores
    cuts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def slowest_stage(self) -> Optional[tuple[str, float]]:
        return self.stage_seconds[0] if self.stage_seconds else None


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


def text_labels(table: pa.Table, name: str) -> list[str]:
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
    lpips_all = float_column(scores, layout.LPIPS_FIELD)
    finite = np.isfinite(lpips_all)
    non_finite = int((~finite).sum())
    finite_rows = scores.filter(pa.array(finite)) if non_finite else scores
    lpips = lpips_all[finite]
    fractions = float_column(finite_rows, layout.MEASURED_FRACTION_FIELD)
    by_group: list[ScoreSummary] = []
    if group_column and scores.num_rows:
        if group_column in scores.column_names:
            by_group = _by(text_labels(finite_rows, group_column), lpips)
        else:
            notes.append(f"group column {group_column!r} is not in the scores; no per-group table")
    error_types: dict[tuple[str, str], int] = {}
    if errors.num_rows:
        stages = text_labels(errors, layout.ERROR_STAGE_FIELD)
        kinds = text_labels(errors, layout.ERROR_TYPE_FIELD)
        for stage, kind in zip(stages, kinds):
            error_types[(stage, kind)] = error_types.get((stage, kind), 0) + 1
    id_columns = [table.column(layout.ID_FIELD) for table in (scores, errors)
                  if table.num_rows and layout.ID_FIELD in table.column_names]
    stages_s = sorted(((str(name), float(msecs) / 1000.0) for name, msecs in (stage_msecs or {}).items()),
                      key=lambda item: (-item[1], item[0]))
    by_mask_mode = [_summary("all", lpips)]
    if finite_rows.num_rows:
        by_mask_mode += _by(text_labels(finite_rows, layout.MASK_MODE_FIELD), lpips)
    repeated = repeated_ids(id_columns)
    refused = measured.refusals(finite_rows) != None  # noqa: E711  # never kept by the filter, whatever the cut
    return Report(
        output=output, counts={**_counts(counters, len(lpips), non_finite, errors.num_rows, repeated),
                               **box_flag_counts(scores, counters)},
        errors_by_type=sorted(((stage, kind, n) for (stage, kind), n in error_types.items()),
                              key=lambda item: (-item[2], item[0], item[1])),
        by_mask_mode=by_mask_mode, by_group=by_group, group_column=group_column,
        measured_fraction=fraction_buckets(fractions),
        measured_fraction_quantiles=_summary(layout.MEASURED_FRACTION_FIELD, fractions).quantiles,
        duplicate_examples=[(json_value(value), n) for value, n in repeated[:DUPLICATE_EXAMPLES]],
        stage_seconds=stages_s, wall_s=wall_s, counters=counters, notes=notes,
        unknown_scope=unknown_scopes(counters),
        cuts=cut_shares(lpips, refused, by_mask_mode[0].quantiles),
    )


CUT_QUANTILES = ("p25", "median", "p75", "p95")  # the report's suggested thresholds


def cut_threshold(value: float) -> float:
    """A suggested threshold as the report prints it (``--threshold`` with 4 significant digits), the value a
    user passes to the filter."""
    return float(f"{value:.4g}")


def cut_shares(lpips: np.ndarray, refused: np.ndarray, quantiles: Mapping[str, Optional[float]]) -> list[dict]:
    """For each of :data:`CUT_QUANTILES`: the threshold (:func:`cut_threshold` of the quantile) and the rows
    ``lpips-pipe-filter --threshold`` keeps with it, counted from the finite scores ``lpips``: every row at or
    below it (ties included) but those ``refused`` for measuring nothing, which the filter never keeps."""
    lpips = np.asarray(lpips, dtype=np.float64)
    refused = np.asarray(refused, dtype=bool)
    cuts = []
    for name in CUT_QUANTILES:
        value = quantiles.get(name)
        if value is None or not len(lpips):
            continue
        threshold = cut_threshold(value)
        keeps = int(((lpips <= threshold) & ~refused).sum())
        cuts.append({"name": name, "quantile": float(value), "threshold": threshold, "keeps": keeps,
                     "rows": int(len(lpips)), "share": keeps / len(lpips)})
    return cuts


def float_column(table: pa.Table, name: str) -> np.ndarray:
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
