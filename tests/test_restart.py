"""Restarts lose nothing and redo nothing (transforms.ledger): the same command continues a killed batch run
in place, and a stopped or killed stream.

Batch: a fault is injected at each step of the commit order (rows being staged; a staged file closed but
not committed; a commit written; the last step's merges written but not its publish record; the publish
record written but nothing moved; half the moves made; everything moved but the ledger not cleared) by
making that step raise inside the in-process runner, which leaves the output as a kill there would (no
cleanup runs on failure). The same command then finishes with every input row exactly once in the outputs,
the same scores as an uninterrupted run, and the rows committed before the fault kept, not scored again.
A real SIGKILL at a moment the test does not choose is in ``test_sigkill_mid_run_then_the_same_command``.

Streams (Prism): the kill steps of a window's commit are made with ``os._exit`` in a launcher process; the
same command then continues with each row of each file exactly once.
"""

from __future__ import annotations

import collections
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import cli, runners
from tests.data_helpers import demo_table, wait_for
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import sink
from lpips_pipe.transforms.outputs import layout

ROOT = Path(__file__).resolve().parents[1]
FILES = 3


class Killed(RuntimeError):
    """The injected fault."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, pa.Table]:
    """Three input files of 34 demo rows (2 of them bad), ids distinct across files: three splits."""
    folder = tmp_path_factory.mktemp("restart-in")
    base = demo_table(size=48, with_bad_rows=True)
    tables = []
    for index in range(FILES):
        ids = pa.array([f"f{index}/{value}" for value in base.column("id").to_pylist()])
        table = base.set_column(base.schema.get_field_index("id"), "id", ids)
        pq.write_table(table, str(folder / f"pairs-{index}.parquet"))
        tables.append(table)
    return str(folder / "pairs-*.parquet"), pa.concat_tables(tables)


@pytest.fixture(scope="module")
def baseline(inputs, tmp_path_factory) -> dict[str, float]:
    out = str(tmp_path_factory.mktemp("restart-base") / "out")
    assert cli.main(["--input", inputs[0], "--output", out, "--no_report"]) == 0
    scores = pq.read_table(os.path.join(out, layout.SCORES))
    return dict(zip(scores.column("id").to_pylist(), scores.column("lpips").to_pylist()))


def _outputs(out: str) -> tuple[pa.Table, pa.Table]:
    return (pq.read_table(os.path.join(out, layout.SCORES)), pq.read_table(os.path.join(out, layout.ERRORS)))


def origin_counts(out: str) -> collections.Counter:
    """How many output rows (scores and errors) each input row ``(source_file, source_row)`` has."""
    return collections.Counter((path, row) for kind in _outputs(out) for path, row in zip(
        kind.column(layout.SOURCE_FILE_FIELD).to_pylist(), kind.column(layout.SOURCE_ROW_FIELD).to_pylist()))


def assert_each_row_once(out: str, rows: int) -> None:
    origins = origin_counts(out)
    repeated = [origin for origin, n in origins.items() if n > 1]
    assert not repeated and sum(origins.values()) == rows, (sum(origins.values()), repeated[:3])


def assert_exactly_once(out: str, table: pa.Table, baseline: dict[str, float]) -> None:
    assert_each_row_once(out, table.num_rows)
    scores, errors = _outputs(out)
    ids = scores.column("id").to_pylist() + errors.column("id").to_pylist()
    assert sorted(ids) == sorted(table.column("id").to_pylist())
    assert dict(zip(scores.column("id").to_pylist(), scores.column("lpips").to_pylist())) == baseline
    assert sorted(os.listdir(out)) == [layout.ERRORS, layout.SCORES]  # no ledger, staging or lock left


def _fail_on_call(monkeypatch, owner, name: str, call: int, before: bool = True) -> list[int]:
    """Make ``owner.name`` raise :class:`Killed` on its ``call``-th call (before running, or after)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and before:
            raise Killed(f"killed before {name} #{call}")
        result = original(*args, **kwargs)
        if calls[0] == call:
            raise Killed(f"killed after {name} #{call}")
        return result

    static = isinstance(owner, type) and isinstance(inspect.getattr_static(owner, name), staticmethod)
    monkeypatch.setattr(owner, name, staticmethod(wrapper) if static else wrapper)
    return calls


