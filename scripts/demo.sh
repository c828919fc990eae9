#!/usr/bin/env bash
# Set up .venv, build demo pairs from real photographs, score them, print a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pipeline.demo --workdir demo "$@"
