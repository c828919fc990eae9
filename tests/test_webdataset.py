"""WebDataset tar shards as inputs (transforms.webdataset), without the model: keys and fields, planning (schema,
splits at sample starts, gzip), reading rows as a Parquet file of the same rows gives them, one sample held at
a time, every bad sample carried as a reason, resume ids, reading rows back (the report), copying samples (the
filter), and when a stream takes a shard as complete."""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline.report import source_rows
from lpips_pipe.pipeline.streaming import NewFiles
from tests.shard_helpers import Entry, build_shard_set, good_rows, sample_entries, shard_members, write_tar
from lpips_pipe.transforms.inputs import webdataset
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.inputs import ids
from lpips_pipe.transforms.inputs.split import InputError, common_schema
from lpips_pipe.transforms.inputs.files import (ReadInputSplit, input_format, plan_file, plan_files, read_footer,
                                                read_split_column)

IMAGES = ("ref_image", "edited_image")


def _rows(splits, **kwargs):
    reader = ReadInputSplit("id", IMAGES, with_source=True, **kwargs)
    return [row for split in splits for _, row in reader.process(split)]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return build_shard_set(tmp_path_factory.mktemp("shards"))


# --- keys, fields, formats --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("000123.ref_image.jpg", ("000123", "ref_image.jpg")),
    ("a/b/000123.ref_image.jpg", ("a/b/000123", "ref_image.jpg")),  # the directory part belongs to the key
    ("a.b/000123.edited_image.png", ("a.b/000123", "edited_image.png")),  # dots in folders are not the cut
    ("x/000123.json", ("x/000123", "json")),
    ("000123.seg.mask.png", ("000123", "seg.mask.png")),
    ("README", None), ("a/.hidden.png", None), ("a/b/", None),
])
def test_member_keys_follow_the_webdataset_convention(name, expected):
    assert webdataset.member_key(name) == expected


def test_fields_are_the_names_between_key_and_extension():
    assert webdataset.field_of("ref_image.jpg") == "ref_image"
    assert webdataset.field_of("src.png") == "src"
    assert webdataset.field_of("json") == "json"
    assert webdataset.field_of("seg.mask.png") == "seg"
    for ignored in ("txt", "cls", "ref_image", "json.gz", "id.txt"):
        assert webdataset.field_of(ignored) is None, ignored
    assert [input_format(p) for p in ("a.tar", "a.TAR.GZ", "a.tgz", "a.parquet", "a.jsonl")] == \
        ["tar", "tar", "tar", "parquet", "jsonl"]


# --- planning and reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_shard_reads_back_as_the_same_rows_in_parquet(tmp_path, suffix):
    rows = good_rows(9)
    shard = tmp_path / f"pairs{suffix}"
    webdataset.write_shard(str(shard), rows, keys=[f"part/{index:04d}" for index in range(len(rows))])
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    schema, splits = plan_file(str(shard))
    parquet_schema, parquet_splits = plan_file(str(parquet))
    assert {field.name: field.type for field in schema} == {field.name: field.type for field in parquet_schema}
    common_schema([(str(parquet), parquet_schema), (str(shard), schema)])  # a mixed --input shares columns
    from_shard, from_parquet = _rows(splits), _rows(parquet_splits)
    assert [row[layout.SOURCE_KEY] for row in from_shard] == [(str(shard), index) for index in range(len(rows))]
    for mine, theirs in zip(from_shard, from_parquet):
        assert {k: v for k, v in mine.items() if k != layout.SOURCE_KEY} == \
            {k: v for k, v in theirs.items() if k != layout.SOURCE_KEY}
        assert layout.READ_PROBLEM_KEY not in mine
    assert read_footer(str(shard))[1] == [len(rows)]


def test_a_tar_is_cut_into_splits_at_sample_starts_and_each_reads_only_its_own(tmp_path, monkeypatch):
    rows = good_rows(10)
    shard = tmp_path / "pairs.tar"
    webdataset.write_shard(str(shard), rows)
    plan = webdataset.plan_shard(str(shard), split_rows=3)
    assert [(s.first_row, s.num_rows) for s in plan.splits] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert all(s.byte_start % 512 == 0 for s in plan.splits) and plan.splits[0].byte_start == 0
    reads = []
    original = webdataset._read_data
    monkeypatch.setattr(webdataset, "_read_data", lambda tar, info: reads.append(info.name) or original(tar, info))
    second = _rows([plan.splits[1]])
    assert [row["id"] for row in second] == [rows[i]["id"] for i in (3, 4, 5)]
    assert {name.split(".")[0] for name in reads} == {"000003", "000004", "000005"}  # nothing else read
    assert [row["id"] for row in _rows(plan.splits)] == [row["id"] for row in rows]
    gz = tmp_path / "pairs.tar.gz"
    webdataset.write_shard(str(gz), rows)
    assert len(webdataset.plan_shard(str(gz), split_rows=3).splits) == 1  # no seeking inside gzip


