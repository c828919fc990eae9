"""Write docs/OPTIONS.md from the option declarations (pipeline/flags.py's CONFIGS, declared with
transforms/settings.py). `--check`: exit 1, writing nothing, when the page is not current.

    .venv/bin/python scripts/gen_options.py            # after adding or changing an option
    .venv/bin/python scripts/gen_options.py --check    # what tests/test_options_page.py checks
"""

from __future__ import annotations

import pathlib
import sys

from lpips_pipe.pipeline.flags import OPTIONS_PAGE, options_markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    page = ROOT / OPTIONS_PAGE
    wanted = options_markdown()
    current = page.read_text(encoding="utf-8") if page.exists() else None
    if "--check" in argv:
        if current != wanted:
            print(f"{OPTIONS_PAGE} is not current: run `.venv/bin/python scripts/gen_options.py`", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        page.write_text(wanted, encoding="utf-8")
        print(f"wrote {OPTIONS_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
