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
group, ``null/NaN``. A scores file that cannot be read is left out with a note naming it."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
import threading
from dataclasses import asdict
from typing import Any, Optional, Sequence
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from lpips_pipe.transforms import paths, settings
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.pipeline.report.config import DEFAULT_REPORT_K, ReportConfig
from lpips_pipe.pipeline.report.facts import REPORT_JSON, Report, ReportError, build_report, read_outputs
from lpips_pipe.pipeline.report.markdown import format_table, render_markdown
from lpips_pipe.pipeline.report.histogram import render_histogram

_LOGGER = logging.getLogger("lpips_pipe.report")


PROG = "lpips-pipe-report"


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
    paths.write_bytes(histogram, render_histogram(scores, group_column))
    galleries = _galleries(output, report, report_k, report_threshold, report_seed)
    paths.write_bytes(markdown, render_markdown(report).encode("utf-8"))
    paths.write_bytes(summary, json.dumps(asdict(report), indent=2, default=str).encode("utf-8"))
    try:
        from lpips_pipe.pipeline.calibrate import section as calibration  # noqa: PLC0415
        from lpips_pipe.pipeline.report import page as report_page  # noqa: PLC0415

        page = report_page.render_run_page(report, galleries, report_k)
        section = calibration.saved_report_section(layout.report_dir(output))  # a calibration of these scores
        paths.write_bytes(page_path(output),
                          (calibration.insert_section(page, section) if section else page).encode("utf-8"))
    except Exception as error:  # pylint: disable=broad-except  # the page is extra: the rest is written
        _LOGGER.warning("report: %s not written (%s: %s)", page_path(output), type(error).__name__,
                        one_line(error))
    return report


def _galleries(output: str, report: Report, k: int, threshold: Optional[float], seed: int) -> list[Any]:
    """The page's galleries (:mod:`pipeline.gallery`), their tiles written under ``report/tiles/``; failures
    are notes of ``report`` (and warnings), never exceptions. Stored in ``report.galleries`` for report.json."""
    try:
        from lpips_pipe.pipeline.report import gallery  # noqa: PLC0415  # images, and torch for the maps, only when galleries are on
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
        from lpips_pipe.transforms.model.weights import import_backend  # noqa: PLC0415

        import_backend()  # only loaded ahead: torch, the LPIPS package, the galleries' code
        importlib.import_module("lpips_pipe.pipeline.report.gallery")
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
