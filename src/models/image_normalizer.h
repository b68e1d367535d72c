// StableUnCLIPImageNormalizer (diffusers 0.27.2, pipelines/stable_diffusion/stable_unclip_image_normalizer.py): the
// mean and standard deviation of the CLIP image embeddings a Stable unCLIP decoder was trained on. The embedding is
// normalised with them before the image-noising scheduler noises it, and un-normalised after (the noise
// augmentation of Ramesh et al. 2022, section 2.1). Parameters `mean` and `std`, [1, embedding_dim].
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>

namespace dmx::models {

struct StableUnCLIPImageNormalizerConfig {
  int embedding_dim = 768;
  // image_normalizer/config.json; FormatError naming the field.
  static StableUnCLIPImageNormalizerConfig from_json(const nlohmann::json& j);
};

class StableUnCLIPImageNormalizerImpl : public torch::nn::Module {
 public:
  explicit StableUnCLIPImageNormalizerImpl(const StableUnCLIPImageNormalizerConfig& cfg);
  // (embeds - mean) * 1.0 / std; embeds [B, embedding_dim] (InvalidArgument otherwise).
  at::Tensor scale(const at::Tensor& embeds) const;
  // embeds * std + mean.
  at::Tensor unscale(const at::Tensor& embeds) const;
  const StableUnCLIPImageNormalizerConfig& config() const { return cfg_; }
  at::Tensor mean, std;

 private:
  void check(const at::Tensor& embeds, const char* what) const;
  StableUnCLIPImageNormalizerConfig cfg_;
};
TORCH_MODULE(StableUnCLIPImageNormalizer);
}  // namespace dmx::models
