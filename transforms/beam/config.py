"""How a worker batches, decodes and reuses: :class:`ScoringConfig` and its defaults.

Plain Python only (no Beam, no torch), so the command line's ``--help`` and the options page
(``docs/OPTIONS.md``) read these declarations without importing the scoring code; :mod:`.scoring` uses them
(``scoring.ScoringConfig`` is this class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lpips_pipe.transforms import settings

# Pixel budget of one model batch, by device (benchmarks/bench.py): on CPU a single 512x512 pair per
# forward was fastest here (bigger batches fall out of cache), on GPU big batches keep it busy.
CPU_BATCH_PIXELS = 512 * 512
GPU_BATCH_PIXELS = 2048 * 2048
DEFAULT_BATCH_PIXELS = CPU_BATCH_PIXELS
DEFAULT_MAX_BATCH_PAIRS = 32
DEFAULT_DECODE_THREADS: Optional[int] = None  # sized from the worker's cores: auto_decode_threads
MAX_AUTO_DECODE_THREADS = 16
# Reference reuse (--reference_cache_mb): per worker process, 7/8 of it holds reference features (alex,
# fp32: ~10.6 MB for a 512x512 reference, ~170 MB at 2048x2048), 1/8 decoded references (0.8 MB at 512x512)
# per decode DoFn instance. 256 MB fits ~21 512x512 references' features: enough for the candidates of a
# reference that sit near each other in the input (or meet through --group_by_reference) on a CPU worker.
DEFAULT_REFERENCE_CACHE_MB = 256


@dataclass(frozen=True)
class ScoringConfig:
    """How a worker batches, decodes and reuses (options declared once, :mod:`transforms.settings`)."""

    batch_pixels: int = settings.option(
        0, f"Pixel budget of one model batch (pairs x H x W); bounds memory. 0 = by device: {CPU_BATCH_PIXELS} on "
           f"CPU, {GPU_BATCH_PIXELS} on CUDA.", settings.count(0))
    max_batch_pairs: int = settings.option(DEFAULT_MAX_BATCH_PAIRS, "Most pairs in one forward.", settings.count(1))
    max_batch_duration_secs: float = settings.option(
        0.0, "With --streaming: a partial model batch is scored after this many seconds instead of waiting for "
             "the bundle's end (Beam's stateful batching; 0 = off).", settings.seconds())
    model_copies: int = settings.option(
        0, "Share this many models across the SDK processes of a worker (e.g. 1 on a GPU VM running N "
           "processes); 0 = one model per process.", settings.count(0))
    decode_threads: Optional[int] = settings.option(
        DEFAULT_DECODE_THREADS, "Threads per worker decoding images ahead of the model (0 = decode inline). "
        f"Default auto: 1 on a CPU worker, its cores but one (at most {MAX_AUTO_DECODE_THREADS}) on a CUDA "
        "worker.", settings.auto_or_count(0), metavar="N|auto")
    reference_cache_mb: int = settings.option(
        DEFAULT_REFERENCE_CACHE_MB, "Rows sharing a reference decode it and run its backbone once, keeping up to "
        "this many MB per worker process (0 = off). Same scores either way.", settings.count(0))
    group_by_reference: bool = settings.option(
        False, "Shuffle rows by reference before scoring, so candidates of one reference meet in one worker even "
               "when far apart in the input (a shuffle of the rows).", settings.switch())

    def __post_init__(self) -> None:
        settings.check(self)