STEPS: dict[str, tuple[Callable, int]] = {
    # step: (patch, rows the rerun must keep at least)
    "rows being staged": (lambda mp: _fail_on_call(mp, sink._StagedWriter, "write", 40), 34),
    "staged file closed, not committed": (lambda mp: _fail_on_call(mp, ledger, "write_commit", 2), 34),
    "commit written": (lambda mp: _fail_on_call(mp, ledger, "write_commit", 2, before=False), 68),
    "merges written, no publish record": (lambda mp: _fail_on_call(mp, ledger, "write_publish", 1), 102),
    "publish record written, nothing moved": (lambda mp: _fail_on_call(mp, ledger, "apply_moves", 1), 102),
    "half the moves made": (lambda mp: _fail_on_call(mp, paths, "rename", 2), 102),
    "moved, ledger not cleared": (lambda mp: _fail_on_call(mp, ledger, "clear", 1), 102),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_kill_at_each_step_of_the_commit_order_then_the_same_command(step, inputs, baseline, tmp_path, monkeypatch,
                                                                       capsys):
    pattern, table = inputs
    out = str(tmp_path / "out")
    argv = ["--input", pattern, "--output", out, "--no_report"]
    patch, kept_at_least = STEPS[step]
    with monkeypatch.context() as patched:
        patch(patched)
        assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Killed" in err and err.count("lpips-pipe: error:") == 1, err
    assert not os.path.exists(os.path.join(out, layout.LOCK_FILE))
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert_exactly_once(out, table, baseline)
    kept = int(stdout.split("resumed: kept ")[1].split()[0]) if "resumed: kept" in stdout else 0
    scored = int(stdout.split("scored ")[1].split(",")[0])
    assert kept >= kept_at_least and scored <= table.num_rows - kept, stdout


def test_num_shards_resume_and_a_second_kill(inputs, baseline, tmp_path, monkeypatch, capsys):
    """--num_shards 2: killed twice (a commit, then the merges), the third run completes."""
    pattern, table = inputs
    out = str(tmp_path / "out")
    argv = ["--input", pattern, "--output", out, "--no_report", "--num_shards", "2"]
    with monkeypatch.context() as patched:
        _fail_on_call(patched, ledger, "write_commit", 1, before=False)
        assert cli.main(argv) == 1
    with monkeypatch.context() as patched:
        _fail_on_call(patched, ledger, "write_publish", 1)
        assert cli.main(argv) == 1
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "resumed: kept 102 rows" in capsys.readouterr().out
    assert_exactly_once(out, table, baseline)
    assert sorted(os.listdir(os.path.join(out, layout.SCORES))) == [layout.shard_name(0, 2), layout.shard_name(1, 2)]


def test_a_restart_with_other_settings_is_refused_naming_the_field(inputs, tmp_path, monkeypatch, capsys, caplog):
    pattern, _ = inputs
    out = str(tmp_path / "out")
    argv = ["--input", pattern, "--output", out, "--no_report"]
    with monkeypatch.context() as patched:
        _fail_on_call(patched, ledger, "write_commit", 1, before=False)
        assert cli.main(argv) == 1
    capsys.readouterr()
    for extra, field in ((["--max_side", "32"], "max_side"), (["--precision", "bf16"], "precision"),
                         (["--scope", "full"], "mask_mode"), (["--net", "vgg"], "net")):
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("lpips-pipe: error:")]
        assert len(lines) == 1 and f"{field}=" in lines[0] and "--allow_mixed" in lines[0], err
    caplog.set_level("INFO", logger="lpips_pipe")
    assert cli.main([*argv, "--overwrite"]) == 0  # starts over, and says so
    assert any("--overwrite: removed" in record.getMessage() for record in caplog.records)


