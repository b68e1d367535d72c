// The encoder UNet2DConditionModel and ControlNetModel share (the ControlNet is a trainable copy of the UNet's
// encoder, diffusers' ControlNetModel.from_unet): block options, the down blocks and the mid block built under
// diffusers' names, the timestep input, and the forward through them (with gradient checkpointing). Both
// configs carry the same diffusers fields. Internal header of the models layer.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/tensor_util.h"
#include "dmx/error.h"
#include "models/config_json.h"
#include "nn/layers.h"

namespace dmx::models {

// The checks of the fields the UNet and ControlNet configs share (their encoder), one set for both: block lists and
// types, activation, the ranges of docs/limits.md (well above every Stable Diffusion family model, far below what
// would exhaust memory), channels divisible by the groups, and the heads per block, which must divide the
// block's channels. `heads_field` names the heads' field in messages. InvalidArgument / Unsupported naming the
// field, the rule and the value.
template <typename Config>
void check_encoder_config(const Config& cfg, const std::string& heads_field) {
  const size_t n = cfg.down_block_types.size();
  DMX_CHECK_ARG(n >= 1, "down_block_types must not be empty");
  DMX_CHECK_ARG(cfg.block_out_channels.size() == n, "block_out_channels must have one entry per down block (", n,
                "), got ", cfg.block_out_channels.size());
  for (const auto& t : cfg.down_block_types)
    DMX_CHECK_SUPPORTED(t == "CrossAttnDownBlock2D" || t == "DownBlock2D", "down_block_types: unsupported block type '",
                        t, "' (supported: CrossAttnDownBlock2D, DownBlock2D)");
  nn::parse_act(cfg.act_fn, "act_fn");
  using cfgjson::check_range;
  check_range("number of down blocks", static_cast<int64_t>(n), 1, 8);
  check_range("in_channels", cfg.in_channels, 1, 64);
  check_range("layers_per_block", cfg.layers_per_block, 1, 16);
  check_range("norm_num_groups", cfg.norm_num_groups, 1, 8192);
  DMX_CHECK_ARG(std::isfinite(cfg.norm_eps) && cfg.norm_eps > 0, "norm_eps must be > 0, got ", cfg.norm_eps);
  check_range("cross_attention_dim", cfg.cross_attention_dim, 1, 8192);
  check_range("transformer_layers_per_block", cfg.transformer_layers_per_block, 1, 32);
  check_range("downsample_padding", cfg.downsample_padding, 0, 1);
  check_range("freq_shift", cfg.freq_shift, -1024, 1024);
  DMX_CHECK_ARG(std::isfinite(cfg.mid_block_scale_factor) && cfg.mid_block_scale_factor > 0,
                "mid_block_scale_factor must be > 0, got ", cfg.mid_block_scale_factor);
  for (size_t i = 0; i < n; ++i) {
    check_range("block_out_channels[" + std::to_string(i) + "]", cfg.block_out_channels[i], 1, 8192);
    DMX_CHECK_ARG(cfg.block_out_channels[i] % cfg.norm_num_groups == 0, "block_out_channels[", i, "] (",
                  cfg.block_out_channels[i], ") must be divisible by norm_num_groups (", cfg.norm_num_groups, ")");
  }
  const std::vector<int> heads = cfg.heads_per_block();
  DMX_CHECK_ARG(heads.size() == n, heads_field, " must have one entry per down block (", n, "), got ", heads.size());
  for (size_t i = 0; i < n; ++i) {
    check_range(heads_field + "[" + std::to_string(i) + "]", heads[i], 1, cfg.block_out_channels[i]);
    // Down block i, the mirrored up block and (for the last) the mid block split these channels into heads.
    DMX_CHECK_ARG(cfg.block_out_channels[i] % heads[i] == 0, heads_field, "[", i, "] (", heads[i],
                  " heads) must divide block_out_channels[", i, "] (", cfg.block_out_channels[i], ")");
  }
}

// Options of one resnet/transformer block of a UNet-family config with heads_i attention heads, at the
// level of down block `level` (up block i is level n-1-i).
template <typename Config>
nn::BlockOptions unet_block_options(const Config& cfg, int heads_i, nn::Act act, size_t level) {
  nn::BlockOptions o;
  o.num_layers = cfg.layers_per_block;
  o.temb_channels = cfg.blocks_time_embed_dim();
  o.resnet_eps = cfg.norm_eps;
  o.resnet_groups = cfg.norm_num_groups;
  o.act = act;
  o.transformer.num_attention_heads = heads_i;
  o.transformer.num_layers = cfg.transformer_layers_per_block;
  o.transformer.cross_attention_dim = cfg.cross_attention_dim;
  o.transformer.use_linear_projection = cfg.use_linear_projection;
  o.transformer.only_cross_attention = cfg.only_cross_attention_at(level);
  o.transformer.upcast_attention = cfg.upcast_attention;
  return o;
}

// Registers `down_blocks` on `owner`: one DownBlock2D / CrossAttnDownBlock2D per entry of down_block_types, each
// but the last with a downsampler. `before` runs after the container is made and before the first block,
// `after(i, out_channels)` after block i (the ControlNet registers its zero convolutions there, so every module
// is created, and draws its initial weights, in diffusers' order).
template <typename Config>
std::vector<nn::DownBlock2D> build_down_blocks(torch::nn::Module& owner, const Config& cfg, nn::Act act,
                                               const std::function<void()>& before = nullptr,
                                               const std::function<void(int, int)>& after = nullptr) {
  const auto& ch = cfg.block_out_channels;
  const int n = static_cast<int>(ch.size());
  const std::vector<int> heads = cfg.heads_per_block();
  auto downs = nn::make_container(owner, "down_blocks");
  if (before) before();
  std::vector<nn::DownBlock2D> blocks;
  int output_channel = ch[0];
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = unet_block_options(cfg, heads[i], act, static_cast<size_t>(i));
    o.in_channels = output_channel;
    output_channel = ch[i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    o.downsample_padding = cfg.downsample_padding;
    o.cross_attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
    blocks.push_back(downs->register_module(std::to_string(i), nn::DownBlock2D(o)));
    if (after) after(i, output_channel);
  }
  return blocks;
}

// Registers `mid_block` (UNetMidBlock2DCrossAttn at the last width) on `owner`.
template <typename Config>
nn::UNetMidBlock2DCrossAttn build_mid_block(torch::nn::Module& owner, const Config& cfg, nn::Act act) {
  nn::BlockOptions o = unet_block_options(cfg, cfg.heads_per_block().back(), act, cfg.block_out_channels.size() - 1);
  o.num_layers = 1;
  o.in_channels = o.out_channels = cfg.block_out_channels.back();
  o.output_scale_factor = cfg.mid_block_scale_factor;
  o.transformer.only_cross_attention = false;  // diffusers' UNetMidBlock2DCrossAttn has no such option
  return owner.register_module("mid_block", nn::UNetMidBlock2DCrossAttn(o));
}

// The timesteps [B] of a 0-d, [1] or [B] timestep (InvalidArgument otherwise).
at::Tensor batch_timesteps(const at::Tensor& timestep, int64_t batch);

// The sinusoidal timestep features the time embedding takes: [B, block_out_channels[0]] in `dtype`.
template <typename Config>
at::Tensor timestep_features(const Config& cfg, const at::Tensor& t, at::ScalarType dtype) {
  return nn::get_timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype);
}

