"""lpips-pipe-filter on real scores: every row in exactly one output, z-scores and tiers as defined."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline.filter import command
from lpips_pipe.pipeline import cli as job
from tests.data_helpers import demo_table, read_kind, write_kind
from lpips_pipe.transforms.outputs import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scores(tmp_path_factory) -> pa.Table:
    """Scores of 16 real-photo pairs (4 photos x 4 edits, 64x64), from the stage itself."""
    work = tmp_path_factory.mktemp("scored")
    pq.write_table(demo_table(size=64, with_bad_rows=False).slice(0, 16), str(work / "pairs.parquet"))
    assert job.main(["--input", str(work / "pairs.parquet"), "--output", str(work / "out"), "--num_shards", "1",
                     "--no_report"]) == 0
    table = read_kind(str(work / "out"), layout.SCORES)
    assert table.num_rows == 16 and len(set(table.column("edit").to_pylist())) == 4
    return table


def _write_parts(table: pa.Table, directory, cuts=()) -> str:
    """``table`` as a run's ``DIR/scores/part-*.parquet`` shards; returns the run directory (what --scores takes)."""
    bounds = [0, *cuts, table.num_rows]
    write_kind(str(directory), layout.SCORES,
               [table.slice(low, high - low) for low, high in zip(bounds, bounds[1:])])
    return str(directory)


def _outputs(out) -> tuple[pa.Table, pa.Table]:
    read = {}
    for name in ("kept", "rejected"):
        paths = sorted(glob.glob(os.path.join(out, f"{name}-*.parquet")))
        assert paths, f"no {name} file"
        read[name] = pa.concat_tables([pq.read_table(path) for path in paths])
    return read["kept"], read["rejected"]


def _by_id(table: pa.Table) -> dict:
    return {row["id"]: row for row in table.to_pylist()}


def _assert_partition(scores: pa.Table, kept: pa.Table, rejected: pa.Table) -> None:
    kept_ids, rejected_ids = kept.column("id").to_pylist(), rejected.column("id").to_pylist()
    assert not set(kept_ids) & set(rejected_ids)
    assert sorted(kept_ids + rejected_ids) == sorted(scores.column("id").to_pylist())
    source = _by_id(scores)
    for row in kept.to_pylist() + rejected.to_pylist():  # every column kept as it was
        assert {name: row[name] for name in scores.column_names} == source[row["id"]]


def test_threshold_split(scores, tmp_path, capsys):
    pattern = _write_parts(scores, tmp_path / "scores")
    threshold = float(np.median(scores.column("lpips").to_numpy()))
    out = str(tmp_path / "filtered")
    assert command.main(["--scores", pattern, "--output", out, "--threshold", str(threshold)]) == 0
    kept, rejected = _outputs(out)
    _assert_partition(scores, kept, rejected)
    assert kept.num_rows and rejected.num_rows
    assert all(value <= threshold for value in kept.column("lpips").to_pylist())
    assert all(value > threshold for value in rejected.column("lpips").to_pylist())
    assert set(kept.column("tier").to_pylist()) == {"pass"} and set(rejected.column("tier").to_pylist()) == {"fail"}
    values = scores.column("lpips").to_numpy()
    expected_z = dict(zip(scores.column("id").to_pylist(), (values - values.mean()) / values.std()))  # one group
    for row in kept.to_pylist() + rejected.to_pylist():
        assert row["lpips_z"] == pytest.approx(expected_z[row["id"]], abs=1e-9)
    assert f"kept {kept.num_rows}, rejected {rejected.num_rows}" in capsys.readouterr().out
    summary = json.loads((tmp_path / "filtered" / "filter.json").read_text())
    assert summary["threshold"] == threshold and summary["kept"] == kept.num_rows


