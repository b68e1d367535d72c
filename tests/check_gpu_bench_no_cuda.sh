#!/usr/bin/env bash
# ctest gpu_bench.no_cuda_exits_2: scripts/gpu-bench.sh without CUDA (CUDA_VISIBLE_DEVICES= hides every device, so
# that the check holds on a GPU machine too) must exit 2 with "no CUDA device/torch found" and what it
# looked for, in seconds, before building anything.
#   tests/check_gpu_bench_no_cuda.sh SOURCE_DIR WORK_DIR
set -uo pipefail
src="$1" work="$2"
rm -rf "$work" && mkdir -p "$work" || exit 1
start=$SECONDS
out=$(env -u DMX_TORCH_DIR CUDA_VISIBLE_DEVICES= OUT="$work/out" DMX_GPU_BUILD_DIR="$work/build" \
  bash "$src/scripts/gpu-bench.sh" 2>&1)
rc=$?
echo "$out"
fail() { echo "gpu_bench check: $*"; exit 1; }
[ "$rc" = 2 ] || fail "exit $rc, expected 2"
grep -q "no CUDA device/torch found" <<<"$out" || fail "no 'no CUDA device/torch found' message"
grep -q "Looked for:" <<<"$out" || fail "the message does not say what was looked for"
[ ! -e "$work/build" ] || fail "it created the build folder $work/build"
[ ! -e "$work/out" ] || fail "it wrote the output folder $work/out"
[ $((SECONDS - start)) -le 30 ] || fail "it took $((SECONDS - start)) s (more than 30)"
# --dry-run shows the plan (the CUDA build and both dtypes), then fails the same way.
plan=$(env -u DMX_TORCH_DIR CUDA_VISIBLE_DEVICES= OUT="$work/out" DMX_GPU_BUILD_DIR="$work/build" \
  bash "$src/scripts/gpu-bench.sh" --dry-run 2>&1)
rc=$?
[ "$rc" = 2 ] || fail "--dry-run without CUDA: exit $rc, expected 2"
for want in "no CUDA device/torch found" "scripts/build.sh dmx_cli" "--device cuda" "--dtype fp16" "--dtype bf16"; do
  grep -qF -- "$want" <<<"$plan" || fail "--dry-run does not show '$want'"
done
if [ -e "$work/build" ] || [ -e "$work/out" ]; then fail "--dry-run wrote something"; fi
echo "gpu_bench check: exit 2, clear message, nothing built, --dry-run shows the plan, $((SECONDS - start)) s"
