"""Beam wiring of the scoring step: rows -> prepared pairs -> batched LPIPS -> output rows.

Only glue lives here: decoding rules are in :mod:`transforms.records`, score math in
:mod:`transforms.score_math`, the model in :mod:`transforms.model`, the output
contract in :mod:`transforms.schemas`.

- :class:`PreparePairs` turns ``(record_id, row)`` into a :class:`PreparedPair` or
  an error row (tagged output ``errors``).
- :class:`LpipsModelHandler` is a RunInference model handler: the model is loaded
  once per worker process (Beam's ``shared.Shared``), batches are bounded by a
  pixel budget, and pairs of one scored size share a forward.
- :class:`ScorePairs` chains them and returns ``{"scores": ..., "errors": ...}``:
  every input row lands in exactly one of the two.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.utils.windowed_value import WindowedValue

from transforms import score_math
from transforms.metrics import NAMESPACE, counter
from transforms.model import LpipsScorer, ModelConfig
from transforms.records import PreparedPair, RecordConfig, RecordError, prepare_pair
from transforms.schemas import OutputSchemas

ERRORS = "errors"
# Pixel budget of one model batch, by device (benchmarks/bench.py): on CPU a single 512x512 pair per
# forward was fastest here (bigger batches fall out of cache), on GPU big batches keep it busy.
CPU_BATCH_PIXELS = 512 * 512
GPU_BATCH_PIXELS = 2048 * 2048
DEFAULT_BATCH_PIXELS = CPU_BATCH_PIXELS
DEFAULT_MAX_BATCH_PAIRS = 32
DEFAULT_DECODE_THREADS = 1

_LOGGER = logging.getLogger(__name__)


@dataclass
class ScoredPair:
    """A prepared pair with its raw (not yet area-normalised) LPIPS and the model identity,
    or, when the model failed on this pair alone, ``error`` = (exception class name, message)."""

    pair: PreparedPair
    raw_lpips: Optional[float]
    net: str
    lpips_version: str
    weights_sha256: str
    error: Optional[tuple[str, str]] = None


def _count_error(stage: str, error_type: str) -> None:
    counter("errors").inc()
    counter(f"errors.{stage}.{error_type}").inc()


class PreparePairs(beam.DoFn):
    """``(record_id, row)`` -> :class:`PreparedPair`, or an error row on the ``errors`` tag.

    With ``decode_threads > 0`` rows are decoded on a thread pool (Pillow and numpy
    release the GIL), up to ``2 * decode_threads`` ahead, so decoding can overlap the
    model's forward that runs downstream in the same fused stage. That pays where the
    forward leaves CPU cores idle (a GPU worker); on a CPU worker whose forward uses every
    core it measured neutral (benchmarks/bench.py). Each result keeps its input's window
    and timestamp; order within a bundle is kept.
    """

    def __init__(self, config: RecordConfig, schemas: OutputSchemas, decode_threads: int = 0) -> None:
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {decode_threads}")
        self._config = config
        self._schemas = schemas
        self._threads = decode_threads
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: deque = deque()

    def setup(self) -> None:
        if self._threads:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="lpips-decode")

    def start_bundle(self) -> None:
        self._pending = deque()

    def _prepare(self, record_id: Any, row: dict[str, Any]) -> Any:
        try:
            return prepare_pair(record_id, row, self._config)
        except RecordError as error:
            return self._schemas.error_row(record_id, row, error.stage, error.error_type, error.message)

    def _output(self, result: Any, timestamp: Any = None, window: Any = None) -> Any:
        # Runs on the bundle's thread: Beam metrics are only recorded there. Results emitted for
        # an earlier element (or in finish_bundle) carry that element's window explicitly.
        result_value = result if timestamp is None else WindowedValue(result, timestamp, [window])
        if isinstance(result, PreparedPair):
            return result_value
        _count_error(result["error_stage"], result["error_type"])
        return beam.pvalue.TaggedOutput(ERRORS, result_value)

    def process(self, element: tuple[Any, dict[str, Any]], timestamp: Any = beam.DoFn.TimestampParam,
                window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        if self._pool is None:
            yield self._output(self._prepare(*element))
            return
        self._pending.append((self._pool.submit(self._prepare, *element), timestamp, window))
        while self._pending and (len(self._pending) > 2 * self._threads or self._pending[0][0].done()):
            future, done_timestamp, done_window = self._pending.popleft()
            yield self._output(future.result(), done_timestamp, done_window)

    def finish_bundle(self) -> Iterator[Any]:
        while self._pending:
            future, timestamp, window = self._pending.popleft()
            yield self._output(future.result(), timestamp, window)

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def pair_pixels(pair: PreparedPair) -> int:
    """Batching weight of a pair: its scored pixel count."""
    return pair.pixels


class LpipsModelHandler(ModelHandler[PreparedPair, ScoredPair, LpipsScorer]):
    """RunInference handler scoring :class:`PreparedPair` batches with :class:`LpipsScorer`.

    ``batch_pixels`` bounds the pixels of one batch (reference and edited count
    once per pair; a pair larger than the budget goes alone): at the CPU default a
    512x512 pair goes alone and 128x128 pairs go 16 at a time. ``max_batch_pairs``
    bounds the pairs of one forward.
    """

    def __init__(self, model_config: ModelConfig, batch_pixels: int = DEFAULT_BATCH_PIXELS,
                 max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS, max_batch_duration_secs: float = 0) -> None:
        super().__init__()
        if batch_pixels <= 0 or max_batch_pairs <= 0:
            raise ValueError(f"batch_pixels and max_batch_pairs must be > 0, got {batch_pixels}, {max_batch_pairs}")
        if max_batch_duration_secs < 0:
            raise ValueError(f"max_batch_duration_secs must be >= 0, got {max_batch_duration_secs}")
        self._max_batch_duration_secs = max_batch_duration_secs
        self._model_config = model_config
        self._batch_pixels = batch_pixels
        self._max_batch_pairs = max_batch_pairs

    def load_model(self) -> LpipsScorer:
        scorer = LpipsScorer(self._model_config)
        _LOGGER.info("loaded LPIPS %s from %s (sha256 %s) on %s", scorer.net, scorer.weights_source,
                     scorer.weights_sha256, scorer.device)
        return scorer

    def run_inference(self, batch: Sequence[PreparedPair], model: LpipsScorer,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[ScoredPair]:
        if not model.load_counted:  # metrics are not recorded during setup(), so count on first use
            model.load_counted = True
            counter("model_loads").inc()
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, pair in enumerate(batch):
            by_size[(pair.height, pair.width)].append(index)
        results: list[Optional[ScoredPair]] = [None] * len(batch)
        for indices in by_size.values():
            for start in range(0, len(indices), self._max_batch_pairs):
                for index, scored in self._score_chunk(batch, indices[start:start + self._max_batch_pairs], model):
                    results[index] = scored
        return results  # type: ignore[return-value]

    def _score_chunk(self, batch: Sequence[PreparedPair], chunk: list[int],
                     model: LpipsScorer) -> list[tuple[int, ScoredPair]]:
        """One forward for ``chunk``; if it fails, each pair alone, so that one pair the model cannot take
        (e.g. an image under 31x31 pixels for alex) fails alone, not the pairs that shared its batch."""
        def scored(index: int, raw: Optional[float], error: Optional[tuple[str, str]] = None) -> tuple:
            return index, ScoredPair(batch[index], raw, model.net, model.lpips_version, model.weights_sha256, error)

        try:
            raw = model.raw_scores(np.stack([batch[i].reference for i in chunk]),
                                   np.stack([batch[i].filled for i in chunk]))
        except Exception as error:  # the model's own failure: never a crash, never a lost row
            if len(chunk) == 1:
                return [scored(chunk[0], None, (type(error).__name__, str(error)))]
            _LOGGER.warning("LPIPS failed on a batch of %d pairs (%s); scoring them one at a time", len(chunk), error)
            return [item for index in chunk for item in self._score_chunk(batch, [index], model)]
        return [scored(index, float(value)) for index, value in zip(chunk, raw)]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # A fixed target (min == max) in pixels, so batches do not depend on timing.
        kwargs = {
            "min_batch_size": self._batch_pixels,
            "max_batch_size": self._batch_pixels,
            "element_size_fn": pair_pixels,
        }
        if self._max_batch_duration_secs:
            # Streaming: a partial batch is flushed after this long (Beam's stateful batching).
            kwargs["max_batch_duration_secs"] = self._max_batch_duration_secs
        return kwargs

    def get_num_bytes(self, batch: Sequence[PreparedPair]) -> int:
        return sum(pair.reference.nbytes + pair.filled.nbytes for pair in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class ToScoreRow(beam.DoFn):
    """:class:`ScoredPair` -> scores row (area normalisation happens here), or an error row on the
    ``errors`` tag when the model failed on the pair."""

    def __init__(self, schemas: OutputSchemas) -> None:
        self._schemas = schemas

    def process(self, scored: ScoredPair) -> Iterator[Any]:
        pair = scored.pair
        if scored.error is not None:
            error_type, message = scored.error
            _count_error("model", error_type)
            yield beam.pvalue.TaggedOutput(
                ERRORS, self._schemas.error_row(pair.record_id, pair.row, "model", error_type, message))
            return
        counter("pairs_scored").inc()
        counter("pixels_scored").inc(pair.pixels)
        yield self._schemas.score_row(pair.record_id, pair.row, {
            "lpips": score_math.normalise_score(scored.raw_lpips, pair.mask_pixels, pair.width, pair.height),
            "measured_fraction": score_math.measured_fraction(pair.mask_pixels, pair.width, pair.height),
            "mask_mode": pair.mask_mode,
            "width": pair.width,
            "height": pair.height,
            "net": scored.net,
            "lpips_version": scored.lpips_version,
            "weights_sha256": scored.weights_sha256,
        })


class FailedBatchToErrors(beam.DoFn):
    """A batch RunInference failed on outside the per-pair handling -> one error row per pair (stage ``model``)."""

    def __init__(self, schemas: OutputSchemas) -> None:
        self._schemas = schemas

    def process(self, failure: tuple[Sequence[PreparedPair], Any]) -> Iterator[dict[str, Any]]:
        batch, info = failure
        error_type = getattr(info[0], "__name__", str(info[0])) if isinstance(info, tuple) else type(info).__name__
        message = str(info[1]) if isinstance(info, tuple) else str(info)
        for pair in batch:
            _count_error("model", error_type)
            yield self._schemas.error_row(pair.record_id, pair.row, "model", error_type, message)


class ScorePairs(beam.PTransform):
    """``(record_id, row)`` -> ``{"scores": score rows, "errors": error rows}``."""

    def __init__(self, record_config: RecordConfig, model_handler: LpipsModelHandler, schemas: OutputSchemas,
                 decode_threads: int = DEFAULT_DECODE_THREADS) -> None:
        super().__init__()
        self._decode_threads = decode_threads
        self._record_config = record_config
        self._model_handler = model_handler
        self._schemas = schemas

    def expand(self, rows: beam.PCollection) -> dict[str, beam.PCollection]:
        prepared = rows | "Decode" >> beam.ParDo(
            PreparePairs(self._record_config, self._schemas, self._decode_threads)).with_outputs(
            ERRORS, main="pairs"
        )
        scored, failed = prepared.pairs | "LPIPS" >> RunInference(self._model_handler).with_exception_handling()
        rows = scored | "ToScoreRows" >> beam.ParDo(ToScoreRow(self._schemas)).with_outputs(ERRORS, main="scores")
        failed_batches = failed.failed_inferences | "FailedBatches" >> beam.ParDo(FailedBatchToErrors(self._schemas))
        errors = (prepared[ERRORS], rows[ERRORS], failed_batches) | "AllErrors" >> beam.Flatten()
        return {"scores": rows.scores, "errors": errors}
