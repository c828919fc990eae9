"""The run report: DIR/report.md, report.json and histogram.png after a run, and lpips-pipe-report."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lpips_pipe.pipeline.report import facts
from lpips_pipe.pipeline.report import histogram
from lpips_pipe.pipeline.report import markdown
from lpips_pipe.pipeline.report import writer
from lpips_pipe.pipeline import cli as job
from tests.data_helpers import demo_table, read_kind
from lpips_pipe.transforms.outputs import layout


def _report_file(out: str, name: str) -> str:
    return os.path.join(layout.report_dir(out), name)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """One CLI run over 8 good real-photo pairs (2 photos x 4 edits, 64x64) and 2 broken rows."""
    work = tmp_path_factory.mktemp("report")
    table = demo_table(size=64)
    table = pa.concat_tables([table.slice(0, 8), table.slice(table.num_rows - 2, 2)])  # + truncated PNG, NaN box
    pq.write_table(table, str(work / "pairs.parquet"))
    out = str(work / "out")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = job.main(["--input", str(work / "pairs.parquet"), "--output", out, "--num_shards", "1",
                         "--report_group_column", "edit"])
    assert code == 0
    return {"out": out, "input": table, "stdout": buffer.getvalue(),
            "scores": read_kind(out, layout.SCORES),
            "errors": read_kind(out, layout.ERRORS),
            "markdown": open(_report_file(out, "report.md"), encoding="utf-8").read(),
            "json": json.load(open(_report_file(out, "report.json"), encoding="utf-8"))}


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def test_counts_and_errors_by_type(finished):
    markdown, scores, errors = finished["markdown"], finished["scores"], finished["errors"]
    assert scores.num_rows + errors.num_rows == finished["input"].num_rows == 10
    assert "| input rows | 10 |" in markdown
    assert f"| scored | {scores.num_rows} |" in markdown and f"| errors | {errors.num_rows} |" in markdown
    assert "| skipped (id already in earlier outputs, `--skip_existing`) | 0 |" in markdown
    assert "| model loads | 1 |" in markdown
    assert f"| pixels scored | {scores.num_rows * 64 * 64:,} |" in markdown
    kinds: dict = {}
    for stage, kind in zip(errors.column("error_stage").to_pylist(), errors.column("error_type").to_pylist()):
        kinds[(stage, kind)] = kinds.get((stage, kind), 0) + 1
    assert ("coords", "BadBox") in kinds and len(kinds) == 2
    for (stage, kind), count in kinds.items():
        assert f"| {stage} | {kind} | {count} |" in markdown
    counts = finished["json"]["counts"]
    assert (counts["input_rows"], counts["scored"], counts["errors"]) == (10, scores.num_rows, errors.num_rows)


def test_score_quantiles_per_mask_mode_and_group(finished):
    markdown, scores = finished["markdown"], finished["scores"]
    values = scores.column("lpips").to_numpy()
    quantiles = np.quantile(values, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    row = f"| all | {len(values)} | {_fmt(values.mean())} | " + " | ".join(map(_fmt, quantiles)) + " |"
    assert row in markdown
    assert f"| outer | {len(values)} |" in markdown  # default scope unedit_area -> outer for every row
    assert "## LPIPS by edit" in markdown
    for edit in set(scores.column("edit").to_pylist()):
        group = np.array([v for v, e in zip(values, scores.column("edit").to_pylist()) if e == edit])
        assert f"| {edit} | {len(group)} | {_fmt(group.mean())} | {_fmt(group.min())} |" in markdown


def test_measured_fraction_distribution(finished):
    markdown, scores = finished["markdown"], finished["scores"]
    fractions = scores.column("measured_fraction").to_numpy()
    # centre_box(fraction=0.4) on 64x64: a 25x25 box, so outer measures 1 - 625/4096 of every image
    assert np.allclose(fractions, 1 - 625 / 4096)
    assert f"| (0.75, 1) | {len(fractions)} |" in markdown
    assert "| 0 (nothing measured) | 0 |" in markdown and "| 1 (whole image) | 0 |" in markdown
    assert f"median {_fmt(1 - 625 / 4096)}" in markdown


def test_slowest_stage_and_printed_table(finished):
    markdown, stdout = finished["markdown"], finished["stdout"]
    stages = finished["json"]["stage_seconds"]
    assert stages and stages == sorted(stages, key=lambda item: -item[1])
    assert "Score/LPIPS" in {name for name, _ in stages}
    assert f"Slowest stage: **{stages[0][0]}**" in markdown
    assert "read 10 rows, scored 8, errors 2, skipped 0" in stdout
    assert "mask mode" in stdout and f"slowest stage: {stages[0][0]}" in stdout
    assert "report.md" in stdout


def test_histogram_is_a_readable_png(finished):
    path = _report_file(finished["out"], "histogram.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1100, 420)
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.01  # bars, axes and labels drawn, not a blank canvas
    assert "![LPIPS and measured fraction histograms](histogram.png)" in finished["markdown"]
    empty = _decode(histogram.render_histogram(pa.table({})))
    with Image.open(path) as image:
        assert not np.array_equal(np.asarray(image.convert("RGB")), empty)  # the run's bars, not an empty frame


def _decode(png: bytes) -> np.ndarray:
    """``png`` as an RGB array, after checking it is a PNG of the report's size."""
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == histogram.HISTOGRAM_SIZE == (1100, 420)
        return np.asarray(image.convert("RGB"))


def _pixels_of(pixels: np.ndarray, color: str) -> int:
    return int((pixels == np.array(Image.new("RGB", (1, 1), color).getpixel((0, 0)))).all(axis=-1).sum())


