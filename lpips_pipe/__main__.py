"""``python -m lpips_pipe``: run the lpips-pipe job (same as the ``lpips-pipe`` command), from any folder."""

import sys

from lpips_pipe.pipeline.launch import console_main  # --help without Beam/torch, else pipeline.cli

sys.exit(console_main())
