// dmx public API: Stable unCLIP (Ramesh et al. 2022 on a Stable Diffusion 2 decoder) as diffusers 0.27.2 runs it:
// image variations (StableUnCLIPImg2ImgPipeline) and CLIP embeddings with their cosine similarities. Text to image
// through the prior is `generate` on a StableUnCLIPPipeline folder (dmx.h: GenerateOptions::prior_steps ...).
// Torch-free. See docs/unclip.md.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmx/error.h"
#include "dmx/options.h"

namespace dmx {

// The shared groups (dmx/options.h): DeviceOptions, SamplingOptions (negative_prompt, steps, guidance_scale, seed;
// diffusers' defaults here: 20 steps, guidance 10), RunOptions (threads, progress, verbose, overwrite).
struct VariationsOptions : DeviceOptions, SamplingOptions, RunOptions {
  VariationsOptions() {
    steps = 20;
    guidance_scale = 10.0;
  }
  std::string model;   // a diffusers StableUnCLIPImg2ImgPipeline folder
  std::string image;   // the picture (PNG/JPEG, any size: CLIPImageProcessor resizes and crops it)
  std::string prompt;  // "" = diffusers' default (an empty prompt)
  int width = 0;       // 0 = unet.sample_size x VAE factor (diffusers' default)
  int height = 0;
  std::string scheduler;  // "" = the folder's own
  double eta = 0.0;
  int noise_level = 0;  // in [0, image_noising_scheduler's num_train_timesteps - 1]
  int num_images = 1;
  std::string save_latents;  // optional .safetensors with "latents" after the last step
  std::string output;        // PNG; with num_images > 1: <stem>-<i>.png
  // A second picture: num_images (>= 2) pictures along the slerp from image's CLIP embedding to this one's (t = k /
  // (num_images - 1)), each with the same seed; output is then the strip of them, <stem>-<k>.png each one.
  std::string interpolate_to;
};

struct VariationsResult {
  std::vector<std::string> images;
  uint64_t seed = 0;
  double seconds = 0.0;
};

// Validates everything first (nothing is written on an error), then loads, runs and writes atomically.
VariationsResult variations(const VariationsOptions& opts);

// `dmx embed`: CLIP embeddings of pictures (the image encoder with projection: image_embeds) and texts (the prior's
// text encoder with projection: text_embeds), not normalised, and the cosine similarity of every pair.
struct EmbedOptions : RunOptions {  // threads, progress, verbose, overwrite (of --output)
  // Stable unCLIP folders (at most 2): pictures need one with an image encoder (StableUnCLIPImg2ImgPipeline),
  // texts one with a prior text encoder (StableUnCLIPPipeline).
  std::vector<std::string> models;
  std::vector<std::string> images;   // rows first, in order
  std::vector<std::string> prompts;  // then these
  std::string output;                // optional: .safetensors (image_embeds, text_embeds, cosine) or .json
  std::string device = "cpu";
};

struct EmbedResult {
  std::vector<std::string> labels;             // "image:PATH" / "text:PROMPT", in row order
  std::vector<std::vector<float>> embeddings;  // one per label
  std::vector<std::vector<double>> cosine;     // [N][N]
  std::string output;                          // the file written ("" = none)
};

EmbedResult embed(const EmbedOptions& opts);
// The cosine matrix as a text table (labels made terminal-safe).
std::string embed_table(const EmbedResult& r);
}  // namespace dmx
