// CLIP text encoder (transformers' CLIPTextModel), with its state-dict key names
// (text_model.embeddings..., text_model.encoder.layers.N..., text_model.final_layer_norm).
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dmx::models {

struct CLIPTextConfig {
  int vocab_size = 49408;
  int hidden_size = 768;
  int intermediate_size = 3072;
  int num_hidden_layers = 12;
  int num_attention_heads = 12;
  int max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;
  int64_t bos_token_id = 49406;
  int64_t eos_token_id = 49407;
  int64_t pad_token_id = 1;
  int projection_dim = 768;

  static CLIPTextConfig from_json(const nlohmann::json& j);
  static CLIPTextConfig sd15();  // openai/clip-vit-large-patch14 text config
  static CLIPTextConfig sd21();  // stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H)
};

struct CLIPTextOutput {
  at::Tensor last_hidden_state;            // [B, N, hidden] = final_layer_norm(hidden_states.back())
  at::Tensor pooler_output;                // [B, hidden] at the EOS position
  std::vector<at::Tensor> hidden_states;   // embeddings + each layer (only if requested)
};

class CLIPTextModelImpl : public torch::nn::Module {
 public:
  explicit CLIPTextModelImpl(const CLIPTextConfig& cfg);
  // input_ids: int64 [B, N]; causal mask only (no padding mask), as SD pipelines run it.
  CLIPTextOutput forward(const at::Tensor& input_ids, bool output_hidden_states = false);
  // SD prompt embeddings with clip-skip: clip_skip = 0 -> last_hidden_state; k > 0 ->
  // final_layer_norm(hidden_states[-(k+1)]) (diffusers' convention).
  at::Tensor encode(const at::Tensor& input_ids, int clip_skip = 0);
  const CLIPTextConfig& config() const { return cfg_; }

 private:
  CLIPTextConfig cfg_;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(CLIPTextModel);
}  // namespace dmx::models
