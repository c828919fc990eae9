"""The run report: what a finished job produced, readable at a glance.

``python -m pipeline.report DIR [--group_column edit]`` (the job's command line runs it after every job
unless ``--no_report``) reads ``DIR/scores-*.parquet`` and ``DIR/errors-*.parquet`` (only the few columns
it needs, never the image bytes), takes the job's counters when it has them, and writes:

- ``DIR/report.md``: counts (input rows, skipped, scored, errors by stage and type, duplicate ids),
  LPIPS quantiles per mask mode and per group, the measured-fraction distribution, time per pipeline
  stage (the slowest first) when the runner reported it;
- ``DIR/histogram.png``: LPIPS per mask mode (or group) and measured fraction, labelled axes;
- ``DIR/report.json``: the same numbers for machines (and for re-rendering the report later).

Scored and error counts come from the output files (the truth even when a runner's counters double-count
retried bundles); rows skipped, model loads and pixels come from the counters.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.parquet_io import match_inputs

_LOGGER = logging.getLogger("lpips_pipe.report")
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
HISTOGRAM_PNG = "histogram.png"
REPORT_FILES = (REPORT_MD, REPORT_JSON, HISTOGRAM_PNG)
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
QUANTILE_NAMES = ("min", "p5", "p25", "median", "p75", "p95", "max")
# measured_fraction buckets: nothing measured, four quarters, the whole image
FRACTION_BUCKETS = ("0 (nothing measured)", "(0, 0.25]", "(0.25, 0.5]", "(0.5, 0.75]", "(0.75, 1)", "1 (whole image)")
MAX_HISTOGRAM_SERIES = 8
DUPLICATE_EXAMPLES = 5


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

    @property
    def slowest_stage(self) -> Optional[tuple[str, float]]:
        return self.stage_seconds[0] if self.stage_seconds else None


def _read_columns(pattern: str, wanted: Sequence[str]) -> pa.Table:
    """``wanted`` columns (those present) of every file matching ``pattern``, as one table."""
    tables = []
    for path in match_inputs(pattern):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            parquet = pq.ParquetFile(handle)
            columns = [name for name in wanted if name in parquet.schema_arrow.names]
            tables.append(parquet.read(columns=columns))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def _summary(label: str, values: np.ndarray) -> ScoreSummary:
    values = values[np.isfinite(values)]
    if not len(values):
        return ScoreSummary(label, 0, None, {name: None for name in QUANTILE_NAMES})
    quantiles = np.quantile(values, QUANTILES)
    return ScoreSummary(label, int(len(values)), float(values.mean()),
                        {name: float(value) for name, value in zip(QUANTILE_NAMES, quantiles)})


def _by(keys: list[Any], values: np.ndarray) -> list[ScoreSummary]:
    """One summary per distinct key, most rows first (ties by label)."""
    rows: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        rows.setdefault(key, []).append(index)
    summaries = [_summary(str(key), values[np.asarray(index)]) for key, index in rows.items()]
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


def read_outputs(output: str, group_column: Optional[str] = None) -> tuple[pa.Table, pa.Table]:
    """The columns the report needs of ``output``'s scores and errors (never the image bytes)."""
    wanted = ["id", "lpips", "measured_fraction", "mask_mode"] + ([group_column] if group_column else [])
    scores = _read_columns(FileSystems.join(output, "scores-*.parquet"), wanted)
    errors = _read_columns(FileSystems.join(output, "errors-*.parquet"), ["id", "error_stage", "error_type"])
    return scores, errors


