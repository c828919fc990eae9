"""``python -m lpips_pipe``: run the lpips-pipe job (same as the ``lpips-pipe`` command), from any folder."""

import sys

from lpips_pipe.pipeline.cli import console_main

sys.exit(console_main())
