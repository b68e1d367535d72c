#!/usr/bin/env bash
# GPU readiness (issue 20): on a machine with an NVIDIA GPU, builds dmx against the CUDA PyTorch found there, times
# `dmx bench --device cuda` in fp16 and bf16 at 512x512 (--preset sd15), optionally the whole picture of a model
# folder, generates one picture with the bundled emoji model on the GPU, runs the core golden tests in that build,
# and prints one markdown table of the figures. Logs go under OUT. Aims at under 8 minutes (DMX_GPU_BENCH_BUDGET_S).
#
#   scripts/gpu-bench.sh [--dry-run] [--picture-model DIR] [--runs N]
#
# Environment:
#   DMX_TORCH_DIR          a CUDA libtorch (its root, with share/cmake/Torch, or that Torch folder itself);
#                          otherwise the `torch` of $PYTHON (default: python3, then /usr/bin/python3)
#   OUT                    output folder for logs and the table (default gpu-bench-out/)
#   DMX_GPU_BUILD_DIR      build folder (default build-cuda/)
#   DMX_GPU_BENCH_BUDGET_S time budget in seconds (default 480); steps that no longer fit are reported "not run"
#
# Exit status: 0 every step ran; 1 a step failed (see its log) or did not fit the budget; 2 no CUDA device or no
# CUDA torch (checked first, before anything is built), or bad arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die2() { echo "gpu-bench: $*" >&2; exit 2; }

dry_run=0
picture_model=""
runs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --picture-model) [ $# -ge 2 ] || die2 "--picture-model needs a folder"; picture_model="$2"; shift ;;
    --runs) [ $# -ge 2 ] || die2 "--runs needs a number"; runs="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die2 "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ "$runs" =~ ^[1-9][0-9]?$ ]] || die2 "--runs must be in [1, 99], got '$runs'"
[ -z "$picture_model" ] || [ -e "$picture_model" ] || die2 "--picture-model: '$picture_model' does not exist"

out="${OUT:-gpu-bench-out}"
build="${DMX_GPU_BUILD_DIR:-build-cuda}"
budget="${DMX_GPU_BENCH_BUDGET_S:-480}"
[[ "$budget" =~ ^[0-9]+$ ]] || die2 "DMX_GPU_BENCH_BUDGET_S must be a number of seconds, got '$budget'"

# ---- 1. Find CUDA: a device and a torch built with CUDA. Nothing is built before this passes. ----------------------
looked=()
torch_dir=""      # the folder holding TorchConfig.cmake
torch_desc=""
gpu_name=""
cxx11_abi=""

no_visible_devices() { [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] || [ "${CUDA_VISIBLE_DEVICES-}" = "-1" ]; }

if [ -n "${DMX_TORCH_DIR:-}" ]; then
  for d in "$DMX_TORCH_DIR/share/cmake/Torch" "$DMX_TORCH_DIR"; do
    [ -f "$d/TorchConfig.cmake" ] && { torch_dir="$d"; break; }
  done
  if [ -z "$torch_dir" ]; then
    looked+=("DMX_TORCH_DIR=$DMX_TORCH_DIR: no TorchConfig.cmake in it or in its share/cmake/Torch")
  else
    root=$(cd "$torch_dir/../../.." && pwd)
    # A libtorch tree (lib/) or a multiarch system layout (lib/<triplet>/cmake/Torch).
    if ! compgen -G "$root/lib/libtorch_cuda*.so*" >/dev/null && ! compgen -G "$torch_dir/../../libtorch_cuda*.so*" >/dev/null; then
      looked+=("DMX_TORCH_DIR=$DMX_TORCH_DIR: a libtorch without CUDA (no libtorch_cuda*.so beside it)")
      torch_dir=""
    elif no_visible_devices; then
      looked+=("DMX_TORCH_DIR=$DMX_TORCH_DIR: CUDA libtorch, but CUDA_VISIBLE_DEVICES hides every device")
      torch_dir=""
    elif ! gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) || [ -z "$gpu_name" ]; then
      looked+=("DMX_TORCH_DIR=$DMX_TORCH_DIR: CUDA libtorch, but nvidia-smi lists no GPU")
      torch_dir=""
    else
      torch_desc="libtorch $root"
    fi
  fi
