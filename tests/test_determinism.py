"""Same input, same output: two runs and two runners give exactly the same rows.

One small Parquet file (real photos at 64x64 and 48x48, seven row groups, three bad rows) is scored
three times: twice on the in-process FnApiRunner and once with ``--direct_num_workers=2
--direct_running_mode=multi_processing``. Row order in the output files is the runner's business; the
content is not: both outputs, sorted by id, are compared value for value (floats exactly, by ``repr``).

Batches follow bundles, which differ between runners, so this rests on a pair's score not depending on
the pairs that share its batch: ``LpipsScorer`` applies the 1x1 linear layers as a channel-weighted sum
for that reason (lpips' Conv2d picked batch-size-dependent kernels, moving scores by ~3e-8). Error rows
used to differ too: Pillow's message for an unidentified image carried the memory address of the
in-memory file; decode.py now drops it.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import cli as job
from tests.data_helpers import PAIRS_SCHEMA, demo_table
from tests.seed_reference import open_image
from tests.test_faults import deadline

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _read(pattern: str) -> pa.Table:
    paths = sorted(glob.glob(pattern))
    assert paths, f"no file matches {pattern}"
    return pa.concat_tables([pq.read_table(path) for path in paths])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> tuple[str, pa.Table]:
    big = demo_table(size=64, with_bad_rows=False).slice(0, 20)
    small = demo_table(size=48, with_bad_rows=False).slice(20, 4)
    template = big.slice(0, 1).to_pylist()[0]
    bad = [
        {**template, "id": "bad/truncated", "edited_image": template["edited_image"][:200]},
        {**template, "id": "bad/random_bytes", "ref_image": bytes(range(256)) * 4},
        {**template, "id": "bad/nan_box", "coords": [[float("nan"), 0.0, 5.0, 5.0]]},
    ]
    rows = big.to_pylist()
    rows[5:5] = bad[:2]
    rows[13:13] = bad[2:]
    table = pa.concat_tables([pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA), small])
    path = str(tmp_path_factory.mktemp("det") / "pairs.parquet")
    pq.write_table(table, path, row_group_size=4)  # 7 splits: the runners bundle (and so batch) them differently
    return path, table


@pytest.fixture(scope="module")
def runs(pairs_file, tmp_path_factory) -> dict[str, tuple[pa.Table, pa.Table]]:
    path, _ = pairs_file
    results = {}
    for name, extra in (("first", []), ("second", []), ("multi_processing", MULTI)):
        out = str(tmp_path_factory.mktemp(name) / "out")
        with deadline(150):
            assert job.main(["--input", path, "--output", out, *extra]) == 0
        scores = _read(os.path.join(out, "scores", "*.parquet")).sort_by("id")
        errors = _read(os.path.join(out, "errors", "*.parquet")).sort_by("id")
        results[name] = (scores, errors)
    return results


def _differences(a: pa.Table, b: pa.Table, columns=None) -> dict[str, list]:
    """Per column, the rows whose values differ (``repr`` equality: exact for floats, NaN equals NaN)."""
    assert a.schema.equals(b.schema)
    ids = a.column("id").to_pylist()
    assert ids == b.column("id").to_pylist()
    found = {}
    for name in columns or a.column_names:
        rows = [(row_id, x, y) for row_id, x, y in zip(ids, a.column(name).to_pylist(), b.column(name).to_pylist())
                if repr(x) != repr(y)]
        if rows:
            found[name] = rows
    return found


def test_every_row_is_routed(runs, pairs_file):
    _, table = pairs_file
    for scores, errors in runs.values():
        assert scores.num_rows + errors.num_rows == table.num_rows
        assert errors.column("id").to_pylist() == ["bad/nan_box", "bad/random_bytes", "bad/truncated"]


def test_two_runs_give_identical_outputs(runs):
    for first, second in zip(runs["first"], runs["second"]):
        assert _differences(first, second) == {}


def test_multi_processing_runner_gives_identical_rows(runs):
    for first, multi in zip(runs["first"], runs["multi_processing"]):
        assert _differences(first, multi) == {}


def test_scores_do_not_depend_on_batch_composition(alex_scorer):
    """A pair's raw LPIPS must be the same whichever pairs share its batch (what the runner equality rests on)."""
    rows = demo_table(size=64, with_bad_rows=False).slice(0, 16).to_pylist()
    references = np.stack([np.asarray(open_image(row["ref_image"]).convert("RGB")) for row in rows])
    edited = np.stack([np.asarray(open_image(row["edited_image"]).convert("RGB")) for row in rows])
    alone = np.concatenate([alex_scorer.raw_scores(references[i:i + 1], edited[i:i + 1]) for i in range(len(rows))])
    for size in (2, 5, 16):
        batched = np.concatenate([alex_scorer.raw_scores(references[i:i + size], edited[i:i + size])
                                  for i in range(0, len(rows), size)])
        assert batched.tolist() == alone.tolist(), f"batches of {size}: max diff {np.abs(batched - alone).max()}"