@pytest.mark.parametrize("std,ddof", [(None, 0), ("sample", 1)])
def test_group_tiers_from_yaml_across_several_files(scores, tmp_path, std, ddof):
    pattern = _write_parts(scores, tmp_path / "scores", cuts=(5, 11))
    config = tmp_path / "tiers.yaml"
    config.write_text("tiers:\n  A: -0.8\n  B: 0.3\n  C: 1.2\nkeep: [A, B]\nrest: D\n")
    out = str(tmp_path / "filtered")
    argv = ["--scores", pattern, "--output", out, "--tiers", str(config), "--group_column", "edit"]
    assert command.main(argv + (["--std", std] if std else [])) == 0
    assert len(glob.glob(os.path.join(out, "kept-*-of-00003.parquet"))) == 3  # one pair per scores file
    assert len(glob.glob(os.path.join(out, "rejected-*-of-00003.parquet"))) == 3
    kept, rejected = _outputs(out)
    _assert_partition(scores, kept, rejected)
    # Independently: z within each edit type, then the first tier whose cut-off is >= z.
    rows = scores.to_pylist()
    expected = {}
    for edit in {row["edit"] for row in rows}:
        group = [row for row in rows if row["edit"] == edit]
        values = np.array([row["lpips"] for row in group])
        spread = values.std(ddof=ddof)
        for row, value in zip(group, values):
            z = 0.0 if values.max() == values.min() else (value - values.mean()) / spread
            tier = next((name for name, cut in (("A", -0.8), ("B", 0.3), ("C", 1.2)) if z <= cut), "D")
            expected[row["id"]] = (z, tier)
    got = {row["id"]: (row["lpips_z"], row["tier"]) for row in kept.to_pylist() + rejected.to_pylist()}
    for row_id, (z, tier) in expected.items():
        assert got[row_id][0] == pytest.approx(z, abs=1e-9) and got[row_id][1] == tier, row_id
    assert {row["id"] for row in kept.to_pylist()} == {i for i, (_, tier) in expected.items() if tier in "AB"}
    # local_invert changes only the box: 0.0 outside it for every photo, so no spread: z = 0, tier B.
    assert {got[i] for i in expected if "/local_invert/" in i} == {(0.0, "B")}


def test_single_row_group_and_missing_score(scores, tmp_path):
    template = scores.slice(0, 1).to_pylist()[0]
    extra = [{**template, "id": "solo", "edit": "solo", "lpips": 0.9},
             {**template, "id": "no_score", "edit": "global_jpeg", "lpips": None}]
    table = pa.concat_tables([scores, pa.Table.from_pylist(extra, schema=scores.schema)])
    config = tmp_path / "tiers.json"
    config.write_text(json.dumps({"tiers": {"A": -0.5, "B": 0.5}, "group_column": "edit"}))
    out = str(tmp_path / "filtered")
    assert command.main(["--scores", _write_parts(table, tmp_path / "s"), "--output", out,
                            "--tiers", str(config)]) == 0
    kept, rejected = _outputs(out)
    _assert_partition(table, kept, rejected)
    kept_rows, rejected_rows = _by_id(kept), _by_id(rejected)
    assert (kept_rows["solo"]["lpips_z"], kept_rows["solo"]["tier"]) == (0.0, "B")  # one row: at its own mean
    assert (rejected_rows["no_score"]["lpips_z"], rejected_rows["no_score"]["tier"]) == (None, "invalid")
    jpeg = [row["lpips"] for row in scores.to_pylist() if row["edit"] == "global_jpeg"]
    summary = json.loads((tmp_path / "filtered" / "filter.json").read_text())
    assert summary["groups"]["global_jpeg"]["rows"] == len(jpeg)  # the missing score is not in the statistics
    assert summary["groups"]["global_jpeg"]["mean"] == pytest.approx(np.mean(jpeg))
    assert summary["tier_rows"]["invalid"] == 1


