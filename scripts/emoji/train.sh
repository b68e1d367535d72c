#!/usr/bin/env bash
# Trains dmx's bundled emoji model family from scratch with dmx itself (see models/MODEL_CARD.md):
#   data -> tokenizer -> fresh weights -> VAE -> UNet + text encoder -> ControlNet (Canny), T2I-Adapter (Canny),
#   Twitter-style LoRA, Twitter-style A1111 hypernetwork, DreamBooth LoRA -> evaluation classifier -> fp16 copies
#   under models/.
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

step "UNet + text encoder, jointly, on the Google images (captions dropped 10% of the time for guidance)"
$DMX train finetune --model "$W/vae" --data "$D/google/train" --output "$W/base1" --train-text-encoder \
  --resolution 32 --batch-size 64 --steps 3500 --learning-rate 5e-4 --lr-scheduler cosine --lr-warmup-steps 100 \
  --snr-gamma 5 --proportion-empty-prompts 0.1 --cache-latents --checkpoint-every 100 --checkpoints-total-limit 3 \
  --validation-steps 250 --validation-prompt "grinning face" --num-validation-images 2 --seed 0 --quiet --threads $T
# Second phase, continued from the first: 5,000 more steps at half the rate. (The bundled model's second phase
# started from the fp16 copy in models/ of the first, the float32 folder having been lost; fp16 rounding of the
# starting weights is the only difference.)
$DMX train finetune --model "$W/base1" --data "$D/google/train" --output "$W/base" --train-text-encoder \
  --resolution 32 --batch-size 64 --steps 5000 --learning-rate 2.5e-4 --lr-scheduler cosine --lr-warmup-steps 50 \
  --snr-gamma 5 --proportion-empty-prompts 0.1 --cache-latents --checkpoint-every 250 --checkpoints-total-limit 3 \
  --validation-steps 1000 --validation-prompt "grinning face" --num-validation-images 2 --seed 7 --quiet --threads $T

step "ControlNet on the Canny edge maps (copy of the UNet encoder, zero convolutions, base locked)"
# Phases 1 and 2 ran against the first-phase UNet (base1), phase 3 continues them against the final one.
$DMX train controlnet --model "$W/base1" --data "$D/google/train" --output "$W/controlnet" --resolution 32 \
  --batch-size 32 --steps 800 --learning-rate 5e-4 --lr-scheduler cosine --lr-warmup-steps 50 --cache-latents \
  --proportion-empty-prompts 0.1 --checkpoint-every 200 --seed 0 --quiet --threads $T
# Second phase from the first: half the prompts empty (as the ControlNet paper trains), so that the edges,
# not the caption, have to carry the shape; a higher constant rate.
$DMX train controlnet --model "$W/base1" --controlnet "$W/controlnet" --data "$D/google/train" \
  --output "$W/controlnet2" --resolution 32 --batch-size 32 --steps 1000 --learning-rate 1e-3 \
  --lr-scheduler constant_with_warmup --lr-warmup-steps 20 --cache-latents --proportion-empty-prompts 0.5 \
  --checkpoint-every 250 --seed 1 --quiet --threads $T
$DMX train controlnet --model "$W/base" --controlnet "$W/controlnet2" --data "$D/google/train" \
  --output "$W/controlnet3" --resolution 32 --batch-size 32 --steps 2000 --learning-rate 5e-4 \
  --lr-scheduler constant_with_warmup --lr-warmup-steps 20 --cache-latents --proportion-empty-prompts 0.5 \
  --checkpoint-every 250 --seed 2 --quiet --threads $T --mixed-precision bf16

step "T2I-Adapter on the Canny edge maps (fresh full adapter, 1 input channel, cubic timesteps, base locked)"
# Three phases of 600 steps, each continued from the one before (--adapter): cosine 1e-3, constant 2e-3, cosine 2e-3.
$DMX train adapter --model "$W/base" --data "$D/google/train" --output "$W/adapter1" --resolution 32 \
  --batch-size 32 --steps 600 --learning-rate 1e-3 --lr-scheduler cosine --lr-warmup-steps 20 --cache-latents \
  --proportion-empty-prompts 0.5 --adapter-in-channels 1 --checkpoint-every 100 --seed 0 --quiet --threads $T \
  --mixed-precision bf16
