"""Probe for issue #31: does ONNX Runtime (CPU) beat torch on the LPIPS alex network, at every image size?

    .venv/bin/pip install -r benchmarks/requirements-probe.txt     # onnx + onnxruntime, for this probe only
    .venv/bin/python benchmarks/trunk_probe.py [--sizes 256,512,1024,2048] [--reps 5] [--seconds 1.0]
    .venv/bin/python benchmarks/trunk_probe.py --sizes 256 --reps 2      # a quick check (~1 min)

Builds the scorer the job builds (``LpipsScorer``, alex, fp32, weights from the local sources of SPEC 4, no
network) and, at each square SIZE, times calls of two images (a reference and its edited image, a real photo
and a demo edit, decoded and composited by ``prepare_pair``):

- trunk (the 5 relu outputs of ``model.net``): torch NCHW and channels-last on all torch threads; torch
  channels-last in 2 lanes (2 threads, 1 torch thread each, as the scorer's CPU lanes); ONNX Runtime's
  CPUExecutionProvider on a static-shape export (one per size) and a dynamic-axes export (one for all
  sizes), each as one session with intra_op=2 and as 2 lanes (2 sessions, intra_op=1, run from 2 threads);
- full (uint8 pair -> raw LPIPS: input scaling, trunk, unit-normalise, channel-weighted head, spatial mean):
  ``LpipsScorer.raw_scores`` in one call and in 2 lanes, against ONNX Runtime on a static export of the same.

The variants are measured round-robin, ``--reps`` times (median kept), each measurement about ``--seconds``
long, so load from other jobs hits all of them alike. GFLOP/s counts the conv FLOPs analytically (2 x MACs);
the FMA peak is ``cores x MHz x 2 FMA units x 8 fp32 lanes (AVX2) x 2``, the MHz from lscpu (max, else current,
else /proc/cpuinfo). Prints: machine facts and load averages, max relative differences of ORT's feature maps
and scores against torch, a Markdown table (size, variant, ms/call (median), best ms (least of the reps),
core-ms/call, GFLOP/s, % of peak, x torch best of its kind), and the end-to-end ceiling 1/((1-f) + f/s) per
size, where f is the forward's share of a pair's core-seconds (decode+composite by ``prepare_pair`` vs the
torch lanes forward, both measured here, one edit per reference) and s the full network's speed-up.
Not a test: figures only.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

LANES = 2


def cpu_facts() -> tuple[str, int, float, str]:
    """(model name, cores, MHz, where the MHz came from) from lscpu (/proc/cpuinfo for the MHz if lscpu has none)."""
    fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                  .splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    cores = int(fields.get("Core(s) per socket", 1)) * int(fields.get("Socket(s)", 1))
    for key in ("CPU max MHz", "CPU MHz"):
        if fields.get(key):
            return fields.get("Model name", "?"), cores, float(fields[key]), f"lscpu '{key}'"
    with open("/proc/cpuinfo") as info:
        mhz = next(float(line.split(":")[1]) for line in info if line.startswith("cpu MHz"))
    return fields.get("Model name", "?"), cores, mhz, "/proc/cpuinfo 'cpu MHz' (lscpu gives no MHz)"


def conv_gflop(net: torch.nn.Module, size: int, images: int = 2) -> float:
    """2 x multiply-adds of the trunk's convolutions for ``images`` square images (shapes walked analytically)."""
    height = width = size
    macs = 0
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            k, s, p = (module.kernel_size, module.stride, module.padding)
            k, s, p = [(v, v) if isinstance(v, int) else v for v in (k, s, p)]
            height, width = (height + 2 * p[0] - k[0]) // s[0] + 1, (width + 2 * p[1] - k[1]) // s[1] + 1
            if isinstance(module, torch.nn.Conv2d):
                macs += (module.out_channels * height * width * module.in_channels // module.groups * k[0] * k[1])
    return 2 * macs * images / 1e9


class Full(torch.nn.Module):
    """uint8 (2, H, W, 3) pair -> raw LPIPS (1,): what ``LpipsScorer.raw_scores`` computes for one pair."""

    def __init__(self, scorer) -> None:
        super().__init__()
        self.model, self.head = scorer.model, scorer.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.head(list(self.model.net(self.model.scaling_layer(x))), 1).reshape(1)


def export(module: torch.nn.Module, example: torch.Tensor, outputs: list[str], dynamic: bool) -> bytes:
    """The TorchScript exporter (``dynamo=False``, needs only ``onnx``): the ONNX model's bytes."""
    buffer = io.BytesIO()
    axes = {name: {0: "n", 2: "h", 3: "w"} for name in ["x", *outputs]} if dynamic else None
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=outputs, dynamic_axes=axes)
    return buffer.getvalue()


