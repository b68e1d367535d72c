// UNet2DConditionModel and the shared attention function: golden forward against diffusers 0.27.2
// (ref/<variant>/unet), config parsing and validation, strict loading, non-square latents, bf16.
// Suites: AttentionUnit, UNetConfigUnit, UNetTiny (tiny random models), UNetGolden and UNetKeysGolden (fixtures).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/unet_2d_condition.h"
#include "nn/attention.h"
#include "test_util.h"
#include "tiny_models.h"

using namespace dmx;
using dmx::models::UNet2DConditionConfig;
using dmx::models::UNet2DConditionModel;
using dmx::models::UNetInputs;

namespace {
constexpr double kTol = 1e-5;

nlohmann::json unet_config_json(const std::string& variant) {
  return nlohmann::json::parse(
      read_text_file(test::fixture_model(variant) + "/unet/config.json", "unet config", dmx::kMaxJsonFileBytes));
}

std::string unet_weights(const std::string& variant) {
  return test::fixture_model(variant) + "/unet/diffusion_pytorch_model.safetensors";
}

UNet2DConditionModel load_unet(const std::string& variant) {
  UNet2DConditionModel m(UNet2DConditionConfig::from_json(unet_config_json(variant)));
  io::load_state_dict(*m, io::load_safetensors(unet_weights(variant)), "unet");
  m->eval();
  return m;
}

// The same architectures with seeded random weights (tests/tiny_models.h).
nlohmann::json tiny_unet_config_json(const std::string& variant) {
  return nlohmann::json::parse(
      read_text_file(test::tiny_config_dir(variant) + "/unet/config.json", "unet config", kMaxJsonFileBytes));
}

std::string tiny_unet_weights(const std::string& variant) {
  return test::tiny_model_dir(variant) + "/unet/diffusion_pytorch_model.safetensors";
}

UNet2DConditionModel load_tiny_unet(const std::string& variant) {
  UNet2DConditionModel m(UNet2DConditionConfig::from_json(tiny_unet_config_json(variant)));
  io::load_state_dict(*m, io::load_safetensors(tiny_unet_weights(variant)), "unet");
  m->eval();
  return m;
}

// Naive reference: softmax(scale q k^T [+ causal mask]) v in float64.
at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal) {
  at::Tensor s = at::matmul(q.to(at::kDouble), k.to(at::kDouble).transpose(-1, -2)) * scale;
  if (causal) {
    at::Tensor mask = at::ones({q.size(2), k.size(2)}, at::kBool).triu(1);
    s = s.masked_fill(mask, -INFINITY);
  }
  return at::matmul(at::softmax(s, -1), v.to(at::kDouble));
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

// ------------------------------------------------------------------------------------------------------
TEST(AttentionUnit, MatchesNaiveAndIsChunkInvariant) {
  at::manual_seed(0);
  at::Tensor q = at::randn({2, 3, 37, 8}), k = at::randn({2, 3, 29, 8}), v = at::randn({2, 3, 29, 8});
  const double scale = 1.0 / std::sqrt(8.0);
  at::Tensor ref = naive_attention(q, k, v, scale, false);
  at::Tensor full = nn::attention(q, k, v, scale);
  DMX_EXPECT_CLOSE("attention full", full, ref, 1e-6);
  const int64_t saved = nn::max_score_elements();
  nn::set_max_score_elements(2 * 3 * 29 * 5);  // 5 queries per chunk, last chunk partial
  at::Tensor chunked = nn::attention(q, k, v, scale);
  nn::set_max_score_elements(1);  // one query per chunk
  at::Tensor tiny = nn::attention(q, k, v, scale);
  nn::set_max_score_elements(saved);
  DMX_EXPECT_CLOSE("attention chunked", chunked, full, 1e-6);
  DMX_EXPECT_CLOSE("attention 1-query chunks", tiny, full, 1e-6);
}

TEST(AttentionUnit, CausalMaskMatchesNaiveWhenChunked) {
  at::manual_seed(1);
  at::Tensor q = at::randn({1, 2, 13, 4}), k = at::randn({1, 2, 13, 4}), v = at::randn({1, 2, 13, 4});
  at::Tensor ref = naive_attention(q, k, v, 0.5, true);
  DMX_EXPECT_CLOSE("causal", nn::attention(q, k, v, 0.5, true), ref, 1e-6);
  const int64_t saved = nn::max_score_elements();
  nn::set_max_score_elements(2 * 13 * 4);
  at::Tensor chunked = nn::attention(q, k, v, 0.5, true);
  nn::set_max_score_elements(saved);
  DMX_EXPECT_CLOSE("causal chunked", chunked, ref, 1e-6);
}

TEST(AttentionUnit, UpcastComputesScoresInFloat32) {
  at::manual_seed(2);
  at::Tensor q = at::randn({1, 2, 16, 8}), k = at::randn({1, 2, 16, 8}), v = at::randn({1, 2, 16, 8});
  at::Tensor ref = naive_attention(q, k, v, 0.35, false);
  at::Tensor out = nn::attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), 0.35, false, true);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  EXPECT_LE(test::check_close("upcast bf16 attention", out.to(at::kFloat), ref, 2e-2), 2e-2);
}

