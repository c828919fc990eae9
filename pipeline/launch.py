"""The ``lpips-pipe`` console command (and ``python -m lpips_pipe`` / ``python -m pipeline``): ``--help`` is
answered from the declarations alone (:mod:`pipeline.flags`: no Beam, no torch, well under a second); anything
else imports the job (:mod:`pipeline.cli`) and runs it."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def wants_help(argv: Sequence[str]) -> bool:
    return "-h" in argv or "--help" in argv


def console_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lpips-pipe``: :func:`pipeline.cli.console_main` (its exit codes), with ``--help`` answered at once."""
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        from lpips_pipe.pipeline.flags import help_text  # noqa: PLC0415

        print(help_text())
        return 0
    from lpips_pipe.pipeline import cli  # noqa: PLC0415  # Beam and torch: only for a run

    if argv is not None:
        return cli.main(args)
    return cli.console_main()


if __name__ == "__main__":
    sys.exit(console_main())
