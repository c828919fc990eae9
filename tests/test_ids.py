"""Ids: every Parquet id type works or is refused at planning; duplicate counting and resume with them;
resume refuses earlier scores of another provenance."""

from __future__ import annotations

import datetime
import decimal
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.transforms.inputs import ids as record_ids
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.inputs.split import InputError
from lpips_pipe.transforms.inputs.files import ReadInputSplit, plan_file

UTC = datetime.timezone.utc

# (type, three distinct values): the first value is repeated in the inputs below.
SCALAR_IDS = {
    "int8": (pa.int8(), [1, 2, 3]),
    "uint64": (pa.uint64(), [2 ** 63, 1, 0]),
    "float16": (pa.float16(), [np.float16(1.5), np.float16(2.0), np.float16(-0.5)]),
    "float64": (pa.float64(), [0.1, 2.5, -3.0]),
    "string": (pa.string(), ["a", "b", "c"]),
    "large_string": (pa.large_string(), ["a", "b", "c"]),
    "binary": (pa.binary(), [b"\x00a", b"b", b"c"]),
    "fixed_binary": (pa.binary(2), [b"aa", b"bb", b"cc"]),
    "bool": (pa.bool_(), [True, False, None]),
    "date32": (pa.date32(), [datetime.date(2024, 1, 1), datetime.date(2024, 1, 2), datetime.date(1999, 12, 31)]),
    "time64": (pa.time64("us"), [datetime.time(1, 2, 3), datetime.time(4, 5, 6), datetime.time(0, 0, 1)]),
    "timestamp": (pa.timestamp("ms"), [datetime.datetime(2024, 1, 1, 12), datetime.datetime(2024, 1, 2),
                                       datetime.datetime(2000, 1, 1)]),
    "timestamp_tz": (pa.timestamp("us", tz="UTC"), [datetime.datetime(2024, 1, 1, tzinfo=UTC),
                                                    datetime.datetime(2024, 1, 2, tzinfo=UTC),
                                                    datetime.datetime(2023, 5, 1, tzinfo=UTC)]),
    "duration": (pa.duration("s"), [datetime.timedelta(seconds=5), datetime.timedelta(seconds=6),
                                    datetime.timedelta(days=1)]),
    "decimal": (pa.decimal128(10, 2), [decimal.Decimal("1.10"), decimal.Decimal("2.00"), decimal.Decimal("-3.25")]),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), ["a", "b", "c"]),
}


@pytest.mark.parametrize("name", sorted(SCALAR_IDS))
def test_scalar_id_types_are_accepted(name):
    record_ids.check_id_type(pa.field("id", SCALAR_IDS[name][0]))


