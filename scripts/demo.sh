#!/usr/bin/env bash
# The README's first command: install what is missing, build, and generate an image with the
# default model (the tiny fixture model until dmx's own bundled model lands).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh dmx_cli
MODEL="${DMX_MODEL:-../shared/fixtures/sd-tiny/models/sd15}"
if [ ! -d "$MODEL" ]; then
  echo "demo: model folder $MODEL not found (set DMX_MODEL to a diffusers folder)" >&2
  exit 2
fi
mkdir -p out
build/dmx generate --model "$MODEL" --prompt "a photograph of an astronaut riding a horse" \
  --negative-prompt "low quality, blurry" --steps 20 --seed 42 --output out/astronaut.png
echo "demo: the image is at $(pwd)/out/astronaut.png"
