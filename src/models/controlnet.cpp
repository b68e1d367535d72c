// ControlNetModel (diffusers 0.27.2, models/controlnet.py): conv_in + hint embedding, the UNet's down and
// mid blocks, 1x1 zero convolutions on every skip and on the mid-block output, then conditioning scale
// (or guess mode's logspace ramp).
#include "models/controlnet.h"

#include <cmath>

#include <ATen/ATen.h>

#include "dmx/error.h"
#include "models/config_json.h"
#include "models/unet_encoder.h"
#include "nn/layers.h"

namespace dmx::models {

namespace {
const char* kWhat = "ControlNetModel config";

}  // namespace

std::vector<int> ControlNetConfig::heads_per_block() const {
  return num_attention_heads.empty() ? attention_head_dim : num_attention_heads;
}

size_t ControlNetConfig::num_down_residuals() const {
  const size_t n = block_out_channels.size();
  return 1 + n * static_cast<size_t>(layers_per_block) + (n - 1);
}

void ControlNetConfig::validate() const {
  check_encoder_config(*this, num_attention_heads.empty() ? "attention_head_dim" : "num_attention_heads");
  // The ControlNet's own fields (docs/limits.md).
  using cfgjson::check_range;
  check_range("conditioning_channels", conditioning_channels, 1, 64);
  check_range("number of conditioning_embedding_out_channels",
              static_cast<int64_t>(conditioning_embedding_out_channels.size()), 1, 8);
  DMX_CHECK_ARG(controlnet_conditioning_channel_order == "rgb" || controlnet_conditioning_channel_order == "bgr",
                "controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got '",
                controlnet_conditioning_channel_order, "'");
  for (size_t i = 0; i < conditioning_embedding_out_channels.size(); ++i)
    check_range("conditioning_embedding_out_channels[" + std::to_string(i) + "]",
                conditioning_embedding_out_channels[i], 1, 8192);
  cfgjson::check_parameter_count("the ControlNet config", parameter_count());
}

double ControlNetConfig::parameter_count() const {
  namespace pc = nn::param_count;
  const auto& ch = block_out_channels;
  const int n = static_cast<int>(ch.size());
  const std::vector<int> heads = heads_per_block();
  const auto& ce = conditioning_embedding_out_channels;
  double total = pc::conv2d(in_channels, ch[0], 3) + pc::timestep_embedding(ch[0], time_embed_dim());
  total += pc::conv2d(conditioning_channels, ce[0], 3) + pc::conv2d(ce.back(), ch[0], 3);
  for (size_t i = 0; i + 1 < ce.size(); ++i) total += pc::conv2d(ce[i], ce[i], 3) + pc::conv2d(ce[i], ce[i + 1], 3);
  total += pc::conv2d(ch[0], ch[0], 1);  // the first zero convolution
  int output_channel = ch[0];
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = unet_block_options(*this, heads[i], nn::Act::SiLU, static_cast<size_t>(i));
    o.in_channels = output_channel;
    output_channel = ch[i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    o.cross_attention = down_block_types[i] == "CrossAttnDownBlock2D";
    total +=
        pc::down_block(o) + (layers_per_block + (i != n - 1 ? 1 : 0)) * pc::conv2d(output_channel, output_channel, 1);
  }
  nn::BlockOptions mid = unet_block_options(*this, heads.back(), nn::Act::SiLU, static_cast<size_t>(n - 1));
  mid.num_layers = 1;
  mid.in_channels = mid.out_channels = ch.back();
  mid.transformer.only_cross_attention = false;
  return total + pc::mid_block_cross_attn(mid) + pc::conv2d(ch.back(), ch.back(), 1);
}

ControlNetConfig ControlNetConfig::from_json(const nlohmann::json& j) {
  using cfgjson::get;
  DMX_CHECK_FORMAT(j.is_object(), kWhat, ": expected a JSON object, got ", j.type_name());
  ControlNetConfig c;
  get(j, kWhat, "in_channels", c.in_channels);
  get(j, kWhat, "conditioning_channels", c.conditioning_channels);
  get(j, kWhat, "flip_sin_to_cos", c.flip_sin_to_cos);
  get(j, kWhat, "freq_shift", c.freq_shift);
  get(j, kWhat, "down_block_types", c.down_block_types);
  get(j, kWhat, "block_out_channels", c.block_out_channels);
  const size_t n = c.down_block_types.size();
  if (j.contains("only_cross_attention") && j.at("only_cross_attention").is_array()) {
    std::vector<bool> v;
    get(j, kWhat, "only_cross_attention", v);
    for (bool b : v)
      if (b != v.front()) throw Unsupported(std::string(kWhat) + ": per-block only_cross_attention is not supported");
    c.only_cross_attention = !v.empty() && v.front();
  } else {
    get(j, kWhat, "only_cross_attention", c.only_cross_attention);
  }
  get_uniform_int(j, kWhat, "layers_per_block", n, c.layers_per_block);
  get(j, kWhat, "downsample_padding", c.downsample_padding);
  get(j, kWhat, "mid_block_scale_factor", c.mid_block_scale_factor);
  get(j, kWhat, "act_fn", c.act_fn);
  get(j, kWhat, "norm_num_groups", c.norm_num_groups);
  get(j, kWhat, "norm_eps", c.norm_eps);
  get_uniform_int(j, kWhat, "cross_attention_dim", n, c.cross_attention_dim);
  get_uniform_int(j, kWhat, "transformer_layers_per_block", n, c.transformer_layers_per_block);
  cfgjson::get_int_or_list(j, kWhat, "attention_head_dim", n, c.attention_head_dim);
  cfgjson::get_int_or_list(j, kWhat, "num_attention_heads", n, c.num_attention_heads);
  get(j, kWhat, "use_linear_projection", c.use_linear_projection);
  get(j, kWhat, "upcast_attention", c.upcast_attention);
  get(j, kWhat, "controlnet_conditioning_channel_order", c.controlnet_conditioning_channel_order);
  get(j, kWhat, "conditioning_embedding_out_channels", c.conditioning_embedding_out_channels);
  get(j, kWhat, "global_pool_conditions", c.global_pool_conditions);
  for (const char* key : {"class_embed_type", "addition_embed_type", "addition_time_embed_dim", "encoder_hid_dim",
                          "encoder_hid_dim_type", "num_class_embeds", "projection_class_embeddings_input_dim"})
    cfgjson::require_default(j, kWhat, key, nullptr);
  cfgjson::require_default(j, kWhat, "mid_block_type", "UNetMidBlock2DCrossAttn");
  cfgjson::require_default(j, kWhat, "resnet_time_scale_shift", "default");
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(std::string(kWhat) + ": " + e.what());
  }
  return c;
}

