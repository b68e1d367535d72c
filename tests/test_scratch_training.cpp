// Training from scratch: `dmx data tokenizer` (CLIP BPE learned from captions), `dmx init` (fresh weights from
// configs), `dmx train vae`, caption dropout and `dmx convert`. Self-contained: tiny configs written here.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/convert.h"
#include "dmx/data.h"
#include "dmx/error.h"
#include "dmx/train.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "models/clip_bpe_trainer.h"
#include "models/clip_tokenizer.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace dmx;

namespace {
const std::vector<std::string> kCaptions = {"grinning face, smileys & emotion, google style", "grinning face",
                                            "slice of pizza, food & drink, google style",     "slice of pizza",
                                            "cat face, animals & nature, google style",       "cat face",
                                            "red apple, food & drink, google style",          "red apple"};

// A folder of 8 small images with metadata.jsonl captions.
std::string make_data(const std::string& name, int size = 16) {
  const std::string dir = test::temp_dir() + "/" + name;
  fs::create_directories(dir + "/images");
  std::ofstream meta(dir + "/metadata.jsonl");
  for (size_t i = 0; i < kCaptions.size(); ++i) {
    Image img;
    img.width = img.height = size;
    img.channels = 3;
    img.data.resize(static_cast<size_t>(size * size * 3));
    for (int y = 0; y < size; ++y)
      for (int x = 0; x < size; ++x)
        for (int c = 0; c < 3; ++c)
          img.data[static_cast<size_t>((y * size + x) * 3 + c)] =
              static_cast<uint8_t>((x * 16 + y * 8 + static_cast<int>(i) * 40 + c * 70) % 256);
    const std::string fn = "images/" + std::to_string(i) + ".png";
    save_png(dir + "/" + fn, img);
    meta << nlohmann::json{{"file_name", fn}, {"text", kCaptions[i]}}.dump() << "\n";
  }
  return dir;
}

void write_json(const std::string& path, const nlohmann::json& j) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << j.dump(2);
}

