"""``python -m pipeline.filter`` (from the repository root) or ``python -m lpips_pipe.pipeline.filter``: lpips-pipe-filter: scores to kept / rejected files."""

import sys

from lpips_pipe.pipeline.filter.command import main

sys.exit(main())
