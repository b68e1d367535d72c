// UNet2DConditionModel options of the image- and embedding-conditioned models: class embeddings (num_class_embeds,
// class_embed_type timestep / projection / simple_projection / identity, class_embeddings_concat), per-block
// only_cross_attention, in_channels 7; the x4 upscaler's and Stable unCLIP's components against diffusers 0.27.2
// (ref/upscale_x4/components, ref/unclip/components), their folders loaded as a whole; single-file detection of
// label_emb and disable_self_attentions.
// Suites: UNetOptionsUnit (config), UNetOptionsTiny (tiny random UNets), UpscaleX4Golden, UnclipGolden (golden).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>

#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "loaders/model_bundle.h"
#include "models/unet_2d_condition.h"
#include "test_util.h"

using namespace dmx;
using dmx::models::UNet2DConditionConfig;
using dmx::models::UNet2DConditionModel;
using dmx::models::UNetInputs;
using nlohmann::json;

namespace {
constexpr double kTol = 1e-5;  // the house's component tolerance (relative)

template <typename E>
void expect_throw_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception mentioning '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type for '" << needle << "': " << e.what();
  }
}

// A tiny UNet config in diffusers' form (the fixtures' "test" topology: DownBlock2D + CrossAttnDownBlock2D).
json tiny_json() {
  return {{"block_out_channels", {32, 64}},
          {"down_block_types", {"DownBlock2D", "CrossAttnDownBlock2D"}},
          {"up_block_types", {"CrossAttnUpBlock2D", "UpBlock2D"}},
          {"cross_attention_dim", 16},
          {"attention_head_dim", 8},
          {"layers_per_block", 1},
          {"norm_num_groups", 8},
          {"sample_size", 8}};
}

UNet2DConditionModel tiny_unet(const json& j, uint64_t seed = 7) {
  at::manual_seed(seed);
  UNet2DConditionModel m(UNet2DConditionConfig::from_json(j));
  m->eval();
  return m;
}

// Copies every parameter of `from` into the same-named parameter of `to` (shapes must match).
void copy_params(UNet2DConditionModel& from, UNet2DConditionModel& to) {
  at::NoGradGuard g;
  auto src = from->named_parameters(true);
  for (auto& p : to->named_parameters(true)) p.value().copy_(src[p.key()]);
}

UNetInputs tiny_inputs(int64_t in_channels = 4) {
  at::manual_seed(11);
  UNetInputs in;
  in.sample = at::randn({2, in_channels, 8, 8});
  in.timestep = at::tensor({10.0f, 700.0f});
  in.encoder_hidden_states = at::randn({2, 5, 16});
  return in;
}

at::Tensor silu_mlp(const at::Tensor& x, const io::TensorMap& sd, const std::string& p) {
  at::Tensor h = at::linear(x, sd.at(p + ".linear_1.weight"), sd.at(p + ".linear_1.bias"));
  return at::linear(at::silu(h), sd.at(p + ".linear_2.weight"), sd.at(p + ".linear_2.bias"));
}

}  // namespace

// ------------------------------------------------------------------------------------------------------
TEST(UNetOptionsUnit, ParsesTheFieldsAsDiffusersDefinesThem) {
  json j = tiny_json();
  auto c = UNet2DConditionConfig::from_json(j);
  EXPECT_EQ(c.only_cross_attention, (std::vector<bool>{false, false}));
  EXPECT_EQ(c.class_embedding_kind(), "");
  EXPECT_EQ(c.blocks_time_embed_dim(), 128);

  j["only_cross_attention"] = true;  // one bool for every block
  EXPECT_EQ(UNet2DConditionConfig::from_json(j).only_cross_attention, (std::vector<bool>{true, true}));
  j["only_cross_attention"] = {true, false};
  c = UNet2DConditionConfig::from_json(j);
  EXPECT_TRUE(c.only_cross_attention_at(0));
  EXPECT_FALSE(c.only_cross_attention_at(1));

  j["num_class_embeds"] = 1000;
  c = UNet2DConditionConfig::from_json(j);
  EXPECT_EQ(c.class_embedding_kind(), "embedding");
  j["class_embed_type"] = "timestep";  // the type wins over num_class_embeds, as in _set_class_embedding
  EXPECT_EQ(UNet2DConditionConfig::from_json(j).class_embedding_kind(), "timestep");
  j["class_embed_type"] = "projection";
  j["projection_class_embeddings_input_dim"] = 24;
  j["class_embeddings_concat"] = true;
  c = UNet2DConditionConfig::from_json(j);
  EXPECT_EQ(c.class_embedding_kind(), "projection");
  EXPECT_EQ(c.projection_class_embeddings_input_dim, 24);
  EXPECT_EQ(c.blocks_time_embed_dim(), 256);
  j["in_channels"] = 7;
  EXPECT_EQ(UNet2DConditionConfig::from_json(j).in_channels, 7);
}

