"""Beam's Flink and Prism runners as set up on this machine by ``bash scripts/setup_runners.sh``.

Beam's Python SDK fetches these runners itself at run time (the Flink job-server jar from a Maven repository,
the Prism binary from a release page). Offline or behind a registry-only proxy that fails, so the set-up
script builds them once, at the versions of ``runners/versions.env``, into ``$LPIPS_PIPE_RUNNERS_HOME``
(default ``~/.cache/lpips-pipe/runners``), and this module points Beam's options at them:

- :func:`configure_runner` fills ``--flink_job_server_jar`` (FlinkRunner) or ``--prism_location``
  (PrismRunner) when the user did not give them, and raises :class:`RunnerUnavailable` (one line naming the
  set-up step) when the runner is not built, instead of letting Beam try a download;
- :func:`standalone_flink` starts a standalone Flink cluster (JobManager + TaskManager on loopback) from the
  downloaded distribution, for ``--flink_master=HOST:PORT`` runs, and stops it;
- :func:`external_worker_pool` starts Beam's Python worker pool for ``--environment_type=EXTERNAL``.

Only the standard library is imported at module level; Beam's options module is imported when needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, Optional

SETUP_STEP = "bash scripts/setup_runners.sh"

# Same values as runners/versions.env (the file wins when present; tests check that they agree).
_DEFAULT_VERSIONS = {
    "PRISM_VERSION": "v2.77.0",
    "BEAM_JAVA_VERSION": "2.62.0",
    "FLINK_MINOR": "1.19",
    "FLINK_DIST_VERSION": "1.19.3",
}
_VERSIONS_FILE = Path(__file__).resolve().parent.parent / "runners" / "versions.env"


class RunnerUnavailable(Exception):
    """The runner asked for is not built on this machine (or cannot be used as asked); one-line message."""


def versions() -> Dict[str, str]:
    """The pinned runner versions: ``runners/versions.env`` when present, else the built-in copy."""
    found = dict(_DEFAULT_VERSIONS)
    try:
        text = _VERSIONS_FILE.read_text()
    except OSError:
        return found
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Z_][A-Z0-9_]*)=(\S*)\s*$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def runners_home() -> Path:
    """Where the set-up script puts the runners (``$LPIPS_PIPE_RUNNERS_HOME``, default ~/.cache/...)."""
    configured = os.environ.get("LPIPS_PIPE_RUNNERS_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lpips-pipe" / "runners"


def prism_binary() -> Optional[str]:
    """The Prism binary built by the set-up script, or None."""
    path = runners_home() / "prism" / versions()["PRISM_VERSION"] / "prism"
    complete = path.parent / ".complete"
    return str(path) if path.is_file() and os.access(path, os.X_OK) and complete.is_file() else None


def flink_job_server_jar() -> Optional[str]:
    """The Flink job-server jar (main class FlinkJobServerDriver) assembled by the set-up script, or None."""
    v = versions()
    jar = runners_home() / "flink" / f"beam-runners-flink-{v['FLINK_MINOR']}-job-server-{v['BEAM_JAVA_VERSION']}.jar"
    complete = jar.with_name(jar.name + ".complete")
    return str(jar) if jar.is_file() and complete.is_file() else None


def flink_dist_home() -> Optional[str]:
    """FLINK_HOME of the standalone Flink distribution (bin/, conf/, lib/) unpacked by the set-up script."""
    home = runners_home() / "flink" / f"flink-{versions()['FLINK_DIST_VERSION']}"
    ready = (home / "bin" / "jobmanager.sh").is_file() and (home / ".complete").is_file()
    return str(home) if ready else None


def _missing(what: str) -> RunnerUnavailable:
    return RunnerUnavailable(f"{what} is not set up on this machine; run `{SETUP_STEP}` first "
                             f"(it builds it into {runners_home()})")


def _runner_name(runner: object) -> str:
    """'FlinkRunner' for 'FlinkRunner', 'apache_beam...flink_runner.FlinkRunner' or a FlinkRunner instance."""
    if runner is None:
        return ""
    if not isinstance(runner, str):
        runner = type(runner).__name__
    return runner.rsplit(".", 1)[-1]


def configure_runner(pipeline_options) -> None:
    """Point Beam's FlinkRunner / PrismRunner options at the locally built runner (in place).

    FlinkRunner without ``--flink_job_server_jar`` or ``--job_endpoint``: sets ``flink_job_server_jar`` and
    ``flink_version`` to the local Flink job server. PrismRunner without ``--prism_location`` or
    ``--job_endpoint``: sets ``prism_location`` to the local binary. Other runners: nothing. Raises
    :class:`RunnerUnavailable` when the needed jar or binary is missing (Beam would try to download it).
    """
    from apache_beam.options.pipeline_options import (FlinkRunnerOptions, PortableOptions, PrismRunnerOptions,
                                                      StandardOptions)

    name = _runner_name(pipeline_options.view_as(StandardOptions).runner)
    portable = pipeline_options.view_as(PortableOptions)
    if name == "FlinkRunner":
        flink = pipeline_options.view_as(FlinkRunnerOptions)
        if flink.flink_job_server_jar or portable.job_endpoint:
            return
        minor = versions()["FLINK_MINOR"]
        explicit = pipeline_options.get_all_options(drop_default=True).get("flink_version")
        if explicit and explicit != minor:
            raise RunnerUnavailable(f"--flink_version={explicit}: only the Flink {minor} job server is set up here "
                                    f"(drop the flag, or pass --flink_job_server_jar / --job_endpoint)")
        jar = flink_job_server_jar()
        if jar is None:
            raise _missing(f"Beam's Flink {minor} job server")
        flink.flink_job_server_jar = jar
        flink.flink_version = minor
    elif name == "PrismRunner":
        prism = pipeline_options.view_as(PrismRunnerOptions)
        if prism.prism_location or portable.job_endpoint:
            return
        binary = prism_binary()
        if binary is None:
            raise _missing("Beam's Prism runner")
        prism.prism_location = binary


def default_streaming_runner() -> str:
    """'PrismRunner' when Prism is built, else 'FlinkRunner' (embedded, ``--flink_master=[local]``) when the
    Flink job server is; raises :class:`RunnerUnavailable` when neither is."""
    if prism_binary():
        return "PrismRunner"
    if flink_job_server_jar():
        return "FlinkRunner"
    raise _missing("No streaming runner (Prism or Flink)")


# ------------------------------------------------------------------------------------------------ processes

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group started for ``process`` (start_new_session), SIGKILL what outlives ``grace``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # children left in the group (also after a clean exit)
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
    """The ``env.java.opts.all`` line of the distribution's config (the --add-opens Java 17 needs)."""
    try:
        text = (Path(home) / "conf" / "config.yaml").read_text()
    except OSError:
        return ""
    match = re.search(r"^\s*all:\s*(--add-\S.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


@contextlib.contextmanager
def standalone_flink(port: Optional[int] = None, slots: int = 2, startup_timeout: float = 120.0,
                     log_dir: Optional[str] = None) -> Iterator[FlinkCluster]:
    """Start a Flink JobManager and one TaskManager (``slots`` slots) on 127.0.0.1 from the set-up script's
    distribution, wait until the TaskManager has registered, yield a :class:`FlinkCluster`, stop both.

    ``port`` is the REST port (``--flink_master=127.0.0.1:PORT``; a free one when None). Processes run in
    the foreground of their own sessions and are stopped by process group, also on errors.
    """
    home = flink_dist_home()
    if home is None:
        raise _missing(f"The Flink {versions()['FLINK_DIST_VERSION']} distribution (standalone cluster)")
    if shutil.which("java") is None:
        raise RunnerUnavailable("no `java` on PATH: a standalone Flink cluster needs Java 11 or 17")
    rest_port = port or free_port()
    rpc_port = free_port()
    conf_dir = tempfile.mkdtemp(prefix="lpips-pipe-flink-conf-")
    logs = Path(log_dir or tempfile.mkdtemp(prefix="lpips-pipe-flink-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(Path(home) / "conf"):
        if name.startswith(("log4j", "logback")):
            shutil.copy(Path(home) / "conf" / name, conf_dir)
    java_opts = _java_opts(home)
    Path(conf_dir, "config.yaml").write_text(
        "env:\n"
        "  java:\n"
        "    opts:\n"
        f"      all: {java_opts}\n"
        "  log:\n"
        f"    dir: {logs}\n"
        "jobmanager:\n"
        "  bind-host: 127.0.0.1\n"
        "  rpc:\n"
        "    address: 127.0.0.1\n"
        f"    port: {rpc_port}\n"
        "  memory:\n"
        "    process:\n"
        "      size: 1024m\n"
        "taskmanager:\n"
        "  bind-host: 127.0.0.1\n"
        "  host: 127.0.0.1\n"
        f"  numberOfTaskSlots: {int(slots)}\n"
        "  memory:\n"
        "    process:\n"
        "      size: 2048m\n"
        "    network:\n"  # Beam's graphs have many operators; Flink's default leaves too few buffers
        "      min: 256mb\n"
        "      max: 256mb\n"
        "parallelism:\n"
        "  default: 1\n"
        "rest:\n"
        "  address: 127.0.0.1\n"
        "  bind-address: 127.0.0.1\n"
        f"  port: {rest_port}\n"
        "io:\n"
        f"  tmp:\n    dirs: {conf_dir}\n")
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
                    raise RuntimeError(f"Flink {role} exited with {process.returncode} while starting: "
                                       f"{_tail(logs / f'{role}.out')}")
            with contextlib.suppress(OSError, ValueError):
                if cluster.overview().get("slots-available", 0) >= 1:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flink cluster not ready after {startup_timeout:.0f}s; logs in {logs}")
            time.sleep(0.5)
        yield cluster
    finally:
        for process in reversed(processes):
            _stop_group(process)
        shutil.rmtree(conf_dir, ignore_errors=True)


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
        _stop_group(process, grace=5.0)
        if log is not subprocess.DEVNULL:
            log.close()