def session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()  # defaults otherwise: ORT_ENABLE_ALL, spinning on
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def torch_lane_init() -> None:
    torch.set_num_threads(1)


def make_runner(calls_of_lane, pool):
    """``run(calls)``: ``calls_of_lane[i](n)`` for each lane side by side (``pool``), or on this thread."""
    if pool is None:
        return lambda calls: calls_of_lane[0](calls)

    def run(calls: int) -> None:
        for future in [pool.submit(fn, calls // LANES) for fn in calls_of_lane]:
            future.result()
    return run


def repeat(fn):
    def calls(n: int) -> None:
        for _ in range(n):
            fn()
    return calls


def torch_calls(model, x):
    def calls(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                model(x)
    return calls


def measure(run, calls: int) -> tuple[float, float]:
    """(wall ms, core ms) per call of ``run(calls)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    run(calls)
    return (time.perf_counter() - wall) / calls * 1e3, (time.process_time() - cpu) / calls * 1e3


def max_rel(ours, theirs) -> float:
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, theirs))


def test_pair(size: int):
    """A real photo and an edit of it at ``size``, as the job decodes them: (prepared pair, its row)."""
    from PIL import Image

    from lpips_pipe.pipeline.demo import EDITS, centre_box, encode, photo
    from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair

    reference = photo("astronaut.png").resize((size, size), Image.BICUBIC)
    box = centre_box(reference)
    row = {"ref_image": encode(reference), "edited_image": encode(EDITS["local_blur_leaks"](reference, box)),
           "coords": [list(map(float, box))]}
    return prepare_pair("probe", row, RecordConfig()), row


def decode_core_ms(row, tries: int = 3) -> float:
    """Least core-ms of ``prepare_pair`` (decode both, composite) on ``row``, no reference cache."""
    from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair

    best = float("inf")
    for _ in range(tries):
        cpu = time.process_time()
        prepare_pair("probe", row, RecordConfig())
        best = min(best, (time.process_time() - cpu) * 1e3)
    return best


def probe_size(size, scorer, dynamic, pools, args, notes):
    """Time every variant at ``size`` round-robin: rows (variant, kind, ms, core ms, gflop)."""
    pair, row = test_pair(size)
    images = np.stack([pair.reference, pair.filled])
    x_cl = scorer._to_input(images)  # channels-last float32, as the scorer feeds its trunk
    x_nchw, x_np = x_cl.contiguous(), x_cl.contiguous().numpy()
    net_cl = scorer.model.net
    net_nchw = copy.deepcopy(net_cl).to(memory_format=torch.contiguous_format)
    outputs = [f"relu{i}" for i in range(1, 6)]
    static = export(net_cl, x_nchw, outputs, dynamic=False)
    full = export(Full(scorer), torch.from_numpy(images), ["score"], dynamic=False)
    sessions = {name: [session(model, 2)] + [session(model, 1) for _ in range(LANES)]
                for name, model in (("static", static), ("dynamic", dynamic), ("full", full))}

    with torch.inference_mode():
        reference = [t.numpy() for t in net_cl(x_cl)]
        nchw_diff = max_rel([t.numpy() for t in net_nchw(x_nchw)], reference)
    score = scorer.raw_scores(pair.reference[None], pair.filled[None])
    diffs = {name: max_rel(sessions[name][0].run(None, {"x": x_np}), reference) for name in ("static", "dynamic")}
    ort_score = sessions["full"][0].run(None, {"x": images})[0]
    notes.append(f"{size}²: max rel diff of feature maps vs torch channels-last: ORT static {diffs['static']:.1e}, "
                 f"ORT dynamic {diffs['dynamic']:.1e} (torch NCHW {nchw_diff:.1e}); raw LPIPS torch "
                 f"{score[0]:.7f}, ORT static {ort_score[0]:.7f}, rel diff {abs(ort_score[0] - score[0]) / score[0]:.1e}")
    print(notes[-1], flush=True)

    def ort_calls(sess, feed):
        return repeat(lambda: sess.run(None, feed))

    def raw(): return scorer.raw_scores(pair.reference[None], pair.filled[None])
    def ort_full(sess): return lambda: sess.run(None, {"x": np.stack([pair.reference, pair.filled])})

    variants = [  # (name, kind, run)
        ("torch NCHW, 2 threads", "trunk", make_runner([torch_calls(net_nchw, x_nchw)], None)),
        ("torch channels-last, 2 threads", "trunk", make_runner([torch_calls(net_cl, x_cl)], None)),
        ("torch channels-last, 2 lanes x 1", "trunk", make_runner([torch_calls(net_cl, x_cl)] * LANES, pools["torch"])),
    ]
    for name in ("static", "dynamic"):
        one, *lanes = sessions[name]
        variants += [(f"ORT {name}, intra_op 2", "trunk", make_runner([ort_calls(one, {"x": x_np})], None)),
                     (f"ORT {name}, 2 lanes x 1", "trunk",
                      make_runner([ort_calls(s, {"x": x_np}) for s in lanes], pools["ort"]))]
    one, *lanes = sessions["full"]
    variants += [
        ("torch raw_scores, 2 threads", "full", make_runner([repeat(raw)], None)),
        ("torch raw_scores, 2 lanes x 1", "full", make_runner([repeat(raw)] * LANES, pools["torch"])),
        ("ORT static, intra_op 2", "full", make_runner([repeat(ort_full(one))], None)),
        ("ORT static, 2 lanes x 1", "full", make_runner([repeat(ort_full(s)) for s in lanes], pools["ort"])),
    ]
    counts = []
    for _, _, run in variants:  # warm up each, then size its measurement to about --seconds
        run(LANES)
        wall, _ = measure(run, LANES)
        counts.append(max(LANES, int(args.seconds * 1e3 / wall) // LANES * LANES))
    samples = [[] for _ in variants]
    for rep in range(args.reps):
        for index, (_, _, run) in enumerate(variants):
            time.sleep(0.05)  # let the previous variant's spinning threads go to sleep
            samples[index].append(measure(run, counts[index]))
        print(f"  {size}²: rep {rep + 1}/{args.reps} done, load {os.getloadavg()[0]:.2f}", flush=True)
    gflop = conv_gflop(net_cl, size)
    rows = []
    for (name, kind, _), sample in zip(variants, samples):
        rows.append((name, kind, statistics.median(s[0] for s in sample), statistics.median(s[1] for s in sample), gflop,
                     min(s[0] for s in sample)))
    return rows, decode_core_ms(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512,1024,2048", help="square image sides, comma-separated")
    parser.add_argument("--reps", type=int, default=5, help="round-robin repetitions (median kept)")
    parser.add_argument("--seconds", type=float, default=1.0, help="about how long one measurement lasts")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from lpips_pipe.transforms.model.scorer import LpipsScorer
    from lpips_pipe.transforms.model.weights import ModelConfig

    model_name, cores, mhz, mhz_source = cpu_facts()
    peak = cores * mhz / 1e3 * 2 * 8 * 2
    load_start = os.getloadavg()
    scorer = LpipsScorer(ModelConfig(net="alex", precision="fp32"))
    print(f"CPU: {model_name}, {cores} cores, {mhz:.0f} MHz from {mhz_source}; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads), onnxruntime "
          f"{ort.__version__} (CPUExecutionProvider, ORT_ENABLE_ALL, inter_op 1, spinning on)")
    print(f"FMA peak assumed: {cores} cores x {mhz / 1e3:.3f} GHz x 2 FMA units x 8 fp32 lanes (AVX2) x 2 flops "
          f"= {peak:.1f} GFLOP/s (a nominal clock: boost clocks can exceed it)")
    print(f"weights: {scorer.weights_source}; load average at start {' '.join(f'{v:.2f}' for v in load_start)}",
          flush=True)
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b)
    print(f"reference: torch.mm {n}² fp32 {3 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9:.0f} GFLOP/s", flush=True)

    example = scorer._to_input(np.zeros((2, 64, 64, 3), np.uint8)).contiguous()
    dynamic = export(scorer.model.net, example, [f"relu{i}" for i in range(1, 6)], dynamic=True)
    pools = {"torch": ThreadPoolExecutor(LANES, "torch-lane", initializer=torch_lane_init),
             "ort": ThreadPoolExecutor(LANES, "ort-lane")}
    results, notes, decode = {}, [], {}
    for size in sizes:
        results[size], decode[size] = probe_size(size, scorer, dynamic, pools, args, notes)
    load_end = os.getloadavg()

    print(f"\nalex, fp32, 2 images a call, median of {args.reps} round-robin reps; load average at start "
          f"{' '.join(f'{v:.2f}' for v in load_start)}, at end {' '.join(f'{v:.2f}' for v in load_end)}; "
          f"peak {peak:.0f} GFLOP/s assumed")
    print("\n| size | kind | variant | ms/call | best ms | core-ms/call | GFLOP/s | % of peak | × torch best |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ceilings = []
    for size in sizes:
        rows = results[size]
        best = {kind: min(r[2] for r in rows if r[1] == kind and r[0].startswith("torch")) for kind in ("trunk", "full")}
        for name, kind, ms, core, gflop, least in rows:
            rate = gflop / ms * 1e3
            print(f"| {size} | {kind} | {name} | {ms:.1f} | {least:.1f} | {core:.1f} | {rate:.0f} | {rate / peak:.0%} | "
                  f"{best[kind] / ms:.2f} |")
        full = [r for r in rows if r[1] == "full"]
        torch_row = min((r for r in full if r[0].startswith("torch")), key=lambda r: r[2])
        ort_row = min((r for r in full if r[0].startswith("ORT")), key=lambda r: r[2])
        lanes_core = next(r[3] for r in full if r[0] == "torch raw_scores, 2 lanes x 1")
        f = lanes_core / (lanes_core + decode[size])
        s_wall, s_core = torch_row[2] / ort_row[2], torch_row[3] / ort_row[3]
        ceilings.append((size, decode[size], lanes_core, f, s_wall, 1 / ((1 - f) + f / s_wall), s_core,
                         1 / ((1 - f) + f / s_core)))
    print("\nEnd-to-end ceiling, one edit per reference (every pair = 2 forward images): f = forward core-ms / "
          "(decode+composite core-ms + forward core-ms), forward = torch raw_scores in 2 lanes; s = best torch full / "
          "best ORT full")
    print("\n| size | decode+composite core-ms/pair | torch forward core-ms/pair | f | s (wall) | e2e ceiling "
          "1/((1-f)+f/s) | s (core-s) | e2e ceiling (core-s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, dec, fwd, f, s_wall, e_wall, s_core, e_core in ceilings:
        print(f"| {size} | {dec:.1f} | {fwd:.1f} | {f:.3f} | {s_wall:.2f} | {e_wall:.2f} | {s_core:.2f} | {e_core:.2f} |")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
