#!/usr/bin/env bash
# Install Debian's Chromium for the browser checks (tests/browser.py drives it with playwright; playwright's own
# browser download is never used). Only where it can: running as root with apt-get present. apt keeps the
# downloaded .debs in its cache.
#
# Idempotent: with chromium already on PATH it does nothing (a re-run takes milliseconds). It never fails the
# set-up: one line says what it did or why it skipped, and the script exits 0 (the browser tests then skip).
# LPIPS_PIPE_SKIP_BROWSER=1 skips everything.
set -uo pipefail

if [ "${LPIPS_PIPE_SKIP_BROWSER:-0}" = "1" ]; then
  echo "setup_browser: skipped (LPIPS_PIPE_SKIP_BROWSER=1)"
  exit 0
fi

if path=$(command -v chromium 2>/dev/null); then
  echo "setup_browser: chromium present: $path"
  exit 0
fi

if [ "$(id -u)" != "0" ]; then
  echo "setup_browser: chromium unavailable: not root, cannot apt-get install chromium (browser tests will skip)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: chromium unavailable: no apt-get on this machine (browser tests will skip)" >&2
  exit 0
fi

LOG_DIR=${LPIPS_PIPE_RUNNERS_HOME:-$HOME/.cache/lpips-pipe/runners}/logs
mkdir -p "$LOG_DIR" 2>/dev/null || LOG_DIR=${TMPDIR:-/tmp}
log="$LOG_DIR/chromium-apt.log"

last_line() {  # the last non-blank line of a log, for a one-line reason
  grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-300
}

export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q >"$log" 2>&1; then
  echo "setup_browser: chromium unavailable: apt-get update failed ($(last_line "$log"); full log: $log)" >&2
  exit 0
fi
if ! apt-get install -y -q chromium >>"$log" 2>&1; then
  echo "setup_browser: chromium unavailable: apt-get install failed ($(last_line "$log"); full log: $log)" >&2
  exit 0
fi
if path=$(command -v chromium 2>/dev/null); then
  echo "setup_browser: installed Debian's chromium: $path ($(chromium --version 2>/dev/null | head -n 1))"
else
  echo "setup_browser: chromium unavailable: apt-get installed chromium but it is not on PATH (see $log)" >&2
fi
exit 0
