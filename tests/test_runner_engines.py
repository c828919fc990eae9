"""Beam's Flink and Prism runners, as built by ``bash scripts/setup_runners.sh``, with this project's Python SDK.

The option wiring of ``pipeline.runners`` is checked against a fake runners home (fast, always runs). The
engine test runs a small real pipeline in its own process group under a hard timeout: PrismRunner,
``--streaming``, LOOPBACK, PeriodicImpulse into fixed windows, counted per window. The lpips-pipe job itself
on Flink (embedded and a standalone cluster) and on Prism is in tests/test_flink_cli.py and
tests/test_streaming_cli.py. Engine tests skip, naming the set-up step, when the runner is not built.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lpips_pipe.pipeline import runners
from tests import cluster

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------- option wiring


def _options(*args):
    from apache_beam.options.pipeline_options import PipelineOptions
    return PipelineOptions(list(args))


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """An empty runners home; ``build(...)`` lays out what the set-up script would have made."""
    monkeypatch.setenv("LPIPS_PIPE_RUNNERS_HOME", str(tmp_path))
    v = runners.versions()

    def build(prism=False, jar=False, dist=False):
        if prism:
            binary = tmp_path / "prism" / v["PRISM_VERSION"] / "prism"
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)
            (binary.parent / ".complete").write_text(v["PRISM_VERSION"])
        if jar:
            path = tmp_path / "flink" / f"beam-runners-flink-{v['FLINK_MINOR']}-job-server-{v['BEAM_JAVA_VERSION']}.jar"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"PK")
            path.with_name(path.name + ".complete").write_text("x")
        if dist:
            home = tmp_path / "flink" / f"flink-{v['FLINK_DIST_VERSION']}"
            (home / "bin").mkdir(parents=True, exist_ok=True)
            (home / "bin" / "jobmanager.sh").write_text("#!/bin/sh\n")
            (home / ".complete").write_text(v["FLINK_DIST_VERSION"])
        return tmp_path

    return build


def test_versions_file_and_built_in_copy_agree():
    assert runners.versions() == runners._DEFAULT_VERSIONS


def test_nothing_built_means_none_and_one_line_errors_naming_the_set_up_step(fake_home):
    fake_home()
    assert runners.prism_binary() is None
    assert runners.flink_job_server_jar() is None
    assert runners.flink_dist_home() is None
    for argv in (["--runner=FlinkRunner"], ["--runner=PrismRunner", "--streaming"]):
        with pytest.raises(runners.RunnerUnavailable) as error:
            runners.configure_runner(_options(*argv))
        assert runners.SETUP_STEP in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(runners.RunnerUnavailable, match="setup_runners.sh"):
        runners.default_streaming_runner()
    with pytest.raises(runners.RunnerUnavailable, match="setup_runners.sh"):
        with cluster.standalone_flink():
            pass


def test_configure_runner_fills_in_the_local_jar_and_binary(fake_home):
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PrismRunnerOptions
    fake_home(prism=True, jar=True, dist=True)
    assert runners.flink_dist_home() is not None

    flink = _options("--runner=FlinkRunner", "--flink_master=[local]")
    runners.configure_runner(flink)
    assert flink.view_as(FlinkRunnerOptions).flink_job_server_jar == runners.flink_job_server_jar()
    assert flink.view_as(FlinkRunnerOptions).flink_version == runners.versions()["FLINK_MINOR"]

    qualified = _options("--runner=apache_beam.runners.portability.flink_runner.FlinkRunner")
    runners.configure_runner(qualified)
    assert qualified.view_as(FlinkRunnerOptions).flink_job_server_jar == runners.flink_job_server_jar()

    prism = _options("--runner=PrismRunner", "--streaming")
    runners.configure_runner(prism)
    assert prism.view_as(PrismRunnerOptions).prism_location == runners.prism_binary()
    assert runners.default_streaming_runner() == "PrismRunner"


def test_configure_runner_keeps_what_the_user_gave_and_leaves_other_runners_alone(fake_home):
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PrismRunnerOptions
    fake_home()  # nothing built: none of these may need it
    given = _options("--runner=FlinkRunner", "--flink_job_server_jar=/opt/my.jar")
    runners.configure_runner(given)
    assert given.view_as(FlinkRunnerOptions).flink_job_server_jar == "/opt/my.jar"
    runners.configure_runner(_options("--runner=FlinkRunner", "--job_endpoint=localhost:8099"))
    prism = _options("--runner=PrismRunner", "--prism_location=/opt/prism")
    runners.configure_runner(prism)
    assert prism.view_as(PrismRunnerOptions).prism_location == "/opt/prism"
    for argv in ([], ["--runner=FnApiRunner"], ["--runner=DirectRunner"], ["--runner=PortableRunner"]):
        runners.configure_runner(_options(*argv))


def test_flink_version_other_than_the_built_one_is_refused(fake_home):
    fake_home(jar=True)
    with pytest.raises(runners.RunnerUnavailable, match="only the Flink 1.19 job server"):
        runners.configure_runner(_options("--runner=FlinkRunner", "--flink_version=2.0"))
    runners.configure_runner(_options("--runner=FlinkRunner", "--flink_version=1.19"))


def test_default_streaming_runner_falls_back_to_flink(fake_home):
    fake_home(jar=True)
    assert runners.default_streaming_runner() == "FlinkRunner"


# ---------------------------------------------------------------------------------------------- real engines

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no `java` on PATH (Flink needs Java 11/17)")
needs_flink_jar = pytest.mark.skipif(
    runners.flink_job_server_jar() is None,
    reason=f"Flink job server not built: run `{runners.SETUP_STEP}` (needs Java 11+ and Maven)")
needs_flink_dist = pytest.mark.skipif(
    runners.flink_dist_home() is None,
    reason=f"Flink distribution not downloaded: run `{runners.SETUP_STEP}`")
needs_prism = pytest.mark.skipif(
    runners.prism_binary() is None, reason=f"Prism not built: run `{runners.SETUP_STEP}` (needs Go)")

BATCH_PIPELINE = textwrap.dedent("""
    import sys
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from lpips_pipe.pipeline.runners import configure_runner

    options = PipelineOptions(sys.argv[2:])
    configure_runner(options)  # the locally built job-server jar, never a download
    with beam.Pipeline(options=options) as p:
        (p | beam.Create(range(20)) | beam.Map(lambda x: (x % 3, x)) | beam.GroupByKey()
           | beam.MapTuple(lambda k, vs: f"{k}:{sum(vs)}")
           | beam.io.WriteToText(sys.argv[1], shard_name_template=""))
