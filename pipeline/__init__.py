"""lpips-pipe's job and commands: options, plan and graph (``job``), streaming, the command line (``cli``),
report, filter.

The command line hides one log line of Beam's own import (optional BigQuery clients missing), which is not
the user's concern; it is installed here, before anything imports Beam.
"""

import logging


class _DropBeamImportNoise(logging.Filter):
    """Beam logs a warning about optional BigQuery clients on import; it is not ours to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropBeamImportNoise())
