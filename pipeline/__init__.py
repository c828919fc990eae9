"""lpips-pipe's job: options, the Beam graph, the command line (``python -m pipeline``)."""

import transforms  # noqa: F401  (installs the log filter before Beam is imported)
