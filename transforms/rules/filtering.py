"""From scores to a filtered dataset: threshold split, per-group z-scores, tiers by cut-offs (pure; no Beam).

Two rules put every scored row in exactly one of *kept* / *rejected*:

- **threshold**: ``lpips <= threshold`` is kept (tier ``pass``), above it is rejected (tier ``fail``);
- **tiers**: rows are grouped by a column (e.g. the edit type), each row's z-score is computed within its
  group, and the first tier whose cut-off admits the z-score names the row's tier (``A``, ``B``, ...);
  rows past the last cut-off get the config's ``rest`` tier. Tiers listed in ``keep`` are kept.

Rows that measured nothing (measured fraction 0 under a mask, or the box flag ``nothing_measured``: their
LPIPS of 0.0 says nothing about the edit) are never kept: they get the tier ``nothing_measured`` unless the
caller keeps them (``keep_nothing_measured``); a ``min_measured_fraction`` refuses rows measuring less with the
tier ``too_little_measured`` (:func:`measured_refusals`). Refused rows take no part in the statistics and get
``z = NaN``, like rows without a finite score.

z-scores (both rules report them) are ``(lpips - group mean) / group std`` in float64. The std is the
**population** std (``ddof=0``: the group is the whole population being filtered, not a sample of it) unless
the config says ``std: sample`` (``ddof=1``). A group whose std is 0 (all its scores equal, or a single row
under the population std) or undefined (a single row under the sample std) gives its rows ``z = 0.0``:
every row sits at its group's mean, so none is an outlier. Rows with a missing or non-finite score take no
part in the statistics, get ``z = NaN`` (null in Parquet) and the tier ``invalid``, and are rejected (a
batch, or a whole group, without any finite score is no error: all its rows are ``invalid``).

Group keys are any hashable values; every NaN key (float or numpy float, e.g. from a float16 column) is
one group, :data:`NAN_KEY`, as ``None`` (null) is another.

Direction: ``lower_is_better`` (LPIPS; the default) admits a row to a tier when ``z <= cut-off``, and the
cut-offs must increase from the best tier down; ``higher_is_better`` admits ``z >= cut-off`` with
decreasing cut-offs. Boundaries are inclusive in both rules.

Statistics are accumulated batch by batch (:func:`accumulate`, Chan et al.'s parallel update of count, mean
and sum of squared deviations), so a caller can stream files of any size through two passes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np

from lpips_pipe.transforms.records.config import NO_MASK

STD_KINDS = ("population", "sample")
DIRECTIONS = ("lower_is_better", "higher_is_better")
PASS_TIER = "pass"
FAIL_TIER = "fail"
INVALID_TIER = "invalid"
NOTHING_MEASURED_TIER = "nothing_measured"  # refused: the mask selected no pixel (measured fraction 0)
TOO_LITTLE_MEASURED_TIER = "too_little_measured"  # refused: measured fraction below min_measured_fraction
ABOVE_CEILING_TIER = "above_ceiling"  # refused: lpips above the absolute ceiling (--max_lpips, a config's ceiling)
RESERVED_TIERS = (INVALID_TIER, NOTHING_MEASURED_TIER, TOO_LITTLE_MEASURED_TIER,
                  ABOVE_CEILING_TIER)  # never a config's tier names
DEFAULT_REST_TIER = "reject"
CONFIG_KEYS = ("tiers", "keep", "rest", "direction", "std", "group_column", "ceiling")


class _NaNKey:
    """The one group key of every NaN group value (NaN != NaN, so NaN keys would each be a group)."""

    _instance: Optional["_NaNKey"] = None

    def __new__(cls) -> "_NaNKey":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NaN"

    __str__ = __repr__

    def __reduce__(self) -> str:
        return "NAN_KEY"


NAN_KEY = _NaNKey()


def group_key(key: Any) -> Hashable:
    """``key`` as a group key: NaN (any float type) -> :data:`NAN_KEY`; other values unchanged."""
    if isinstance(key, (float, np.floating)) and key != key:
        return NAN_KEY
    return key


class TierConfigError(ValueError):
    """A tier config that cannot be used; the message names the key and the problem."""


@dataclass(frozen=True)
class TierConfig:
    """Named tier cut-offs on per-group z-scores.

    ``tiers`` is ``((name, cut-off), ...)`` best first; ``keep`` the tier names that go to the kept output;
    ``rest`` the tier of rows past every cut-off; ``group_column`` may be overridden by the caller.
    ``ceiling``: an absolute LPIPS applied with the tiers (:func:`apply_ceiling`): a row whose lpips is above it
    is rejected, tier ``above_ceiling``, whatever tier its z-score gave it; ``None``: no ceiling.
    """

    tiers: tuple[tuple[str, float], ...]
    keep: frozenset[str]
    rest: str = DEFAULT_REST_TIER
    direction: str = "lower_is_better"
    std: str = "population"
    group_column: Optional[str] = None
    ceiling: Optional[float] = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tiers)


def parse_tier_config(data: Any) -> TierConfig:
    """Check a decoded config (a mapping) and build a :class:`TierConfig`; raises :class:`TierConfigError`.

    Shape (JSON or YAML)::

        {"tiers": {"A": -0.5, "B": 0.5, "C": 1.5},   # best first; cut-offs on z
         "keep": ["A", "B"],                          # optional, default: every named tier
         "rest": "reject",                            # optional: tier past the last cut-off
         "direction": "lower_is_better",              # optional (or higher_is_better)
         "std": "population",                         # optional (or sample)
         "group_column": "edit",                      # optional; --group_column overrides it
         "ceiling": 0.3}                              # optional: reject lpips above it whatever the tier
    """
    if not isinstance(data, Mapping):
        raise TierConfigError(f"a tier config must be a mapping with a 'tiers' key, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(CONFIG_KEYS))
    if unknown:
        raise TierConfigError(f"unknown key(s) {unknown}; allowed: {list(CONFIG_KEYS)}")
    direction = data.get("direction", "lower_is_better")
    if direction not in DIRECTIONS:
        raise TierConfigError(f"'direction' must be one of {list(DIRECTIONS)}, got {direction!r}")
    std = data.get("std", "population")
    if std not in STD_KINDS:
        raise TierConfigError(f"'std' must be one of {list(STD_KINDS)}, got {std!r}")
    raw_tiers = data.get("tiers")
    if not isinstance(raw_tiers, Mapping) or not raw_tiers:
        raise TierConfigError("'tiers' must be a non-empty mapping of tier name to z-score cut-off, "
                              "best tier first, e.g. {\"A\": -0.5, \"B\": 0.5, \"C\": 1.5}")
    tiers = []
    for name, cut in raw_tiers.items():
        if not isinstance(name, str) or not name:
            raise TierConfigError(f"tier names must be non-empty strings, got {name!r}")
        try:
            finite = not isinstance(cut, bool) and isinstance(cut, (int, float)) and math.isfinite(float(cut))
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise TierConfigError(f"tier {name!r}: the cut-off must be a finite number, got {cut!r}")
        tiers.append((name, float(cut)))
    cuts = [cut for _, cut in tiers]
    increasing = direction == "lower_is_better"
    for (prev_name, prev), (name, cut) in zip(tiers, tiers[1:]):
        if (cut <= prev) if increasing else (cut >= prev):
            order = "increase" if increasing else "decrease"
            raise TierConfigError(
                f"tier cut-offs must strictly {order} from the best tier down under {direction}: "
                f"{prev_name}={prev} then {name}={cut} (got {cuts})")
    names = [name for name, _ in tiers]
    rest = data.get("rest", DEFAULT_REST_TIER)
    if not isinstance(rest, str) or not rest:
        raise TierConfigError(f"'rest' must be a non-empty string, got {rest!r}")
    if rest in RESERVED_TIERS:
        raise TierConfigError(f"'rest' cannot be {rest!r}: that tier is for rows without a finite score or that "
                              "measured too little")
    clashes = sorted({rest, *RESERVED_TIERS} & set(names))
    if clashes:
        raise TierConfigError(f"tier name(s) {clashes} clash with the 'rest' tier ({rest!r}) or "
                              f"{', '.join(map(repr, RESERVED_TIERS))}")
    keep = data.get("keep", names)
    if isinstance(keep, str) or not isinstance(keep, Sequence) or not all(isinstance(k, str) for k in keep):
        raise TierConfigError(f"'keep' must be a list of tier names, got {keep!r}")
    unknown_keep = sorted(set(keep) - set(names) - {rest})
    if unknown_keep:
        raise TierConfigError(f"'keep' names unknown tier(s) {unknown_keep}; tiers: {names + [rest]}")
    group_column = data.get("group_column")
    if group_column is not None and (not isinstance(group_column, str) or not group_column):
        raise TierConfigError(f"'group_column' must be a column name, got {group_column!r}")
    ceiling = data.get("ceiling")
    if ceiling is not None:
        try:
            finite = not isinstance(ceiling, bool) and isinstance(ceiling, (int, float)) and math.isfinite(
                float(ceiling))
        except OverflowError:
            finite = False
        if not finite:
            raise TierConfigError(f"'ceiling' must be a finite number (an absolute LPIPS), got {ceiling!r}")
        ceiling = float(ceiling)
    return TierConfig(tiers=tuple(tiers), keep=frozenset(keep), rest=rest, direction=direction, std=std,
                      group_column=group_column, ceiling=ceiling)


def load_tier_config(text: str, source: str = "<config>") -> TierConfig:
    """Parse a JSON or YAML tier config (``.yaml``/``.yml`` sources are read as YAML, anything else as JSON)."""
    is_yaml = source.lower().endswith((".yaml", ".yml"))
    if is_yaml:
        try:
            import yaml
        except ImportError as error:
            raise TierConfigError(f"{source}: reading YAML needs PyYAML ({error}); or write the config as JSON") \
                from error
    try:
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError, RecursionError: name file and reason
        reason = " ".join(str(error).split()) or type(error).__name__  # one line: YAML errors span several
        raise TierConfigError(f"{source}: not valid {'YAML' if is_yaml else 'JSON'}: {reason}") from error
    try:
        return parse_tier_config(data)
    except TierConfigError as error:
        raise TierConfigError(f"{source}: {error}") from error


@dataclass
class GroupStats:
    """Running count, mean, sum of squared deviations (``m2``), smallest and largest of one group's finite
    scores."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def merge(self, other: "GroupStats") -> None:
        """Add ``other``'s values (Chan et al.'s pairwise update; exact up to rounding)."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)

    def std(self, kind: str = "population") -> float:
        """Population (``ddof=0``) or sample (``ddof=1``) std; NaN when undefined (no row; one row, sample);
        exactly 0.0 when every score is the same (rounding in the mean cannot fake a spread)."""
        if kind not in STD_KINDS:
            raise ValueError(f"std kind must be one of {STD_KINDS}, got {kind!r}")
        ddof = 0 if kind == "population" else 1
        if self.count - ddof <= 0:
            return math.nan
        if self.low == self.high:
            return 0.0
        return math.sqrt(max(self.m2, 0.0) / (self.count - ddof))


@dataclass
class GroupedStats:
    """:class:`GroupStats` per group key (any hashable, ``None`` included)."""

    groups: dict[Hashable, GroupStats] = field(default_factory=dict)

    def accumulate(self, keys: Optional[Sequence[Hashable]], values: np.ndarray) -> None:
        """Add one batch: ``values`` (float, any length) with their group ``keys`` (``None`` = one group)."""
        values = np.asarray(values, dtype=np.float64)
        codes, uniques = _codes(keys, len(values))
        finite = np.isfinite(values)
        codes, values = codes[finite], values[finite]
        counts = np.bincount(codes, minlength=len(uniques))
        # float64 even for a batch without any finite score (bincount of nothing is int64)
        sums = np.bincount(codes, weights=values, minlength=len(uniques)).astype(np.float64)
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        m2s = np.bincount(codes, weights=(values - means[codes]) ** 2, minlength=len(uniques)).astype(np.float64)
        lows, highs = np.full(len(uniques), np.inf), np.full(len(uniques), -np.inf)
        np.minimum.at(lows, codes, values)
        np.maximum.at(highs, codes, values)
        for index, key in enumerate(uniques):
            if counts[index]:
                self.groups.setdefault(key, GroupStats()).merge(GroupStats(
                    int(counts[index]), float(means[index]), float(m2s[index]), float(lows[index]),
                    float(highs[index])))

    def z_scores(self, keys: Optional[Sequence[Hashable]], values: np.ndarray, std: str = "population") -> np.ndarray:
        """``(value - group mean) / group std`` per row; 0.0 in a group of zero/undefined std; NaN for
        non-finite values. Every finite value's group must have been accumulated."""
        values = np.asarray(values, dtype=np.float64)
        codes, uniques = _codes(keys, len(values))
        means = np.empty(len(uniques))
        stds = np.empty(len(uniques))
        for index, key in enumerate(uniques):
            stats = self.groups.get(key, GroupStats())
            means[index], stds[index] = stats.mean, stats.std(std)
        spread = np.isfinite(stds) & (stds > 0)
        z = np.zeros(len(values))
        row_spread = spread[codes]
        z[row_spread] = (values[row_spread] - means[codes][row_spread]) / stds[codes][row_spread]
        z[~np.isfinite(values)] = np.nan
        return z