TEST(UNetOptionsUnit, RefusesWhatItCannotRunNamingTheField) {
  auto with = [](const char* key, const json& value) {
    json j = tiny_json();
    j[key] = value;
    return j;
  };
  expect_throw_with<Unsupported>([&] { UNet2DConditionConfig::from_json(with("class_embed_type", "foo")); },
                                 "class_embed_type 'foo'");
  expect_throw_with<Unsupported>([&] { UNet2DConditionConfig::from_json(with("addition_embed_type", "text_time")); },
                                 "addition_embed_type");
  expect_throw_with<Unsupported>([&] { UNet2DConditionConfig::from_json(with("time_embedding_act_fn", "silu")); },
                                 "time_embedding_act_fn");
  expect_throw_with<FormatError>([&] { UNet2DConditionConfig::from_json(with("class_embed_type", "projection")); },
                                 "requires projection_class_embeddings_input_dim");
  expect_throw_with<FormatError>([&] { UNet2DConditionConfig::from_json(with("only_cross_attention", {true})); },
                                 "only_cross_attention must have one entry per down block (2), got 1");
  expect_throw_with<FormatError>([&] { UNet2DConditionConfig::from_json(with("num_class_embeds", 0)); },
                                 "num_class_embeds must be > 0");
  expect_throw_with<FormatError>([&] { UNet2DConditionConfig::from_json(with("class_embeddings_concat", true)); },
                                 "class_embeddings_concat is true but the model has no class embedding");
  expect_throw_with<FormatError>([&] { UNet2DConditionConfig::from_json(with("num_class_embeds", "many")); },
                                 "num_class_embeds");
  // Absurd sizes are refused before anything is allocated.
  expect_throw_with<FormatError>([&] { UNet2DConditionConfig::from_json(with("num_class_embeds", 1000000000)); },
                                 "num_class_embeds must be in [1, 100000] (or absent), got 1000000000");
  json big = with("class_embed_type", "projection");
  big["projection_class_embeddings_input_dim"] = 1 << 30;
  expect_throw_with<FormatError>([&] { UNet2DConditionConfig::from_json(big); },
                                 "projection_class_embeddings_input_dim must be in [1, 65536]");
}

