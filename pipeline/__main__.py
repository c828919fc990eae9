"""``python -m pipeline`` (from the repository root): run the lpips-pipe job, as ``python -m lpips_pipe`` does."""

import sys

from lpips_pipe.pipeline.cli import console_main

sys.exit(console_main())