def _codes(keys: Optional[Sequence[Hashable]], length: int) -> tuple[np.ndarray, list[Hashable]]:
    """Integer group codes of ``keys`` (first-seen order) and the distinct keys; no keys = one group."""
    if keys is None:
        return np.zeros(length, dtype=np.int64), [None]
    if len(keys) != length:
        raise ValueError(f"{len(keys)} group keys for {length} values")
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(group_key(key), len(index)) for key in keys), dtype=np.int64,
                        count=length)
    return codes, list(index)


def assign_tiers(z: np.ndarray, config: TierConfig) -> np.ndarray:
    """Tier name per row (object array): the first tier whose cut-off admits ``z``, else ``config.rest``;
    ``invalid`` where ``z`` is NaN."""
    z = np.asarray(z, dtype=np.float64)
    tiers = np.full(len(z), config.rest, dtype=object)
    unassigned = np.isfinite(z)
    tiers[~unassigned] = INVALID_TIER
    for name, cut in config.tiers:
        admitted = unassigned & ((z <= cut) if config.direction == "lower_is_better" else (z >= cut))
        tiers[admitted] = name
        unassigned &= ~admitted
    return tiers


def threshold_tiers(values: np.ndarray, threshold: float) -> np.ndarray:
    """``pass`` where ``value <= threshold``, ``fail`` above it, ``invalid`` for missing/non-finite values."""
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    values = np.asarray(values, dtype=np.float64)
    tiers = np.where(values <= threshold, PASS_TIER, FAIL_TIER).astype(object)
    tiers[~np.isfinite(values)] = INVALID_TIER
    return tiers