// ------------------------------------------------------------------------------------------------------
// Each class embedding kind adds exactly diffusers' get_class_embed to the time embedding, computed here by hand
// from the model's own weights.
TEST(UNetOptionsTiny, ClassEmbeddingsAreWhatDiffusersComputes) {
  at::NoGradGuard no_grad;
  json base = tiny_json();
  UNetInputs in = tiny_inputs();

  json je = base;
  je["num_class_embeds"] = 50;
  auto emb_model = tiny_unet(je);
  const io::TensorMap sd = io::module_state(*emb_model);
  ASSERT_EQ(sd.at("class_embedding.weight").sizes(), (std::vector<int64_t>{50, 128}));
  in.class_labels = at::tensor({3, 49}, at::kLong);
  TensorRecorder rec;
  in.recorder = &rec;
  emb_model->forward(in);
  DMX_EXPECT_CLOSE("embedding rows", rec.tensors.at("class_embedding"),
                   sd.at("class_embedding.weight").index_select(0, in.class_labels), 0.0);
  in.class_labels = at::scalar_tensor(7, at::kLong);  // 0-d: broadcast to the batch
  rec.tensors.clear();
  emb_model->forward(in);
  DMX_EXPECT_CLOSE("embedding row broadcast", rec.tensors.at("class_embedding"),
                   sd.at("class_embedding.weight")[7].unsqueeze(0).expand({2, 128}), 0.0);

  json jt = base;
  jt["class_embed_type"] = "timestep";
  auto ts_model = tiny_unet(jt);
  const io::TensorMap st = io::module_state(*ts_model);
  in.class_labels = at::tensor({20.0f, 350.0f});
  rec.tensors.clear();
  ts_model->forward(in);
  // time_proj of the labels (flip_sin_to_cos, shift 0, 32 features), then the act_fn MLP.
  const at::Tensor half = at::exp(at::arange(16, at::kFloat) * (-std::log(10000.0) / 16.0));
  const at::Tensor arg = in.class_labels.unsqueeze(1) * half.unsqueeze(0);
  const at::Tensor sinus = at::cat({arg.cos(), arg.sin()}, 1);
  DMX_EXPECT_CLOSE("timestep class embedding", rec.tensors.at("class_embedding"),
                   silu_mlp(sinus, st, "class_embedding"), 1e-6);

  json jp = base;
  jp["class_embed_type"] = "projection";
  jp["projection_class_embeddings_input_dim"] = 24;
  auto pr_model = tiny_unet(jp);
  const io::TensorMap sp = io::module_state(*pr_model);
  in.class_labels = at::randn({2, 24});
  rec.tensors.clear();
  pr_model->forward(in);
  DMX_EXPECT_CLOSE("projection class embedding", rec.tensors.at("class_embedding"),
                   silu_mlp(in.class_labels, sp, "class_embedding"), 1e-6);

  json js = base;
  js["class_embed_type"] = "simple_projection";
  js["projection_class_embeddings_input_dim"] = 24;
  auto sl_model = tiny_unet(js);
  const io::TensorMap ss = io::module_state(*sl_model);
  rec.tensors.clear();
  sl_model->forward(in);
  DMX_EXPECT_CLOSE("simple_projection class embedding", rec.tensors.at("class_embedding"),
                   at::linear(in.class_labels, ss.at("class_embedding.weight"), ss.at("class_embedding.bias")), 1e-6);

  // identity with zero labels is the model without a class embedding (same weights).
  json ji = base;
  ji["class_embed_type"] = "identity";
  auto id_model = tiny_unet(ji);
  auto plain = tiny_unet(base, 99);
  copy_params(id_model, plain);
  in.recorder = nullptr;
  in.class_labels = at::zeros({1, 128});
  const at::Tensor with_zero = id_model->forward(in);
  in.class_labels = at::Tensor();
  DMX_EXPECT_CLOSE("identity(0) == no class embedding", with_zero, plain->forward(in), 0.0);
  in.class_labels = at::full({2, 128}, 0.5);
  EXPECT_GT((id_model->forward(in) - with_zero).abs().max().item<double>(), 1e-3);
}

// class_embeddings_concat: the resnets see [temb, class_emb]; with the class half of every time_emb_proj zeroed
// the model is the plain one.
TEST(UNetOptionsTiny, ClassEmbeddingsConcatDoublesTheBlocksTimeWidth) {
  at::NoGradGuard no_grad;
  json jc = tiny_json();
  jc["class_embed_type"] = "identity";
  jc["class_embeddings_concat"] = true;
  auto cat_model = tiny_unet(jc);
  auto plain = tiny_unet(tiny_json(), 5);
  auto params = cat_model->named_parameters(true);
  for (auto& p : plain->named_parameters(true)) {
    at::Tensor src = params[p.key()];
    if (p.key().find("time_emb_proj.weight") != std::string::npos) {
      ASSERT_EQ(src.size(1), 256) << p.key();
      src.narrow(1, 128, 128).zero_();
      src = src.narrow(1, 0, 128);
    }
    p.value().copy_(src);
  }
  UNetInputs in = tiny_inputs();
  const at::Tensor ref = plain->forward(in);
  in.class_labels = at::randn({2, 128});
  DMX_EXPECT_CLOSE("concat with zeroed class half", cat_model->forward(in), ref, 1e-6);
}

