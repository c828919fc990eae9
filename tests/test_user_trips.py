"""What a user still trips on: a few rows naming a URI scheme nothing here reads, an output where nothing can
be created."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import cli
from tests.data_helpers import small_pairs
from lpips_pipe.transforms.model import scorer


@pytest.fixture
def manifest(tmp_path) -> tuple[str, pa.Table]:
    """Six pairs as relative image paths; row 2's reference is a gs:// URI, row 4's edited image hf://."""
    table = small_pairs(6, size=48)
    refs, edits = [], []
    for index, row in enumerate(table.to_pylist()):
        (tmp_path / f"r{index}.png").write_bytes(row["ref_image"])
        (tmp_path / f"e{index}.png").write_bytes(row["edited_image"])
        refs.append("gs://bucket/r2.png" if index == 2 else f"r{index}.png")
        edits.append("hf://datasets/org/name/e4.png" if index == 4 else f"e{index}.png")
    paths = pa.table({"id": table.column("id"), "ref_image": refs, "edited_image": edits,
                      "coords": table.column("coords")})
    path = str(tmp_path / "manifest.parquet")
    pq.write_table(paths, path)
    return path, paths


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lpips-pipe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_rows_with_a_scheme_nothing_reads_are_error_rows_and_the_rest_is_scored(manifest, tmp_path, capsys):
    path, table = manifest
    out = tmp_path / "out"
    assert cli.main(["--input", path, "--output", str(out), "--no_report"]) == 0
    errors = pq.read_table(out / "errors").to_pylist()
    assert sorted(row["id"] for row in errors) == sorted(table.column("id").to_pylist()[i] for i in (2, 4))
    by_id = {row["id"]: row for row in errors}
    gs, hf = by_id[table.column("id")[2].as_py()], by_id[table.column("id")[4].as_py()]
    assert gs["error_type"] == hf["error_type"] == "UnsupportedUri"
    assert "gcsfs" in gs["error_message"] and "apache-beam[gcp]" in gs["error_message"]  # names the package
    assert "huggingface_hub" in hf["error_message"] or "fsspec" in hf["error_message"]
    assert pq.read_table(out / "scores").num_rows == 4


def test_a_job_no_row_of_which_can_be_read_is_refused_at_planning(manifest, tmp_path, capsys):
    path, table = manifest
    every = table.set_column(1, "ref_image", pa.array(["gs://bucket/a.png"] * table.num_rows))
    pq.write_table(every, path)
    assert cli.main(["--input", path, "--output", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no row's 'ref_image' can be read here" in line and "gs://" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["/proc/lpips-pipe-out", "/proc/self/lpips-out/x"])
def test_an_output_where_nothing_can_be_created_is_refused_before_the_model_loads(manifest, output, capsys,
                                                                                  monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a job that cannot write its output")

    monkeypatch.setattr(scorer.LpipsScorer, "__init__", no_model)
    assert cli.main(["--input", manifest[0], "--output", output]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot be written" in line and output in line
    assert not os.path.exists(output)


def _run_on_a_terminal(argv: list[str], size: tuple[int, int] = (0, 0)) -> tuple[int, str]:
    """``python -m pipeline ARGV`` with stderr on a pseudo-terminal (``size`` rows x columns; 0 x 0 as a bare
    one reports); returns the exit code and what the terminal showed."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=root, stdout=subprocess.DEVNULL,
                               stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            shown += data
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(), shown.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def slow_input(tmp_path_factory) -> tuple[str, int]:
    """40 pairs of 256x256 photos (2 broken): a couple of seconds of scoring, long enough for a bar."""
    from tests.data_helpers import demo_table

    table = demo_table(size=256, with_bad_rows=True).slice(0, 34)
    table = pa.concat_tables([table, table.slice(0, 6)])
    table = table.set_column(0, "id", pa.array([f"r{index}" for index in range(table.num_rows)]))
    path = str(tmp_path_factory.mktemp("slow") / "pairs.parquet")
    pq.write_table(table, path)
    return path, table.num_rows


@pytest.mark.parametrize("size", [(0, 0), (30, 120)])
def test_a_terminal_gets_a_live_bar_with_rows_rate_eta_and_errors(slow_input, tmp_path, size):
    path, rows = slow_input
    code, shown = _run_on_a_terminal(["--input", path, "--output", str(tmp_path / "out"), "--no_report"], size)
    assert code == 0, shown
    frames = [frame for frame in shown.replace("\r\n", "\n").split("\r") if frame.startswith("lpips-pipe:")]
    assert len(frames) >= 2, shown  # drawn at start and refreshed
    last = frames[-1].strip()
    assert f"100%" in last and f"{rows}/{rows}" in last and "rows/s" in last and "errors 2" in last, last
    assert "<" in frames[0] or "?" in frames[0]  # tqdm's ETA field


def test_no_bar_without_a_terminal_or_with_progress_off(slow_input, tmp_path, capfd):
    path, _ = slow_input
    assert cli.main(["--input", path, "--output", str(tmp_path / "out"), "--no_report"]) == 0
    assert "rows/s]" not in capfd.readouterr().err  # stderr is not a terminal here: log lines, not a bar
    code, shown = _run_on_a_terminal(["--input", path, "--output", str(tmp_path / "out2"), "--no_report",
                                      "--progress_interval_s", "0"])
    assert code == 0 and "rows/s" not in shown, shown
