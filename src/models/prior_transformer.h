// PriorTransformer (diffusers 0.27.2, models/transformers/prior_transformer.py): the unCLIP prior of Ramesh et al.
// 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents" (DALL-E 2), as Karlo, Stable unCLIP and
// Kandinsky 2.2 ship it. A causal transformer over [the projected text token states, the projected text embedding,
// the time embedding, the projected noisy image embedding, a learned final token], whose last token predicts the
// CLIP image embedding; clip_mean / clip_std de-normalise the result (post_process_latents). diffusers' key names.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace dmx::models {

// diffusers' PriorTransformer.__init__ fields and defaults (null in a config.json = the empty string or 0 here).
struct PriorTransformerConfig {
  int num_attention_heads = 32;
  int attention_head_dim = 64;
  int num_layers = 20;
  int embedding_dim = 768;
  int num_embeddings = 77;        // text tokens
  int additional_embeddings = 4;  // proj_embedding, time embedding, hidden_states, prd token
  double dropout = 0.0;           // training only
  std::string time_embed_act_fn = "silu";
  std::string norm_in_type;                      // null; "layer" (Shap-E) is refused
  std::string embedding_proj_norm_type;          // null; "layer" (Shap-E) is refused
  std::string encoder_hid_proj_type = "linear";  // null (Shap-E) is refused
  std::string added_emb_type = "prd";            // null (Shap-E) is refused
  int time_embed_dim = 0;                        // 0 = inner_dim
  int embedding_proj_dim = 0;                    // 0 = embedding_dim
  int clip_embed_dim = 0;                        // 0 = embedding_dim

  // Parses diffusers' prior/config.json. Wrong types and invalid values: FormatError naming the field; the token
  // layouts dmx does not implement (Shap-E's prior): Unsupported naming the field and value.
  static PriorTransformerConfig from_json(const nlohmann::json& j);
  // Sizes must be positive (InvalidArgument naming the field); unsupported layouts: Unsupported.
  void validate() const;
  int inner_dim() const { return num_attention_heads * attention_head_dim; }
  int resolved_time_embed_dim() const { return time_embed_dim > 0 ? time_embed_dim : inner_dim(); }
  int resolved_embedding_proj_dim() const { return embedding_proj_dim > 0 ? embedding_proj_dim : embedding_dim; }
  int resolved_clip_embed_dim() const { return clip_embed_dim > 0 ? clip_embed_dim : embedding_dim; }
  int sequence_length() const { return num_embeddings + additional_embeddings; }
  // The number of parameters the model has (a double, exact below 2^53): compared with the weight file before
  // anything is allocated.
  double parameter_count() const;
};

// Forward inputs (a struct, per the house conventions).
struct PriorTransformerInputs {
  at::Tensor hidden_states;          // [B, embedding_dim]: the noisy image embedding
  at::Tensor timestep;               // 0-d, [1] or [B]; integer or float
  at::Tensor proj_embedding;         // [B, embedding_proj_dim]: the CLIP text embedding (text_embeds)
  at::Tensor encoder_hidden_states;  // [B, num_embeddings, embedding_dim]: the text encoder's last_hidden_state
  // [B, num_embeddings], 1 (true) for the real tokens. Given: the additive bias is -10000 above the diagonal plus
  // -10000 on padded text tokens. Undefined: no mask at all, not even the causal one (diffusers does the same).
  at::Tensor attention_mask;
};

class PriorTransformerImpl : public torch::nn::Module {
 public:
  explicit PriorTransformerImpl(const PriorTransformerConfig& cfg);
  // -> predicted_image_embedding [B, clip_embed_dim]. InvalidArgument naming the input for a wrong shape.
  at::Tensor forward(const PriorTransformerInputs& in);
  // latents * clip_std + clip_mean.
  at::Tensor post_process_latents(const at::Tensor& prior_latents) const;
  const PriorTransformerConfig& config() const { return cfg_; }

 private:
  PriorTransformerConfig cfg_;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(PriorTransformer);
}  // namespace dmx::models
