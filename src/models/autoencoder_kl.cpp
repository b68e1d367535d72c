// AutoencoderKL (diffusers 0.27.2): Encoder (conv_in, DownEncoderBlock2D..., UNetMidBlock2D, norm/act/conv_out)
// -> quant_conv -> DiagonalGaussian; post_quant_conv -> Decoder (conv_in, UNetMidBlock2D, UpDecoderBlock2D...,
// norm/act/conv_out).
#include "models/autoencoder_kl.h"

#include <cmath>

#include "core/runtime.h"
#include "core/tensor_util.h"
#include "dmx/error.h"
#include "models/config_json.h"
#include "nn/fused_ops.h"
#include "nn/layers.h"

namespace dmx::models {

namespace {
const char* kWhat = "AutoencoderKL config";
constexpr double kVaeEps = 1e-6;  // diffusers' Encoder/Decoder fix resnet and norm eps at 1e-6

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

nn::BlockOptions vae_block_options(const AutoencoderKLConfig& c, nn::Act act) {
  nn::BlockOptions o;
  o.num_layers = c.layers_per_block;
  o.temb_channels = 0;
  o.resnet_eps = kVaeEps;
  o.resnet_groups = c.norm_num_groups;
  o.act = act;
  return o;
}

// diffusers' vae.py Encoder (double_z = true).
class EncoderImpl : public torch::nn::Module {
 public:
  EncoderImpl(const AutoencoderKLConfig& c, nn::Act act) : act_(act) {
    const auto& ch = c.block_out_channels;
    const int n = static_cast<int>(ch.size());
    conv_in = register_module("conv_in", conv2d(c.in_channels, ch[0], 3, 1));
    auto downs = nn::make_container(*this, "down_blocks");
    int output_channel = ch[0];
    for (int i = 0; i < n; ++i) {
      nn::BlockOptions o = vae_block_options(c, act);
      o.in_channels = output_channel;
      output_channel = ch[i];
      o.out_channels = output_channel;
      o.add_sampler = i != n - 1;
      o.downsample_padding = 0;
      down_blocks.push_back(downs->register_module(std::to_string(i), nn::DownBlock2D(o)));
    }
    nn::BlockOptions m = vae_block_options(c, act);
    m.num_layers = 1;
    m.in_channels = m.out_channels = ch.back();
    mid_block = register_module("mid_block", nn::UNetMidBlock2D(m, c.mid_block_add_attention));
    conv_norm_out = register_module("conv_norm_out", make_group_norm(c.norm_num_groups, ch.back()));
    conv_out = register_module("conv_out", conv2d(ch.back(), 2 * c.latent_channels, 3, 1));
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = conv_in->forward(x);
    for (auto& b : down_blocks) h = b->forward(h, {}, {}).hidden_states;
    h = mid_block->forward(h);
    return conv_out->forward(norm_act(conv_norm_out, act_, h));  // [B, 2 latent, H/f, W/f]
  }
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  std::vector<nn::DownBlock2D> down_blocks;
  nn::UNetMidBlock2D mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};