TEST(AttentionUnit, RejectsBadShapesAndBudget) {
  at::Tensor q = at::randn({2, 16, 8});
  expect_throw_with<InvalidArgument>([&] { nn::attention(q, q, q, 1.0); }, "[B, H, N, d]");
  expect_throw_with<InvalidArgument>([&] { nn::set_max_score_elements(0); }, "max_score_elements");
}

// ------------------------------------------------------------------------------------------------------
TEST(UNetConfigUnit, PresetsMirrorDiffusersConfigs) {
  auto a = UNet2DConditionConfig::sd15();
  EXPECT_EQ(a.cross_attention_dim, 768);
  EXPECT_EQ(a.heads_per_block(), (std::vector<int>{8, 8, 8, 8}));
  EXPECT_FALSE(a.use_linear_projection);
  EXPECT_NO_THROW(a.validate());
  auto b = UNet2DConditionConfig::sd21();
  EXPECT_EQ(b.cross_attention_dim, 1024);
  EXPECT_EQ(b.heads_per_block(), (std::vector<int>{5, 10, 20, 20}));
  EXPECT_TRUE(b.use_linear_projection);
  EXPECT_TRUE(b.upcast_attention);
  EXPECT_NO_THROW(b.validate());
  EXPECT_EQ(b.time_embed_dim(), 1280);
}

TEST(UNetConfigUnit, FromJsonIntOrListHeadsAndNullNumHeads) {
  nlohmann::json j = {{"attention_head_dim", 8}, {"num_attention_heads", nullptr}};
  auto c = UNet2DConditionConfig::from_json(j);
  EXPECT_EQ(c.heads_per_block(), (std::vector<int>{8, 8, 8, 8}));
  j["attention_head_dim"] = {5, 10, 20, 20};
  j["use_linear_projection"] = true;
  j["cross_attention_dim"] = 1024;
  c = UNet2DConditionConfig::from_json(j);
  EXPECT_EQ(c.heads_per_block(), (std::vector<int>{5, 10, 20, 20}));
  EXPECT_EQ(c.cross_attention_dim, 1024);
  EXPECT_TRUE(c.use_linear_projection);
  j["num_attention_heads"] = 4;
  c = UNet2DConditionConfig::from_json(j);
  EXPECT_EQ(c.heads_per_block(), (std::vector<int>{4, 4, 4, 4}));
}

TEST(UNetConfigUnit, FromJsonRejectsUnsupportedAndInvalid) {
  expect_throw_with<Unsupported>(
      [] {
        UNet2DConditionConfig::from_json(
            {{"down_block_types",
              {"CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"}}});
      },
      "SimpleCrossAttnDownBlock2D");
  expect_throw_with<Unsupported>(
      [] {
        UNet2DConditionConfig::from_json({{"mid_block_type", "UNetMidBlock2DSimpleCrossAttn"}});
      },
      "UNetMidBlock2DSimpleCrossAttn");
  expect_throw_with<Unsupported>(
      [] {
        UNet2DConditionConfig::from_json({{"encoder_hid_dim_type", "text_proj"}});
      },
      "encoder_hid_dim_type");
  expect_throw_with<Unsupported>(
      [] {
        UNet2DConditionConfig::from_json({{"addition_embed_type", "text_time"}});
      },
      "addition_embed_type");
  expect_throw_with<FormatError>(
      [] {
        UNet2DConditionConfig::from_json({{"norm_num_groups", 24}});
      },
      "norm_num_groups");
  expect_throw_with<FormatError>(
      [] {
        UNet2DConditionConfig::from_json({{"layers_per_block", 0}});
      },
      "layers_per_block must be in [1, 16], got 0");
  expect_throw_with<FormatError>([] { UNet2DConditionConfig::from_json({{"in_channels", "four"}}); }, "in_channels");
  expect_throw_with<FormatError>(
      [] {
        UNet2DConditionConfig::from_json({{"attention_head_dim", {8, 8}}});
      },
      "attention_head_dim must have one entry per down block");
  expect_throw_with<FormatError>(
      [] {
        UNet2DConditionConfig::from_json({{"attention_head_dim", 7}});
      },
      "attention_head_dim[0] (7 heads) must divide");
  expect_throw_with<FormatError>(
      [] {
        UNet2DConditionConfig::from_json({{"block_out_channels", {320, 640}}});
      },
      "block_out_channels must have one entry per down block");
  // Constructing from an invalid struct is an InvalidArgument.
  UNet2DConditionConfig bad;
  bad.norm_num_groups = 0;
  expect_throw_with<InvalidArgument>([&] { UNet2DConditionModel m(bad); },
                                     "norm_num_groups must be in [1, 8192], got 0");
}

