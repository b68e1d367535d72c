// The guidance embedding of LCM-distilled UNets (Luo et al. 2023; diffusers' LatentConsistencyModelPipeline): a UNet
// whose config has time_cond_proj_dim takes the guidance scale as an input instead of running classifier-free
// guidance. w = guidance_scale - 1 becomes sinusoids (get_guidance_scale_embedding: w x 1000, half sines, half
// cosines, frequencies 10000^(-i / (d/2 - 1))), fed to the time embedding's cond_proj at every step; the UNet runs once
// per step (no unconditional branch, no negative prompt).
//
// StableDiffusionPipeline (txt2img and img2img) adds a GuidanceEmbedding provider itself when its UNet has
// time_cond_proj_dim and runs the loop unguided; other tasks refuse such a UNet (they need the two branches).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

// diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding: w [B] -> [B, dim] float32.
at::Tensor guidance_scale_embedding(const at::Tensor& w, int64_t dim);

// True when the model's UNet takes a guidance embedding (time_cond_proj_dim set).
bool takes_guidance_embedding(const loaders::StableDiffusionModels& m);

class GuidanceEmbedding : public ResidualProvider {
 public:
  explicit GuidanceEmbedding(double guidance_scale) : guidance_scale_(guidance_scale) {}
  std::string name() const override { return "LCM guidance embedding"; }
  void check(const ResidualRun& run) const override;
  void prepare(const ResidualRun& run) override;
  void apply(const ResidualStep& step, models::UNetInputs& in) override;

 private:
  double guidance_scale_;
  at::Tensor embedding_;  // [N, time_cond_proj_dim] in the UNet's dtype and device
};
}  // namespace dmx::pipelines
