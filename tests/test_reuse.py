"""Reference reuse: rows sharing a reference decode it once and run its backbone once.

Claims checked here (alex, CPU):
- with reuse on, a pair's score is the same bits whether its reference came from the cache or not, and
  whatever the batch, the bundle or the cache bound (every image goes alone through the backbone);
- reuse on vs off (the fused reference+edited forward) agree within 1e-6 (asserted), and bit for bit on
  this CPU (asserted too: both run every image in a backbone call of 2 images);
- both caches stay within their byte bound;
- ``group_by_reference`` scores every row exactly once, with the same bits as without it.
"""

from __future__ import annotations

import json
import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from lpips_pipe.pipeline.options import LpipsPipeOptions, parse_options
from tests.data_helpers import demo_table
from lpips_pipe.transforms.cache import BoundedCache
from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair
from lpips_pipe.transforms.beam.config import DEFAULT_REFERENCE_CACHE_MB
from lpips_pipe.transforms.beam.scoring import reference_cache_bytes, reference_group_key
from lpips_pipe.transforms.beam.stage import ScoreLPIPS


# --------------------------------------------------------------------------- the cache budget (the cache itself: test_cache.py)


def test_reference_cache_mb_split():
    features, decoded = reference_cache_bytes(DEFAULT_REFERENCE_CACHE_MB)
    assert features + decoded == DEFAULT_REFERENCE_CACHE_MB * 2 ** 20 and decoded == features // 7
    assert reference_cache_bytes(0) == (0, 0)
    with pytest.raises(ValueError):
        reference_cache_bytes(-1)


# --------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """8 photos x 4 edits at 64x64 (4 candidates per reference, adjacent), plus one broken row."""
    table = demo_table(size=64, with_bad_rows=True)
    return table.to_pylist()


def test_decode_cache_gives_the_same_pixels_and_decodes_each_reference_once(rows):
    good = rows[:32]
    cache = BoundedCache(1 << 20)
    plain = [prepare_pair(row["id"], row, RecordConfig()) for row in good]
    reused = [prepare_pair(row["id"], row, RecordConfig(), reference_cache=cache) for row in good]
    for a, b in zip(plain, reused):
        assert np.array_equal(a.reference, b.reference) and np.array_equal(a.filled, b.filled)
        assert (a.mask_pixels, a.mask_mode, a.reference_key) == (b.mask_pixels, b.mask_mode, None)
        assert b.reference_key is not None and not b.reference.flags.writeable
    assert (cache.misses, cache.hits) == (8, 24)
    assert len({pair.reference_key for pair in reused}) == 8
    # another max_side is another key: the pixels differ
    other = prepare_pair("x", good[0], RecordConfig(max_side=32), reference_cache=cache)
    assert other.reference_key != reused[0].reference_key and other.reference.shape == (32, 32, 3)


def test_decode_cache_bound_is_respected(rows):
    one = prepare_pair("x", rows[0], RecordConfig()).reference.nbytes
    cache = BoundedCache(2 * one + 1)
    for row in rows[:32]:
        prepare_pair(row["id"], row, RecordConfig(), reference_cache=cache)
        assert cache.bytes_used <= cache.max_bytes and len(cache) <= 2


# --------------------------------------------------------------------------- the model


def _stack(pairs, name):
    return np.stack([getattr(pair, name) for pair in pairs])


def test_reused_features_give_the_same_bits_hit_or_miss_and_in_any_batch(alex_scorer, rows):
    cache = BoundedCache(1 << 20)
    pairs = [prepare_pair(row["id"], row, RecordConfig(), reference_cache=cache) for row in rows[:12]]
    keys = [pair.reference_key for pair in pairs]
    alex_scorer.reference_cache = None  # a fresh feature cache for this test
    # one pair per call: the first of each reference misses, the other three hit
    single = np.concatenate([alex_scorer.raw_scores_reused(p.reference[None], p.filled[None], [p.reference_key],
                                                           64 << 20) for p in pairs])
    features = alex_scorer.reference_cache
    assert features is not None and features.misses == 3 and features.hits == 9
    # all at once (the repeated references computed once inside the batch), no cache, no keys
    batch = alex_scorer.raw_scores_reused(_stack(pairs, "reference"), _stack(pairs, "filled"), keys, 64 << 20)
    uncached = alex_scorer.raw_scores_reused(_stack(pairs, "reference"), _stack(pairs, "filled"),
                                             [None] * len(pairs), 0)
    odd = np.concatenate([alex_scorer.raw_scores_reused(_stack(pairs[i:i + 5], "reference"),
                                                        _stack(pairs[i:i + 5], "filled"), keys[i:i + 5], 64 << 20)
                          for i in range(0, 12, 5)])
    for other in (batch, uncached, odd):
        assert single.tobytes() == other.tobytes()
    fused = np.concatenate([alex_scorer.raw_scores(p.reference[None], p.filled[None]) for p in pairs])
    assert np.max(np.abs(fused.astype(np.float64) - single)) <= 1e-6
    assert fused.tobytes() == single.tobytes()
    alex_scorer.reference_cache = None


