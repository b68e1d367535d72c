#!/usr/bin/env bash
# Assembles the bundled SpaText folder models/emoji-spatext (models/MODEL_CARD.md, docs/spatext.md) from the folder
# `dmx train spatext` wrote (the base's parts copied, spatext.json, spatext.safetensors in float32, the prior's parts):
#
#   spatext.safetensors  an fp16 copy (dmx convert): conv_in, the map projection and the LoRA pairs
#   spatext.json, model_index.json   copied
#   tokenizer, text_encoder, vae, scheduler, unet -> ../emoji/...           (the base model, unchanged by training)
#   prior, prior_scheduler, prior_text_encoder, prior_tokenizer -> ../emoji-unclip/...
#
# Each link replaces a folder the trained folder holds a copy of, and the copy must equal the link's target file for
# file, byte for byte (cmp), or the script stops without writing. Built beside models/emoji-spatext, then renamed.
# Usage: scripts/emoji/spatext_folder.sh SPATEXT_DIR   (DMX: the dmx binary, default build/dmx)
set -euo pipefail
cd "$(dirname "$0")/../.."
DMX=${DMX:-build/dmx}
SRC=${1:?usage: scripts/emoji/spatext_folder.sh SPATEXT_DIR}
[ -f "$SRC/spatext.json" ] || { echo "spatext_folder: $SRC has no spatext.json (dmx train spatext writes one)" >&2; exit 2; }
LINK_WHO=spatext_folder
# shellcheck source=link_lib.sh
. scripts/emoji/link_lib.sh
F=models/emoji-spatext
T=$F.tmp.$$
rm -rf "$T"
mkdir -p "$T"
trap 'rm -rf "$T"' EXIT
$DMX convert --input "$SRC/spatext.safetensors" --output "$T/spatext.safetensors" --dtype fp16 --quiet
cp "$SRC/spatext.json" "$SRC/model_index.json" "$T/"
for p in tokenizer text_encoder vae scheduler unet; do link "$T" $p ../emoji/$p "$SRC/$p"; done
for p in prior prior_scheduler prior_text_encoder prior_tokenizer; do link "$T" $p ../emoji-unclip/$p "$SRC/$p"; done
rm -rf "$F.old.$$"
[ ! -e "$F" ] || mv "$F" "$F.old.$$"
mv "$T" "$F"
rm -rf "$F.old.$$"
echo "wrote $F ($(du -sh "$F/spatext.safetensors" | cut -f1) spatext.safetensors, the rest linked)"
