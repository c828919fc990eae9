"""transforms.sink: staged files, commits as splits finish, packing and publishing."""

from __future__ import annotations

import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import sink
from lpips_pipe.transforms.outputs import layout

SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field(layout.LPIPS_FIELD, pa.float64()),
                    *layout.SOURCE_FIELDS])
ERRORS = pa.schema([pa.field("id", pa.string()), *layout.SOURCE_FIELDS, *layout.ERROR_FIELDS])


def _rows(path: str, start: int, stop: int) -> list[dict]:
    return [{"id": f"{path}:{row}", layout.LPIPS_FIELD: row / 100, layout.SOURCE_FILE_FIELD: path,
             layout.SOURCE_ROW_FIELD: row} for row in range(start, stop)]


def _write(tmp_path, scores: list[dict], errors: list[dict], commit=None, num_shards=0) -> str:
    out = str(tmp_path / "out")
    with TestPipeline(runner="FnApiRunner") as pipeline:
        parts = {layout.SCORES: [pipeline | "Scores" >> beam.Create(scores)],
                 layout.ERRORS: [pipeline | "Errors" >> beam.Create(errors)]}
        _ = sink.part_labels(parts) | sink.WriteParquet(out, {layout.SCORES: SCHEMA, layout.ERRORS: ERRORS},
                                                        num_shards, commit)
    return out


def test_rows_of_both_kinds_are_published_once_in_order_and_an_empty_kind_gets_an_empty_file(tmp_path):
    scores = _rows("/in/a", 0, 150)
    out = _write(tmp_path, scores, [])
    published = pq.read_table(os.path.join(out, layout.SCORES))
    assert published.column("id").to_pylist() == [row["id"] for row in scores]
    assert os.listdir(os.path.join(out, layout.SCORES)) == [layout.shard_name(0, 1)]
    empty = pq.read_table(os.path.join(out, layout.ERRORS, layout.shard_name(0, 1)))
    assert empty.num_rows == 0 and empty.schema.equals(ERRORS)
    assert not os.path.exists(layout.ledger_dir(out))  # a user's pipeline writes no ledger


def test_a_commit_plan_commits_each_split_as_its_rows_are_all_written(tmp_path):
    splits = {"/in/a": ((0, 40, 40), (40, 80, 38)), "/in/b": ((0, 10, 10),)}  # 2 rows of a's 2nd split skipped
    scores = _rows("/in/a", 0, 40) + [row for row in _rows("/in/a", 40, 80) if row[layout.SOURCE_ROW_FIELD] < 78]
    errors = [{**row, layout.ERROR_STAGE_FIELD: "decode", layout.ERROR_TYPE_FIELD: "X", layout.ERROR_MESSAGE_FIELD: "m"}
              for row in _rows("/in/b", 0, 10)]
    plan = sink.CommitPlan("20260101T000000-00000001", splits, interval_s=3600)  # no commits by time
    out = _write(tmp_path, scores, errors, plan)
    state = ledger.read_state(out)
    assert state.publishes and state.done() == {"/in/a": [[0, 78]], "/in/b": [[0, 10]]}
    # a's first split, a's second, b's one, each committed when complete (the parts run in turn here)
    assert sorted(ledger.count(ranges) for commit in state.commits for ranges in commit.sources.values()) \
        == [10, 38, 40]
    total = sum(pq.read_table(os.path.join(out, kind)).num_rows for kind in layout.KINDS)
    assert total == len(scores) + len(errors)


def test_packs_follow_num_shards_or_the_size_limit(tmp_path, monkeypatch):
    staged = []
    for index in range(5):
        path = str(tmp_path / f"{index:020d}-x.parquet")
        pq.write_table(pa.table({"id": [str(index)]}), path)
        staged.append(ledger.StagedFile(layout.SCORES, path, 1))
    assert [len(sources) for *_, sources in sink.plan_packs(staged, [layout.SCORES], 2)] == [3, 2]
    monkeypatch.setattr(sink, "PACK_BYTES", 2 * os.path.getsize(staged[0].path))
    packs = sink.plan_packs(staged, [layout.SCORES, layout.ERRORS], 0)
    assert [(kind, index, count, len(sources)) for kind, index, count, sources in packs] == [
        (layout.SCORES, 0, 3, 2), (layout.SCORES, 1, 3, 2), (layout.SCORES, 2, 3, 1), (layout.ERRORS, 0, 1, 0)]
    assert [os.path.basename(path) for *_, sources in packs[:3] for path in sources] == \
        [os.path.basename(item.path) for item in staged]  # in the order they were written


def test_merge_keeps_every_row_and_the_schema(tmp_path):
    sources = []
    for index in range(3):
        path = str(tmp_path / f"{index}.parquet")
        pq.write_table(pa.Table.from_pylist(_rows("/in/a", 10 * index, 10 * index + 5), schema=SCHEMA), path,
                       row_group_size=2)
        sources.append(path)
    merged = str(tmp_path / "merged.parquet")
    sink.merge_files(sources, merged, SCHEMA)
    table = pq.read_table(merged)
    assert table.schema.equals(SCHEMA) and table.column(layout.SOURCE_ROW_FIELD).to_pylist() == [
        row for index in range(3) for row in range(10 * index, 10 * index + 5)]
    sink.merge_files([], str(tmp_path / "empty.parquet"), SCHEMA)
    assert pq.read_table(str(tmp_path / "empty.parquet")).num_rows == 0


def test_unknown_keys_are_not_written(tmp_path):
    out = _write(tmp_path, [{**_rows("/in/a", 0, 1)[0], layout.DRIFT_MAP_FIELD: [[0.5]]}], [])
    assert pq.read_table(os.path.join(out, layout.SCORES)).column_names == SCHEMA.names


@pytest.mark.parametrize("label, kind", [("scores0", "scores"), ("errors12", "errors")])
def test_part_labels_round_trip(label, kind):
    assert sink.part_kind(label) == kind
