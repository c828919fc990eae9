"""Beam's Flink and Prism runners as set up on this machine by ``bash scripts/setup_runners.sh``.

Beam's Python SDK fetches these runners itself at run time (the Flink job-server jar from a Maven repository,
the Prism binary from a release page). Offline or behind a registry-only proxy that fails, so the set-up
script builds them once, at the versions of ``runners/versions.env``, into ``$LPIPS_PIPE_RUNNERS_HOME``
(default ``~/.cache/lpips-pipe/runners``), and this module points Beam's options at them:

- :func:`configure_runner` fills ``--flink_job_server_jar`` (FlinkRunner) or ``--prism_location``
  (PrismRunner) when the user did not give them, and raises :class:`RunnerUnavailable` (one line naming the
  set-up step) when the runner is not built, instead of letting Beam try a download;
- :func:`default_streaming_runner` picks the streaming runner that is built (Prism, else embedded Flink);
- :func:`flink_dist_home` finds the unpacked Flink distribution (the tests' standalone cluster,
  ``tests/cluster.py``);
- :func:`record_runner_processes` notes the runner processes a run started, so that the next run into the same
  output stops them if the run was killed and left them orphaned (:func:`stop_orphaned_runners`).

Beam's options module is imported when needed.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Dict, Optional

from lpips_pipe.transforms import paths
from lpips_pipe.transforms.outputs import layout

SETUP_STEP = "bash scripts/setup_runners.sh"

# Same values as runners/versions.env (the file wins when present; tests check that they agree).
_DEFAULT_VERSIONS = {
    "PRISM_VERSION": "v2.77.0",
    "BEAM_JAVA_VERSION": "2.62.0",
    "FLINK_MINOR": "1.19",
    "FLINK_DIST_VERSION": "1.19.3",
    "VERSITYGW_VERSION": "v1.8.0",
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


# What `bash scripts/setup_runners.sh <piece>` builds, with what, and roughly how long the first time (a rerun
# with the piece in place takes a second).
BUILDS = {
    "prism": "Go >= 1.26 builds it from Beam's Go module, a few minutes the first time",
    "flink": "Java 11/17 and Maven assemble the job-server jar, and the Flink distribution (~235 MB) is fetched "
             "with pip: about 5 minutes the first time",
}


def not_set_up(what: str, piece: str = "") -> RunnerUnavailable:
    """The one-line error for a piece the set-up script builds that is not built here: the command that builds
    it (only that ``piece``, ``prism`` or ``flink``, when named), what it needs and roughly how long."""
    step = f"{SETUP_STEP} {piece}" if piece else SETUP_STEP
    how = BUILDS.get(piece, "Prism with Go, Flink with Java and Maven: a few minutes the first time")
    return RunnerUnavailable(f"{what} is not set up on this machine; run `{step}` first ({how}; it builds into "
                             f"{runners_home()})")


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
            raise not_set_up(f"Beam's Flink {minor} job server", "flink")
        flink.flink_job_server_jar = jar
        flink.flink_version = minor
    elif name == "PrismRunner":
        prism = pipeline_options.view_as(PrismRunnerOptions)
        if prism.prism_location or portable.job_endpoint:
            return
        binary = prism_binary()
        if binary is None:
            raise not_set_up("Beam's Prism runner", "prism")
        prism.prism_location = binary


def default_streaming_runner() -> str:
    """'PrismRunner' when Prism is built, else 'FlinkRunner' (embedded, ``--flink_master=[local]``) when the
    Flink job server is; raises :class:`RunnerUnavailable` when neither is."""
    if prism_binary():
        return "PrismRunner"
    if flink_job_server_jar():
        return "FlinkRunner"
    raise not_set_up("A streaming runner (Prism, else Flink)", "prism")


# --------------------------------------------------------------------------- runner processes of a killed run


def _proc_children(parent: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the processes whose parent is ``parent`` (Linux ``/proc``; else none)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent:
            found.append((int(entry), command))
    return found


def record_runner_processes(output: str) -> None:
    """Note the locally built runner processes this run started (Prism, the Flink job server), so that if the
    run is killed (SIGKILL leaves them running, orphaned) the next run into ``output`` stops them."""
    if not paths.is_local(output):
        return
    home = str(runners_home())
    pids = [str(pid) for pid, command in _proc_children(os.getpid()) if home in command]
    if pids:
        os.makedirs(layout.staging_dir(output), exist_ok=True)
        with open(layout.runner_pids_path(output), "w", encoding="utf-8") as handle:
            handle.write(" ".join(pids))


def forget_runner_processes(output: str) -> None:
    """The run ended here (its runners stopped with it): nothing to stop next time."""
    path = layout.runner_pids_path(output)
    if paths.is_local(output) and os.path.exists(path):
        os.remove(path)


def stop_orphaned_runners(output: str) -> int:
    """Stop the runner processes a killed earlier run into ``output`` left behind (recorded by
    :func:`record_runner_processes`, still alive, orphaned and still that runner); returns how many."""
    path = layout.runner_pids_path(output)
    if not paths.is_local(output) or not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as handle:
        pids = {int(word) for word in handle.read().split() if word.isdigit()}
    os.remove(path)
    home = str(runners_home())
    stopped = 0
    for pid, command in _proc_children(1):
        if pid in pids and home in command:
            try:
                os.kill(pid, signal.SIGKILL)
                stopped += 1
            except OSError:
                pass
    return stopped

