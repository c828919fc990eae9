"""Throughput benchmark: the seed's per-pair loop vs the stage, on the same real-photo pairs.

    .venv/bin/python benchmarks/bench.py [--pairs 600] [--size 512] [--precisions fp32,bf16]

Builds N pairs of SIZE x SIZE PNG real photographs with one box each (cached in
bench_out/), then, each in a fresh process so start-up and peak RSS are whole-process:

- seed: the original module's way (tests/seed_reference.py: PIL decode, numpy composite,
  ``lpips.LPIPS.forward`` per pair with autograd on, area normalisation);
- model: the stage's model alone on pre-decoded arrays, batched (pairs/s and GFLOP/s
  against a measured sgemm peak);
- e2e-<precision>: ``python -m pipeline`` on the Parquet file (DirectRunner), whole process,
  plus a run on a quarter of the file to get the steady-state (marginal) rate.

Prints a table with the ratios to the seed loop. Not a test: figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALEX_GFLOP_PER_512_IMAGE = 7.3  # AlexNet trunk as LPIPS runs it, one 512x512 image (SPEC 5)


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def make_pairs(path: str, pairs: int, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.demo import EDITS, PHOTOS, demo_table

    per_copy = len(PHOTOS) * len(EDITS)
    table = demo_table(size=size, repeat=-(-pairs // per_copy), with_bad_rows=False).slice(0, pairs)
    pq.write_table(table, path, row_group_size=64)
    assert pq.read_metadata(path).num_rows == pairs
    del pa


# --------------------------------------------------------------------------- parts (child processes)


def part_seed(path: str) -> dict:
    import pyarrow.parquet as pq

    from tests.seed_reference import SeedLPIPSPipe, open_image
    from transforms.model import ModelConfig, resolve_weights

    seed = SeedLPIPSPipe(resolve_weights(ModelConfig(net="alex")).state_dict, net="alex")
    table = pq.read_table(path)
    start = time.perf_counter()
    scores = {}
    for batch in table.to_batches(64):
        for row in batch.to_pylist():
            scores[row["id"]] = seed(open_image(row["ref_image"]), open_image(row["edited_image"]),
                                     coords=row["coords"], mask_mode="outer")
    return {"loop_s": time.perf_counter() - start, "pairs": len(scores), "scores": scores}


def part_model(path: str, precision: str, batch: int, device: str) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from transforms.model import LpipsScorer, ModelConfig
    from transforms.records import RecordConfig, prepare_pair

    scorer = LpipsScorer(ModelConfig(net="alex", device=device, precision=precision))
    rows = pq.read_table(path).slice(0, batch * 8).to_pylist()
    prepared = [prepare_pair(row["id"], row, RecordConfig()) for row in rows]
    refs = np.stack([p.reference for p in prepared])
    filled = np.stack([p.filled for p in prepared])
    scorer.raw_scores(refs[:batch], filled[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prepared), batch):
        scorer.raw_scores(refs[i:i + batch], filled[i:i + batch])  # returns on the host: synchronised
    model_s = time.perf_counter() - start
    n = 4096
    a, b = torch.randn(n, n, device=scorer.device), torch.randn(n, n, device=scorer.device)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(3):
        c = torch.mm(a, b)
    float(c[0, 0])  # wait for the device
    sgemm = 3 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9
    return {"pairs": len(prepared), "model_s": model_s, "sgemm_gflops": sgemm, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- driver


def run_part(argv: list[str]) -> tuple[dict, float, float]:
    """Run ``bench.py --part ...`` in a fresh process: (its JSON result, wall seconds, peak RSS MB)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"part {argv} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result, wall, result.pop("peak_rss_mb")


