#!/usr/bin/env bash
# Formats every C++ source of the project in place with clang-format 14 and the project's .clang-format
# (the check: scripts/check_format.sh, ctest format.check).
set -euo pipefail
cd "$(dirname "$0")/.."
cf=$(command -v clang-format-14) || { echo "format: clang-format-14 not found (scripts/setup.sh installs it)" >&2; exit 1; }
find src include tests fuzz -name '*.cpp' -o -name '*.h' | grep -vE '^tests/(layers|format)/' | xargs "$cf" --style=file -i
