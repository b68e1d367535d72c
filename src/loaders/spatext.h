// SpaText model folders (Avrahami et al. 2023, "SpaText: Spatio-Textual Representation for Controllable Image
// Generation"; issue 18, docs/spatext.md). What `dmx train spatext` writes:
//   tokenizer/ text_encoder/ vae/ scheduler/ unet/ model_index.json   the base text-to-image model, unchanged
//   spatext.json         {"format": "dmx-spatext-1", "embedding_dim": D, "map_channels": M, "resolution": R,
//                        "lora_rank": r, ...}
//   spatext.safetensors  spatext.projection.weight [M, D]: the learned projection of a region's embedding to the
//                        map's M channels (the map is linear in the embeddings, so projecting each embedding and then
//                        painting equals painting and then projecting); the SpaText UNet's conv_in (weight
//                        [C, in + M, k, k], bias: the base's input channels first, then the map's); the LoRA pairs
//                        "unet.<module>.lora.down.weight" / "unet.<module>.lora.up.weight" (diffusers' layout, the
//                        scale folded into up: delta W = up @ down)
//   prior_tokenizer/ prior_text_encoder/ prior/ prior_scheduler/     the DALL-E 2 prior that maps a region's text
//                        to a CLIP image embedding at inference (load_unclip_prior)
// The base stays a plain diffusers folder; the SpaText UNet is built from it at load time (conv_in widened, the
// LoRA pairs merged). Small enough to ship beside the base (models/ keeps symlinks to it).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "loaders/unclip.h"
#include "models/unet_2d_condition.h"

namespace dmx::loaders {

struct SpaTextConfig {
  int embedding_dim = 0;  // D: the CLIP image embedding's width
  int map_channels = 0;   // M: the map's channels (the projection's output), the UNet's extra input channels
  int resolution = 0;     // the training pictures' side (pixels)
  int lora_rank = 0;
};

struct SpaTextModel {
  std::shared_ptr<StableDiffusionModels> models;  // unet: the SpaText UNet (in_channels = base + D)
  std::shared_ptr<UnCLIPComponents> prior;        // the prior half (prior_* folders)
  SpaTextConfig config;
  int base_in_channels = 0;  // the latents' channels (the base UNet's in_channels)
  at::Tensor projection;     // [M, D] float32
};

constexpr const char* kSpaTextConfigFile = "spatext.json";
constexpr const char* kSpaTextWeightsFile = "spatext.safetensors";

// A folder holding spatext.json.
bool is_spatext_folder(const std::string& path);
// spatext.json, checked (format, D in [1, 4096], resolution, rank); FormatError naming the file otherwise.
SpaTextConfig read_spatext_config(const std::string& dir);

// The base UNet with conv_in widened by `extra` input channels: every other parameter and buffer copied, conv_in's
// first in_channels input channels and its bias copied, the new channels' weights zero (so the result equals the
// base for any map). Same device and dtype as base.
models::UNet2DConditionModel widen_unet_input(const models::UNet2DConditionModel& base, int extra);

// Copies `prefix`conv_in.{weight,bias} of `tensors` (the file `file`) into a UNet widened by widen_unet_input
// (base_in input channels + extra). FormatError naming the file and both shapes when missing or of another shape.
void load_widened_conv_in(models::UNet2DConditionModel& unet, const io::TensorMap& tensors, const std::string& file,
                          const std::string& prefix, int base_in, int extra);

// Adds up @ down of every "unet.<module>.lora.{down,up}.weight" pair to <module>.weight (Linear [out, in] or Conv2d
// [out, in, kh, kw] with down [r, in, kh, kw] and up [out, r, 1, 1]). FormatError for a pair whose module is not a
// weight of the UNet or whose shapes do not fit it; other keys are ignored. -> the number of pairs merged.
int merge_unet_lora(models::UNet2DConditionModel& unet, const io::TensorMap& tensors);

// The folder: the base (load_stable_diffusion), its UNet widened by M and given spatext.safetensors' conv_in, every
// LoRA pair merged, and the prior (its clip_embed_dim must be D). FormatError / InvalidArgument naming the file.
std::shared_ptr<SpaTextModel> load_spatext(const std::string& dir, const LoadOptions& opts = {});
}  // namespace dmx::loaders
