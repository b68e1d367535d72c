// A diffusers StableDiffusionUpscalePipeline folder (stabilityai/stable-diffusion-x4-upscaler's layout), loaded
// strictly: the Stable Diffusion parts (tokenizer, text_encoder, unet, vae, scheduler: load_stable_diffusion) plus
// what the upscaler adds: the low_res_scheduler that noises the low-resolution picture (noise-conditioning
// augmentation, Ho et al. 2021) and model_index.json's max_noise_level. Every schedule comes from the folder's
// configs.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "loaders/model_bundle.h"
#include "schedulers/scheduler.h"

namespace dmx::loaders {

struct UpscaleModels {
  std::shared_ptr<StableDiffusionModels> sd;  // tokenizer, text_encoder, unet (in_channels = latent + 3), vae
  nlohmann::json low_res_scheduler_config;    // low_res_scheduler/scheduler_config.json (a DDPM-family class)
  int max_noise_level = 350;                  // model_index.json (diffusers' default when absent)
  // The factor latents are divided by before decoding. diffusers' StableDiffusionUpscalePipeline.__init__ sets
  // the VAE's scaling_factor to 0.08333 whatever vae/config.json says (with a deprecation warning); dmx does the
  // same (and warns), so that a folder with another value decodes as the reference does.
  double vae_scaling_factor = 0.08333;
  int image_channels() const;  // unet in_channels - vae latent_channels (3: the RGB picture)
  // The low-res scheduler, built from its config (only add_noise_at_timestep is used).
  std::unique_ptr<schedulers::Scheduler> make_low_res_scheduler() const;
};

// The factor diffusers' upscale pipeline forces on the VAE.
constexpr double kUpscaleVaeScalingFactor = 0.08333;

// path: a diffusers folder whose model_index.json names StableDiffusionUpscalePipeline. Not a folder, no
// model_index.json, another pipeline class: InvalidArgument naming --model, the rule and what was found (a
// text-to-image folder is not an upscaler). A component missing from model_index.json or without its folder:
// FormatError listing every missing one. Parts that do not fit together (unet in_channels != latent_channels + 3,
// a UNet without an integer class embedding for the noise level, max_noise_level outside
// [0, min(num_class_embeds, low-res num_train_timesteps) - 1], a low_res_scheduler that cannot noise at a
// training timestep): FormatError naming the files and values.
std::shared_ptr<UpscaleModels> load_upscale(const std::string& path, const LoadOptions& opts = {});

// True when path is a folder whose model_index.json names StableDiffusionUpscalePipeline (cheap: reads the index
// only; false on any problem).
bool is_upscale_folder(const std::string& path);

// What the folder says before any weight is read (the checks load_upscale starts with: folder, pipeline class,
// components, max_noise_level), so that a command refuses a bad --noise-level or an oversized picture first.
struct UpscaleFolderInfo {
  int max_noise_level = 350;
  int vae_scale_factor = 4;  // 2 ** (len(vae block_out_channels) - 1), from vae/config.json
};
UpscaleFolderInfo inspect_upscale_folder(const std::string& path);
}  // namespace dmx::loaders
