// UNet2DConditionModel (diffusers 0.27.2, models/unets/unet_2d_condition.py; Rombach et al. 2022, "High-
// Resolution Image Synthesis with Latent Diffusion Models"), SD 1.x / 2.x subset, with diffusers' key names,
// plus the options of the image-conditioned and embedding-conditioned models: class embeddings (the x4
// upscaler's noise level, Stable unCLIP's noised image embedding; Ho et al. 2021, "Cascaded Diffusion Models"),
// per-block only_cross_attention, any in_channels, and T2I-Adapter residuals added inside the down blocks
// (Mou et al. 2023).
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/tensor_util.h"

namespace dmx::models {

struct UNet2DConditionConfig {
  int sample_size = 64;
  int in_channels = 4;
  int out_channels = 4;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  int freq_shift = 0;
  std::vector<std::string> down_block_types{"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D"};
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";
  std::vector<std::string> up_block_types{"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                          "CrossAttnUpBlock2D"};
  // Per down block (diffusers accepts one bool for all, expanded here); empty = false everywhere. Up block i
  // takes the value of down block n-1-i. In those blocks attn1 attends to the encoder states too.
  std::vector<bool> only_cross_attention;
  std::vector<int> block_out_channels{320, 640, 1280, 1280};
  int layers_per_block = 2;
  int downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  std::string act_fn = "silu";
  int norm_num_groups = 32;
  double norm_eps = 1e-5;
  int cross_attention_dim = 768;
  int transformer_layers_per_block = 1;
  // diffusers' naming quirk: attention_head_dim is used as the number of heads per block when
  // num_attention_heads is not given. One value per down block after expansion.
  std::vector<int> attention_head_dim{8, 8, 8, 8};
  std::vector<int> num_attention_heads;  // empty = use attention_head_dim
  bool use_linear_projection = false;
  bool upcast_attention = false;
  std::string resnet_time_scale_shift = "default";
  // Class conditioning (diffusers' _set_class_embedding), added to the time embedding (or concatenated with
  // it when class_embeddings_concat):
  //   class_embed_type "" (None) with num_class_embeds > 0: nn.Embedding(num_class_embeds, time_embed_dim);
  //   "timestep": sinusoids of the labels (as for the timestep) -> TimestepEmbedding(C0, time_embed_dim, act_fn);
  //   "projection": TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim), SiLU;
  //   "simple_projection": Linear(projection_class_embeddings_input_dim, time_embed_dim);
  //   "identity": the labels themselves ([B, time_embed_dim]).
  std::string class_embed_type;                   // "" = None
  int num_class_embeds = 0;                       // 0 = None
  int projection_class_embeddings_input_dim = 0;  // 0 = None
  bool class_embeddings_concat = false;
  // diffusers' time_cond_proj_dim (0 = None): the time embedding's cond_proj of UNetInputs::timestep_cond, an
  // LCM-distilled UNet's guidance embedding (LatentConsistencyModelPipeline; pipelines/guidance_embedding.h).
  int time_cond_proj_dim = 0;

  // Parses diffusers' unet/config.json. Wrong types and invalid values: FormatError naming the field;
  // features dmx does not implement (other block types, class/addition embeddings, ...): Unsupported.
  static UNet2DConditionConfig from_json(const nlohmann::json& j);
  static UNet2DConditionConfig sd15();  // runwayml/stable-diffusion-v1-5 unet/config.json
  static UNet2DConditionConfig sd21();  // stabilityai/stable-diffusion-2-1 unet/config.json
  // Checks every size against its documented range (docs/limits.md) and divisibility (InvalidArgument naming
  // the field), block types (Unsupported), then the parameter count against cfgjson::kMaxModelParameters.
  void validate() const;
  // The number of parameters the model has, from the config alone (nothing is allocated).
  double parameter_count() const;
  // Heads per down block after diffusers' defaulting (num_attention_heads or else attention_head_dim).
  std::vector<int> heads_per_block() const;
  int time_embed_dim() const { return block_out_channels.at(0) * 4; }
  // The embedding width the resnets receive: doubled when the class embedding is concatenated.
  int blocks_time_embed_dim() const { return time_embed_dim() * (class_embeddings_concat ? 2 : 1); }
  bool only_cross_attention_at(size_t down_block) const {
    return down_block < only_cross_attention.size() && only_cross_attention[down_block];
  }
  // Which class embedding the model has: "embedding" (num_class_embeds), the class_embed_type, or "" (none).
  std::string class_embedding_kind() const;
};

// Forward inputs (a struct, per docs/architecture.md): ControlNet and T2I-Adapter residuals arrive here as data.
struct UNetInputs {
  at::Tensor sample;                 // [B, C, h, w]
  at::Tensor timestep;               // 0-d or [B]; float or int
  at::Tensor encoder_hidden_states;  // [B, N, cross_attention_dim]
  // Required exactly when the model has a class embedding. [B] (or 0-d / [1], broadcast): integer labels for
  // num_class_embeds, labels (timesteps, any dtype) for "timestep"; [B, D] (or [1, D]) for "projection",
  // "simple_projection" (D = projection_class_embeddings_input_dim) and "identity" (D = time_embed_dim).
  at::Tensor class_labels;
  // Required exactly when the model has time_cond_proj_dim: [B, time_cond_proj_dim] (or [1, ...]), added through
  // the time embedding's cond_proj (diffusers' timestep_cond).
  at::Tensor timestep_cond;
  std::vector<at::Tensor> down_block_additional_residuals;  // optional (ControlNet): added to every skip
  at::Tensor mid_block_additional_residual;                 // optional (ControlNet)
  // Optional (T2I-Adapter), diffusers' rule: feature k goes to the k-th down block, in order. A
  // CrossAttnDownBlock2D adds it after its last (resnet, attention) pair, before its downsampler, so the skip
  // connection and the downsampler both see the sum; a DownBlock2D adds it to its output (after its
  // downsampler, if it has one), which is also its last skip. A feature left over after the down blocks is
  // added to the mid block's output when the shapes match (T2I-Adapter-XL). Each is [B or 1, C, h, w] of the
  // hidden states it is added to; one that no block consumes is an InvalidArgument.
  std::vector<at::Tensor> down_intrablock_additional_residuals;
  // Records time_embedding (the MLP output), class_embedding, conv_in, down_blocks.<i>, mid_block,
  // up_blocks.<i>, conv_norm_out, conv_out.
  TensorRecorder* recorder = nullptr;
};

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DConditionModelImpl(const UNet2DConditionConfig& cfg);
  at::Tensor forward(const UNetInputs& in);
  const UNet2DConditionConfig& config() const { return cfg_; }
  // Training: recompute the activations of each down / mid / up block in backward instead of keeping them
  // (diffusers' enable_gradient_checkpointing). Only acts while grad mode is on; results are unchanged.
  void set_gradient_checkpointing(bool on) { gradient_checkpointing_ = on; }
  bool gradient_checkpointing() const { return gradient_checkpointing_; }

 private:
  at::Tensor class_embedding(const at::Tensor& labels, int64_t batch, at::ScalarType dtype);
  UNet2DConditionConfig cfg_;
  bool gradient_checkpointing_ = false;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(UNet2DConditionModel);
}  // namespace dmx::models