// T2I-Adapter features on their way through the down path (UNetInputs::down_intrablock_additional_residuals):
// taken in order, one per down block, and the next one by the mid block when its shape matches.
struct IntrablockResiduals {
  const std::vector<at::Tensor>* features = nullptr;
  size_t next = 0;
  bool pending() const { return features && next < features->size(); }
  // Whether the next feature fits hidden states of these sizes ([B or 1, C, h, w]).
  bool next_fits(at::IntArrayRef hidden_sizes) const;
  // The next feature, checked against the hidden states it will be added to (InvalidArgument naming its
  // index otherwise), in their dtype.
  at::Tensor take(at::IntArrayRef hidden_sizes, at::ScalarType dtype);
};

// The down path: h through every block; `res` (holding h on entry) receives every skip connection. With
// `checkpoint` each block's activations are recomputed in backward. Records down_blocks.<i> when a recorder is
// given. `intrablock` (may be null) adds T2I-Adapter features where diffusers adds them. Returns the last block's
// hidden states.
at::Tensor run_down_blocks(std::vector<nn::DownBlock2D>& blocks, at::Tensor h, const at::Tensor& emb,
                           const at::Tensor& ctx, bool checkpoint, std::vector<at::Tensor>& res,
                           TensorRecorder* recorder = nullptr, IntrablockResiduals* intrablock = nullptr);
at::Tensor run_mid_block(nn::UNetMidBlock2DCrossAttn& mid, const at::Tensor& h, const at::Tensor& emb,
                         const at::Tensor& ctx, bool checkpoint);

// Per-block int settings dmx keeps as one value: an int or a list of equal ints (Unsupported otherwise).
void get_uniform_int(const nlohmann::json& j, const char* what, const char* key, size_t n, int& out);
}  // namespace dmx::models
