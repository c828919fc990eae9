"""The command line's declarations without Beam or torch: :class:`JobConfig`, :data:`CONFIGS`, ``--help``,
the options page (``docs/OPTIONS.md``) and spelling suggestions for unknown flags.

Every option is a field of one of the configs (:mod:`transforms.settings`); the configs live in light
modules (``transforms/records/config.py``, ``transforms/model/config.py``, ``transforms/beam/config.py``,
``pipeline/report/config.py`` and :class:`JobConfig` here), so ``lpips-pipe --help`` and
``python -m lpips_pipe.pipeline.flags --markdown`` import neither torch, Beam nor numpy.
:mod:`pipeline.options` re-exports these names and adds Beam's side (``LpipsPipeOptions``, parsing).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from lpips_pipe.pipeline.report.config import ReportConfig
from lpips_pipe.transforms import settings
from lpips_pipe.transforms.beam.config import ScoringConfig
from lpips_pipe.transforms.model.config import ModelConfig
from lpips_pipe.transforms.records.config import RecordConfig

PROG = "lpips-pipe"
DEFAULT_ID_COLUMN = "id"

# Exit codes of lpips-pipe (pipeline/cli.py returns them), for --help and docs/REFERENCE.md.
EXIT_CODES = (
    (0, "the job ran (some rows may be in OUT/errors/); a stream stopped by SIGINT/SIGTERM or --watch_stop_after"),
    (1, "the job itself failed (a worker died, a filesystem error); the message says what was written"),
    (2, "a mistake found before anything ran (a bad or unknown option, no input, a bad file, no weights, the "
        "output in use or already holding results, a runner that is not built): one line, nothing written"),
    (3, "the job ran but more rows failed than --max_error_fraction allows (by default: every row failed)"),
    (130, "interrupted (Ctrl-C) in a batch run; the same command continues it"),
)

BOX_FORMAT = (
    "Boxes: the coords column holds, per row, a list of boxes in reference pixels, [[x1, y1, x2, y2], ...] "
    "(start inclusive, end exclusive; several boxes are a union), or one flat box, {x1, y1, x2, y2} structs, "
    "Qwen-VL [{\"bbox_2d\": [...], \"label\": ...}] objects, or JSON text of any of these. --box_format xywh "
    "reads COCO [x, y, w, h]; --coords_scale qwen1000 / unit reads a 0..1000 / 0..1 grid. --scope unedit_area "
    "(default) measures outside the boxes, edit_area inside, full the whole image.")


@dataclass(frozen=True)
class JobConfig:
    """The options of the command line's job itself (inputs, outputs, restarts, streams, exit codes),
    declared once (:mod:`transforms.settings`)."""

    input: Optional[str] = settings.option(None, "Parquet, JSON Lines or WebDataset tar shard file(s) or glob "
                                                 "(local, gs://, s3://, ...) of image pairs.")
    output: Optional[str] = settings.option(None, "Directory for scores/, errors/ (Parquet) and report/.")
    overwrite: bool = settings.option(False, "Replace the outputs, report and restart ledger already in --output "
                                             "(default: a finished run's outputs are refused, an interrupted run "
                                             "is continued).", settings.switch())
    id_column: Optional[str] = settings.option(None, f"Id column (default {DEFAULT_ID_COLUMN!r} if present, else "
                                                     "<file>:<row> ids).")
    watch_interval: float = settings.option(0.0, "With --streaming: look for new files matching --input every S "
                                                 "seconds (default 10 when streaming). Given alone it turns "
                                                 "--streaming on.", settings.seconds())
    watch_stop_after: float = settings.option(0.0, "With --streaming: stop by itself after S seconds (0 = until "
                                                   "interrupted).", settings.seconds())
    window_s: float = settings.option(0.0, "With --streaming: rows are written in windows of S seconds of arrival "
                                           "time (0 = the watch interval).", settings.seconds())
    allow_mixed: bool = settings.option(False, "Let a restart or --skip_existing continue from scores made with "
                                               "another net, lpips version, weights, mask mode, max_side or "
                                               "precision (default: refuse, naming the field).", settings.switch())
    max_error_fraction: float = settings.option(1.0, "Exit 3 when more than this fraction of the rows went to "
                                                     "errors (default 1.0: only when every row failed).",
                                                settings.fraction())
    num_shards: int = settings.option(0, "At most this many files per output, merged at the end (0 = files of up "
                                         "to 128 MB).", settings.count(0))
    skip_existing: Optional[str] = settings.option(None, "Resume from another folder: skip input rows whose id is "
                                                         "already in these earlier outputs (a directory means its "
                                                         "scores/*.parquet; or a file/glob of Parquet files with an "
                                                         "id column).", metavar="DIR_OR_GLOB")
    no_report: bool = settings.option(False, "Do not write report/ (report.md, report.json, histogram.png, "
                                             "index.html) into --output after the run.", settings.switch())
    progress_interval_s: float = settings.option(30.0, "A progress line (rows done, rate, ETA) at most this often "
                                                       "per worker, or a live bar in a terminal (0 = off).",
                                                 settings.seconds())

    def __post_init__(self) -> None:
        settings.check(self)


# Every config whose options the command line takes, in --help's order.
CONFIGS = (JobConfig, RecordConfig, ModelConfig, ScoringConfig, ReportConfig)
# --help's and the options page's heading of each config.
TITLES = {JobConfig: "Job: inputs, outputs, restarts, streams", RecordConfig: "Records: columns, boxes, what is "
          "measured", ModelConfig: "Model", ScoringConfig: "Scoring: batching, decoding, reuse (per worker)",
          ReportConfig: "Report"}


def default_text(field: dataclasses.Field) -> str:
    """How ``--help`` and the options page show a field's default."""
    default = field.default
    if field.metadata["rule"].parse is bool:
        return "off" if not default else "on"
    if default is None:
        return "auto" if field.metadata.get("metavar") == "N|auto" else "none"
    return str(default)


