#!/usr/bin/env bash
# Installs the Debian packages dmx needs, only those missing. Idempotent; safe to re-run.
set -euo pipefail
PKGS=(cmake ninja-build g++ ccache pkg-config libtorch-dev libopenblas0-openmp nlohmann-json3-dev
      libpng-dev libjpeg62-turbo-dev libgtest-dev
      libopencv-core-dev libopencv-imgproc-dev  # OpenCV: Canny preprocessor (ControlNet)
      libgloo-dev)  # Gloo headers + library for data-parallel training (c10d ProcessGroupGloo)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# libtorch's matmul must use OpenBLAS (OpenMP build), not the reference BLAS (30x slower).
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
case "$blas" in
  *openblas*) ;;
  *) echo "setup: warning: libblas.so.3 points to ${blas:-nothing}, not OpenBLAS; run: update-alternatives --config libblas.so.3-x86_64-linux-gnu" >&2 ;;
esac