def run_e2e(path: str, out: str, precision: str, extra: list[str]) -> tuple[float, float]:
    """``python -m pipeline`` as a user runs it: (wall seconds, peak RSS MB of it and its workers)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--part", "e2e", "--input", path,
         "--out", out, "--precision", precision, "--", *extra],
        cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"e2e failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def part_e2e(path: str, out: str, precision: str, extra: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "pipeline", "--input", path, "--output", out, "--overwrite",
                           "--precision", precision, "--num_shards", "1", *extra],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return {}


def read_scores(out: str) -> dict:
    """id -> lpips of a run's scores (``OUT/scores/*.parquet``, via :mod:`transforms.layout`)."""
    from transforms import layout

    scores = {}
    for file in layout.kind_files(out, layout.SCORES):
        with layout.open_parquet(file) as parquet:
            table = parquet.read(columns=[layout.ID_FIELD, layout.LPIPS_FIELD])
        scores.update(zip(table.column(layout.ID_FIELD).to_pylist(), table.column(layout.LPIPS_FIELD).to_pylist()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=1, help="model-only batch (pairs); the stage's CPU default is 1")
    parser.add_argument("--large", type=int, default=8, help="also score this many 2048x2048 pairs (peak RSS); 0 = skip")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (model-only and end-to-end runs)")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "bench_out"))
    parser.add_argument("--part", choices=["seed", "model", "e2e"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [arg for arg in extra if arg != "--"]

    if args.part:
        if args.part == "seed":
            result = part_seed(args.input)
        elif args.part == "model":
            result = part_model(args.input, args.precision, args.batch, args.device)
        else:
            result = part_e2e(args.input, args.out, args.precision, extra)
        result["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(result))
        return

    os.makedirs(args.workdir, exist_ok=True)
    full = os.path.join(args.workdir, f"pairs-{args.pairs}x{args.size}.parquet")
    quarter = os.path.join(args.workdir, f"pairs-{args.pairs // 4}x{args.size}.parquet")
    for path, count in ((full, args.pairs), (quarter, args.pairs // 4)):
        if not os.path.exists(path):
            print(f"building {count} pairs of {args.size}x{args.size} PNG photos -> {path}", flush=True)
            make_pairs(path, count, args.size)
    n = args.pairs
    gflop_per_pair = 2 * ALEX_GFLOP_PER_512_IMAGE * (args.size / 512) ** 2
    rows = []

    seed, seed_wall, seed_rss = run_part(["--part", "seed", "--input", full])
    seed_rate = n / seed_wall
    rows.append(("seed loop (per pair, autograd on)", seed_rate, n / seed["loop_s"], seed_rss, ""))
    print(f"seed: {seed_wall:.1f} s", flush=True)

    model_rates = {}
    for precision in args.precisions.split(","):
        model, _, model_rss = run_part(["--part", "model", "--input", full, "--precision", precision,
                                        "--batch", str(args.batch), "--device", args.device])
        rate = model["pairs"] / model["model_s"]
        model_rates[precision] = rate
        rows.append((f"model only, {precision}, batch {args.batch}", rate, rate, model_rss,
                     f"{rate * gflop_per_pair:.0f} GFLOP/s = {rate * gflop_per_pair / model['sgemm_gflops']:.0%} "
                     f"of sgemm {model['sgemm_gflops']:.0f}"))
        print(f"model {precision}: {rate:.1f} pairs/s", flush=True)

    for precision in args.precisions.split(","):
        out = os.path.join(args.workdir, f"out-{precision}")
        wall, rss = run_e2e(full, out, precision, ["--device", args.device, *extra])
        scores = read_scores(out)
        assert len(scores) == n, f"e2e {precision} scored {len(scores)} of {n}"
        quarter_wall, _ = run_e2e(quarter, out + "-quarter", precision, ["--device", args.device, *extra])
        steady = (n - n // 4) / (wall - quarter_wall)
        diffs = [abs(scores[k] - seed["scores"][k]) for k in scores]
        rels = [abs(scores[k] - seed["scores"][k]) / max(abs(seed["scores"][k]), 1e-12) for k in scores]
        rows.append((f"end to end, {precision}", n / wall, steady, rss,
                     f"steady = {steady / model_rates[precision]:.0%} of model-only; vs seed max abs "
                     f"{max(diffs):.2e}, max rel {max(rels):.2e}"))
        print(f"e2e {precision}: {wall:.1f} s", flush=True)

    if args.large:
        large = os.path.join(args.workdir, f"pairs-{args.large}x2048.parquet")
        if not os.path.exists(large):
            make_pairs(large, args.large, 2048)
        wall, rss = run_e2e(large, os.path.join(args.workdir, "out-2048"), "fp32", ["--device", args.device, *extra])
        rows.append((f"end to end, fp32, {args.large} pairs of 2048x2048", args.large / wall, float("nan"), rss,
                     "default settings: peak RSS bound"))

    print(f"\n{n} pairs of {args.size}x{args.size} PNG, alex, {os.cpu_count()} CPUs, device {args.device}; "
          f"extra args: {extra or 'none'}")
    print("| run | whole-process pairs/s | × seed | steady pairs/s | peak RSS MB | notes |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, rate, steady, rss, note in rows:
        ratio = f"{rate / seed_rate:.2f}" if "2048" not in name else "-"
        steady_text = "-" if steady != steady else f"{steady:.1f}"
        print(f"| {name} | {rate:.2f} | {ratio} | {steady_text} | {rss:.0f} | {note} |")


if __name__ == "__main__":
    main()
