"""The public Beam transforms: ``ReadPairs | ScoreLPIPS | WriteScores`` (the command line's whole graph).

- :class:`ReadPairs`: Parquet / JSON Lines files -> input rows (plain dicts), streamed split by split.
- :class:`ScoreLPIPS`: input rows -> :class:`ScoreOutputs` ``.scores`` / ``.errors`` (plain dicts); every
  row lands in exactly one. It takes rows from any source: an image value may be encoded bytes, a Hugging
  Face Image dict ``{bytes, path}``, a path/URI string, a ``PIL.Image.Image`` or an ``HxWx3 uint8`` numpy
  array. Options are checked when the transform is built (a bad value, no weights: ``ValueError``).
- :class:`WriteScores`: the two outputs -> ``OUT/scores/*.parquet`` and ``OUT/errors/*.parquet`` with
  explicit schemas (:mod:`transforms.layout`).

Everything else in ``transforms`` is free to move; these three (and ``masked_lpips``) are the promise,
re-exported by the ``lpips_pipe`` package.
"""

from __future__ import annotations

import inspect
import uuid
from typing import Any, Optional, Sequence, Union

import apache_beam as beam
import pyarrow as pa

from lpips_pipe.transforms import paths
from lpips_pipe.transforms import settings
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.inputs.split import InputSplit
from lpips_pipe.transforms.inputs.files import ReadInputSplit, match_inputs, plan_files
from lpips_pipe.transforms.records.decode import DEFAULT_MAX_IMAGE_BYTES
from lpips_pipe.transforms.beam.progress import ProgressConfig
from lpips_pipe.transforms.records.pairs import RecordConfig
from lpips_pipe.transforms.outputs.schemas import OutputSchemas, RowFormat, build_output_schemas, model_settings
from lpips_pipe.transforms.beam.scoring import (DriftMapRows, GroupByReference, LpipsModelHandler, ScoreOutputs,
                                                ScorePairs, ScoringConfig, WorkerPlan, drift_map_selector,
                                                plan_workers)
from lpips_pipe.transforms.outputs.sink import CommitPlan, WriteParquet, WriteWindowedParquet, part_labels
from lpips_pipe.transforms.model.weights import ModelConfig, check_weights


