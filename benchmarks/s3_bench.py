"""What object storage costs: the same 480-pair job on local disk and all on S3 (versitygw on loopback), in one run.

    .venv/bin/python benchmarks/s3_bench.py [--pairs 480] [--size 512] [--workdir bench_out/s3]

Builds ``--pairs`` pairs of ``--size`` px real photographs (``benchmarks/bench.py``'s ``make_pairs``, cached in
the work folder), starts versitygw (``scripts/setup_runners.sh`` builds it) on a free 127.0.0.1 port over a
folder of the work folder (``tests/s3_server.py``'s server), uploads the input Parquet, then runs
``python -m pipeline`` four times, each in a fresh process, one after the other on this machine:

- local ``--no_report``: input and output on local disk;
- S3 ``--no_report``: input, output (and so the ledger, staged and published files) on S3, Beam's ``--s3_*``
  flags;
- local with the report page (the job's own report: page, histogram, gallery tiles);
- S3 with the report page.

With ``--repeat N`` each pair of jobs runs N times in turn (local, S3, local, S3, ...) and the fastest of each
is kept: the machine may be shared. Prints wall seconds, the S3/local ratios against the targets (<= 1.35x without the report, <= 2x with it) and
the S3 requests of each S3 run, by operation and by kind of object (``transforms.paths.s3_requests`` and its
request hook, counted in the job's process, where the in-process runner's workers run too): per committed
file (staged Parquet files and ledger commit records) and per published file (``scores/``, ``errors/``).
Scores are checked equal to the bit between the local and the S3 runs. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "lpips-bench"
TARGETS = {"no_report": 1.35, "report": 2.0}


def _kind(url: str, output_key: str) -> str:
    """Which kind of object a request's URL names (the run's output prefix is ``output_key``)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    path = unquote(parts.path).lstrip("/")
    query = unquote(parts.query)
    key = path.partition("/")[2]
    if not key and "prefix=" in query:  # a listing: what it lists
        key = query.split("prefix=", 1)[1].split("&", 1)[0]
    if not key.startswith(output_key):
        return "input" if key else "bucket"
    rest = key[len(output_key):].lstrip("/")
    if rest.startswith("_staging/ledger") or "/ledger/" in rest:
        return "ledger"
    if rest.startswith("_"):
        return "staging"
    for name in ("scores", "errors", "report"):
        if rest.startswith(name):
            return name
    return "output-other"


def part_job(argv: list[str], output: str) -> dict:
    """``python -m pipeline argv`` in this (fresh) process, with the S3 requests counted by operation and kind."""
    from lpips_pipe.pipeline import cli
    from lpips_pipe.transforms import paths

    output_key = output[len("s3://"):].partition("/")[2] if output.startswith("s3://") else ""
    counts: collections.Counter = collections.Counter()
    paths.add_s3_request_hook(lambda operation, url: counts.update([(operation, _kind(url, output_key))]))
    sys.argv = ["lpips-pipe", *argv]
    start = time.perf_counter()
    code = cli.console_main()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"python -m pipeline exited {code}")
    return {"wall_in_process_s": wall, "requests": paths.s3_requests(),
            "by": [[operation, kind, count] for (operation, kind), count in sorted(counts.items())]}