// ---------------------------------------------------------------------------------------------------
// ControlNetConditioningEmbedding: conv_in, (conv, strided conv) per channel step, conv_out (zero conv).
class ControlNetConditioningEmbeddingImpl : public torch::nn::Module {
 public:
  ControlNetConditioningEmbeddingImpl(int64_t embedding_channels, int64_t conditioning_channels,
                                      const std::vector<int>& ch) {
    using torch::nn::Conv2d;
    using torch::nn::Conv2dOptions;
    conv_in = register_module("conv_in", Conv2d(Conv2dOptions(conditioning_channels, ch[0], 3).padding(1)));
    auto blocks_c = nn::make_container(*this, "blocks");
    for (size_t i = 0; i + 1 < ch.size(); ++i) {
      blocks.push_back(
          blocks_c->register_module(std::to_string(blocks.size()), Conv2d(Conv2dOptions(ch[i], ch[i], 3).padding(1))));
      blocks.push_back(blocks_c->register_module(std::to_string(blocks.size()),
                                                 Conv2d(Conv2dOptions(ch[i], ch[i + 1], 3).padding(1).stride(2))));
    }
    conv_out = register_module("conv_out", Conv2d(Conv2dOptions(ch.back(), embedding_channels, 3).padding(1)));
  }
  at::Tensor forward(const at::Tensor& cond) {  // [B, 3, H, W] -> [B, C0, H / 2^k, W / 2^k]
    at::Tensor e = at::silu(conv_in->forward(cond));
    for (auto& b : blocks) e = at::silu(b->forward(e));
    return conv_out->forward(e);
  }
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  std::vector<torch::nn::Conv2d> blocks;
};
TORCH_MODULE(ControlNetConditioningEmbedding);