// Tiny SD-family configs (a 2-level VAE, a 2-level UNet, a 2-layer CLIP text encoder).
std::string make_config(const std::string& name, int text_vocab = 1024) {
  const std::string dir = test::temp_dir() + "/" + name;
  write_json(dir + "/model_index.json", {{"_class_name", "StableDiffusionPipeline"},
                                         {"scheduler", {"diffusers", "DDIMScheduler"}},
                                         {"text_encoder", {"transformers", "CLIPTextModel"}},
                                         {"tokenizer", {"transformers", "CLIPTokenizer"}},
                                         {"unet", {"diffusers", "UNet2DConditionModel"}},
                                         {"vae", {"diffusers", "AutoencoderKL"}}});
  write_json(dir + "/unet/config.json", {{"_class_name", "UNet2DConditionModel"},
                                         {"sample_size", 8},
                                         {"block_out_channels", {16, 32}},
                                         {"layers_per_block", 1},
                                         {"down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}},
                                         {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D"}},
                                         {"attention_head_dim", {2, 2}},
                                         {"norm_num_groups", 8},
                                         {"cross_attention_dim", 32}});
  write_json(dir + "/vae/config.json", {{"_class_name", "AutoencoderKL"},
                                        {"block_out_channels", {16, 32}},
                                        {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
                                        {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
                                        {"layers_per_block", 1},
                                        {"latent_channels", 4},
                                        {"norm_num_groups", 8},
                                        {"sample_size", 16}});
  write_json(dir + "/text_encoder/config.json", {{"architectures", {"CLIPTextModel"}},
                                                 {"hidden_size", 32},
                                                 {"intermediate_size", 64},
                                                 {"num_hidden_layers", 2},
                                                 {"num_attention_heads", 4},
                                                 {"max_position_embeddings", 16},
                                                 {"vocab_size", text_vocab},
                                                 {"hidden_act", "quick_gelu"}});
  write_json(dir + "/scheduler/scheduler_config.json", {{"_class_name", "DDIMScheduler"},
                                                        {"beta_schedule", "scaled_linear"},
                                                        {"beta_start", 0.00085},
                                                        {"beta_end", 0.012},
                                                        {"num_train_timesteps", 1000},
                                                        {"set_alpha_to_one", false},
                                                        {"steps_offset", 1},
                                                        {"clip_sample", false}});
  return dir;
}

std::string make_tokenizer(const std::string& name, int vocab = 600) {
  models::BPETrainOptions o;
  o.vocab_size = vocab;
  const auto v = models::learn_clip_bpe(kCaptions, o);
  const std::string dir = test::temp_dir() + "/" + name;
  models::save_clip_tokenizer(v, dir, 16);
  return dir;
}

std::string make_model(const std::string& name, uint64_t seed = 0) {
  InitModelOptions o;
  o.config = make_config(name + "_cfg");
  o.tokenizer = make_tokenizer(name + "_tok");
  o.output = test::temp_dir() + "/" + name;
  o.seed = seed;
  init_model(o);
  return o.output;
}
}  // namespace

TEST(BPETrainerUnit, LearnsWholeWordsDeterministically) {
  models::BPETrainOptions o;
  o.vocab_size = 2000;
  const auto a = models::learn_clip_bpe(kCaptions, o), b = models::learn_clip_bpe(kCaptions, o);
  EXPECT_EQ(a.merges, b.merges);
  ASSERT_GE(a.tokens.size(), 514u);
  EXPECT_EQ(a.tokens[0], "!");  // byte symbols first, in bytes_to_unicode order
  EXPECT_EQ(a.tokens[256], "!</w>");
  EXPECT_EQ(a.tokens[a.tokens.size() - 2], "<|startoftext|>");
  EXPECT_EQ(a.tokens.back(), "<|endoftext|>");
  // Every pair that occurs got merged (vocab_size was not the limit): each word is one token.
  EXPECT_LT(a.tokens.size(), 2000u);
  const std::string dir = test::temp_dir() + "/bpe_words";
  models::save_clip_tokenizer(a, dir, 16);
  const auto tok = models::CLIPTokenizer::from_folder(dir);
  EXPECT_EQ(tok.tokenize("slice of pizza"), (std::vector<std::string>{"slice</w>", "of</w>", "pizza</w>"}));
  EXPECT_EQ(tok.model_max_length(), 16);
  EXPECT_EQ(tok.token_to_id("<|endoftext|>"), static_cast<int64_t>(a.tokens.size()) - 1);
  // Unseen words still tokenize (byte fallback), no unknown token.
  EXPECT_FALSE(tok.tokenize("zebra").empty());
}

TEST(BPETrainerUnit, VocabSizeCapsTheMergesAndBadSizesAreRejected) {
  models::BPETrainOptions o;
  o.vocab_size = 530;
  EXPECT_EQ(models::learn_clip_bpe(kCaptions, o).tokens.size(), 530u);
  o.vocab_size = 100;
  try {
    models::learn_clip_bpe(kCaptions, o);
    FAIL() << "vocab_size 100 accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--vocab-size"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("100"), std::string::npos) << e.what();
  }
}

TEST(BPETrainerCli, CliWritesATokenizerFolder) {
  const std::string data = make_data("tok_cli");
  const std::string out = test::temp_dir() + "/tok_cli_out";
  auto r = test::dmx_run(
      {"data", "tokenizer", "--data", data, "--output", out, "--vocab-size", "700", "--model-max-length", "16"});
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* f : {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"})
    EXPECT_TRUE(path_exists(out + "/" + f)) << f;
  r = test::dmx_run({"data", "tokenizer", "--data", test::temp_dir() + "/nope", "--output", out + "2"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--data"), std::string::npos) << r.output;
}

TEST(InitModelTiny, SeededFreshWeightsThatLoad) {
  const std::string a = make_model("init_a", 7), b = make_model("init_b", 7), c = make_model("init_c", 8);
  auto ta = io::load_safetensors(a + "/unet/diffusion_pytorch_model.safetensors");
  auto tb = io::load_safetensors(b + "/unet/diffusion_pytorch_model.safetensors");
  auto tc = io::load_safetensors(c + "/unet/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(ta.size(), tb.size());
  for (const auto& [k, v] : ta) EXPECT_TRUE(at::equal(v, tb.at(k))) << k;
  EXPECT_FALSE(at::equal(ta.at("conv_in.weight"), tc.at("conv_in.weight")));
  auto m = loaders::load_stable_diffusion(a);
  EXPECT_EQ(m->unet->config().sample_size, 8);
  // transformers' CLIP initialisation: token embeddings N(0, 0.02), layer norms at identity.
  auto te = io::load_safetensors(a + "/text_encoder/model.safetensors");
  const double sd = te.at("text_model.embeddings.token_embedding.weight").std().item<double>();
  EXPECT_NEAR(sd, 0.02, 0.002);
  EXPECT_TRUE(at::equal(te.at("text_model.final_layer_norm.weight"),
                        at::ones_like(te.at("text_model.final_layer_norm.weight"))));
}

TEST(InitModelTiny, InconsistentConfigsAreRejected) {
  InitModelOptions o;
  o.config = make_config("init_small_vocab", /*text_vocab=*/100);
  o.tokenizer = make_tokenizer("init_small_vocab_tok", 600);
  o.output = test::temp_dir() + "/init_bad";
  try {
    init_model(o);
    FAIL() << "a tokenizer larger than vocab_size was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("vocab_size"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(path_exists(o.output));
  o.config = test::temp_dir() + "/no_such_config";
  EXPECT_THROW(init_model(o), InvalidArgument);
}

TEST(TrainVAETiny, LowersTheReconstructionLossAndSetsTheScalingFactor) {
  const std::string model = make_model("vae_model");
  const std::string data = make_data("vae_data");
  TrainOptions o;
  o.recipe = "vae";
  o.model = model;
  o.data = data;
  o.output = test::temp_dir() + "/vae_out";
  o.resolution = 16;
  o.batch_size = 4;
  o.steps = 20;
  o.learning_rate = 2e-3;
  o.quiet = true;
  o.validation_steps = 20;
  const TrainReport r = train(o);
  std::printf("[vae] loss %.4f -> %.4f\n", r.first_loss, r.final_loss);
  EXPECT_LT(r.final_loss, r.first_loss * 0.8);
  const auto cfg =
      nlohmann::json::parse(read_text_file(o.output + "/vae/config.json", "vae config", dmx::kMaxJsonFileBytes));
  const double sf = cfg.at("scaling_factor").get<double>();
  EXPECT_GT(sf, 0);
  EXPECT_TRUE(std::isfinite(sf));
  EXPECT_TRUE(path_exists(o.output + ".train/reconstruction-20.png"));
  // The UNet is untouched, the VAE changed.
  auto u0 = io::load_safetensors(model + "/unet/diffusion_pytorch_model.safetensors");
  auto u1 = io::load_safetensors(o.output + "/unet/diffusion_pytorch_model.safetensors");
  for (const auto& [k, v] : u0) EXPECT_TRUE(at::equal(v, u1.at(k))) << k;
  auto v0 = io::load_safetensors(model + "/vae/diffusion_pytorch_model.safetensors");
  auto v1 = io::load_safetensors(o.output + "/vae/diffusion_pytorch_model.safetensors");
  EXPECT_FALSE(at::equal(v0.at("decoder.conv_out.weight"), v1.at("decoder.conv_out.weight")));
  o.vae_crop = 13;  // not a multiple of the factor 2
  o.output = test::temp_dir() + "/vae_out2";
  EXPECT_THROW(train(o), InvalidArgument);
}

TEST(TrainFromScratchTiny, CaptionDropoutTrainsTheTextEncoderJointly) {
  const std::string model = make_model("scratch_model");
  const std::string data = make_data("scratch_data");
  auto run = [&](double p, const std::string& out) {
    TrainOptions o;
    o.recipe = "finetune";
    o.model = model;
    o.data = data;
    o.output = test::temp_dir() + "/" + out;
    o.resolution = 16;
    o.batch_size = 4;
    o.steps = 4;
    o.learning_rate = 1e-3;
    o.train_text_encoder = true;
    o.proportion_empty_prompts = p;
    o.quiet = true;
    train(o);
    return io::load_safetensors(o.output + "/text_encoder/model.safetensors");
  };
  const auto base = io::load_safetensors(model + "/text_encoder/model.safetensors");
  const auto with = run(0.5, "scratch_p05"), without = run(0.0, "scratch_p0");
  const std::string k = "text_model.encoder.layers.0.self_attn.q_proj.weight";
  EXPECT_FALSE(at::equal(base.at(k), without.at(k)));  // the text encoder trains
  EXPECT_FALSE(at::equal(with.at(k), without.at(k)));  // dropout changes what it sees
  TrainOptions bad;
  bad.recipe = "finetune";
  bad.model = model;
  bad.data = data;
  bad.output = test::temp_dir() + "/scratch_bad";
  bad.proportion_empty_prompts = 1.5;
  try {
    validate_train_options(bad);
    FAIL() << "proportion 1.5 accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--proportion-empty-prompts"), std::string::npos) << e.what();
  }
}

TEST(ConvertWeightsTiny, Fp16CopyLoadsWithinRounding) {
  const std::string model = make_model("convert_model");
  ConvertOptions o;
  o.input = model;
  o.output = test::temp_dir() + "/convert_fp16";
  const ConvertReport r = convert_weights(o);
  EXPECT_EQ(r.files, 3);
  EXPECT_LT(r.bytes_out, r.bytes_in * 0.55);
  auto a = io::load_safetensors(model + "/vae/diffusion_pytorch_model.safetensors");
  auto b = io::load_safetensors(o.output + "/vae/diffusion_pytorch_model.safetensors");
  for (const auto& [k, v] : a) {
    EXPECT_EQ(b.at(k).scalar_type(), at::kHalf) << k;
    EXPECT_TRUE(at::allclose(b.at(k).to(at::kFloat), v, 1e-3, 1e-4)) << k;
  }
  EXPECT_TRUE(path_exists(o.output + "/tokenizer/vocab.json"));
  auto m = loaders::load_stable_diffusion(o.output);  // fp16 storage loads into the float32 model
  EXPECT_EQ(m->vae->parameters().front().scalar_type(), at::kFloat);
  o.dtype = "int8";
  o.output = test::temp_dir() + "/convert_bad";
  try {
    convert_weights(o);
    ADD_FAILURE() << "dtype int8 accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--dtype"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(path_exists(o.output));
}

// The command: a bad --dtype exits 2 naming the flag; a good one exits 0.
TEST(ConvertCli, ExitCodes) {
  const std::string model = make_model("convert_cli_model");
  auto cli =
      test::dmx_run({"convert", "--input", model, "--output", test::temp_dir() + "/convert_cli", "--dtype", "fp8"});
  EXPECT_EQ(cli.code, 2) << cli.output;
  EXPECT_NE(cli.output.find("--dtype"), std::string::npos) << cli.output;
  EXPECT_FALSE(path_exists(test::temp_dir() + "/convert_cli"));
  cli = test::dmx_run({"convert", "--input", model, "--output", test::temp_dir() + "/convert_cli", "--dtype", "bf16"});
  EXPECT_EQ(cli.code, 0) << cli.output;
  EXPECT_TRUE(path_exists(test::temp_dir() + "/convert_cli/unet/diffusion_pytorch_model.safetensors"));
}
