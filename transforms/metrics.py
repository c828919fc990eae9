"""Beam metric names of lpips-pipe, in one namespace, so runs can be summarised."""

from __future__ import annotations

from apache_beam.metrics import Metrics

NAMESPACE = "lpips_pipe"


def counter(name: str):
    """The ``lpips_pipe/<name>`` counter (rows_read, pairs_scored, pixels_scored, model_loads, errors, ...)."""
    return Metrics.counter(NAMESPACE, name)
