"""Beam wiring of the scoring step: rows -> prepared pairs -> batched LPIPS -> output rows.

Only glue lives here: decoding rules are in :mod:`transforms.records`, score math in
:mod:`transforms.score_math`, the model in :mod:`transforms.scorer`, the output
contract in :mod:`transforms.schemas`.

- :class:`PreparePairs` turns an input row (a dict) into a :class:`PreparedPair` or
  an error row (tagged output ``errors``).
- :class:`LpipsModelHandler` is a RunInference model handler: the model is loaded
  once per worker process (Beam's ``shared.Shared``), batches are bounded by a
  pixel budget, and pairs of one scored size share a forward.
- :class:`ScorePairs` chains them and returns ``{"scores": ..., "errors": ...}``:
  every input row lands in exactly one of the two. A non-finite score (NaN or inf, e.g. from
  broken weights) is an error row (stage ``model``, type ``NonFiniteScore``), never a score.
- Drift maps (``drift_maps``, :class:`DriftMapSelector`): :class:`PreparePairs` marks the chosen pairs
  (``PreparedPair.want_map``), the handler runs one extra spatial pass for just those pairs
  (:meth:`LpipsScorer.raw_scores_and_maps`; every score stays what it is without maps), and
  :class:`ToScoreRow` adds the map under :data:`transforms.layout.DRIFT_MAP_FIELD`.

Progress (:mod:`transforms.progress`) is counted here, as rows are finished, so the lines appear while
the job runs.
"""

from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import logging
import math
import os
import sys
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Optional, Sequence, Union

import apache_beam as beam
import numpy as np


@contextlib.contextmanager
def _without_model_manager() -> Iterator[None]:
    """Import ``apache_beam.ml.inference.base`` without its optional ``ModelManager`` module.

    The base module imports ``ModelManager`` (and with it ``scipy.optimize``, ~0.2 s of every start-up)
    inside ``try/except ImportError``, and imports it again where ``use_model_manager=True`` needs it; our
    handler never asks for it. So, inside this block only, that module reads as missing; later imports of it
    work as usual. The same ``except`` also drops the ``resource`` module the base measures model loads with:
    it is put back."""
    name, base_name = "apache_beam.ml.inference.model_manager", "apache_beam.ml.inference.base"
    if name in sys.modules or base_name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]  # "import it" raises ImportError
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
        base = sys.modules.get(base_name)
        if base is not None and getattr(base, "resource", False) is None:
            try:
                import resource
            except ImportError:  # not on this platform: as Beam would have it
                pass
            else:
                base.resource = resource  # type: ignore[attr-defined]


with _without_model_manager():
    from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.utils.windowed_value import WindowedValue

# ScoringConfig and its defaults are declared in the light config module (--help reads it without Beam/torch).
from lpips_pipe.transforms.beam.config import (CPU_BATCH_PIXELS, DEFAULT_DECODE_THREADS, DEFAULT_MAX_BATCH_PAIRS,
                                               GPU_BATCH_PIXELS, MAX_AUTO_DECODE_THREADS, ScoringConfig)
from lpips_pipe.transforms.records.config import SCOPES
from lpips_pipe.transforms import paths
from lpips_pipe.transforms.beam import interrupt
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records import score_math
from lpips_pipe.transforms.outputs.layout import CounterName
from lpips_pipe.transforms.beam.metrics import NAMESPACE, counter
from lpips_pipe.transforms.model.scorer import LpipsScorer, cuda_available
from lpips_pipe.transforms.model.weights import ModelConfig
from lpips_pipe.transforms.beam.progress import ProgressConfig
from lpips_pipe.transforms.cache import BoundedCache
from lpips_pipe.transforms.messages import RecordError, one_line
from lpips_pipe.transforms.records.pairs import PreparedPair, RecordConfig, prepare_pair
from lpips_pipe.transforms.outputs.schemas import RowFormat

ERRORS = "errors"
# With reuse on CPU, Beam batches hold up to this many default budgets (8 pairs of 512x512).
REUSE_CPU_BATCH_FACTOR = 8
MAX_SCOPE_VALUES_COUNTED = 20
MAX_EXAMPLE_ID = 80  # characters of an id kept in a box_flag_example counter's name


def uses_cuda(device: str) -> bool:
    """Whether ``--device`` means a GPU here: ``cuda``, or ``auto`` where this process sees one (a CPU
    launcher of GPU workers should pass ``--device cuda``)."""
    return device == "cuda" or (device == "auto" and cuda_available())


