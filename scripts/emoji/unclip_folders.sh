#!/usr/bin/env bash
# Assembles the bundled Stable unCLIP folders (models/MODEL_CARD.md, docs/unclip.md "Training the decoder") from the
# decoder that `dmx train unclip` wrote (a float32 StableUnCLIPImg2ImgPipeline folder) and, when given, the prior that
# `dmx train prior` wrote (prior/, prior_scheduler/, prior_text_encoder/, prior_tokenizer/):
#
#   models/emoji-unclip-img2img  StableUnCLIPImg2ImgPipeline (dmx variations): unet/ (an fp16 copy of the decoder's,
#                                dmx convert), image_normalizer/, image_noising_scheduler/, model_index.json; and
#                                relative symlinks feature_extractor, image_encoder -> ../emoji-clip/...,
#                                tokenizer, text_encoder, vae, scheduler -> ../emoji/...
#   models/emoji-unclip          StableUnCLIPPipeline (dmx generate), only with PRIOR_DIR: prior/ (its weights as fp16)
#                                and prior_scheduler/ (copied), prior_text_encoder, prior_tokenizer -> ../emoji-clip/...
#                                when equal to them byte for byte (else copied), every decoder part ->
#                                ../emoji-unclip-img2img/... (unet, image_normalizer, image_noising_scheduler) or
#                                ../emoji/..., model_index.json
#
# Nothing megabyte-sized is stored twice: each link replaces a folder that the decoder (or prior) folder holds a copy of,
# and the copy must equal the link's target file for file, byte for byte (cmp), or the script stops without
# writing: the links serve exactly what was trained. Each folder is built beside its final place and renamed over it.
# Usage: scripts/emoji/unclip_folders.sh DECODER_DIR [PRIOR_DIR]   (DMX: the dmx binary, default build/dmx)
set -euo pipefail
cd "$(dirname "$0")/../.."
DMX=${DMX:-build/dmx}
DEC=${1:?usage: scripts/emoji/unclip_folders.sh DECODER_DIR [PRIOR_DIR]}
PRIOR=${2:-}
M=models

LINK_WHO=unclip_folders
# shellcheck source=link_lib.sh
. scripts/emoji/link_lib.sh
# put TMP FINAL: replaces FINAL by the folder TMP.
put() {
  rm -rf "$2.old.$$"
  [ ! -e "$2" ] || mv "$2" "$2.old.$$"
  mv "$1" "$2"
  rm -rf "$2.old.$$"
}

[ -f "$DEC/model_index.json" ] && grep -q '"StableUnCLIPImg2ImgPipeline"' "$DEC/model_index.json" ||
  { echo "unclip_folders: $DEC is not a StableUnCLIPImg2ImgPipeline folder (dmx train unclip writes one)" >&2; exit 2; }

I=$M/emoji-unclip-img2img
T=$I.tmp.$$
rm -rf "$T"
mkdir -p "$T"
trap 'rm -rf "$T" "${U:-}"' EXIT
$DMX convert --input "$DEC/unet" --output "$T/unet" --dtype fp16 > /dev/null
cp -r "$DEC/image_normalizer" "$DEC/image_noising_scheduler" "$DEC/model_index.json" "$T/"
for p in feature_extractor image_encoder; do link "$T" $p ../emoji-clip/$p "$DEC/$p"; done
for p in tokenizer text_encoder vae scheduler; do link "$T" $p ../emoji/$p "$DEC/$p"; done
put "$T" "$I"
echo "wrote $I ($(du -shL "$I/unet" | cut -f1) unet, the rest linked)"

[ -n "$PRIOR" ] || exit 0
for p in prior prior_scheduler prior_text_encoder prior_tokenizer; do
  [ -d "$PRIOR/$p" ] || { echo "unclip_folders: $PRIOR has no $p/" >&2; exit 2; }
done
P=$M/emoji-unclip
U=$P.tmp.$$
rm -rf "$U"
mkdir -p "$U"
cp -r "$PRIOR/prior" "$PRIOR/prior_scheduler" "$U/"
# The prior's weights as fp16 (models/ stays under 80 MB; SpaText's figures are the same to three digits).
$DMX convert --input "$PRIOR/prior/diffusion_pytorch_model.safetensors" \
  --output "$U/prior/diffusion_pytorch_model.safetensors" --dtype fp16 --overwrite --quiet
for p in text_encoder tokenizer; do
  if same_tree "$PRIOR/prior_$p" "$M/emoji-clip/$p"; then
    ln -s ../emoji-clip/$p "$U/prior_$p"
  else
    echo "unclip_folders: $PRIOR/prior_$p differs from $M/emoji-clip/$p: copied" >&2
    cp -r "$PRIOR/prior_$p" "$U/prior_$p"
  fi
done
for p in unet image_normalizer image_noising_scheduler; do ln -s ../emoji-unclip-img2img/$p "$U/$p"; done
for p in tokenizer text_encoder vae scheduler; do ln -s ../emoji/$p "$U/$p"; done
prior_scheduler_class=$(sed -n 's/.*"_class_name": *"\([A-Za-z]*\)".*/\1/p' "$U/prior_scheduler/scheduler_config.json" | head -1)
cat > "$U/model_index.json" <<EOF
{
  "_class_name": "StableUnCLIPPipeline",
  "_diffusers_version": "0.27.2",
  "_dmx_writer": "scripts/emoji/unclip_folders.sh",
  "image_noising_scheduler": ["diffusers", "DDPMScheduler"],
  "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
  "prior": ["diffusers", "PriorTransformer"],
  "prior_scheduler": ["diffusers", "${prior_scheduler_class:-DDPMScheduler}"],
  "prior_text_encoder": ["transformers", "CLIPTextModelWithProjection"],
  "prior_tokenizer": ["transformers", "CLIPTokenizer"],
  "scheduler": ["diffusers", "DDIMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
EOF
put "$U" "$P"
echo "wrote $P ($(du -sh "$P" | cut -f1) of its own, the rest linked)"
