#!/usr/bin/env bash
# The formatting check (ctest format.*): every C++ source under src/, include/, tests/ and fuzz/ of TREE must be
# what clang-format 14 (Debian 12's; scripts/setup.sh installs it) makes of it with the project's .clang-format.
# Other versions format some constructs differently, so only version 14 is used; without it the check is skipped
# (exit 77, the tests' SKIP_RETURN_CODE). Fix the tree with: scripts/format.sh
#   scripts/check_format.sh [TREE]        (default: this repository)
set -uo pipefail
tree="${1:-$(dirname "$0")/..}"
cf=$(command -v clang-format-14) || { echo "format: clang-format-14 not found (scripts/setup.sh installs it); skipped"; exit 77; }
cd "$tree" || exit 2
mapfile -t files < <(find src include tests fuzz -name '*.cpp' -o -name '*.h' 2>/dev/null | grep -vE '^tests/(layers|format)/' | sort)
# A tree holding only the check's own test file (tests/format/) is checked as given.
[ ${#files[@]} -gt 0 ] || mapfile -t files < <(find . -name '*.cpp' -o -name '*.h' | sort)
[ ${#files[@]} -gt 0 ] || { echo "format: no C++ sources under $tree"; exit 1; }
bad=$("$cf" --style=file --dry-run "${files[@]}" 2>&1 | grep -oE '^[^:]+\.(cpp|h):[0-9]+:[0-9]+: (warning|error)' | cut -d: -f1 | sort -u)
if [ -n "$bad" ]; then
  echo "format: $(echo "$bad" | wc -l) of ${#files[@]} files are not clang-format-14 clean (fix: scripts/format.sh):"
  echo "$bad" | sed 's/^/  /'
  exit 1
fi
echo "format: ${#files[@]} files clean"