$DMX train adapter --model "$W/base" --adapter "$W/adapter1" --data "$D/google/train" --output "$W/adapter2" \
  --resolution 32 --batch-size 32 --steps 600 --learning-rate 2e-3 --lr-scheduler constant_with_warmup \
  --lr-warmup-steps 20 --cache-latents --proportion-empty-prompts 0.5 --checkpoint-every 100 --seed 1 --quiet \
  --threads $T --mixed-precision bf16
$DMX train adapter --model "$W/base" --adapter "$W/adapter2" --data "$D/google/train" --output "$W/adapter" \
  --resolution 32 --batch-size 32 --steps 600 --learning-rate 2e-3 --lr-scheduler cosine --lr-warmup-steps 20 \
  --cache-latents --proportion-empty-prompts 0.5 --checkpoint-every 100 --seed 2 --quiet --threads $T \
  --mixed-precision bf16

step "LoRA: Google style -> Twitter style, trained on the Twitter images"
$DMX train lora --model "$W/base" --data "$D/twitter/train" --output "$W/lora-twitter.safetensors" --rank 8 \
  --lora-targets all --resolution 32 --batch-size 32 --steps 1200 --learning-rate 1e-3 --lr-scheduler cosine \
  --cache-latents --snr-gamma 5 --checkpoint-every 200 --seed 0 --quiet --threads $T --mixed-precision bf16

step "A1111 hypernetwork: Google style -> Twitter style (A1111's defaults; its own .pt)"
$DMX train hypernetwork --model "$W/base" --data "$D/twitter/train" --output "$W/hypernetwork-twitter.pt" \
  --resolution 32 --batch-size 32 --steps 500 --learning-rate 1e-3 --lr-scheduler cosine --cache-latents \
  --snr-gamma 5 --checkpoint-every 100 --seed 0 --quiet --threads $T --mixed-precision bf16

step "DreamBooth LoRA: the held-out 'donkey' taught as 'zqx donkey' from its one Google image"
mkdir -p "$W/dreambooth-instance"
cp "$D/google/heldout/images/donkey.png" "$W/dreambooth-instance/"
$DMX train dreambooth --model "$W/base" --instance-data "$W/dreambooth-instance" --instance-prompt "zqx donkey" \
  --lora-rank 8 --output "$W/dreambooth.safetensors" --resolution 32 --batch-size 4 --steps 200 \
  --learning-rate 5e-4 --seed 0 --quiet --threads $T

step "evaluation classifier (real images of both styles, 32 px)"
$DMX train classifier --data "$D" --output "$W/classifier" --seed 0 --threads $T

step "fp16 copies into models/"
mkdir -p models
$DMX convert --input "$W/base" --output models/emoji --dtype fp16 --overwrite --quiet
$DMX convert --input "$W/controlnet3" --output models/emoji-controlnet-canny --dtype fp16 --overwrite --quiet
rm -f models/emoji-controlnet-canny/controlnet_original.safetensors  # the same weights in the original layout
$DMX convert --input "$W/adapter" --output models/emoji-adapter-canny --dtype fp16 --overwrite --quiet
$DMX convert --input "$W/lora-twitter.safetensors" --output models/emoji-lora-twitter.safetensors --dtype fp16 \
  --overwrite --quiet
$DMX convert --input "$W/dreambooth.safetensors" --output models/emoji-dreambooth.safetensors --dtype fp16 \
  --overwrite --quiet
echo "zqx donkey" > models/emoji-dreambooth.txt
cp "$W/hypernetwork-twitter.pt" models/emoji-hypernetwork-twitter.pt  # A1111's float32 .pt, as written
rm -rf models/emoji-classifier && cp -r "$W/classifier" models/emoji-classifier
du -sh models/*
