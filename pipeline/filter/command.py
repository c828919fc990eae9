"""lpips-pipe-filter: split scored rows (and, optionally, the original input rows) into kept and rejected Parquet.

``python -m pipeline.filter --scores RUN_DIR --output OUT (--threshold X | --tiers tiers.yaml |
--calibration CAL/calibration.json [--calibration_fallback overall]) [--group_column edit]
[--std population|sample] [--source 'data/*.parquet' [--source_id_column id]] [--keep_nothing_measured]
[--min_measured_fraction F] [--allow_mixed] [--overwrite]``

``--max_lpips X`` (or a tier config's ``ceiling``) is an absolute ceiling applied with ``--tiers`` or
``--calibration``: a row above it is rejected, tier ``above_ceiling``, whatever its tier (refused with
``--threshold``).

``--calibration`` (a ``calibration.json`` of :mod:`pipeline.calibrate`) keeps a row when its lpips is at most
its group's threshold, grouped by the calibration's group column (the scores must have it). A group of the
scores without a threshold there is refused, naming it, unless ``--calibration_fallback overall`` (the
overall threshold); scores whose provenance differs from the calibrated scores' are refused unless
``--allow_mixed``; ``filter.json`` records the calibration file and the threshold each group got.

``--scores`` is a job's output directory (its ``scores/*.parquet``, and older flat ``scores-*.parquet``), a
scores folder, one Parquet file or a glob (:func:`transforms.layout.scores_files`). For each scores file ``i``
of ``n`` it writes ``OUT/kept-i-of-n.parquet`` and ``OUT/rejected-i-of-n.parquet`` (both always, empty or
not): every score row lands in exactly one of them, with all its columns plus ``lpips_z`` (float64, its
z-score within its group; null without a finite score) and ``tier`` (string). A row without a finite score
is rejected with tier ``invalid``. Whatever the rule, a row that measured nothing (``measured_fraction`` 0 under a
mask; its ``box_flags`` hold ``nothing_measured``) is rejected with tier ``nothing_measured`` unless
``--keep_nothing_measured``, and with ``--min_measured_fraction F`` a row measuring less than F is rejected with
tier ``too_little_measured``; such rows take no part in the statistics (``lpips_z`` null). ``OUT/filter.json``
records the rule, the per-group statistics, the provenance of the scores and the counts. The rules and the
statistics are :mod:`transforms.filtering`'s.

**Source rows** (``--source``): the job's input Parquet (a file, a glob or a folder of ``*.parquet``, images
included). Each input row is joined by id (``--source_id_column``, default ``id``, against the scores'
``id``) and copied whole, every column as it was but image paths relative to the source file (in the image
columns the job read, from the scores' settings), which are rewritten as absolute paths so the copies still
name the same images (the next stage reads them as they are), to

- ``OUT/kept_source/part-i-of-m.parquet``: rows whose id was kept,
- ``OUT/rejected_source/part-i-of-m.parquet``: rows whose id was rejected,
- ``OUT/unscored_source/part-i-of-m.parquet``: rows whose id has no score (they errored in the job, were
  never scored, or have a null id), so nothing is lost,

one of each per source file ``i`` of ``m``. An id with several score rows goes to kept only if all of them
were kept. The join streams the source batch by batch: only the kept and rejected id sets are held (ids, not
images), so memory does not grow with the images.

A source that is a WebDataset tar shard (``.tar``, ``.tar.gz``, ``.tgz``; :mod:`transforms.webdataset`) is split
into shards, ``OUT/kept_source/part-i-of-m.tar`` (uncompressed, whatever the source's compression) and so
on: its samples' ids are read as the job reads them (the json's id, else the sample key; only the json
members), then every sample's members are copied whole, member by member (headers and bytes; links and
devices as headers only, never followed), into the shard its id goes to, so the kept shard is the input
minus the rejected and unscored samples. Folders named by ``--source`` give their ``*.parquet`` and shards.

**No silent mixing**: if the scores disagree on ``net``, ``lpips_version`` or ``weights_sha256``, or on
``mask_mode`` while the rule is not per group of ``mask_mode`` (``--group_column mask_mode``), the scores
were not made the same way and thresholds or z-scores across them compare unlike things: the command
refuses (naming the field and the values) unless ``--allow_mixed``. Only those columns are read for it.

Plain pyarrow, not Beam: scores files hold no image bytes (a few hundred bytes a row), and z-scores need
every group's statistics before the first row can be placed. Two streaming passes (statistics from the
score, group and provenance columns only, then the rows batch by batch) keep memory at one record batch
plus one small record per group, give one predictable output pair per input file, and read and write any
Beam filesystem (``gs://``, ``s3://``).

Mistakes (no file, a folder without scores, a file that is not Parquet or has no ``lpips``, a list- or
struct-typed group column, an ``--output`` that is a file, a bad tier config, mixed provenance) exit 2
with one line ``lpips-pipe-filter: error: ...`` and write nothing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence
import numpy as np
from apache_beam.io.filesystems import FileSystems
from lpips_pipe.transforms import paths, settings
from lpips_pipe.transforms.rules import filtering
from lpips_pipe.transforms.outputs import finished, layout
from lpips_pipe.transforms.rules import calibration as calibration_rules
from lpips_pipe.transforms.messages import one_line as _one_line
from lpips_pipe.pipeline.filter.schema import FilterError, ID_COLUMN
from lpips_pipe.pipeline.filter.source import SOURCE_OUTPUTS
from lpips_pipe.pipeline.filter.run import FilterOutcome, OUTPUTS, SUMMARY_JSON, load_calibration_rule, run_filter

PROG = "lpips-pipe-filter"


def format_outcome(outcome: FilterOutcome, output: str, group_column: Optional[str]) -> str:
    total = outcome.kept + outcome.rejected
    lines = [f"{PROG}: {total} rows: kept {outcome.kept}, rejected {outcome.rejected}"]
    lines += [f"  tier {name}: {count}" for name, count in sorted(outcome.tiers.items())]
    if group_column:
        lines.append(f"  {'group (' + group_column + ')':<24} {'rows':>7} {'mean':>8} {'std':>8}")
        for key, group in sorted(outcome.groups.items()):
            spread = "—" if group["std"] is None else f"{group['std']:.4f}"
            lines.append(f"  {_one_line(key):<24} {group['rows']:>7} {group['mean']:>8.4f} {spread:>8}")
    outputs = [FileSystems.join(output, layout.FILTER_FILE_GLOB.format(name=name)) for name in OUTPUTS]
    if outcome.source:
        lines.append("  source rows: " + ", ".join(f"{name.replace('_source', '')} {count}"
                                                   for name, count in outcome.source.items()))
        outputs += [FileSystems.join(output, name) + "/" for name in SOURCE_OUTPUTS]
    lines.append(f"  outputs: {', '.join(outputs)}, {FileSystems.join(output, SUMMARY_JSON)}")
    return "\n".join(lines)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    described = argparse.ArgumentParser(
        prog=PROG,
        description="Split lpips-pipe scores into kept-*.parquet and rejected-*.parquet, by a threshold on lpips "
                    "(lower is better) or by per-group z-score tiers; with --source, split the job's input rows "
                    "(images included) the same way into kept_source/, rejected_source/ and unscored_source/.")
    described.add_argument("--scores", required=True,
                           help="A job's --output directory (its scores/*.parquet), a scores folder, a Parquet file "
                                "or a glob, e.g. 'out/scores/*.parquet'.")
    described.add_argument("--output", required=True, help="Directory for kept-*, rejected-* and filter.json.")
    rule = described.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=_finite_float, help="Keep rows with lpips <= THRESHOLD.")
    rule.add_argument("--tiers", metavar="CONFIG", help="Tier config, JSON or YAML (.yaml/.yml).")
    rule.add_argument("--calibration", metavar="CALIBRATION_JSON",
                      help="A calibration.json of lpips-pipe-calibrate: keep rows with lpips <= their group's "
                           "threshold (grouped by the calibration's group column). A group without a threshold is "
                           "refused unless --calibration_fallback overall; scores made otherwise than the "
                           "calibrated ones are refused unless --allow_mixed.")
    described.add_argument("--max_lpips", type=_finite_float, default=None, metavar="X",
                           help="With --tiers or --calibration: an absolute ceiling applied with them; a row with "
                                f"lpips above X is rejected, tier {filtering.ABOVE_CEILING_TIER}, whatever its tier "
                                "(overrides the tier config's ceiling; z-scores are computed without it).")
    described.add_argument("--calibration_fallback", choices=calibration_rules.FALLBACKS, default=None,
                           help="With --calibration: give groups without their own threshold the overall one.")
    described.add_argument("--group_column", default=None,
                           help="z-scores within groups of this column (overrides the config's group_column); "
                                "null and NaN keys form one group each.")
    described.add_argument("--std", choices=filtering.STD_KINDS, default=None,
                           help="Group std: population (ddof=0, default) or sample (ddof=1); overrides the config.")
    described.add_argument("--source", metavar="GLOB_OR_DIR", default=None,
                           help="The job's input Parquet or WebDataset tar shards (file, glob or folder of *.parquet, "
                                "*.tar, *.tar.gz): its rows, all columns and images included, are joined by id and "
                                "written to OUTPUT/kept_source/, OUTPUT/rejected_source/ and, for ids without a score "
                                "(errored in the job), OUTPUT/unscored_source/ (a shard's samples into shards, "
                                "members copied whole). Streams batch by batch; only the ids are held.")
    described.add_argument("--source_id_column", default=ID_COLUMN,
                           help="The id column of the --source rows, matched against the scores' id (default id).")
    described.add_argument("--keep_nothing_measured", action="store_true",
                           help="Let rows that measured nothing (measured_fraction 0 under a mask: boxes covering the "
                                "whole image under unedit_area, outside it under edit_area; box flag "
                                "nothing_measured) through the rule. By default they are rejected, tier "
                                f"{filtering.NOTHING_MEASURED_TIER}, whatever their LPIPS (0.0 there means nothing), "
                                "and take no part in the statistics.")
    described.add_argument("--min_measured_fraction", type=_fraction, default=0.0, metavar="F",
                           help="Also reject rows measuring less than F of the image (measured_fraction < F), tier "
                                f"{filtering.TOO_LITTLE_MEASURED_TIER}; default 0 (only rows that measured nothing).")
    described.add_argument("--allow_mixed", action="store_true",
                           help="Filter scores that disagree on net, lpips_version, weights_sha256 or mask_mode "
                                "together (refused by default).")
    described.add_argument("--overwrite", action="store_true", help="Replace earlier filter outputs in --output.")
    from lpips_pipe.pipeline.report.config import ReportConfig  # noqa: PLC0415  # the report's options, declared once

    settings.add_arguments(described, ReportConfig, only=("report_k",))  # OUTPUT/report/index.html's galleries
    described.add_argument("--no_report", action="store_true", help="Do not write OUTPUT/report/index.html.")
    return described


def write_page(output: str, k: int = 12) -> str:
    """``OUTPUT/report/index.html`` (and ``tiles/``) from ``OUTPUT/filter.json`` and the kept / rejected files:
    the rule, rows per tier, group statistics and galleries of the rows nearest each cut-off (``k`` each, 0 =
    none). Gallery problems are notes on the page; returns the page's path."""
    from lpips_pipe.pipeline.report import gallery  # noqa: PLC0415  # images only when a page is written
    from lpips_pipe.pipeline.report import page as report_page

    with FileSystems.open(FileSystems.join(output, SUMMARY_JSON), compression_type="uncompressed") as handle:
        summary = json.loads(handle.read().decode("utf-8"))
    notes: list[str] = []
    folder = layout.report_dir(output)
    galleries = gallery.build(lambda found: gallery.filter_galleries(output, summary, k, found) if k > 0 else [],
                              folder, notes, settings_files=list(summary.get("scores") or []))
    page = FileSystems.join(folder, layout.REPORT_HTML)
    with FileSystems.create(page) as handle:
        handle.write(report_page.render_filter_page(output, summary, galleries, k, notes).encode("utf-8"))
    return page