def test_the_id_is_the_json_id_else_the_sample_key(tmp_path):
    rows = good_rows(3)
    entries = [entry for index, row in enumerate(rows) for entry in sample_entries(f"k/{index}", row)]
    keyed = [e for e in sample_entries("k/3", {k: v for k, v in rows[0].items() if k != "id"})]
    write_tar(tmp_path / "mixed.tar", entries + keyed)
    schema, splits = plan_file(str(tmp_path / "mixed.tar"))
    assert schema.field("id").type == pa.string() and schema.names[0] == "id"
    assert [row["id"] for row in _rows(splits)] == ["g000", "g001", "g002", "k/3"]
    numbered = [{**row, "id": 100 + index} for index, row in enumerate(rows)]
    webdataset.write_shard(str(tmp_path / "int.tar"), numbered)
    schema, splits = plan_file(str(tmp_path / "int.tar"))
    assert schema.field("id").type == pa.int64()
    assert [row["id"] for row in _rows(splits)] == [100, 101, 102]
    # numeric json ids stay numbers (as in a Parquet file of the same rows) when the only samples without one
    # have no json object: those take their key when ids are text, else null (they are error rows anyway)
    broken = [*sample_entries("k/x", numbered[0])[1:], Entry("k/y.json", b"{not json"),
              *sample_entries("k/y", numbered[1])[1:]]
    write_tar(tmp_path / "int-broken.tar", [entry for index, row in enumerate(numbered)
                                            for entry in sample_entries(f"n/{index}", row)] + broken)
    schema, splits = plan_file(str(tmp_path / "int-broken.tar"))
    assert schema.field("id").type == pa.int64()
    assert [row["id"] for row in _rows(splits)] == [100, 101, 102, None, None]
    no_ids = [{k: v for k, v in row.items() if k != "id"} for row in rows]
    webdataset.write_shard(str(tmp_path / "keys.tar"), no_ids, keys=["a/x", "a/y", "b/z"])
    assert [row["id"] for row in _rows(plan_file(str(tmp_path / "keys.tar"))[1])] == ["a/x", "a/y", "b/z"]


def test_ref_column_src_reads_the_src_members(tmp_path):
    rows = [{"id": row["id"], "src": row["ref_image"], "edited_image": row["edited_image"], "coords": row["coords"]}
            for row in good_rows(2)]
    webdataset.write_shard(str(tmp_path / "src.tar"), rows)
    schema, splits = plan_file(str(tmp_path / "src.tar"))
    assert schema.field("src").type == pa.binary()
    got = list(ReadInputSplit("id", ("src", "edited_image")).process(splits[0]))
    assert [row["src"] for _, row in got] == [row["src"] for row in rows]
    assert all(layout.READ_PROBLEM_KEY not in row for _, row in got)


