"""Cut-offs from evidence: precision / recall of "keep if lpips <= t" against human labels (pure; no Beam, no I/O).

A *label* says whether a pair is good (``keep``: the edit should stay in the dataset) or not (``reject``).
For a threshold ``t`` the rule keeps every row with ``lpips <= t`` (lower is better), and

- **precision** = good rows among the kept rows (the share of the kept set a human would keep),
- **recall** = kept rows among the good rows (the share of the good pairs the rule keeps),
- **F1** = ``2 * precision * recall / (precision + recall)`` = ``2 TP / (kept + good)``.

Thresholds are evaluated exactly, at every distinct score of the labelled rows (:func:`pr_curve`). The
*target-precision* threshold is, among the thresholds whose precision reaches the target, the one with the
highest recall (ties: the smaller threshold, which keeps no more rejected rows at the same recall: the
higher precision); there may be none (:func:`target_index`). The *F1-best* threshold has the highest F1
(ties: the smaller threshold) (:func:`f1_index`). Precision, recall and F1 are
computed from integer counts with one division each, so equal ratios compare equal.

:func:`bootstrap` resamples the labelled rows with replacement (seeded), recomputes both thresholds in every
resample (vectorised: the rows are sorted once; a resample is a sorted array of indices into them) and gives
2.5 / 97.5 percentile intervals, plus the precision and recall the chosen thresholds reach in the resamples.

:func:`drift` compares a new score distribution with the calibration's labelled scores (two-sample
Kolmogorov-Smirnov test, shifts of the median and the 90th percentile). :class:`CalibrationRule` is what the
filter needs of a ``calibration.json``: a threshold per group (:func:`parse_calibration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from lpips_pipe.transforms.rules import filtering

KEEP_VALUES = frozenset({"keep", "1", "1.0", "true"})
REJECT_VALUES = frozenset({"reject", "0", "0.0", "false"})
NULL_GROUP = "null/NaN"  # the group of null and NaN keys (as the report names it)
DEFAULT_TARGET_PRECISION = 0.95
DEFAULT_BOOTSTRAP = 1000
DEFAULT_MIN_LABELS = 20
DEFAULT_ALPHA = 0.01
DEFAULT_MAX_SHIFT = 0.05
CI_PERCENTILES = (2.5, 97.5)
DRIFT_QUANTILES = {"median": 0.5, "p90": 0.9}
FALLBACKS = ("overall",)
_RESAMPLE_CELLS = 2_000_000  # resamples x rows held at once by the bootstrap


class CalibrationError(ValueError):
    """A calibration (``calibration.json``) that cannot be used, or a group it gives no threshold; one line."""


# --------------------------------------------------------------------------- labels and groups
class _Unknown:
    """Marker of a label value that is neither keep nor reject."""


UNKNOWN = _Unknown()


def parse_label(value: Any) -> Any:
    """A label value as ``True`` (keep: a good pair) / ``False`` (reject); ``None`` when missing (null, NaN,
    empty text); :data:`UNKNOWN` for anything else. Text is case-insensitive (``keep``/``reject``,
    ``1``/``0``, ``true``/``false``); booleans and the numbers 1 / 0 are taken as they are."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return {1: True, 0: False}.get(int(value), UNKNOWN)
    if isinstance(value, (float, np.floating)):
        if value != value:
            return None
        return {1.0: True, 0.0: False}.get(float(value), UNKNOWN)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return UNKNOWN
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        if text in KEEP_VALUES:
            return True
        if text in REJECT_VALUES:
            return False
    return UNKNOWN


def group_label(value: Any) -> str:
    """A group key as the text calibration.json and the filter use: ``str(value)``; null and NaN are
    :data:`NULL_GROUP`; bytes are decoded."""
    if value is None or (isinstance(value, (float, np.floating)) and value != value):
        return NULL_GROUP
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


# --------------------------------------------------------------------------- the curve
@dataclass(frozen=True)
class Curve:
    """Precision, recall and F1 of "keep if lpips <= t" at every distinct labelled score ``t`` (ascending)."""

    threshold: np.ndarray
    kept: np.ndarray  # rows kept at t
    true_keep: np.ndarray  # good rows kept at t
    n_good: int

    @property
    def precision(self) -> np.ndarray:
        return self.true_keep / self.kept

    @property
    def recall(self) -> np.ndarray:
        if self.n_good == 0:
            return np.full(len(self.threshold), np.nan)
        return self.true_keep / self.n_good

    @property
    def f1(self) -> np.ndarray:
        return 2.0 * self.true_keep / (self.kept + self.n_good)


