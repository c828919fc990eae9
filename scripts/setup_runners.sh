#!/usr/bin/env bash
# Fetch and build Beam's Prism and Flink runners for this machine, at the versions of runners/versions.env:
#   Prism        Go binary built from the Beam Go module (go install; Go module proxy, Go's module cache)
#   Flink        job-server jar assembled with Maven from the served Beam Flink runner (runners/flink-job-server)
#   versitygw    the S3 server the object-storage tests start on loopback (go install, like Prism)
#   Flink dist   a standalone Flink (JobManager/TaskManager scripts and jars) unpacked from PyPI's apache-flink
# into $LPIPS_PIPE_RUNNERS_HOME (default ~/.cache/lpips-pipe/runners), where pipeline/runners.py finds them.
#
# `bash scripts/setup_runners.sh` sets up all four (what scripts/test.sh does); naming pieces sets up only those:
#   prism      Prism (needs Go >= 1.26; a few minutes the first time)
#   flink      the Flink job server and distribution (need Java 11/17 and Maven; about 5 minutes the first time)
#   versitygw  the tests' S3 server (needs Go; about 2 minutes the first time)
# A job needing a runner that is not built exits 2 naming the command (pipeline/runners.py, not_set_up).
#
# Idempotent: whatever is already in place (a stamp per runner, written last) is not fetched again, so a
# re-run takes a second. A runner that cannot be had does not fail the set-up: one line says which and why,
# and the script still exits 0 (the tests that need it skip). LPIPS_PIPE_SKIP_RUNNERS=1 skips everything.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${LPIPS_PIPE_SKIP_RUNNERS:-0}" = "1" ]; then
  echo "setup_runners: skipped (LPIPS_PIPE_SKIP_RUNNERS=1)"
  exit 0
fi

# shellcheck source=../runners/versions.env
. runners/versions.env
HOME_DIR=${LPIPS_PIPE_RUNNERS_HOME:-$HOME/.cache/lpips-pipe/runners}
mkdir -p "$HOME_DIR"
LOGS="$HOME_DIR/logs"
mkdir -p "$LOGS"

unavailable() {  # runner, reason
  echo "setup_runners: $1 unavailable: $2" >&2
}

last_line() {  # the last non-blank line of a log, for a one-line reason
  grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-300
}

