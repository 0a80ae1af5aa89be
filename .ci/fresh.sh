#!/usr/bin/env bash
# A fresh-machine rehearsal of CI: clone this repository's committed HEAD into a new temporary
# folder, with an empty pip cache and an empty HOME, and run .ci/run there exactly as CI does
# (CI=true, no standard input).  Prints .ci/run's phase durations and the last lines of pytest.
#
# Usage: bash .ci/fresh.sh [REV]        (REV defaults to HEAD; the work tree's changes are NOT used)
# Env:   FRESH_KEEP=1 keeps the temporary folder; FRESH_LOG=FILE writes the full log there;
#        FRESH_CACHE=machine keeps this machine's HOME and pip cache (a CI machine may have both).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
rev=${1:-HEAD}
tmp=$(mktemp -d /tmp/rma-fresh.XXXXXX)
log=${FRESH_LOG:-$tmp/ci.log}
cleanup() {
  if [ "${FRESH_KEEP:-0}" = 1 ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

git clone -q --no-hardlinks "$repo" "$tmp/repo"
git -C "$tmp/repo" checkout -q "$rev"
mkdir -p "$tmp/home" "$tmp/pip-cache"
echo "fresh clone of $(git -C "$tmp/repo" rev-parse --short HEAD) in $tmp/repo; log: $log"
start=$SECONDS
set +e
(
  cd "$tmp/repo"
  # The machine's environment, as CI has it, with a new HOME and pip cache and nothing of ours.
  if [ "${FRESH_CACHE:-}" = machine ]; then
    env -u PYTHONPATH -u VIRTUAL_ENV -u RMA_TEST_DATABASE_URL CI=true bash .ci/run </dev/null
  else
    env -u PYTHONPATH -u VIRTUAL_ENV -u RMA_TEST_DATABASE_URL HOME="$tmp/home" \
      PIP_CACHE_DIR="$tmp/pip-cache" XDG_CACHE_HOME="$tmp/home/.cache" CI=true \
      bash .ci/run </dev/null
  fi
) >"$log" 2>&1
rc=$?
set -e
echo "exit $rc after $((SECONDS - start)) s"
sed -n '/==> phase durations/,$p' "$log"
grep -E '^(=+ .*(passed|failed|error).* =+|[0-9]+ passed.*)$' "$log" | tail -3 || true
exit $rc