def default_batch_pixels(device: str) -> int:
    """The batch budget for ``device``: big on CUDA, one 512x512 pair on CPU."""
    return GPU_BATCH_PIXELS if uses_cuda(device) else CPU_BATCH_PIXELS


@dataclass(frozen=True)
class WorkerPlan:
    """What the workers need, resolved once from the configs when the transform is built: the batch budget
    (0 resolved by device), the reference-feature bytes per worker process (the decoded references get
    :func:`decode_cache_share` of it per decode DoFn instance) and the decode threads (``None``: sized from
    the worker's own cores at ``setup()``, :func:`auto_decode_threads`)."""

    batch_pixels: int
    feature_cache_bytes: int
    decode_threads: Optional[int]


def plan_workers(scoring: ScoringConfig, model: ModelConfig) -> WorkerPlan:
    """The :class:`WorkerPlan` of ``scoring`` for ``model``'s device."""
    feature_bytes, _ = reference_cache_bytes(scoring.reference_cache_mb)
    return WorkerPlan(scoring.batch_pixels or default_batch_pixels(model.device), feature_bytes,
                      scoring.decode_threads)


def worker_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_decode_threads(device: str, cores: Optional[int] = None) -> int:
    """Decode threads of a worker when none are given, from its ``cores``: on a CUDA worker every core but
    one (the forward leaves them free, and decoding is then what bounds the rate), at most
    :data:`MAX_AUTO_DECODE_THREADS`; on a CPU worker 1 (the forward takes every core; one thread lets the
    next batch decode while this one is in the forward)."""
    cores = worker_cores() if cores is None else cores
    if uses_cuda(device):
        return max(1, min(cores - 1, MAX_AUTO_DECODE_THREADS))
    return 1


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
    drift_map: Optional[np.ndarray] = None  # float32 HxW, for a pair marked ``want_map``


# What ``drift_maps`` takes: a collection of ids, or a callable ``row -> bool`` (the input row dict).
DriftMapRows = Union[Collection[Any], Callable[[dict[str, Any]], bool]]


class DriftMapSelector:
    """Which rows get a drift map: ``rows`` is a collection of ids (matched against the row's id, the
    ``id_column`` value) or a callable ``row -> bool`` given the input row (a dict, images not decoded).
    Checked when built: a string, a non-iterable or an unhashable id is a ``ValueError``."""

    def __init__(self, rows: DriftMapRows) -> None:
        self._ids: Optional[frozenset] = None
        self._predicate: Optional[Callable[[dict[str, Any]], bool]] = None
        if callable(rows):
            self._predicate = rows
            return
        if isinstance(rows, (str, bytes, bytearray)) or not isinstance(rows, collections.abc.Iterable):
            raise ValueError(f"drift_maps must be None, a collection of ids (e.g. {{'a', 'b'}}) or a callable "
                             f"row -> bool, got {type(rows).__name__} {rows!r:.60}")
        try:
            self._ids = frozenset(rows)
        except TypeError as error:
            raise ValueError(f"drift_maps ids must be hashable scalars: {error}") from None

    def __call__(self, record_id: Any, row: dict[str, Any]) -> bool:
        if self._predicate is not None:
            return bool(self._predicate(row))
        try:
            return record_id in self._ids  # type: ignore[operator]
        except TypeError:  # an unhashable id is none of the chosen ones
            return False


def drift_map_selector(drift_maps: Optional[Union[DriftMapRows, DriftMapSelector]]) -> Optional[DriftMapSelector]:
    """``drift_maps`` as a :class:`DriftMapSelector` (``None``: no maps)."""
    if drift_maps is None or isinstance(drift_maps, DriftMapSelector):
        return drift_maps
    return DriftMapSelector(drift_maps)


def _count_error(stage: str, error_type: str) -> None:
    counter(CounterName.ERRORS).inc()
    counter(CounterName.error_type(stage, error_type)).inc()


def _count_scope(row: dict[str, Any], config: RecordConfig, seen: set) -> None:
    """Count rows whose per-row scope is neither scope name (scored as the full image, as the seed does):
    ``unknown_scope_rows``, and ``unknown_scope.<value>`` for the first few distinct values, so a typo shows
    in the summary and the report."""
    if config.scope_column is None or config.mask_mode is not None:
        return
    scope = row.get(config.scope_column)
    if scope is None or scope in SCOPES:
        return
    counter(CounterName.UNKNOWN_SCOPE_ROWS).inc()
    value = str(scope)[:40]
    if value in seen or len(seen) < MAX_SCOPE_VALUES_COUNTED:
        seen.add(value)
        counter(CounterName.unknown_scope(value)).inc()



