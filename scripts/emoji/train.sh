#!/usr/bin/env bash
# Trains dmx's bundled emoji model family from scratch with dmx itself (see models/MODEL_CARD.md):
#   data -> tokenizer -> fresh weights -> VAE -> UNet + text encoder -> ControlNet (Canny), Twitter-style LoRA,
#   DreamBooth LoRA -> evaluation classifier -> fp16 copies under models/.
# Every step is a plain dmx command; each training run writes checkpoints (--checkpoint-every) and can be
# continued with --resume <its .train folder>. Usage: scripts/emoji/train.sh [WORK_DIR]
# (default ~/.cache/dmx/emoji-train). DMX_THREADS sets the threads (default 1: the figures in the model card
# were taken with one thread at real-time priority, `chrt -f 1`, on a machine shared with builds).
set -euo pipefail
cd "$(dirname "$0")/../.."
DMX=${DMX:-build/dmx}
W=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/dmx/emoji-train}
D=$W/data32
T=${DMX_THREADS:-1}
mkdir -p "$W"
step() { echo "== $(date +%H:%M:%S) $*" >&2; }

step "data: 32-px images of both styles, each under two captions ('NAME, CATEGORY, STYLE style' and 'NAME')"
[ -d "$D" ] || $DMX data emoji --out "$D" --size 32 --extra-caption-format "{name}" --quiet
# The VAE sees every training image of both styles once per epoch (captions unused).
for s in google twitter; do
  awk -F'"file_name":"' '{split($2, a, "\""); if (!seen[a[1]]++) print}' "$D/$s/train/metadata.jsonl" |
    sed -e "s#\":\"images/#\":\"$s/train/images/#" -e "s#\":\"edges/#\":\"$s/train/edges/#" \
        -e "s#\":\"masks/#\":\"$s/train/masks/#"
done > "$D/metadata.jsonl"

step "tokenizer: CLIP BPE learned from the training captions"
$DMX data tokenizer --data "$D/google/train" --data "$D/twitter/train" --vocab-size 4096 --model-max-length 24 \
  --output "$W/tokenizer" --quiet

step "fresh weights"
$DMX init --config scripts/emoji/config --tokenizer "$W/tokenizer" --output "$W/init" --seed 0 --overwrite

step "VAE (f = 4: 32x32x3 -> 8x8x4)"
$DMX train vae --model "$W/init" --data "$D" --output "$W/vae" --resolution 32 --batch-size 16 --steps 1200 \
  --learning-rate 8e-4 --lr-scheduler cosine --lr-warmup-steps 50 --checkpoint-every 200 --validation-steps 200 \
  --seed 0 --quiet --threads $T
