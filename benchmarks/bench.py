"""Throughput benchmark: the seed's per-pair loop vs the stage, and the machine's bound, in one run.

    .venv/bin/python benchmarks/bench.py [--pairs 600] [--edits 4] [--precisions fp32,bf16]
    .venv/bin/python benchmarks/bench.py --pairs 100 --precisions fp32      # a quick check (~2 min)

Builds N pairs of SIZE x SIZE PNG real photographs, EDITS candidates per reference (each reference a
distinct crop, its candidates next to each other; cached in bench_out/), then, each in a fresh process so
start-up and peak RSS are whole-process:

- seed: the original module's way (tests/seed_reference.py: PIL decode, numpy composite,
  ``lpips.LPIPS.forward`` per pair with autograd on, area normalisation), every pair decoded anew;
- bound-<precision>[-noreuse]: the configuration's parts alone, on the first pairs (a multiple of EDITS):
  decode+composite core-seconds per pair (``prepare_pair``, with the reference cache when reuse is on) and
  model forward core-seconds and wall seconds per pair (the handler's calls: ``raw_scores_reused`` on
  batches of 8 pairs with reuse, ``raw_scores`` per pair without). Core-seconds are the process's CPU time
  (``time.process_time``: every thread, OpenMP spinning included). The bound is
  ``cores / (decode core-s + forward core-s)`` pairs/s: all cores busy all the time on nothing but decoding
  and the forward, perfectly overlapped. "model only" is the forward's wall rate on pre-decoded pairs;
- e2e-<precision>[-noreuse|-grouped]: ``python -m pipeline`` on the Parquet file (FnApiRunner), whole
  process, plus a run on a quarter of the file: steady = the marginal rate between the two; efficiency =
  steady / bound. ``-grouped`` runs ``--group_by_reference`` on the same pairs shuffled.

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

ALEX_GFLOP_PER_512_IMAGE = 7.3
REPEATS = 3  # tries of each timed part of the bound; the least is kept  # AlexNet trunk as LPIPS runs it, one 512x512 image (SPEC 5)


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def make_pairs(path: str, pairs: int, size: int, edits: int = 4, shuffle: bool = False) -> None:
    """``pairs`` rows: references that are distinct crops of the demo photos, each with ``edits`` candidates
    on consecutive rows, the demo's edits in turn over all rows (local, leaking and global edits, so scores are
    not all 0.0 whatever ``edits`` is); ``shuffle`` spreads them randomly instead."""
    import random

    import pyarrow.parquet as pq
    from PIL import Image, ImageOps

    from lpips_pipe.pipeline.demo import EDITS, PAIRS_SCHEMA, PHOTOS, centre_box, encode, photo

    import pyarrow as pa

    edit_items = list(EDITS.items())
    photos = [photo(name) for name in PHOTOS]
    rows, reference_index = [], 0
    while len(rows) < pairs:
        name, image = PHOTOS[reference_index % len(PHOTOS)], photos[reference_index % len(PHOTOS)]
        copy = reference_index // len(PHOTOS)
        # a distinct crop per copy: 70-100% of the short side, at an offset that walks with the copy
        side = min(image.size)
        crop = int(side * (1.0 - 0.3 * ((copy * 7) % 11) / 10))
        x0 = ((copy * 37) % 101) * (image.width - crop) // 100
        y0 = ((copy * 53) % 101) * (image.height - crop) // 100
        reference = image.crop((x0, y0, x0 + crop, y0 + crop)).resize((size, size), Image.BICUBIC)
        if copy % 2:
            reference = ImageOps.mirror(reference)
        box = centre_box(reference)
        encoded = encode(reference)
        for k in range(edits):
            if len(rows) == pairs:
                break
            edit, apply = edit_items[len(rows) % len(edit_items)]  # every edit kind, whatever --edits is
            rows.append({"id": f"{name}/{copy}/{k}/{edit}", "edit": edit, "ref_image": encoded,
                         "edited_image": encode(apply(reference, box)), "coords": [list(map(float, box))]})
        reference_index += 1
    if shuffle:
        random.Random(1).shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA), path, row_group_size=64)
    assert pq.read_metadata(path).num_rows == pairs


# --------------------------------------------------------------------------- parts (child processes)


def part_seed(path: str) -> dict:
    import pyarrow.parquet as pq

    from tests.seed_reference import SeedLPIPSPipe, open_image
    from lpips_pipe.transforms.model.weights import ModelConfig, resolve_weights

    seed = SeedLPIPSPipe(resolve_weights(ModelConfig(net="alex")).state_dict, net="alex")
    table = pq.read_table(path)
    start = time.perf_counter()
    scores = {}
    for batch in table.to_batches(64):
        for row in batch.to_pylist():
            scores[row["id"]] = seed(open_image(row["ref_image"]), open_image(row["edited_image"]),
                                     coords=row["coords"], mask_mode="outer")
    return {"loop_s": time.perf_counter() - start, "pairs": len(scores), "scores": scores}


def part_bound(path: str, precision: str, device: str, pairs: int, reuse: bool) -> dict:
    """Decode+composite and forward, each alone, on the first ``pairs`` rows: core-seconds per pair."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from lpips_pipe.transforms.model.scorer import LpipsScorer
    from lpips_pipe.transforms.model.weights import ModelConfig
    from lpips_pipe.transforms.cache import BoundedCache
    from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair
    from lpips_pipe.transforms.beam.config import DEFAULT_REFERENCE_CACHE_MB
    from lpips_pipe.transforms.beam.scoring import reference_cache_bytes

    feature_bytes, decoded_bytes = reference_cache_bytes(DEFAULT_REFERENCE_CACHE_MB if reuse else 0)
    scorer = LpipsScorer(ModelConfig(net="alex", device=device, precision=precision))
    rows = pq.read_table(path).slice(0, pairs).to_pylist()
    cache = BoundedCache(decoded_bytes) if reuse else None
    prepare_pair(rows[0]["id"], rows[0], RecordConfig())  # warm Pillow's plugins
    decode_core = decode_wall = float("inf")
    for _ in range(REPEATS):  # the least of a few tries: other processes on the machine only add time
        cache = BoundedCache(decoded_bytes) if reuse else None
        cpu, wall = time.process_time(), time.perf_counter()
        prepared = [prepare_pair(row["id"], row, RecordConfig(), reference_cache=cache) for row in rows]
        decode_core, decode_wall = min(decode_core, time.process_time() - cpu), min(decode_wall,
                                                                                   time.perf_counter() - wall)

    def forward() -> None:
        if reuse:
            for i in range(0, len(prepared), 8):  # the handler's CPU batch with reuse: 8 pairs of 512x512
                chunk = prepared[i:i + 8]
                scorer.raw_scores_reused(np.stack([p.reference for p in chunk]), np.stack([p.filled for p in chunk]),
                                         [p.reference_key for p in chunk], feature_bytes)
        else:
            for p in prepared:
                scorer.raw_scores(p.reference[None], p.filled[None])

    scorer.raw_scores(prepared[0].reference[None], prepared[0].filled[None])  # warm-up
    forward_core = forward_wall = float("inf")
    for _ in range(REPEATS):
        scorer.reference_cache = None  # each try starts with an empty feature cache
        cpu, wall = time.process_time(), time.perf_counter()
        forward()
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        forward_core, forward_wall = min(forward_core, time.process_time() - cpu), min(forward_wall,
                                                                                       time.perf_counter() - wall)
    n = 4096
    a, b = torch.randn(n, n, device=scorer.device), torch.randn(n, n, device=scorer.device)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(3):
        c = torch.mm(a, b)
    float(c[0, 0])  # wait for the device
    sgemm = 3 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9
    return {"pairs": len(prepared), "decode_core_s": decode_core, "decode_wall_s": decode_wall,
            "forward_core_s": forward_core, "forward_wall_s": forward_wall,
            "sgemm_gflops": sgemm, "threads": torch.get_num_threads(),
            "lanes": f"{scorer.lanes} lane(s) x {scorer.lane_threads} thread(s)" if reuse else "one fused call"}


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
    """``python -m pipeline`` in this (fresh) process (``cli.console_main``, its way of ending included)."""
    from lpips_pipe.pipeline import cli

    sys.argv = ["lpips-pipe", "--input", path, "--output", out, "--overwrite", "--precision", precision,
                "--num_shards", "1", *extra]
    code = cli.console_main()
    if code != 0:
        raise SystemExit(f"python -m pipeline exited {code}")
    return {}


