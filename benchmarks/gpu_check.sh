#!/usr/bin/env bash
# GPU readiness check of lpips-pipe: one prepared script, no network, about 5-8 minutes on an H200-class GPU.
#
#   bash benchmarks/gpu_check.sh                       # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --device cpu --dry-run  # the same steps, tiny, on CPU (checks the script)
#
# Prints, each step under a "== " header:
#   1. the machine (nvidia-smi, torch, CUDA);
#   2. model only, pre-decoded 512x512 pairs: pairs/s by precision (fp32, bf16, fp16) and batch (pairs per
#      forward, the GPU batch budget is 4,194,304 px = 16 such pairs), peak GPU memory, and each precision's
#      error against fp32 (max abs, max relative) -- with and without reference reuse;
#   3. decode vs forward: decode+composite core-ms per pair (one CPU thread) against forward ms per pair,
#      and how many decode threads (of this worker's cores) keep the GPU fed;
#   4. end to end (python -m pipeline --device cuda): pairs/s with --decode_threads 1 and auto (the default:
#      the worker's cores but one on CUDA).
# Exits non-zero (set -e) at the first step that fails, saying which.
set -euo pipefail

DEVICE=cuda
DRY=0
PAIRS=512
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --pairs) PAIRS="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --device cpu|cuda, --dry-run, --pairs N)" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 1 ]; then PAIRS=8; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lpips-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
step() { echo; echo "== $*"; }
fail() { echo "gpu_check.sh: FAILED at step: $CURRENT" >&2; }
trap 'fail' ERR

CURRENT="1 machine"
step "1. machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "nvidia-smi: not found"
fi
echo "cores: $(nproc)"
"$PY" - "$DEVICE" <<'EOF'
import sys, torch
device = sys.argv[1]
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
      f"device asked: {device}, threads: {torch.get_num_threads()}")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda but torch sees no GPU: run with --device cpu --dry-run to check the script only")
