"""``python -m pipeline.calibrate`` (from the repository root) or ``python -m lpips_pipe.pipeline.calibrate``: lpips-pipe-calibrate: labels to thresholds, or --check."""

import sys

from lpips_pipe.pipeline.calibrate.command import main

sys.exit(main())