def _load_tiers(path: str) -> filtering.TierConfig:
    try:
        if finished.is_folder(path) and (not paths.is_local(path) or os.path.exists(path)):
            raise FilterError(f"--tiers {path} is a folder; give a JSON or YAML file")
        if not FileSystems.exists(path):
            raise FilterError(f"--tiers {path}: no such file")
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            data = handle.read()
    except FilterError:
        raise
    except Exception as error:  # a folder on some filesystem, permissions
        raise FilterError(f"--tiers {path}: cannot read it ({_one_line(error) or type(error).__name__})") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FilterError(f"--tiers {path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    return filtering.load_tier_config(text, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 when the rows were written, 2 on a usage mistake (one line, nothing written)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    paths.configure()  # object stores: credentials and endpoints from the environment
    try:
        tiers = _load_tiers(args.tiers) if args.tiers else None
        calibrated = load_calibration_rule(args.calibration) if args.calibration else None
        if args.source_id_column is not None and not args.source_id_column.strip():
            raise FilterError("--source_id_column must name a column")
        outcome = run_filter(args.scores, args.output, args.threshold, tiers, args.group_column, args.std,
                             args.overwrite, source=args.source, source_id_column=args.source_id_column,
                             allow_mixed=args.allow_mixed, calibration=calibrated,
                             calibration_fallback=args.calibration_fallback, calibration_path=args.calibration,
                             keep_nothing_measured=args.keep_nothing_measured,
                             min_measured_fraction=args.min_measured_fraction, max_lpips=args.max_lpips)
    except (FilterError, finished.ScoresError, filtering.TierConfigError, calibration_rules.CalibrationError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(format_outcome(outcome, args.output, args.group_column or (tiers.group_column if tiers else None)
                         or (calibrated.group_column if calibrated else None)))
    if not args.no_report:
        try:
            print(f"  report: {write_page(args.output, args.report_k)}")
        except Exception as error:  # pylint: disable=broad-except  # the rows are written: a warning, exit 0
            print(f"{PROG}: warning: the rows are written, but the report page could not be "
                  f"({type(error).__name__}: {_one_line(error)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