else
  pythons=()
  if [ -n "${PYTHON:-}" ]; then pythons=("$PYTHON"); else pythons=(python3 /usr/bin/python3); fi
  for py in "${pythons[@]}"; do
    if ! command -v "$py" >/dev/null 2>&1; then looked+=("$py: not found"); continue; fi
    # One line: cmake prefix | version | CUDA version or None | device available | device name | cxx11 ABI
    if ! info=$(timeout 120 "$py" -c '
import torch
ok = torch.version.cuda is not None and torch.cuda.is_available()
print("|".join([torch.utils.cmake_prefix_path, torch.__version__, str(torch.version.cuda), str(ok),
                torch.cuda.get_device_name(0) if ok else "-", str(torch._C._GLIBCXX_USE_CXX11_ABI)]))' 2>/dev/null); then
      looked+=("$(command -v "$py"): no importable torch"); continue
    fi
    IFS='|' read -r prefix version cuda ok name abi <<<"$info"
    if [ "$cuda" = "None" ]; then looked+=("$(command -v "$py"): torch $version without CUDA"); continue; fi
    if [ "$ok" != "True" ]; then
      looked+=("$(command -v "$py"): torch $version (CUDA $cuda), but torch.cuda.is_available() is False"); continue
    fi
    torch_dir="$prefix/Torch"; torch_desc="torch $version (CUDA $cuda) of $(command -v "$py")"
    gpu_name="$name"; cxx11_abi="$abi"
    break
  done
fi
if [ -z "$torch_dir" ]; then
  {
    echo "gpu-bench: no CUDA device/torch found, nothing built. Looked for:"
    printf '  - %s\n' "${looked[@]}"
    echo "Give a CUDA libtorch with DMX_TORCH_DIR=..., or a python whose torch has CUDA with PYTHON=..., on a machine"
    echo "with an NVIDIA GPU (nvidia-smi)."
  } >&2
  # --dry-run still shows the plan, then fails the same way.
  [ "$dry_run" = 1 ] || exit 2
  torch_dir="<not found>"; torch_desc="no CUDA torch"; gpu_name="none"
fi

# ---- 2. The steps ---------------------------------------------------------------------------------------------------
nvcc=$(command -v nvcc || true)
for c in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  if [ -z "$nvcc" ] && [ -x "$c" ]; then nvcc="$c"; fi
done
cuda_root=""
if [ -n "$nvcc" ]; then cuda_root=$(cd "$(dirname "$nvcc")/.." && pwd); fi
dmx="$build/dmx"
# The core golden suites (about 140 test-seconds on the 2-core CPU machine): CLIP, UNet (float32 and bf16), VAE,
# the pipelines with every scheduler, ControlNet, LoRA.
golden_filter='*/ClipTextGolden.*:*/UNetGolden.*:*/VAEGolden.*:*/PipelineGolden.*:SchedulerPipelinesGolden.*'
golden_filter+=':ControlNetGolden.*:*/LoRAGolden.*'
configure=(cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DTorch_DIR=$torch_dir")
[ -z "$cuda_root" ] || configure+=("-DCUDA_TOOLKIT_ROOT_DIR=$cuda_root" "-DCUDAToolkit_ROOT=$cuda_root")
bench_args=(bench --preset sd15 --width 512 --height 512 --device cuda --runs "$runs" --json)
picture_args=()
[ -z "$picture_model" ] || picture_args=(--picture-model "$picture_model")
smoke=(generate --model models/emoji --prompt "a smiling face" --device cuda --dtype fp16 --steps 20 --seed 1
       --output "$out/emoji-cuda-fp16.png" --overwrite)

echo "gpu-bench: $torch_desc, GPU: $gpu_name"
if [ "$dry_run" = 1 ]; then
  q() { printf '%q ' "$@"; }
  cat <<EOF
steps (--dry-run; nothing is run):
  1. $(q "${configure[@]}")
  2. DMX_BUILD_DIR=$build scripts/build.sh dmx_cli
  3. $(q "$dmx" "${bench_args[@]}" --dtype fp16 "${picture_args[@]}")
  4. $(q "$dmx" "${bench_args[@]}" --dtype bf16 "${picture_args[@]}")
  5. $(q "$dmx" "${smoke[@]}")
  6. DMX_BUILD_DIR=$build scripts/build.sh dmx_tests
  7. DMX_SHARED_DIR=../shared $build/dmx_tests --gtest_filter='$golden_filter'
  8. the markdown table into $out/table.md, logs in $out/*.log
EOF
  [ "$gpu_name" != none ] || exit 2
  exit 0
fi

missing=()
for t in cmake ninja c++ timeout; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu-bench: CUDA found, but the build needs ${missing[*]} (scripts/setup.sh installs dmx's Debian packages)" >&2
  exit 1
fi
mkdir -p "$out"
start=$SECONDS
failed=0
declare -A status
left() { echo $((budget - (SECONDS - start))); }
# step NAME SECONDS_NEEDED COMMAND...: runs COMMAND with its output in $out/NAME.log if the budget allows.
step() {
  local name="$1" need="$2"; shift 2
  if [ "$(left)" -lt "$need" ]; then
    status[$name]="not run (time budget)"; failed=1
    echo "gpu-bench: $name: not run, $(left) s left"; return 1
  fi
  echo "gpu-bench: $name ..."
  local rc=0
  timeout "$(left)" "$@" >"$out/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then status[$name]=ok; return 0; fi
  status[$name]="FAILED (exit $rc, $out/$name.log)"; failed=1
  echo "gpu-bench: $name failed; the end of $out/$name.log:"; tail -n 20 "$out/$name.log"; return 1
}

{
  echo "torch: $torch_desc"; echo "Torch_DIR: $torch_dir"; echo "GPU: $gpu_name"; echo "nvcc: ${nvcc:-not found}"
  nvidia-smi 2>&1 || true
} >"$out/environment.log"
[ -n "$nvcc" ] ||
  echo "gpu-bench: warning: no nvcc (PATH, CUDA_HOME, /usr/local/cuda); Torch's CMake config may need the CUDA toolkit"
[ "$cxx11_abi" != "False" ] ||
  echo "gpu-bench: warning: this torch uses the pre-C++11 ABI, Debian's GTest/OpenCV/gloo the new one: linking" \
       "may fail (a cxx11-ABI libtorch in DMX_TORCH_DIR avoids it)"

if step configure 60 "${configure[@]}" && step build 30 env DMX_BUILD_DIR="$build" scripts/build.sh dmx_cli; then
  step bench-fp16 40 "$dmx" "${bench_args[@]}" --dtype fp16 "${picture_args[@]}" || true
  step bench-bf16 40 "$dmx" "${bench_args[@]}" --dtype bf16 "${picture_args[@]}" || true
  step generate-emoji 20 "$dmx" "${smoke[@]}" || true
  if [ -d ../shared/fixtures ]; then
    if step build-tests 60 env DMX_BUILD_DIR="$build" scripts/build.sh dmx_tests; then
      step golden 30 env DMX_SHARED_DIR=../shared "$build/dmx_tests" --gtest_filter="$golden_filter" || true
      counts=$(grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$out/golden.log" | sed 's/^\[ *//; s/ *\] / /' |
               awk '{print $2, tolower($1)}' | paste -sd, - | sed 's/,/, /g' || true)
      [ -z "$counts" ] || status[golden]="${status[golden]} ($counts)"
    fi
  else
    status[golden]="not run (no ../shared/fixtures)"
  fi
