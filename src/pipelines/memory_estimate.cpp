#include "pipelines/memory_estimate.h"

#include <cstdio>

namespace dmx::pipelines {
namespace {
double module_bytes(const torch::nn::Module& mod) {
  double b = 0;
  for (const auto& p : mod.parameters()) b += static_cast<double>(p.numel()) * p.element_size();
  for (const auto& p : mod.buffers()) b += static_cast<double>(p.numel()) * p.element_size();
  return b;
}
}  // namespace

MemoryEstimate estimate_memory(const loaders::StableDiffusionModels& m, int width, int height, int num_images,
                               bool cfg) {
  MemoryEstimate e;
  const double elem = static_cast<double>(c10::elementSize(m.dtype));
  e.weights = module_bytes(*m.unet) + module_bytes(*m.vae) + module_bytes(*m.text_encoder);
  const double f = m.vae_scale_factor();
  const double latent_px = (width / f) * (height / f);
  // UNet at the first level: the skip connections kept for the up path, the resnet in/out and the
  // transformer's GEGLU feed-forward (2 x 4 x C) are live together: about 16 x C values per position.
  const double c0 = m.unet->config().block_out_channels.at(0);
  e.unet = (cfg ? 2.0 : 1.0) * num_images * latent_px * c0 * 16 * elem;
  // VAE decoder at full resolution: the last up block's input (2 x C) and output plus norm temporaries.
  const double v0 = m.vae->config().block_out_channels.at(0);
  e.vae = static_cast<double>(width) * height * v0 * 5 * elem;
  return e;
}

std::string format_bytes(double bytes) {
  char buf[32];
  if (bytes >= 1e12)
    std::snprintf(buf, sizeof(buf), "%.1f TB", bytes / 1e12);
  else if (bytes >= 1e9)
    std::snprintf(buf, sizeof(buf), "%.1f GB", bytes / 1e9);
  else
    std::snprintf(buf, sizeof(buf), "%.0f MB", bytes / 1e6);
  return buf;
}
}  // namespace dmx::pipelines
