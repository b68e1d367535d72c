// ControlNet training pieces: a fresh ControlNet from a UNet (diffusers' ControlNetModel.from_unet) leaves the
// UNet output exactly unchanged; saved diffusers folders and original single files load back with the existing
// strict loaders (on tiny random models); the control_model.* inverse tables round-trip on the fixture files.
// Suites: ControlNetInitTiny, ControlNetTablesGolden.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/fs.h"
#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "pipelines/controlnet.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/controlnet_init.h"

namespace fs = std::filesystem;
using namespace dmx;

namespace {

std::shared_ptr<loaders::StableDiffusionModels> load_model(const std::string& variant) {
  return test::shared_tiny_model(variant);
}

io::TensorMap params_of(torch::nn::Module& m) {
  io::TensorMap out;
  for (const auto& p : m.named_parameters(true)) out.emplace(p.key(), p.value().detach());
  return out;
}

void expect_same_weights(const io::TensorMap& a, const io::TensorMap& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    ASSERT_NE(it, b.end()) << what << ": missing " << k;
    EXPECT_TRUE(at::equal(v, it->second)) << what << ": " << k << " differs";
  }
}
}  // namespace

class ControlNetInitTiny : public ::testing::TestWithParam<std::string> {};

TEST_P(ControlNetInitTiny, FreshControlNetLeavesUNetOutputUnchanged) {
  auto m = load_model(GetParam());
  models::ControlNetModel cn = training::controlnet_from_unet(m->unet);
  const auto& uc = m->unet->config();
  // The encoder is a copy of the UNet's.
  const io::TensorMap up = params_of(*m->unet), cp = params_of(*cn);
  size_t copied = 0;
  for (const auto& [k, v] : cp) {
    if (k.rfind("conv_in.", 0) == 0 || k.rfind("time_embedding.", 0) == 0 || k.rfind("down_blocks.", 0) == 0 ||
        k.rfind("mid_block.", 0) == 0) {
      ASSERT_TRUE(up.count(k)) << k;
      EXPECT_TRUE(at::equal(v, up.at(k))) << k;
      ++copied;
    } else if (k.rfind("controlnet_down_blocks.", 0) == 0 || k.rfind("controlnet_mid_block.", 0) == 0 ||
               k.rfind("controlnet_cond_embedding.conv_out.", 0) == 0) {
      EXPECT_EQ(v.abs().max().item<float>(), 0.0f) << k << " must be zero-initialised";
    } else {
      EXPECT_GT(v.abs().max().item<float>(), 0.0f) << k << " keeps its fresh initialisation";
    }
  }
  EXPECT_GT(copied, 10u);
  EXPECT_EQ(cn->config().conditioning_embedding_out_channels, (std::vector<int>{16, 32, 96, 256}));

  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(3);
  const int64_t h = 16;
  const at::Tensor latents = at::randn({2, uc.in_channels, h, h}, g);
  const at::Tensor text = at::randn({2, 7, uc.cross_attention_dim}, g);
  const at::Tensor cond = at::rand({2, 3, h * 8, h * 8}, g);
  const at::Tensor t = at::tensor({999, 10}, at::kLong);
  at::NoGradGuard no_grad;
  models::ControlNetInputs ci;
  ci.sample = latents;
  ci.timestep = t;
  ci.encoder_hidden_states = text;
  ci.controlnet_cond = cond;
  const models::ControlNetOutput res = cn->forward(ci);
  for (const auto& r : res.down_block_res_samples) EXPECT_EQ(r.abs().max().item<float>(), 0.0f);
  EXPECT_EQ(res.mid_block_res_sample.abs().max().item<float>(), 0.0f);
  models::UNetInputs plain;
  plain.sample = latents;
  plain.timestep = t;
  plain.encoder_hidden_states = text;
  models::UNetInputs with = plain;
  with.down_block_additional_residuals = res.down_block_res_samples;
  with.mid_block_additional_residual = res.mid_block_res_sample;
  const at::Tensor a = m->unet->forward(plain), b = m->unet->forward(with);
  EXPECT_TRUE(at::equal(a, b)) << "max diff " << (a - b).abs().max().item<float>();
}

TEST_P(ControlNetInitTiny, SavedFolderAndSingleFileLoadBack) {
  auto m = load_model(GetParam());
  models::ControlNetModel cn = training::controlnet_from_unet(m->unet);
  {  // make every weight distinct from its initial value so the round trip is meaningful
    at::NoGradGuard ng;
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(9);
    for (auto& p : cn->parameters()) p.add_(at::randn(p.sizes(), g) * 0.01);
  }
  const std::string dir = test::temp_dir() + "/cn_save_" + GetParam();
  fs::remove_all(dir);
  training::save_controlnet_diffusers(cn, dir);
  EXPECT_TRUE(fs::exists(dir + "/config.json"));
  // The safetensors file holds exactly the model's parameters (diffusers' load: none missing or unexpected).
  const io::TensorMap saved = io::load_safetensors(dir + "/diffusion_pytorch_model.safetensors");
  expect_same_weights(params_of(*cn), saved, "diffusers file");
  models::ControlNetModel back = pipelines::load_controlnet(dir);
  expect_same_weights(params_of(*cn), params_of(*back), "diffusers folder reload");
  const std::string file = dir + "/control_fresh.safetensors";
  training::save_controlnet_original(cn, file);
  const io::TensorMap orig = io::load_safetensors(file);
  for (const auto& [k, v] : orig) EXPECT_EQ(k.rfind("control_model.", 0), 0u) << k;
  models::ControlNetModel back2 = pipelines::load_controlnet(file);
  expect_same_weights(params_of(*cn), params_of(*back2), "original file reload");
}

INSTANTIATE_TEST_SUITE_P(Variants, ControlNetInitTiny, ::testing::Values("test", "sd15"));

TEST(ControlNetTablesGolden, ConfigJsonIsWhatDiffusersWrites) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string variant : {"test", "sd15"}) {
    const std::string dir = test::fixture_model(variant) + "/controlnet";
    const std::string text = read_text_file(dir + "/config.json", "fixture", dmx::kMaxJsonFileBytes);
    const nlohmann::json expected = nlohmann::json::parse(text);
    const nlohmann::json actual = training::controlnet_config_json(models::ControlNetConfig::from_json(expected));
    EXPECT_EQ(actual, expected) << variant << "\nactual:\n" << actual.dump(2) << "\nexpected:\n" << expected.dump(2);
    EXPECT_EQ(actual.dump(2) + "\n", text) << variant << ": not byte-identical to diffusers' file";
  }
}

TEST(ControlNetTablesGolden, OriginalLayoutRoundTrips) {
  DMX_REQUIRE_FIXTURES();
  const io::TensorMap ckpt = io::load_safetensors(test::fixture_model("sd15") + "/ldm/control_sd15.safetensors");
  const nlohmann::json cfg = io::detect_ldm_controlnet_config(ckpt);
  const io::TensorMap diffusers = io::convert_ldm_controlnet(ckpt, cfg);
  const io::TensorMap again = io::convert_controlnet_to_ldm(diffusers, cfg);
  expect_same_weights(ckpt, again, "control_model.* -> diffusers -> control_model.*");
  io::TensorMap extra = diffusers;
  extra["controlnet_down_blocks.99.weight"] = at::zeros({1});
  try {
    io::convert_controlnet_to_ldm(extra, cfg);
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("controlnet_down_blocks.99.weight"), std::string::npos) << e.what();
  }
}