TEST(UNetConfigUnit, FixtureConfigsParse) {
  // tests/data/tiny-sd holds the fixtures' config.json files as diffusers wrote them.
  auto c = UNet2DConditionConfig::from_json(tiny_unet_config_json("sd15"));
  EXPECT_EQ(c.block_out_channels, (std::vector<int>{32, 64, 64, 64}));
  EXPECT_EQ(c.cross_attention_dim, 32);
  auto t = UNet2DConditionConfig::from_json(tiny_unet_config_json("test"));
  EXPECT_EQ(t.down_block_types, (std::vector<std::string>{"DownBlock2D", "CrossAttnDownBlock2D"}));
  EXPECT_EQ(t.norm_num_groups, 8);
}

// ------------------------------------------------------------------------------------------------------
TEST(UNetTiny, StrictLoadRejectsMissingUnexpectedAndMisShapedKeys) {
  UNet2DConditionModel m(UNet2DConditionConfig::from_json(tiny_unet_config_json("test")));
  const io::TensorMap good = io::load_safetensors(tiny_unet_weights("test"));
  EXPECT_NO_THROW(io::load_state_dict(*m, good, "unet"));

  const std::string key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
  ASSERT_TRUE(good.count(key));
  io::TensorMap missing = good;
  missing.erase(key);
  expect_throw_with<FormatError>([&] { io::load_state_dict(*m, missing, "unet"); }, "missing:\n    " + key);

  io::TensorMap unexpected = good;
  unexpected["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.bias"] = at::zeros({64});
  expect_throw_with<FormatError>([&] { io::load_state_dict(*m, unexpected, "unet"); },
                                 "unexpected:\n    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.bias");

  io::TensorMap misshaped = good;
  misshaped["conv_in.weight"] = at::zeros({32, 4, 1, 1});
  expect_throw_with<FormatError>([&] { io::load_state_dict(*m, misshaped, "unet"); },
                                 "conv_in.weight: file [32, 4, 1, 1] vs model [32, 4, 3, 3]");
}

// Against the files diffusers wrote: golden.
TEST(UNetKeysGolden, KeyNamesMatchDiffusersFilesExactly) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string variant : {"sd15", "test"}) {
    UNet2DConditionModel m(UNet2DConditionConfig::from_json(unet_config_json(variant)));
    io::LoadReport r = io::load_state_dict(*m, io::load_safetensors(unet_weights(variant)), "unet", false);
    EXPECT_TRUE(r.ok()) << r.describe(variant);
    EXPECT_EQ(r.loaded, io::module_state(*m).size());
  }
}

TEST(UNetTiny, NonSquareLatentsRun) {
  at::NoGradGuard no_grad;
  for (const std::string variant : {"sd15", "test"}) {
    auto m = load_tiny_unet(variant);
    // 16x24 divides the up factor; 13x22 does not (forward_upsample_size path on sd15, factor 8).
    for (auto hw : {std::pair<int64_t, int64_t>{16, 24}, {13, 22}}) {
      at::manual_seed(3);
      UNetInputs in;
      in.sample = at::randn({2, 4, hw.first, hw.second});
      in.timestep = at::tensor({10.0f, 500.0f});
      in.encoder_hidden_states = at::randn({2, 77, 32});
      at::Tensor out = m->forward(in);
      EXPECT_EQ(out.sizes(), in.sample.sizes()) << variant;
      EXPECT_TRUE(out.isfinite().all().item<bool>()) << variant;
    }
  }
}

TEST(UNetTiny, RejectsBadInputs) {
  at::NoGradGuard no_grad;
  auto m = load_tiny_unet("test");
  UNetInputs in;
  in.sample = at::randn({2, 4, 8, 8});
  in.timestep = at::tensor({1.0f, 2.0f, 3.0f});
  in.encoder_hidden_states = at::randn({2, 77, 32});
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "timestep must be 0-d, [1] or [2]");
  in.timestep = at::tensor(5.0f);
  in.encoder_hidden_states = at::randn({2, 77, 16});
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "encoder_hidden_states must be [2, N, 32]");
  in.encoder_hidden_states = at::randn({2, 77, 32});
  in.mid_block_additional_residual = at::zeros({2, 64, 4, 4});
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "must be given together");
}

