"""Filter math (transforms/filtering.py): per-group z-scores, tiers by cut-offs, threshold, config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpips_pipe.transforms.rules import filtering
from lpips_pipe.transforms.rules.filtering import GroupedStats, GroupStats, TierConfigError, parse_tier_config

CONFIG = parse_tier_config({"tiers": {"A": -0.5, "B": 0.5, "C": 1.5}, "keep": ["A", "B"]})
scores = st.integers(0, 5000).map(lambda milli: milli / 1000)  # LPIPS-like values, 3 decimals
rows = st.lists(st.tuples(st.sampled_from(["add", "remove", "style", None]), scores), min_size=1, max_size=60)


def _stats(keys, values, batch_rows):
    stats = GroupedStats()
    for start in range(0, len(values), batch_rows):
        stats.accumulate(keys[start:start + batch_rows], values[start:start + batch_rows])
    return stats


@settings(max_examples=80, deadline=None)
@given(rows, st.integers(1, 25), st.sampled_from(filtering.STD_KINDS))
def test_z_scores_equal_numpy_per_group_whatever_the_batching(pairs, batch_rows, std):
    keys = [key for key, _ in pairs]
    values = np.array([value for _, value in pairs])
    z = _stats(keys, values, batch_rows).z_scores(keys, values, std)
    ddof = 0 if std == "population" else 1
    for key in set(keys):
        members = np.array([k == key for k in keys])
        group = values[members]
        if len(group) <= ddof or group.min() == group.max():  # undefined or no spread: z = 0 by definition
            np.testing.assert_array_equal(z[members], 0.0)
        else:
            expected = (group - group.mean()) / np.std(group, ddof=ddof)
            np.testing.assert_allclose(z[members], expected, rtol=1e-7, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(st.lists(scores, min_size=1, max_size=40), st.lists(scores, min_size=1, max_size=40))
def test_merging_two_batches_equals_one_batch(first, second):
    merged = GroupStats()
    for part in (first, second):
        values = np.array(part)
        merged.merge(GroupStats(len(values), float(values.mean()), float(((values - values.mean()) ** 2).sum()),
                                float(values.min()), float(values.max())))
    both = np.array(first + second)
    assert merged.count == len(both)
    assert merged.mean == pytest.approx(both.mean(), rel=1e-9, abs=1e-12)
    assert merged.std("population") == pytest.approx(np.std(both), rel=1e-7, abs=1e-9)
    assert (merged.low, merged.high) == (both.min(), both.max())


def test_population_and_sample_std_are_the_documented_ones():
    stats = GroupedStats()
    stats.accumulate(None, np.array([1.0, 2.0, 3.0, 4.0]))
    group = stats.groups[None]
    assert group.std("population") == pytest.approx(math.sqrt(1.25))  # ddof=0
    assert group.std("sample") == pytest.approx(math.sqrt(5 / 3))  # ddof=1
    z = stats.z_scores(None, np.array([1.0, 4.0]), "population")
    np.testing.assert_allclose(z, [-1.5 / math.sqrt(1.25), 1.5 / math.sqrt(1.25)])


def test_single_row_and_zero_spread_groups_give_z_zero():
    keys = ["alone", "flat", "flat", "flat", "spread", "spread"]
    values = np.array([0.7, 0.2, 0.2, 0.2, 0.1, 0.3])
    stats = _stats(keys, values, 4)
    for std in filtering.STD_KINDS:
        z = stats.z_scores(keys, values, std)
        assert z[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert z[4] < 0 < z[5]
    assert math.isnan(stats.groups["alone"].std("sample"))
    assert stats.groups["alone"].std("population") == 0.0


def test_missing_scores_are_left_out_of_the_statistics_and_get_nan():
    keys = ["g", "g", "g", "g"]
    values = np.array([0.1, np.nan, 0.3, np.inf])
    stats = _stats(keys, values, 2)
    assert stats.groups["g"].count == 2 and stats.groups["g"].mean == pytest.approx(0.2)
    z = stats.z_scores(keys, values)
    assert z[0] == pytest.approx(-1.0) and z[2] == pytest.approx(1.0)
    assert math.isnan(z[1]) and math.isnan(z[3])
    assert filtering.assign_tiers(z, CONFIG).tolist() == ["A", "invalid", "C", "invalid"]


def test_tiers_by_cut_offs_lower_is_better_inclusive():
    z = np.array([-3.0, -0.5, -0.49, 0.0, 0.5, 0.51, 1.5, 1.51, np.nan])
    assert filtering.assign_tiers(z, CONFIG).tolist() == ["A", "A", "B", "B", "B", "C", "C", "reject", "invalid"]
    assert filtering.kept(filtering.assign_tiers(z, CONFIG), CONFIG.keep).tolist() == [
        True, True, True, True, True, False, False, False, False]


def test_tiers_higher_is_better():
    config = parse_tier_config({"tiers": {"top": 1.0, "mid": 0.0}, "direction": "higher_is_better",
                                "rest": "low", "keep": ["top"]})
    z = np.array([2.0, 1.0, 0.5, 0.0, -0.1])
    assert filtering.assign_tiers(z, config).tolist() == ["top", "top", "mid", "mid", "low"]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(-6, 6, allow_nan=False), min_size=1, max_size=50))
def test_every_row_gets_one_tier_and_better_z_never_gets_a_worse_tier(values):
    z = np.array(values)
    tiers = filtering.assign_tiers(z, CONFIG)
    rank = {name: index for index, name in enumerate(CONFIG.names + (CONFIG.rest,))}
    assert all(tier in rank for tier in tiers)
    order = np.argsort(z, kind="stable")
    ranks = [rank[tiers[i]] for i in order]
    assert ranks == sorted(ranks)


def test_threshold_split_is_inclusive_and_rejects_missing_scores():
    values = np.array([0.0, 0.1, 0.10000001, 2.0, np.nan])
    tiers = filtering.threshold_tiers(values, 0.1)
    assert tiers.tolist() == ["pass", "pass", "fail", "fail", "invalid"]
    assert filtering.kept(tiers, frozenset(["pass"])).tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError):
        filtering.threshold_tiers(values, math.inf)


def test_config_defaults_and_both_formats():
    from_json = filtering.load_tier_config('{"tiers": {"A": -1, "B": 0}}', "t.json")
    assert from_json.tiers == (("A", -1.0), ("B", 0.0))
    assert from_json.keep == {"A", "B"} and from_json.rest == "reject"
    assert from_json.std == "population" and from_json.direction == "lower_is_better"
    from_yaml = filtering.load_tier_config("group_column: edit\nstd: sample\ntiers:\n  A: -1\n  B: 0\nkeep: [A]\n",
                                           "tiers.yaml")
    assert (from_yaml.group_column, from_yaml.std, from_yaml.keep) == ("edit", "sample", {"A"})


@pytest.mark.parametrize("config,message", [
    ([1, 2], "must be a mapping"),
    ({}, "'tiers' must be a non-empty mapping"),
    ({"tiers": {"A": 1.0, "B": 0.5}}, "strictly increase"),
    ({"tiers": {"A": 0.5, "B": 1.0}, "direction": "higher_is_better"}, "strictly decrease"),
    ({"tiers": {"A": "low"}}, "tier 'A': the cut-off must be a finite number"),
    ({"tiers": {"A": float("nan")}}, "finite number"),
    ({"tiers": {"A": True}}, "finite number"),
    ({"tiers": {"A": 0.0}, "keep": ["Z"]}, "'keep' names unknown tier(s) ['Z']"),
    ({"tiers": {"A": 0.0}, "keep": "A"}, "'keep' must be a list"),
    ({"tiers": {"A": 0.0}, "std": "biased"}, "'std' must be one of"),
    ({"tiers": {"A": 0.0}, "direction": "up"}, "'direction' must be one of"),
    ({"tiers": {"A": 0.0}, "cutoffs": {}}, "unknown key(s) ['cutoffs']"),
    ({"tiers": {"reject": 0.0}}, "clash"),
    ({"tiers": {"A": 0.0}, "rest": "invalid"}, "'rest' cannot be 'invalid'"),
    ({"tiers": {"A": 0.0}, "group_column": 3}, "'group_column' must be a column name"),
])
def test_bad_configs_are_refused_with_a_clear_message(config, message):
    with pytest.raises(TierConfigError) as error:
        parse_tier_config(config)
    assert message in str(error.value)


def test_unparsable_config_names_the_file():
    with pytest.raises(TierConfigError, match=r"tiers\.json: not valid JSON"):
        filtering.load_tier_config("{tiers: ", "tiers.json")
    with pytest.raises(TierConfigError, match=r"t\.yml: 'tiers' must be"):
        filtering.load_tier_config("tiers: 3\n", "t.yml")


def test_a_batch_without_any_finite_score_is_no_error():
    stats = GroupedStats()
    keys = ["g", "h", "g"]
    values = np.array([np.nan, np.inf, -np.inf])
    stats.accumulate(keys, values)  # bincount of nothing: must not trip the float division
    stats.accumulate(None, np.array([np.nan]))
    assert stats.groups == {}
    z = stats.z_scores(keys, values)
    assert np.isnan(z).all()
    assert filtering.assign_tiers(z, CONFIG).tolist() == ["invalid"] * 3
    stats.accumulate(["g", "g"], np.array([0.1, 0.3]))  # later finite scores still count
    assert stats.groups["g"].count == 2 and stats.groups["g"].mean == pytest.approx(0.2)


def test_nan_keys_form_one_group_of_any_float_type():
    keys = [float("nan"), np.float16("nan"), np.float64("nan"), None, None, "a"]
    values = np.array([1.0, 2.0, 3.0, 5.0, 7.0, 9.0])
    stats = _stats(keys, values, 2)
    assert stats.groups[filtering.NAN_KEY].count == 3
    assert stats.groups[filtering.NAN_KEY].mean == pytest.approx(2.0)
    assert stats.groups[None].count == 2 and len(stats.groups) == 3
    z = stats.z_scores(keys, values)
    np.testing.assert_allclose(z[:3], (np.array([1.0, 2.0, 3.0]) - 2.0) / np.std([1.0, 2.0, 3.0]))
    assert filtering.group_key(float("nan")) is filtering.NAN_KEY and filtering.group_key(1.5) == 1.5
    assert str(filtering.NAN_KEY) == "NaN"


def test_huge_integer_cut_off_is_refused_not_an_overflow():
    with pytest.raises(TierConfigError, match="finite number"):
        parse_tier_config({"tiers": {"A": 10 ** 400}})


def test_yaml_errors_are_one_line():
    with pytest.raises(TierConfigError) as error:
        filtering.load_tier_config("tiers:\n  A: [1, 2\n  B: 3\n", "t.yaml")
    message = str(error.value)
    assert message.startswith("t.yaml: not valid YAML: ") and "\n" not in message