def _with_id(element: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    record_id, row = element
    if layout.ID_FIELD in row:
        return row
    return {**row, layout.ID_FIELD: record_id}


class ReadPairs(beam.PTransform):
    """Input files -> one dict per row, every column as stored (images are not decoded here).

    ``source`` is a path, glob or folder (its Parquet, JSON Lines and tar files at any depth; any Beam
    filesystem), planned when the transform is built, or the splits of a job's plan. ``id_column``: the column
    holding record ids; without one, each row gets ``id = "<file>:<row>"``. Relative image paths resolve
    against the folder of the file that names them: rewritten absolute here in ``image_columns`` (default the
    stage's ``ref_image`` / ``edited_image``), and resolved by :class:`ScoreLPIPS` against the row's file in
    whichever columns it reads. Splits are spread over workers (a reshuffle of split descriptors,
    never of rows), and rows stream from each split, so memory does not grow with the data.

    Planned from a path or glob, the files must share their column names (a ``ValueError`` naming the first
    that differs, as the command line says it), and ``schema`` is their common schema (``None`` for splits).
    """

    def __init__(self, source: Union[str, Sequence[InputSplit]], id_column: Optional[str] = None,
                 image_columns: Sequence[str] = ("ref_image", "edited_image"),
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        super().__init__()
        self.schema: Optional[pa.Schema] = None
        if isinstance(source, str):
            files = match_inputs(source)
            if not files:
                raise ValueError(f"no file matches {source}")
            self.schema, source = plan_files(files)  # InputError (a ValueError) when the files' columns differ
        self._splits = list(source)
        self._id_column = id_column
        self._image_columns = tuple(image_columns)
        self._max_image_bytes = max_image_bytes

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.PCollection:
        rows = (pipeline
                | "Splits" >> beam.Create(self._splits)
                | "Read" >> ReadSplits(self._id_column, self._image_columns, self._max_image_bytes))
        # What WriteScores derives the output schemas from when these rows are scored (ScoreOutputs).
        rows.lpips_pipe_input = (self.schema, self._id_column)
        return rows


class ReadSplits(beam.PTransform):
    """A PCollection of :class:`InputSplit` -> one dict per row (see :class:`ReadPairs`); what a stream
    uses as its files land."""

    def __init__(self, id_column: Optional[str] = None,
                 image_columns: Sequence[str] = ("ref_image", "edited_image"),
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        super().__init__()
        self._id_column = id_column
        self._image_columns = tuple(image_columns)
        self._max_image_bytes = max_image_bytes

    def expand(self, splits: beam.PCollection) -> beam.PCollection:
        return (splits
                | "Spread" >> beam.Reshuffle()  # splits, not rows: image bytes are streamed, never gathered
                | "Rows" >> beam.ParDo(ReadInputSplit(self._id_column, self._image_columns, with_source=True,
                                                      max_image_bytes=self._max_image_bytes))
                | "WithIds" >> beam.Map(_with_id))


class ScoreLPIPS(beam.PTransform):
    """Masked, area-normalised LPIPS of each input row (a dict), seed-exact in fp32 (SPEC 1).

    ``scope``: ``unedit_area`` (measure outside the boxes), ``edit_area`` (inside) or ``full``;
    ``mask_mode`` (``outer``/``inner``/``none``) overrides it and ``scope_column``. ``net``: ``alex``,
    ``vgg``, ``squeeze``. ``max_side``: downscale both images to fit ``max_side x max_side`` first (0 = off).
    ``precision``: ``fp32`` (exact), ``bf16``, ``fp16`` (CUDA). ``device``: ``auto``, ``cpu``, ``cuda``.
    Column names are those of the command line. ``batch_pixels`` (0 = by device) bounds a forward's
    pixels; ``model_copies`` > 0 shares models across a worker's SDK processes (GPU VMs).
    ``reference_cache_mb`` (default 256, 0 = off): rows with the same reference (same encoded bytes, same
    ``max_side``) decode it once and run its backbone once, within this many MB per worker process; scores
    are the same bits with or without hits. ``group_by_reference``: shuffle rows by reference first, so
    candidates of one reference meet even when they are far apart in the input (costs a shuffle of the rows).
    ``decode_threads`` (default ``None``: 1 on a CPU worker, its cores but one on a CUDA worker; 0 = inline)
    decode the next model batch while this one is in the forward.

    ``drift_maps`` chooses rows whose score dict also carries ``drift_map`` (:data:`layout.DRIFT_MAP_FIELD`):
    the float32 ``height x width`` per-pixel LPIPS of (reference, filled) at the scored size, what
    ``masked_lpips(..., return_map=True)`` returns (``lpips.LPIPS(..., spatial=True)``; not area-normalised,
    its mean is close to ``lpips * measured_fraction``). ``None`` (default): no maps, no cost; a collection
    of ids (matched against the id column's value); or a callable ``row -> bool`` on the input row (it must
    pickle, like any DoFn argument). Only chosen rows cost an extra spatial pass; every score is the same
    with or without maps. Error rows never carry a map; :class:`WriteScores` does not write the key.

    Score dicts carry ``id``, ``lpips``, ``measured_fraction``, ``mask_mode``, ``width``, ``height``,
    ``net``, ``lpips_version``, ``weights_sha256``, ``box_flags`` (what was odd about the boxes, README
    "Boxes") and the row's other non-image fields (one colliding
    with an output name is kept as ``input_<name>``); error dicts carry the original row plus
    ``error_stage``, ``error_type``, ``error_message``.
    """

    # Its keywords are the options of these configs (declared once, transforms.settings), these five first and
    # also positional, in this order (a public promise); then the keywords of the Python API alone.
    CONFIGS = (RecordConfig, ModelConfig, ScoringConfig)
    POSITIONAL = ("scope", "net", "max_side", "precision", "device")

    def __init__(self, *args: Any, id_column: Optional[str] = layout.ID_FIELD,
                 drift_maps: Optional[DriftMapRows] = None, row_format: Optional[RowFormat] = None,
                 progress: Optional[ProgressConfig] = None, check: bool = True, workers: Optional[WorkerPlan] = None,
                 **options: Any) -> None:
        super().__init__()
        values = settings.bind(_OPTIONS_SIGNATURE, args, options)  # TypeError for an unknown keyword
        self.record_config = settings.from_values(RecordConfig, values)  # ValueError for a bad value
        self.model_config = settings.from_values(ModelConfig, values)
        self.scoring_config = settings.from_values(ScoringConfig, values)
        if check:  # fail while the pipeline is built, not on a worker
            check_weights(self.model_config)
        # what the workers need, resolved once: here, or at the job's planning (``workers``)
        self.workers = workers or plan_workers(self.scoring_config, self.model_config)
        self.handler = LpipsModelHandler.for_plan(self.model_config, self.scoring_config, self.workers)
        self._row_format = row_format or RowFormat(id_column, self.record_config.image_columns)
        self._progress = progress
        self._drift_maps = drift_map_selector(drift_maps)  # ValueError for a string, a non-collection

    @classmethod
    def from_configs(cls, record_config: RecordConfig, model_config: ModelConfig,
                     scoring_config: Optional[ScoringConfig] = None, **kwargs: Any) -> "ScoreLPIPS":
        """The transform for already checked configs (the job's plan)."""
        return cls(**settings.values_of(record_config, model_config, scoring_config or ScoringConfig()), **kwargs)

    def expand(self, rows: beam.PCollection) -> ScoreOutputs:
        if self.scoring_config.group_by_reference:
            rows = rows | "ByReference" >> GroupByReference(self.record_config.ref_column)
        # ScorePairs' steps directly under this transform: Decode, LPIPS, ToScoreRows, ...
        outputs = ScorePairs(self.record_config, self.handler, self._row_format, self.workers.decode_threads,
                             self._progress, drift_maps=self._drift_maps).expand(rows)
        return outputs.describe(self, *getattr(rows, "lpips_pipe_input", (None, None)))


_OPTIONS_SIGNATURE = inspect.Signature(settings.parameters(ScoreLPIPS.CONFIGS, ScoreLPIPS.POSITIONAL))
# What help(ScoreLPIPS) and inspect.signature show: every keyword with its default.
ScoreLPIPS.__init__.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *_OPTIONS_SIGNATURE.parameters.values(),
    *(parameter for name, parameter in inspect.signature(ScoreLPIPS.__init__).parameters.items()
      if parameter.kind == inspect.Parameter.KEYWORD_ONLY)])


def output_schemas_for(input_schema: pa.Schema, score: "ScoreLPIPS", id_column: Optional[str] = None) -> OutputSchemas:
    """The output schemas of ``score``'s rows for inputs with ``input_schema`` (e.g. ``ReadPairs(...).schema``):
    what :class:`WriteScores` writes. ``id_column``: the input's id column (default ``id`` when the input has
    one, else ``<file>:<row>`` ids). Raises ``ValueError`` when the input lacks a column ``score`` needs."""
    if id_column is None and layout.ID_FIELD in input_schema.names:
        id_column = layout.ID_FIELD
    return build_output_schemas(input_schema, score.record_config, id_column, model_settings(score.model_config))


class WriteScores(beam.PTransform):
    """:class:`ScoreOutputs` (or a dict with ``scores`` and ``errors``) -> ``OUT/scores/part-*.parquet`` and
    ``OUT/errors/part-*.parquet`` with explicit schemas.

    ``schemas``: the input's schema (``ReadPairs(...).schema``, a ``pyarrow.Schema``), or the job's
    :class:`~transforms.schemas.OutputSchemas`; ``None`` (the default) takes the input schema from the
    ``ReadPairs`` the rows came from (``ReadPairs(path) | ScoreLPIPS(...) | WriteScores(out)``). ``num_shards``
    0 packs the staged files into files of up to 128 MB; N: at most N files. A windowed stream writes files
    per window. The error rows of a :class:`ScoreOutputs` are written part by part, never flattened first
    (see :mod:`transforms.sink`). ``commit`` (a :class:`transforms.sink.CommitPlan`) and ``run`` are the
    command line's: it commits through the restart ledger as splits finish."""

    def __init__(self, output: str, schemas: Union[OutputSchemas, pa.Schema, None] = None, num_shards: int = 0, *,
                 commit: Optional[CommitPlan] = None, run: Optional[str] = None) -> None:
        super().__init__()
        if num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {num_shards}")
        self._output = paths.absolute(output)
        self._schemas = schemas
        self._num_shards = num_shards
        self._commit = commit
        self._run = run or (commit.run if commit else None)

    def _output_schemas(self, outputs: Any) -> OutputSchemas:
        if isinstance(self._schemas, OutputSchemas):
            return self._schemas
        score = getattr(outputs, "score", None)
        schema = self._schemas if isinstance(self._schemas, pa.Schema) else getattr(outputs, "input_schema", None)
        if schema is None or score is None:
            raise ValueError("WriteScores needs the input's schema: pass ReadPairs(...).schema (or build the "
                             "pipeline as ReadPairs(path) | ScoreLPIPS(...) | WriteScores(output))")
        return output_schemas_for(schema, score, getattr(outputs, "input_id_column", None))

    def expand(self, outputs: dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        schemas = self._output_schemas(outputs)
        parts = {layout.SCORES: [outputs[layout.SCORES]],
                 layout.ERRORS: list(getattr(outputs, "error_parts", ()) or [outputs[layout.ERRORS]])}
        by_kind = {layout.SCORES: schemas.scores, layout.ERRORS: schemas.errors}
        labelled = part_labels(parts)
        if all(part.is_bounded for part in labelled.values()):
            written = labelled | "Write" >> WriteParquet(self._output, by_kind, self._num_shards, self._commit)
        else:
            written = labelled | "Write" >> WriteWindowedParquet(self._output, by_kind,
                                                                 self._run or uuid.uuid4().hex, self._num_shards)
        return {kind: written for kind in by_kind}
