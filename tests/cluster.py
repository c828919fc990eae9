"""Local clusters for the runner tests: a standalone Flink cluster and Beam's external Python worker pool.

Test code only (``MANIFEST.in`` prunes ``tests/``, so workers never get it); the job itself needs only
:mod:`pipeline.runners`. Every process starts in its own session and is stopped by its process group.

- :func:`standalone_flink` starts a Flink JobManager and TaskManager on loopback from the distribution that
  ``bash scripts/setup_runners.sh`` unpacks, for ``--flink_master=HOST:PORT`` runs, and stops them;
- :func:`external_worker_pool` starts Beam's Python worker pool for ``--environment_type=EXTERNAL``;
- :func:`free_port` and :func:`stop_group` are the small process helpers they (and the tests) share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import yaml

from lpips_pipe.pipeline import runners


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group started for ``process`` (start_new_session), SIGKILL what outlives ``grace``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while children it started (SDK workers) still run in its group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class FlinkCluster:
    """A running standalone cluster: pass ``--flink_master=<master>`` to Beam's FlinkRunner."""
    master: str          # "127.0.0.1:PORT" (REST endpoint)
    rest_url: str        # "http://127.0.0.1:PORT"
    home: str            # FLINK_HOME it runs from
    conf_dir: str        # its private FLINK_CONF_DIR
    log_dir: str         # jobmanager.out / taskmanager.out

    def overview(self) -> dict:
        with urllib.request.urlopen(self.rest_url + "/overview", timeout=5) as reply:
            return json.load(reply)


