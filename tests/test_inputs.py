"""Input files: matching, refusing unreadable files at planning, JSON Lines manifests, relative image paths,
linear split reading."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.transforms.inputs import files, jsonl
from lpips_pipe.transforms.inputs import split as input_split
from lpips_pipe.transforms.inputs.split import InputError, common_schema
from lpips_pipe.transforms.inputs.files import ReadInputSplit, match_inputs, plan_file, plan_splits, read_footer


def _rows(split, id_column=None, **kwargs):
    return list(ReadInputSplit(id_column, **kwargs).process(split))


def _all_rows(splits, id_column=None, **kwargs):
    return [pair for split in splits for pair in _rows(split, id_column, **kwargs)]


def _one_line_naming(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(error.value, ValueError)
    return message


# --- 1. matching -----------------------------------------------------------------------------------


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    literal = tmp_path / "a[1].parquet"
    other = tmp_path / "a1.parquet"  # what the glob a[1].parquet would match
    for path in (literal, other):
        pq.write_table(pa.table({"x": [1]}), str(path))
    assert match_inputs(str(literal)) == [str(literal)]
    assert match_inputs(str(tmp_path / "*.parquet")) == sorted([str(literal), str(other)])
    assert match_inputs(str(tmp_path / "nothing-*.parquet")) == []


def test_a_folder_as_input_means_its_input_files_at_any_depth(tmp_path):
    """A Hugging Face dataset folder: Parquet under data/, metadata beside it, a cache to leave alone."""
    folder = tmp_path / "ds_hf"
    for name in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "extra/more.jsonl",
                 "shards/a.tar", "top.parquet"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    for name in ("README.md", "dataset_info.json", ".cache/huggingface/x.parquet", "_temporary/y.parquet",
                 "data/.part.parquet", "notes.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    expected = sorted(str(folder / name) for name in ("data/train-00000-of-00002.parquet",
                                                      "data/train-00001-of-00002.parquet", "extra/more.jsonl",
                                                      "shards/a.tar", "top.parquet"))
    assert match_inputs(str(folder)) == expected
    assert match_inputs(str(folder) + "/") == expected


def test_a_folder_without_input_files_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("no data")
    (tmp_path / ".cache").mkdir()
    pq.write_table(pa.table({"x": [1]}), str(tmp_path / ".cache" / "rows.parquet"))
    with pytest.raises(InputError) as error:
        match_inputs(str(tmp_path))
    message = _one_line_naming(error, tmp_path)
    assert "no Parquet, JSON Lines or tar file" in message


# --- 2. unreadable files are InputErrors, found from the footer / a stat ------------------------------


def _parquet_bytes(tmp_path) -> bytes:
    path = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": list(range(100)), "name": [f"n{i}" for i in range(100)]}), str(path),
                   row_group_size=10)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["random", "truncated", "footer_only_cut", "csv", "empty", "json_in_parquet"])
def test_files_that_are_not_parquet_are_refused_naming_the_file(tmp_path, kind):
    good = _parquet_bytes(tmp_path)
    content = {
        "random": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "truncated": good[: len(good) // 2],
        "footer_only_cut": good[:-3],
        "csv": b"id,ref_image,edited_image\n1,a.png,b.png\n",
        "empty": b"",
        "json_in_parquet": b'{"id": 1}\n',
    }[kind]
    path = tmp_path / f"bad-{kind}.parquet"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        read_footer(str(path))
    _one_line_naming(error, path)
    with pytest.raises(InputError):
        plan_file(str(path))


def test_a_footer_pointing_past_the_end_is_refused(tmp_path):
    good = _parquet_bytes(tmp_path)
    # Keep the footer, drop data bytes in front of it: the column chunks now end past the file.
    footer_length = int.from_bytes(good[-8:-4], "little")
    data_end = len(good) - footer_length - 8
    damaged = good[:4] + good[data_end - 10:]  # 10 data bytes left
    assert damaged[-footer_length - 8:] == good[-footer_length - 8:]
    path = tmp_path / "damaged.parquet"
    path.write_bytes(damaged)
    with pytest.raises(InputError) as error:
        read_footer(str(path))
    _one_line_naming(error, path)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.parquet"
    os.mkfifo(path)
    outcome = {}

    def plan():
        try:
            read_footer(str(path))
        except InputError as error:
            outcome["error"] = error

    thread = threading.Thread(target=plan, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader so the test process can end, then fail
        with open(path, "wb"):
            pass
        pytest.fail("read_footer blocked on a FIFO")
    assert "FIFO" in str(outcome["error"]) and str(path) in str(outcome["error"])


def test_duplicate_column_names_are_refused(tmp_path):
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["id", "id"]), str(path))
    with pytest.raises(InputError, match="'id' appears more than once") as error:
        read_footer(str(path))
    _one_line_naming(error, path)
    jsonl = tmp_path / "dup.jsonl"  # json keys repeated within a line collapse; across a schema they cannot
    jsonl.write_text('{"id": 1, "x": 2}\n')
    assert read_footer(str(jsonl))[0].names == ["id", "x"]


def test_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as error:
        read_footer(str(tmp_path / "gone.parquet"))
    _one_line_naming(error, tmp_path / "gone.parquet")


# --- 3. JSON Lines manifests ----------------------------------------------------------------------------


def _manifest_rows(count: int) -> list[dict]:
    return [{"id": f"r{i}", "ref_image": f"img/ref{i}.png", "edited_image": f"/abs/edit{i}.png",
             "coords": [[i, 0, i + 5, 7]], "score": i * 0.5, "edit": "add" if i % 3 else "remove"}
            for i in range(count)]


def _write_jsonl(path, rows, blank_every: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for index, row in enumerate(rows):
            handle.write(json.dumps(row) + "\n")
            if blank_every and index % blank_every == 0:
                handle.write("   \n")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson"])
def test_jsonl_rows_come_back_as_written_with_their_positions(tmp_path, suffix):
    rows = _manifest_rows(23)
    path = str(tmp_path / f"manifest{suffix}")
    _write_jsonl(path, rows, blank_every=4)  # blank lines are not rows
    schema, counts = read_footer(path)
    assert counts == [len(rows)] and schema.names == list(rows[0])
    splits = plan_splits(path, counts, split_rows=5)
    assert [split.num_rows for split in splits] == [5, 5, 5, 5, 3]
    read = _all_rows(splits)
    assert [row for _, row in read] == rows
    assert [record_id for record_id, _ in read] == [f"{path}:{i}" for i in range(len(rows))]
    assert [record_id for record_id, _ in _all_rows(splits, "id")] == [row["id"] for row in rows]
    schema2, splits2 = plan_file(path, split_rows=5)
    assert schema2 == schema and splits2 == splits


def test_jsonl_splits_are_byte_ranges_of_whole_lines(tmp_path, monkeypatch):
    rows = _manifest_rows(500)
    path = tmp_path / "big.jsonl"
    _write_jsonl(path, rows, blank_every=7)
    monkeypatch.setattr(jsonl, "_SCAN_BLOCK", 1000)  # many planning blocks, lines across their edges
    monkeypatch.setattr(files, "SPLIT_BYTES", 2000)
    schema, splits = plan_file(str(path), split_rows=40)
    data = path.read_bytes()
    assert splits[0].byte_start == 0 and splits[-1].byte_stop == len(data.rstrip(b" \n")) + 1
    for split, following in zip(splits, splits[1:]):
        assert split.byte_stop <= following.byte_start and following.first_row == split.stop
    for split in splits:
        chunk = data[split.byte_start:split.byte_stop]
        assert chunk.endswith(b"\n") and len(chunk) <= 2000 + 200
        assert len([line for line in chunk.splitlines() if line.strip()]) == split.num_rows <= 40
    assert [row for _, row in _all_rows(splits)] == rows


def test_jsonl_types_promote_across_lines_and_every_row_gets_the_planned_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "_SCAN_BLOCK", 64)
    path = tmp_path / "mixed.jsonl"
    lines = [{"id": 1, "v": 1, "note": None}, {"id": 2, "v": 2.5, "note": "x"}, {"id": 3, "v": 3, "extra": True}]
    _write_jsonl(path, lines * 5)
    schema, splits = plan_file(str(path), split_rows=4)
    assert schema.field("v").type == pa.float64() and schema.field("note").type == pa.string()
    assert "extra" in schema.names
    values = [row for _, row in _all_rows(splits)]
    assert all(isinstance(row["v"], float) for row in values)
    assert [row["extra"] for row in values[:3]] == [None, None, True]


@pytest.mark.parametrize("bad_line, expect", [
    ("[1, 2, 3]", "line 3 is a JSON list, not an object"),
    ("42", "line 3 is a JSON int, not an object"),
    ('"text"', "line 3 is a JSON str, not an object"),
    ('{"id": "r9", "ref_image": "a.png"', "line 3 is not valid JSON"),
    ('{"id": "r8"} {"id": "r9"}', "line 3 is not valid JSON"),
])
def test_a_line_that_is_not_one_object_is_refused_at_planning_with_its_line_number(tmp_path, bad_line, expect):
    path = tmp_path / "manifest.jsonl"
    good = [json.dumps(row) for row in _manifest_rows(4)]
    path.write_text("\n".join([good[0], good[1], bad_line, good[2], good[3]]) + "\n")
    with pytest.raises(InputError, match=expect) as error:
        plan_file(str(path))
    _one_line_naming(error, path)


def test_a_column_changing_type_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl, "_SCAN_BLOCK", 64)  # the change falls in a later block
    path = tmp_path / "manifest.jsonl"
    _write_jsonl(path, [{"id": i, "x": 1} for i in range(10)] + [{"id": "eleven", "x": 1}])
    with pytest.raises(InputError, match="'id'") as error:
        plan_file(str(path))
    _one_line_naming(error, path)
    monkeypatch.setattr(jsonl, "_SCAN_BLOCK", 1 << 20)  # in the same block: pyarrow's own message
    with pytest.raises(InputError, match="line 11") as error:
        plan_file(str(path))
    _one_line_naming(error, path)


def test_an_empty_or_blank_jsonl_is_refused(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(InputError) as error:
            read_footer(str(path))
        _one_line_naming(error, path)


def test_a_json_array_file_is_refused_as_not_json_lines(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(_manifest_rows(3), indent=1))
    with pytest.raises(InputError, match="line 1") as error:
        plan_file(str(path))
    _one_line_naming(error, path)


def test_parquet_and_jsonl_inputs_must_share_column_names(tmp_path):
    rows = _manifest_rows(6)
    parquet_path = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows).cast(pa.schema([
        ("id", pa.string()), ("ref_image", pa.string()), ("edited_image", pa.string()),
        ("coords", pa.list_(pa.list_(pa.int32()))), ("score", pa.float64()), ("edit", pa.string())])), parquet_path)
    jsonl_path = str(tmp_path / "b.jsonl")
    _write_jsonl(jsonl_path, rows)
    schemas = [(path, read_footer(path)[0]) for path in (parquet_path, jsonl_path)]
    merged = common_schema(schemas)
    assert merged.names == schemas[0][1].names
    other = str(tmp_path / "c.jsonl")
    _write_jsonl(other, [{k: v for k, v in row.items() if k != "edit"} | {"kind": "x"} for row in rows])
    with pytest.raises(InputError, match="missing edit.*extra kind") as error:
        common_schema(schemas + [(other, read_footer(other)[0])])
    _one_line_naming(error, other)


def test_jsonl_splits_travel_through_a_beam_pipeline(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    rows = _manifest_rows(30)
    path = str(tmp_path / "manifest.jsonl")
    _write_jsonl(path, rows)
    _, splits = plan_file(path, split_rows=7)
    with TestPipeline(runner="FnApiRunner") as pipeline:
        ids = (pipeline | beam.Create(splits) | beam.Reshuffle()
               | beam.ParDo(ReadInputSplit("id", image_columns=("ref_image",))) | beam.Map(lambda pair: pair[0]))
        assert_that(ids, equal_to([row["id"] for row in rows]))


# --- 4. relative image paths ---------------------------------------------------------------------------


def test_relative_image_paths_are_resolved_against_the_manifest_folder(tmp_path):
    folder = tmp_path / "bench" / "meta"
    folder.mkdir(parents=True)
    rows = [
        {"id": "rel", "ref_image": "img/a.png", "edited_image": "../b.png"},
        {"id": "abs", "ref_image": "/data/a.png", "edited_image": "gs://bucket/b.png"},
        {"id": "none", "ref_image": None, "edited_image": ""},
    ]
    structs = [{"id": "struct", "ref_image": {"bytes": None, "path": "c.png"},
                "edited_image": {"bytes": None, "path": "/x/d.png"}}]
    path = folder / "m.jsonl"
    _write_jsonl(path, rows)
    _write_jsonl(folder / "structs.jsonl", structs)
    splits = plan_file(str(path))[1] + plan_file(str(folder / "structs.jsonl"))[1]
    got = {record_id: row for record_id, row in
           _all_rows(splits, "id", image_columns=("ref_image", "edited_image"))}
    assert got["rel"]["ref_image"] == str(folder / "img" / "a.png")
    assert got["rel"]["edited_image"] == str(tmp_path / "bench" / "b.png")
    assert (got["abs"]["ref_image"], got["abs"]["edited_image"]) == ("/data/a.png", "gs://bucket/b.png")
    assert got["struct"]["ref_image"] == {"bytes": None, "path": str(folder / "c.png")}
    assert got["struct"]["edited_image"]["path"] == "/x/d.png"
    assert (got["none"]["ref_image"], got["none"]["edited_image"]) == (None, "")
    assert set(got["rel"]) == set(rows[0])  # no extra keys
    unresolved = {record_id: row for record_id, row in
                  _all_rows(splits, "id", image_columns=("ref_image",), resolve_relative=False)}
    assert unresolved["rel"]["ref_image"] == "img/a.png"
    plain = {record_id: row for record_id, row in _all_rows(splits, "id")}
    assert plain["rel"]["ref_image"] == "img/a.png"  # only the named image columns are touched


def test_relative_paths_in_parquet_and_structs_with_bytes(tmp_path):
    path = tmp_path / "pairs.parquet"
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "ref_image": pa.array([{"bytes": b"PNG", "path": "kept.png"}, {"bytes": None, "path": "sub/r.png"}],
                              type=image),
        "edited_image": ["e.png", "s3://b/e.png"],
    }), str(path))
    rows = [row for _, row in _all_rows(plan_file(str(path))[1], image_columns=("ref_image", "edited_image"))]
    assert rows[0]["ref_image"] == {"bytes": b"PNG", "path": "kept.png"}  # bytes are what is read
    assert rows[1]["ref_image"]["path"] == str(tmp_path / "sub" / "r.png")
    assert [row["edited_image"] for row in rows] == [str(tmp_path / "e.png"), "s3://b/e.png"]


# --- 5. linear reading of big row groups -----------------------------------------------------------


def test_a_big_row_group_is_one_streamed_split_read_once(tmp_path, monkeypatch):
    path = str(tmp_path / "big.parquet")
    count = 5000
    pq.write_table(pa.table({"id": list(range(count))}), path, row_group_size=count)
    schema, splits = plan_file(path, split_rows=256)
    assert len(splits) == 1 and splits[0].num_rows == count
    decoded = []
    real_iter = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real_iter(self, *args, **kwargs):
            decoded.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    read = ReadInputSplit("id").process(splits[0])
    first = [next(read) for _ in range(3)]  # streamed: the first rows come before the group is decoded
    assert sum(decoded) <= input_split.READ_BATCH_ROWS and [record_id for record_id, _ in first] == [0, 1, 2]
    rest = list(read)
    assert [record_id for record_id, _ in first + rest] == list(range(count))
    assert sum(decoded) == count  # every row decoded exactly once


def test_hand_made_splits_inside_a_group_still_read_their_rows(tmp_path):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"id": list(range(50))}), path, row_group_size=20)
    split = input_split.InputSplit(path, 1, 5, 15, 25)
    assert [record_id for record_id, _ in _rows(split, "id")] == list(range(25, 35))


def test_the_job_scores_a_dataset_folder(tmp_path):
    """``--input ds_hf/``: the Parquet files under its data/ are the input, every row scored once."""
    import contextlib
    import io

    from lpips_pipe.pipeline import cli as job
    from tests.data_helpers import read_kind, small_pairs

    table = small_pairs(6, size=32)
    folder = tmp_path / "ds_hf"
    (folder / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, 4), str(folder / "data" / "train-00000-of-00002.parquet"))
    pq.write_table(table.slice(4), str(folder / "data" / "train-00001-of-00002.parquet"))
    (folder / "README.md").write_text("---\nconfigs: []\n---\n")
    (folder / "dataset_info.json").write_text("{}")
    out = str(tmp_path / "out")
    with contextlib.redirect_stdout(io.StringIO()):
        assert job.main(["--input", str(folder), "--output", out, "--num_shards", "1", "--no_report",
                         "--device", "cpu"]) == 0
    scores = read_kind(out, "scores")
    assert sorted(scores.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    assert {os.path.basename(path) for path in scores.column("source_file").to_pylist()} == {
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"}
