// dmx public API: text-guided x4 super-resolution with Stable Diffusion's x4 upscaler, computed as diffusers
// 0.27.2's StableDiffusionUpscalePipeline (docs/upscale.md). Torch-free.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmx/error.h"
#include "dmx/options.h"

namespace dmx {

// The shared groups (dmx/options.h): DeviceOptions (dtype, device), SamplingOptions (negative_prompt, steps,
// guidance_scale, seed; diffusers' defaults for this pipeline: 75 steps, guidance 9), RunOptions (threads,
// progress, verbose, overwrite).
struct UpscaleOptions : DeviceOptions, SamplingOptions, RunOptions {
  UpscaleOptions() {
    steps = 75;
    guidance_scale = 9.0;
  }
  std::string model;  // a diffusers StableDiffusionUpscalePipeline folder (stabilityai/stable-diffusion-x4-upscaler)
  std::string image;  // the low-resolution picture (PNG/JPEG); sides rounded down to multiples of the VAE factor
  std::string prompt;
  int noise_level = 20;   // noise augmentation of the picture, in [0, max_noise_level] (350 for the x4 model)
  std::string scheduler;  // "" = the folder's own (scheduler/scheduler_config.json); else a sampler name
  double eta = 0.0;
  int num_images = 1;
  std::string save_latents;  // write the final latents (tensor "latents") here
  std::string output;        // PNG path; with num_images > 1: <stem>-<i>.png
  std::string from;          // the PNG the settings were read from (--from): an input, never written
  // Tiled VAE decoding (diffusers' enable_vae_tiling): "auto" tiles when the untiled decode would need more than
  // the memory budget below, "on" always (when the latents exceed a tile), "off" never.
  std::string vae_tiling = "auto";
  int vae_tile_size = 0;  // output pixels per tile; 0 = the VAE's sample_size
  // Memory the run may plan for, in MiB; 0 = the machine's physical memory. A run whose estimate (weights,
  // UNet activations, VAE decode, tiled or not) exceeds it is refused before any work.
  int64_t memory_limit_mb = 0;
  std::string tokenizer_dir;  // folder with vocab.json + merges.txt instead of the folder's tokenizer/
};

struct UpscaleResult {
  std::vector<std::string> images;  // written files
  std::string latents;              // the --save-latents file, if any
  uint64_t seed = 0;
  int width = 0, height = 0;                  // of the output
  int low_res_width = 0, low_res_height = 0;  // of the picture the model saw (after rounding to the VAE factor)
  bool tiled = false;                         // the VAE decoded in tiles
  double seconds = 0.0;
};

// Validates every input first (InvalidArgument naming the option; nothing is written on error), then loads the
// model, upscales and writes the outputs atomically.
UpscaleResult upscale(const UpscaleOptions& opts);

// The PNG "parameters" text (A1111 layout, as generate writes it, with the upscale settings as extra fields:
// "Upscale noise level" (the cascade's name, so parse_parameters reads it back), "Upscale source size").
std::string format_upscale_parameters(const UpscaleOptions& o, uint64_t seed, int width, int height, int low_res_width,
                                      int low_res_height, const std::string& sampler, const std::string& model_name,
                                      const std::string& model_hash = "");
}  // namespace dmx
