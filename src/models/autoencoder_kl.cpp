// AutoencoderKL (diffusers 0.27.2): Encoder (conv_in, DownEncoderBlock2D..., UNetMidBlock2D, norm/act/conv_out)
// -> quant_conv -> DiagonalGaussian; post_quant_conv -> Decoder (conv_in, UNetMidBlock2D, UpDecoderBlock2D...,
// norm/act/conv_out).
#include "models/autoencoder_kl.h"

#include <cmath>

#include "core/tensor_util.h"
#include "dmx/error.h"
#include "models/config_json.h"
#include "models/vae_coders.h"

namespace dmx::models {

namespace {
const char* kWhat = "AutoencoderKL config";
using vae::Decoder;
using vae::Encoder;
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
  // The coders, quant_conv and post_quant_conv.
  return vae::coder_parameter_count(*this, /*double_z=*/true) +
         pc::conv2d(2 * latent_channels, 2 * latent_channels, 1) + pc::conv2d(latent_channels, latent_channels, 1);
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
  p.encoder = register_module("encoder", Encoder(cfg_, act, /*double_z=*/true));
  p.decoder = register_module("decoder", Decoder(cfg_, act));
  p.quant_conv = register_module(
      "quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * cfg_.latent_channels, 2 * cfg_.latent_channels, 1)));
  p.post_quant_conv = register_module(
      "post_quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(cfg_.latent_channels, cfg_.latent_channels, 1)));
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
  return parts_->decoder->forward(parts_->post_quant_conv->forward(vae::decode_layout(z))).contiguous();
}
}  // namespace dmx::models
