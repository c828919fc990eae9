"""lpips-pipe-calibrate: turn a few hundred human keep / reject labels into LPIPS cut-offs, and check for drift.

``lpips-pipe-calibrate --scores OUT --labels FILE --output CAL/ [--group_column edit]`` (also
``python -m pipeline.calibrate``) joins the labels to the scores by id and, for each group and overall,
computes precision, recall and F1 of "keep if lpips <= t" at every distinct labelled score, chooses the
threshold that reaches ``--target_precision`` (default 0.95) with the best recall and the F1-best one, and
gives bootstrap intervals (``--bootstrap`` resamples, ``--seed``). It writes:

- ``CAL/calibration.json``: ``{"overall": {...}, "groups": {"<group>": {...}}, ...}`` (the entries are
  :func:`transforms.calibration.calibrate_group`'s), the scores' provenance, the group column, the counts
  (labels without a score, scores without a label, ...) and the warnings;
- ``CAL/calibration.md``: a table per group and overall, links to the curves;
- ``CAL/pr-curve-<group>.png`` (and ``pr-curve-overall.png``): precision, recall and F1 against the
  threshold, the chosen points marked (drawn with Pillow);
- when ``--scores`` is a run directory with a report page (``OUT/report/index.html``), its calibration
  section (between two HTML comments) shows every calibration given to the run, each named by its
  ``--output`` folder, from the curves and copy of ``calibration.json`` each left in
  ``OUT/report/calibrations/<name>/`` (unless ``--no_report``). A group without a threshold gets no chart.

An ``--output`` already holding a calibration is refused (exit 2) unless ``--overwrite``. Labelled rows that
measured nothing (box flag ``nothing_measured``, or measured fraction 0 under a mask) are left out of what it
learns from, with a counted warning: the filter never keeps them.

``lpips-pipe-calibrate --check CAL/calibration.json --scores NEW_OUT`` compares each group's new scores with
the calibration's labelled scores (two-sample Kolmogorov-Smirnov test, shifts of the median and p90): one line
per group, exit 0 when every group holds, 3 when one does not.

Labels: CSV (``.csv``), Parquet (``.parquet``, ``.pq``) or JSON Lines (``.jsonl``, ``.ndjson``), on any Beam
filesystem; columns ``--id_column`` (default ``id``) and ``--label_column`` (default ``label``); values
keep / reject, 1 / 0 or true / false, case-insensitive (Parquet booleans and integers too). Ids are compared
as text when the labels' and the scores' id types differ (a CSV's ids are always read as text).

Mistakes (no file, an unknown extension, an empty or non-UTF-8 file, missing columns, unknown label values,
conflicting labels of one id, no label matching a score, nothing left to calibrate, mixed provenance) exit 2
with one line ``lpips-pipe-calibrate: error: ...``; softer problems (labels without a score, empty labels,
repeated labels, groups with too few labels or one class) are counted warnings, one line each on stderr and
in ``calibration.json``'s ``warnings``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence
import numpy as np
from apache_beam.io.filesystems import FileSystems
from lpips_pipe.pipeline.render.text import number
from lpips_pipe.transforms.rules import calibration as cal
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import finished, layout
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.pipeline.calibrate.labels import CalibrateError, PROG, add_warning, clean_labels, read_labels
from lpips_pipe.pipeline.calibrate.join import join, provenance_record, read_scores
from lpips_pipe.pipeline.calibrate.curves import curve_names, curve_title, render_curve
from lpips_pipe.pipeline.calibrate.section import (calibration_key, calibration_name, entry_rows, insert_section,
                                                   render_markdown, saved_report_section)
from lpips_pipe.pipeline.calibrate.drift import check_drift

EXIT_OK, EXIT_FAILED, EXIT_MISTAKE, EXIT_DRIFT = 0, 1, 2, 3


def calibrate(files: Sequence[str], labels_path: str, id_column: str = "id", label_column: str = "label",
              group_column: Optional[str] = None, target_precision: float = cal.DEFAULT_TARGET_PRECISION,
              resamples: int = cal.DEFAULT_BOOTSTRAP, seed: int = 0, min_labels: int = cal.DEFAULT_MIN_LABELS,
              allow_mixed: bool = False, drop_conflicts: bool = False) -> dict[str, Any]:
    """The calibration (what calibration.json holds) of the scores ``files`` against the labels file."""
    warnings: list[str] = []
    counts: dict[str, int] = {}
    try:
        distinct = layout.check_provenance(files, None, allow_mixed,
                                           mixed_mask_modes=group_column == layout.MASK_MODE_FIELD)
    except layout.ProvenanceError as error:
        raise CalibrateError(str(error)) from error
    mixed = [name for name, values in distinct.items() if len(values) > 1]
    if mixed and allow_mixed:
        add_warning(warnings, f"the scores mix {', '.join(mixed)} values (--allow_mixed): the calibration records them "
                        "all, and the filter will not check those fields")
    raw, label_rows = read_labels(labels_path, id_column, label_column, group_column)
    counts["label_rows"] = label_rows
    labels = clean_labels(raw, labels_path, label_column, drop_conflicts, warnings, counts)
    counts["labels"] = labels.num_rows
    scores, scores_grouped = read_scores(files, group_column)
    group_source = None
    if group_column:
        if scores_grouped:
            group_source = "scores"
        elif "group" in labels.column_names:
            group_source = "labels"
            add_warning(warnings, f"group column {group_column!r} is taken from the labels: the scores lack it, so "
                            "pipeline.filter --calibration cannot apply these per-group thresholds to them")
        else:
            raise CalibrateError(f"group column {group_column!r} (--group_column) is in neither the labels nor the "
                                 "scores")
    values, good, groups = join(labels, scores, group_source, warnings, counts)
    overall = cal.calibrate_group(values, good, target_precision, resamples, seed, min_labels)
    if overall["f1_threshold"] is None:
        raise CalibrateError(f"nothing to calibrate: {overall['note']} among the {len(values)} labelled rows with a "
                             "score")
    if overall["threshold"] is None:
        add_warning(warnings, f"overall: {overall['note']}")
    entries: dict[str, dict[str, Any]] = {}
    if groups is not None:
        names = np.asarray(groups, dtype=object)
        for group in sorted(set(groups)):
            rows = names == group
            entry = cal.calibrate_group(values[rows], good[rows], target_precision, resamples, seed, min_labels)
            if entry["note"]:
                add_warning(warnings, f"group {group!r}: {entry['note']}")
            entries[group] = entry
    files_of = curve_names(entries)
    overall["curve_png"] = files_of[None]  # overall always has a curve (else nothing to calibrate)
    for group, entry in entries.items():  # a group without a threshold gets no (empty) chart: its note says why
        entry["curve_png"] = files_of[group] if entry["threshold"] is not None else None
    counts["groups_without_threshold"] = sum(1 for entry in entries.values() if entry["threshold"] is None)
    return {
        "overall": overall, "groups": entries,
        "group_column": group_column, "group_source": group_source,
        "rule": "keep if lpips <= threshold (lower is better)",
        "target_precision": target_precision, "bootstrap": resamples, "seed": seed, "min_labels": min_labels,
        "provenance": provenance_record(distinct), "allow_mixed": allow_mixed,
        "scores": list(files), "labels": labels_path, "id_column": id_column, "label_column": label_column,
        "labels_without_score": counts["labels_without_score"],
        "scores_without_label": counts["scores_without_label"],
        "counts": counts, "warnings": warnings, "created_by": PROG,
    }


# --------------------------------------------------------------------------- writing
def _folder_without_curves(folder: str) -> None:
    """``folder`` made if local, and the PR-curve pictures an earlier calibration left there removed."""
    if paths.is_local(folder):
        os.makedirs(folder, exist_ok=True)
    stale = paths.match(FileSystems.join(paths.escape_glob(folder), f"{layout.CALIBRATION_CURVE_PREFIX}-*"
                                                                      f"{layout.CALIBRATION_CURVE_SUFFIX}"))
    if stale:
        paths.delete(stale)


def write_outputs(calibration: dict, output: str) -> tuple[list[str], dict[str, bytes]]:
    """calibration.json, calibration.md and the curves into ``output``; earlier curves there are replaced.
    Returns the paths written and what was written, by file name."""
    _folder_without_curves(output)
    written, contents = [], {}
    group_column = calibration.get("group_column")
    for name, entry in [(None, calibration["overall"])] + list(calibration["groups"].items()):
        if not entry.get("curve_png"):
            continue
        path = FileSystems.join(output, entry["curve_png"])
        contents[entry["curve_png"]] = data = render_curve(entry, curve_title(group_column, name))
        paths.write_bytes(path, data)
        written.append(path)
    for name, data in ((layout.CALIBRATION_MD, render_markdown(calibration).encode("utf-8")),
                       (layout.CALIBRATION_JSON, json.dumps(calibration, indent=1).encode("utf-8"))):
        path = FileSystems.join(output, name)
        contents[name] = data
        paths.write_bytes(path, data)
        written.append(path)
    return written, contents


def existing_outputs(output: str) -> list[str]:
    """The calibration files already in ``output`` (calibration.json, calibration.md, pr-curve-*.png)."""
    found = [FileSystems.join(output, name) for name in (layout.CALIBRATION_JSON, layout.CALIBRATION_MD)
             if FileSystems.exists(FileSystems.join(output, name))]
    return found + paths.match(FileSystems.join(paths.escape_glob(output), f"{layout.CALIBRATION_CURVE_PREFIX}-*"
                                                                           f"{layout.CALIBRATION_CURVE_SUFFIX}"))


def run_report_page(scores_spec: str) -> Optional[str]:
    """The report folder (``OUT/report``) of the run directory ``scores_spec`` names, if it is a run
    directory and its page (``OUT/report/index.html``) exists."""
    if paths.has_glob(scores_spec) or scores_spec.endswith(layout.PARQUET_SUFFIX):
        return None
    try:
        if not layout.kind_files(scores_spec, layout.SCORES):
            return None
        folder = layout.report_dir(scores_spec)
        return folder if FileSystems.exists(FileSystems.join(folder, layout.REPORT_HTML)) else None
    except Exception:  # pylint: disable=broad-except  # no page to update
        return None


def update_report_page(folder: str, calibration: dict, contents: Mapping[str, bytes],
                       output: Optional[str] = None) -> str:
    """Put the calibration into the run's report page ``folder/index.html``: its curves and a copy of
    calibration.json named after its ``output`` folder go to ``folder/calibrations/<name>/``
    (:func:`~pipeline.calibrate.section.calibration_key`; a calibration written again into the same ``output``
    replaces its own copy), and the page's calibration section is made again from every copy there, so the
    page shows each calibration it was given, named (``contents``: what :func:`write_outputs` wrote, by file
    name); returns the page's path."""
    page = FileSystems.join(folder, layout.REPORT_HTML)
    target = FileSystems.join(folder, layout.REPORT_CALIBRATIONS_DIR, calibration_key(output or "calibration"))
    _folder_without_curves(target)
    for entry in [calibration["overall"], *calibration["groups"].values()]:
        if entry.get("curve_png"):
            paths.write_bytes(FileSystems.join(target, entry["curve_png"]), contents[entry["curve_png"]])
    copy = {**calibration, "name": calibration_name(output or "calibration"), "output": output}
    paths.write_bytes(FileSystems.join(target, layout.REPORT_CALIBRATION_JSON),
                      json.dumps(copy, indent=1).encode("utf-8"))
    text = paths.read_bytes(page).decode("utf-8", errors="replace")
    paths.write_bytes(page, insert_section(text, saved_report_section(folder)).encode("utf-8"))
    return page