def apply_ceiling(values: np.ndarray, tiers: np.ndarray, ceiling: Optional[float]) -> np.ndarray:
    """``tiers`` with :data:`ABOVE_CEILING_TIER` where the row's value is finite and above ``ceiling`` (an
    absolute LPIPS), whatever tier it had; unchanged where ``ceiling`` is ``None``. The ceiling changes no
    statistic: z-scores (and so the other rows' tiers) are those without it."""
    if ceiling is None:
        return tiers
    if not math.isfinite(ceiling):
        raise ValueError(f"ceiling must be a finite number, got {ceiling}")
    values = np.asarray(values, dtype=np.float64)
    tiers = np.array(tiers, dtype=object)
    with np.errstate(invalid="ignore"):
        tiers[np.isfinite(values) & (values > ceiling)] = ABOVE_CEILING_TIER
    return tiers


def kept(tiers: np.ndarray, keep: frozenset[str]) -> np.ndarray:
    """Boolean mask: rows whose tier is in ``keep`` (``invalid``, ``nothing_measured`` and
    ``too_little_measured`` never are)."""
    return np.fromiter((tier in keep and tier not in RESERVED_TIERS for tier in tiers), dtype=bool,
                       count=len(tiers))


def measured_refusals(length: int, fractions: Optional[np.ndarray] = None, mask_modes: Optional[Sequence[Any]] = None,
                      nothing_flags: Optional[np.ndarray] = None, min_measured_fraction: float = 0.0,
                      keep_nothing_measured: bool = False) -> np.ndarray:
    """The tier of each row refused for what it measured, ``None`` where it is not (object array).

    ``nothing_measured``: the row's ``nothing_flags`` is set (its ``box_flags`` hold ``nothing_measured``) or
    its measured fraction is 0 with a mask (a ``mask_modes`` value other than ``none``; scores without
    ``box_flags``), unless ``keep_nothing_measured``. ``too_little_measured``: otherwise, a fraction below
    ``min_measured_fraction`` (a missing one too, when that is above 0). ``None`` arguments: not known.
    """
    if not (isinstance(min_measured_fraction, (int, float)) and 0 <= min_measured_fraction <= 1):
        raise ValueError(f"min_measured_fraction must be between 0 and 1, got {min_measured_fraction!r}")
    refused = np.full(length, None, dtype=object)
    nothing = np.zeros(length, dtype=bool)
    if nothing_flags is not None:
        nothing |= np.asarray(nothing_flags, dtype=bool)
    if fractions is not None:
        fractions = np.asarray(fractions, dtype=np.float64)
        masked = (np.ones(length, dtype=bool) if mask_modes is None
                  else np.fromiter((mode != NO_MASK for mode in mask_modes), dtype=bool, count=length))
        nothing |= (fractions == 0) & masked
        if min_measured_fraction > 0:
            refused[~(fractions >= min_measured_fraction)] = TOO_LITTLE_MEASURED_TIER  # NaN: not measured enough
    if not keep_nothing_measured:
        refused[nothing] = NOTHING_MEASURED_TIER
    return refused
