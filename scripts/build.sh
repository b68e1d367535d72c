#!/usr/bin/env bash
# Configures and builds dmx into build/ (Release, Ninja, ccache, precompiled headers).
set -euo pipefail
cd "$(dirname "$0")/.."
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/dmx-ccache}"
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
export CCACHE_BASEDIR="$PWD"
BUILD_DIR="${DMX_BUILD_DIR:-build}"
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${DMX_CMAKE_ARGS:-}
fi
# Each heavy libtorch unit takes about 1 GB: keep parallelism at the core count.
ninja -C "$BUILD_DIR" -j "$(nproc)" "$@"
