#!/usr/bin/env bash
# Set up (or update) .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pytest "$@"
