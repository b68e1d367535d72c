// A Palette model folder (docs/palette.md): the denoiser as a diffusers UNet2DConditionModel folder (config.json +
// diffusion_pytorch_model.safetensors) plus palette.json, which says what `dmx restore` loads: the task, the loss it
// was trained with, the training resolution and both noise schedules (schedulers/palette.h).
//
// The denoiser is dmx's UNet2DConditionModel with in_channels 6 (the condition concatenated to the noisy picture,
// as Palette) and out_channels 3 (the noise). Its timestep input is the continuous noise level gamma (times
// noise_level_scale, 1 as the unofficial code): diffusers' sinusoidal time projection with flip_sin_to_cos and
// freq_shift 0 is the code's gamma_embedding (cos first, frequencies exp(-ln(10000) k / half)) and the
// TimestepEmbedding after it the code's cond_embed (Linear, SiLU, Linear to 4x the first width). Self-attention
// runs in the CrossAttn blocks; their cross-attention sees one zero token of width cross_attention_dim (there is
// no text), which makes it a learned constant (to_out's bias).
#pragma once
#include <functional>
#include <string>

#include "models/unet_2d_condition.h"
#include "schedulers/palette.h"

namespace dmx::loaders {

struct PaletteConfig {
  std::string task = "inpaint";  // colorize | inpaint | uncrop | jpeg
  std::string loss = "l2";       // l1 | l2 (mse)
  int resolution = 32;           // training picture side
  double noise_level_scale = 1.0;
  schedulers::PaletteBetaSchedule train_schedule = schedulers::palette_train_schedule();
  schedulers::PaletteBetaSchedule test_schedule = schedulers::palette_test_schedule();
  void validate() const;  // InvalidArgument / FormatError naming the field
};

// The UNet of a new Palette model at `resolution` px (a multiple of 8, 8..256): widths 64, 128, 128, two resnets per
// block, self-attention at 1/4 and 1/8 of the resolution (8 and 4 px at 32 px; the unofficial code attends at 1/16
// of 256 px, 16 px), 4 heads; in 6, out 3.
models::UNet2DConditionConfig palette_unet_config(int resolution, int base_channels = 64);

struct PaletteModel {
  PaletteConfig config;
  models::UNet2DConditionModel unet{nullptr};
  std::string path;
};

// Reads dir/palette.json, dir/config.json and the weights (checked against the config's parameter count before the
// model is built). InvalidArgument when dir is no Palette folder (naming `param`), FormatError for malformed files.
PaletteModel load_palette(const std::string& dir, const std::string& param = "--model");
// Writes the folder atomically (weights in float32).
void save_palette(const std::string& dir, const PaletteConfig& cfg, models::UNet2DConditionModelImpl& unet);

// The UNet's input: cat(condition, y) on channels; its timestep: gamma * noise_level_scale; its encoder states: one
// zero token. Returns the predicted noise [B, 3, H, W].
at::Tensor palette_denoise(models::UNet2DConditionModelImpl& unet, const PaletteConfig& cfg, const at::Tensor& cond,
                           const at::Tensor& y, const at::Tensor& gammas);
}  // namespace dmx::loaders

namespace dmx::loaders {
// Palette's restoration loop (schedulers::palette_sample) with the UNet as the denoiser, shared by `dmx restore`
// and the training's validation pictures. No grad.
at::Tensor palette_restore(models::UNet2DConditionModelImpl& unet, const PaletteConfig& cfg,
                           const schedulers::PaletteSampler& sampler, const at::Tensor& cond, const at::Tensor& known,
                           const at::Tensor& mask, at::Generator& gen,
                           const std::function<void(int64_t, int64_t)>& on_step = nullptr);
}  // namespace dmx::loaders
