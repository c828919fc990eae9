"""The report's options (--report_group_column, --report_k, --report_threshold, --report_seed), declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from lpips_pipe.transforms import settings

DEFAULT_REPORT_K = 12  # rows per gallery of the page (--report_k; 0 = no galleries)


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows: options of the job and of ``lpips-pipe-report``, declared once
    (:mod:`transforms.settings`)."""

    report_group_column: Optional[str] = settings.option(
        None, "Also tabulate LPIPS per value of this (passed-through) column, and show a gallery of the worst rows "
              "of each of its largest groups (lpips-pipe-report: --group_column is the same option).",
        aliases=("--group_column",))
    report_k: int = settings.option(
        DEFAULT_REPORT_K, f"Rows per gallery of report/index.html (worst per mask mode and group, nearest "
                          f"--report_threshold, random from the better half, errors); default {DEFAULT_REPORT_K}, "
                          "0 = no galleries.", settings.count(0))
    report_threshold: Optional[float] = settings.option(
        None, "The report page also shows the rows whose LPIPS is nearest X.", settings.finite(), metavar="X")
    report_seed: int = settings.option(0, "Seed of the report's random gallery (rows with LPIPS <= the median); "
                                          "default 0.", settings.whole())

    def __post_init__(self) -> None:
        settings.check(self)
