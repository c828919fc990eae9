"""``python -m pipeline``: run the lpips-pipe job (same as the ``lpips-pipe`` command)."""

import sys

from pipeline.cli import console_main

sys.exit(console_main())
