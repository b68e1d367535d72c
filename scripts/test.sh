#!/usr/bin/env bash
# The README's second command: install what is missing, build, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
if [ ! -d ../shared/fixtures/sd-tiny ] && [ -z "${DMX_SHARED_DIR:-}" ]; then
  echo "test: ../shared/fixtures not found: golden tests will be skipped" >&2
fi
cd "${DMX_BUILD_DIR:-build}"
ctest --output-on-failure --timeout 900 -j 2 "$@"