struct ControlNetModelImpl::Parts {
  torch::nn::Conv2d conv_in{nullptr};
  nn::TimestepEmbedding time_embedding{nullptr};
  ControlNetConditioningEmbedding cond_embedding{nullptr};
  std::vector<nn::DownBlock2D> down_blocks;
  std::vector<torch::nn::Conv2d> controlnet_down_blocks;
  nn::UNetMidBlock2DCrossAttn mid_block{nullptr};
  torch::nn::Conv2d controlnet_mid_block{nullptr};
  nn::Act act = nn::Act::SiLU;
};

ControlNetModelImpl::ControlNetModelImpl(const ControlNetConfig& cfg) : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  Parts& p = *parts_;
  using torch::nn::Conv2d;
  using torch::nn::Conv2dOptions;
  const auto& ch = cfg_.block_out_channels;
  const int n = static_cast<int>(ch.size());
  p.act = nn::parse_act(cfg_.act_fn, "act_fn");

  p.conv_in = register_module("conv_in", Conv2d(Conv2dOptions(cfg_.in_channels, ch[0], 3).padding(1)));
  p.time_embedding = register_module("time_embedding", nn::TimestepEmbedding(ch[0], cfg_.time_embed_dim(), p.act));
  p.cond_embedding = register_module(
      "controlnet_cond_embedding",
      ControlNetConditioningEmbedding(ch[0], cfg_.conditioning_channels, cfg_.conditioning_embedding_out_channels));

  // The UNet's encoder, with a 1x1 zero convolution on every skip connection (created in diffusers' order).
  std::shared_ptr<torch::nn::Module> zero_convs;
  auto add_zero_conv = [&](int64_t c) {
    p.controlnet_down_blocks.push_back(
        zero_convs->register_module(std::to_string(p.controlnet_down_blocks.size()), Conv2d(Conv2dOptions(c, c, 1))));
  };
  p.down_blocks = build_down_blocks(
      *this, cfg_, p.act,
      [&] {
        zero_convs = nn::make_container(*this, "controlnet_down_blocks");
        add_zero_conv(ch[0]);
      },
      [&](int i, int output_channel) {
        for (int j = 0; j < cfg_.layers_per_block; ++j) add_zero_conv(output_channel);
        if (i != n - 1) add_zero_conv(output_channel);
      });
  p.mid_block = build_mid_block(*this, cfg_, p.act);
  p.controlnet_mid_block = register_module("controlnet_mid_block", Conv2d(Conv2dOptions(ch.back(), ch.back(), 1)));
}

at::Tensor guess_mode_scales(int64_t n, double conditioning_scale) {
  // torch.logspace(-1, 0, n) (float32, 0.1 .. 1.0) * conditioning_scale, as diffusers computes it.
  return at::logspace(-1, 0, n, 10.0, at::TensorOptions().dtype(at::kFloat)) * conditioning_scale;
}