def test_a_json_key_changing_type_is_refused_at_planning_naming_it(tmp_path):
    rows = good_rows(2)
    rows[1]["quality"] = "high"
    webdataset.write_shard(str(tmp_path / "bad.tar"), rows)
    with pytest.raises(InputError) as error:
        plan_file(str(tmp_path / "bad.tar"))
    assert "quality" in str(error.value) and str(tmp_path / "bad.tar") in str(error.value)


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100, b"\x1f\x8b garbage gzip" * 10])
def test_a_file_that_is_not_a_shard_is_refused_at_planning(tmp_path, content):
    path = tmp_path / "junk.tar"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        read_footer(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_shard_without_samples_is_refused(tmp_path):
    write_tar(tmp_path / "empty.tar", [Entry("README", b"x"), Entry("LICENSE", b"y")])  # no key: not samples
    with pytest.raises(InputError, match="holds no sample"):
        plan_file(str(tmp_path / "empty.tar"))
    write_tar(tmp_path / "caption.tar", [Entry("README", b"x"), Entry("notes.txt", b"y")])  # a key: a sample
    schema, splits = plan_file(str(tmp_path / "caption.tar"))
    assert schema.names == ["id"] and [row["id"] for row in _rows(splits)] == ["notes"]


# --- bad samples --------------------------------------------------------------------------------------------


def test_every_bad_sample_is_a_row_with_its_reason_and_its_members(shard_set, tmp_path):
    before = set(os.listdir(tmp_path.parent)) | set(os.listdir(shard_set.folder.parent))
    _, splits = plan_files(sorted(str(p) for p in shard_set.folder.iterdir()))
    rows = _rows(splits, max_image_bytes=shard_set.max_image_bytes)
    assert len(rows) == 10 + 6 + 14 + 5  # every sample is a row, bad ones too
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows)
    for ident, (stage, kind) in shard_set.bad.items():
        row = by_id[ident]
        if kind == "MissingCoords":  # no json: coords are null, the scoring step's own rule decides
            assert layout.READ_PROBLEM_KEY not in row and row["coords"] is None
            continue
        problem = row[layout.READ_PROBLEM_KEY]
        assert problem[:2] == (stage, kind), (ident, problem)
        assert problem[2] and "\n" not in problem[2]
        for column, data in shard_set.bad_members.get(ident, {}).items():
            assert row[column] == data, (ident, column)
    good = {row["id"] for row in shard_set.good}
    assert all(layout.READ_PROBLEM_KEY not in by_id[ident] for ident in good)
    assert "also: MissingImage" in by_id["bad-symlink"][layout.READ_PROBLEM_KEY][2]
    assert "/etc/passwd" in by_id["bad-symlink"][layout.READ_PROBLEM_KEY][2]
    after = set(os.listdir(tmp_path.parent)) | set(os.listdir(shard_set.folder.parent))
    assert after == before  # nothing was extracted anywhere


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    rows = good_rows(4)
    shard = tmp_path / "cut.tar"
    webdataset.write_shard(str(shard), rows)
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    third = [m for m in members if m.name.startswith("000002.")]
    # cut inside sample 2's second member: samples 0 and 1 whole, sample 2 cut, sample 3 gone
    shard.write_bytes(data[: third[1].offset_data + 100])
    plan = webdataset.plan_shard(str(shard))
    assert plan.rows == 3 and not plan.complete
    got = _rows(plan.splits)
    assert [row.get(layout.READ_PROBLEM_KEY, (None, None))[1] for row in got] == [None, None, "TruncatedShard"]
    assert got[2]["ref_image"] == rows[2]["ref_image"]  # what was whole before the cut is kept
    # cut exactly between samples (no end-of-archive blocks): the last sample may be incomplete
    boundary = [m for m in members if m.name.startswith("000003.")][0].offset
    shard.write_bytes(data[:boundary])
    got = _rows(webdataset.plan_shard(str(shard)).splits)
    assert len(got) == 3 and got[2][layout.READ_PROBLEM_KEY][1] == "TruncatedShard"
    assert "end-of-archive" in got[2][layout.READ_PROBLEM_KEY][2]


def test_a_member_over_the_limit_is_never_read(tmp_path, monkeypatch):
    rows = good_rows(2)
    rows[1]["ref_image"] = os.urandom(5 << 20)
    webdataset.write_shard(str(tmp_path / "big.tar"), rows)
    _, splits = plan_file(str(tmp_path / "big.tar"))
    sizes = []
    original = webdataset._read_data
    monkeypatch.setattr(webdataset, "_read_data", lambda tar, info: sizes.append(info.size) or original(tar, info))
    got = _rows(splits, max_image_bytes=1 << 20)
    assert max(sizes) < 1 << 20
    assert got[1][layout.READ_PROBLEM_KEY][1] == "ImageTooLarge" and got[1]["ref_image"] is None
    assert "--max_image_bytes" in got[1][layout.READ_PROBLEM_KEY][2]


# --- memory -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_reading_a_shard_holds_one_sample_at_a_time(tmp_path, suffix):
    """12 samples of two 3 MB members (a 72 MB shard): the reader's peak stays near one sample's 6 MB."""
    member = 3 << 20
    rng = np.random.default_rng(0)
    rows = [{"id": f"s{index}", "ref_image": rng.bytes(member), "edited_image": rng.bytes(member),
             "coords": [[0, 0, 4, 4]]} for index in range(12)]
    shard = tmp_path / f"big{suffix}"
    webdataset.write_shard(str(shard), rows)
    del rows
    _, splits = plan_file(str(shard))
    reader = ReadInputSplit("id", IMAGES, with_source=True)
    tracemalloc.start()
    try:
        seen = 0
        for split in splits:  # a .tar of 72 MB is two splits (SPLIT_BYTES), a .tar.gz one
            for _, row in reader.process(split):
                assert len(row["ref_image"]) == member
                seen += 1
                del row
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 12
    assert peak < 3 * 2 * member, f"peak {peak / 2**20:.1f} MB for a {12 * 2 * member / 2**20:.0f} MB shard"


