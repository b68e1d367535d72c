// ControlNetModel (diffusers 0.27.2, models/controlnet.py; Zhang, Rao & Agrawala 2023, "Adding Conditional
// Control to Text-to-Image Diffusion Models"): a trainable copy of the UNet encoder plus a hint encoder
// (ControlNetConditioningEmbedding) and zero convolutions. It returns residuals; the UNet takes them through
// UNetInputs (a data contract, no hooks).
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "models/unet_2d_condition.h"

namespace dmx::models {

struct ControlNetConfig {
  int in_channels = 4;
  int conditioning_channels = 3;
  bool flip_sin_to_cos = true;
  int freq_shift = 0;
  std::vector<std::string> down_block_types{"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D"};
  bool only_cross_attention = false;
  std::vector<int> block_out_channels{320, 640, 1280, 1280};
  int layers_per_block = 2;
  int downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  std::string act_fn = "silu";
  int norm_num_groups = 32;
  double norm_eps = 1e-5;
  int cross_attention_dim = 1280;  // diffusers' default; SD 1.x ControlNets say 768
  int transformer_layers_per_block = 1;
  std::vector<int> attention_head_dim{8, 8, 8, 8};
  std::vector<int> num_attention_heads;  // empty = attention_head_dim (diffusers' naming quirk)
  bool use_linear_projection = false;
  bool upcast_attention = false;
  std::string controlnet_conditioning_channel_order = "rgb";  // "rgb" | "bgr"
  std::vector<int> conditioning_embedding_out_channels{16, 32, 96, 256};
  bool global_pool_conditions = false;

  // diffusers' controlnet/config.json. Wrong types / invalid values: FormatError naming the field;
  // features dmx does not implement (class / addition embeddings, other blocks): Unsupported.
  static ControlNetConfig from_json(const nlohmann::json& j);
  void validate() const;  // InvalidArgument naming the field
  // The number of parameters the model has, from the config alone (nothing is allocated); validate() bounds
  // every field (docs/limits.md) and this count by cfgjson::kMaxModelParameters.
  double parameter_count() const;
  std::vector<int> heads_per_block() const;
  int time_embed_dim() const { return block_out_channels.at(0) * 4; }
  int blocks_time_embed_dim() const { return time_embed_dim(); }  // no class embedding to concatenate
  bool only_cross_attention_at(size_t) const { return only_cross_attention; }
  // Residuals the model returns: conv_in + layers_per_block per block + one per downsampler.
  size_t num_down_residuals() const;
};

// Forward inputs (a struct, per docs/architecture.md).
struct ControlNetInputs {
  at::Tensor sample;                 // [B, in_channels, h, w] (scaled model input)
  at::Tensor timestep;               // 0-d or [B]
  at::Tensor encoder_hidden_states;  // [B, N, cross_attention_dim]
  at::Tensor controlnet_cond;        // [B, conditioning_channels, H, W], H = h * 8 (image in [0, 1])
  double conditioning_scale = 1.0;
  bool guess_mode = false;
  TensorRecorder* recorder = nullptr;  // records cond_embedding
};

struct ControlNetOutput {
  std::vector<at::Tensor> down_block_res_samples;  // one per UNet skip connection
  at::Tensor mid_block_res_sample;
};

class ControlNetModelImpl : public torch::nn::Module {
 public:
  explicit ControlNetModelImpl(const ControlNetConfig& cfg);
  ControlNetOutput forward(const ControlNetInputs& in);
  const ControlNetConfig& config() const { return cfg_; }
  // Training: recompute the activations of each down block and the mid block in backward instead of keeping
  // them (diffusers' ControlNetModel gradient checkpointing). Only acts while grad mode is on.
  void set_gradient_checkpointing(bool on) { gradient_checkpointing_ = on; }
  bool gradient_checkpointing() const { return gradient_checkpointing_; }

 private:
  ControlNetConfig cfg_;
  bool gradient_checkpointing_ = false;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(ControlNetModel);

// Checks that a ControlNet can feed this UNet (cross_attention_dim, block channels, layout, in_channels);
// InvalidArgument naming both values otherwise. `what` names the ControlNet (its path).
void check_controlnet_matches_unet(const ControlNetConfig& cn, const UNet2DConditionConfig& unet,
                                   const std::string& what);

// guess mode: diffusers scales the n residuals (down..., mid) by torch.logspace(-1, 0, n) * scale.
at::Tensor guess_mode_scales(int64_t n, double conditioning_scale);
}  // namespace dmx::models
