"""--check: do a calibration's thresholds still hold on new scores (a two-sample test per group)."""

from __future__ import annotations

import json
from typing import Any, Mapping
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lpips_pipe.pipeline.render.text import finite, number
from lpips_pipe.transforms.rules import calibration as cal
from lpips_pipe.transforms.outputs import finished, layout
from lpips_pipe.transforms.messages import one_line
from lpips_pipe.pipeline.calibrate.labels import CalibrateError, PROG, read_input_file
from lpips_pipe.pipeline.calibrate.join import read_scores

# --------------------------------------------------------------------------- the drift check
def group_rows(column: Any) -> dict[str, np.ndarray]:
    """``{group name: row indices}`` of a group column (names by :func:`transforms.calibration.group_label`),
    counted by Arrow: only the distinct values go through Python."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    try:
        uniques = pc.unique(values)
        codes = np.asarray(pc.fill_null(pc.index_in(values, value_set=uniques), -1).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        names = np.asarray([cal.group_label(value) for value in values.to_pylist()], dtype=object)
        return {name: np.flatnonzero(names == name) for name in sorted(set(names.tolist()))}
    by_name: dict[str, list[int]] = {}
    for code, value in enumerate(uniques.to_pylist()):
        by_name.setdefault(cal.group_label(value), []).append(code)
    if (codes < 0).any():  # a null index_in could not place
        by_name.setdefault(cal.NULL_GROUP, []).append(-1)
    return {name: np.flatnonzero(np.isin(codes, found)) for name, found in sorted(by_name.items())}


def load_calibration(path: str) -> tuple[dict, cal.CalibrationRule]:
    """A calibration.json (any Beam filesystem) and its rule; :class:`CalibrateError` when unusable."""
    data = read_input_file(path, "calibration")
    if not data.strip():
        raise CalibrateError(f"calibration {path} is empty")
    try:
        decoded = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CalibrateError(f"calibration {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except ValueError as error:
        raise CalibrateError(f"calibration {path} is not JSON ({one_line(error)})") from error
    try:
        rule = cal.parse_calibration(decoded, path)
    except cal.CalibrationError as error:
        raise CalibrateError(str(error)) from error
    return decoded, rule


def _reference(entry: Any, where: str, path: str) -> np.ndarray:
    values = entry.get("labelled_scores") if isinstance(entry, Mapping) else None
    if not isinstance(values, list) or not all(finite(value) is not None for value in values):
        raise CalibrateError(f"calibration {path}: {where} has no 'labelled_scores' list of numbers (written by "
                             f"{PROG}); recalibrate")
    return np.asarray(values, dtype=np.float64)


def check_drift(calibration_path: str, scores_spec: str, alpha: float = cal.DEFAULT_ALPHA,
                max_shift: float = cal.DEFAULT_MAX_SHIFT, allow_mixed: bool = False) -> tuple[list[str], bool]:
    """Compare the new scores with the calibration's labelled scores, group by group and overall: one line
    each, and whether every compared group holds."""
    data, rule = load_calibration(calibration_path)
    files = finished.resolve_scores(scores_spec)
    lines: list[str] = []
    provenance_holds = True
    try:
        layout.check_provenance(files, rule.provenance or {}, False)
    except layout.ProvenanceError as error:
        if allow_mixed:
            lines.append(f"provenance differs (--allow_mixed: compared anyway): {one_line(error)}")
        else:
            lines.append(f"provenance: DOES NOT HOLD: {one_line(error)}")
            provenance_holds = False
    scores, grouped = read_scores(files, rule.group_column)
    if rule.group_column and not grouped:
        raise CalibrateError(f"the new scores have no group column {rule.group_column!r} (the calibration's "
                             "group column)")
    values = np.asarray(scores.column("lpips").to_numpy(zero_copy_only=False), dtype=np.float64)
    header = f"check against {calibration_path}: KS alpha {alpha:g}, max shift of median and p90 {max_shift:g}"
    lines.insert(0, header)

    verdicts: list[bool] = []

    def line(name: str, entry: Mapping[str, Any], new: np.ndarray) -> None:
        result = cal.drift(_reference(entry, name, calibration_path), new, alpha, max_shift)
        if result["holds"] is not None:
            verdicts.append(bool(result["holds"]))
        threshold = entry.get("threshold")
        cut = f"threshold {number(threshold)}" if finite(threshold) is not None else "no threshold"
        if result["holds"] is None:
            lines.append(f"{name}: not compared ({'; '.join(result['reasons'])}; {cut})")
            return
        facts = (f"KS D={result['ks_statistic']:.3f} p={result['ks_pvalue']:.3g}; median "
                 f"{result['median_shift']:+.4f}, p90 {result['p90_shift']:+.4f}; {result['n_calibration']} "
                 f"labelled vs {result['n_new']} new; {cut}")
        if result["holds"]:
            lines.append(f"{name}: holds ({facts})")
        else:
            lines.append(f"{name}: DOES NOT HOLD: {'; '.join(result['reasons'])} ({facts})")

    line("overall", data["overall"], values)
    if rule.group_column:
        rows_of = group_rows(scores.column("group"))
        groups = data.get("groups") or {}
        for group in sorted(set(rows_of) | set(groups)):
            label = f"group {rule.group_column}={group!r}"
            if group not in groups:
                lines.append(f"{label}: not in the calibration ({len(rows_of[group])} new rows): the filter "
                             "refuses it unless --calibration_fallback overall")
                continue
            if group not in rows_of:
                lines.append(f"{label}: not in the new scores")
                continue
            line(label, groups[group], values[rows_of[group]])
    failed = verdicts.count(False)
    lines.append(f"{len(verdicts) - failed} of {len(verdicts)} compared hold" + (
        f", {failed} do not" if failed else ""))
    return lines, provenance_holds and not failed
