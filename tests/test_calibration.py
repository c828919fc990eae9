"""transforms.calibration: the curve, the threshold choices, the bootstrap and the drift test, against brute force."""

from __future__ import annotations

import time

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpips_pipe.transforms.rules import calibration as cal
from lpips_pipe.transforms.rules import filtering


def brute_force(scores, good, target):
    """Every distinct score t: precision, recall, F1 of "keep if lpips <= t", counted row by row; the two
    choices by their definitions."""
    scores, good = list(map(float, scores)), list(map(bool, good))
    n_good = sum(good)
    rows = []
    for t in sorted(set(scores)):
        kept = [g for s, g in zip(scores, good) if s <= t]
        tp = sum(kept)
        precision = tp / len(kept)
        recall = tp / n_good if n_good else float("nan")
        f1 = 2 * tp / (len(kept) + n_good)
        rows.append((t, precision, recall, f1))
    eligible = [row for row in rows if row[1] >= target] if n_good else []
    chosen = max(eligible, key=lambda row: (row[2], -row[0]))[0] if eligible else None  # ties: smaller t
    best = max(rows, key=lambda row: (row[3], -row[0]))[0] if n_good else None
    return rows, chosen, best


def _check_against_brute_force(scores, good, target):
    rows, chosen, best = brute_force(scores, good, target)
    curve = cal.pr_curve(scores, good)
    assert curve.threshold.tolist() == [row[0] for row in rows]
    np.testing.assert_allclose(curve.precision, [row[1] for row in rows], rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.recall, [row[2] for row in rows], rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.f1, [row[3] for row in rows], rtol=0, atol=1e-12)
    at = cal.target_index(curve, target)
    assert (None if at is None else curve.threshold[at]) == chosen
    f1_at = cal.f1_index(curve)
    assert (None if f1_at is None else curve.threshold[f1_at]) == best


@pytest.mark.parametrize("seed", range(25))
def test_curve_and_choices_match_brute_force_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    scores = np.round(rng.random(n) * 0.5, int(rng.integers(1, 4)))  # 1-3 decimals: many ties
    good = rng.random(n) < 1.2 - scores * 2 + rng.normal(0, 0.2, n)
    _check_against_brute_force(scores, good, float(rng.choice([0.5, 0.8, 0.9, 0.95, 1.0])))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=1, max_size=40),
       st.sampled_from([0.3, 0.5, 2 / 3, 0.75, 0.9, 0.95, 1.0]))
def test_curve_and_choices_match_brute_force_hypothesis(rows, target):
    scores = [value / 10 for value, _ in rows]
    good = [label for _, label in rows]
    _check_against_brute_force(scores, good, target)


def test_target_ties_take_the_smaller_threshold():
    # t=0.1: P 1, R 1/2; t=0.2: P 1/2, R 1/2 (a reject added); both reach 0.5 with the same recall, the
    # smaller keeps no reject; the thresholds with more recall do not reach it (t=0.5: P 2/5)
    curve = cal.pr_curve([0.1, 0.2, 0.3, 0.4, 0.5], [True, False, False, False, True])
    assert curve.threshold[cal.target_index(curve, 0.5)] == 0.1
    assert curve.threshold[cal.target_index(curve, 1.0)] == 0.1  # only t=0.1 has precision 1
    # an exact precision equal to the target counts as reaching it (19 / 20 == 0.95)
    scores = np.arange(40) / 100
    good = scores < 0.195
    good[5] = False
    curve = cal.pr_curve(scores, good)
    assert curve.threshold[cal.target_index(curve, 0.95)] == pytest.approx(0.19)


def test_f1_ties_take_the_smaller_threshold():
    # F1 = 2 TP / (kept + good): t=0.1 gives 2/3, t=0.4 gives 4/6 = 2/3
    curve = cal.pr_curve([0.1, 0.2, 0.3, 0.4], [True, False, False, True])
    assert curve.f1[0] == curve.f1[3]
    assert curve.threshold[cal.f1_index(curve)] == 0.1


def test_unreachable_target_gives_no_threshold_and_a_note():
    scores = np.linspace(0, 1, 50)
    good = np.arange(50) % 2 == 0  # precision never above ~0.5 after the first row... but the first row is good
    good[0] = False  # now no threshold has precision >= 0.9
    curve = cal.pr_curve(scores, good)
    assert cal.target_index(curve, 0.9) is None
    entry = cal.calibrate_group(scores, good, 0.9, resamples=50)
    assert entry["threshold"] is None and entry["precision"] is None and entry["recall"] is None
    assert "never reaches the target 0.9" in entry["note"]
    assert entry["f1_threshold"] is not None and entry["f1_threshold_ci"] is not None