def read_scores(out: str) -> dict:
    """id -> lpips of a run's scores (``OUT/scores/*.parquet``, via :mod:`transforms.layout`)."""
    from lpips_pipe.transforms.outputs import layout

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
    parser.add_argument("--edits", type=int, default=4, help="candidates per reference (consecutive rows)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--variants", default="reuse,noreuse",
                        help="end-to-end runs for the first precision: reuse (default flags), noreuse "
                             "(--reference_cache_mb 0), grouped (--group_by_reference, shuffled pairs); later "
                             "precisions run reuse only")
    parser.add_argument("--bound_pairs", type=int, default=96, help="pairs timed for the bound (rounded to --edits)")
    parser.add_argument("--large", type=int, default=0, help="also score this many 2048x2048 pairs (peak RSS); 0 = skip")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bound and end-to-end runs)")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "bench_out"))
    parser.add_argument("--part", choices=["seed", "bound", "e2e"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", type=int, default=1, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [arg for arg in extra if arg != "--"]

    if args.part:
        if args.part == "seed":
            result = part_seed(args.input)
        elif args.part == "bound":
            result = part_bound(args.input, args.precision, args.device, args.bound_pairs, bool(args.reuse))
        else:
            result = part_e2e(args.input, args.out, args.precision, extra)
        result["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(result))
        return

    os.makedirs(args.workdir, exist_ok=True)
    n, cores = args.pairs, os.cpu_count() or 1
    tag = f"{args.size}-e{args.edits}"
    full = os.path.join(args.workdir, f"refs-{n}x{tag}.parquet")
    quarter = os.path.join(args.workdir, f"refs-{n // 4}x{tag}.parquet")
    shuffled = os.path.join(args.workdir, f"refs-{n}x{tag}-shuffled.parquet")
    variants = args.variants.split(",")
    files = [(full, n, False), (quarter, n // 4, False)]
    if "grouped" in variants:
        files += [(shuffled, n, True), (shuffled.replace(f"-{n}x", f"-{n // 4}x"), n // 4, True)]
    for path, count, shuffle in files:
        if not os.path.exists(path):
            print(f"building {count} pairs of {args.size}x{args.size} PNG, {args.edits} per reference -> {path}",
                  flush=True)
            make_pairs(path, count, args.size, args.edits, shuffle)
    bound_pairs = max(args.edits, args.bound_pairs // args.edits * args.edits)
    gflop_per_image = ALEX_GFLOP_PER_512_IMAGE * (args.size / 512) ** 2
    rows, bounds, notes = [], {}, []

    seed, seed_wall, seed_rss = run_part(["--part", "seed", "--input", full])
    seed_rate = n / seed_wall
    rows.append(("seed loop (per pair, autograd on)", seed_rate, n / seed["loop_s"], seed_rss, ""))
    print(f"seed: {seed_wall:.1f} s", flush=True)

    precisions = args.precisions.split(",")
    configs = [(p, True) for p in precisions]
    if "noreuse" in variants:
        configs.append((precisions[0], False))
    for precision, reuse in configs:
        part, _, rss = run_part(["--part", "bound", "--input", full, "--precision", precision, "--device",
                                 args.device, "--bound_pairs", str(bound_pairs), "--reuse", str(int(reuse))])
        per = part["pairs"]
        decode_core, forward_core = part["decode_core_s"] / per, part["forward_core_s"] / per
        bound = cores / (decode_core + forward_core)
        model_rate = per / part["forward_wall_s"]
        name = f"{precision}{'' if reuse else '-noreuse'}"
        bounds[name] = bound
        images = 1 + (1 / args.edits if reuse else 1)
        rows.append((f"model only, {name}", model_rate, model_rate, rss,
                     f"{images:.2f} images/pair; {model_rate * images * gflop_per_image:.0f} GFLOP/s "
                     f"(sgemm {part['sgemm_gflops']:.0f})"))
        notes.append(f"bound {name}: decode+composite {decode_core * 1e3:.1f} core-ms/pair, forward "
                     f"{forward_core * 1e3:.1f} core-ms/pair ({part['forward_wall_s'] / per * 1e3:.1f} wall-ms, "
                     f"{part['threads']} threads, {part['lanes']}) -> {cores} / ({decode_core * 1e3:.1f} + {forward_core * 1e3:.1f}) "
                     f"ms = {bound:.1f} pairs/s")
        print(notes[-1], flush=True)

    runs = [(precisions[0], "reuse")] + [(p, "reuse") for p in precisions[1:]]
    runs += [(precisions[0], v) for v in variants if v in ("noreuse", "grouped")]
    for precision, variant in runs:
        flags = {"reuse": [], "noreuse": ["--reference_cache_mb", "0"], "grouped": ["--group_by_reference"]}[variant]
        source, small = (shuffled, shuffled.replace(f"-{n}x", f"-{n // 4}x")) if variant == "grouped" else (full, quarter)
        name = precision + ("" if variant == "reuse" else f"-{variant}")
        out = os.path.join(args.workdir, f"out-{name}")
        wall, rss = run_e2e(source, out, precision, ["--device", args.device, *flags, *extra])
        scores = read_scores(out)
        assert len(scores) == n, f"e2e {name} scored {len(scores)} of {n}"
        quarter_wall, _ = run_e2e(small, out + "-quarter", precision, ["--device", args.device, *flags, *extra])
        steady = (n - n // 4) / (wall - quarter_wall)
        diffs = [abs(scores[k] - seed["scores"][k]) for k in scores]
        rels = [abs(scores[k] - seed["scores"][k]) / max(abs(seed["scores"][k]), 1e-12) for k in scores]
        bound = bounds.get(precision + ("-noreuse" if variant == "noreuse" else ""))
        efficiency = f"{steady / bound:.0%} of bound {bound:.1f}" if bound else "no bound measured"
        rows.append((f"end to end, {name}", n / wall, steady, rss,
                     f"steady = {efficiency}; vs seed max abs {max(diffs):.2e}, max rel {max(rels):.2e}"))
        print(f"e2e {name}: {wall:.1f} s (quarter {quarter_wall:.1f} s)", flush=True)

    if args.large:
        large = os.path.join(args.workdir, f"refs-{args.large}x2048-e{args.edits}.parquet")
        if not os.path.exists(large):
            make_pairs(large, args.large, 2048, args.edits)
        wall, rss = run_e2e(large, os.path.join(args.workdir, "out-2048"), "fp32", ["--device", args.device, *extra])
        rows.append((f"end to end, fp32, {args.large} pairs of 2048x2048", args.large / wall, float("nan"), rss,
                     "default settings: peak RSS bound"))

    load = os.getloadavg()
    print(f"\n{n} pairs of {args.size}x{args.size} PNG, {args.edits} candidates per reference, alex, {cores} CPUs, "
          f"device {args.device}; extra args: {extra or 'none'}; load average at the end {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}")
    print("| run | whole-process pairs/s | × seed | steady pairs/s | peak RSS MB | notes |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, rate, steady, rss, note in rows:
        ratio = f"{rate / seed_rate:.2f}" if "2048" not in name else "-"
        steady_text = "-" if steady != steady else f"{steady:.1f}"
        print(f"| {name} | {rate:.2f} | {ratio} | {steady_text} | {rss:.0f} | {note} |")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