def run_job(argv: list[str], output: str) -> tuple[float, dict]:
    """One job in a fresh process: (wall seconds of the whole process, its counts)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--part", "job", "--out", output, "--", *argv], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"job {argv} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def _scores(server, output: str) -> tuple[dict, int, int]:
    """(id -> lpips bits, published score files, published error files) of an output, local or S3."""
    import pyarrow.parquet as pq

    if output.startswith("s3://"):
        def files(kind):
            return [key for key in server.keys(f"{output}/{kind}/") if key.endswith(".parquet")]

        def read(key):
            return pq.read_table(io.BytesIO(server.get(key)))
    else:
        def files(kind):
            folder = Path(output) / kind
            return sorted(str(path) for path in folder.glob("*.parquet")) if folder.is_dir() else []

        read = pq.read_table
    scores = {}
    for key in files("scores"):
        table = read(key)
        scores.update(zip(table.column("id").to_pylist(), table.column("lpips").to_pylist()))
    return scores, len(files("scores")), len(files("errors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=480)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", default=str(ROOT / "bench_out" / "s3"))
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each job this many times, local and S3 in turn; the fastest of each is kept")
    parser.add_argument("--part", choices=["job"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "job":
        print(json.dumps(part_job(args.rest, args.out)))
        return

    from benchmarks.bench import make_pairs
    from tests import s3_server

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pairs = work / f"pairs-{args.pairs}-{args.size}.parquet"
    if not pairs.exists():
        print(f"making {args.pairs} pairs of {args.size} px ...", flush=True)
        make_pairs(str(pairs), args.pairs, args.size)
    binary = s3_server.versitygw_binary()
    if binary is None:
        raise SystemExit("versitygw is not built here (bash scripts/setup_runners.sh builds it)")
    data = work / "versitygw" / "data"
    if data.exists():
        import shutil

        shutil.rmtree(data)
    server = s3_server.start(data, binary)
    try:
        server.make_bucket(BUCKET)
        source = server.put(f"s3://{BUCKET}/in/{pairs.name}", pairs.read_bytes())
        flags = [f"--s3_endpoint_url={server.endpoint}", f"--s3_access_key_id={server.access_key}",
                 f"--s3_secret_access_key={server.secret_key}", f"--s3_region_name={s3_server.REGION}"]
        runs: dict = {}
        for report, _ in [(report, turn) for report in ("no_report", "report") for turn in range(args.repeat)]:
            extra = ["--no_report"] if report == "no_report" else []
            for where in ("local", "s3"):
                out = str(work / f"out-{report}") if where == "local" else f"s3://{BUCKET}/out-{report}"
                argv = ["--input", str(pairs) if where == "local" else source, "--output", out, "--overwrite",
                        *extra, *(flags if where == "s3" else [])]
                wall, counts = run_job(argv, out)
                scores, score_files, error_files = _scores(server, out)
                if (report, where) not in runs or wall < runs[(report, where)]["wall"]:
                    runs[(report, where)] = dict(wall=wall, counts=counts, scores=scores,
                                                 files=score_files + error_files)
                print(f"  {report:9s} {where:5s} {wall:6.1f} s  ({len(scores)} scores, "
                      f"{score_files + error_files} published files, {counts['requests']} S3 requests)", flush=True)
    finally:
        server.stop()

    print()
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        if line.startswith("Model name")), "?")
    print(f"{args.pairs} pairs of {args.size} px, CPU {cpu}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    print("| run | local disk | S3 | S3 / local | target |")
    print("| --- | --- | --- | --- | --- |")
    for report, label in (("no_report", "`--no_report`"), ("report", "with the report page")):
        local, remote = runs[(report, "local")], runs[(report, "s3")]
        ratio = remote["wall"] / local["wall"]
        verdict = "met" if ratio <= TARGETS[report] else "MISSED"
        print(f"| {label} | {local['wall']:.1f} s | {remote['wall']:.1f} s | {ratio:.2f}x | "
              f"<= {TARGETS[report]}x ({verdict}) |")
        same = local["scores"] == remote["scores"] and len(local["scores"]) > 0
        if not same:
            print(f"  SCORES DIFFER between local and S3 ({report})")
    print()
    for report in ("no_report", "report"):
        remote = runs[(report, "s3")]
        by_kind: collections.Counter = collections.Counter()
        by_operation: collections.Counter = collections.Counter()
        for operation, kind, count in remote["counts"]["by"]:
            by_kind[kind] += count
            by_operation[(kind, operation)] += count
        published = remote["files"]
        ledger_puts = by_operation[("ledger", "PutObject")]
        staged_puts = by_operation[("staging", "PutObject")]
        committed = staged_puts  # one PutObject per staged file (objects under 5 MB)
        print(f"S3, {report}: {remote['counts']['requests']} requests: "
              + ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind.items())))
        for (kind, operation), count in sorted(by_operation.items()):
            print(f"    {kind:8s} {operation:24s} {count}")
        if committed:
            print(f"  per committed file: {(by_kind['staging'] + ledger_puts) / committed:.2f} requests "
                  f"({committed} staged files, {ledger_puts} ledger records; staging {by_kind['staging']} "
                  f"requests incl. the publish's reads and deletes of staged files)")
        if published:
            print(f"  per published file: {(by_kind['scores'] + by_kind['errors']) / published:.2f} requests "
                  f"to the published keys ({published} files), plus the staged side of each move")


if __name__ == "__main__":
    main()
