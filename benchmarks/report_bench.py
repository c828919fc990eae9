"""What the report page costs: ``lpips-pipe-report`` time and peak RSS, galleries off and on, small and large runs.

    .venv/bin/python benchmarks/report_bench.py [--workdir DIR] [--rows 10000] [--repeat 2] [--screenshot PNG]

Builds three runs with the real job (``python -m pipeline``, its own report without galleries), then times
the report command on each as a fresh process (``/usr/bin/time -f '%e %U %S %M'`` when it exists, else
``resource.getrusage`` of a wrapper's child), with ``--report_k 0`` (counts, quantiles, histogram: no image is
read) and ``--report_k 12`` (plus the galleries: worst per mask mode, nearest ``--report_threshold``, random
from the better half, errors; each tile's images read by its source row, one forward for its drift map).
``--screenshot docs/report-demo.png`` then saves the demo's page as headless Chromium shows it (the README's
picture). The runs:

- *demo*: the demo's input (``pipeline.demo.demo_table()``: 32 pairs of real photographs at their own sizes,
  300x451 up to 1411x1411, and 2 broken rows), as ``scripts/demo.sh`` scores it;
- *demo at 64x64*: the same 34 rows centre-cropped to 64x64 (the large run's image size, so the two compare
  rows alone);
- *N rows*: ``--rows`` rows, the same photographs at 64x64 (the demo's table repeated) and its 2 broken rows,
  scored by the real job (every row a real score or error with its own source_file / source_row), in Parquet
  row groups of 256 rows.

Prints one table (wall and CPU seconds: the fastest of ``--repeat`` runs; peak RSS: the largest) and the load
average around it (the machine may be shared); the README's "Run report" quotes it. ``--skip_jobs`` reuses the
runs an earlier call left in ``--workdir``. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpips_pipe.pipeline.demo import demo_table  # noqa: E402

THRESHOLD = "0.1"
WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss, file=sys.stderr); sys.exit(code)")


def _job(pairs: Path, out: Path) -> float:
    """Score ``pairs`` into ``out`` with the real job (its report too: the later reports reuse its counters)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "--input", str(pairs), "--output", str(out), "--overwrite",
                    "--num_shards", "1", "--report_k", "0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def screenshot(page: Path, target: Path) -> None:
    """``page`` in headless Chromium (tests/browser.py), saved to ``target`` as a 256-colour PNG."""
    from PIL import Image  # noqa: PLC0415

    from tests.browser import browser_unavailable, check_page  # noqa: PLC0415

    reason = browser_unavailable()
    if reason:
        print(f"no screenshot: {reason}")
        return
    with tempfile.TemporaryDirectory() as folder:
        check = check_page(page, Path(folder) / "page.png")
        broken = [image.src for image in check.images if not image.natural_width]
        if broken or check.network_requests or check.console_errors or check.page_errors:
            raise SystemExit(f"the page did not render cleanly: {broken} {check.network_requests} "
                             f"{check.console_errors} {check.page_errors}")
        with Image.open(check.screenshot_path) as shot:
            shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    print(f"screenshot of {page} ({len(check.images)} images, all loaded): {target}")


def _measure(out: Path, k: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MB) of one ``python -m pipeline.report OUT --report_k k`` process."""
    command = [sys.executable, "-m", "pipeline.report", str(out), "--report_k", str(k), "--report_threshold",
               THRESHOLD]
    start = time.perf_counter()
    if os.path.exists("/usr/bin/time"):
        done = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", *command], cwd=ROOT, capture_output=True,
                              text=True)
        seconds, user, system, kilobytes = done.stderr.strip().splitlines()[-1].split()
        elapsed, cpu = float(seconds), float(user) + float(system)
    else:
        done = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=ROOT, capture_output=True, text=True)
        cpu_text, kilobytes = done.stderr.strip().splitlines()[-1].split()
        elapsed, cpu = time.perf_counter() - start, float(cpu_text)
    if done.returncode:
        raise SystemExit(f"report failed: {done.stdout}\n{done.stderr}")
    return elapsed, cpu, int(kilobytes) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="Where the runs go (default: a temporary folder).")
    parser.add_argument("--rows", type=int, default=10000, help="Rows of the large run (default 10000).")
    parser.add_argument("--repeat", type=int, default=2, help="Report runs per cell (default 2).")
    parser.add_argument("--skip_jobs", action="store_true", help="Reuse the runs already in --workdir.")
    parser.add_argument("--screenshot", metavar="PNG", default=None,
                        help="Also save the demo run's page (--report_k 12) as seen by headless Chromium, e.g. "
                             "docs/report-demo.png.")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lpips-pipe-report-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    runs = []
    demo_pairs = work / "demo" / "pairs.parquet"
    demo_pairs.parent.mkdir(exist_ok=True)
    if not args.skip_jobs:
        pq.write_table(demo_table(), demo_pairs)
    seconds = 0.0 if args.skip_jobs else _job(demo_pairs, work / "demo" / "out")
    runs.append(("demo (real photos, 300-1411 px)", pq.read_metadata(demo_pairs).num_rows, work / "demo" / "out"))
    print(f"demo run scored in {seconds:.1f} s", flush=True)

    small_pairs = work / "demo64" / "pairs.parquet"
    small_pairs.parent.mkdir(exist_ok=True)
    if not args.skip_jobs:
        pq.write_table(demo_table(size=64), small_pairs)
        _job(small_pairs, work / "demo64" / "out")
    runs.append(("demo at 64x64", pq.read_metadata(small_pairs).num_rows, work / "demo64" / "out"))

    big_pairs = work / "big" / "pairs.parquet"
    big_pairs.parent.mkdir(exist_ok=True)
    if not args.skip_jobs:
        small = demo_table(size=64, with_bad_rows=True)  # 32 pairs, then the 2 broken rows
        repeat = -(-args.rows // (small.num_rows - 2))
        good = demo_table(size=64, repeat=repeat, with_bad_rows=False).slice(0, args.rows - 2)
        big = pa.concat_tables([good, small.slice(small.num_rows - 2, 2)])
        pq.write_table(big, big_pairs, row_group_size=256)
    seconds = 0.0 if args.skip_jobs else _job(big_pairs, work / "big" / "out")
    runs.append((f"{args.rows:,} rows (64x64)", args.rows, work / "big" / "out"))
    print(f"{args.rows}-row run scored in {seconds:.1f} s", flush=True)

    print()
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| run | rows | `--report_k` | wall s | CPU s | peak RSS (MB) | galleries add (wall) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rows, out in runs:
        base = None
        for k in (0, 12):
            cells = [_measure(out, k) for _ in range(max(1, args.repeat))]
            seconds = min(cell[0] for cell in cells)
            cpu = min(cell[1] for cell in cells)
            rss = max(cell[2] for cell in cells)
            added = "" if base is None else f"+{seconds - base:.1f} s"
            base = seconds if base is None else base
            print(f"| {name} | {rows:,} | {k} | {seconds:.1f} | {cpu:.1f} | {rss:.0f} | {added} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.screenshot:  # the demo's page as its last --report_k 12 run left it
        screenshot(work / "demo" / "out" / "report" / "index.html", Path(args.screenshot))
    print(f"(report options: --report_threshold {THRESHOLD}; seconds: fastest of {args.repeat}, RSS: largest; "
          f"outputs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
