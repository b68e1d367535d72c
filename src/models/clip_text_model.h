// CLIP text encoder (transformers 4.37 CLIPTextModel and CLIPTextModelWithProjection, "Learning Transferable
// Visual Models From Natural Language Supervision", Radford et al. 2021), with its state-dict key names
// (text_model.embeddings..., text_model.encoder.layers.N..., text_model.final_layer_norm, text_projection), so a
// diffusers text_encoder/model.safetensors (or an unCLIP prior_text_encoder/) loads by a strict name match. The
// encoder layers are shared with the vision tower (models/clip_encoder.h, models/clip_vision_model.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace dmx::models {

struct CLIPEncoderOptions;  // models/clip_encoder.h

// transformers' CLIPTextConfig fields. The member defaults are sd15()'s; from_json starts from
// transformers' own defaults (hidden 512, 12 layers, 8 heads, intermediate 2048, projection 512).
struct CLIPTextConfig {
  int vocab_size = 49408;
  int hidden_size = 768;
  int intermediate_size = 3072;
  int num_hidden_layers = 12;
  int num_attention_heads = 12;
  int max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;
  // eos_token_id == 2 is transformers' legacy value: the pooled output then takes the position of the
  // largest id (argmax), which is what every SD text_encoder/config.json selects.
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 2;
  int64_t pad_token_id = 1;
  int projection_dim = 768;

  // A transformers config.json (CLIPTextConfig, or a CLIPConfig with "text_config"); FormatError on bad fields.
  static CLIPTextConfig from_json(const nlohmann::json& j);
  // runwayml/stable-diffusion-v1-5 text_encoder/config.json (openai/clip-vit-large-patch14 text tower).
  static CLIPTextConfig sd15();
  // stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower, 23 of its 24
  // layers as diffusers stores it).
  static CLIPTextConfig sd21();
  // InvalidArgument naming the field when a size is outside its range (docs/limits.md), hidden_size is not
  // divisible by num_attention_heads, hidden_act is unknown or the parameter count exceeds
  // cfgjson::kMaxModelParameters.
  void validate() const;
  CLIPEncoderOptions encoder_options() const;
  // The number of parameters the model has (with_projection: and text_projection); a double, exact below 2^53. A
  // loader compares it with the weight file before allocating anything.
  double parameter_count(bool with_projection = false) const;
};

struct CLIPTextOutput {
  at::Tensor last_hidden_state;           // [B, N, hidden] = final_layer_norm(hidden_states.back())
  at::Tensor pooler_output;               // [B, hidden] at the EOS position
  at::Tensor text_embeds;                 // [B, projection_dim] = text_projection(pooler_output), not normalised
                                          // (only with the projection)
  std::vector<at::Tensor> hidden_states;  // embeddings + each layer (only if requested), [B, N, hidden]
};

class CLIPTextModelImpl : public torch::nn::Module {
 public:
  // with_projection: transformers' CLIPTextModelWithProjection (an unCLIP prior_text_encoder/): adds the
  // bias-free text_projection [projection_dim, hidden] and fills text_embeds.
  explicit CLIPTextModelImpl(const CLIPTextConfig& cfg, bool with_projection = false);
  bool has_projection() const;
  // input_ids: int64 (or int32) [B, N], N <= max_position_embeddings; causal mask only (no padding
  // mask), as SD pipelines run it. Computes in the dtype of the weights.
  CLIPTextOutput forward(const at::Tensor& input_ids, bool output_hidden_states = false);
  // SD prompt embeddings with clip-skip: clip_skip = 0 -> last_hidden_state; k in [1, num_hidden_layers]
  // -> final_layer_norm(hidden_states[-(k+1)]) (diffusers' convention); only the needed layers run.
  at::Tensor encode(const at::Tensor& input_ids, int clip_skip = 0);
  const CLIPTextConfig& config() const { return cfg_; }

 private:
  at::Tensor embed(const at::Tensor& input_ids);
  CLIPTextConfig cfg_;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(CLIPTextModel);

// Drops keys a CLIP text-encoder file may carry that the model does not have as state: the
// non-persistent `text_model.embeddings.position_ids` buffer that older transformers versions and
// single-file checkpoints save. Returns the number of keys removed.
int clean_clip_state_dict(io::TensorMap& state);
}  // namespace dmx::models