fi

# ---- 3. The table ----------------------------------------------------------------------------------------------------
# jget KEY LOG: a number or string of the JSON line of a bench log ("-" when absent).
jget() {
  local v
  v=$(grep -o "\"$1\":[^,}]*" "$out/$2.log" 2>/dev/null | tail -1 | cut -d: -f2- | tr -d '"') || true
  echo "${v:--}"
}
fmt() { [ "$1" = "-" ] && echo "-" || printf '%.4f' "$1"; }
{
  echo "GPU: $gpu_name; $torch_desc; dmx $(git rev-parse --short HEAD 2>/dev/null || echo '?'); median of $runs runs"
  echo
  echo "| dtype | text encode (s) | unet guided step (s) | vae decode (s) | matmul peak (GFLOP/s) | whole picture (s) | status |"
  echo "|---|---|---|---|---|---|---|"
  for dt in fp16 bf16; do
    l="bench-$dt"
    echo "| $dt | $(fmt "$(jget text_encode_s "$l")") | $(fmt "$(jget unet_step_s "$l")") | $(fmt "$(jget vae_decode_s "$l")") |" \
         "$(jget matmul_peak_gflops "$l" | cut -d. -f1) | $(fmt "$(jget picture_s "$l")") | ${status[$l]:-not run} |"
  done
  echo
  echo "| step | status |"
  echo "|---|---|"
  for s in configure build generate-emoji build-tests golden; do echo "| $s | ${status[$s]:-not run} |"; done
  echo
  echo "Golden tests ($golden_filter) run on the CPU inside the CUDA build: the suite has no device switch."
  echo "Wall time: $((SECONDS - start)) s; logs: $out/"
} | tee "$out/table.md"
exit "$failed"