# --------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (no usage dump)
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_MISTAKE)


def _number(low: float, high: float, low_open: bool = False, what: str = "number"):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}")
        return value
    return parse


def _whole(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    described = _Parser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    described.add_argument("--scores", required=True,
                           help="A job's --output directory, a scores folder, a Parquet file or a glob (any Beam "
                                "filesystem).")
    described.add_argument("--labels", default=None,
                           help="Labels: CSV (.csv), Parquet (.parquet, .pq) or JSON Lines (.jsonl, .ndjson) with an "
                                "id and a keep/reject (1/0, true/false) label per row.")
    described.add_argument("--output", default=None, help="Directory for calibration.json, calibration.md and the "
                                                          "pr-curve-*.png.")
    described.add_argument("--check", metavar="CALIBRATION_JSON", default=None,
                           help="Drift check: compare --scores with this calibration's labelled scores, per group; "
                                "exit 0 when the thresholds still hold, 3 when one does not.")
    described.add_argument("--id_column", default="id", help="The labels' id column (default id), matched against "
                                                              "the scores' id (as text when the types differ).")
    described.add_argument("--label_column", default="label", help="The labels' label column (default label).")
    described.add_argument("--group_column", default=None,
                           help="Calibrate per value of this column (from the scores, else from the labels), "
                                "e.g. edit.")
    described.add_argument("--target_precision", type=_number(0.0, 1.0, low_open=True), default=0.95,
                           help="The share of kept rows that must be good (default 0.95).")
    described.add_argument("--bootstrap", type=_whole(0), default=cal.DEFAULT_BOOTSTRAP,
                           help="Bootstrap resamples for the intervals (default 1000; 0 = no intervals).")
    described.add_argument("--seed", type=_whole(0), default=0, help="Seed of the bootstrap (default 0).")
    described.add_argument("--min_labels", type=_whole(1), default=cal.DEFAULT_MIN_LABELS,
                           help="Fewer labels than this in a group: no threshold for it (default 20).")
    described.add_argument("--drop_conflicts", action="store_true",
                           help="Leave out ids labelled both keep and reject (a counted warning) instead of refusing.")
    described.add_argument("--allow_mixed", action="store_true",
                           help="Calibrate scores that disagree on net, lpips_version, weights_sha256, mask_mode or "
                                "max_side (refused by default); with --check, compare despite a provenance change.")
    described.add_argument("--overwrite", action="store_true",
                           help="Replace an earlier calibration in --output (refused by default).")
    described.add_argument("--no_report", action="store_true",
                           help="Leave the run's report page (OUT/report/index.html) alone.")
    described.add_argument("--alpha", type=_number(0.0, 1.0), default=cal.DEFAULT_ALPHA,
                           help="--check: a group holds while the KS test's p-value is >= alpha (default 0.01).")
    described.add_argument("--max_shift", type=_number(0.0, math.inf), default=cal.DEFAULT_MAX_SHIFT,
                           help="--check: the largest shift of a group's median or p90, absolute LPIPS (default 0.05).")
    return described


def _nonempty(value: Optional[str], option: str) -> None:
    if value is not None and not value.strip():
        raise CalibrateError(f"{option} must name a column")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0: written (or, with --check, every group holds); 2: a mistake (one line); 3: --check found drift;
    1: an unexpected failure (one line)."""
    args = parser().parse_args(argv)
    paths.configure()  # object stores: credentials and endpoints from the environment
    try:
        for value, option in ((args.id_column, "--id_column"), (args.label_column, "--label_column"),
                              (args.group_column, "--group_column")):
            _nonempty(value, option)
        if args.check:
            if args.labels or args.output:
                raise CalibrateError("--check takes --scores (and --alpha, --max_shift), not --labels or --output")
            lines, holds = check_drift(args.check, args.scores, args.alpha, args.max_shift, args.allow_mixed)
            print(f"{PROG}: " + lines[0])
            for text in lines[1:]:
                print(f"  {text}")
            verdict = "the thresholds still hold" if holds else "drift: a threshold no longer holds; recalibrate"
            print(f"{PROG}: {verdict}")
            return EXIT_OK if holds else EXIT_DRIFT
        if not args.labels or not args.output:
            raise CalibrateError("give --labels FILE and --output DIR (or --check CALIBRATION_JSON)")
        finished.check_output_folder(args.output)
        existing = existing_outputs(args.output)
        if existing and not args.overwrite:
            raise CalibrateError(f"--output {args.output} already holds a calibration (e.g. {existing[0]}); pass "
                                 "--overwrite to replace it")
        files = finished.resolve_scores(args.scores)
        result = calibrate(files, args.labels, args.id_column, args.label_column, args.group_column,
                           args.target_precision, args.bootstrap, args.seed, args.min_labels, args.allow_mixed,
                           args.drop_conflicts)
        try:
            written, contents = write_outputs(result, args.output)
        except Exception as error:  # a read-only folder, a full disk
            raise CalibrateError(f"cannot write into --output {args.output}: "
                                 f"{one_line(error) or type(error).__name__}") from error
    except (CalibrateError, finished.ScoresError) as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_MISTAKE
    except Exception as error:  # pylint: disable=broad-except  # never a traceback
        print(f"{PROG}: error: unexpected {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    for text in result["warnings"]:
        print(f"{PROG}: warning: {text}", file=sys.stderr)
    print(format_summary(result))
    print(f"  outputs: {', '.join(written[-2:])} and {len(written) - 2} curve(s)")
    if not args.no_report:
        folder = run_report_page(args.scores)
        if folder:
            page = FileSystems.join(folder, layout.REPORT_HTML)
            try:
                update_report_page(folder, result, contents, args.output)
                print(f"  report: calibration {calibration_name(args.output)!r} shown in {page}")
            except Exception as error:  # pylint: disable=broad-except  # the calibration is written
                print(f"{PROG}: warning: the calibration is written, but {page} could not be updated "
                      f"({type(error).__name__}: {one_line(error)})", file=sys.stderr)
    return EXIT_OK


def format_summary(calibration: Mapping[str, Any]) -> str:
    counts = calibration.get("counts") or {}
    lines = [f"{PROG}: {counts.get('labels_used')} labelled rows with a score ({counts.get('labels_without_score')} "
             f"labels without a score, {counts.get('scores_without_label')} scores without a label); target precision "
             f"{calibration.get('target_precision')}"]
    lines.append(f"  {'group':<24} {'labels':>6} {'keep':>5} {'threshold':>9} {'precision':>9} {'recall':>7} "
                 f"{'F1-best t':>9}")
    for name, entry in entry_rows(calibration):
        lines.append(f"  {one_line(name, 24):<24} {entry.get('n_labels'):>6} {entry.get('n_keep'):>5} "
                     f"{number(entry.get('threshold')):>9} {number(entry.get('precision')):>9} "
                     f"{number(entry.get('recall')):>7} {number(entry.get('f1_threshold')):>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
