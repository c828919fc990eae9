#!/usr/bin/env bash
# Set up (or update) .venv and everything the tests use, then run the test suite (pytest's arguments pass
# through: `bash scripts/test.sh -m "not slow"` is the fast tier).
#   scripts/bootstrap.sh --tests   the pinned Python install (all the demo needs) and the tests' packages
#   scripts/setup_runners.sh   Prism, the Flink job server and distribution, versitygw (pinned, cached; a runner
#                              that cannot be built only makes its tests skip, with one line saying why)
#   scripts/setup_browser.sh   Debian's Chromium for the browser checks (never fails the set-up)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --tests
bash scripts/setup_runners.sh
bash scripts/setup_browser.sh
# Three worker processes (pytest-xdist), each test module one unit of work but for a few whose tests are each long
# (tests/conftest.py says which, and in what order). LPIPS_PIPE_TEST_WORKERS=0 (or `-n 0`) runs it in one process.
.venv/bin/python -m pytest -n "${LPIPS_PIPE_TEST_WORKERS:-3}" --dist loadscope --no-loadscope-reorder "$@"
