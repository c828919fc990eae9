"""Beam metric names of lpips-pipe, in one namespace, so runs can be summarised."""

from __future__ import annotations

from apache_beam.metrics import Metrics

NAMESPACE = "lpips_pipe"


def counter(name: str):
    """The ``lpips_pipe/<name>`` counter.

    ``rows_read`` (every input row, skipped ones included), ``rows_skipped`` (id already in the outputs named
    by ``--skip_existing``), ``pairs_scored``, ``pixels_scored``, ``model_loads``, ``errors`` and
    ``errors.<stage>.<type>``, ``duplicate_ids`` / ``duplicate_id_rows`` (ids on more than one row, and those
    rows). ``rows_read == rows_skipped + pairs_scored + errors`` for a finished run.
    """
    return Metrics.counter(NAMESPACE, name)