@pytest.mark.parametrize("kind", [
    pa.list_(pa.int64()), pa.large_list(pa.string()), pa.list_(pa.int32(), 2),
    pa.struct([("a", pa.int64())]), pa.map_(pa.string(), pa.int64()),
    pa.dictionary(pa.int32(), pa.list_(pa.int64())) if hasattr(pa, "dictionary") else pa.list_(pa.int8()),
    pa.month_day_nano_interval(),
])
def test_nested_id_types_are_refused_in_one_line(kind):
    try:
        field = pa.field("key", kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        pytest.skip(f"pyarrow cannot make {kind}")
    with pytest.raises(InputError, match="'key'") as error:
        record_ids.check_id_type(field)
    assert "\n" not in str(error.value) and isinstance(error.value, ValueError)


def _write_ids(path: str, kind: pa.DataType, values: list) -> pa.Table:
    """Rows with ids ``values[0], values[1], values[0], values[2]`` and a row number."""
    ids = [values[0], values[1], values[0], values[2]]
    table = pa.table({"id": pa.array(ids, type=kind), "n": [0, 1, 2, 3]})
    pq.write_table(table, path, row_group_size=2)
    return table


@pytest.mark.parametrize("name", sorted(SCALAR_IDS))
def test_duplicate_ids_of_every_type_are_counted(tmp_path, name):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    kind, values = SCALAR_IDS[name]
    path = str(tmp_path / "in.parquet")
    table = _write_ids(path, kind, values)
    _, splits = plan_file(path)
    repeated = table.column("id")[0].as_py()
    with TestPipeline(runner="FnApiRunner") as pipeline:
        rows = pipeline | beam.Create(splits) | beam.ParDo(ReadInputSplit("id"))
        counts = rows | record_ids.CountDuplicateIds()
        assert_that(counts, equal_to([(record_ids.id_key(repeated), 2)]))


@pytest.mark.parametrize("name", sorted(SCALAR_IDS))
def test_resume_skips_ids_of_every_type(tmp_path, name):
    kind, values = SCALAR_IDS[name]
    path = str(tmp_path / "in.parquet")
    _write_ids(path, kind, values)
    scores = tmp_path / "run1" / layout.SCORES
    scores.mkdir(parents=True)
    done = pa.array([values[0]], type=kind)  # the id on rows 0 and 2
    pq.write_table(pa.table({"id": done, "lpips": [0.1]}), str(scores / "part-00000-of-00001.parquet"))
    earlier = record_ids.earlier_output_files(str(tmp_path / "run1"))
    assert len(earlier) == 1
    found, unreadable = record_ids.read_output_ids(earlier)
    _, splits = plan_file(path, split_rows=2)
    planned, skipped = record_ids.plan_skips(splits, "id", found)
    assert skipped == 2 and not unreadable
    emitted = [row["n"] for split in planned for _, row in ReadInputSplit("id").process(split)]
    assert emitted == [1, 3]


def test_resume_of_a_jsonl_input(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(12):
            handle.write(json.dumps({"id": f"r{i}", "n": i}) + "\n")
    _, splits = plan_file(str(path), split_rows=5)
    planned, skipped = record_ids.plan_skips(splits, "id", pa.chunked_array([pa.array(["r0", "r5", "r6", "r11"])]))
    assert skipped == 4
    emitted = [row["n"] for split in planned for _, row in ReadInputSplit("id").process(split)]
    assert emitted == [1, 2, 3, 4, 7, 8, 9, 10]
    by_position, _ = record_ids.plan_skips(splits, None, pa.chunked_array([pa.array([f"{path}:3"])]))
    assert [record_id for split in by_position for record_id, _ in ReadInputSplit(None).process(split)] == \
        [f"{path}:{i}" for i in range(12) if i != 3]


def test_earlier_output_files_finds_the_scores_folder_and_the_old_flat_names(tmp_path):
    table = pa.table({"id": ["a"], "lpips": [0.1]})
    new_run, old_run = tmp_path / "new", tmp_path / "old"
    (new_run / layout.SCORES).mkdir(parents=True)
    (new_run / layout.ERRORS).mkdir(parents=True)
    old_run.mkdir()
    pq.write_table(table, str(new_run / layout.SCORES / "part-00000-of-00001.parquet"))
    pq.write_table(table, str(new_run / layout.ERRORS / "part-00000-of-00001.parquet"))
    pq.write_table(table, str(old_run / "scores-00000-of-00001.parquet"))
    pq.write_table(table, str(old_run / "errors-00000-of-00001.parquet"))
    assert record_ids.earlier_output_files(str(new_run)) == [str(new_run / layout.SCORES /
                                                                 "part-00000-of-00001.parquet")]
    assert record_ids.earlier_output_files(str(old_run)) == [str(old_run / "scores-00000-of-00001.parquet")]
    assert record_ids.earlier_output_files(str(tmp_path / "*" / layout.SCORES / "*.parquet")) == \
        record_ids.earlier_output_files(str(new_run))


# --- provenance ----------------------------------------------------------------------------------------

JOB = {"net": "alex", "lpips_version": "0.1", "weights_sha256": "ab" * 32, "mask_mode": "outer", "max_side": 2048}


def _scores(path, rows: int = 6, row_group_size: int = 2, metadata=None, **overrides) -> str:
    columns = {"id": [f"r{i}" for i in range(rows)], "lpips": [0.1] * rows}
    for name in layout.PROVENANCE_FIELDS:
        columns[name] = [JOB[name]] * rows
    for name, value in overrides.items():
        columns[name] = value if isinstance(value, list) else [value] * rows
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def test_provenance_agreeing_earlier_scores_pass(tmp_path):
    paths = [_scores(tmp_path / "a.parquet"), _scores(tmp_path / "b.parquet", metadata={"max_side": "2048"})]
    record_ids.check_provenance(paths, JOB, allow_mixed=False)
    record_ids.check_provenance(paths, {}, allow_mixed=False)  # nothing to check


@pytest.mark.parametrize("field, earlier", [
    ("net", "vgg"), ("lpips_version", "0.0"), ("weights_sha256", "cd" * 32), ("mask_mode", "inner"),
])
def test_provenance_a_row_made_otherwise_is_refused_naming_field_and_values(tmp_path, field, earlier):
    values = [JOB[field]] * 5 + [earlier]  # only the last row (last row group) differs
    path = _scores(tmp_path / "a.parquet", **{field: values})
    with pytest.raises(record_ids.ResumeError) as error:
        record_ids.check_provenance([path], JOB, allow_mixed=False)
    message = str(error.value)
    assert "\n" not in message and path in message and field in message
    assert repr(earlier) in message and repr(JOB[field]) in message
    record_ids.check_provenance([path], JOB, allow_mixed=True)
    record_ids.check_provenance([path], {k: v for k, v in JOB.items() if k != field}, allow_mixed=False)


def test_provenance_max_side_from_metadata_or_column_and_skipped_when_absent(tmp_path):
    in_metadata = _scores(tmp_path / "meta.parquet", metadata={"max_side": "1024"})
    with pytest.raises(record_ids.ResumeError, match="max_side='1024'"):
        record_ids.check_provenance([in_metadata], JOB, allow_mixed=False)
    in_column = _scores(tmp_path / "col.parquet", max_side=[2048, 2048, 2048, 0, 2048, 2048])
    with pytest.raises(record_ids.ResumeError, match="max_side=0"):
        record_ids.check_provenance([in_column], JOB, allow_mixed=False)
    absent = _scores(tmp_path / "absent.parquet")
    record_ids.check_provenance([absent], {**JOB, "max_side": 512}, allow_mixed=False)


def test_provenance_null_values_disagree_and_unreadable_files_are_skipped(tmp_path):
    nulls = _scores(tmp_path / "nulls.parquet", net=pa.array(["alex", None, "alex", "alex", "alex", "alex"]).to_pylist())
    with pytest.raises(record_ids.ResumeError, match="net=None"):
        record_ids.check_provenance([nulls], JOB, allow_mixed=False)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    record_ids.check_provenance([str(broken)], JOB, allow_mixed=False)
    assert os.path.exists(broken)
