// Tests for the CLIP text encoder (models/clip_text_model.h): golden hidden states, pooled output,
// clip-skip and batching against transformers' CLIPTextModel on the fixture models (1e-5 relative),
// a bf16 run against the fp32 reference, config parsing/validation and loading rules.
#include <gtest/gtest.h>

#include "core/fs.h"
#include "dmx/error.h"
#include "io/state_dict.h"
#include "models/clip_text_model.h"
#include "models/clip_tokenizer.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {
using models::CLIPTextConfig;
using models::CLIPTextModel;

constexpr double kTol = 1e-5;
// bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3 per rounding). Every op computes in bf16, as
// transformers does after model.to(torch.bfloat16); through the embeddings, 4-5 pre-LN layers and the final
// LayerNorm the roundings compound to ~10-15 units: measured worst 1.3e-2 (sd15) and 2.9e-2 (test, whose
// 37-wide MLP has larger activations) relative to the fp32 reference. Tolerance: 5e-2 (~25 units).
constexpr double kBf16Tol = 5e-2;

template <typename E, typename F>
void expect_throw_with(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception containing '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

CLIPTextConfig fixture_config(const std::string& variant) {
  const std::string path = fixture_model(variant) + "/text_encoder/config.json";
  return CLIPTextConfig::from_json(
      nlohmann::json::parse(read_text_file(path, "text encoder config", dmx::kMaxJsonFileBytes)));
}

CLIPTextModel load_fixture_model(const std::string& variant) {
  CLIPTextModel model(fixture_config(variant));
  io::load_state_dict(*model, io::load_safetensors(fixture_model(variant) + "/text_encoder/model.safetensors"),
                      "text_encoder");
  model->eval();
  return model;
}

at::Tensor ids_tensor(const std::vector<int64_t>& ids) {
  return at::tensor(ids, at::kLong).unsqueeze(0);  // [1, N]
}

class ClipTextGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(ClipTextGolden, MatchesReference) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  const RefCase ref = load_ref(variant, "clip");
  CLIPTextModel model = load_fixture_model(variant);
  const auto tok = models::CLIPTokenizer::from_folder(fixture_model(variant) + "/tokenizer");
  const int L = model->config().num_hidden_layers;
  const auto& prompts = ref.meta["prompts"];
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string p = "p" + std::to_string(i);
    const at::Tensor ids = ids_tensor(tok.encode_padded(prompts[i].get<std::string>()));
    ASSERT_TRUE(at::equal(ids, ref[p + ".input_ids"].to(at::kLong))) << p;
    const auto out = model->forward(ids, /*output_hidden_states=*/true);
    ASSERT_EQ(out.hidden_states.size(), static_cast<size_t>(L + 1));
    for (int k = 0; k <= L; ++k) {
      const std::string name = p + ".hidden_states." + std::to_string(k);
      DMX_EXPECT_CLOSE(variant + " " + name, out.hidden_states[static_cast<size_t>(k)], ref[name], kTol);
    }
    DMX_EXPECT_CLOSE(variant + " " + p + ".last_hidden_state", out.last_hidden_state, ref[p + ".last_hidden_state"],
                     kTol);
    DMX_EXPECT_CLOSE(variant + " " + p + ".pooler_output", out.pooler_output, ref[p + ".pooler_output"], kTol);
    DMX_EXPECT_CLOSE(variant + " " + p + ".clip_skip1", model->encode(ids, 1), ref[p + ".clip_skip1"], kTol);
    DMX_EXPECT_CLOSE(variant + " " + p + ".encode(clip_skip 0)", model->encode(ids, 0), ref[p + ".last_hidden_state"],
                     kTol);
    // Without hidden states the same outputs come back.
    const auto plain = model->forward(ids);
    EXPECT_TRUE(plain.hidden_states.empty());
    EXPECT_TRUE(at::equal(plain.last_hidden_state, out.last_hidden_state));
  }
  // batch2 = prompts 0 and 2 (a prompt and the empty negative prompt, as classifier-free guidance batches
  // them); clip.json does not name them, the rows match p0 and p2 exactly.
  const at::Tensor batch = at::cat({ref["p0.input_ids"], ref["p2.input_ids"]}, 0).to(at::kLong);
  const auto out = model->forward(batch);
  DMX_EXPECT_CLOSE(variant + " batch2.last_hidden_state", out.last_hidden_state, ref["batch2.last_hidden_state"], kTol);
  DMX_EXPECT_CLOSE(variant + " batch2.pooler_output", out.pooler_output,
                   at::cat({ref["p0.pooler_output"], ref["p2.pooler_output"]}, 0), kTol);
}