// ------------------------------------------------------------------------------------------------------
class UNetGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(UNetGolden, ForwardAndIntermediatesMatchDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  auto m = load_unet(variant);
  const test::RefCase ref = test::load_ref(variant, "unet");
  for (const std::string prefix : {"t_mixed", "t981"}) {
    TensorRecorder rec;
    UNetInputs in;
    in.sample = ref["input.sample"];
    in.encoder_hidden_states = ref["input.encoder_hidden_states"];
    in.timestep = ref[prefix + ".timestep"];
    if (prefix == "t981") in.timestep = in.timestep.reshape({});  // 0-d, broadcast to the batch
    in.recorder = &rec;
    at::Tensor out = m->forward(in);
    const std::string hook = prefix + ".hook.";
    int hooks = 0;
    for (const auto& kv : ref.tensors) {
      if (kv.first.rfind(hook, 0) != 0) continue;
      const std::string name = kv.first.substr(hook.size());
      ASSERT_TRUE(rec.tensors.count(name)) << "not recorded: " << name;
      DMX_EXPECT_CLOSE(variant + " " + kv.first, rec.tensors.at(name), kv.second, kTol);
      ++hooks;
    }
    EXPECT_GE(hooks, 6);
    DMX_EXPECT_CLOSE(variant + " " + prefix + ".out", out, ref[prefix + ".out"], kTol);
  }
}

// The UNet consuming ControlNet residuals (ref/<variant>/controlnet: the residuals diffusers' ControlNetModel
// returned, already multiplied by the conditioning scale) and without them.
TEST_P(UNetGolden, ControlNetResidualsMatchDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  auto m = load_unet(variant);
  const test::RefCase ref = test::load_ref(variant, "controlnet");
  UNetInputs in;
  in.sample = ref["input.sample"];
  in.encoder_hidden_states = ref["input.encoder_hidden_states"];
  in.timestep = ref["input.timestep"];
  DMX_EXPECT_CLOSE(variant + " controlnet no_control.unet_out", m->forward(in), ref["no_control.unet_out"], kTol);
  const int n = ref.meta.at("n_down_residuals").get<int>();
  for (const std::string scale : {"scale1", "scale0.5"}) {
    in.down_block_additional_residuals.clear();
    for (int i = 0; i < n; ++i) in.down_block_additional_residuals.push_back(ref[scale + ".down." + std::to_string(i)]);
    in.mid_block_additional_residual = ref[scale + ".mid"];
    DMX_EXPECT_CLOSE(variant + " controlnet " + scale + ".unet_out", m->forward(in), ref[scale + ".unet_out"], kTol);
  }
  in.down_block_additional_residuals.pop_back();
  expect_throw_with<InvalidArgument>([&] { m->forward(in); },
                                     "down_block_additional_residuals must have " + std::to_string(n));
}

// The same forward with the query chunking forced on (tiny budget): must stay within tolerance.
TEST_P(UNetGolden, ChunkedAttentionMatchesDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  auto m = load_unet(variant);
  const test::RefCase ref = test::load_ref(variant, "unet");
  UNetInputs in;
  in.sample = ref["input.sample"];
  in.encoder_hidden_states = ref["input.encoder_hidden_states"];
  in.timestep = ref["t_mixed.timestep"];
  const int64_t saved = nn::max_score_elements();
  nn::set_max_score_elements(4096);
  at::Tensor out = m->forward(in);
  nn::set_max_score_elements(saved);
  DMX_EXPECT_CLOSE(variant + " chunked t_mixed.out", out, ref["t_mixed.out"], kTol);
}

// bf16 inference: module and inputs in bf16, compared with the float32 reference. Measured worst relative
// error (GroupNorm statistics in float32): sd15 1.6e-2, test 1.2e-2; bound 3e-2.
TEST_P(UNetGolden, BFloat16StaysCloseToFloat32) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  auto m = load_unet(variant);
  m->to(at::kBFloat16);
  const test::RefCase ref = test::load_ref(variant, "unet");
  UNetInputs in;
  in.sample = ref["input.sample"].to(at::kBFloat16);
  in.encoder_hidden_states = ref["input.encoder_hidden_states"].to(at::kBFloat16);
  in.timestep = ref["t_mixed.timestep"];
  at::Tensor out = m->forward(in);
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  const double rel = test::check_close(variant + " bf16 t_mixed.out", out.to(at::kFloat), ref["t_mixed.out"], 3e-2);
  EXPECT_LE(rel, 3e-2);
}

INSTANTIATE_TEST_SUITE_P(Variants, UNetGolden, ::testing::Values("sd15", "test"));