def test_too_few_labels_and_one_class_give_no_threshold():
    few = cal.calibrate_group([0.1, 0.2, 0.3], [True, False, True], min_labels=20)
    assert few["threshold"] is None and few["f1_threshold"] is None and "fewer than --min_labels 20" in few["note"]
    assert few["n_labels"] == 3 and few["n_keep"] == 2 and few["n_reject"] == 1
    one = cal.calibrate_group(np.linspace(0, 1, 30), [True] * 30)
    assert one["threshold"] is None and "only one class (keep labels only" in one["note"]
    assert one["curve"]["threshold"] == []


def test_bootstrap_is_reproducible_with_a_seed():
    rng = np.random.default_rng(3)
    scores = rng.random(300)
    good = rng.random(300) > scores
    first = cal.bootstrap(scores, good, 0.9, 500, seed=7, threshold=0.3, f1_threshold=0.5)
    again = cal.bootstrap(scores, good, 0.9, 500, seed=7, threshold=0.3, f1_threshold=0.5)
    other = cal.bootstrap(scores, good, 0.9, 500, seed=8, threshold=0.3, f1_threshold=0.5)
    np.testing.assert_array_equal(first.thresholds, again.thresholds)
    assert first.threshold_ci == again.threshold_ci and first.precision_ci == again.precision_ci
    assert not np.array_equal(np.nan_to_num(first.thresholds), np.nan_to_num(other.thresholds))


def test_bootstrap_matches_a_loop_over_the_same_resamples():
    """The vectorised choice in each resample equals pr_curve + target_index / f1_index on that resample."""
    rng = np.random.default_rng(11)
    n, resamples, target = 60, 200, 0.8
    scores = np.sort(np.round(rng.random(n) * 0.4, 2))  # sorted: the bootstrap's own order is the same
    good = rng.random(n) < 1.1 - 2.5 * scores
    boot = cal.bootstrap(scores, good, target, resamples, seed=5)
    index = np.random.default_rng(5).integers(0, n, size=(resamples, n))
    for row, picks in enumerate(index):
        sample_scores, sample_good = scores[picks], good[picks]
        if sample_good.all() or not sample_good.any():
            assert np.isnan(boot.thresholds[row]) and np.isnan(boot.f1_thresholds[row])
            continue
        curve = cal.pr_curve(sample_scores, sample_good)
        at = cal.target_index(curve, target)
        expected = np.nan if at is None else curve.threshold[at]
        np.testing.assert_equal(boot.thresholds[row], expected)
        assert boot.f1_thresholds[row] == curve.threshold[cal.f1_index(curve)]


def test_interval_contains_the_estimate_on_well_separated_data():
    rng = np.random.default_rng(0)
    good_scores, bad_scores = rng.uniform(0.0, 0.2, 150), rng.uniform(0.4, 0.6, 150)
    scores = np.r_[good_scores, bad_scores]
    good = np.r_[np.ones(150, bool), np.zeros(150, bool)]
    entry = cal.calibrate_group(scores, good, 0.95, resamples=1000, seed=0)
    # recall is 1 from the last good score on, with precision 1 there; ties go to the smaller threshold
    assert entry["threshold"] == pytest.approx(good_scores.max())
    assert entry["precision"] == 1.0 and entry["recall"] == 1.0
    assert entry["f1_threshold"] == pytest.approx(good_scores.max()) and entry["f1"] == 1.0
    for name, ci in (("threshold", "threshold_ci"), ("f1_threshold", "f1_threshold_ci"),
                     ("precision", "precision_ci"), ("recall", "recall_ci"), ("f1", "f1_ci")):
        low, high = entry[ci]
        assert low <= entry[name] <= high, name
    assert entry["bootstrap"] == 1000 and entry["bootstrap_without_threshold"] == 0


def test_bootstrap_is_fast():
    rng = np.random.default_rng(1)
    scores = rng.random(400)
    good = rng.random(400) > scores
    cal.bootstrap(scores, good, 0.95, 50)  # warm up
    start = time.perf_counter()
    cal.calibrate_group(scores, good, 0.95, resamples=1000)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("value, expected", [
    ("keep", True), (" KEEP ", True), ("Reject", False), ("1", True), ("0", False), ("TRUE", True),
    ("false", False), (True, True), (False, False), (1, True), (0, False), (1.0, True), (0.0, False),
    (None, None), ("", None), (float("nan"), None), ("maybe", cal.UNKNOWN), (2, cal.UNKNOWN), ("yes", cal.UNKNOWN),
    (np.int64(1), True), (np.bool_(False), False),
])
def test_parse_label(value, expected):
    assert cal.parse_label(value) is expected


