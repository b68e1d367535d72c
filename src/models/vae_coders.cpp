// The autoencoders' Encoder and Decoder (see vae_coders.h).
#include "models/vae_coders.h"

#include <cstdlib>
#include <string>

#include "core/runtime.h"
#include "nn/fused_ops.h"

namespace dmx::models::vae {

namespace {
// conv_norm_out -> conv_act, as one fused GroupNorm+SiLU where available (nn/fused_ops.h).
at::Tensor norm_act(const torch::nn::GroupNorm& norm, nn::Act act, const at::Tensor& h) {
  if (act != nn::Act::SiLU) return nn::apply_act(act, nn::group_norm(norm, h));
  const auto& o = norm->options;
  return nn::group_norm_act(h, o.num_groups(), norm->weight, norm->bias, o.eps(), /*silu=*/true);
}

torch::nn::Conv2d conv2d(int64_t in, int64_t out, int64_t k, int64_t padding) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, k).padding(padding));
}
torch::nn::GroupNorm make_group_norm(int64_t groups, int64_t channels) {
  return torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, channels).eps(kVaeEps));
}
}  // namespace

// The decoder's activation layout: nn::to_compute_layout (channels-last for bf16/fp16), and channels-last for
// float32 too where the fused GroupNorm runs: libtorch 1.13's own channels-last GroupNorm rounds too
// differently for the 1e-5 golden tolerance (5e-5), the fused one keeps double statistics (decode error
// 6.7e-6 vs 3.6e-6 NCHW on the sd15 fixture, ~9% less CPU time: docs/performance.md). The encoder stays
// NCHW in float32. DMX_VAE_FP32_NHWC=0 turns this off.
at::Tensor decode_layout(const at::Tensor& z) {
  static const bool fp32_nhwc = [] {
    const char* e = std::getenv("DMX_VAE_FP32_NHWC");
    return !(e && std::string(e) == "0");
  }();
  if (fp32_nhwc && z.scalar_type() == at::kFloat && z.dim() == 4 && dmx::channels_last() && dmx::fused_kernels() &&
      nn::fused_kernels_available())
    return z.contiguous(at::MemoryFormat::ChannelsLast);
  return nn::to_compute_layout(z);
}

nn::BlockOptions block_options(const AutoencoderKLConfig& c, nn::Act act) {
  nn::BlockOptions o;
  o.num_layers = c.layers_per_block;
  o.temb_channels = 0;
  o.resnet_eps = kVaeEps;
  o.resnet_groups = c.norm_num_groups;
  o.act = act;
  return o;
}

EncoderImpl::EncoderImpl(const AutoencoderKLConfig& c, nn::Act act, bool double_z) : act_(act) {
  const auto& ch = c.block_out_channels;
  const int n = static_cast<int>(ch.size());
  conv_in = register_module("conv_in", conv2d(c.in_channels, ch[0], 3, 1));
  auto downs = nn::make_container(*this, "down_blocks");
  int output_channel = ch[0];
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = block_options(c, act);
    o.in_channels = output_channel;
    output_channel = ch[i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    o.downsample_padding = 0;
    down_blocks.push_back(downs->register_module(std::to_string(i), nn::DownBlock2D(o)));
  }
  nn::BlockOptions m = block_options(c, act);
  m.num_layers = 1;
  m.in_channels = m.out_channels = ch.back();
  mid_block = register_module("mid_block", nn::UNetMidBlock2D(m, c.mid_block_add_attention));
  conv_norm_out = register_module("conv_norm_out", make_group_norm(c.norm_num_groups, ch.back()));
  conv_out = register_module("conv_out", conv2d(ch.back(), (double_z ? 2 : 1) * c.latent_channels, 3, 1));
}

at::Tensor EncoderImpl::forward(const at::Tensor& x) {
  at::Tensor h = conv_in->forward(x);
  for (auto& b : down_blocks) h = b->forward(h, {}, {}).hidden_states;
  h = mid_block->forward(h);
  return conv_out->forward(norm_act(conv_norm_out, act_, h));  // [B, (1 or 2) latent, H/f, W/f]
}

DecoderImpl::DecoderImpl(const AutoencoderKLConfig& c, nn::Act act) : act_(act) {
  const auto& ch = c.block_out_channels;
  const int n = static_cast<int>(ch.size());
  conv_in = register_module("conv_in", conv2d(c.latent_channels, ch.back(), 3, 1));
  nn::BlockOptions m = block_options(c, act);
  m.num_layers = 1;
  m.in_channels = m.out_channels = ch.back();
  mid_block = register_module("mid_block", nn::UNetMidBlock2D(m, c.mid_block_add_attention));
  auto ups = nn::make_container(*this, "up_blocks");
  int output_channel = ch.back();
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = block_options(c, act);
    o.num_layers = c.layers_per_block + 1;
    o.in_channels = output_channel;
    output_channel = ch[n - 1 - i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    up_blocks.push_back(ups->register_module(std::to_string(i), nn::UpDecoderBlock2D(o)));
  }
  conv_norm_out = register_module("conv_norm_out", make_group_norm(c.norm_num_groups, ch[0]));
  conv_out = register_module("conv_out", conv2d(ch[0], c.out_channels, 3, 1));
}

at::Tensor DecoderImpl::forward(const at::Tensor& z) {
  at::Tensor h = conv_in->forward(z);
  h = mid_block->forward(h);
  h = h.to(up_blocks.front()->resnets.front()->conv1->weight.scalar_type());  // diffusers' upscale_dtype
  for (auto& b : up_blocks) h = b->forward(h);
  return conv_out->forward(norm_act(conv_norm_out, act_, h));  // [B, out, H, W]
}

double coder_parameter_count(const AutoencoderKLConfig& c, bool double_z) {
  namespace pc = nn::param_count;
  const auto& ch = c.block_out_channels;
  const int n = static_cast<int>(ch.size());
  const nn::BlockOptions base = block_options(c, nn::Act::SiLU);
  nn::BlockOptions mid = base;
  mid.num_layers = 1;
  mid.in_channels = mid.out_channels = ch.back();
  // Encoder.
  double total = pc::conv2d(c.in_channels, ch[0], 3);
  int output_channel = ch[0];
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = base;
    o.in_channels = output_channel;
    output_channel = ch[i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    total += pc::down_block(o);
  }
  total += pc::mid_block(mid, c.mid_block_add_attention) + pc::norm(ch.back()) +
           pc::conv2d(ch.back(), (double_z ? 2 : 1) * c.latent_channels, 3);
  // Decoder.
  total += pc::conv2d(c.latent_channels, ch.back(), 3) + pc::mid_block(mid, c.mid_block_add_attention);
  output_channel = ch.back();
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = base;
    o.num_layers = c.layers_per_block + 1;
    o.in_channels = output_channel;
    output_channel = ch[n - 1 - i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    total += pc::up_decoder_block(o);
  }
  return total + pc::norm(ch[0]) + pc::conv2d(ch[0], c.out_channels, 3);
}
}  // namespace dmx::models::vae
