// VQModel (diffusers 0.27.2, models/vq_model.py: van den Oord et al. 2017's vector-quantised autoencoder as latent
// diffusion's VQ first stage uses it), with diffusers' key names: encoder.* (vae.py Encoder, double_z false),
// quant_conv, quantize.embedding.weight (VectorQuantizer's codebook [num_vq_embeddings, vq_embed_dim]),
// post_quant_conv, decoder.* (norm_type "group"). dmx uses it as Make-A-Scene's VQ-SEG (docs/scene.md): an
// autoencoder of segmentation maps whose codes become scene tokens.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "models/autoencoder_kl.h"

namespace dmx::models {

struct VQModelConfig {
  // The coders' shape: in/out channels, block types and widths, layers_per_block, act_fn, latent_channels,
  // norm_num_groups, sample_size, scaling_factor, mid_block_add_attention (the AutoencoderKL fields; VQModel's
  // defaults below).
  AutoencoderKLConfig coder = default_coder();
  int num_vq_embeddings = 256;
  int vq_embed_dim = 0;  // 0: latent_channels (diffusers' None)

  static AutoencoderKLConfig default_coder();  // VQModel's defaults: one block of 64, latent 3, 32 groups
  // Parses diffusers' VQModel config.json (FormatError naming the field; Unsupported for norm_type "spatial" or
  // lookup_from_codebook).
  static VQModelConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;  // config.json as diffusers writes it (_class_name VQModel)
  void validate() const;           // InvalidArgument naming the field
  int embed_dim() const { return vq_embed_dim > 0 ? vq_embed_dim : coder.latent_channels; }
  int downscale_factor() const { return coder.downscale_factor(); }
  double parameter_count() const;
};

// diffusers' VectorQuantizer (legacy, beta 0.25) on h [B, E, h, w]: each vector replaced by its nearest code
// (squared Euclidean distance; the first of equal ones, as argmin).
struct VQQuantized {
  at::Tensor quantized;   // [B, E, h, w]: h + (z_q - h).detach() (the straight-through estimator)
  at::Tensor indices;     // [B, h, w] int64
  at::Tensor codebook;    // mean (z_q - sg(h))^2: moves the codes towards the encoder's outputs
  at::Tensor commitment;  // mean (sg(z_q) - h)^2: keeps the encoder near its codes (weighted by beta in training)
};

class VQModelImpl : public torch::nn::Module {
 public:
  explicit VQModelImpl(const VQModelConfig& cfg);
  at::Tensor encode(const at::Tensor& x);                                   // encoder + quant_conv: [B, E, H/f, W/f]
  VQQuantized quantize(const at::Tensor& h);                                // the nearest codes
  at::Tensor decode(const at::Tensor& h, bool force_not_quantize = false);  // as diffusers' decode
  at::Tensor decode_indices(const at::Tensor& indices);                     // [B, h, w] codes -> [B, out, H, W]
  at::Tensor forward(const at::Tensor& x) { return decode(encode(x)); }
  at::Tensor codebook_weight() const;  // [K, E]
  const VQModelConfig& config() const { return cfg_; }

 private:
  VQModelConfig cfg_;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(VQModel);
}  // namespace dmx::models