def _source_folder(row: dict[str, Any]) -> Optional[str]:
    """The folder of the input file a row came from (``ReadPairs`` marks it), which relative image paths the
    reader left as they were (columns other than its ``image_columns``) resolve against; ``None`` for a row
    from elsewhere (they resolve against the working directory)."""
    source = row.get(layout.SOURCE_KEY)
    if not source or not isinstance(source[0], str):
        return None
    return paths.dirname(paths.absolute(source[0]))

class PreparePairs(beam.DoFn):
    """An input row (dict) -> :class:`PreparedPair`, or an error row on the ``errors`` tag.

    With ``decode_threads > 0`` (``None``: :func:`auto_decode_threads` on the worker, for ``device``) rows
    are decoded on a thread pool (Pillow and numpy release the GIL) while the model's forward runs
    downstream in the same fused stage: up to ``ahead_pixels`` of pairs (a model batch's worth; at least
    ``2 * decode_threads`` pairs) are decoded ahead, so the next batch is decoding while this one is in the
    forward. Each result keeps its input's window and timestamp; order within a bundle is kept.
    ``drift_maps`` (see :class:`DriftMapSelector`) marks the chosen pairs ``want_map``; a selector that
    raises makes its row an error row (stage ``decode``).
    """

    def __init__(self, config: RecordConfig, row_format: RowFormat, decode_threads: Optional[int] = 0,
                 progress: Optional[ProgressConfig] = None, ahead_pixels: int = 0, device: str = "auto",
                 drift_maps: Optional[Union[DriftMapRows, DriftMapSelector]] = None) -> None:
        ScoringConfig(decode_threads=decode_threads)  # the option's one rule (ValueError)
        if ahead_pixels < 0:
            raise ValueError(f"ahead_pixels must be >= 0, got {ahead_pixels}")
        self._config = config
        self._row_format = row_format
        self._decode_threads = decode_threads
        self._device = device
        self._threads = 0  # the pool's size, set in setup()
        self._ahead_pixels = ahead_pixels
        self._progress = progress
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: deque = deque()
        self._pair_pixels = 0  # the largest decoded pair so far: what an undecoded pending pair may hold
        self._scopes: set = set()
        self._drift_maps = drift_map_selector(drift_maps)

    _reference_cache_bytes = 0  # see with_reference_cache
    _reference_cache: Optional[BoundedCache] = None

    def with_reference_cache(self, max_bytes: int) -> "PreparePairs":
        """Keep up to ``max_bytes`` of decoded references (per DoFn instance), so rows sharing a reference
        decode it once and carry its ``reference_key`` (0 = off). Returns ``self``."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._reference_cache_bytes = int(max_bytes)
        return self

    def setup(self) -> None:
        self._threads = (auto_decode_threads(self._device) if self._decode_threads is None
                         else self._decode_threads)
        if self._threads:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="lpips-decode")
        if self._reference_cache_bytes:
            self._reference_cache = BoundedCache(self._reference_cache_bytes)

    def start_bundle(self) -> None:
        self._pending = deque()

    def _prepare(self, row: dict[str, Any]) -> Any:
        record_id = row.get(self._row_format.id_column) if self._row_format.id_column else None
        try:
            pair = prepare_pair(record_id, row, self._config, base_dir=_source_folder(row),
                                reference_cache=self._reference_cache)
        except RecordError as error:
            return self._row_format.error_row(record_id, row, error.stage, error.error_type, error.message)
        except Exception as error:  # a decoder bug must not lose the row either
            return self._row_format.error_row(record_id, row, "decode", type(error).__name__, str(error)[:500])
        if self._drift_maps is not None:
            try:
                pair.want_map = self._drift_maps(record_id, row)
            except Exception as error:  # the user's selector: its row is an error row, not a crash
                return self._row_format.error_row(record_id, row, "decode", type(error).__name__,
                                                  f"the drift_maps selector raised: {error}"[:500])
        return pair

    def _output(self, result: Any, timestamp: Any = None, window: Any = None) -> Any:
        # Runs on the bundle's thread: Beam metrics are only recorded there. Results emitted for
        # an earlier element (or in finish_bundle) carry that element's window explicitly.
        result_value = result if timestamp is None else WindowedValue(result, timestamp, [window])
        if isinstance(result, PreparedPair):
            self._pair_pixels = max(self._pair_pixels, result.pixels)
            _count_scope(result.row, self._config, self._scopes)
            return result_value
        _count_error(result[layout.ERROR_STAGE_FIELD], result[layout.ERROR_TYPE_FIELD])
        if self._progress is not None:
            self._progress.meter().finished(errors=1)
        return beam.pvalue.TaggedOutput(ERRORS, result_value)

    def process(self, element: dict[str, Any], timestamp: Any = beam.DoFn.TimestampParam,
                window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        interrupt.stop_if_requested()  # Ctrl-C: no new row once the finished ones are committed
        if self._pool is None:
            yield self._output(self._prepare(element))
            return
        self._pending.append((self._pool.submit(self._prepare, element), timestamp, window))
        # Only the oldest beyond the look-ahead, even when more are done: what stays pending is decoding
        # while the batch this yield completes is in the forward (finish_bundle hands out the rest).
        while self._pending and self._too_far_ahead():
            future, done_timestamp, done_window = self._pending.popleft()
            yield self._output(future.result(), done_timestamp, done_window)

    MAX_AHEAD_PAIRS = 64

    def _too_far_ahead(self) -> bool:
        """Whether the oldest pending row must be waited for: more than ``2 * decode_threads`` pending and
        (before any pair is decoded, or) more than ``ahead_pixels`` of pairs the size of the largest so far,
        or more than :data:`MAX_AHEAD_PAIRS`."""
        pending = len(self._pending)
        if pending <= 2 * self._threads:
            return False
        if pending > self.MAX_AHEAD_PAIRS or not self._pair_pixels:
            return True
        return pending * self._pair_pixels > self._ahead_pixels

    def finish_bundle(self) -> Iterator[Any]:
        while self._pending:
            future, timestamp, window = self._pending.popleft()
            yield self._output(future.result(), timestamp, window)
        if self._progress is not None:
            self._progress.meter().flush()

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_SHARED_LOAD_COUNTED = False


def _count_load_once(model: Any) -> None:
    """``model_loads`` += 1 the first time a loaded model is used (Beam drops metrics set in ``setup()``,
    where the model loads). A model shared across processes is a proxy: counted once per process."""
    global _SHARED_LOAD_COUNTED
    try:
        if model.load_counted:
            return
        model.load_counted = True
    except Exception:  # a multi-process proxy
        if _SHARED_LOAD_COUNTED:
            return
        _SHARED_LOAD_COUNTED = True
    counter(CounterName.MODEL_LOADS).inc()


def pair_pixels(pair: PreparedPair) -> int:
    """Batching weight of a pair: its scored pixel count."""
    return pair.pixels


class LpipsModelHandler(ModelHandler[PreparedPair, ScoredPair, LpipsScorer]):
    """RunInference handler scoring :class:`PreparedPair` batches with :class:`LpipsScorer`.

    ``batch_pixels`` bounds the pixels of one batch (reference and edited count
    once per pair; a pair larger than the budget goes alone): at the CPU default a
    512x512 pair goes alone and 128x128 pairs go 16 at a time (``0``: by device, see
    :func:`default_batch_pixels`). ``max_batch_pairs`` bounds the pairs of one forward.
    Batching is Beam's (``BatchElements`` with a fixed pixel target, so batches do not depend
    on timing); ``max_batch_duration_secs`` > 0 flushes a partial batch after that long
    (Beam's stateful batching, for streams). ``model_copies`` > 0 shares that many models
    across the SDK processes of a worker (Beam's ``share_model_across_processes``: one copy
    per GPU on an N-process GPU VM) instead of one model per process. Beam reads the batching arguments
    through :meth:`batch_elements_kwargs`.

    Pairs marked ``want_map`` also get a drift map (:attr:`ScoredPair.drift_map`): one extra spatial pass
    per such pair (:meth:`LpipsScorer.raw_scores_and_maps` of the pair alone, so a map does not depend on
    the batch), after the chunk's scores, which are computed as without maps. A pair whose map fails is
    retried alone like any pair, and then is an error row.
    """

    def __init__(self, model_config: ModelConfig, batch_pixels: int = 0,
                 max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS, max_batch_duration_secs: float = 0,
                 model_copies: int = 0) -> None:
        if batch_pixels < 0 or max_batch_pairs <= 0:
            raise ValueError(f"batch_pixels must be >= 0 and max_batch_pairs > 0, got {batch_pixels}, "
                             f"{max_batch_pairs}")
        if max_batch_duration_secs < 0 or model_copies < 0:
            raise ValueError(f"max_batch_duration_secs and model_copies must be >= 0, got "
                             f"{max_batch_duration_secs}, {model_copies}")
        batch_pixels = batch_pixels or default_batch_pixels(model_config.device)
        super().__init__(model_copies=model_copies or None)  # batching: batch_elements_kwargs
        self._model_config = model_config
        self._batch_pixels = batch_pixels
        self._batch_target = batch_pixels  # the pixels of one Beam batch; more with reuse on CPU
        self._max_batch_duration_secs = max_batch_duration_secs or None
        self._max_batch_pairs = max_batch_pairs

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        """Beam's ``BatchElements`` arguments (Beam's public hook): a fixed pixel target (min = max =
        :attr:`batch_target_pixels`, each pair weighing :func:`pair_pixels`), so batches do not depend on
        timing, and ``max_batch_duration_secs`` when > 0 (stateful batching, for streams)."""
        kwargs: dict[str, Any] = {"min_batch_size": self._batch_target, "max_batch_size": self._batch_target}
        if self._max_batch_duration_secs is not None:
            kwargs["max_batch_duration_secs"] = self._max_batch_duration_secs
        kwargs["element_size_fn"] = pair_pixels
        return kwargs

    @property
    def batch_pixels(self) -> int:
        return self._batch_pixels

    @property
    def device(self) -> str:
        """The ``--device`` the model runs on (``auto``, ``cpu`` or ``cuda``)."""
        return self._model_config.device

    @property
    def batch_target_pixels(self) -> int:
        """The pixels Beam gathers into one batch (``batch_pixels``, or more with reuse on CPU)."""
        return int(self._batch_target)

    def load_model(self) -> LpipsScorer:
        scorer = LpipsScorer(self._model_config)
        _LOGGER.info("loaded LPIPS %s from %s (sha256 %s) on %s", scorer.net, scorer.weights_source,
                     scorer.weights_sha256, scorer.device)
        return scorer

    _reference_cache_bytes = 0  # see with_reference_cache

    def with_reference_cache(self, max_bytes: int) -> "LpipsModelHandler":
        """Reuse reference features across pairs, keeping at most ``max_bytes`` of them per worker process
        (0 = off, the fused reference+edited forward). Returns ``self``."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._reference_cache_bytes = int(max_bytes)
        # With reuse a CPU forward holds 2 images whatever the batch (LpipsScorer._features_each), so a
        # batch of several pairs costs no cache locality; it lets a cached reference's candidates fill a
        # forward (2 filled images) instead of padding one alone. Memory: the batch's uint8 arrays only.
        target = self._batch_pixels
        if max_bytes and self._batch_pixels == CPU_BATCH_PIXELS and not uses_cuda(self._model_config.device):
            target = self._batch_pixels * REUSE_CPU_BATCH_FACTOR
        self._batch_target = target
        return self

    @classmethod
    def for_plan(cls, model_config: ModelConfig, scoring: ScoringConfig, plan: WorkerPlan) -> "LpipsModelHandler":
        """The handler of a :class:`ScoringConfig` resolved into ``plan``."""
        return cls(model_config, plan.batch_pixels, scoring.max_batch_pairs, scoring.max_batch_duration_secs,
                   scoring.model_copies).with_reference_cache(plan.feature_cache_bytes)

    @property
    def reference_cache_bytes(self) -> int:
        return self._reference_cache_bytes

    def run_inference(self, batch: Sequence[PreparedPair], model: LpipsScorer,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[ScoredPair]:
        _count_load_once(model)
        identity = model.identity()  # one call per batch, also through a shared model's proxy
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, pair in enumerate(batch):
            by_size[(pair.height, pair.width)].append(index)
        results: list[Optional[ScoredPair]] = [None] * len(batch)
        for indices in by_size.values():
            for start in range(0, len(indices), self._max_batch_pairs):
                for index, scored in self._score_chunk(batch, indices[start:start + self._max_batch_pairs], model,
                                                       identity):
                    results[index] = scored
        return results  # type: ignore[return-value]

    def _score_chunk(self, batch: Sequence[PreparedPair], chunk: list[int], model: LpipsScorer,
                     identity: tuple[str, str, str]) -> list[tuple[int, ScoredPair]]:
        """One forward for ``chunk``; if it fails, each pair alone, so that one pair the model cannot take
        (e.g. an image under 31x31 pixels for alex) fails alone, not the pairs that shared its batch."""
        def scored(index: int, raw: Optional[float], error: Optional[tuple[str, str]] = None,
                   drift_map: Optional[np.ndarray] = None) -> tuple:
            return index, ScoredPair(batch[index], raw, *identity, error, drift_map)

        try:
            references = np.stack([batch[i].reference for i in chunk])
            filled = np.stack([batch[i].filled for i in chunk])
            if self._reference_cache_bytes:
                # Reference features reused across pairs; every image alone through the backbone on CPU,
                # so a score does not depend on cache hits or on the batch (LpipsScorer.raw_scores_reused).
                raw = model.raw_scores_reused(references, filled, [batch[i].reference_key for i in chunk],
                                              self._reference_cache_bytes)
            else:
                raw = model.raw_scores(references, filled)
            # Drift maps of the marked pairs only, each pair alone: the scores above are untouched.
            maps = {index: model.raw_scores_and_maps(batch[index].reference[None], batch[index].filled[None])[1][0]
                    for index in chunk if batch[index].want_map}
        except Exception as error:  # the model's own failure: never a crash, never a lost row
            if len(chunk) == 1:
                return [scored(chunk[0], None, (type(error).__name__, str(error)))]
            _LOGGER.warning("LPIPS failed on a batch of %d pairs (%s); scoring them one at a time", len(chunk), error)
            return [item for index in chunk for item in self._score_chunk(batch, [index], model, identity)]
        return [scored(index, float(value), drift_map=maps.get(index)) for index, value in zip(chunk, raw)]

    def get_num_bytes(self, batch: Sequence[PreparedPair]) -> int:
        return sum(pair.reference.nbytes + pair.filled.nbytes for pair in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class ToScoreRow(beam.DoFn):
    """:class:`ScoredPair` -> scores row (area normalisation happens here), or an error row on the
    ``errors`` tag when the model failed on the pair or gave a non-finite score. A pair with a drift map
    gets it under :data:`transforms.layout.DRIFT_MAP_FIELD` (after the passthrough columns); error rows never."""

    def __init__(self, row_format: RowFormat, progress: Optional[ProgressConfig] = None) -> None:
        self._row_format = row_format
        self._progress = progress
        self._flag_examples: set = set()  # flags whose example id this instance has counted

    def finish_bundle(self) -> None:
        if self._progress is not None:
            self._progress.meter().flush()

    def _count_flags(self, pair: PreparedPair) -> None:
        """``box_flags.<flag>`` per flag of the row, and the first row's id of each flag (per instance)."""
        for flag in pair.box_flags:
            counter(CounterName.box_flag(flag)).inc()
            if flag not in self._flag_examples:
                self._flag_examples.add(flag)
                counter(CounterName.box_flag_example(flag, one_line(str(pair.record_id))[:MAX_EXAMPLE_ID])).inc()

    def process(self, scored: ScoredPair) -> Iterator[Any]:
        pair = scored.pair
        error = scored.error
        if error is None and not math.isfinite(scored.raw_lpips):
            error = ("NonFiniteScore", f"the model gave LPIPS {scored.raw_lpips} (weights "
                                       f"{scored.weights_sha256[:12]}...): broken weights or an overflow")
        if self._progress is not None:
            self._progress.meter().finished(errors=int(error is not None))
        if error is not None:
            error_type, message = error
            _count_error("model", error_type)
            yield beam.pvalue.TaggedOutput(
                ERRORS, self._row_format.error_row(pair.record_id, pair.row, "model", error_type, message))
            return
        counter(CounterName.PAIRS_SCORED).inc()
        counter(CounterName.PIXELS_SCORED).inc(pair.pixels)
        self._count_flags(pair)
        row = self._row_format.score_row(pair.record_id, pair.row, {
            layout.LPIPS_FIELD: score_math.normalise_score(scored.raw_lpips, pair.mask_pixels, pair.width,
                                                           pair.height),
            layout.MEASURED_FRACTION_FIELD: score_math.measured_fraction(pair.mask_pixels, pair.width, pair.height),
            layout.MASK_MODE_FIELD: pair.mask_mode,
            layout.WIDTH_FIELD: pair.width,
            layout.HEIGHT_FIELD: pair.height,
            layout.NET_FIELD: scored.net,
            layout.LPIPS_VERSION_FIELD: scored.lpips_version,
            layout.WEIGHTS_FIELD: scored.weights_sha256,
            layout.BOX_FLAGS_FIELD: list(pair.box_flags),
        })
        if scored.drift_map is not None:
            row[layout.DRIFT_MAP_FIELD] = scored.drift_map
        yield row


class FailedBatchToErrors(beam.DoFn):
    """A batch RunInference failed on outside the per-pair handling -> one error row per pair (stage ``model``)."""

    def __init__(self, row_format: RowFormat, progress: Optional[ProgressConfig] = None) -> None:
        self._row_format = row_format
        self._progress = progress

    def process(self, failure: tuple[Sequence[PreparedPair], Any]) -> Iterator[dict[str, Any]]:
        batch, info = failure
        error_type = getattr(info[0], "__name__", str(info[0])) if isinstance(info, tuple) else type(info).__name__
        message = str(info[1]) if isinstance(info, tuple) else str(info)
        for pair in batch:
            _count_error("model", error_type)
            if self._progress is not None:
                self._progress.meter().finished(errors=1)
            yield self._row_format.error_row(pair.record_id, pair.row, "model", error_type, message)


SCORES = "scores"
# Error rows are made in three places; each is its own PCollection, and ``errors`` (all of them) is their
# Flatten, made only when asked for: Beam's in-process runner buffers every element of a flattened
# PCollection (error rows carry their images), so the command line writes the three parts directly.
ERROR_PARTS = ("errors_decode", "errors_model", "errors_failed_batches")


class ScoreOutputs(dict):
    """The outputs of :class:`ScorePairs` / ``ScoreLPIPS``: ``.scores`` and ``.errors`` (also
    ``result["scores"]``, ``result["errors"]``), plus ``.error_parts``, the error rows of decoding, of the
    model and of failed batches, before they are flattened into ``errors`` (on first use). ``.score`` (the
    ``ScoreLPIPS`` that made them) and, when its rows came from ``ReadPairs``, ``.input_schema`` and
    ``.input_id_column``: what ``WriteScores`` derives the output schemas from. They are kept on the scores
    PCollection (Beam rebuilds the dict of a transform's outputs, not its PCollections)."""

    def describe(self, score: Any, input_schema: Any, input_id_column: Optional[str]) -> "ScoreOutputs":
        scores = dict.__getitem__(self, SCORES)
        scores.lpips_pipe_score = score
        scores.lpips_pipe_input = (input_schema, input_id_column)
        return self

    @property
    def score(self) -> Any:
        return getattr(dict.__getitem__(self, SCORES), "lpips_pipe_score", None)

    @property
    def input_schema(self) -> Any:
        return getattr(dict.__getitem__(self, SCORES), "lpips_pipe_input", (None, None))[0]

    @property
    def input_id_column(self) -> Optional[str]:
        return getattr(dict.__getitem__(self, SCORES), "lpips_pipe_input", (None, None))[1]

    @property
    def scores(self) -> beam.PCollection:
        return self[SCORES]

    @property
    def errors(self) -> beam.PCollection:
        return self[ERRORS]

    @property
    def error_parts(self) -> tuple[beam.PCollection, ...]:
        return tuple(dict.__getitem__(self, name) for name in ERROR_PARTS if dict.__contains__(self, name))

    def __missing__(self, key: str) -> beam.PCollection:
        if key != ERRORS or not self.error_parts:
            raise KeyError(key)
        label = f"AllErrors({self[SCORES].producer.full_label})"
        self[ERRORS] = errors = self.error_parts | label >> beam.Flatten()
        return errors


class ScorePairs(beam.PTransform):
    """Input rows (dicts) -> :class:`ScoreOutputs`: score rows and error rows (dicts); every row lands in
    exactly one.

    ``row_format`` says where the id is and which columns pass through (:class:`RowFormat`);
    ``progress`` turns on progress lines (:mod:`transforms.progress`); ``drift_maps`` chooses the rows whose
    score dicts carry a drift map (:class:`DriftMapSelector`; ``None``: none).
    """

    def __init__(self, record_config: RecordConfig, model_handler: LpipsModelHandler, row_format: RowFormat,
                 decode_threads: Optional[int] = DEFAULT_DECODE_THREADS,
                 progress: Optional[ProgressConfig] = None,
                 drift_maps: Optional[Union[DriftMapRows, DriftMapSelector]] = None) -> None:
        super().__init__()
        self._drift_maps = drift_map_selector(drift_maps)
        self._decode_threads = decode_threads
        self._record_config = record_config
        self._model_handler = model_handler
        self._row_format = row_format
        self._progress = progress

    def expand(self, rows: beam.PCollection) -> ScoreOutputs:
        prepared = rows | "Decode" >> beam.ParDo(
            PreparePairs(self._record_config, self._row_format, self._decode_threads, self._progress,
                         ahead_pixels=self._model_handler.batch_target_pixels,
                         device=self._model_handler.device, drift_maps=self._drift_maps)
            .with_reference_cache(decode_cache_share(self._model_handler.reference_cache_bytes))).with_outputs(
            ERRORS, main="pairs"
        )
        scored, failed = prepared.pairs | "LPIPS" >> RunInference(self._model_handler).with_exception_handling()
        rows = scored | "ToScoreRows" >> beam.ParDo(ToScoreRow(self._row_format, self._progress)).with_outputs(
            ERRORS, main="scores")
        failed_batches = failed.failed_inferences | "FailedBatches" >> beam.ParDo(
            FailedBatchToErrors(self._row_format, self._progress))
        return ScoreOutputs(zip((SCORES, *ERROR_PARTS), (rows.scores, prepared[ERRORS], rows[ERRORS], failed_batches)))


# --------------------------------------------------------------------------- reference reuse helpers


def reference_cache_bytes(reference_cache_mb: int) -> tuple[int, int]:
    """``--reference_cache_mb`` -> (reference-feature bytes per worker process, decoded-reference bytes per
    decode DoFn instance): 7/8 and 1/8 of it."""
    if reference_cache_mb < 0:
        raise ValueError(f"reference_cache_mb must be >= 0, got {reference_cache_mb}")
    total = int(reference_cache_mb) * 1024 * 1024
    features = total - total // 8
    return features, decode_cache_share(features)


def decode_cache_share(feature_cache_bytes: int) -> int:
    """The decoded-reference bytes that go with a feature cache of ``feature_cache_bytes`` (1/7 of it: 1/8 of
    ``--reference_cache_mb``), so a handler's cache sizes its decode DoFns' too."""
    return feature_cache_bytes // 7


def reference_group_key(row: dict[str, Any], column: str) -> str:
    """The key rows are grouped by (``--group_by_reference``): sha256 of the reference's encoded bytes, or
    its path/URI string (not read here), or of the pixels of an in-memory image. Only where rows meet
    depends on it, never a score."""
    value = row.get(column) if isinstance(row, dict) else None
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "b:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, str):
        return "p:" + value
    if isinstance(value, np.ndarray):
        return "a:" + hashlib.sha256(np.ascontiguousarray(value).tobytes() + str(value.shape).encode()).hexdigest()
    tobytes = getattr(value, "tobytes", None)
    if callable(tobytes) and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        try:
            return "i:" + hashlib.sha256(tobytes() + f"{value.mode}{value.size}".encode()).hexdigest()
        except Exception:
            pass
    return "other:" + type(value).__name__  # nulls and odd values: they become error rows anyway


class GroupByReference(beam.PTransform):
    """Rows -> the same rows, those sharing a reference next to each other (a keyed shuffle by
    :func:`reference_group_key`), so they meet in one worker and bundle and the reference caches hit.

    Cost: every row, image bytes included, goes through a shuffle (GroupByKey) and the read stage no
    longer fuses with scoring; Beam's local runners hold the shuffled rows in memory, so on them the
    job's encoded inputs must fit in RAM (Dataflow/Flink shuffle to disk/service)."""

    def __init__(self, ref_column: str = "ref_image") -> None:
        super().__init__()
        self._ref_column = ref_column

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        column = self._ref_column
        return (rows
                | "KeyByReference" >> beam.Map(lambda row: (reference_group_key(row, column), row))
                | "GroupByReference" >> beam.GroupByKey()
                | "Ungroup" >> beam.FlatMap(lambda keyed: keyed[1]))