TEST(UNetOptionsTiny, OnlyCrossAttentionPerBlockAndSevenInputChannels) {
  at::NoGradGuard no_grad;
  json j = tiny_json();
  j["down_block_types"] = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
  j["up_block_types"] = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
  j["only_cross_attention"] = {true, false};
  j["in_channels"] = 7;
  auto m = tiny_unet(j);
  const io::TensorMap sd = io::module_state(*m);
  const std::string tb = ".attentions.0.transformer_blocks.0.attn1.to_k.weight";
  EXPECT_EQ(sd.at("down_blocks.0" + tb).size(1), 16);  // attends to the text (cross_attention_dim 16)
  EXPECT_EQ(sd.at("down_blocks.1" + tb).size(1), 64);  // self-attention
  EXPECT_EQ(sd.at("up_blocks.0" + tb).size(1), 64);    // up block 0 mirrors down block 1
  EXPECT_EQ(sd.at("up_blocks.1" + tb).size(1), 16);
  EXPECT_EQ(sd.at("mid_block" + tb).size(1), 64);  // UNetMidBlock2DCrossAttn keeps self-attention
  EXPECT_EQ(sd.at("conv_in.weight").size(1), 7);
  // One bool for every block: the mid block still attends to itself (UNetMidBlock2DCrossAttn has no such option).
  j["only_cross_attention"] = true;
  const io::TensorMap all = io::module_state(*tiny_unet(j));
  EXPECT_EQ(all.at("down_blocks.1" + tb).size(1), 16);
  EXPECT_EQ(all.at("mid_block" + tb).size(1), 64);
  UNetInputs in = tiny_inputs(7);
  EXPECT_EQ(m->forward(in).sizes(), (std::vector<int64_t>{2, 4, 8, 8}));
  in.sample = at::randn({2, 4, 8, 8});
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "sample must be [B, 7, h, w]");
}

TEST(UNetOptionsTiny, ClassLabelsAreCheckedNamingTheRule) {
  at::NoGradGuard no_grad;
  json je = tiny_json();
  je["num_class_embeds"] = 10;
  auto m = tiny_unet(je);
  UNetInputs in = tiny_inputs();
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "class_labels must be given");
  in.class_labels = at::tensor({3, 10}, at::kLong);
  expect_throw_with<InvalidArgument>([&] { m->forward(in); },
                                     "class_labels must be in [0, 9] (num_class_embeds 10), got 10");
  in.class_labels = at::tensor({-1, 2}, at::kLong);
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "got -1");
  in.class_labels = at::tensor({1.0f, 2.0f});
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "class_labels must be integers");
  in.class_labels = at::tensor({1, 2, 3}, at::kLong);
  expect_throw_with<InvalidArgument>([&] { m->forward(in); }, "class_labels must be 0-d, [1] or [2]");

  json jp = tiny_json();
  jp["class_embed_type"] = "projection";
  jp["projection_class_embeddings_input_dim"] = 24;
  auto p = tiny_unet(jp);
  in.class_labels = at::randn({2, 23});
  expect_throw_with<InvalidArgument>([&] { p->forward(in); }, "class_labels must be [2, 24] (or [1, 24])");

  auto plain = tiny_unet(tiny_json());
  in.class_labels = at::tensor({1, 2}, at::kLong);
  expect_throw_with<InvalidArgument>([&] { plain->forward(in); }, "this UNet has no class embedding");
}

