// A rough peak-memory estimate for one Stable Diffusion run, for the size limit's error message.
// Attention is chunked (nn/attention.h), so the peak is set by the convolution and feed-forward
// activations at full latent resolution (UNet) and at full image resolution (VAE decoder).
#pragma once
#include <cstdint>
#include <string>

#include "loaders/model_bundle.h"

namespace dmx::pipelines {

struct MemoryEstimate {
  double weights = 0;  // bytes
  double unet = 0;     // activations of one denoising step (the whole CFG batch)
  double vae = 0;      // activations of decoding one image
  double total() const { return weights + (unet > vae ? unet : vae); }
};

MemoryEstimate estimate_memory(const loaders::StableDiffusionModels& m, int width, int height, int num_images,
                               bool cfg);
// "12.3 GB", "512 MB", ...
std::string format_bytes(double bytes);
}  // namespace dmx::pipelines