""")
BATCH_EXPECTED = ["0:63", "1:70", "2:57"]

STREAMING_PIPELINE = textwrap.dedent("""
    import os, sys, time, uuid
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms import window
    from apache_beam.transforms.periodicsequence import PeriodicImpulse
    from lpips_pipe.pipeline.runners import configure_runner

    out_dir = sys.argv[1]
    options = PipelineOptions(sys.argv[2:])
    configure_runner(options)

    def write(kv, w=beam.DoFn.WindowParam):
        with open(os.path.join(out_dir, uuid.uuid4().hex), "w") as f:
            f.write(f"{int(w.start)} {kv[1]}\\n")

    start = int(time.time()) + 1.0
    with beam.Pipeline(options=options) as p:
        (p | PeriodicImpulse(start_timestamp=start, stop_timestamp=start + 3, fire_interval=0.5)
           | beam.WindowInto(window.FixedWindows(1))
           | beam.Map(lambda ts: ("impulses", 1))
           | beam.CombinePerKey(sum)
           | beam.Map(write))
""")


def _run_pipeline(tmp_path, source, args, timeout):
    """Run ``source`` as a script in its own process group; kill the whole group on timeout or failure."""
    script = tmp_path / "job.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            cluster.stop_group(process, grace=5.0)
    text = log.read_text(errors="replace")
    assert process.returncode == 0, f"pipeline failed or timed out after {timeout}s:\n{text[-4000:]}"
    return text


@needs_prism
def test_prism_streaming_periodic_impulse(tmp_path):
    out_dir = tmp_path / "windows"
    out_dir.mkdir()
    _run_pipeline(tmp_path, STREAMING_PIPELINE,
                  [str(out_dir), "--runner=PrismRunner", "--streaming", "--environment_type=LOOPBACK"], timeout=120)
    rows = [f.read_text().split() for f in out_dir.iterdir()]
    counts = {}
    for start, count in rows:
        assert start not in counts, f"window {start} fired twice: {rows}"
        counts[start] = int(count)
    assert len(counts) >= 3 and sum(counts.values()) == 6, counts  # 3 s of impulses every 0.5 s, 1 s windows
