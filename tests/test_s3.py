"""Every command on S3, against a real S3 server (versitygw on loopback, tests/s3_server.py): inputs (Parquet
with image bytes, Parquet with s3:// image URIs, JSON Lines with relative paths, tar shards), weights, scores,
errors, the report page and its tiles, the filter and the calibration, a SIGKILL half-way and the same command,
two launchers on one output, and the mistakes (a wrong key, a missing bucket, an unreachable endpoint) as one
line and exit 2 before the model loads. Scores are byte-identical to a local run of the same rows.

Nothing is mocked: Beam's S3 filesystem and boto3 talk HTTP to the server. The job takes Beam's --s3_* flags;
the other commands (and the SIGKILL test's job) the standard AWS environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpips_pipe.pipeline import cli, job, runners
from lpips_pipe.pipeline.calibrate import command as calibrate_command
from lpips_pipe.pipeline import export_weights as export_cli
from lpips_pipe.pipeline.filter import command as filter_command
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.inputs import webdataset
from lpips_pipe.transforms.outputs import layout
from tests.data_helpers import demo_table, small_pairs, wait_for
from tests.s3_server import BUCKET, free_port

ROOT = Path(__file__).resolve().parents[1]
SOURCE_COLUMNS = (layout.SOURCE_FILE_FIELD, layout.SOURCE_ROW_FIELD)


@pytest.fixture(autouse=True)
def _aws_environment(s3_server, monkeypatch):
    """The standard AWS environment, for the commands without Beam's flags (the job's flags win)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    paths.configure()


def _parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def _read_s3(server, folder: str) -> pa.Table:
    files = [key for key in server.keys(folder.rstrip("/") + "/") if key.endswith(".parquet")]
    assert files, f"nothing in {folder}"
    return pa.concat_tables([pq.read_table(io.BytesIO(server.get(key))) for key in files])


def _by_id(table: pa.Table) -> dict:
    return dict(zip(table.column("id").to_pylist(), table.column(layout.LPIPS_FIELD).to_pylist()))


def _one_line(err: str, prog: str = "lpips-pipe") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return small_pairs(6, size=48)


@pytest.fixture(scope="module")
def local_run(table, tmp_path_factory) -> tuple[pa.Table, pa.Table]:
    """The same rows scored from a local file into a local output: (scores, errors)."""
    folder = tmp_path_factory.mktemp("s3-local")
    pq.write_table(table, str(folder / "pairs.parquet"))
    out = str(folder / "out")
    assert cli.main(["--input", str(folder / "pairs.parquet"), "--output", out, "--no_report"]) == 0
    return (pq.read_table(os.path.join(out, layout.SCORES)), pq.read_table(os.path.join(out, layout.ERRORS)))


@pytest.fixture(scope="module")
def s3_run(s3_server, table):
    """The rows as Parquet with image bytes on S3, scored into an S3 output, with the report page and tiles."""
    root = f"s3://{BUCKET}/run"
    s3_server.put(f"{root}/in/pairs.parquet", _parquet_bytes(table))
    out = f"{root}/out"
    code = cli.main(["--input", f"{root}/in/*.parquet", "--output", out, "--report_k", "2", *s3_server.flags()])
    assert code == 0
    return out


def test_parquet_with_image_bytes_scores_errors_report_and_tiles_on_s3(s3_server, s3_run, local_run):
    keys = s3_server.keys(s3_run + "/")
    names = [key[len(s3_run) + 1:] for key in keys]
    assert any(name.startswith(f"{layout.SCORES}/part-") for name in names), names
    assert any(name.startswith(f"{layout.ERRORS}/part-") for name in names), names
    assert f"{layout.REPORT}/{layout.REPORT_HTML}" in names, names
    assert any(name.startswith(f"{layout.REPORT}/{layout.REPORT_TILES}/") for name in names), names
    assert not any(name.startswith(layout.STAGING) or name == layout.LOCK_FILE for name in names), names
    scores = _read_s3(s3_server, f"{s3_run}/{layout.SCORES}")
    local_scores = local_run[0]
    # byte-identical scores: every column but where the row came from (an S3 path instead of a local one)
    assert scores.drop_columns(list(SOURCE_COLUMNS)).equals(local_scores.drop_columns(list(SOURCE_COLUMNS)))
    assert set(scores.column(layout.SOURCE_FILE_FIELD).to_pylist()) == {f"s3://{BUCKET}/run/in/pairs.parquet"}


