"""Parquet reading: splits cover every row exactly once, ids follow file order."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from lpips_pipe.transforms.inputs.files import ReadInputSplit, plan_splits, read_footer


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 700), max_size=6), st.integers(1, 300))
def test_splits_cover_each_row_once(row_group_rows, split_rows):
    """Splits are whole row groups (never a part: pyarrow cannot start inside one), small groups packed
    up to ``split_rows`` rows, a bigger group alone."""
    splits = plan_splits("f", row_group_rows, split_rows)
    covered = []
    offset = 0
    starts = {}
    for group, rows in enumerate(row_group_rows):
        starts[group] = offset
        offset += rows
    for split in splits:
        groups = range(split.row_group, split.row_group + split.row_groups)
        assert split.start == 0 and split.num_rows == sum(row_group_rows[g] for g in groups) > 0
        assert split.num_rows <= split_rows or split.row_groups == 1
        assert split.first_row == starts[split.row_group]
        covered += range(split.first_row, split.first_row + split.stop - split.start)
    assert covered == list(range(sum(row_group_rows)))


def test_reading_all_splits_gives_every_row_in_order(tmp_path):
    values = list(range(23))
    table = pa.table({"value": values, "name": [f"n{v}" for v in values]})
    path = str(tmp_path / "rows.parquet")
    pq.write_table(table, path, row_group_size=7)  # row groups of 7, 7, 7, 2
    schema, row_group_rows = read_footer(path)
    assert row_group_rows == [7, 7, 7, 2] and schema.names == ["value", "name"]
    splits = plan_splits(path, row_group_rows, split_rows=3)
    assert [split.num_rows for split in splits] == [7, 7, 7, 2]  # whole groups, each read once
    by_position = [pair for split in splits for pair in ReadInputSplit(None).process(split)]
    assert [record_id for record_id, _ in by_position] == [f"{path}:{v}" for v in values]
    assert [row["value"] for _, row in by_position] == values
    by_id = [pair for split in splits for pair in ReadInputSplit("name").process(split)]
    assert [record_id for record_id, _ in by_id] == [f"n{v}" for v in values]
    packed = plan_splits(path, row_group_rows, split_rows=16)  # 7 + 7, then 7 + 2
    assert [(split.row_group, split.row_groups, split.num_rows) for split in packed] == [(0, 2, 14), (2, 2, 9)]
    assert [row["value"] for split in packed for _, row in ReadInputSplit(None).process(split)] == values
