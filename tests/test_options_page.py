"""docs/OPTIONS.md is generated from the option declarations and current; --help is made from them too."""

from __future__ import annotations

import pathlib

from lpips_pipe.pipeline import flags
from lpips_pipe.transforms import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_options_page_is_current():
    page = (ROOT / flags.OPTIONS_PAGE).read_text(encoding="utf-8")
    assert page == flags.options_markdown(), \
        "docs/OPTIONS.md is not current: run `.venv/bin/python scripts/gen_options.py`"


def test_every_option_is_on_the_page_and_in_help_with_its_default():
    page = flags.options_markdown()
    help_text = flags.help_text()
    for config in flags.CONFIGS:
        for field in settings.options_of(config):
            if field.metadata["cli"]:
                assert f"`--{field.name}`" in page and f"--{field.name}" in help_text
    for code, _ in flags.EXIT_CODES:
        assert f"**{code}**" in page and f"{code:>5}  " in help_text
    assert "(default: none)" in help_text and "default 12" in help_text  # every default is stated


def test_an_unknown_flag_suggests_the_known_spelling():
    known = flags.flag_names()
    assert flags.suggestion("--ref-column", known) == "--ref_column"
    assert flags.suggestion("--max_sid=3", known) == "--max_side"
    assert flags.suggestion("--zzz", known) is None
    message = flags.unknown_message(["--ref-column"], known)
    assert message == "unknown option(s): --ref-column (did you mean --ref_column?) (see --help)"
