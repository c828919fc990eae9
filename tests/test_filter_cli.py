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

from lpips_pipe.pipeline import filter as filter_cli
from lpips_pipe.pipeline import cli as job
from tests.data_helpers import demo_table, read_kind, write_kind
from lpips_pipe.transforms import layout

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
    assert filter_cli.main(["--scores", pattern, "--output", out, "--threshold", str(threshold)]) == 0
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
    assert filter_cli.main(argv + (["--std", std] if std else [])) == 0
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
    assert filter_cli.main(["--scores", _write_parts(table, tmp_path / "s"), "--output", out,
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
        assert filter_cli.main([*argv, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:  # exactly one rule
        filter_cli.main(["--scores", pattern, "--output", str(out), "--threshold", "0.1", "--tiers", "x.json"])
    assert exit_info.value.code == 2
    assert filter_cli.main(["--scores", pattern, "--output", str(out), "--threshold", "0.1"]) == 0
    assert filter_cli.main(["--scores", pattern, "--output", str(out), "--threshold", "0.2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert filter_cli.main(["--scores", pattern, "--output", str(out), "--threshold", "0.2", "--overwrite"]) == 0


def test_python_m_pipeline_filter(scores, tmp_path):
    pattern = _write_parts(scores, tmp_path / "scores")
    out = str(tmp_path / "filtered")
    done = subprocess.run([sys.executable, "-m", "pipeline.filter", "--scores", pattern, "--output", out,
                           "--threshold", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kept, rejected = _outputs(out)
    assert kept.num_rows + rejected.num_rows == scores.num_rows
    assert "lpips-pipe-filter: 16 rows" in done.stdout
