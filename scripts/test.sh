#!/usr/bin/env bash
# The README's second command: install what is missing, build, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# A build and a test run need a few GB; a full disk otherwise shows up as a confusing compiler error.
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [ "${free_kb:-0}" -lt 3000000 ]; then
  echo "test: only $((free_kb / 1024)) MB free on $(df -P . | awk 'NR == 2 { print $6 }'); the build and the tests need about 3 GB" >&2
  exit 1
fi
scripts/setup.sh
scripts/build.sh
if [ ! -d ../shared/fixtures/sd-tiny ] && [ -z "${DMX_SHARED_DIR:-}" ]; then
  echo "test: ../shared/fixtures not found: golden tests will be skipped" >&2
fi
cd "${DMX_BUILD_DIR:-build}"
# Every scratch file of the run (the tests' folders, anything the binary writes to $TMPDIR) goes into one
# folder that is removed at the end, whatever happens.
run_tmp=$(mktemp -d "${TMPDIR:-/tmp}/dmx-ctest-XXXXXX")
trap 'rm -rf "$run_tmp"' EXIT
export TMPDIR="$run_tmp"
ctest --output-on-failure --timeout 900 -j 2 "$@"
