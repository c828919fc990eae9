"""``python -m pipeline.report`` (from the repository root) or ``python -m lpips_pipe.pipeline.report``: lpips-pipe-report: (re)write a run's report."""

import sys

from lpips_pipe.pipeline.report.writer import main

sys.exit(main())
