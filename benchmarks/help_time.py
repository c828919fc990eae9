"""Wall time of each command's --help in a fresh process (best of N), and what the main one imports.

    .venv/bin/python benchmarks/help_time.py [N]

Prints one line per command; not a test (timings depend on the machine and its load). `lpips-pipe --help` is
answered from the option declarations alone (pipeline/launch.py, pipeline/flags.py): no Beam, no torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

BIN = os.path.dirname(sys.executable)
COMMANDS = ("lpips-pipe", "lpips-pipe-report", "lpips-pipe-filter", "lpips-pipe-calibrate")


def best_of(argv: list[str], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; best of {runs}")
    for command in COMMANDS:
        print(f"{command} --help: {best_of([os.path.join(BIN, command), '--help'], runs):.2f} s")
    heavy = subprocess.run([sys.executable, "-c", "import sys, contextlib, io\n"
                            "from lpips_pipe.pipeline import launch\n"
                            "with contextlib.redirect_stdout(io.StringIO()): launch.console_main(['--help'])\n"
                            "print(sorted(m for m in ('torch', 'apache_beam', 'numpy') if m in sys.modules))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"lpips-pipe --help imported of torch/apache_beam/numpy: {heavy}")


if __name__ == "__main__":
    main()