def test_a_batch_command_does_not_continue_a_stream_output(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    ledger.write_run(str(out), "20260101T000000-00000000", ledger.STREAM, {}, {})
    assert cli.main(["--input", inputs[0], "--output", str(out), "--no_report"]) == 2
    assert "--streaming" in capsys.readouterr().err


def _copies(base: pa.Table, count: int) -> pa.Table:
    """``count`` copies of ``base`` with distinct ids (``f<copy>/<id>``)."""
    tables = []
    for index in range(count):
        ids = pa.array([f"f{index}/{value}" for value in base.column("id").to_pylist()])
        tables.append(base.set_column(base.schema.get_field_index("id"), "id", ids))
    return pa.concat_tables(tables)


def test_sigkill_mid_run_then_the_same_command(tmp_path):
    """A real SIGKILL of the command while it scores, at a moment found by watching the ledger (the first
    commit), then the same command: every row once, the finished rows not scored again."""
    table = _copies(demo_table(size=256, with_bad_rows=True), 10)
    source = tmp_path / "in.parquet"
    pq.write_table(table, str(source), row_group_size=34)  # 340 rows: splits of 238 and 102 rows
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "--input", str(source), "--output", str(out), "--no_report"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        records = os.listdir(layout.ledger_dir(str(out))) if os.path.isdir(layout.ledger_dir(str(out))) else []
        if any(name.startswith(layout.LEDGER_COMMIT_PREFIX) for name in records):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    committed = ledger.read_state(str(out)).done_rows
    assert 0 < committed < table.num_rows
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed: kept {committed} rows" in rerun.stdout
    scored = int(rerun.stdout.split("scored ")[1].split(",")[0])
    errors = int(rerun.stdout.split("errors ")[1].split(",")[0])
    assert scored + errors == table.num_rows - committed  # the kept rows were not read again
    assert_each_row_once(str(out), table.num_rows)



def test_ctrl_c_mid_run_exits_130_keeps_every_finished_row_then_the_same_command(tmp_path):
    """Ctrl-C (SIGINT to the process group) while rows are being scored: exit 130 with the line that says how
    to continue, every row the progress lines reported finished is committed, and the same command scores
    only the rest (every row once)."""
    table = _copies(demo_table(size=256, with_bad_rows=True), 10)
    source = tmp_path / "in.parquet"
    pq.write_table(table, str(source), row_group_size=34)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "--input", str(source), "--output", str(out), "--no_report",
               "--progress_interval_s", "0.5"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    reported, lines = 0, []
    for line in process.stdout:
        lines.append(line)
        if "progress:" in line:
            reported = int(line.split("progress: ")[1].split(" rows done")[0].replace(",", ""))
            if reported >= 20:
                break
    assert reported >= 20, "".join(lines)
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest and "run the same command again" in rest, rest
    assert "Traceback" not in rest, rest
    committed = ledger.read_state(str(out)).done_rows
    assert reported <= committed < table.num_rows
    rerun = subprocess.run(command[:-2], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed: kept {committed} rows" in rerun.stdout
    assert_each_row_once(str(out), table.num_rows)


# --------------------------------------------------------------------------- streams

STREAM_LAUNCHER = r"""
import inspect, os, sys
step, argv = sys.argv[1], sys.argv[2:]
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import ledger
from lpips_pipe.transforms.outputs import sink

def die_at(owner, name, call, before=True):
    original = getattr(owner, name)
    calls = [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and before:
            os._exit(137)
        result = original(*args, **kwargs)
        if calls[0] == call:
            os._exit(137)
        return result
    static = isinstance(owner, type) and isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)

if step == "window-staging":  # a row of file 1 (file 0 has 34)
    die_at(sink._StagedWriter, "write", 40)
elif step == "merged-not-committed":  # the second window's record
    die_at(ledger, "write_commit", 2)
elif step == "committed-not-moved":
    die_at(ledger, "write_commit", 2, before=False)
elif step == "half-moved":  # the second window's first move (the first window made two)
    die_at(paths, "rename", 3, before=False)
from lpips_pipe.pipeline import cli
sys.exit(cli.main(argv))
"""


def _land(folder: Path, index: int) -> pa.Table:
    """Input file ``index`` (34 demo rows, 2 bad), renamed into ``folder`` whole."""
    base = demo_table(size=32, with_bad_rows=True)
    ids = pa.array([f"s{index}/{value}" for value in base.column("id").to_pylist()])
    table = base.set_column(base.schema.get_field_index("id"), "id", ids)
    temporary = folder / f".f{index}.tmp"
    pq.write_table(table, str(temporary))
    os.rename(temporary, folder / f"f{index}.parquet")
    return table


def _stream_command(tmp_path: Path, step: str, stop_after: int) -> list[str]:
    return [sys.executable, "-c", STREAM_LAUNCHER, step, "--streaming", "--input", str(tmp_path / "in" / "*.parquet"),
            "--output", str(tmp_path / "out"), "--watch_interval", "1", "--watch_stop_after", str(stop_after),
            "--no_report"]


@pytest.fixture
def no_orphaned_prism():
    """Prism processes a killed launcher left behind (their parent is gone) are stopped after the test."""
    def orphans() -> set[int]:
        found = set()
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read().split(b"\0")[0]
            except (OSError, ValueError, IndexError):
                continue
            if parent == 1 and command.endswith(b"/prism"):
                found.add(int(entry))
        return found

    before = orphans()
    yield
    for pid in orphans() - before:
        os.kill(pid, signal.SIGKILL)


def _commits(out: Path) -> int:
    folder = Path(layout.ledger_dir(str(out)))
    return sum(name.startswith(layout.LEDGER_COMMIT_PREFIX) for name in os.listdir(folder)) if folder.is_dir() else 0


@pytest.mark.skipif(runners.prism_binary() is None, reason=f"Prism is not built here ({runners.SETUP_STEP})")
@pytest.mark.parametrize("step", ["window-staging", "merged-not-committed", "committed-not-moved", "half-moved"])
def test_a_stream_killed_at_each_step_of_a_window_commit_continues(step, tmp_path, no_orphaned_prism):
    """File 0 lands and its window is committed; files 1 and 2 land; the kill comes in their window's
    commit (or while its rows are staged). The same command then writes every row of the three files once."""
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    tables = [_land(tmp_path / "in", 0)]
    process = subprocess.Popen(_stream_command(tmp_path, step, 60), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None and _commits(out) < 1:
            time.sleep(0.2)
        tables += [_land(tmp_path / "in", 1), _land(tmp_path / "in", 2)]
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 137, output[-3000:]
    with open(layout.runner_pids_path(str(out))) as handle:
        left_running = [int(pid) for pid in handle.read().split()]  # Prism, orphaned by the kill
    resumed = subprocess.run(_stream_command(tmp_path, "none", 12), cwd=ROOT, capture_output=True, text=True,
                             timeout=240)
    for pid in left_running:  # the same command stopped them
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr and "continuing the stream" in resumed.stderr
    assert_each_row_once(str(out), pa.concat_tables(tables).num_rows)
    staging = out / layout.STAGING
    leftovers = [p for p in staging.rglob("*") if p.is_file() and layout.LEDGER not in p.relative_to(staging).parts]
    assert leftovers == []  # only the ledger stays, to continue the stream later


def _runner_args(runner: str) -> list[str]:
    return [] if runner == "prism" else ["--runner", "FlinkRunner", "--flink_master=[local]"]


@pytest.mark.parametrize("runner", [
    pytest.param("prism", marks=pytest.mark.skipif(runners.prism_binary() is None,
                                                   reason=f"Prism is not built here ({runners.SETUP_STEP})")),
    pytest.param("flink", marks=pytest.mark.skipif(runners.flink_job_server_jar() is None,
                                                   reason=f"Flink is not built here ({runners.SETUP_STEP})")),
])
def test_the_users_scenario_sigterm_then_sigkill_then_the_same_command(runner, tmp_path, no_orphaned_prism):
    """Stream file 0, SIGTERM; file 1 lands; the same command; SIGKILL while file 2 lands; the same command
    with --watch_stop_after: exit 0 and the rows of all three files exactly once."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    command = [sys.executable, "-m", "pipeline", "--streaming", "--input", str(incoming / "*.parquet"),
               "--output", str(out), "--watch_interval", "1", "--no_report", *_runner_args(runner)]

    def start() -> subprocess.Popen:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def written_files() -> int:
        folder = out / layout.SCORES
        return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0

    tables = [_land(incoming, 0)]
    first = start()
    try:
        assert wait_for(lambda: written_files() >= 1 or first.poll() is not None, 150)
        os.killpg(first.pid, signal.SIGTERM)
        output, _ = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0 and "streaming stopped on SIGTERM" in output, output[-3000:]
    assert "the same command continues" in output and "Traceback" not in output, output[-3000:]
    tables.append(_land(incoming, 1))
    second = start()
    try:
        assert wait_for(lambda: written_files() >= 2 or second.poll() is not None, 150)
        tables.append(_land(incoming, 2))
        time.sleep(1.5)
        os.killpg(second.pid, signal.SIGKILL)  # while file 2 lands: maybe read, surely not written
        second.communicate(timeout=30)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    third = subprocess.run([*command, "--watch_stop_after", "25" if runner == "prism" else "45"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    table = pa.concat_tables(tables)
    assert_each_row_once(str(out), table.num_rows)
    scores, errors = _outputs(str(out))
    assert sorted(scores.column("id").to_pylist() + errors.column("id").to_pylist()) == sorted(
        table.column("id").to_pylist())


@pytest.mark.skipif(os.geteuid() != 0, reason="making a small filesystem (tmpfs) needs root")
def test_a_full_disk_then_the_same_command_once_space_is_free(inputs, baseline, tmp_path, capsys):
    """The output fills up mid-run (a 48 KB tmpfs): exit 1; with space made, the same command finishes
    with every row once and the rows committed before the disk filled kept."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(small)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        pattern, table = inputs
        out = str(small / "out")
        argv = ["--input", pattern, "--output", out, "--no_report"]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "No space left on device" in err and "run the same command again" in err, err
        kept = ledger.read_state(out).done_rows
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        assert cli.main(argv) == 0
        stdout = capsys.readouterr().out
        assert (f"resumed: kept {kept} rows" in stdout) if kept else ("resumed" not in stdout)
        assert_exactly_once(out, table, baseline)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)  # lazily: a file still open must not keep it