@pytest.fixture(scope="module")
def s3_weights(s3_server) -> str:
    """An exported weights file on S3 (lpips-pipe-export-weights, credentials from the environment)."""
    uri = f"s3://{BUCKET}/weights/lpips-alex.pt"
    env = s3_server.env()
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        assert export_cli.main([uri]) == 0
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return uri


def _image_uri_inputs(server, table: pa.Table, kind: str) -> str:
    """``table``'s rows on S3 as ``kind`` input; returns the --input glob."""
    root = f"s3://{BUCKET}/inputs-{kind}"
    rows = table.to_pylist()
    if kind == "tar":
        webdataset.write_shard(f"{root}/shard-000.tar", rows[:3])
        webdataset.write_shard(f"{root}/shard-001.tar", rows[3:])
        return f"{root}/shard-*.tar"
    for index, row in enumerate(rows):
        server.put(f"{root}/images/ref-{index}.png", row["ref_image"])
        server.put(f"{root}/images/edit-{index}.png", row["edited_image"])
    if kind == "uris":
        uris = table.set_column(table.schema.get_field_index("ref_image"), "ref_image",
                                pa.array([f"{root}/images/ref-{index}.png" for index in range(len(rows))]))
        uris = uris.set_column(uris.schema.get_field_index("edited_image"), "edited_image",
                               pa.array([f"{root}/images/edit-{index}.png" for index in range(len(rows))]))
        server.put(f"{root}/pairs.parquet", _parquet_bytes(uris))
        return f"{root}/pairs.parquet"
    lines = [json.dumps({"id": row["id"], "edit": row["edit"], "ref_image": f"images/ref-{index}.png",
                         "edited_image": f"images/edit-{index}.png", "coords": row["coords"]})
             for index, row in enumerate(rows)]
    server.put(f"{root}/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    return f"{root}/manifest.jsonl"


@pytest.mark.parametrize("kind", ["uris", "jsonl", "tar"])
def test_image_uris_relative_paths_and_shards_on_s3_with_weights_on_s3(kind, s3_server, s3_weights, table, local_run,
                                                                       capsys):
    pattern = _image_uri_inputs(s3_server, table, kind)
    out = f"s3://{BUCKET}/out-{kind}"
    code = cli.main(["--input", pattern, "--output", out, "--weights", s3_weights, "--no_report", *s3_server.flags()])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"weights from file:{s3_weights}" in captured.err or "Traceback" not in captured.err
    scores = _read_s3(s3_server, f"{out}/{layout.SCORES}")
    # the same scores, to the bit, as the local run of the same rows
    assert _by_id(scores) == _by_id(local_run[0])


def test_filter_and_calibrate_read_and_write_s3(s3_server, s3_run, table, capsys):
    kept = f"s3://{BUCKET}/filtered"
    code = filter_command.main(["--scores", s3_run, "--output", kept, "--threshold", "0.2",
                            "--source", f"s3://{BUCKET}/run/in/pairs.parquet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    names = [key[len(kept) + 1:] for key in s3_server.keys(kept + "/")]
    assert any(name.startswith("kept") for name in names) and any(name.startswith("rejected") for name in names), names
    scored = _by_id(_read_s3(s3_server, f"{s3_run}/{layout.SCORES}"))
    labels = "\n".join(["id,label"] + [f"{key},{'keep' if value < 0.2 else 'reject'}"
                                       for key, value in sorted(scored.items())]) + "\n"
    s3_server.put(f"s3://{BUCKET}/labels/labels.csv", labels.encode())
    calibrated = f"s3://{BUCKET}/calibration"
    code = calibrate_command.main(["--scores", s3_run, "--labels", f"s3://{BUCKET}/labels/labels.csv", "--output", calibrated,
                           "--min_labels", "1", "--bootstrap", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(s3_server.get(f"{calibrated}/{layout.CALIBRATION_JSON}"))
    assert data["overall"]["n_labels"] == len(scored)


def test_sigkill_half_way_then_the_same_command_on_s3(s3_server, tmp_path):
    """A real SIGKILL after the first commit on S3, then the same command (credentials from the environment):
    every row once, the committed rows kept and not scored again."""
    base = demo_table(size=256, with_bad_rows=True)  # 340 rows: two splits, scored for long enough to be cut
    tables = []
    for index in range(10):
        ids = pa.array([f"f{index}/{value}" for value in base.column("id").to_pylist()])
        tables.append(base.set_column(base.schema.get_field_index("id"), "id", ids))
    table = pa.concat_tables(tables)
    source = f"s3://{BUCKET}/kill/in.parquet"
    s3_server.put(source, _parquet_bytes(table, row_group_size=34))
    out = f"s3://{BUCKET}/kill/out"
    env = {**os.environ, **s3_server.env()}
    command = [sys.executable, "-m", "pipeline", "--input", source, "--output", out, "--no_report"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ledger_prefix = f"{out}/{layout.STAGING}/{layout.LEDGER}/{layout.LEDGER_COMMIT_PREFIX}"
    assert wait_for(lambda: process.poll() is not None or bool(s3_server.keys(ledger_prefix)), 180, every=0.1)
    assert process.poll() is None, "the run ended before it could be killed: " + process.communicate()[0][-2000:]
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    from lpips_pipe.transforms.outputs import ledger

    committed = ledger.read_state(out).done_rows
    assert 0 < committed < table.num_rows
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed: kept {committed} rows" in rerun.stdout, rerun.stdout
    scored = int(rerun.stdout.split("scored ")[1].split(",")[0])
    errors = int(rerun.stdout.split("errors ")[1].split(",")[0])
    assert scored + errors == table.num_rows - committed  # the kept rows were not read again
    rows = pa.concat_tables([_read_s3(s3_server, f"{out}/{layout.SCORES}").select(list(SOURCE_COLUMNS)),
                             _read_s3(s3_server, f"{out}/{layout.ERRORS}").select(list(SOURCE_COLUMNS))])
    origins = list(zip(*(rows.column(name).to_pylist() for name in SOURCE_COLUMNS)))
    assert len(origins) == len(set(origins)) == table.num_rows  # every row once
    assert not s3_server.keys(f"{out}/{layout.STAGING}/")


def test_two_launchers_on_one_s3_output_one_gets_it(s3_server):
    out = f"s3://{BUCKET}/locked"
    locks = [job.OutputLock(out), job.OutputLock(out)]
    results: list = [None, None]
    start = threading.Barrier(2)

    def take(index: int) -> None:
        start.wait()
        try:
            locks[index].acquire()
            results[index] = "held"
        except job.JobError as error:
            results[index] = str(error)

    threads = [threading.Thread(target=take, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count("held") == 1, results
    refused = next(result for result in results if result != "held")
    assert "is in use by another run" in refused and out in refused
    holder = locks[results.index("held")]
    assert job.OutputLock(out).holder() is not None
    holder.release()
    assert job.OutputLock(out).holder() is None
    # a lock of a live run elsewhere refuses the job at planning, in one line
    s3_server.put(layout.lock_path(out), b"another-host:1234 abc")
    try:
        with pytest.raises(job.JobError, match="in use by another run"):
            job.OutputLock(out).acquire()
    finally:
        paths.delete([layout.lock_path(out)])


def _bad(s3_server, what: str) -> tuple[list[str], str]:
    """Beam's flags and a bucket for one kind of mistake."""
    if what == "wrong key":
        return [f"--s3_endpoint_url={s3_server.endpoint}", "--s3_access_key_id=nobody",
                "--s3_secret_access_key=wrong", "--s3_region_name=us-east-1"], BUCKET
    if what == "missing bucket":
        return s3_server.flags(), "no-such-bucket"
    return [f"--s3_endpoint_url=http://127.0.0.1:{free_port()}", "--s3_access_key_id=x", "--s3_secret_access_key=y",
            "--s3_region_name=us-east-1"], BUCKET


@pytest.mark.parametrize("what", ["wrong key", "missing bucket", "unreachable endpoint"])
@pytest.mark.parametrize("flag", ["--input", "--output", "--weights", "--skip_existing"])
def test_a_store_that_cannot_be_used_is_one_line_and_exit_2_naming_the_path(flag, what, s3_server, table, tmp_path,
                                                                            capsys, monkeypatch):
    for name in s3_server.env():  # only the flags say where S3 is
        monkeypatch.delenv(name, raising=False)
    flags, bucket = _bad(s3_server, what)
    local = str(tmp_path / "pairs.parquet")
    pq.write_table(table, local)
    uri = {"--input": f"s3://{bucket}/in/*.parquet", "--output": f"s3://{bucket}/out",
           "--weights": f"s3://{bucket}/weights/lpips-alex.pt", "--skip_existing": f"s3://{bucket}/earlier"}[flag]
    argv = {"--input": ["--input", uri, "--output", str(tmp_path / "out")],
            "--output": ["--input", local, "--output", uri]}.get(flag, ["--input", local, "--output",
                                                                        str(tmp_path / "out"), flag, uri])
    started = time.monotonic()
    code = cli.main([*argv, "--no_report", *flags])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    line = _one_line(err)
    assert code == 2 and uri in line, line
    assert len([text for text in err.splitlines() if text.strip()]) == 1, err
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert not os.path.exists(tmp_path / "out" / layout.SCORES)


def test_filter_source_on_an_unreachable_store_is_one_line(s3_server, s3_run, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    source = f"s3://{BUCKET}/run/in/pairs.parquet"
    code = filter_command.main(["--scores", s3_run, "--output", f"s3://{BUCKET}/nowhere", "--threshold", "0.2",
                            "--source", source])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_an_image_on_an_unreachable_store_is_an_error_row_in_bounded_time(s3_server, table, tmp_path, capsys,
                                                                          monkeypatch):
    for name in s3_server.env():
        monkeypatch.delenv(name, raising=False)
    uris = table.slice(0, 2)
    uris = uris.set_column(uris.schema.get_field_index("ref_image"), "ref_image",
                           pa.array([f"s3://{BUCKET}/images/ref-{index}.png" for index in range(2)]))
    uris = uris.set_column(uris.schema.get_field_index("edited_image"), "edited_image",
                           pa.array([f"s3://{BUCKET}/images/edit-{index}.png" for index in range(2)]))
    source = str(tmp_path / "pairs.parquet")
    pq.write_table(uris, source)
    out = str(tmp_path / "out")
    started = time.monotonic()
    code = cli.main(["--input", source, "--output", out, "--no_report",
                     f"--s3_endpoint_url=http://127.0.0.1:{free_port()}", "--s3_access_key_id=x",
                     "--s3_secret_access_key=y", "--s3_region_name=us-east-1"])
    elapsed = time.monotonic() - started
    capsys.readouterr()
    assert code == 3  # every row failed
    errors = pq.read_table(os.path.join(out, layout.ERRORS))
    assert errors.num_rows == 2
    assert all(f"s3://{BUCKET}/images/" in message for message in errors.column("error_message").to_pylist())
    assert elapsed < 120, f"{elapsed:.0f} s"


# --------------------------------------------------------------------------- a stream, and Flink, on S3

PRISM_MISSING = runners.prism_binary() is None and runners.flink_job_server_jar() is None
FLINK_MISSING = runners.flink_job_server_jar() is None


def _written_ids(s3_server, out: str) -> list:
    """The ids of every score and error row under ``out`` on the S3 server."""
    return _s3_ids(s3_server, f"{out}/{layout.SCORES}") + _s3_ids(s3_server, f"{out}/{layout.ERRORS}")


def _s3_ids(server, folder: str) -> list:
    files = [key for key in server.keys(folder.rstrip("/") + "/") if key.endswith(".parquet")]
    return [value for key in files for value in pq.read_table(io.BytesIO(server.get(key))).column("id").to_pylist()]


def _prefixed(table: pa.Table, prefix: str) -> pa.Table:
    ids = pa.array([f"{prefix}/{value}" for value in table.column("id").to_pylist()])
    return table.set_column(table.schema.get_field_index("id"), "id", ids)


def _only_flags_environment(server) -> dict:
    """This process's environment without the AWS variables: only Beam's --s3_* flags say where S3 is, so a
    worker that did not get the job's options could not reach it."""
    return {name: value for name, value in os.environ.items() if name not in server.env()}


@contextlib.contextmanager
def _killed_if_left(process: subprocess.Popen) -> Iterator[None]:
    """The launcher's process group is killed on the way out if it is still running (a failed check, a timeout)."""
    try:
        yield
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _stream(server, root: str, stop_after: int, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "lpips_pipe", "--streaming", "--input", f"{root}/in/*.parquet", "--output",
               f"{root}/out", "--watch_interval", "2", "--watch_stop_after", str(stop_after), "--no_report",
               *server.flags()]
    return subprocess.Popen(command, cwd=cwd, env=_only_flags_environment(server), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.xfail(strict=False, reason="open in issue #28: in 1 of 4 full-suite runs (4 test processes on 2 cores) "
                                        "a stream on Prism watching an S3 prefix read its first file's rows twice; "
                                        "passes alone, also under load (13 of 13 runs)")
@pytest.mark.skipif(PRISM_MISSING, reason="no streaming runner is built here (bash scripts/setup_runners.sh)")
def test_a_stream_watching_an_s3_prefix_scores_each_landed_file_once(s3_server, table, tmp_path):
    """``--streaming --input 's3://.../in/*.parquet' --output s3://.../out``: files that land in the prefix while the
    job runs are scored, every row once, outputs on S3; the same command later reads only the new file."""
    root = f"s3://{BUCKET}/stream"
    first, second, third = _prefixed(table, "a"), _prefixed(table, "b"), _prefixed(table, "c")
    s3_server.put(f"{root}/in/a.parquet", _parquet_bytes(first))
    s3_server.put(f"{root}/in/notes.txt", b"not an input")  # not matched by the glob
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    process = _stream(s3_server, root, 45, cwd)
    with _killed_if_left(process):
        assert wait_for(lambda: process.poll() is not None
                        or len(_s3_ids(s3_server, f"{root}/out/{layout.SCORES}")) >= 1, 90, every=0.5), \
            "nothing was written while the stream ran"
        assert process.poll() is None, process.communicate()[0][-3000:]
        s3_server.put(f"{root}/in/b.parquet", _parquet_bytes(second))
        output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    written = _written_ids(s3_server, f"{root}/out")
    expected = first.column("id").to_pylist() + second.column("id").to_pylist()
    assert sorted(written) == sorted(expected), output[-4000:]  # every row exactly once
    assert "model loads 1" in output and "streaming stopped by itself" in output, output[-4000:]
    assert not list(cwd.iterdir())  # nothing local
    # the same command continues the stream: the files already written are not read again
    s3_server.put(f"{root}/in/c.parquet", _parquet_bytes(third))
    process = _stream(s3_server, root, 15, cwd)
    with _killed_if_left(process):
        output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    written = _written_ids(s3_server, f"{root}/out")
    assert sorted(written) == sorted(expected + third.column("id").to_pylist()), output[-4000:]


@pytest.fixture(scope="module")
def flink_table() -> pa.Table:
    """Ten pairs and two broken rows (no image; bytes that are no image), in row groups of four."""
    table = small_pairs(10, size=48)
    broken = table.slice(0, 2).to_pylist()
    for index, row in enumerate(broken):
        row.update(id=f"broken/{index}", ref_image=b"not an image" if index else None)
    return pa.concat_tables([table, pa.Table.from_pylist(broken, schema=table.schema)])


@pytest.mark.skipif(FLINK_MISSING, reason="the Flink job server is not built here (bash scripts/setup_runners.sh)")
def test_flink_with_inputs_outputs_and_weights_only_on_s3_gives_the_local_runners_rows(s3_server, s3_weights,
                                                                                        flink_table, tmp_path):
    """FlinkRunner (embedded, ``--parallelism 2``, LOOPBACK workers), everything on S3, only Beam's --s3_* flags
    (no AWS variables: the workers reach S3 only if the job's options reached them) gives the local runner's
    rows, every column but where a row came from, the lpips values to the bit; no local path is touched."""
    local = tmp_path / "local"
    local.mkdir()
    pq.write_table(flink_table, str(local / "pairs.parquet"), row_group_size=4)
    assert cli.main(["--input", str(local / "pairs.parquet"), "--output", str(local / "out"), "--no_report"]) == 0
    root = f"s3://{BUCKET}/flink"
    s3_server.put(f"{root}/in/pairs.parquet", _parquet_bytes(flink_table, row_group_size=4))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    command = [sys.executable, "-m", "lpips_pipe", "--input", f"{root}/in/*.parquet", "--output", f"{root}/out",
               "--weights", s3_weights, "--no_report", "--runner", "FlinkRunner", "--flink_master=[local]",
               "--parallelism", "2", "--environment_type=LOOPBACK", *s3_server.flags()]
    process = subprocess.Popen(command, cwd=cwd, env=_only_flags_environment(s3_server), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with _killed_if_left(process):
        output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-4000:]
    assert f"weights from file:{s3_weights}" in output, output[-4000:]
    for kind in (layout.SCORES, layout.ERRORS):
        got = _read_s3(s3_server, f"{root}/out/{kind}")
        want = pq.read_table(os.path.join(local / "out", kind))
        assert set(got.column(layout.SOURCE_FILE_FIELD).to_pylist()) == {f"{root}/in/pairs.parquet"}

        def rows(result: pa.Table) -> list:
            return sorted(result.drop_columns([layout.SOURCE_FILE_FIELD]).to_pylist(), key=lambda row: row["id"])

        assert rows(got) == rows(want), kind  # every other column equal, lpips to the bit
    assert pq.read_table(os.path.join(local / "out", layout.ERRORS)).num_rows == 2
    assert not s3_server.keys(f"{root}/out/{layout.STAGING}/")
    assert not list(cwd.iterdir())  # nothing written where the job was started