ControlNetOutput ControlNetModelImpl::forward(const ControlNetInputs& in) {
  Parts& p = *parts_;
  const at::Tensor& ctx = in.encoder_hidden_states;
  DMX_CHECK_ARG(in.sample.defined() && in.sample.dim() == 4 && in.sample.size(1) == cfg_.in_channels,
                "ControlNet sample must be [B, ", cfg_.in_channels, ", h, w], got ", shape_string(in.sample));
  const int64_t B = in.sample.size(0);
  DMX_CHECK_ARG(ctx.defined() && ctx.dim() == 3 && ctx.size(0) == B && ctx.size(2) == cfg_.cross_attention_dim,
                "ControlNet encoder_hidden_states must be [", B, ", N, ", cfg_.cross_attention_dim, "], got ",
                shape_string(ctx));
  DMX_CHECK_ARG(in.controlnet_cond.defined() && in.controlnet_cond.dim() == 4 && in.controlnet_cond.size(0) == B &&
                    in.controlnet_cond.size(1) == cfg_.conditioning_channels,
                "controlnet_cond must be [", B, ", ", cfg_.conditioning_channels, ", H, W], got ",
                shape_string(in.controlnet_cond));
  const at::Tensor t = batch_timesteps(in.timestep, B);  // [B]

  at::Tensor cond = in.controlnet_cond;
  if (cfg_.controlnet_conditioning_channel_order == "bgr") cond = at::flip(cond, {1});

  // 1. time
  const at::Tensor t_emb = timestep_features(cfg_, t, in.sample.scalar_type());  // [B, C0]
  at::Tensor emb = p.time_embedding->forward(t_emb);                             // [B, 4 C0]

  // 2. pre-process: latent features + hint embedding
  at::Tensor h = p.conv_in->forward(in.sample);  // [B, C0, h, w]
  at::Tensor ce = p.cond_embedding->forward(cond.to(in.sample.scalar_type()));
  record(in.recorder, "cond_embedding", ce);
  DMX_CHECK_ARG(ce.sizes().equals(h.sizes()), "controlnet_cond of ", shape_string(in.controlnet_cond), " embeds to ",
                shape_string(ce), ", which does not match the latent features ", shape_string(h),
                " (the control image must be the output size: latent size x 8)");
  h = h + ce;

  const bool ckpt = gradient_checkpointing_ && at::GradMode::is_enabled();

  // 3. down
  std::vector<at::Tensor> res{h};
  h = run_down_blocks(p.down_blocks, h, emb, ctx, ckpt, res);
  // 4. mid
  h = run_mid_block(p.mid_block, h, emb, ctx, ckpt);

  // 5. zero convs
  ControlNetOutput out;
  for (size_t i = 0; i < res.size(); ++i)
    out.down_block_res_samples.push_back(p.controlnet_down_blocks[i]->forward(res[i]));
  out.mid_block_res_sample = p.controlnet_mid_block->forward(h);

  // 6. scaling
  if (in.guess_mode && !cfg_.global_pool_conditions) {
    at::Tensor scales =
        guess_mode_scales(static_cast<int64_t>(res.size()) + 1, in.conditioning_scale).to(h.device(), h.scalar_type());
    for (size_t i = 0; i < res.size(); ++i)
      out.down_block_res_samples[i] = out.down_block_res_samples[i] * scales[static_cast<int64_t>(i)];
    out.mid_block_res_sample = out.mid_block_res_sample * scales[-1];
  } else {
    for (auto& d : out.down_block_res_samples) d = d * in.conditioning_scale;
    out.mid_block_res_sample = out.mid_block_res_sample * in.conditioning_scale;
  }
  if (cfg_.global_pool_conditions) {
    for (auto& d : out.down_block_res_samples) d = at::mean(d, {2, 3}, /*keepdim=*/true);
    out.mid_block_res_sample = at::mean(out.mid_block_res_sample, {2, 3}, /*keepdim=*/true);
  }
  return out;
}

void check_controlnet_matches_unet(const ControlNetConfig& cn, const UNet2DConditionConfig& unet,
                                   const std::string& what) {
  DMX_CHECK_ARG(cn.cross_attention_dim == unet.cross_attention_dim, what, ": ControlNet cross_attention_dim ",
                cn.cross_attention_dim, " does not match the base UNet's cross_attention_dim ",
                unet.cross_attention_dim, " (a ControlNet for another model family?)");
  auto list = [](const std::vector<int>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
  };
  DMX_CHECK_ARG(cn.block_out_channels == unet.block_out_channels, what, ": ControlNet block_out_channels ",
                list(cn.block_out_channels), " do not match the base UNet's block_out_channels ",
                list(unet.block_out_channels));
  DMX_CHECK_ARG(cn.layers_per_block == unet.layers_per_block, what, ": ControlNet layers_per_block ",
                cn.layers_per_block, " does not match the base UNet's layers_per_block ", unet.layers_per_block);
  DMX_CHECK_ARG(cn.in_channels == unet.in_channels, what, ": ControlNet in_channels ", cn.in_channels,
                " does not match the base UNet's in_channels ", unet.in_channels);
}
}  // namespace dmx::models