def test_histogram_draws_each_series_and_the_fractions():
    """Series in tab10 order (largest first, the rest as "other") on the left, gray fraction bars on the right."""
    rng = np.random.default_rng(0)
    groups = [f"g{index}" for index in range(histogram.MAX_HISTOGRAM_SERIES + 2) for _ in range(30 - index)]
    scores = pa.table({"lpips": rng.uniform(0.0, 0.5, len(groups)), "measured_fraction": rng.uniform(0, 1, len(groups)),
                       "mask_mode": ["outer"] * len(groups), "group": groups})
    pixels = _decode(histogram.render_histogram(scores, "group"))
    empty = _decode(histogram.render_histogram(pa.table({})))
    left, right = slice(0, 700), slice(700, None)
    for color in histogram.SERIES_COLORS[:histogram.MAX_HISTOGRAM_SERIES + 1]:  # 8 groups + "other"
        assert _pixels_of(pixels[:, left], color) > 100, color
    assert _pixels_of(pixels[:, left], histogram.SERIES_COLORS[histogram.MAX_HISTOGRAM_SERIES + 1]) == 0
    assert _pixels_of(pixels[:, right], "#7f7f7f") > 5000 and _pixels_of(empty[:, right], "#7f7f7f") < 100
    assert _pixels_of(empty, histogram.SERIES_COLORS[0]) == 0
    by_mode = _decode(histogram.render_histogram(scores))  # no group column: one series, mask_mode "outer"
    assert _pixels_of(by_mode[:, left], histogram.SERIES_COLORS[0]) > 1000
    assert _pixels_of(by_mode[:, left], histogram.SERIES_COLORS[1]) == 0


def test_histogram_does_not_import_matplotlib():
    code = ("import sys, pyarrow as pa; from lpips_pipe.pipeline.report import histogram; "
            "png = histogram.render_histogram(pa.table({'lpips': [0.1, 0.2, float('nan')], "
            "'measured_fraction': [0.5, 1.0, 0.2], 'mask_mode': ['outer', 'inner', 'outer']})); "
            "assert png.startswith(b'\\x89PNG'), png[:8]; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_report_command_rerenders_with_the_runs_counters(finished, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(finished["out"], out)
    os.remove(_report_file(out, "report.md"))
    os.remove(_report_file(out, "histogram.png"))
    assert writer.main([out, "--group_column", "edit"]) == 0
    markdown = open(_report_file(out, "report.md"), encoding="utf-8").read()
    assert "| input rows | 10 |" in markdown and "| model loads | 1 |" in markdown  # from the earlier report.json
    assert "Slowest stage:" in markdown and os.path.getsize(_report_file(out, "histogram.png")) > 5000
    assert "mask mode" in capsys.readouterr().out
    assert writer.main([str(tmp_path / "empty")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_build_report_from_outputs_alone():
    """No counters: counts, duplicate ids and fraction buckets come from the output files."""
    fractions = [0.0, 0.1, 0.25, 0.5, 0.75, 0.8, 1.0]  # bucket upper bounds are inclusive
    scores = pa.table({"id": ["a", "b", "c", "d", "e", "f", "a"], "lpips": [0.0, 0.2, 0.4, 0.1, 0.3, 0.5, 0.6],
                       "measured_fraction": fractions,
                       "mask_mode": ["inner", "outer", "outer", "outer", "outer", "none", "none"]})
    errors = pa.table({"id": ["b", "g"], "error_stage": ["decode", "decode"], "error_type": ["OSError", "OSError"]})
    report = facts.build_report("mem", scores, errors, group_column="prompt")
    assert report.counts["input_rows"] == 9 and report.counts["scored"] == 7 and report.counts["errors"] == 2
    assert (report.counts["duplicate_ids"], report.counts["duplicate_id_rows"]) == (2, 4)  # a x2, b x2
    assert report.duplicate_examples == [("a", 2), ("b", 2)]
    assert list(report.measured_fraction.values()) == [1, 2, 1, 1, 1, 1]
    modes = {summary.label: summary for summary in report.by_mask_mode}
    assert modes["all"].count == 7 and modes["outer"].count == 4
    assert modes["none"].quantiles["median"] == pytest.approx(0.55)
    assert report.errors_by_type == [("decode", "OSError", 2)]
    assert report.notes == ["group column 'prompt' is not in the scores; no per-group table"]
    assert "| ids on more than one row (each row kept) | 2 id(s), 4 rows |" in markdown.render_markdown(report)


def test_no_scores_still_renders():
    report = facts.build_report("mem", pa.table({}), pa.table({}))
    assert report.counts["scored"] == 0 and report.by_mask_mode[0].count == 0
    assert "No errors." in markdown.render_markdown(report)
    pixels = _decode(histogram.render_histogram(pa.table({})))
    assert (pixels.min(axis=-1) < 128).mean() > 0.002  # frames, ticks, labels and "no scored pairs" drawn


def test_no_report_flag_and_overwrite_clears_a_stale_report(finished, tmp_path):
    out = str(tmp_path / "again")
    shutil.copytree(finished["out"], out)
    pairs = str(tmp_path / "pairs.parquet")
    pq.write_table(finished["input"].slice(0, 2), pairs)
    assert job.main(["--input", pairs, "--output", out, "--num_shards", "1", "--overwrite", "--no_report",
                     "--progress_interval_s", "0"]) == 0
    for name in ("report.md", "report.json", "histogram.png"):
        assert not os.path.exists(_report_file(out, name)), name  # the old run's report would describe other rows
    assert read_kind(out, layout.SCORES).num_rows == 2
