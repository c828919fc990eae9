"""lpips-pipe's job and commands: options, plan and graph (``job``), streaming, the command line (``cli``),
report, filter.

The command line hides two of Beam's root-logger lines that are not the user's concern (optional BigQuery
clients missing, at import; waiting for a local job server's channel); the filter is installed here, before
anything imports Beam.
"""

import logging


class _DropBeamImportNoise(logging.Filter):
    """Beam logs a warning about optional BigQuery clients on import, and one while a local job server starts;
    they are not ours to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "apitools not found" not in message and "Waiting for grpc channel to be ready" not in message


logging.getLogger().addFilter(_DropBeamImportNoise())