def test_planning_reads_no_image_bytes(tmp_path, monkeypatch):
    webdataset.write_shard(str(tmp_path / "p.tar"), good_rows(5))
    reads = []
    original = webdataset._read_data
    monkeypatch.setattr(webdataset, "_read_data", lambda tar, info: reads.append(info.name) or original(tar, info))
    webdataset.plan_shard(str(tmp_path / "p.tar"))
    assert reads and all(name.endswith(".json") for name in reads)


# --- resume, the report, the filter, streams ---------------------------------------------------------------


def test_resume_marks_samples_by_id_and_skipped_samples_are_not_read(tmp_path, monkeypatch):
    rows = good_rows(6)
    shard = str(tmp_path / "r.tar")
    webdataset.write_shard(shard, rows)
    _, splits = plan_file(shard, split_rows=4)
    assert read_split_column(splits[1], "id").to_pylist() == ["g004", "g005"]
    done = pa.chunked_array([pa.array(["g001", "g004", "zzz"])])
    planned, skipped = ids.plan_skips(splits, "id", done)
    assert skipped == 2
    reads = []
    original = webdataset._read_data
    monkeypatch.setattr(webdataset, "_read_data", lambda tar, info: reads.append(info.name) or original(tar, info))
    got = _rows(planned)
    assert [row["id"] for row in got] == ["g000", "g002", "g003", "g005"]
    assert not any(name.startswith(("000001.", "000004.")) for name in reads)


def test_the_report_reads_a_sample_back_by_file_and_row(shard_set):
    path = str(shard_set.folder / "a-000.tar")
    gz = str(shard_set.folder / "b-001.tar.gz")
    found = source_rows.fetch_rows([(path, 3), (path, 0), (gz, 5), (path, 99)], ["id", "ref_image", "coords"],
                                   ["ref_image"])
    assert found[(path, 3)]["id"] == "g003" and found[(path, 3)]["ref_image"] == shard_set.good[3]["ref_image"]
    assert found[(path, 0)]["coords"] == shard_set.good[0]["coords"]
    assert found[(gz, 5)]["id"] == "g015" and set(found[(gz, 5)]) == {"id", "ref_image", "coords"}
    assert isinstance(found[(path, 99)], str) and "no row 99" in found[(path, 99)]


def test_copying_samples_copies_their_members_whole(shard_set, tmp_path):
    path = str(shard_set.folder / "c-002.tar")
    plan = webdataset.plan_shard(path)
    targets = {"even": str(tmp_path / "even.tar"), "odd": str(tmp_path / "odd.tar")}
    counts = webdataset.copy_samples(plan, lambda index: "odd" if index % 2 else "even", targets)
    assert counts == {"even": 7, "odd": 7}
    source = shard_members(shard_set.folder / "c-002.tar")
    copies = shard_members(tmp_path / "even.tar") + shard_members(tmp_path / "odd.tar")
    keyed = [(name, data) for name, data in source if webdataset.member_key(name)]
    assert sorted(copies) == sorted(keyed)  # every sample's members, byte for byte (links)
    with tarfile.open(tmp_path / "odd.tar") as tar:
        kinds = {info.name: info.type for info in tar}
    assert kinds.get("set-c/link.ref_image.png") == tarfile.SYMTYPE
    assert webdataset.plan_shard(targets["odd"]).rows == 7


def test_a_stream_waits_for_a_shard_until_its_end_of_archive_blocks(tmp_path):
    rows = good_rows(3)
    full = tmp_path / "full.tar"
    webdataset.write_shard(str(full), rows)
    data = full.read_bytes()
    landing = tmp_path / "landing.tar"
    end = webdataset.plan_shard(str(full)).splits[-1].byte_stop
    for cut in (700, len(data) // 2, end):  # inside a member, mid-shard, every member but no end blocks
        landing.write_bytes(data[:cut])
        assert not NewFiles.complete(str(landing)), cut
    landing.write_bytes(data)
    assert NewFiles.complete(str(landing))
    gz = tmp_path / "full.tar.gz"
    webdataset.write_shard(str(gz), rows)
    gz_data = gz.read_bytes()
    (tmp_path / "half.tar.gz").write_bytes(gz_data[: len(gz_data) // 2])
    assert NewFiles.complete(str(gz)) and not NewFiles.complete(str(tmp_path / "half.tar.gz"))


def test_a_pax_global_header_keeps_a_shard_in_one_split(tmp_path):
    path = tmp_path / "global.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "made by a tool"}) as tar:
        for row_index, row in enumerate(good_rows(4)):
            for entry in sample_entries(f"{row_index:04d}", row):
                info = tarfile.TarInfo(entry.name)
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    plan = webdataset.plan_shard(str(path), split_rows=2)
    assert len(plan.splits) == 1 and plan.rows == 4
    assert [row["id"] for row in _rows(plan.splits)] == ["g000", "g001", "g002", "g003"]