if device == "cuda":
    print("gpu:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

CURRENT="build pairs"
step "building $PAIRS pairs of 512x512 PNG (4 candidates per reference) in $WORK"
timeout 300 "$PY" -c "
import sys; sys.path.insert(0, '.')
from benchmarks.bench import make_pairs
make_pairs('$WORK/pairs.parquet', $PAIRS, 512, 4)
"

CURRENT="2 model only"
step "2. model only (pre-decoded pairs): pairs/s, peak GPU memory, error vs fp32"
timeout 300 "$PY" - "$WORK/pairs.parquet" "$DEVICE" "$DRY" <<'EOF'
import os, sys, time
sys.path.insert(0, ".")
import numpy as np, pyarrow.parquet as pq, torch
from lpips_pipe.transforms.model.scorer import LpipsScorer
from lpips_pipe.transforms.model.weights import ModelConfig
from lpips_pipe.transforms.records.pairs import BoundedCache, RecordConfig, prepare_pair

path, device, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
rows = pq.read_table(path).to_pylist()
cache = BoundedCache(1 << 30)
pairs = [prepare_pair(r["id"], r, RecordConfig(), reference_cache=cache) for r in rows]
refs = np.stack([p.reference for p in pairs]); filled = np.stack([p.filled for p in pairs])
keys = [p.reference_key for p in pairs]
precisions = ["fp32", "bf16"] + (["fp16"] if device == "cuda" else [])
batches = [1, 2] if dry else [1, 8, 16, 32, 64]
cuda = device == "cuda"
def sync():
    if cuda: torch.cuda.synchronize()
base = None
print(f"{'precision':9} {'reuse':5} {'batch':>5} {'pairs/s':>9} {'peak MiB':>9} {'max abs vs fp32':>16} {'max rel':>9}")
for precision in precisions:
    scorer = LpipsScorer(ModelConfig(net="alex", device=device, precision=precision))
    for reuse in (False, True):
        for batch in batches:
            def run():
                out = []
                scorer.reference_cache = None
                for i in range(0, len(pairs), batch):
                    if reuse:
                        out.append(scorer.raw_scores_reused(refs[i:i + batch], filled[i:i + batch],
                                                            keys[i:i + batch], 1 << 30))
                    else:
                        out.append(scorer.raw_scores(refs[i:i + batch], filled[i:i + batch]))
                return np.concatenate(out).astype(np.float64)
            run(); sync()  # warm-up (cuDNN autotuning, allocator)
            if cuda: torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter(); scores = run(); sync(); seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            if base is None: base = scores
            diff = np.abs(scores - base)
            print(f"{precision:9} {str(reuse):5} {batch:5d} {len(pairs) / seconds:9.1f} {peak:9.0f} "
                  f"{diff.max():16.2e} {(diff / np.maximum(np.abs(base), 1e-12)).max():9.2e}", flush=True)
    del scorer
    if cuda: torch.cuda.empty_cache()
EOF

CURRENT="3 decode vs forward"
step "3. decode vs forward share (decode on CPU threads, forward on $DEVICE)"
timeout 300 "$PY" - "$WORK/pairs.parquet" "$DEVICE" <<'EOF'
import os, sys, time
sys.path.insert(0, ".")
import numpy as np, pyarrow.parquet as pq, torch
from lpips_pipe.transforms.model.scorer import LpipsScorer
from lpips_pipe.transforms.model.weights import ModelConfig
from lpips_pipe.transforms.records.pairs import BoundedCache, RecordConfig, prepare_pair
from lpips_pipe.transforms.beam.config import DEFAULT_REFERENCE_CACHE_MB
from lpips_pipe.transforms.beam.scoring import reference_cache_bytes

path, device = sys.argv[1], sys.argv[2]
rows = pq.read_table(path).to_pylist()
cores = len(os.sched_getaffinity(0))
for reuse in (False, True):
    cache = BoundedCache(reference_cache_bytes(DEFAULT_REFERENCE_CACHE_MB)[1]) if reuse else None
    cpu = time.process_time()
    pairs = [prepare_pair(r["id"], r, RecordConfig(), reference_cache=cache) for r in rows]
    decode = (time.process_time() - cpu) / len(pairs)
    scorer = LpipsScorer(ModelConfig(net="alex", device=device))
    batch = 16 if device == "cuda" else 1
    def forward():
        scorer.reference_cache = None
        for i in range(0, len(pairs), batch):
            chunk = pairs[i:i + batch]
            r = np.stack([p.reference for p in chunk]); f = np.stack([p.filled for p in chunk])
            if reuse:
                scorer.raw_scores_reused(r, f, [p.reference_key for p in chunk], 1 << 30)
            else:
                scorer.raw_scores(r, f)
        if device == "cuda": torch.cuda.synchronize()
    forward()
    start = time.perf_counter(); forward(); model = (time.perf_counter() - start) / len(pairs)
    need = decode / model
    print(f"reuse={reuse}: decode+composite {decode * 1e3:.1f} core-ms/pair, forward {model * 1e3:.2f} ms/pair "
          f"(batch {batch}); decode share of one pair's work {decode / (decode + model):.0%}; "
          f"decode threads to keep the forward fed: {need:.1f} (this worker has {cores} cores: "
          f"decode-bound at {cores / decode:.0f} pairs/s with all of them)")
EOF

CURRENT="4 end to end"
step "4. end to end: python -m pipeline --device $DEVICE"
for threads in 1 auto; do
  for precision in fp32 bf16; do
    start=$(date +%s.%N)
    timeout 300 "$PY" -m pipeline --input "$WORK/pairs.parquet" --output "$WORK/out-$precision-$threads" \
      --device "$DEVICE" --precision "$precision" --decode_threads "$threads" --no_report --overwrite \
      >"$WORK/e2e.log" 2>&1 || { tail -20 "$WORK/e2e.log" >&2; false; }
    end=$(date +%s.%N)
    "$PY" -c "print(f'precision $precision, --decode_threads $threads: $PAIRS pairs in {$end - $start:.1f} s = {$PAIRS / ($end - $start):.1f} pairs/s (whole process, start-up included)')"
  done
done

step "done: all steps passed"
