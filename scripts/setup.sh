#!/usr/bin/env bash
# Installs the Debian packages dmx needs, only those missing. Idempotent; safe to re-run.
set -euo pipefail
PKGS=(cmake ninja-build g++ ccache pkg-config libtorch-dev libopenblas0-openmp nlohmann-json3-dev
      libpng-dev libjpeg62-turbo-dev libgtest-dev
      libopencv-core-dev libopencv-imgproc-dev  # OpenCV: Canny preprocessor (ControlNet)
      libopencv-photo-dev  # OpenCV photo: seamlessClone (Poisson background, blended latent diffusion)
      libgloo-dev  # Gloo headers + library for data-parallel training (c10d ProcessGroupGloo)
      libcpp-httplib-dev  # cpp-httplib: the HTTP server of dmx serve (docs/serve.md)
      clang-format-14  # the formatting check (scripts/check_format.sh, ctest format.check)
      chromium)  # the browser test of dmx serve's page (tests/browser, ctest -L browser)
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

# The browser test's driver: playwright-core at the version pinned in tests/browser/package-lock.json, installed
# into tests/browser/node_modules (gitignored) when it is missing or another version. Without it the test is skipped.
browser_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/browser"
want=$(sed -n 's/^    "playwright-core": "\(.*\)"$/\1/p' "$browser_dir/package.json")
have=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' "$browser_dir/node_modules/playwright-core/package.json" 2>/dev/null || true)
if [ "$have" != "$want" ]; then
  if ! command -v npm >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends npm; } ||
      echo "setup: warning: could not install npm: the browser test will be skipped" >&2
  fi
  if command -v npm >/dev/null; then
    echo "setup: installing playwright-core@$want into tests/browser/node_modules"
    (cd "$browser_dir" && npm ci --silent --no-audit --no-fund) ||
      echo "setup: warning: npm ci failed in tests/browser: the browser test will be skipped" >&2
  fi
fi

# --emoji: the emoji image sets for `dmx data emoji` (npm packages emoji-datasource-google, Apache-2.0, and
# emoji-datasource-twitter, CC-BY 4.0), unpacked into a cache folder that is never committed.
if [ "${1:-}" = "--emoji" ]; then
  EMOJI_DIR="${DMX_EMOJI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dmx/emoji}"
  EMOJI_VERSION=16.0.0
  if ! command -v npm >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends npm
  fi
  for style in google twitter; do
    dest="$EMOJI_DIR/emoji-datasource-$style"
    [ -f "$dest/package/emoji.json" ] && [ -f "$dest/.version-$EMOJI_VERSION" ] && continue
    echo "setup: fetching emoji-datasource-$style@$EMOJI_VERSION into $dest"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "emoji-datasource-$style@$EMOJI_VERSION" >/dev/null)
    rm -rf "$dest.partial" && mkdir -p "$dest.partial"
    # Only the 64-px images and the metadata are needed.
    tar xzf "$tmp"/emoji-datasource-$style-$EMOJI_VERSION.tgz -C "$dest.partial" \
      package/emoji.json package/LICENSE package/package.json "package/img/$style/64"
    touch "$dest.partial/.version-$EMOJI_VERSION"
    rm -rf "$dest" && mv "$dest.partial" "$dest" && rm -rf "$tmp"
  done
fi
