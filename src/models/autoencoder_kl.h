// AutoencoderKL (diffusers 0.27.2, models/autoencoders/autoencoder_kl.py + vae.py Encoder/Decoder; Kingma &
// Welling's VAE with the KL-regularised autoencoder of Rombach et al. 2022), with diffusers' key names
// (encoder.*, decoder.*, quant_conv, post_quant_conv).
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dmx::models {

struct AutoencoderKLConfig {
  int in_channels = 3;
  int out_channels = 3;
  std::vector<std::string> down_block_types{"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                                            "DownEncoderBlock2D"};
  std::vector<std::string> up_block_types{"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                                          "UpDecoderBlock2D"};
  std::vector<int> block_out_channels{128, 256, 512, 512};
  int layers_per_block = 2;
  std::string act_fn = "silu";
  int latent_channels = 4;
  int norm_num_groups = 32;
  int sample_size = 512;
  double scaling_factor = 0.18215;
  bool mid_block_add_attention = true;

  // Parses diffusers' vae/config.json (FormatError naming the field; Unsupported for unknown block types).
  static AutoencoderKLConfig from_json(const nlohmann::json& j);
  static AutoencoderKLConfig sd15();  // runwayml/stable-diffusion-v1-5 vae/config.json
  static AutoencoderKLConfig sd21();  // stabilityai/stable-diffusion-2-1 vae/config.json
  void validate() const;              // InvalidArgument naming the field; Unsupported for unknown block types
  int downscale_factor() const { return 1 << (static_cast<int>(block_out_channels.size()) - 1); }
  // The number of parameters the model has, from the config alone (nothing is allocated). validate() bounds
  // every field (docs/limits.md) and this count by cfgjson::kMaxModelParameters.
  double parameter_count() const;
};

// diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20], std = exp(0.5 logvar).
struct DiagonalGaussian {
  at::Tensor mean, logvar, std;
  // mean + std * randn(mean.shape, gen) with mean's options, like diffusers' randn_tensor (gen may be null).
  at::Tensor sample(at::Generator* gen) const;
  at::Tensor sample_with(const at::Tensor& noise) const { return mean + std * noise; }
};

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(const AutoencoderKLConfig& cfg);
  DiagonalGaussian encode(const at::Tensor& x);  // x: [B, 3, H, W] in [-1, 1]
  at::Tensor decode(const at::Tensor& z);        // z unscaled: [B, 4, H/f, W/f] -> [B, 3, H, W]
  const AutoencoderKLConfig& config() const { return cfg_; }

 private:
  AutoencoderKLConfig cfg_;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(AutoencoderKL);
}  // namespace dmx::models