 private:
  nn::Act act_;
};
TORCH_MODULE(Encoder);

// diffusers' vae.py Decoder (norm_type "group").
class DecoderImpl : public torch::nn::Module {
 public:
  DecoderImpl(const AutoencoderKLConfig& c, nn::Act act) : act_(act) {
    const auto& ch = c.block_out_channels;
    const int n = static_cast<int>(ch.size());
    conv_in = register_module("conv_in", conv2d(c.latent_channels, ch.back(), 3, 1));
    nn::BlockOptions m = vae_block_options(c, act);
    m.num_layers = 1;
    m.in_channels = m.out_channels = ch.back();
    mid_block = register_module("mid_block", nn::UNetMidBlock2D(m, c.mid_block_add_attention));
    auto ups = nn::make_container(*this, "up_blocks");
    int output_channel = ch.back();
    for (int i = 0; i < n; ++i) {
      nn::BlockOptions o = vae_block_options(c, act);
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
  at::Tensor forward(const at::Tensor& z) {
    at::Tensor h = conv_in->forward(z);
    h = mid_block->forward(h);
    h = h.to(up_blocks.front()->resnets.front()->conv1->weight.scalar_type());  // diffusers' upscale_dtype
    for (auto& b : up_blocks) h = b->forward(h);
    return conv_out->forward(norm_act(conv_norm_out, act_, h));  // [B, out, H, W]
  }
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  nn::UNetMidBlock2D mid_block{nullptr};
  std::vector<nn::UpDecoderBlock2D> up_blocks;
  torch::nn::GroupNorm conv_norm_out{nullptr};

 private:
  nn::Act act_;
};
TORCH_MODULE(Decoder);
}  // namespace

// ---------------------------------------------------------------------------------------------------
AutoencoderKLConfig AutoencoderKLConfig::sd15() {
  // runwayml/stable-diffusion-v1-5 vae/config.json: block_out_channels [128, 256, 512, 512], layers_per_block 2,
  // latent_channels 4, norm_num_groups 32, sample_size 512, scaling_factor 0.18215.
  return AutoencoderKLConfig{};
}

AutoencoderKLConfig AutoencoderKLConfig::sd21() {
  // stabilityai/stable-diffusion-2-1 vae/config.json: as SD 1.5 with sample_size 768.
  AutoencoderKLConfig c;
  c.sample_size = 768;
  return c;
}

void AutoencoderKLConfig::validate() const {
  const size_t n = down_block_types.size();
  DMX_CHECK_ARG(n >= 1, "down_block_types must not be empty");
  DMX_CHECK_ARG(block_out_channels.size() == n, "block_out_channels must have one entry per down block (", n, "), got ",
                block_out_channels.size());
  DMX_CHECK_ARG(up_block_types.size() == n, "up_block_types must have one entry per down block (", n, "), got ",
                up_block_types.size());
  for (const auto& t : down_block_types)
    DMX_CHECK_SUPPORTED(t == "DownEncoderBlock2D", "down_block_types: unsupported block type '", t,
                        "' (supported: DownEncoderBlock2D)");
  for (const auto& t : up_block_types)
    DMX_CHECK_SUPPORTED(t == "UpDecoderBlock2D", "up_block_types: unsupported block type '", t,
                        "' (supported: UpDecoderBlock2D)");
  nn::parse_act(act_fn, "act_fn");
  // Ranges (docs/limits.md).
  using cfgjson::check_range;
  check_range("number of down blocks", static_cast<int64_t>(n), 1, 8);
  check_range("in_channels", in_channels, 1, 64);
  check_range("out_channels", out_channels, 1, 64);
  check_range("latent_channels", latent_channels, 1, 64);
  check_range("layers_per_block", layers_per_block, 1, 16);
  check_range("norm_num_groups", norm_num_groups, 1, 8192);
  check_range("sample_size", sample_size, 1, 16384);
  DMX_CHECK_ARG(std::isfinite(scaling_factor) && scaling_factor > 0, "scaling_factor must be > 0, got ",
                scaling_factor);
  for (size_t i = 0; i < n; ++i) {
    check_range("block_out_channels[" + std::to_string(i) + "]", block_out_channels[i], 1, 8192);
    DMX_CHECK_ARG(block_out_channels[i] % norm_num_groups == 0, "block_out_channels[", i, "] (", block_out_channels[i],
                  ") must be divisible by norm_num_groups (", norm_num_groups, ")");
  }
  cfgjson::check_parameter_count("the VAE config", parameter_count());
}

double AutoencoderKLConfig::parameter_count() const {
  namespace pc = nn::param_count;
  const auto& ch = block_out_channels;
  const int n = static_cast<int>(ch.size());
  const nn::BlockOptions base = vae_block_options(*this, nn::Act::SiLU);
  nn::BlockOptions mid = base;
  mid.num_layers = 1;
  mid.in_channels = mid.out_channels = ch.back();
  // Encoder.
  double total = pc::conv2d(in_channels, ch[0], 3);
  int output_channel = ch[0];
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = base;
    o.in_channels = output_channel;
    output_channel = ch[i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    total += pc::down_block(o);
  }
  total +=
      pc::mid_block(mid, mid_block_add_attention) + pc::norm(ch.back()) + pc::conv2d(ch.back(), 2 * latent_channels, 3);
  // Decoder.
  total += pc::conv2d(latent_channels, ch.back(), 3) + pc::mid_block(mid, mid_block_add_attention);
  output_channel = ch.back();
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = base;
    o.num_layers = layers_per_block + 1;
    o.in_channels = output_channel;
    output_channel = ch[n - 1 - i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    total += pc::up_decoder_block(o);
  }
  total += pc::norm(ch[0]) + pc::conv2d(ch[0], out_channels, 3);
  // quant_conv, post_quant_conv.
  return total + pc::conv2d(2 * latent_channels, 2 * latent_channels, 1) +
         pc::conv2d(latent_channels, latent_channels, 1);
}

AutoencoderKLConfig AutoencoderKLConfig::from_json(const nlohmann::json& j) {
  using cfgjson::get;
  DMX_CHECK_FORMAT(j.is_object(), kWhat, ": expected a JSON object, got ", j.type_name());
  AutoencoderKLConfig c;
  get(j, kWhat, "in_channels", c.in_channels);
  get(j, kWhat, "out_channels", c.out_channels);
  get(j, kWhat, "down_block_types", c.down_block_types);
  get(j, kWhat, "up_block_types", c.up_block_types);
  get(j, kWhat, "block_out_channels", c.block_out_channels);
  get(j, kWhat, "layers_per_block", c.layers_per_block);
  get(j, kWhat, "act_fn", c.act_fn);
  get(j, kWhat, "latent_channels", c.latent_channels);
  get(j, kWhat, "norm_num_groups", c.norm_num_groups);
  get(j, kWhat, "sample_size", c.sample_size);
  get(j, kWhat, "scaling_factor", c.scaling_factor);
  get(j, kWhat, "mid_block_add_attention", c.mid_block_add_attention);
  // Newer / other-model options dmx does not implement.
  cfgjson::require_default(j, kWhat, "latents_mean", nullptr);
  cfgjson::require_default(j, kWhat, "latents_std", nullptr);
  cfgjson::require_default(j, kWhat, "shift_factor", nullptr);
  cfgjson::require_default(j, kWhat, "use_quant_conv", true);
  cfgjson::require_default(j, kWhat, "use_post_quant_conv", true);
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(std::string(kWhat) + ": " + e.what());
  }
  return c;
}

// ---------------------------------------------------------------------------------------------------
at::Tensor DiagonalGaussian::sample(at::Generator* gen) const {
  at::Tensor noise = gen ? at::randn(mean.sizes(), *gen, mean.options()) : at::randn(mean.sizes(), mean.options());
  return sample_with(noise);
}

struct AutoencoderKLImpl::Parts {
  Encoder encoder{nullptr};
  Decoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};
};

