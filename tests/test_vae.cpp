// AutoencoderKL: golden encode / sample / decode against diffusers 0.27.2 (ref/<variant>/vae), config parsing,
// strict loading, seeded sampling, bf16. Suites: VAEConfigUnit, VAETiny (tiny random models), VAEGolden (fixtures).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "test_util.h"
#include "tiny_models.h"

using namespace dmx;
using dmx::models::AutoencoderKL;
using dmx::models::AutoencoderKLConfig;

namespace {
constexpr double kTol = 1e-5;
constexpr double kBf16Tol = 6e-2;  // see VAEGolden.BFloat16StaysCloseToFloat32

nlohmann::json vae_config_json(const std::string& variant) {
  return nlohmann::json::parse(
      read_text_file(test::fixture_model(variant) + "/vae/config.json", "vae config", dmx::kMaxJsonFileBytes));
}
std::string vae_weights(const std::string& variant) {
  return test::fixture_model(variant) + "/vae/diffusion_pytorch_model.safetensors";
}
AutoencoderKL load_vae(const std::string& variant) {
  AutoencoderKL m(AutoencoderKLConfig::from_json(vae_config_json(variant)));
  io::load_state_dict(*m, io::load_safetensors(vae_weights(variant)), "vae");
  m->eval();
  return m;
}

// The same architectures with seeded random weights (tests/tiny_models.h).
nlohmann::json tiny_vae_config_json(const std::string& variant) {
  return nlohmann::json::parse(
      read_text_file(test::tiny_config_dir(variant) + "/vae/config.json", "vae config", kMaxJsonFileBytes));
}
std::string tiny_vae_weights(const std::string& variant) {
  return test::tiny_model_dir(variant) + "/vae/diffusion_pytorch_model.safetensors";
}
AutoencoderKL load_tiny_vae(const std::string& variant) {
  AutoencoderKL m(AutoencoderKLConfig::from_json(tiny_vae_config_json(variant)));
  io::load_state_dict(*m, io::load_safetensors(tiny_vae_weights(variant)), "vae");
  m->eval();
  return m;
}

template <typename E>
void expect_throw_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception mentioning '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(VAEConfigUnit, PresetsAndFromJson) {
  auto a = AutoencoderKLConfig::sd15();
  EXPECT_EQ(a.block_out_channels, (std::vector<int>{128, 256, 512, 512}));
  EXPECT_EQ(a.downscale_factor(), 8);
  EXPECT_NO_THROW(a.validate());
  EXPECT_EQ(AutoencoderKLConfig::sd21().sample_size, 768);
  auto c = AutoencoderKLConfig::from_json({{"block_out_channels", {32, 64}},
                                           {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
                                           {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
                                           {"norm_num_groups", 8},
                                           {"layers_per_block", 1},
                                           {"force_upcast", true},
                                           {"latents_mean", nullptr}});
  EXPECT_EQ(c.downscale_factor(), 2);
  EXPECT_EQ(c.norm_num_groups, 8);
}

TEST(VAEConfigUnit, FromJsonRejectsUnsupportedAndInvalid) {
  expect_throw_with<Unsupported>(
      [] {
        AutoencoderKLConfig::from_json(
            {{"down_block_types",
              {"DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"}}});
      },
      "AttnDownEncoderBlock2D");
  expect_throw_with<FormatError>(
      [] {
        AutoencoderKLConfig::from_json({{"norm_num_groups", 48}});
      },
      "block_out_channels[0] (128) must be divisible by norm_num_groups (48)");
  expect_throw_with<FormatError>(
      [] {
        AutoencoderKLConfig::from_json({{"latent_channels", -4}});
      },
      "latent_channels must be in [1, 64], got -4");
  expect_throw_with<FormatError>(
      [] {
        AutoencoderKLConfig::from_json({{"layers_per_block", "2"}});
      },
      "layers_per_block");
  expect_throw_with<Unsupported>(
      [] {
        AutoencoderKLConfig::from_json({{"latents_mean", {0.1, 0.2, 0.3, 0.4}}});
      },
      "latents_mean");
}

TEST(VAETiny, StrictLoadRejectsMissingUnexpectedAndMisShapedKeys) {
  AutoencoderKL m(AutoencoderKLConfig::from_json(tiny_vae_config_json("test")));
  const io::TensorMap good = io::load_safetensors(tiny_vae_weights("test"));
  io::LoadReport r = io::load_state_dict(*m, good, "vae");
  EXPECT_EQ(r.loaded, good.size());

  io::TensorMap bad = good;
  bad.erase("decoder.mid_block.attentions.0.group_norm.weight");
  bad["encoder.mid_block.attentions.0.query.weight"] = at::zeros({64, 64});  // pre-0.14 attention name
  bad["post_quant_conv.weight"] = at::zeros({4, 4, 3, 3});
  try {
    io::load_state_dict(*m, bad, "vae");
    ADD_FAILURE() << "expected FormatError";
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("1 missing, 1 unexpected, 1 mis-shaped"), std::string::npos) << msg;
    EXPECT_NE(msg.find("decoder.mid_block.attentions.0.group_norm.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("encoder.mid_block.attentions.0.query.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("post_quant_conv.weight: file [4, 4, 3, 3] vs model [4, 4, 1, 1]"), std::string::npos) << msg;
  }
}

TEST(VAETiny, SeededSampleDrawsRandnLikeDiffusers) {
  at::NoGradGuard no_grad;
  auto m = load_tiny_vae("test");
  at::manual_seed(0);
  auto d = m->encode(at::rand({1, 3, 16, 24}) * 2 - 1);
  EXPECT_EQ(d.mean.sizes(), (at::IntArrayRef{1, 4, 8, 12}));  // non-square works
  at::Generator g1 = at::make_generator<at::CPUGeneratorImpl>(1234);
  at::Generator g2 = at::make_generator<at::CPUGeneratorImpl>(1234);
  at::Tensor s = d.sample(&g1);
  at::Tensor noise = at::randn(d.mean.sizes(), g2, at::kFloat);
  EXPECT_TRUE(at::equal(s, d.mean + d.std * noise));
  at::Tensor img = m->decode(s);
  EXPECT_EQ(img.sizes(), (at::IntArrayRef{1, 3, 16, 24}));
}

TEST(VAETiny, RejectsBadInputs) {
  auto m = load_tiny_vae("test");
  expect_throw_with<InvalidArgument>([&] { m->encode(at::zeros({1, 4, 8, 8})); }, "VAE encode input must be [B, 3");
  expect_throw_with<InvalidArgument>([&] { m->decode(at::zeros({1, 3, 8, 8})); }, "VAE decode input must be [B, 4");
}

// ------------------------------------------------------------------------------------------------------
class VAEGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(VAEGolden, EncodeSampleDecodeMatchDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  auto m = load_vae(variant);
  const test::RefCase ref = test::load_ref(variant, "vae");
  EXPECT_DOUBLE_EQ(m->config().scaling_factor, ref.meta.at("scaling_factor").get<double>());
  auto d = m->encode(ref["input.x"]);
  DMX_EXPECT_CLOSE(variant + " encode.mean", d.mean, ref["encode.mean"], kTol);
  DMX_EXPECT_CLOSE(variant + " encode.logvar", d.logvar, ref["encode.logvar"], kTol);
  DMX_EXPECT_CLOSE(variant + " encode.std", d.std, ref["encode.std"], kTol);
  DMX_EXPECT_CLOSE(variant + " encode.sample", d.sample_with(ref["encode.noise"]), ref["encode.sample"], kTol);
  DMX_EXPECT_CLOSE(variant + " decode.out", m->decode(ref["decode.z"]), ref["decode.out"], kTol);
  DMX_EXPECT_CLOSE(variant + " decode_of_mean.out", m->decode(ref["encode.mean"]), ref["decode_of_mean.out"], kTol);
}

// bf16 inference (module and input in bf16) against the float32 reference. Measured worst relative error
// (GroupNorm statistics in float32): sd15 encode.mean 3.2e-2, decode.out 4.2e-2; test 1.4e-2 / 1.3e-2. Rounding
// the weights alone to bf16 (compute in float32) already gives 1.3e-2 / 1.9e-2 on sd15's 128x128 random VAE.
TEST_P(VAEGolden, BFloat16StaysCloseToFloat32) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  auto m = load_vae(variant);
  m->to(at::kBFloat16);
  const test::RefCase ref = test::load_ref(variant, "vae");
  auto d = m->encode(ref["input.x"].to(at::kBFloat16));
  EXPECT_LE(test::check_close(variant + " bf16 encode.mean", d.mean.to(at::kFloat), ref["encode.mean"], kBf16Tol),
            kBf16Tol);
  at::Tensor img = m->decode(ref["decode.z"].to(at::kBFloat16));
  EXPECT_LE(test::check_close(variant + " bf16 decode.out", img.to(at::kFloat), ref["decode.out"], kBf16Tol), kBf16Tol);
}

INSTANTIATE_TEST_SUITE_P(Variants, VAEGolden, ::testing::Values("sd15", "test"));
