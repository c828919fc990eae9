"""Beam counters of lpips-pipe, in one namespace, so runs can be summarised. The names are
:class:`transforms.layout.CounterName`'s; a finished run's values are read back as
:class:`transforms.layout.Counters`."""

from __future__ import annotations

from apache_beam.metrics import Metrics

from lpips_pipe.transforms.outputs.layout import COUNTER_NAMESPACE

NAMESPACE = COUNTER_NAMESPACE


def counter(name: str):
    """The ``lpips_pipe/<name>`` counter (``name``: a :class:`~transforms.layout.CounterName`)."""
    return Metrics.counter(NAMESPACE, name)