AutoencoderKLImpl::AutoencoderKLImpl(const AutoencoderKLConfig& cfg) : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  const nn::Act act = nn::parse_act(cfg_.act_fn, "act_fn");
  Parts& p = *parts_;
  p.encoder = register_module("encoder", Encoder(cfg_, act));
  p.decoder = register_module("decoder", Decoder(cfg_, act));
  p.quant_conv = register_module("quant_conv", conv2d(2 * cfg_.latent_channels, 2 * cfg_.latent_channels, 1, 0));
  p.post_quant_conv = register_module("post_quant_conv", conv2d(cfg_.latent_channels, cfg_.latent_channels, 1, 0));
}

DiagonalGaussian AutoencoderKLImpl::encode(const at::Tensor& x) {
  DMX_CHECK_ARG(x.defined() && x.dim() == 4 && x.size(1) == cfg_.in_channels, "VAE encode input must be [B, ",
                cfg_.in_channels, ", H, W], got ", shape_string(x));
  at::Tensor moments = parts_->quant_conv->forward(parts_->encoder->forward(nn::to_compute_layout(x)))
                           .contiguous();  // [B, 2 latent, H/f, W/f]
  auto mv = moments.chunk(2, 1);
  DiagonalGaussian d;
  d.mean = mv[0];
  d.logvar = at::clamp(mv[1], -30.0, 20.0);
  d.std = at::exp(d.logvar * 0.5);
  return d;
}

at::Tensor AutoencoderKLImpl::decode(const at::Tensor& z) {
  DMX_CHECK_ARG(z.defined() && z.dim() == 4 && z.size(1) == cfg_.latent_channels, "VAE decode input must be [B, ",
                cfg_.latent_channels, ", h, w], got ", shape_string(z));
  return parts_->decoder->forward(parts_->post_quant_conv->forward(decode_layout(z))).contiguous();
}
}  // namespace dmx::models
