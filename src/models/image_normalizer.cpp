// StableUnCLIPImageNormalizer (see image_normalizer.h), as diffusers 0.27.2 computes it.
#include "models/image_normalizer.h"

#include <ATen/ATen.h>

#include "dmx/error.h"
#include "models/config_json.h"

namespace dmx::models {

StableUnCLIPImageNormalizerConfig StableUnCLIPImageNormalizerConfig::from_json(const nlohmann::json& j) {
  const char* what = "StableUnCLIPImageNormalizer config";
  DMX_CHECK_FORMAT(j.is_object(), what, ": expected a JSON object, got ", j.type_name());
  StableUnCLIPImageNormalizerConfig c;
  cfgjson::get(j, what, "embedding_dim", c.embedding_dim);
  DMX_CHECK_FORMAT(c.embedding_dim > 0 && c.embedding_dim <= (1 << 16), what,
                   ": embedding_dim must be in [1, 65536], got ", c.embedding_dim);
  return c;
}

StableUnCLIPImageNormalizerImpl::StableUnCLIPImageNormalizerImpl(const StableUnCLIPImageNormalizerConfig& cfg)
    : cfg_(cfg) {
  DMX_CHECK_ARG(cfg_.embedding_dim > 0, "StableUnCLIPImageNormalizer: embedding_dim must be > 0, got ",
                cfg_.embedding_dim);
  mean = register_parameter("mean", at::zeros({1, cfg_.embedding_dim}));
  std = register_parameter("std", at::ones({1, cfg_.embedding_dim}));
}

void StableUnCLIPImageNormalizerImpl::check(const at::Tensor& embeds, const char* what) const {
  DMX_CHECK_ARG(embeds.defined() && embeds.dim() == 2 && embeds.size(1) == cfg_.embedding_dim,
                "StableUnCLIPImageNormalizer.", what, ": image embeddings must be [batch, ", cfg_.embedding_dim,
                "] (embedding_dim), got ", embeds.defined() ? embeds.sizes() : at::IntArrayRef{});
}

at::Tensor StableUnCLIPImageNormalizerImpl::scale(const at::Tensor& embeds) const {
  check(embeds, "scale");
  return (embeds - mean) * 1.0 / std;
}

at::Tensor StableUnCLIPImageNormalizerImpl::unscale(const at::Tensor& embeds) const {
  check(embeds, "unscale");
  return embeds * std + mean;
}
}  // namespace dmx::models