// ------------------------------------------------------------------------------------------------------
// Single files: label_emb and per-block only_cross_attention are read from the shapes (and the .yaml), and the
// tables convert label_emb to class_embedding.
TEST(UNetOptionsUnit, SingleFileDetectionReadsLabelEmbAndCrossOnlyBlocks) {
  // A minimal original UNet: 2 levels, 1 layer each, attention in both, text width 16.
  const std::string p = io::kLdmUnetPrefix;
  io::TensorMap ck;
  auto put = [&](const std::string& k, std::vector<int64_t> shape) { ck[p + k] = at::zeros(shape); };
  put("input_blocks.0.0.weight", {32, 7, 3, 3});
  put("out.2.weight", {4, 32, 3, 3});
  put("input_blocks.1.0.out_layers.3.weight", {32, 32, 3, 3});
  put("input_blocks.1.1.proj_in.weight", {32, 32});
  put("input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", {32, 16});  // reads the text
  put("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", {32, 16});
  put("input_blocks.2.0.op.weight", {32, 32, 3, 3});
  put("input_blocks.3.0.out_layers.3.weight", {64, 64, 3, 3});
  put("input_blocks.3.1.proj_in.weight", {64, 64});
  put("input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight", {64, 64});  // self-attention
  put("middle_block.1.proj_in.weight", {64, 64});
  put("middle_block.1.transformer_blocks.0.attn1.to_k.weight", {64, 64});
  for (int i = 0; i < 4; ++i) {
    put("output_blocks." + std::to_string(i) + ".0.out_layers.3.weight", {32, 32, 3, 3});
    put("output_blocks." + std::to_string(i) + ".1.proj_in.weight", {32, 32});
  }
  put("label_emb.weight", {1000, 128});
  json c = io::detect_ldm_unet_config(ck);
  EXPECT_EQ(c["in_channels"], 7);
  EXPECT_EQ(c["num_class_embeds"], 1000);
  EXPECT_TRUE(c["class_embed_type"].is_null());
  EXPECT_EQ(c["only_cross_attention"], json({true, false}));
  // The yaml's disable_self_attentions wins over the shapes.
  json yaml = {{"model", {{"params", {{"unet_config", {{"params", {{"disable_self_attentions", {false, true}}}}}}}}}}};
  EXPECT_EQ(io::detect_ldm_unet_config(ck, yaml)["only_cross_attention"], json({false, true}));

  ck.erase(p + "label_emb.weight");
  put("label_emb.0.0.weight", {128, 48});
  c = io::detect_ldm_unet_config(ck);
  EXPECT_EQ(c["class_embed_type"], "projection");
  EXPECT_EQ(c["projection_class_embeddings_input_dim"], 48);
  EXPECT_TRUE(c["num_class_embeds"].is_null());

  // label_emb -> class_embedding through the UNet table.
  io::TensorMap one{{p + "label_emb.0.0.weight", at::zeros({128, 48})}, {p + "label_emb.0.2.bias", at::zeros({128})}};
  json cfg = {{"layers_per_block", 1},
              {"block_out_channels", {32, 64}},
              {"down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D"}},
              {"up_block_types", {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
              {"class_embed_type", "projection"}};
  io::TensorMap conv = io::convert_ldm_unet(one, cfg);
  EXPECT_TRUE(conv.count("class_embedding.linear_1.weight"));
  EXPECT_TRUE(conv.count("class_embedding.linear_2.bias"));
  io::TensorMap table{{p + "label_emb.weight", at::zeros({1000, 128})}};
  cfg["class_embed_type"] = nullptr;
  cfg["num_class_embeds"] = 1000;
  EXPECT_TRUE(io::convert_ldm_unet(table, cfg).count("class_embedding.weight"));
}

// ------------------------------------------------------------------------------------------------------
// The x4 upscaler: the whole folder loads (UNet with 7 input channels and a class embedding, the /4 VAE with
// scaling 0.08333, the gelu text encoder, the tokenizer padding with '!'), and each part is diffusers'.
TEST(UpscaleX4Golden, ComponentsMatchDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const test::RefCase ref = test::load_ref("upscale_x4", "components");
  auto m = loaders::load_stable_diffusion(test::fixture_model("upscale_x4"));
  EXPECT_EQ(m->unet->config().in_channels, 7);
  EXPECT_EQ(m->unet->config().num_class_embeds, 1000);
  EXPECT_EQ(m->unet->config().only_cross_attention, (std::vector<bool>{true, true, true, false}));
  EXPECT_DOUBLE_EQ(m->vae->config().scaling_factor, 0.08333);
  EXPECT_EQ(m->vae_scale_factor(), 4);

  // Text: the '!' padding (id 0) of SD-2's OpenCLIP tokenizers, then the gelu encoder.
  EXPECT_EQ(m->tokenizer->pad_id(), 0);
  const auto prompts = ref.meta.at("text").at("prompts");
  std::vector<int64_t> ids;
  for (const auto& p : prompts) {
    const auto row = m->tokenizer->encode_padded(p.get<std::string>(), 77);
    ids.insert(ids.end(), row.begin(), row.end());
  }
  const at::Tensor input_ids = at::tensor(ids, at::kLong).reshape({2, 77});
  EXPECT_TRUE(input_ids.equal(ref["text.input_ids"])) << "token ids differ from transformers'";
  DMX_EXPECT_CLOSE("upscale text.prompt_embeds", m->text_encoder->forward(input_ids).last_hidden_state,
                   ref["text.prompt_embeds"], kTol);

  // UNet with the noise level as class label, and its class embedding row and time embedding.
  double worst = 0;
  for (const std::string nl : {"20", "60"}) {
    UNetInputs in;
    in.sample = ref["unet.input"];  // the same input (the nl20 picture) for both labels, as the case made it
    in.timestep = at::tensor(static_cast<float>(ref.meta.at("timestep").get<double>()));
    in.encoder_hidden_states = ref["text.prompt_embeds"];
    in.class_labels = at::full({2}, std::stol(nl), at::kLong);
    TensorRecorder rec;
    in.recorder = &rec;
    const at::Tensor out = m->unet->forward(in);
    DMX_EXPECT_CLOSE("upscale unet.class_embedding.nl" + nl, rec.tensors.at("class_embedding"),
                     ref["unet.class_embedding.nl" + nl], kTol);
    DMX_EXPECT_CLOSE("upscale unet.time_embedding.nl" + nl, rec.tensors.at("time_embedding"),
                     ref["unet.time_embedding.nl" + nl], kTol);
    worst = std::max(worst, test::check_close("upscale unet.out.nl" + nl, out, ref["unet.out.nl" + nl], kTol));
  }
  EXPECT_LE(worst, kTol);
  EXPECT_TRUE(at::cat({ref["unet.latents"], at::cat({ref["noised_image.nl20"], ref["noised_image.nl20"]})}, 1)
                  .equal(ref["unet.input"]));

  // The /4 VAE decodes latents / 0.08333.
  const at::Tensor z = ref["vae.z"] / m->vae->config().scaling_factor;
  DMX_EXPECT_CLOSE("upscale vae.decode", m->vae->decode(z), ref["vae.decode"], kTol);
}

// Stable unCLIP's decoder: the UNet with class_embed_type projection (input 64 = noised image embedding +
// its noise-level sinusoids) and the '!'-padded text, loaded from the StableUnCLIPPipeline folder.
TEST(UnclipGolden, DecoderUNetWithProjectedClassLabelsMatchesDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const test::RefCase ref = test::load_ref("unclip", "components");
  auto m = loaders::load_stable_diffusion(test::fixture_model("unclip"));
  EXPECT_EQ(m->unet->config().class_embedding_kind(), "projection");
  EXPECT_EQ(m->unet->config().projection_class_embeddings_input_dim, 64);
  EXPECT_EQ(m->tokenizer->pad_id(), 0);

  const std::string prompt = ref.meta.at("prompt").get<std::string>();
  std::vector<int64_t> ids = m->tokenizer->encode_padded("", 77);
  const auto cond = m->tokenizer->encode_padded(prompt, 77);
  ids.insert(ids.end(), cond.begin(), cond.end());
  const at::Tensor input_ids = at::tensor(ids, at::kLong).reshape({2, 77});
  EXPECT_TRUE(input_ids.equal(ref["decoder.input_ids"])) << "token ids differ from transformers'";
  DMX_EXPECT_CLOSE("unclip decoder.prompt_embeds", m->text_encoder->forward(input_ids).last_hidden_state,
                   ref["decoder.prompt_embeds"], kTol);

  UNetInputs in;
  in.sample = ref["unet.latents"];
  in.timestep = at::tensor(500.0f);
  in.encoder_hidden_states = ref["decoder.prompt_embeds"];
  in.class_labels = ref["unet.class_labels"];
  EXPECT_TRUE(in.class_labels[0].eq(0).all().item<bool>());  // the unconditional half gets zeros
  DMX_EXPECT_CLOSE("unclip unet.out", m->unet->forward(in), ref["unet.out"], kTol);
  // The class labels matter (a model that dropped them could not pass).
  in.class_labels = at::zeros_like(in.class_labels);
  EXPECT_GT((m->unet->forward(in) - ref["unet.out"]).abs().max().item<double>(), 1e-3);
}