# ---------------------------------------------------------------- Go-built pieces: Prism, versitygw
go_build() {  # name, version, module path, what it is and how long, [GOFLAGS]
  local name=$1 version=$2 module=$3 what=$4 goflags=${5:-}
  local binary=${module##*/}
  local dest="$HOME_DIR/$binary/$version" log="$LOGS/$binary-build.log"
  [ -x "$dest/$binary" ] && [ -f "$dest/.complete" ] && return 0
  if ! command -v go >/dev/null 2>&1; then
    unavailable "$name" "no 'go' on PATH (Go >= 1.26 builds it: go install .../$binary@$version)"
    return 1
  fi
  echo "setup_runners: building $name $version with $(go env GOVERSION) ($what)"
  local tmp="$dest.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  if ! GOBIN="$tmp" GOFLAGS="$goflags" go install "$module@$version" >"$log" 2>&1; then
    unavailable "$name" "go install failed ($(last_line "$log"); full log: $log)"
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$dest" && mv "$tmp" "$dest" && echo "$version" > "$dest/.complete"
}

setup_prism() {
  go_build Prism "$PRISM_VERSION" github.com/apache/beam/sdks/v2/go/cmd/prism "a few minutes the first time" -mod=mod
}

setup_versitygw() {  # the tests' S3 server
  go_build versitygw "$VERSITYGW_VERSION" github.com/versity/versitygw/cmd/versitygw \
    "the tests' S3 server; about 2 minutes the first time"
}

# ---------------------------------------------------------------- Flink job server
java_major() {
  java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1") ? v[2] : v[1]; exit}'
}

setup_flink_job_server() {
  local dest="$HOME_DIR/flink" log="$LOGS/flink-job-server-build.log"
  local jar="$dest/beam-runners-flink-$FLINK_MINOR-job-server-$BEAM_JAVA_VERSION.jar"
  local want
  want=$(cat runners/versions.env runners/flink-job-server/pom.xml | sha256sum | cut -d' ' -f1)
  [ -f "$jar" ] && [ "$(cat "$jar.complete" 2>/dev/null)" = "$want" ] && return 0
  if ! command -v java >/dev/null 2>&1; then
    unavailable Flink "no 'java' on PATH (Java 11 or 17 runs the job server)"
    return 1
  fi
  local major; major=$(java_major)
  if [ -z "$major" ] || [ "$major" -lt 11 ]; then
    unavailable Flink "Java $major found, the Flink job server needs Java 11 or 17"
    return 1
  fi
  if ! command -v mvn >/dev/null 2>&1; then
    unavailable Flink "no 'mvn' on PATH (Maven assembles the job-server jar from runners/flink-job-server/pom.xml)"
    return 1
  fi
  echo "setup_runners: assembling the Flink $FLINK_MINOR job server from Beam Java $BEAM_JAVA_VERSION with Maven"
  local build="$HOME_DIR/build/flink-job-server"
  if ! mvn -B -q -f runners/flink-job-server/pom.xml package -Dmaven.test.skip=true \
      -Dbeam.version="$BEAM_JAVA_VERSION" -Dflink.minor="$FLINK_MINOR" -Drunners.build.dir="$build" \
      >"$log" 2>&1; then
    unavailable Flink "Maven could not assemble the job server ($(grep -m1 '\[ERROR\]' "$log" | cut -c1-300); full log: $log)"
    return 1
  fi
  mkdir -p "$dest"
  mv "$build/flink-job-server.jar" "$jar.tmp" && mv "$jar.tmp" "$jar" && rm -rf "$build" && rmdir "$HOME_DIR/build" 2>/dev/null
  echo "$want" > "$jar.complete"
}

# ---------------------------------------------------------------- Flink distribution (standalone cluster)
setup_flink_dist() {
  local home="$HOME_DIR/flink/flink-$FLINK_DIST_VERSION" log="$LOGS/flink-dist-download.log"
  [ -x "$home/bin/jobmanager.sh" ] && [ -f "$home/.complete" ] && return 0
  local py
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=$(command -v python3 || true); fi
  if [ -z "$py" ]; then
    unavailable "Flink cluster" "no Python/pip to download apache-flink==$FLINK_DIST_VERSION"
    return 1
  fi
  echo "setup_runners: downloading the Flink $FLINK_DIST_VERSION distribution (PyPI apache-flink, ~235 MB)"
  local dl="$HOME_DIR/downloads/flink-$FLINK_DIST_VERSION" tmp="$home.tmp"
  rm -rf "$dl" "$tmp" && mkdir -p "$dl" "$tmp"
  # Only the jars and scripts are used: no install, no dependencies, nothing touches .venv.
  if ! "$py" -m pip download --quiet --no-deps --no-cache-dir -d "$dl" \
      "apache-flink==$FLINK_DIST_VERSION" "apache-flink-libraries==$FLINK_DIST_VERSION" >"$log" 2>&1; then
    unavailable "Flink cluster" "pip download failed ($(last_line "$log"); full log: $log)"
    rm -rf "$dl" "$tmp"
    return 1
  fi
  local whl sdist
  whl=$(ls "$dl"/apache_flink-"$FLINK_DIST_VERSION"-*.whl 2>/dev/null | head -n 1)
  sdist=$(ls "$dl"/apache[-_]flink[-_]libraries-"$FLINK_DIST_VERSION".tar.gz 2>/dev/null | head -n 1)
  if [ -z "$whl" ] || [ -z "$sdist" ]; then
    unavailable "Flink cluster" "pip did not return apache-flink's wheel and apache-flink-libraries' sdist (see $dl)"
    rm -rf "$dl" "$tmp"
    return 1
  fi
  if ! "$py" - "$whl" "$sdist" "$tmp" >>"$log" 2>&1 <<'PY'
import os, shutil, sys, tarfile, zipfile
whl, sdist, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:                       # bin/ and conf/ (the cluster scripts)
    for name in z.namelist():
        for part in ("bin", "conf"):
            prefix = f"pyflink/{part}/"
            if name.startswith(prefix) and not name.endswith("/"):
                target = os.path.join(out, part, name[len(prefix):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
with tarfile.open(sdist) as t:                        # lib/, opt/, plugins/, bin/bash-java-utils.jar
    for member in t.getmembers():
        parts = member.name.split("/")
        if len(parts) > 3 and parts[1] == "deps" and parts[2] in ("lib", "opt", "plugins", "bin") and member.isfile():
            target = os.path.join(out, *parts[2:])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with t.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
for name in os.listdir(os.path.join(out, "bin")):
    if name.endswith(".sh") or name in ("flink",):
        os.chmod(os.path.join(out, "bin", name), 0o755)
assert os.path.isfile(os.path.join(out, "bin", "jobmanager.sh")), "no bin/jobmanager.sh in the wheel"
assert any(n.startswith("flink-dist") for n in os.listdir(os.path.join(out, "lib"))), "no lib/flink-dist*.jar"
PY
  then
    unavailable "Flink cluster" "unpacking failed ($(last_line "$log"); full log: $log)"
    rm -rf "$dl" "$tmp"
    return 1
  fi
  rm -rf "$home" && mv "$tmp" "$home" && rm -rf "$dl" && rmdir "$HOME_DIR/downloads" 2>/dev/null
  echo "$FLINK_DIST_VERSION" > "$home/.complete"
}

PIECES=("$@")
wanted() {  # piece: set up when no piece is named, or when this one is
  [ "${#PIECES[@]}" -eq 0 ] && return 0
  local name
  for name in "${PIECES[@]}"; do [ "$name" = "$1" ] && return 0; done
  return 1
}
for name in "${PIECES[@]}"; do
  case "$name" in
    prism|flink|versitygw) ;;
    *) echo "setup_runners: unknown piece '$name' (prism, flink, versitygw; none = all)" >&2; exit 2 ;;
  esac
done
if wanted prism; then
  setup_prism && echo "setup_runners: Prism $PRISM_VERSION ready: $HOME_DIR/prism/$PRISM_VERSION/prism"
fi
if wanted versitygw; then
  setup_versitygw && echo "setup_runners: versitygw $VERSITYGW_VERSION (S3 server for the tests) ready:" \
    "$HOME_DIR/versitygw/$VERSITYGW_VERSION/versitygw"
fi
if wanted flink; then
  setup_flink_job_server && echo "setup_runners: Flink $FLINK_MINOR job server (Beam Java $BEAM_JAVA_VERSION) ready:" \
    "$HOME_DIR/flink/beam-runners-flink-$FLINK_MINOR-job-server-$BEAM_JAVA_VERSION.jar"
  setup_flink_dist && echo "setup_runners: Flink $FLINK_DIST_VERSION cluster distribution ready:" \
    "$HOME_DIR/flink/flink-$FLINK_DIST_VERSION"
fi
exit 0
