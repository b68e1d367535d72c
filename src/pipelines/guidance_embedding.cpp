// The guidance embedding of LCM-distilled UNets (see guidance_embedding.h).
#include "pipelines/guidance_embedding.h"

#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"

namespace dmx::pipelines {

at::Tensor guidance_scale_embedding(const at::Tensor& w, int64_t dim) {
  DMX_CHECK_ARG(w.dim() == 1, "guidance_scale_embedding: w must be [B], got ", w.sizes());
  DMX_CHECK_ARG(dim >= 4, "guidance_scale_embedding: the embedding width must be >= 4, got ", dim);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t half = dim / 2;
  // float32 throughout, in the reference's order: log(10000) / (half - 1), exp(arange * -step), w x 1000 x freqs.
  const at::Tensor step = at::log(at::scalar_tensor(10000.0, f32)) / static_cast<double>(half - 1);
  const at::Tensor freqs = at::exp(at::arange(half, f32) * -step);
  const at::Tensor arg = (w.to(at::kFloat) * 1000.0).unsqueeze(1) * freqs.unsqueeze(0);
  at::Tensor emb = at::cat({at::sin(arg), at::cos(arg)}, 1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1});
  return emb;
}

bool takes_guidance_embedding(const loaders::StableDiffusionModels& m) {
  return !m.unet.is_empty() && m.unet->config().time_cond_proj_dim > 0;
}

void GuidanceEmbedding::check(const ResidualRun& run) const {
  DMX_CHECK_ARG(takes_guidance_embedding(run.models),
                "the LCM guidance embedding needs a UNet with time_cond_proj_dim (an LCM-distilled model)");
  DMX_CHECK_ARG(!run.guided,
                "an LCM-distilled UNet takes the guidance scale as an embedding: the run must not also be guided");
  DMX_CHECK_ARG(std::isfinite(guidance_scale_), "guidance_scale must be finite, got ", guidance_scale_);
}

void GuidanceEmbedding::prepare(const ResidualRun& run) {
  const int64_t dim = run.models.unet->config().time_cond_proj_dim;
  const at::Tensor w = at::full({static_cast<int64_t>(run.batch)}, guidance_scale_ - 1.0, at::kFloat);
  embedding_ = guidance_scale_embedding(w, dim).to(run.models.device, run.models.dtype);
}

void GuidanceEmbedding::apply(const ResidualStep&, models::UNetInputs& in) { in.timestep_cond = embedding_; }
}  // namespace dmx::pipelines
