// CLIP image encoder (transformers 4.37 CLIPVisionModelWithProjection, "Learning Transferable Visual Models From
// Natural Language Supervision", Radford et al. 2021; the ViT of Dosovitskiy et al. 2020): patch embedding
// (a bias-free conv with stride = patch), class token, position embedding, pre_layrnorm, the transformer encoder
// it shares with the text tower (models/clip_encoder.h), post_layernorm of the class token, visual_projection.
// State-dict key names as transformers (vision_model.embeddings.*, vision_model.pre_layrnorm,
// vision_model.encoder.layers.N..., vision_model.post_layernorm, visual_projection), so a diffusers
// image_encoder/model.safetensors loads by a strict name match.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "io/safetensors.h"

namespace dmx::models {

struct CLIPEncoderOptions;  // models/clip_encoder.h

// transformers' CLIPVisionConfig fields and defaults (ViT-B/32).
struct CLIPVisionConfig {
  int hidden_size = 768;
  int intermediate_size = 3072;
  int projection_dim = 512;
  int num_hidden_layers = 12;
  int num_attention_heads = 12;
  int num_channels = 3;
  int image_size = 224;
  int patch_size = 32;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;

  // A transformers config.json (CLIPVisionConfig, or a CLIPConfig with "vision_config"); FormatError on bad
  // fields or values.
  static CLIPVisionConfig from_json(const nlohmann::json& j);
  // InvalidArgument naming the field: sizes must be positive, image_size a multiple of patch_size,
  // hidden_size divisible by num_attention_heads, hidden_act quick_gelu or gelu.
  void validate() const;
  CLIPEncoderOptions encoder_options() const;
  int num_positions() const { return (image_size / patch_size) * (image_size / patch_size) + 1; }
  // The number of parameters the model has (a double, exact below 2^53): compared with the weight file before
  // anything is allocated.
  double parameter_count() const;
};

struct CLIPVisionOutput {
  at::Tensor image_embeds;       // [B, projection_dim] = visual_projection(pooler_output), not normalised
  at::Tensor last_hidden_state;  // [B, 1 + patches, hidden], the encoder output (no post_layernorm)
  at::Tensor pooler_output;      // [B, hidden] = post_layernorm(last_hidden_state[:, 0])
};

class CLIPVisionModelWithProjectionImpl : public torch::nn::Module {
 public:
  explicit CLIPVisionModelWithProjectionImpl(const CLIPVisionConfig& cfg);
  // pixel_values: [B, num_channels, image_size, image_size] (what CLIPImageProcessor produces; float, cast to
  // the weights' dtype). InvalidArgument naming the expected shape otherwise.
  CLIPVisionOutput forward(const at::Tensor& pixel_values);
  const CLIPVisionConfig& config() const { return cfg_; }

 private:
  CLIPVisionConfig cfg_;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(CLIPVisionModelWithProjection);

// Drops the non-persistent `vision_model.embeddings.position_ids` buffer older transformers versions saved.
// Returns the number of keys removed.
int clean_clip_vision_state_dict(io::TensorMap& state);
}  // namespace dmx::models