def test_usage_mistakes_exit_2_and_write_nothing(scores, tmp_path, capsys):
    pattern = _write_parts(scores, tmp_path / "scores")
    out = tmp_path / "filtered"
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"tiers": {"A": 1, "B": 0}}')
    cases = [
        (["--scores", str(tmp_path / "none-*.parquet"), "--threshold", "0.1"], "no file matches"),
        (["--scores", pattern, "--threshold", "0.1", "--group_column", "prompt"], "group column 'prompt'"),
        (["--scores", pattern, "--tiers", str(bad_config)], "bad.json: tier cut-offs must strictly increase"),
        (["--scores", pattern, "--tiers", str(tmp_path / "missing.json")], "no such file"),
    ]
    for argv, message in cases:
        assert command.main([*argv, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:  # exactly one rule
        command.main(["--scores", pattern, "--output", str(out), "--threshold", "0.1", "--tiers", "x.json"])
    assert exit_info.value.code == 2
    assert command.main(["--scores", pattern, "--output", str(out), "--threshold", "0.1"]) == 0
    assert command.main(["--scores", pattern, "--output", str(out), "--threshold", "0.2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert command.main(["--scores", pattern, "--output", str(out), "--threshold", "0.2", "--overwrite"]) == 0


def test_python_m_pipeline_filter(scores, tmp_path):
    pattern = _write_parts(scores, tmp_path / "scores")
    out = str(tmp_path / "filtered")
    done = subprocess.run([sys.executable, "-m", "pipeline.filter", "--scores", pattern, "--output", out,
                           "--threshold", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kept, rejected = _outputs(out)
    assert kept.num_rows + rejected.num_rows == scores.num_rows
    assert "lpips-pipe-filter: 16 rows" in done.stdout


def _expected_tiers(scores: pa.Table, cuts, rest: str) -> dict:
    """Independently: z within each edit type (population std), then the first tier whose cut-off is >= z."""
    rows = scores.to_pylist()
    expected = {}
    for edit in {row["edit"] for row in rows}:
        group = [row for row in rows if row["edit"] == edit]
        values = np.array([row["lpips"] for row in group])
        for row, value in zip(group, values):
            z = 0.0 if values.max() == values.min() else (value - values.mean()) / values.std()
            expected[row["id"]] = (z, next((name for name, cut in cuts if z <= cut), rest))
    return expected


@pytest.mark.parametrize("where", ["config", "option"])
def test_tiers_with_an_absolute_ceiling(scores, tmp_path, capsys, where):
    """A row above the ceiling is rejected (tier above_ceiling) whatever its tier; the z-scores, and so every
    other row's tier, are those without the ceiling."""
    pattern = _write_parts(scores, tmp_path / "scores")
    values = np.sort(scores.column("lpips").to_numpy())
    ceiling = float(values[len(values) // 2])  # a real score: ties at the ceiling are kept
    cuts = (("A", 0.0), ("B", 1.0))
    expected = _expected_tiers(scores, cuts, "C")
    config = {"tiers": dict(cuts), "keep": ["A", "B"], "rest": "C", "group_column": "edit"}
    if where == "config":
        config["ceiling"] = ceiling
    else:
        config["ceiling"] = 99.0  # --max_lpips overrides the config's ceiling
    path = tmp_path / "tiers.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    out = str(tmp_path / "filtered")
    argv = ["--scores", pattern, "--output", out, "--tiers", str(path), "--no_report"]
    assert command.main(argv + (["--max_lpips", str(ceiling)] if where == "option" else [])) == 0
    kept, rejected = _outputs(out)
    _assert_partition(scores, kept, rejected)
    got = {row["id"]: (row["lpips_z"], row["tier"]) for row in kept.to_pylist() + rejected.to_pylist()}
    lpips = dict(zip(scores.column("id").to_pylist(), scores.column("lpips").to_pylist()))
    for row_id, (z, tier) in expected.items():
        want = "above_ceiling" if lpips[row_id] > ceiling else tier
        assert got[row_id][0] == pytest.approx(z, abs=1e-9) and got[row_id][1] == want, row_id
    want_kept = {i for i, (_, tier) in expected.items() if tier in ("A", "B") and lpips[i] <= ceiling}
    assert {row["id"] for row in kept.to_pylist()} == want_kept
    above = [i for i, (_, tier) in expected.items() if tier in ("A", "B") and lpips[i] > ceiling]
    assert above, "the data must have tier A/B rows above the ceiling for this test to mean anything"
    summary = json.loads((tmp_path / "filtered" / "filter.json").read_text())
    assert summary["ceiling"] == ceiling and summary["tier_rows"]["above_ceiling"] == sum(
        1 for value in lpips.values() if value > ceiling)
    assert "tier above_ceiling" in capsys.readouterr().out


def test_ceiling_mistakes_exit_2(scores, tmp_path, capsys):
    pattern = _write_parts(scores, tmp_path / "scores")
    out = tmp_path / "filtered"
    config = tmp_path / "tiers.json"
    config.write_text(json.dumps({"tiers": {"A": 0.0}, "ceiling": "high"}))
    assert command.main(["--scores", pattern, "--output", str(out), "--threshold", "0.1", "--max_lpips", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--max_lpips" in err and len(err.strip().splitlines()) == 1
    assert command.main(["--scores", pattern, "--output", str(out), "--tiers", str(config)]) == 2
    assert "'ceiling' must be a finite number" in capsys.readouterr().err
    config.write_text(json.dumps({"tiers": {"above_ceiling": 0.0}}))
    assert command.main(["--scores", pattern, "--output", str(out), "--tiers", str(config)]) == 2
    assert "clash" in capsys.readouterr().err
    assert not out.exists()


def _path_dataset(folder, rows: int = 8) -> str:
    """``folder/pairs.parquet`` naming its images by paths relative to it (``images/...``), in columns
    ``source_path`` / ``edited_path`` (the job's --ref_column / --edited_column); returns the file."""
    table = demo_table(size=48, with_bad_rows=False).slice(0, rows)
    os.makedirs(os.path.join(folder, "images"))
    source, edited = [], []
    for index, row in enumerate(table.to_pylist()):
        for kind, data, names in (("ref", row["ref_image"], source), ("edited", row["edited_image"], edited)):
            name = f"images/{index:02d}-{kind}.png"
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(data)
            names.append(name)
    pairs = pa.table({"id": table.column("id"), "edit": table.column("edit"), "source_path": source,
                      "edited_path": edited, "coords": table.column("coords")})
    path = os.path.join(folder, "pairs.parquet")
    pq.write_table(pairs, path)
    return path


def test_source_with_relative_image_paths_is_a_dataset_the_job_reads_again(tmp_path, capsys):
    """Relative image paths are rewritten (absolute) in kept_source/, the path columns are in scores/, and
    scoring the kept rows again gives the same scores, bit for bit, without an error."""
    pairs = _path_dataset(str(tmp_path / "data"))
    columns = ["--ref_column", "source_path", "--edited_column", "edited_path", "--num_shards", "1", "--no_report"]
    first = str(tmp_path / "first")
    assert job.main(["--input", pairs, "--output", first, *columns]) == 0
    scores = read_kind(first, layout.SCORES)
    assert scores.num_rows == 8
    original = pq.read_table(pairs).to_pylist()
    by_id = {row["id"]: row for row in original}
    for row in scores.to_pylist():  # the path columns are kept: where the images are
        for column in ("source_path", "edited_path"):
            assert row[column] == os.path.join(str(tmp_path / "data"), by_id[row["id"]][column])
            assert os.path.isfile(row[column])
        assert row["edit"] == by_id[row["id"]]["edit"]
    threshold = float(np.median(scores.column("lpips").to_numpy()))
    filtered = str(tmp_path / "filtered")
    # the filter runs from another folder: nothing may rely on the working directory
    cwd = os.getcwd()
    os.chdir(str(tmp_path))
    try:
        assert command.main(["--scores", first, "--output", filtered, "--threshold", str(threshold),
                             "--source", os.path.relpath(pairs), "--no_report"]) == 0
    finally:
        os.chdir(cwd)
    kept = pa.concat_tables([pq.read_table(path) for path in
                             sorted(glob.glob(os.path.join(filtered, "kept_source", "*.parquet")))])
    kept_ids = {row["id"] for row in scores.to_pylist() if row["lpips"] <= threshold}
    assert set(kept.column("id").to_pylist()) == kept_ids and kept.schema == pq.read_table(pairs).schema
    for row in kept.to_pylist():
        for column in ("source_path", "edited_path"):
            assert os.path.isabs(row[column]) and os.path.isfile(row[column])
            assert os.path.samefile(row[column], os.path.join(str(tmp_path / "data"), by_id[row["id"]][column]))
        assert row["coords"] == by_id[row["id"]]["coords"] and row["edit"] == by_id[row["id"]]["edit"]
    # scoring the kept set again, from where it was written: every row scores, to the same bits
    again = str(tmp_path / "again")
    assert job.main(["--input", os.path.join(filtered, "kept_source", "*.parquet"), "--output", again,
                     *columns]) == 0
    rescored = read_kind(again, layout.SCORES)
    assert not layout.kind_files(again, layout.ERRORS) or read_kind(again, layout.ERRORS).num_rows == 0
    first_lpips = dict(zip(scores.column("id").to_pylist(), scores.column("lpips").to_pylist()))
    assert {i: v for i, v in zip(rescored.column("id").to_pylist(), rescored.column("lpips").to_pylist())} == {
        i: first_lpips[i] for i in kept_ids}