TEST_P(ClipTextGolden, Bf16AgainstFp32Reference) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const std::string variant = GetParam();
  const RefCase ref = load_ref(variant, "clip");
  CLIPTextModel model = load_fixture_model(variant);
  model->to(at::kBFloat16);
  const size_t n = ref.meta["prompts"].size();
  for (size_t i = 0; i < n; ++i) {
    const std::string p = "p" + std::to_string(i);
    const auto out = model->forward(ref[p + ".input_ids"].to(at::kLong));
    EXPECT_EQ(out.last_hidden_state.scalar_type(), at::kBFloat16);
    DMX_EXPECT_CLOSE(variant + " bf16 " + p + ".last_hidden_state", out.last_hidden_state.to(at::kFloat),
                     ref[p + ".last_hidden_state"], kBf16Tol);
    DMX_EXPECT_CLOSE(variant + " bf16 " + p + ".pooler_output", out.pooler_output.to(at::kFloat),
                     ref[p + ".pooler_output"], kBf16Tol);
  }
}
INSTANTIATE_TEST_SUITE_P(Variants, ClipTextGolden, ::testing::Values("sd15", "test"));

// Against the file transformers wrote: golden.
TEST(ClipTextKeysGolden, StateDictKeysMatchTheFileExactly) {
  DMX_REQUIRE_FIXTURES();
  CLIPTextModel model(fixture_config("sd15"));
  const auto file = io::load_safetensors(fixture_model("sd15") + "/text_encoder/model.safetensors");
  const auto mine = io::module_state(*model);
  std::vector<std::string> a, b;
  for (const auto& kv : mine) a.push_back(kv.first);
  for (const auto& kv : file) b.push_back(kv.first);
  EXPECT_EQ(a, b);
}

TEST(ClipTextTiny, PositionIdsKeyIsCleanedNotRegistered) {
  CLIPTextModel model(CLIPTextConfig::from_json(nlohmann::json::parse(
      read_text_file(tiny_config_dir("sd15") + "/text_encoder/config.json", "config", kMaxJsonFileBytes))));
  auto state = io::load_safetensors(tiny_model_dir("sd15") + "/text_encoder/model.safetensors");
  state["text_model.embeddings.position_ids"] = at::arange(77, at::kLong).unsqueeze(0);
  expect_throw_with<FormatError>([&] { io::load_state_dict(*model, state, "text_encoder"); },
                                 "text_model.embeddings.position_ids");
  EXPECT_EQ(models::clean_clip_state_dict(state), 1);
  EXPECT_EQ(models::clean_clip_state_dict(state), 0);
  EXPECT_TRUE(io::load_state_dict(*model, state, "text_encoder").ok());
}

TEST(ClipTextUnit, PresetsMirrorTheDiffusersConfigs) {
  const auto a = CLIPTextConfig::sd15();
  EXPECT_EQ(a.hidden_size, 768);
  EXPECT_EQ(a.num_hidden_layers, 12);
  EXPECT_EQ(a.num_attention_heads, 12);
  EXPECT_EQ(a.intermediate_size, 3072);
  EXPECT_EQ(a.hidden_act, "quick_gelu");
  EXPECT_EQ(a.vocab_size, 49408);
  EXPECT_EQ(a.max_position_embeddings, 77);
  EXPECT_EQ(a.eos_token_id, 2);
  const auto b = CLIPTextConfig::sd21();
  EXPECT_EQ(b.hidden_size, 1024);
  EXPECT_EQ(b.num_hidden_layers, 23);
  EXPECT_EQ(b.num_attention_heads, 16);
  EXPECT_EQ(b.intermediate_size, 4096);
  EXPECT_EQ(b.hidden_act, "gelu");
  EXPECT_EQ(b.projection_dim, 512);
  a.validate();
  b.validate();
}

