"""lpips-pipe's building blocks: score math, model, record decoding, Beam transforms."""

import logging


class _DropBeamImportNoise(logging.Filter):
    """Beam logs a warning about optional BigQuery clients on import; it is not ours to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropBeamImportNoise())