REQUIRED = ("input", "output")  # a job needs both (JobConfig's None only means "not given")


def _helped(field: dataclasses.Field) -> str:
    text = field.metadata["help"]
    if field.name in REQUIRED:
        return f"{text} (required)"
    return text if "default" in text.lower() else f"{text} (default: {default_text(field)})"


def add_documented_arguments(parser: argparse.ArgumentParser, configs: Iterable[type] = CONFIGS) -> None:
    """One argument group per config on ``parser``, each flag's help ending with its default."""
    for config in configs:
        settings.add_arguments(parser.add_argument_group(TITLES.get(config, config.__name__)), config,
                               helped=_helped)


def exit_codes_text(width: int = 110) -> str:
    import textwrap  # noqa: PLC0415

    return "\n".join(textwrap.fill(meaning, width, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7)
                     for code, meaning in EXIT_CODES)


def help_text() -> str:
    """``--help`` of our options (Beam's own options pass through unchanged)."""
    parser = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} --input GLOB --output DIR [options] [Beam options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score (reference, edited) image pairs from Parquet, JSON Lines or WebDataset shards with "
                    "masked, area-normalised LPIPS\n(lower is better; 0.0 = the measured area is perceptually "
                    "unchanged). Writes OUT/scores/, OUT/errors/ (Parquet) and OUT/report/.\n\n"
                    + _wrap(BOX_FORMAT),
        epilog="Beam's options (--runner, --streaming, --direct_num_workers, --setup_file, ...) pass through to "
               "Beam.\nA batch job runs in this process; --streaming uses Prism (else Flink) built by `bash "
               "scripts/setup_runners.sh`.\n\nExit codes:\n" + exit_codes_text() +
               "\n\nEvery option, output column and exit code: docs/OPTIONS.md, docs/REFERENCE.md.",
    )
    add_documented_arguments(parser)
    return parser.format_help()


def _wrap(text: str, width: int = 110) -> str:
    import textwrap  # noqa: PLC0415

    return textwrap.fill(text, width)