TEST(ClipTextUnit, ConfigFromJson) {
  auto j = nlohmann::json::parse(R"({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
      "intermediate_size": 100, "hidden_act": "gelu", "vocab_size": 50, "eos_token_id": 49})");
  auto c = CLIPTextConfig::from_json(j);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 100);
  EXPECT_EQ(c.hidden_act, "gelu");
  EXPECT_EQ(c.max_position_embeddings, 77);  // transformers' default
  EXPECT_EQ(c.projection_dim, 512);
  EXPECT_EQ(c.eos_token_id, 49);
  // A full CLIPConfig: the text tower is read from text_config.
  auto full =
      nlohmann::json::parse(R"({"text_config": {"hidden_size": 48, "num_attention_heads": 6}, "projection_dim": 9})");
  EXPECT_EQ(CLIPTextConfig::from_json(full).hidden_size, 48);

  j["hidden_act"] = "relu";
  expect_throw_with<FormatError>([&] { CLIPTextConfig::from_json(j); }, "hidden_act");
  j["hidden_act"] = "gelu";
  j["num_attention_heads"] = 5;
  expect_throw_with<FormatError>([&] { CLIPTextConfig::from_json(j); }, "num_attention_heads");
  j["num_attention_heads"] = 4;
  j["num_hidden_layers"] = 0;
  expect_throw_with<FormatError>([&] { CLIPTextConfig::from_json(j); }, "num_hidden_layers must be in [1, 128], got 0");
  j["num_hidden_layers"] = "two";
  expect_throw_with<FormatError>([&] { CLIPTextConfig::from_json(j); }, "num_hidden_layers must be an integer");
  expect_throw_with<FormatError>([&] { CLIPTextConfig::from_json(nlohmann::json::array()); }, "JSON object");

  CLIPTextConfig bad = CLIPTextConfig::sd15();
  bad.hidden_size = 100;
  expect_throw_with<InvalidArgument>([&] { CLIPTextModel m(bad); },
                                     "hidden_size must be divisible by num_attention_heads");
  bad = CLIPTextConfig::sd15();
  bad.hidden_act = "swish";
  expect_throw_with<InvalidArgument>([&] { bad.validate(); }, "hidden_act");
}

TEST(ClipTextTiny, InputErrors) {
  CLIPTextConfig c = CLIPTextConfig::sd15();
  c.vocab_size = 20;
  c.hidden_size = 16;
  c.num_attention_heads = 2;
  c.intermediate_size = 8;
  c.num_hidden_layers = 2;
  c.max_position_embeddings = 8;
  CLIPTextModel model(c);
  at::NoGradGuard no_grad;
  const at::Tensor ok = at::tensor(std::vector<int64_t>{0, 5, 19}, at::kLong).unsqueeze(0);
  const auto out = model->forward(ok, true);
  EXPECT_EQ(out.last_hidden_state.sizes(), (at::IntArrayRef{1, 3, 16}));
  EXPECT_EQ(out.pooler_output.sizes(), (at::IntArrayRef{1, 16}));
  // Legacy pooling (eos_token_id == 2): the position of the largest id.
  EXPECT_TRUE(at::equal(out.pooler_output[0], out.last_hidden_state[0][2]));
  EXPECT_EQ(model->forward(ok.to(at::kInt)).last_hidden_state.sizes(), (at::IntArrayRef{1, 3, 16}));
  expect_throw_with<InvalidArgument>([&] { model->forward(ok.to(at::kFloat)); }, "input_ids must be int64 or int32");
  expect_throw_with<InvalidArgument>([&] { model->forward(ok[0]); }, "[batch, tokens]");
  expect_throw_with<InvalidArgument>([&] { model->forward(at::zeros({1, 9}, at::kLong)); }, "max_position_embeddings");
  expect_throw_with<InvalidArgument>([&] { model->forward(ok + 1); }, "vocab_size");
  expect_throw_with<InvalidArgument>([&] { model->encode(ok, 3); }, "clip_skip must be in [0, 2]");
  expect_throw_with<InvalidArgument>([&] { model->encode(ok, -1); }, "clip_skip");
  // clip_skip = num_hidden_layers gives final_layer_norm(embeddings) = final_layer_norm(hidden_states[0]).
  const auto params = model->named_parameters();
  const at::Tensor expected = at::layer_norm(out.hidden_states[0], {16}, params["text_model.final_layer_norm.weight"],
                                             params["text_model.final_layer_norm.bias"], c.layer_norm_eps);
  EXPECT_TRUE(at::allclose(model->encode(ok, 2), expected));
}

TEST(ClipTextTiny, NonLegacyPoolingUsesFirstEos) {
  CLIPTextConfig c = CLIPTextConfig::sd15();
  c.vocab_size = 20;
  c.hidden_size = 16;
  c.num_attention_heads = 2;
  c.intermediate_size = 8;
  c.num_hidden_layers = 1;
  c.eos_token_id = 7;
  CLIPTextModel model(c);
  at::NoGradGuard no_grad;
  const at::Tensor ids = at::tensor(std::vector<int64_t>{3, 7, 19, 7, 1, 2}, at::kLong).view({2, 3});
  const auto out = model->forward(ids);
  EXPECT_TRUE(at::equal(out.pooler_output[0], out.last_hidden_state[0][1]));
  EXPECT_TRUE(at::equal(out.pooler_output[1], out.last_hidden_state[1][0]));  // first eos at position 0
}
}  // namespace
}  // namespace dmx::test
