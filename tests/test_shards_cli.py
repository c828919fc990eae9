"""WebDataset tar shards end to end (the real job and model): a shard set built in the test (PNG and JPEG
members, several boxes, keys with a directory part, a gzip shard, one bad sample of each kind, a cut shard)
scores exactly as the same rows in Parquet; every bad sample is an error row with its reason and its members;
the report page draws its tiles from the shards; the filter splits the shards into kept / rejected / unscored
shards; ``ReadPairs('shards/*.tar')`` in a user's pipeline; shards and Parquet in one ``--input``; resume
(``--skip_existing``) and restart (a kill mid-run, then the same command) on shards."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import cli, runners
from lpips_pipe.pipeline.filter import command
from tests.shard_helpers import build_shard_set, shard_members
from lpips_pipe.transforms.inputs import ids as record_ids
from lpips_pipe.transforms.inputs import webdataset
from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import layout

SCORE_COLUMNS = ("lpips", "measured_fraction", "mask_mode", "width", "height", "net", "lpips_version",
                 "weights_sha256")
PASS_THROUGH = ("edit", "coords", "quality", "weight", "meta")
ROOT = Path(__file__).resolve().parents[1]


def _read(out: Path, kind: str) -> pa.Table:
    return pq.read_table(str(out / kind))


def _by_id(table: pa.Table) -> dict:
    return {row["id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The shard set scored (with the report page), and its good rows scored from Parquet."""
    root = tmp_path_factory.mktemp("shard-runs")
    shards = build_shard_set(root)
    parquet_out, shard_out = root / "parquet-out", root / "shard-out"
    assert cli.main(["--input", str(shards.parquet), "--output", str(parquet_out), "--no_report"]) == 0
    code = cli.main(["--input", shards.pattern, "--output", str(shard_out), "--max_image_bytes",
                     str(shards.max_image_bytes), "--report_k", "3"])
    assert code == 0
    return {"shards": shards, "root": root, "parquet": parquet_out, "out": shard_out,
            "baseline": _by_id(_read(parquet_out, layout.SCORES))}


def test_shards_score_exactly_as_the_same_rows_in_parquet(runs):
    scores = _by_id(_read(runs["out"], layout.SCORES))
    baseline = runs["baseline"]
    assert sorted(baseline) == sorted(row["id"] for row in runs["shards"].good)
    assert set(baseline) <= set(scores)  # (that bad samples are not scored: the next test)
    for ident, theirs in baseline.items():
        row = scores[ident]
        for column in SCORE_COLUMNS + PASS_THROUGH:
            assert row[column] == theirs[column], (ident, column)  # lpips bit-identical
        assert row["source_file"].endswith(layout.TAR_SUFFIXES)
    kinds = {scores[ident]["source_file"].rsplit("/", 1)[-1] for ident in baseline}
    assert kinds == {"a-000.tar", "b-001.tar.gz", "c-002.tar", "d-003.tar"}
    assert any(len(scores[ident]["coords"]) == 3 for ident in baseline)  # several boxes


def test_every_bad_sample_is_an_error_row_with_its_reason_and_members(runs):
    shards = runs["shards"]
    errors = _by_id(_read(runs["out"], layout.ERRORS))
    assert not set(shards.bad) & set(_by_id(_read(runs["out"], layout.SCORES)))
    assert set(errors) == set(shards.bad)
    for ident, (stage, kind) in shards.bad.items():
        row = errors[ident]
        assert (row["error_stage"], row["error_type"]) == (stage, kind), (ident, row["error_message"])
        assert row["error_message"] and "\n" not in row["error_message"]
        for column, data in shards.bad_members.get(ident, {}).items():
            assert row[column] == data, (ident, column)  # a fixed rerun loses nothing
    assert "--max_image_bytes" in errors["bad-big"]["error_message"]
    assert "set-c/double.ref_image.jpg" in errors["bad-double"]["error_message"]
    # every sample exactly once, by where it came from
    scores = _read(runs["out"], layout.SCORES)
    origins = [(row["source_file"], row["source_row"]) for row in scores.to_pylist() + list(errors.values())]
    per_file = collections.Counter(path.rsplit("/", 1)[-1] for path, _ in origins)
    assert len(set(origins)) == len(origins) == 35
    assert per_file == {"a-000.tar": 10, "b-001.tar.gz": 6, "c-002.tar": 14, "d-003.tar": 5}
    report = json.loads((runs["out"] / layout.REPORT / layout.REPORT_JSON).read_text())
    assert report["counts"]["errors"] == len(shards.bad)