def build_report(output: str, scores: pa.Table, errors: pa.Table, counters: Optional[dict[str, int]] = None,
                 group_column: Optional[str] = None, stage_msecs: Optional[dict[str, float]] = None,
                 wall_s: Optional[float] = None) -> Report:
    """Summarise :func:`read_outputs`'s tables and the job's counters / stage times (milliseconds)."""
    counters = dict(counters or {})
    notes = []
    lpips = _column(scores, "lpips", np.float64)
    fractions = _column(scores, "measured_fraction", np.float64)
    by_group: list[ScoreSummary] = []
    if group_column and scores.num_rows:
        if group_column in scores.column_names:
            by_group = _by(scores.column(group_column).to_pylist(), lpips)
        else:
            notes.append(f"group column {group_column!r} is not in the scores; no per-group table")
    error_types: dict[tuple[str, str], int] = {}
    if errors.num_rows:
        for stage, kind in zip(errors.column("error_stage").to_pylist(), errors.column("error_type").to_pylist()):
            error_types[(stage, kind)] = error_types.get((stage, kind), 0) + 1
    id_chunks = [table.column("id").combine_chunks() for table in (scores, errors)
                 if table.num_rows and "id" in table.column_names]
    ids = pa.chunked_array(id_chunks) if id_chunks else pa.chunked_array([], type=pa.null())
    stages = sorted(((name, msecs / 1000.0) for name, msecs in (stage_msecs or {}).items()),
                    key=lambda item: (-item[1], item[0]))
    by_mask_mode = [_summary("all", lpips)]
    if scores.num_rows:
        by_mask_mode += _by(scores.column("mask_mode").to_pylist(), lpips)
    repeated = _repeated_ids(ids)
    return Report(
        output=output, counts=_counts(counters, scores.num_rows, errors.num_rows, repeated),
        errors_by_type=sorted(((stage, kind, n) for (stage, kind), n in error_types.items()),
                              key=lambda item: (-item[2], item[0], item[1])),
        by_mask_mode=by_mask_mode, by_group=by_group, group_column=group_column,
        measured_fraction=fraction_buckets(fractions),
        measured_fraction_quantiles=_summary("measured_fraction", fractions).quantiles,
        duplicate_examples=repeated[:DUPLICATE_EXAMPLES], stage_seconds=stages, wall_s=wall_s, counters=counters,
        notes=notes,
    )


def _column(table: pa.Table, name: str, dtype: Any) -> np.ndarray:
    if name not in table.column_names:
        return np.array([], dtype=dtype)
    values = table.column(name)
    if dtype is object:
        return np.array(values.to_pylist(), dtype=object)
    return values.to_numpy().astype(dtype)


def _repeated_ids(ids: pa.ChunkedArray) -> list[tuple[Any, int]]:
    """``(id, rows)`` of every id found on more than one output row, most repeated first."""
    if len(ids) == 0 or pa.types.is_null(ids.type):
        return []
    counted = pc.value_counts(ids.combine_chunks())
    pairs = zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())
    return sorted(((value, n) for value, n in pairs if n > 1), key=lambda item: (-item[1], str(item[0])))


def _counts(counters: dict[str, int], scored: int, errors: int, repeated: list[tuple[Any, int]]) -> dict[str, int]:
    skipped = int(counters.get("rows_skipped", 0))
    return {
        "input_rows": int(counters.get("rows_read", scored + errors + skipped)),
        "skipped": skipped,
        "scored": scored,
        "errors": errors,
        # counted by the job when it has an id column; else (or without counters) read off the outputs
        "duplicate_ids": int(counters.get("duplicate_ids", len(repeated))),
        "duplicate_id_rows": int(counters.get("duplicate_id_rows", sum(n for _, n in repeated))),
        "model_loads": int(counters.get("model_loads", 0)),
        "pixels_scored": int(counters.get("pixels_scored", 0)),
    }


def _number(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4f}"


def _quantile_table(summaries: list[ScoreSummary], heading: str) -> list[str]:
    lines = [f"| {heading} | n | mean | " + " | ".join(QUANTILE_NAMES) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in QUANTILE_NAMES) + " |"]
    for summary in summaries:
        lines.append(f"| {summary.label} | {summary.count} | {_number(summary.mean)} | "
                     + " | ".join(_number(summary.quantiles[name]) for name in QUANTILE_NAMES) + " |")
    return lines