def _sorted(scores: Any, good: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    good = np.asarray(good, dtype=bool)
    if scores.shape != good.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-d and of one length, got {scores.shape} and {good.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    order = np.argsort(scores, kind="stable")
    return scores[order], good[order]


def pr_curve(scores: Any, good: Any) -> Curve:
    """The exact curve of labelled rows (``good``: True = keep label) over every distinct score."""
    values, labels = _sorted(scores, good)
    if not len(values):
        empty = np.zeros(0)
        return Curve(empty, empty.astype(np.int64), empty.astype(np.int64), 0)
    last = np.flatnonzero(np.r_[values[1:] != values[:-1], True])  # the last row of each distinct score
    true_keep = np.cumsum(labels, dtype=np.int64)[last]
    return Curve(values[last], last + 1, true_keep, int(labels.sum()))


def target_index(curve: Curve, target: float) -> Optional[int]:
    """Index into ``curve`` of the threshold with precision >= ``target`` and the highest recall (ties: the
    smaller threshold: the same recall with fewer rejected rows kept); ``None`` when no threshold reaches the
    target."""
    eligible = np.flatnonzero(curve.precision >= target)
    if not len(eligible) or curve.n_good == 0:
        return None
    recall = curve.recall[eligible]
    return int(eligible[np.flatnonzero(recall == recall.max())[0]])


def f1_index(curve: Curve) -> Optional[int]:
    """Index of the threshold with the highest F1 (ties: the smaller threshold); ``None`` without a good row."""
    if not len(curve.threshold) or curve.n_good == 0:
        return None
    f1 = curve.f1
    return int(np.flatnonzero(f1 == f1.max())[0])


# --------------------------------------------------------------------------- the two-sample test


def kolmogorov_survival(value: float) -> float:
    """``P(K > value)`` of the Kolmogorov distribution: ``2 * sum_{j>=1} (-1)^(j-1) exp(-2 j^2 value^2)`` (the
    limit law of ``sqrt(n m / (n + m)) * D``); 1 below 0.18, where the series has not converged and the
    probability is 1 to 12 digits."""
    if value < 0.18:
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * value * value)
        total += sign * term
        sign = -sign
        if term < 1e-16:
            break
    return float(min(max(2.0 * total, 0.0), 1.0))


def ks_two_sample(left: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic ``D`` (the largest gap between the two empirical CDFs) and
    its asymptotic p-value (:func:`kolmogorov_survival` of ``sqrt(n m / (n + m)) * D``, the Kolmogorov
    distribution's tail, ``scipy.stats.kstwobign.sf``). Both samples non-empty and finite."""
    left, right = np.sort(np.asarray(left, dtype=np.float64)), np.sort(np.asarray(right, dtype=np.float64))
    values = np.concatenate([left, right])
    gap = np.abs(np.searchsorted(left, values, side="right") / len(left)
                 - np.searchsorted(right, values, side="right") / len(right))
    statistic = float(gap.max())
    scale = math.sqrt(len(left) * len(right) / (len(left) + len(right)))
    return statistic, kolmogorov_survival(scale * statistic)


# --------------------------------------------------------------------------- bootstrap
@dataclass
class Bootstrap:
    """Percentile intervals from ``resamples`` resamples (``None`` where no resample defined the value)."""

    resamples: int
    threshold_ci: Optional[list[float]] = None
    precision_ci: Optional[list[float]] = None  # precision at the chosen target-precision threshold
    recall_ci: Optional[list[float]] = None
    f1_threshold_ci: Optional[list[float]] = None
    f1_ci: Optional[list[float]] = None  # F1 at the chosen F1-best threshold
    without_threshold: int = 0  # resamples in which no threshold reached the target precision
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per resample (NaN: none)
    f1_thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _interval(values: np.ndarray) -> Optional[list[float]]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, CI_PERCENTILES)
    return [float(low), float(high)]


def bootstrap(scores: Any, good: Any, target: float, resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
              threshold: Optional[float] = None, f1_threshold: Optional[float] = None) -> Bootstrap:
    """Resample the labelled rows with replacement ``resamples`` times (``numpy.random.default_rng(seed)``),
    choose both thresholds in each resample exactly as on the whole set, and give their 2.5 / 97.5
    percentiles; also the precision and recall that ``threshold`` (the chosen target-precision threshold) and
    the F1 that ``f1_threshold`` reach in each resample, with their intervals. Same inputs and seed: same
    numbers."""
    values, labels = _sorted(scores, good)
    n = len(values)
    result = Bootstrap(resamples=int(resamples))
    if n == 0 or resamples <= 0:
        return result
    rng = np.random.default_rng(seed)
    chunk = max(1, _RESAMPLE_CELLS // n)
    kept = np.arange(1, n + 1)
    cut = None if threshold is None else int(np.searchsorted(values, threshold, side="right"))
    f1_cut = None if f1_threshold is None else int(np.searchsorted(values, f1_threshold, side="right"))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("t", "f1t", "p", "r", "f1")}
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        index = rng.integers(0, n, size=(rows, n))
        index.sort(axis=1)  # the rows are sorted by score: sorted indices are sorted scores
        score, label = values[index], labels[index]
        true_keep = np.cumsum(label, axis=1, dtype=np.int64)
        n_good = true_keep[:, -1]
        both = (n_good > 0) & (n_good < n)
        last = np.ones((rows, n), dtype=bool)
        last[:, :-1] = score[:, 1:] != score[:, :-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = true_keep / kept
            # recall is non-decreasing in t: the highest recall reaching the target is the last eligible
            # threshold's; the chosen one is the first eligible threshold with that recall (ties: smaller)
            eligible = last & (precision >= target) & both[:, None]
            found = eligible.any(axis=1)
            last_eligible = n - 1 - np.argmax(eligible[:, ::-1], axis=1)
            best_good = true_keep[np.arange(rows), last_eligible]
            where = np.argmax(eligible & (true_keep == best_good[:, None]), axis=1)
            parts["t"].append(np.where(found, score[np.arange(rows), where], np.nan))
            f1 = np.where(last, 2.0 * true_keep / (kept + n_good[:, None]), -1.0)
            best = f1.max(axis=1)
            top = (f1 == best[:, None]) & last
            where_f1 = np.argmax(top, axis=1)
            parts["f1t"].append(np.where(both, score[np.arange(rows), where_f1], np.nan))
            if cut is not None:
                inside = index < cut
                kept_at = inside.sum(axis=1)
                good_at = (inside & label).sum(axis=1)
                parts["p"].append(np.where(both & (kept_at > 0), good_at / kept_at, np.nan))
                parts["r"].append(np.where(both, good_at / n_good, np.nan))
            if f1_cut is not None:
                inside = index < f1_cut
                good_at = (inside & label).sum(axis=1)
                parts["f1"].append(np.where(both, 2.0 * good_at / (inside.sum(axis=1) + n_good), np.nan))
        result.without_threshold += int((both & ~found).sum())
    joined = {name: np.concatenate(chunks) if chunks else np.zeros(0) for name, chunks in parts.items()}
    result.thresholds, result.f1_thresholds = joined["t"], joined["f1t"]
    result.threshold_ci = _interval(joined["t"])
    result.f1_threshold_ci = _interval(joined["f1t"])
    result.precision_ci = _interval(joined["p"])
    result.recall_ci = _interval(joined["r"])
    result.f1_ci = _interval(joined["f1"])
    return result


# --------------------------------------------------------------------------- one group's calibration
def calibrate_group(scores: Any, good: Any, target: float = DEFAULT_TARGET_PRECISION,
                    resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                    min_labels: int = DEFAULT_MIN_LABELS) -> dict[str, Any]:
    """The calibration.json entry of one group (or of all rows): counts, the target-precision threshold
    (``threshold``, ``precision``, ``recall`` and their ``*_ci``), the F1-best one (``f1_threshold``, ``f1``,
    ``f1_precision``, ``f1_recall``, ``f1_threshold_ci``, ``f1_ci``), the curve, the sorted labelled scores
    (for the drift check) and a ``note`` when there is no threshold (too few labels, one class, the target
    never reached)."""
    values, labels = _sorted(scores, good)
    n, n_keep = len(values), int(labels.sum())
    entry: dict[str, Any] = {
        "threshold": None, "precision": None, "recall": None,
        "threshold_ci": None, "precision_ci": None, "recall_ci": None,
        "f1_threshold": None, "f1": None, "f1_precision": None, "f1_recall": None,
        "f1_threshold_ci": None, "f1_ci": None,
        "n_labels": n, "n_keep": n_keep, "n_reject": n - n_keep, "target_precision": float(target),
        "bootstrap": 0, "bootstrap_without_threshold": 0, "note": None,
        "curve": {"threshold": [], "precision": [], "recall": [], "f1": []},
        "labelled_scores": [float(value) for value in values],
    }
    if n_keep and n - n_keep:
        curve = pr_curve(values, labels)
        entry["curve"] = {"threshold": curve.threshold.tolist(), "precision": curve.precision.tolist(),
                          "recall": curve.recall.tolist(), "f1": curve.f1.tolist()}
    if n < min_labels:
        entry["note"] = f"{n} labels, fewer than --min_labels {min_labels}: no threshold"
        return entry
    if not n_keep or not n - n_keep:
        entry["note"] = (f"only one class ({'keep' if n_keep else 'reject'} labels only, {n}): no threshold can "
                         "be chosen")
        return entry
    at = target_index(curve, target)
    best = f1_index(curve)
    assert best is not None
    threshold = None if at is None else float(curve.threshold[at])
    f1_threshold = float(curve.threshold[best])
    if at is not None:
        entry.update(threshold=threshold, precision=float(curve.precision[at]), recall=float(curve.recall[at]))
    else:
        top = int(np.flatnonzero(curve.precision == curve.precision.max())[-1])
        entry["note"] = (f"precision never reaches the target {target:g} (best {curve.precision[top]:.4f} at "
                         f"t={curve.threshold[top]:.6g}): no threshold")
    entry.update(f1_threshold=f1_threshold, f1=float(curve.f1[best]), f1_precision=float(curve.precision[best]),
                 f1_recall=float(curve.recall[best]))
    if resamples > 0:
        boot = bootstrap(values, labels, target, resamples, seed, threshold, f1_threshold)
        entry.update(threshold_ci=boot.threshold_ci, precision_ci=boot.precision_ci, recall_ci=boot.recall_ci,
                     f1_threshold_ci=boot.f1_threshold_ci, f1_ci=boot.f1_ci, bootstrap=boot.resamples,
                     bootstrap_without_threshold=boot.without_threshold)
    return entry


# --------------------------------------------------------------------------- drift
def drift(reference: Any, new: Any, alpha: float = DEFAULT_ALPHA, max_shift: float = DEFAULT_MAX_SHIFT
          ) -> dict[str, Any]:
    """Has the score distribution moved? A two-sample Kolmogorov-Smirnov test of ``new`` against
    ``reference`` (the calibration's labelled scores; non-finite values left out) and the shifts
    ``new - reference`` of the median and the 90th percentile. ``holds`` when the test's p-value >= ``alpha``
    and both shifts are within ``max_shift`` (absolute, LPIPS units); ``reasons`` say why not."""
    reference = np.asarray(reference, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    reference, new = reference[np.isfinite(reference)], new[np.isfinite(new)]
    result: dict[str, Any] = {"n_calibration": int(len(reference)), "n_new": int(len(new)), "ks_statistic": None,
                              "ks_pvalue": None, "holds": None, "reasons": []}
    if not len(reference) or not len(new):
        result["reasons"].append("no scores to compare" if not len(new) else "no calibration scores")
        return result
    result["ks_statistic"], result["ks_pvalue"] = ks_two_sample(reference, new)
    holds = result["ks_pvalue"] >= alpha
    if not holds:
        result["reasons"].append(f"KS p={result['ks_pvalue']:.3g} < alpha {alpha:g}")
    for name, q in DRIFT_QUANTILES.items():
        before, after = float(np.quantile(reference, q)), float(np.quantile(new, q))
        shift = after - before
        result[f"{name}_calibration"], result[f"{name}_new"], result[f"{name}_shift"] = before, after, shift
        if abs(shift) > max_shift:
            holds = False
            result["reasons"].append(f"{name} moved {shift:+.4f} (more than {max_shift:g})")
    result["holds"] = holds
    return result


# --------------------------------------------------------------------------- the filter's rule
@dataclass(frozen=True)
class CalibrationRule:
    """The thresholds of a calibration.json: one per group (``None``: the group has none) and the overall
    one; the group column; the provenance the scores must match (single-valued fields only)."""

    group_column: Optional[str]
    thresholds: Mapping[str, Optional[float]]
    overall: Optional[float]
    provenance: Mapping[str, Any]

    def resolve(self, groups: Iterable[str], fallback: Optional[str] = None) -> dict[str, float]:
        """``{group: threshold}`` for the ``groups`` present in the scores; a group without its own threshold
        takes the overall one when ``fallback == "overall"``, else :class:`CalibrationError` naming it."""
        if fallback is not None and fallback not in FALLBACKS:
            raise CalibrationError(f"the fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
        used: dict[str, float] = {}
        missing: list[str] = []
        for group in sorted(set(groups)):
            own = self.thresholds.get(group) if self.group_column else self.overall
            if own is not None:
                used[group] = own
            elif fallback == "overall" and self.overall is not None:
                used[group] = self.overall
            else:
                missing.append(group)
        if missing:
            names = ", ".join(repr(name) for name in missing[:5]) + (f" and {len(missing) - 5} more"
                                                                     if len(missing) > 5 else "")
            if not self.group_column:
                raise CalibrationError("the calibration has no overall threshold (its target precision was never "
                                       "reached); recalibrate with more labels or a lower --target_precision")
            if fallback == "overall":
                raise CalibrationError(f"group(s) {names} of {self.group_column!r} have no threshold in the "
                                       "calibration, and the overall threshold is null too")
            raise CalibrationError(f"group(s) {names} of {self.group_column!r} have no threshold in the calibration "
                                   "(not calibrated, too few labels, one class, or the target precision not "
                                   "reached); pass --calibration_fallback overall to use the overall threshold")
        return used

    def tiers(self, keys: Optional[Sequence[Any]], values: np.ndarray, used: Mapping[str, float]) -> np.ndarray:
        """``pass`` where ``lpips <= `` the row's group threshold (from ``used``, :meth:`resolve`'s), ``fail``
        above it, ``invalid`` for a missing or non-finite score (the threshold rule's tiers)."""
        values = np.asarray(values, dtype=np.float64)
        if keys is None or not self.group_column:
            limits = np.full(len(values), next(iter(used.values()), np.nan) if used else np.nan)
        else:
            labels = [group_label(key) for key in keys]
            limits = np.fromiter((used.get(label, np.nan) for label in labels), dtype=np.float64, count=len(values))
        finite = np.isfinite(values)
        if (finite & ~np.isfinite(limits)).any():
            raise CalibrationError("a row's group has no threshold (resolve the groups first)")
        tiers = np.where(values <= limits, filtering.PASS_TIER, filtering.FAIL_TIER).astype(object)
        tiers[~finite] = filtering.INVALID_TIER
        return tiers


def _threshold_of(entry: Any, where: str) -> Optional[float]:
    if not isinstance(entry, Mapping):
        raise CalibrationError(f"{where} must be an object, got {type(entry).__name__}")
    value = entry.get("threshold")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise CalibrationError(f"the threshold of {where} must be a finite number or null, got {value!r}")
    return float(value)


def parse_calibration(data: Any, source: str = "<calibration>") -> CalibrationRule:
    """Check a decoded calibration.json and return its :class:`CalibrationRule`; :class:`CalibrationError`
    (naming ``source`` and the key) otherwise."""
    if not isinstance(data, Mapping) or "overall" not in data:
        raise CalibrationError(f"{source}: not a calibration (expected an object with 'overall' and 'groups', as "
                               "lpips-pipe-calibrate writes)")
    try:
        overall = _threshold_of(data["overall"], "'overall'")
        groups = data.get("groups")
        groups = {} if groups is None else groups
        if not isinstance(groups, Mapping):
            raise CalibrationError(f"'groups' must be an object, got {type(groups).__name__}")
        thresholds = {str(name): _threshold_of(entry, f"group {name!r}") for name, entry in groups.items()}
        group_column = data.get("group_column")
        if group_column is not None and (not isinstance(group_column, str) or not group_column):
            raise CalibrationError(f"'group_column' must be a column name or null, got {group_column!r}")
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, Mapping):
            raise CalibrationError(f"'provenance' must be an object, got {type(provenance).__name__}")
    except CalibrationError as error:
        raise CalibrationError(f"{source}: {error}") from error
    expected = {str(name): value for name, value in provenance.items()
                if value is not None and not isinstance(value, (list, dict))}
    return CalibrationRule(group_column or None, thresholds, overall, expected)
