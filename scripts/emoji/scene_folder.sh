#!/usr/bin/env bash
# Assembles the bundled scene folder models/emoji-scene (models/MODEL_CARD.md, docs/scene.md) from the folder
# `dmx train scene` wrote (the base's parts copied, vqseg/, scene.json, scene.safetensors in float32):
#
#   scene.safetensors    an fp16 copy (dmx convert): the token tables and the LoRA pairs
#   vqseg/               VQ-SEG: config.json and vqseg.json copied, the weights as an fp16 copy
#   scene.json, model_index.json   copied
#   tokenizer, text_encoder, vae, scheduler, unet -> ../emoji/...           (the base model, unchanged by training)
#
# Each link replaces a folder the trained folder holds a copy of, and the copy must equal the link's target file for
# file, byte for byte (cmp), or the script stops without writing. Built beside models/emoji-scene, then renamed.
# Usage: scripts/emoji/scene_folder.sh SCENE_DIR   (DMX: the dmx binary, default build/dmx)
set -euo pipefail
cd "$(dirname "$0")/../.."
DMX=${DMX:-build/dmx}
SRC=${1:?usage: scripts/emoji/scene_folder.sh SCENE_DIR}
[ -f "$SRC/scene.json" ] || { echo "scene_folder: $SRC has no scene.json (dmx train scene writes one)" >&2; exit 2; }
LINK_WHO=scene_folder
# shellcheck source=link_lib.sh
. scripts/emoji/link_lib.sh
F=models/emoji-scene
T=$F.tmp.$$
rm -rf "$T"
mkdir -p "$T/vqseg"
trap 'rm -rf "$T"' EXIT
$DMX convert --input "$SRC/scene.safetensors" --output "$T/scene.safetensors" --dtype fp16 --quiet
$DMX convert --input "$SRC/vqseg/diffusion_pytorch_model.safetensors" \
  --output "$T/vqseg/diffusion_pytorch_model.safetensors" --dtype fp16 --quiet
cp "$SRC/vqseg/config.json" "$SRC/vqseg/vqseg.json" "$T/vqseg/"
cp "$SRC/scene.json" "$SRC/model_index.json" "$T/"
for p in tokenizer text_encoder vae scheduler unet; do link "$T" $p ../emoji/$p "$SRC/$p"; done
rm -rf "$F.old.$$"
[ ! -e "$F" ] || mv "$F" "$F.old.$$"
mv "$T" "$F"
rm -rf "$F.old.$$"
echo "wrote $F ($(du -shL "$F/scene.safetensors" | cut -f1) scene.safetensors, $(du -shL "$F/vqseg" | cut -f1) vqseg/, the rest linked)"