def flag_names(configs: Iterable[type] = CONFIGS) -> list[str]:
    """Every ``--name`` the configs declare for the command line (aliases included), without the dashes."""
    names = []
    for config in configs:
        for field in settings.options_of(config):
            if field.metadata["cli"]:
                names += [field.name, *(alias.lstrip("-") for alias in field.metadata["aliases"])]
    return names


def suggestion(token: str, known: Iterable[str]) -> Optional[str]:
    """The known flag an unknown ``token`` (``--ref-column``, ``--ref_colum=x``) most likely meant, as
    ``--name``; ``None`` when none is close."""
    name = token.lstrip("-").split("=", 1)[0]
    if not name:
        return None
    known = sorted(set(known))
    underscored = name.replace("-", "_")
    if underscored in known:
        return f"--{underscored}"
    close = difflib.get_close_matches(underscored, known, n=1, cutoff=0.75)
    return f"--{close[0]}" if close else None


def unknown_message(unknown: Sequence[str], known: Iterable[str]) -> str:
    """The one-line error for unknown flags, each with its likely spelling."""
    known = list(known)
    parts = []
    for token in unknown:
        guess = suggestion(token, known)
        parts.append(f"{token} (did you mean {guess}?)" if guess else token)
    return f"unknown option(s): {' '.join(parts)} (see --help)"


# --------------------------------------------------------------------------- docs/OPTIONS.md

OPTIONS_PAGE = "docs/OPTIONS.md"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _values(field: dataclasses.Field) -> str:
    rule: settings.Rule = field.metadata["rule"]
    if rule.parse is bool:
        return "switch"
    if rule.choices:
        return " / ".join(f"`{choice}`" for choice in rule.choices)
    found = rule.problem(object())  # each rule's message names what it takes
    if found and found.startswith("must be "):
        return found[len("must be "):].split(", got")[0]
    return "text"


def options_markdown(configs: Sequence[type] = CONFIGS) -> str:
    """``docs/OPTIONS.md``: every option of ``configs``, from their declarations."""
    lines = [
        "# Options of lpips-pipe",
        "",
        "<!-- GENERATED from the declarations in transforms/settings.py's configs by "
        "`python -m lpips_pipe.pipeline.flags --markdown > docs/OPTIONS.md` (or `python scripts/gen_options.py`); "
        "do not edit by hand: tests/test_options_page.py fails when this page is not current. -->",
        "",
        "Each option is a field of one config dataclass (`transforms/settings.py` declares how); the command line "
        "(`lpips-pipe --OPTION VALUE`), the checks and `ScoreLPIPS(...)`'s keywords come from the same "
        "declaration. Options marked *Python only* are keywords of the Python API, not flags. Beam's own options "
        "(`--runner`, `--streaming`, `--direct_num_workers`, `--setup_file`, ...) pass through to Beam.",
        "",
        "Exit codes: " + "; ".join(f"**{code}** {meaning}" for code, meaning in EXIT_CODES) + ".",
        "",
        BOX_FORMAT,
    ]
    for config in configs:
        module = config.__module__.replace("lpips_pipe.", "")
        lines += ["", f"## {TITLES.get(config, config.__name__)}", "",
                  f"`{config.__name__}` (`{module}`).", "",
                  "| option | default | values | what it does |", "| --- | --- | --- | --- |"]
        for field in settings.options_of(config):
            flags = [f"--{field.name}", *field.metadata["aliases"]] if field.metadata["cli"] else []
            name = ", ".join(f"`{flag}`" for flag in flags) or f"`{field.name}` (Python only)"
            default = "required" if field.name in REQUIRED else f"`{_cell(default_text(field))}`"
            lines.append(f"| {name} | {default} | {_cell(_values(field))} | "
                         f"{_cell(field.metadata['help'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lpips_pipe.pipeline.flags [--markdown]``: the help text, or the options page."""
    args = list(sys.argv[1:] if argv is None else argv)
    print(options_markdown() if "--markdown" in args else help_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