def render_markdown(report: Report) -> str:
    """report.md: counts, errors, score quantiles, measured fraction, stage times, the histogram."""
    counts = report.counts
    lines = ["# lpips-pipe run report", "",
             f"Outputs: `{report.output}` (`scores-*.parquet`, `errors-*.parquet`). LPIPS: lower is better; "
             "0 = the measured region is perceptually identical to the reference.", "",
             "## Counts", "", "| rows | count |", "| --- | ---: |",
             f"| input rows | {counts['input_rows']} |",
             f"| skipped (id already in earlier outputs, `--skip_existing`) | {counts['skipped']} |",
             f"| scored | {counts['scored']} |",
             f"| errors | {counts['errors']} |"]
    lines.append(f"| ids on more than one row (each row kept) | {counts['duplicate_ids']} id(s), "
                 f"{counts['duplicate_id_rows']} rows |")
    lines += [f"| model loads | {counts['model_loads']} |", f"| pixels scored | {counts['pixels_scored']:,} |"]
    if report.wall_s is not None:
        rate = counts["scored"] / report.wall_s if report.wall_s > 0 else 0.0
        lines.append(f"| wall time | {report.wall_s:.1f} s ({rate:.2f} pairs/s) |")
    if report.duplicate_examples:
        examples = ", ".join(f"`{value}` ×{n}" for value, n in report.duplicate_examples)
        lines += ["", f"Duplicated ids (first {len(report.duplicate_examples)}): {examples}."]
    lines += ["", "## Errors by stage and type", ""]
    if report.errors_by_type:
        lines += ["| stage | type | rows |", "| --- | --- | ---: |"]
        lines += [f"| {stage} | {kind} | {n} |" for stage, kind, n in report.errors_by_type]
    else:
        lines.append("No errors.")
    lines += ["", "## LPIPS by mask mode", ""] + _quantile_table(report.by_mask_mode, "mask mode")
    if report.by_group:
        lines += ["", f"## LPIPS by {report.group_column}", ""] + _quantile_table(report.by_group,
                                                                                  report.group_column or "")
    lines += ["", "## Measured fraction (mask pixels / image pixels)", "", "| measured fraction | rows |",
              "| --- | ---: |"]
    lines += [f"| {name} | {n} |" for name, n in report.measured_fraction.items()]
    quantiles = report.measured_fraction_quantiles
    lines += ["", "Quantiles: " + ", ".join(f"{name} {_number(quantiles[name])}" for name in QUANTILE_NAMES) + "."]
    lines += ["", "## Time per stage", "",
              "Processing time Beam measured inside each step, summed over workers (worker start-up and model "
              "loading are not in it).", ""]
    if report.stage_seconds:
        total = sum(seconds for _, seconds in report.stage_seconds) or 1.0
        lines += ["| stage | seconds | share |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% |"
                  for name, seconds in report.stage_seconds]
        name, seconds = report.stage_seconds[0]
        lines += ["", f"Slowest stage: **{name}** ({seconds:.2f} s)."]
    else:
        lines.append("Not reported by this runner (the in-process runner reports it; see the runner's UI elsewhere).")
    lines += [f"- {note}" for note in report.notes]
    lines += ["", "## Histogram", "", f"![LPIPS and measured fraction histograms]({HISTOGRAM_PNG})", ""]
    return "\n".join(lines)


def format_table(report: Report) -> str:
    """The short table printed after a run: LPIPS quantiles per mask mode, and the slowest stage."""
    header = f"  {'mask mode':<10} {'n':>7} {'mean':>8} {'p5':>8} {'median':>8} {'p95':>8} {'max':>8}"
    lines = [header]
    for summary in report.by_mask_mode:
        q = summary.quantiles
        lines.append(f"  {summary.label:<10} {summary.count:>7} {_number(summary.mean):>8} {_number(q['p5']):>8} "
                     f"{_number(q['median']):>8} {_number(q['p95']):>8} {_number(q['max']):>8}")
    if report.slowest_stage:
        name, seconds = report.slowest_stage
        lines.append(f"  slowest stage: {name} ({seconds:.1f} s)")
    return "\n".join(lines)