def test_group_label():
    assert cal.group_label(None) == cal.group_label(float("nan")) == cal.NULL_GROUP
    assert cal.group_label(3) == "3" and cal.group_label("blur") == "blur" and cal.group_label(b"x") == "x"


def test_drift_same_and_shifted():
    rng = np.random.default_rng(2)
    reference = rng.random(200) * 0.3
    same = cal.drift(reference, reference)
    assert same["holds"] and same["ks_pvalue"] == pytest.approx(1.0) and same["median_shift"] == 0.0
    moved = cal.drift(reference, reference + 0.2)
    assert moved["holds"] is False and moved["median_shift"] == pytest.approx(0.2)
    assert any("median moved" in reason for reason in moved["reasons"])
    small = cal.drift(reference, reference + 0.03, max_shift=0.05)  # shifted a little: quantiles within 0.05
    assert small["p90_shift"] == pytest.approx(0.03)
    assert cal.drift(reference, [])["holds"] is None


def _rule(**thresholds):
    return cal.CalibrationRule("edit", thresholds, 0.3, {})


def test_rule_resolve_and_tiers():
    rule = _rule(blur=0.1, recolor=None)
    assert rule.resolve(["blur"]) == {"blur": 0.1}
    with pytest.raises(cal.CalibrationError, match="'recolor'"):
        rule.resolve(["blur", "recolor"])
    with pytest.raises(cal.CalibrationError, match="'inpaint'.*--calibration_fallback overall"):
        rule.resolve(["inpaint"])
    used = rule.resolve(["blur", "recolor", "inpaint"], "overall")
    assert used == {"blur": 0.1, "recolor": 0.3, "inpaint": 0.3}
    tiers = rule.tiers(["blur", "blur", "inpaint", "recolor"], np.array([0.1, 0.11, 0.3, np.nan]), used)
    assert tiers.tolist() == [filtering.PASS_TIER, filtering.FAIL_TIER, filtering.PASS_TIER, filtering.INVALID_TIER]
    with pytest.raises(cal.CalibrationError, match="overall threshold is null"):
        cal.CalibrationRule("edit", {}, None, {}).resolve(["x"], "overall")


def test_parse_calibration():
    rule = cal.parse_calibration({"overall": {"threshold": 0.2}, "groups": {"a": {"threshold": None}},
                                  "group_column": "edit",
                                  "provenance": {"net": "alex", "max_side": 2048, "mask_mode": ["inner", "outer"],
                                                 "weights_sha256": None}})
    assert rule.overall == 0.2 and rule.thresholds == {"a": None} and rule.group_column == "edit"
    assert rule.provenance == {"net": "alex", "max_side": 2048}  # mixed and unrecorded fields are not checked
    for bad, match in (([], "not a calibration"), ({"overall": {"threshold": "x"}}, "finite number or null"),
                       ({"overall": {}, "groups": []}, "'groups' must be an object"),
                       ({"overall": {}, "group_column": 3}, "'group_column'")):
        with pytest.raises(cal.CalibrationError, match=match):
            cal.parse_calibration(bad, "c.json")


def test_the_two_sample_test_is_the_kolmogorov_smirnov_one():
    """D against a brute-force largest CDF gap, the p-value against scipy's Kolmogorov tail (scipy is here only
    as a scikit-image dependency of the tests)."""
    from scipy.stats import kstwobign

    rng = np.random.default_rng(3)
    for n, m, shift in ((30, 40, 0.0), (300, 200, 0.1), (50, 50, 0.5), (12, 10, 0.0)):
        left, right = rng.normal(0, 1, n), rng.normal(shift, 1, m)
        statistic, pvalue = cal.ks_two_sample(left, right)
        points = np.concatenate([left, right])
        gap = max(abs((left <= x).mean() - (right <= x).mean()) for x in points)
        assert statistic == pytest.approx(gap, abs=1e-12)
        assert pvalue == pytest.approx(kstwobign.sf(math.sqrt(n * m / (n + m)) * statistic), abs=1e-12)
    same = rng.normal(0, 1, 200)
    assert cal.ks_two_sample(same, same) == (0.0, 1.0)
