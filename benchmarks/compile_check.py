"""Does torch.compile of the backbone pay on this machine? Model only, the handler's CPU calls, N pairs.

    .venv/bin/python benchmarks/compile_check.py [--pairs 2000]

Pre-decodes 100 pairs of benchmarks/bench.py's 512x512 photographs (one edit per reference; build them
with bench.py first) and scores N pairs cycling through them, as ``LpipsModelHandler`` does on CPU:
``raw_scores_reused`` on batches of 8 pairs (no cache hits). Prints, for eager (lanes, the default) and
for ``torch.compile(net)`` (its compile time apart; with lanes, and with one call on all threads): pairs/s,
the whole time with compilation, the pairs after which compile pays, and the largest score difference
against eager. Figures only, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair  # noqa: E402
from lpips_pipe.transforms.model.scorer import LpipsScorer  # noqa: E402
from lpips_pipe.transforms.model.weights import ModelConfig  # noqa: E402

BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--input", default=os.path.join(ROOT, "bench_out", "refs-600x512-e1.parquet"))
    args = parser.parse_args()
    if not os.path.exists(args.input):
        raise SystemExit(f"{args.input} is missing: run benchmarks/bench.py --edits 1 first")
    rows = pq.read_table(args.input).slice(0, 100).to_pylist()
    pairs = [prepare_pair(row["id"], row, RecordConfig()) for row in rows]
    batches = [pairs[i:i + BATCH] for i in range(0, len(pairs) - BATCH + 1, BATCH)]
    scorer = LpipsScorer(ModelConfig(net="alex", device="cpu"))

    def run(count: int) -> tuple[float, np.ndarray]:
        out, start = [], time.perf_counter()
        for index in range(count // BATCH):
            chunk = batches[index % len(batches)]
            out.append(scorer.raw_scores_reused(np.stack([p.reference for p in chunk]),
                                                np.stack([p.filled for p in chunk]), [None] * BATCH, 0))
        return time.perf_counter() - start, np.concatenate(out)

    run(BATCH)  # warm-up
    eager_s, eager = run(args.pairs)
    print(f"eager, {scorer.lanes} lanes x {scorer.lane_threads} thread: {args.pairs / eager_s:.2f} pairs/s "
          f"({eager_s:.1f} s)", flush=True)
    eager_net, lanes = scorer.model.net, scorer.lanes
    for label, use_lanes in (("compiled, one call on all threads", 1), ("compiled, lanes", lanes)):
        torch._dynamo.reset()
        scorer.model.net = torch.compile(eager_net)
        scorer.lanes = use_lanes
        start = time.perf_counter()
        try:
            run(BATCH)  # compiles (lanes: each lane thread's first call may compile again)
            run(BATCH * lanes)
        except Exception as error:  # noqa: BLE001 - a figure, not a crash
            print(f"{label}: failed ({type(error).__name__}: {str(error)[:200]})")
            continue
        compile_s = time.perf_counter() - start
        seconds, scores = run(args.pairs)
        gain = 1 / (args.pairs / eager_s) - 1 / (args.pairs / seconds)  # seconds saved per pair
        pays = f"pays after {compile_s / gain:,.0f} pairs" if gain > 0 else "never pays"
        print(f"{label}: {args.pairs / seconds:.2f} pairs/s ({seconds:.1f} s, compile {compile_s:.1f} s, whole "
              f"{seconds + compile_s:.1f} s against eager {eager_s:.1f} s; {pays}); max abs diff vs eager "
              f"{float(np.max(np.abs(scores - eager))):.1e}", flush=True)
    scorer.model.net, scorer.lanes = eager_net, lanes


if __name__ == "__main__":
    main()
