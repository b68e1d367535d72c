// Block options shared by UNet2DConditionModel and ControlNetModel, whose configs carry the same
// diffusers fields (the ControlNet is a trainable copy of the UNet's encoder).
#pragma once
#include "nn/layers.h"

namespace dmx::models {

// Options of one resnet/transformer block of a UNet-family config with heads_i attention heads.
template <typename Config>
nn::BlockOptions unet_block_options(const Config& cfg, int heads_i, nn::Act act) {
  nn::BlockOptions o;
  o.num_layers = cfg.layers_per_block;
  o.temb_channels = cfg.time_embed_dim();
  o.resnet_eps = cfg.norm_eps;
  o.resnet_groups = cfg.norm_num_groups;
  o.act = act;
  o.transformer.num_attention_heads = heads_i;
  o.transformer.num_layers = cfg.transformer_layers_per_block;
  o.transformer.cross_attention_dim = cfg.cross_attention_dim;
  o.transformer.use_linear_projection = cfg.use_linear_projection;
  o.transformer.only_cross_attention = cfg.only_cross_attention;
  o.transformer.upcast_attention = cfg.upcast_attention;
  return o;
}
}  // namespace dmx::models
