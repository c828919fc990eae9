"""WebDataset shards against Parquet: the same pairs, end to end and reading alone.

    .venv/bin/python benchmarks/shards_bench.py [--pairs 600] [--size 512] [--repeats 2] [--shards 4]
    .venv/bin/python benchmarks/shards_bench.py --pairs 64 --repeats 1          # a quick check (~1 min)

Builds N pairs of SIZE x SIZE real photographs (``benchmarks/bench.py``'s pairs: distinct crops of the demo
photos, the demo's four edits in turn, one box each), every other reference and its edit re-encoded as JPEG
(so both PNG and JPEG members), and writes them three ways (cached in ``bench_out/shards/``): one Parquet file
(row groups of 64), ``--shards`` ``.tar`` shards and as many ``.tar.gz`` shards (``transforms.webdataset.write_shard``:
``<key>.ref_image.<ext>``, ``<key>.edited_image.<ext>``, ``<key>.json``). Then:

- read: every row of each input through the job's reader (``ReadInputSplit`` over the planned splits,
  planning included), in this process, best of 3; rows/s and MB/s of image bytes;
- e2e: ``python -m pipeline --input ... --output ... --overwrite --no_report`` on each, fresh processes,
  the variants alternating, ``--repeats`` rounds; wall seconds (best and median), whole-process pairs/s and
  CPU seconds (user + system of the process and its threads: less sensitive than wall time to other load on a
  shared machine), and the ratios to Parquet; the scores of every variant are checked to be bit-identical to
  Parquet's.

Prints a table. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

VARIANTS = ("parquet", "tar", "tar.gz")


def _jpeg(data: bytes) -> bytes:
    from PIL import Image

    from lpips_pipe.pipeline.demo import encode

    with Image.open(io.BytesIO(data)) as image:
        return encode(image.convert("RGB"), "JPEG")


def build(folder: str, pairs: int, size: int, shards: int) -> dict[str, str]:
    """The three inputs (built once per pairs/size/shards), as ``{variant: --input}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench import make_pairs
    from lpips_pipe.pipeline.demo import PAIRS_SCHEMA
    from lpips_pipe.transforms.inputs import webdataset

    os.makedirs(folder, exist_ok=True)
    tag = f"{pairs}x{size}-{shards}"
    parquet = os.path.join(folder, f"pairs-{tag}.parquet")
    inputs = {"parquet": parquet, "tar": os.path.join(folder, f"tar-{tag}", "*.tar"),
              "tar.gz": os.path.join(folder, f"targz-{tag}", "*.tar.gz")}
    if all(os.path.exists(os.path.dirname(path) if "*" in path else path) for path in inputs.values()):
        return inputs
    png = os.path.join(folder, f"png-{tag}.parquet")
    make_pairs(png, pairs, size, edits=1)
    rows = pq.read_table(png).to_pylist()
    os.remove(png)
    for index, row in enumerate(rows):  # every other pair as JPEG: PNG and JPEG members
        if index % 2:
            row["ref_image"], row["edited_image"] = _jpeg(row["ref_image"]), _jpeg(row["edited_image"])
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA), parquet, row_group_size=64)
    per = -(-len(rows) // shards)
    for variant, suffix in (("tar", ".tar"), ("tar.gz", ".tar.gz")):
        directory = os.path.dirname(inputs[variant])
        os.makedirs(directory, exist_ok=True)
        for shard in range(shards):
            part = rows[shard * per:(shard + 1) * per]
            webdataset.write_shard(os.path.join(directory, f"shard-{shard:05d}{suffix}"), part,
                               keys=[f"{shard:05d}/{shard * per + i:06d}" for i in range(len(part))])
    return inputs


def read_rate(pattern: str) -> tuple[float, int, int]:
    """Best-of-3 seconds to plan and read every row of ``pattern`` through the job's reader; rows, image bytes."""
    from lpips_pipe.transforms.inputs.files import ReadInputSplit, match_inputs, plan_files

    best, rows, data = float("inf"), 0, 0
    for _ in range(3):
        start = time.perf_counter()
        _, splits = plan_files(match_inputs(pattern))
        reader = ReadInputSplit("id", ("ref_image", "edited_image"), with_source=True)
        rows = data = 0
        for split in splits:
            for _, row in reader.process(split):
                rows += 1
                data += len(row["ref_image"]) + len(row["edited_image"])
        best = min(best, time.perf_counter() - start)
    return best, rows, data


def run_job(pattern: str, out: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the child's) of one ``python -m pipeline`` run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "--input", pattern, "--output", out, "--overwrite",
                    "--no_report", "--progress_interval_s", "0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def scores_of(out: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(out, "scores"), columns=["id", "lpips"])
    return dict(zip(table.column("id").to_pylist(), table.column("lpips").to_pylist()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "bench_out", "shards"))
    args = parser.parse_args(argv)
    variants = [name for name in args.variants.split(",") if name]
    inputs = build(args.workdir, args.pairs, args.size, args.shards)
    print(f"{args.pairs} pairs of {args.size}x{args.size} (half PNG, half JPEG); {args.shards} shards; "
          f"{os.cpu_count()} cores; load average before {os.getloadavg()[0]:.2f}", flush=True)
    reads = {name: read_rate(inputs[name]) for name in variants}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.repeats):
        for name in variants:
            out = os.path.join(args.workdir, f"out-{name}")
            wall, cpu = run_job(inputs[name], out)
            walls[name].append(wall)
            cpus[name].append(cpu)
            print(f"  round {round_index + 1}: {name:8s} {wall:7.1f} s wall, {cpu:7.1f} s CPU, load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    reference = scores_of(os.path.join(args.workdir, "out-parquet")) if "parquet" in variants else None
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print()
    print("| input | read only: rows/s | read MB/s | e2e wall s (best) | e2e wall s (median) | pairs/s (best) "
          "| vs Parquet (best wall) | e2e CPU s (best) | vs Parquet (best CPU) | scores |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    base = min(walls["parquet"]) if "parquet" in walls else None
    base_cpu = min(cpus["parquet"]) if "parquet" in cpus else None
    for name in variants:
        seconds, rows, data = reads[name]
        best, median = min(walls[name]), statistics.median(walls[name])
        ratio = f"{(best / base - 1) * 100:+.1f}%" if base else ""
        cpu = min(cpus[name])
        cpu_ratio = f"{(cpu / base_cpu - 1) * 100:+.1f}%" if base_cpu else ""
        same = ""
        if reference is not None:
            got = scores_of(os.path.join(args.workdir, f"out-{name}"))
            same = "bit-identical" if got == reference else f"DIFFER ({len(set(got.items()) ^ set(reference.items()))})"
        print(f"| {name} | {rows / seconds:,.0f} | {data / seconds / 2**20:,.0f} | {best:.1f} | {median:.1f} | "
              f"{args.pairs / best:.2f} | {ratio} | {cpu:.1f} | {cpu_ratio} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
