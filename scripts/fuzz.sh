#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) in build-fuzz/ and runs each for N seconds
# on its committed corpus. New interesting inputs go to build-fuzz/corpus/<target> (not to the
# repo); crashes to build-fuzz/artifacts/<target>/. See fuzz/README.md.
#   scripts/fuzz.sh [SECONDS=300] [TARGET...]       targets: safetensors image parameters pickle
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-300}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(safetensors image parameters pickle)

# clang and the libFuzzer runtime are needed here only, not for normal builds.
need=()
for p in clang-14 libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
bash scripts/setup.sh

JOBS=${DMX_FUZZ_JOBS:-2}
if [ ! -f build-fuzz/build.ninja ]; then
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
    -DDMX_FUZZ=ON -DDMX_BUILD_TESTS=OFF
fi
ninja -C build-fuzz -j"$JOBS" $(printf 'fuzz_%s ' "${TARGETS[@]}")

# libtorch and OpenMP are not instrumented: ODR and container-overflow reports from them are noise.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0:detect_container_overflow=0:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=1
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "build-fuzz/corpus/$t" "build-fuzz/artifacts/$t"
  echo "== fuzz_$t for ${SECONDS_PER_TARGET}s"
  rc=0
  "build-fuzz/fuzz/fuzz_$t" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -timeout=20 \
    -max_len=16384 -print_final_stats=1 -artifact_prefix="build-fuzz/artifacts/$t/" \
    "build-fuzz/corpus/$t" "fuzz/corpus/$t" >"build-fuzz/fuzz_$t.log" 2>&1 || rc=$?
  grep -E "^(Done [0-9]+ runs|stat::number_of_executed_units|==[0-9]+==ERROR|SUMMARY)" "build-fuzz/fuzz_$t.log" || true
  if [ "$rc" != 0 ]; then
    echo "fuzz_$t: FAILED (see build-fuzz/fuzz_$t.log and build-fuzz/artifacts/$t/)"
    status=1
  fi
done
exit $status
