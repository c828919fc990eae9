"""``python -m pipeline`` (from the repository root): run the lpips-pipe job, as ``python -m lpips_pipe`` does."""

import sys

from lpips_pipe.pipeline.launch import console_main  # --help without Beam/torch, else pipeline.cli

sys.exit(console_main())