def test_feature_cache_bound_is_respected(alex_scorer, rows):
    pairs = [prepare_pair(row["id"], row, RecordConfig(), reference_cache=BoundedCache(1 << 20))
             for row in rows[:32]]
    alex_scorer.reference_cache = None
    one = alex_scorer.raw_scores_reused(pairs[0].reference[None], pairs[0].filled[None], [pairs[0].reference_key],
                                        64 << 20)
    entry = alex_scorer.reference_cache.bytes_used
    alex_scorer.reference_cache = None
    bound = 2 * entry + 10
    scores = []
    for pair in reversed(pairs):  # interleaves nothing, but evicts: 8 references through 2 slots
        scores.append(alex_scorer.raw_scores_reused(pair.reference[None], pair.filled[None], [pair.reference_key],
                                                    bound)[0])
        cache = alex_scorer.reference_cache
        assert cache.bytes_used <= bound and len(cache) <= 2
    assert alex_scorer.reference_cache.evictions == 6
    assert scores[-1].tobytes() == one[0].tobytes()
    alex_scorer.reference_cache = None


# --------------------------------------------------------------------------- the Beam stage


def _run(rows: list[dict], path, **kwargs) -> dict:
    """Score ``rows`` with ScoreLPIPS(**kwargs) on the in-process runner: {"scores": {id: repr(lpips)},
    "errors": [ids]}, written to ``path`` by the matchers."""
    def keep(kind):
        def matcher(items):
            with open(f"{path}.{kind}.json", "w") as handle:
                json.dump(list(items), handle)
        return matcher

    with TestPipeline(runner="FnApiRunner") as pipeline:
        outputs = pipeline | beam.Create(rows, reshuffle=False) | ScoreLPIPS(device="cpu", **kwargs)
        assert_that(outputs.scores | "S" >> beam.Map(lambda row: (row["id"], repr(row["lpips"]))), keep("scores"),
                    label="Scores")
        assert_that(outputs.errors | "E" >> beam.Map(lambda row: row["id"]), keep("errors"), label="Errors")
    with open(f"{path}.scores.json") as handle:
        scores = json.load(handle)
    with open(f"{path}.errors.json") as handle:
        errors = json.load(handle)
    ids = [row_id for row_id, _ in scores]
    assert len(ids) == len(set(ids))
    return {"scores": dict(scores), "errors": sorted(errors)}


def test_stage_reuse_is_exact_and_group_by_reference_scores_every_row_once(rows, tmp_path):
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)  # candidates of one reference far apart
    runs = {
        "off": _run(rows, tmp_path / "off", reference_cache_mb=0),
        "default": _run(rows, tmp_path / "default"),
        "tiny_cache": _run(shuffled, tmp_path / "tiny", reference_cache_mb=1),
        "small_batches": _run(rows, tmp_path / "small", max_batch_pairs=3),
        "grouped": _run(shuffled, tmp_path / "grouped", group_by_reference=True),
    }
    all_ids = sorted(row["id"] for row in rows)
    for name, run in runs.items():
        assert sorted(list(run["scores"]) + run["errors"]) == all_ids, name  # every row exactly once
        assert run["errors"] == ["broken/nan_box", "broken/truncated_png"], name
    reference = runs["default"]["scores"]
    for name in ("tiny_cache", "small_batches", "grouped"):
        assert runs[name]["scores"] == reference, name  # same bits (repr of float64)
    diff = max(abs(float(reference[key]) - float(value)) for key, value in runs["off"]["scores"].items())
    assert diff <= 1e-6
    assert runs["off"]["scores"] == reference


def test_reference_group_key():
    assert reference_group_key({"r": b"abc"}, "r") == reference_group_key({"r": {"bytes": b"abc", "path": None}}, "r")
    assert reference_group_key({"r": b"abc"}, "r") != reference_group_key({"r": b"abd"}, "r")
    assert reference_group_key({"r": "a.png"}, "r") == "p:a.png"
    assert reference_group_key({"r": None}, "r").startswith("other:")


def test_options_parse_the_reuse_flags():
    options = parse_options(["--input", "x.parquet", "--output", "out", "--reference_cache_mb", "0",
                             "--group_by_reference"]).view_as(LpipsPipeOptions)
    assert options.reference_cache_mb == 0 and options.group_by_reference is True
    default = parse_options(["--input", "x.parquet", "--output", "out"]).view_as(LpipsPipeOptions)
    assert default.reference_cache_mb == DEFAULT_REFERENCE_CACHE_MB and default.group_by_reference is False
    with pytest.raises(ValueError):
        ScoreLPIPS(device="cpu", reference_cache_mb=-1, check=False)