def _java_opts(home: str) -> str:
    """``env.java.opts.all`` of the distribution's ``conf/config.yaml`` (the --add-opens Java 17 needs), nested
    or as one dotted key; "" when the file or the key is missing."""
    try:
        config = yaml.safe_load((Path(home) / "conf" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    if "env.java.opts.all" in config:
        return str(config["env.java.opts.all"] or "").strip()
    value = config
    for key in ("env", "java", "opts", "all"):
        value = value.get(key) if isinstance(value, dict) else None
    return str(value or "").strip()


def _flink_config(java_opts: str, log_dir: str, tmp_dir: str, rest_port: int, rpc_port: int, slots: int) -> dict:
    """The cluster's ``config.yaml`` as nested maps (Flink 1.19's standard YAML): everything on 127.0.0.1."""
    env: dict = {"java": {"opts": {"all": java_opts}}} if java_opts else {}
    env["log"] = {"dir": log_dir}
    return {
        "env": env,
        "jobmanager": {"bind-host": "127.0.0.1", "rpc": {"address": "127.0.0.1", "port": rpc_port},
                       "memory": {"process": {"size": "1024m"}}},
        "taskmanager": {"bind-host": "127.0.0.1", "host": "127.0.0.1", "numberOfTaskSlots": int(slots),
                        # Beam's graphs have many operators; Flink's default network memory leaves too few buffers
                        "memory": {"process": {"size": "2048m"}, "network": {"min": "256mb", "max": "256mb"}}},
        "parallelism": {"default": 1},
        "rest": {"address": "127.0.0.1", "bind-address": "127.0.0.1", "port": rest_port},
        "io": {"tmp": {"dirs": tmp_dir}},
    }


@contextlib.contextmanager
def standalone_flink(port: Optional[int] = None, slots: int = 2, startup_timeout: float = 120.0,
                     log_dir: Optional[str] = None) -> Iterator[FlinkCluster]:
    """Start a Flink JobManager and one TaskManager (``slots`` slots) on 127.0.0.1 from the set-up script's
    distribution, wait until the TaskManager has registered, yield a :class:`FlinkCluster`, stop both.

    ``port`` is the REST port (``--flink_master=127.0.0.1:PORT``; a free one when None). Processes run in
    the foreground of their own sessions and are stopped by process group, also on errors. Raises
    :class:`pipeline.runners.RunnerUnavailable` when the distribution or ``java`` is missing.
    """
    home = runners.flink_dist_home()
    if home is None:
        raise runners.not_set_up(f"The Flink {runners.versions()['FLINK_DIST_VERSION']} distribution "
                                 "(standalone cluster)")
    if shutil.which("java") is None:
        raise runners.RunnerUnavailable("no `java` on PATH: a standalone Flink cluster needs Java 11 or 17")
    logs = Path(log_dir or tempfile.mkdtemp(prefix="lpips-pipe-flink-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    for attempt in range(1 if port else 3):  # a free port can be taken by another process before Flink binds it
        try:
            processes, cluster = _start_cluster(home, logs, port or free_port(), free_port(), slots, startup_timeout)
            break
        except PortTaken:
            if port or attempt == 2:
                raise
    try:
        yield cluster
    finally:
        for process in reversed(processes):
            stop_group(process)
        shutil.rmtree(cluster.conf_dir, ignore_errors=True)


class PortTaken(RuntimeError):
    """A Flink process could not bind its port (``java.net.BindException`` in its log)."""


def _start_cluster(home: str, logs: Path, rest_port: int, rpc_port: int, slots: int,
                   startup_timeout: float) -> tuple[list[subprocess.Popen], FlinkCluster]:
    """Start the JobManager and the TaskManager and wait until a slot is available; on any failure both are
    stopped and their configuration removed (:class:`PortTaken` when a port was taken meanwhile)."""
    conf_dir = tempfile.mkdtemp(prefix="lpips-pipe-flink-conf-")
    for name in os.listdir(Path(home) / "conf"):
        if name.startswith(("log4j", "logback")):
            shutil.copy(Path(home) / "conf" / name, conf_dir)
    config = _flink_config(_java_opts(home), str(logs), conf_dir, rest_port, rpc_port, slots)
    Path(conf_dir, "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, width=1 << 16))
    env = dict(os.environ, FLINK_HOME=home, FLINK_CONF_DIR=conf_dir, FLINK_LOG_DIR=str(logs))
    env.pop("FLINK_ENV_JAVA_OPTS", None)
    processes = []
    cluster = FlinkCluster(master=f"127.0.0.1:{rest_port}", rest_url=f"http://127.0.0.1:{rest_port}",
                           home=home, conf_dir=conf_dir, log_dir=str(logs))
    try:
        for role in ("jobmanager", "taskmanager"):
            with open(logs / f"{role}.out", "wb") as out:
                processes.append(subprocess.Popen(
                    [str(Path(home) / "bin" / f"{role}.sh"), "start-foreground"], env=env, cwd=conf_dir,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + startup_timeout
        while True:
            for role, process in zip(("jobmanager", "taskmanager"), processes):
                if process.poll() is not None:
                    log = (logs / f"{role}.out").read_text(errors="replace")
                    error = PortTaken if "java.net.BindException" in log else RuntimeError
                    raise error(f"Flink {role} exited with {process.returncode} while starting: "
                                f"{_tail(logs / f'{role}.out')}")
            with contextlib.suppress(OSError, ValueError):
                if cluster.overview().get("slots-available", 0) >= 1:
                    return processes, cluster
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flink cluster not ready after {startup_timeout:.0f}s; logs in {logs}")
            time.sleep(0.5)
    except BaseException:
        for process in reversed(processes):
            stop_group(process)
        shutil.rmtree(conf_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def external_worker_pool(port: Optional[int] = None, startup_timeout: float = 60.0,
                         log_path: Optional[str] = None) -> Iterator[str]:
    """Beam's Python worker pool (``worker_pool_main``) with this interpreter's ``bin`` first on PATH (it
    starts workers as plain ``python``); yields ``localhost:PORT`` for ``--environment_config``."""
    port = port or free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"worker_pool_main exited with {process.returncode} while starting")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker_pool_main not listening on {port} after {startup_timeout:.0f}s")
            time.sleep(0.3)
        yield f"localhost:{port}"
    finally:
        stop_group(process, grace=5.0)
        if log is not subprocess.DEVNULL:
            log.close()