def test_the_report_page_draws_tiles_from_the_shards(runs):
    report = json.loads((runs["out"] / layout.REPORT / layout.REPORT_JSON).read_text())
    score_tiles = [tile for gallery in report["galleries"] if gallery["name"] != "errors"
                   for tile in gallery["tiles"]]
    assert score_tiles
    for tile in score_tiles:
        assert tile["source_file"].endswith(layout.TAR_SUFFIXES)
        assert set(tile["images"]) == set(layout.REPORT_TILE_PARTS), tile
        assert not [note for note in tile["notes"] if "unavailable" in note or "differently" in note], tile
        for src in tile["images"].values():
            assert (runs["out"] / layout.REPORT / src).is_file()


def test_the_filter_splits_shards_into_kept_rejected_and_unscored_shards(runs, tmp_path, capsys):
    shards = runs["shards"]
    scores = _by_id(_read(runs["out"], layout.SCORES))
    threshold = sorted(row["lpips"] for row in scores.values())[len(scores) // 2]
    out = tmp_path / "filtered"
    assert command.main(["--scores", str(runs["out"]), "--output", str(out), "--threshold", str(threshold),
                            "--source", str(shards.folder), "--no_report"]) == 0
    assert "source rows: kept" in capsys.readouterr().out
    files = sorted(path.name for path in shards.folder.iterdir())
    expected = {"kept_source": {i for i, row in scores.items() if row["lpips"] <= threshold},
                "rejected_source": {i for i, row in scores.items() if row["lpips"] > threshold},
                "unscored_source": set(shards.bad)}
    for name, wanted in expected.items():
        got_ids: set = set()
        for index, source in enumerate(files):
            part = out / name / layout.shard_name(index, len(files), suffix=layout.TAR_SUFFIX)
            assert part.is_file(), part
            try:
                plan = webdataset.plan_shard(str(part))
            except ValueError:  # no sample went there: an empty archive
                assert not shard_members(part)
                continue
            ids = record_ids.input_ids(str(part), layout.ID_FIELD, plan.rows, plan.splits).to_pylist()
            got_ids.update(ids)
            source_members = dict(shard_members(shards.folder / source))
            for member, data in shard_members(part):  # copied whole, byte for byte
                assert source_members[member] == data, (part, member)
        assert got_ids == wanted, name
    # the kept shard is a shard the job reads again: its rows score as they did
    kept_again = tmp_path / "kept-again"
    pattern = str(out / "kept_source" / "*.tar*")
    assert cli.main(["--input", pattern, "--output", str(kept_again), "--no_report"]) == 0
    again = _by_id(_read(kept_again, layout.SCORES))
    assert sorted(again) == sorted(expected["kept_source"])
    assert all(again[i]["lpips"] == scores[i]["lpips"] for i in again)


def test_read_pairs_of_shards_in_a_users_pipeline(runs, tmp_path):
    from lpips_pipe import ReadPairs, ScoreLPIPS, WriteScores

    shards = runs["shards"]
    pattern = str(shards.folder / "[ab]-*.tar*")
    read = ReadPairs(pattern, id_column="id")
    assert {"ref_image", "edited_image", "coords", "meta"} <= set(read.schema.names)
    out = tmp_path / "user"
    with beam.Pipeline() as pipeline:
        _ = pipeline | read | ScoreLPIPS(device="cpu") | WriteScores(str(out))
    scores = _by_id(_read(out, layout.SCORES))
    assert sorted(scores) == sorted(row["id"] for row in shards.good[:16])
    assert all(scores[i]["lpips"] == runs["baseline"][i]["lpips"] for i in scores)


def test_shards_and_parquet_in_one_input(runs, tmp_path):
    shards = runs["shards"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(shards.folder / "a-000.tar", mixed / "a-000.tar")
    rest = pa.Table.from_pylist(shards.good[10:])
    pq.write_table(rest, mixed / "rest.parquet")
    out = tmp_path / "out"
    assert cli.main(["--input", str(mixed / "*"), "--output", str(out), "--no_report"]) == 0
    scores = _by_id(_read(out, layout.SCORES))
    assert sorted(scores) == sorted(runs["baseline"])
    for ident, row in scores.items():
        assert all(row[c] == runs["baseline"][ident][c] for c in SCORE_COLUMNS + PASS_THROUGH), ident


def _fail_on_call(monkeypatch, owner, name: str, call: int) -> None:
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        result = original(*args, **kwargs)
        if calls[0] == call:
            raise RuntimeError(f"killed after {name} #{call}")
        return result

    monkeypatch.setattr(owner, name, wrapper)


def test_restart_and_resume_on_shards(runs, tmp_path, monkeypatch, capsys):
    shards = runs["shards"]
    expected = {**{i: "scores" for i in runs["baseline"]}, **{i: "errors" for i in shards.bad}}
    out = tmp_path / "out"
    argv = ["--input", shards.pattern, "--output", str(out), "--no_report", "--max_image_bytes",
            str(shards.max_image_bytes)]
    with monkeypatch.context() as patched:  # killed after its second commit (a split finished)
        _fail_on_call(patched, ledger, "write_commit", 2)
        assert cli.main(argv) == 1
    capsys.readouterr()
    assert cli.main(argv) == 0  # the same command
    stdout = capsys.readouterr().out
    kept = int(stdout.split("resumed: kept ")[1].split()[0])
    scored = int(stdout.split("scored ")[1].split(",")[0])
    assert kept > 0 and scored + kept <= 35
    scores, errors = _read(out, layout.SCORES), _read(out, layout.ERRORS)
    origins = [(r["source_file"], r["source_row"]) for r in scores.to_pylist() + errors.to_pylist()]
    assert len(origins) == len(set(origins)) == 35
    got = {**{i: "scores" for i in scores.column("id").to_pylist()}, **{i: "errors" for i in errors.column("id").to_pylist()}}
    assert got == expected
    assert all(row["lpips"] == runs["baseline"][row["id"]]["lpips"] for row in scores.to_pylist())
    # resume from that output into another: only the error rows are tried again
    resumed = tmp_path / "resumed"
    assert cli.main([*argv[:3], str(resumed), "--no_report", "--max_image_bytes", str(shards.max_image_bytes),
                     "--skip_existing", str(out)]) == 3  # ran; every row it tried failed again (exit 3)
    stdout = capsys.readouterr().out
    assert f"skipped {len(runs['baseline'])}" in stdout, stdout
    assert _read(resumed, layout.SCORES).num_rows == 0
    assert sorted(_read(resumed, layout.ERRORS).column("id").to_pylist()) == sorted(shards.bad)


@pytest.mark.skipif(runners.prism_binary() is None, reason=f"Prism is not built here ({runners.SETUP_STEP})")
def test_a_stream_of_shards_scores_each_sample_once_and_waits_for_half_written_ones(runs, tmp_path):
    """--streaming on Prism over ``in/*.tar*``: a shard there at the start, one written in two halves (not read
    while half-written), one renamed in (gzip); every sample once, the same scores as in Parquet."""
    shards = runs["shards"]
    incoming = tmp_path / "in"
    incoming.mkdir()
    shutil.copy(shards.folder / "a-000.tar", incoming / "a.tar")
    whole = tmp_path / "b.full"
    webdataset.write_shard(str(whole), shards.good[10:13], keys=["b/0", "b/1", "b/2"])
    staged = tmp_path / "c.tar.gz"
    webdataset.write_shard(str(staged), shards.good[13:16], keys=["c/0", "c/1", "c/2"])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "--streaming", "--input", str(incoming / "*.tar*"), "--output",
               str(out), "--watch_interval", "2", "--no_report", "--watch_stop_after", "50"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)

    def scored() -> list:
        folder = out / layout.SCORES
        return [value for path in sorted(folder.glob("*.parquet")) for value in
                pq.read_table(path).column("id").to_pylist()] if folder.exists() else []

    try:
        assert _wait_for(lambda: len(scored()) >= 10, 40), "the first shard was not scored while the job ran"
        data = whole.read_bytes()
        (incoming / "b.tar").write_bytes(data[: len(data) // 2])  # half written: must wait
        time.sleep(6)
        assert not any(ident in scored() for ident in ("g010", "g011", "g012"))
        (incoming / "b.tar").write_bytes(data)
        os.rename(staged, incoming / "c.tar.gz")  # renamed in whole
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    ids = scored()
    assert sorted(ids) == sorted(row["id"] for row in shards.good[:16]), output  # each sample once
    scores = _by_id(_read(out, layout.SCORES))
    assert all(scores[i]["lpips"] == runs["baseline"][i]["lpips"] for i in ids)


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False