def render_histogram(scores: pa.Table, group_column: Optional[str] = None) -> bytes:
    """histogram.png: LPIPS stacked per mask mode (or per group, largest first), and measured fraction."""
    from matplotlib.figure import Figure  # Agg canvas by default: no display, no pyplot global state
    from matplotlib.ticker import MaxNLocator

    split_by = group_column if group_column and group_column in scores.column_names else "mask_mode"
    lpips = _column(scores, "lpips", np.float64)
    fractions = _column(scores, "measured_fraction", np.float64)
    keys = _column(scores, split_by, object)
    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(3, 2))
    finite = np.isfinite(lpips)
    if finite.any():
        values = lpips[finite]
        top = float(np.quantile(values, 0.99)) if len(values) > 20 else float(values.max())
        top = top if top > 0 else 1.0
        clipped = int((values > top).sum())
        bins = np.linspace(0.0, top, 41)
        value_keys = keys[finite].tolist()
        sizes = collections.Counter(value_keys)
        shown = sorted(sizes, key=lambda key: (-sizes[key], str(key)))[:MAX_HISTOGRAM_SERIES]
        position = {key: index for index, key in enumerate(shown)}  # the rest share the last code: "other"
        codes = np.fromiter((position.get(key, len(shown)) for key in value_keys), dtype=np.int64,
                            count=len(value_keys))
        labels, series = [], []
        for code, key in enumerate(shown + ["other"]):
            if (codes == code).any():
                series.append(np.minimum(values[codes == code], top))
                labels.append(f"{key} (n={int((codes == code).sum())})")
        left.hist(series, bins=bins, stacked=True, label=labels)
        left.legend(title=split_by.replace("_", " "), fontsize="small")
        note = f"; {clipped} above {top:.3g} in the last bin" if clipped else ""
        left.set_title(f"LPIPS of {len(values)} scored pairs{note}", fontsize="medium")
    else:
        left.text(0.5, 0.5, "no scored pairs", ha="center", va="center", transform=left.transAxes)
        left.set_title("LPIPS", fontsize="medium")
    left.set_xlabel("LPIPS (area-normalised; lower = closer to the reference)")
    left.set_ylabel("pairs")
    fraction_values = fractions[np.isfinite(fractions)]
    right.hist(fraction_values, bins=np.linspace(0.0, 1.0, 21), color="tab:gray")
    right.set_xlim(0.0, 1.0)
    right.set_xlabel("measured fraction (mask pixels / image pixels)")
    right.set_ylabel("pairs")
    right.set_title("Share of each image that was measured", fontsize="medium")
    for axes in (left, right):
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def write_report(output: str, counters: Optional[dict[str, int]] = None, group_column: Optional[str] = None,
                 stage_msecs: Optional[dict[str, float]] = None, wall_s: Optional[float] = None) -> Report:
    """Read ``output``'s outputs once and write report.md, report.json and histogram.png beside them."""
    scores, errors = read_outputs(output, group_column)
    report = build_report(output, scores, errors, counters, group_column, stage_msecs, wall_s)
    _write(FileSystems.join(output, HISTOGRAM_PNG), render_histogram(scores, group_column))
    _write(FileSystems.join(output, REPORT_MD), render_markdown(report).encode("utf-8"))
    _write(FileSystems.join(output, REPORT_JSON), json.dumps(asdict(report), indent=2, default=str).encode("utf-8"))
    return report


def report_paths(output: str) -> list[str]:
    return [FileSystems.join(output, name) for name in REPORT_FILES]


def _earlier_run_facts(output: str) -> dict[str, Any]:
    """Counters, stage times and wall time an earlier report.json in ``output`` recorded (else nothing)."""
    path = FileSystems.join(output, REPORT_JSON)
    if not FileSystems.exists(path):
        return {}
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            earlier = json.loads(handle.read().decode("utf-8"))
    except ValueError as error:
        _LOGGER.warning("ignoring %s (%s): the report will have no counters", path, error)
        return {}
    return {"counters": earlier.get("counters") or {},
            "stage_msecs": {name: seconds * 1000 for name, seconds in earlier.get("stage_seconds") or []},
            "wall_s": earlier.get("wall_s")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lpips-pipe-report DIR``: (re)write DIR/report.md, report.json and histogram.png."""
    parser = argparse.ArgumentParser(prog="lpips-pipe-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="A job's --output directory (any Beam filesystem).")
    parser.add_argument("--group_column", default=None, help="Also tabulate LPIPS per value of this column.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not match_inputs(FileSystems.join(args.output, "scores-*.parquet")):
        print(f"lpips-pipe-report: error: no scores-*.parquet in {args.output}", file=sys.stderr)
        return 2
    report = write_report(args.output, group_column=args.group_column, **_earlier_run_facts(args.output))
    print(format_table(report))
    print(f"  report: {', '.join(report_paths(args.output))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
