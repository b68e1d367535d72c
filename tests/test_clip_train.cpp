// dmx train clip (training/clip_train.h, loaders/clip.h, docs/training.md "CLIP"):
//   CLIPLossUnit     the symmetric contrastive loss against a hand computation, the temperature clamp
//   CLIPFolderTiny   a new small CLIP saved and loaded back (same embeddings), a folder missing a part refused
//   CLIPTrainCli     a short run whose loss goes down, whose folder dmx embed loads and ranks right, resume = one
//                    run; bad input exits 2 naming the option and writes nothing
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/clip.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/clip_train.h"

namespace dmx::test {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------------------------
// The loss.

TEST(CLIPLossUnit, SymmetricCrossEntropyEqualsAHandComputation) {
  const std::vector<std::vector<double>> img = {{1, 0}, {0.6, 0.8}, {-1, 1}};
  const std::vector<std::vector<double>> txt = {{2, 0.5}, {0, 3}, {-0.5, 0.2}};
  const double t = std::log(10.0);  // logits = 10 x cosine
  auto unit = [](std::vector<double> v) {
    const double n = std::sqrt(v[0] * v[0] + v[1] * v[1]);
    return std::vector<double>{v[0] / n, v[1] / n};
  };
  double logits[3][3];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const auto a = unit(img[i]), b = unit(txt[j]);
      logits[i][j] = 10.0 * (a[0] * b[0] + a[1] * b[1]);
    }
  std::vector<double> expected(3);
  for (int i = 0; i < 3; ++i) {
    double row = 0, col = 0;
    for (int j = 0; j < 3; ++j) {
      row += std::exp(logits[i][j]);
      col += std::exp(logits[j][i]);
    }
    const double i2t = std::log(row) - logits[i][i], t2i = std::log(col) - logits[i][i];
    expected[i] = 0.5 * (i2t + t2i);
  }
  auto tensor = [](const std::vector<std::vector<double>>& v) {
    return at::tensor(std::vector<double>{v[0][0], v[0][1], v[1][0], v[1][1], v[2][0], v[2][1]}, at::kFloat)
        .reshape({3, 2});
  };
  const at::Tensor per = training::clip_contrastive_loss(tensor(img), tensor(txt), at::scalar_tensor(t, at::kFloat));
  ASSERT_EQ(per.sizes(), (std::vector<int64_t>{3}));
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(per[i].item<double>(), expected[i], 1e-5) << i;
  const double mean = (expected[0] + expected[1] + expected[2]) / 3;
  EXPECT_NEAR(per.mean().item<double>(), mean, 1e-5);
  // Scaling an embedding does not change the loss (the towers' outputs are normalised first).
  const at::Tensor scaled =
      training::clip_contrastive_loss(tensor(img) * 7, tensor(txt) * 0.1, at::scalar_tensor(t, at::kFloat));
  EXPECT_TRUE(at::allclose(scaled, per, 1e-5, 1e-6));
}

TEST(CLIPLossUnit, TemperatureIsClampedAtOneHundred) {
  const at::Tensor a = at::randn({4, 8}), b = at::randn({4, 8});
  const at::Tensor at100 = training::clip_contrastive_loss(a, b, at::scalar_tensor(std::log(100.0), at::kFloat));
  at::Tensor big = at::scalar_tensor(std::log(1000.0), at::kFloat).set_requires_grad(true);
  const at::Tensor above = training::clip_contrastive_loss(a, b, big);
  EXPECT_TRUE(at::allclose(above, at100, 1e-5, 1e-6));
  above.mean().backward();
  EXPECT_EQ(big.grad().item<double>(), 0.0);  // nothing pulls it further once clamped
  at::Tensor init = at::scalar_tensor(loaders::kCLIPLogitScaleInit, at::kFloat).set_requires_grad(true);
  training::clip_contrastive_loss(a, b, init).mean().backward();
  EXPECT_NE(init.grad().item<double>(), 0.0);
  EXPECT_THROW(training::clip_contrastive_loss(a, at::randn({3, 8}), init), InvalidArgument);
}

// ---------------------------------------------------------------------------------------------------------------
// The folder.

training::CLIPArchitecture tiny_arch() {
  training::CLIPArchitecture a;
  a.width = 32;
  a.layers = 1;
  a.heads = 2;
  a.patch_size = 4;
  a.projection_dim = 16;
  a.image_size = 16;
  return a;
}

TEST(CLIPFolderTiny, SavedFolderLoadsBackWithTheSameEmbeddings) {
  note_use(kUsedTinyModel);
  at::manual_seed(1);
  auto m = training::new_clip_model(tiny_arch(), tiny_tokenizer_dir());
  m->logit_scale = 3.25;
  const std::string dir = temp_subdir("clip-folder") + "/clip";
  loaders::save_clip(dir, *m);
  for (const char* f : {"model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                        "image_encoder/config.json", "image_encoder/model.safetensors", "tokenizer/vocab.json",
                        "tokenizer/merges.txt", "feature_extractor/preprocessor_config.json"})
    EXPECT_TRUE(path_exists(dir + "/" + f)) << f;
  EXPECT_TRUE(loaders::is_clip_folder(dir));
  const auto back = loaders::load_clip(dir);
  EXPECT_DOUBLE_EQ(back->logit_scale, 3.25);
  EXPECT_EQ(back->image_encoder->config().image_size, 16);
  EXPECT_EQ(back->feature_extractor.crop_height, 16);
  at::NoGradGuard no_grad;
  m->image_encoder->eval();
  m->text_encoder->eval();
  const at::Tensor px = at::rand({2, 3, 16, 16}) * 2 - 1;
  EXPECT_TRUE(back->image_encoder->forward(px).image_embeds.equal(m->image_encoder->forward(px).image_embeds));
  const auto ids =
      at::tensor(m->tokenizer->encode_padded("a red square", m->tokenizer->model_max_length()), at::kLong).unsqueeze(0);
  EXPECT_TRUE(back->text_encoder->forward(ids).text_embeds.equal(m->text_encoder->forward(ids).text_embeds));
  // A folder missing a part is refused, naming it.
  fs::remove_all(dir + "/image_encoder");
  try {
    (void)loaders::load_clip(dir);
    ADD_FAILURE() << "loaded a CLIP folder without image_encoder/";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("image_encoder/"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The command.

// n pictures (16 px, a coloured square at a different place and colour each) with one-word-ish captions.
std::string tiny_caption_folder(const std::string& name, int n) {
  const std::string dir = temp_subdir(name);
  static const char* kWords[] = {"red", "green", "blue", "yellow", "cat", "dog", "sun", "moon"};
  std::ofstream meta(dir + "/metadata.jsonl");
  for (int i = 0; i < n; ++i) {
    Image img;
    img.width = img.height = 16;
    img.channels = 3;
    img.data.assign(16 * 16 * 3, 255);
    const int y0 = (i * 5) % 10, x0 = (i * 3) % 10;
    for (int y = y0; y < y0 + 6; ++y)
      for (int x = x0; x < x0 + 6; ++x) {
        uint8_t* p = &img.data[static_cast<size_t>((y * 16 + x) * 3)];
        p[0] = static_cast<uint8_t>(255 * (i & 1));
        p[1] = static_cast<uint8_t>(255 * ((i >> 1) & 1));
        p[2] = static_cast<uint8_t>(255 * ((i >> 2) & 1));
      }
    const std::string file = "p" + std::to_string(i) + ".png";
    save_png(dir + "/" + file, img);
    meta << nlohmann::json{{"file_name", file}, {"text", kWords[i % 8]}}.dump() << "\n";
  }
  return dir;
}

// The command line of a tiny run; `set` replaces (or adds) options: {{"--heads", "3"}}.
std::vector<std::string> clip_args(const std::string& data, const std::string& out, const std::string& steps,
                                   const std::vector<std::pair<std::string, std::string>>& set = {}) {
  std::vector<std::pair<std::string, std::string>> o = {
      {"--data", data},       {"--output", out},     {"--tokenizer", tiny_tokenizer_dir()},
      {"--image-size", "16"}, {"--patch-size", "4"}, {"--width", "32"},
      {"--layers", "1"},      {"--heads", "2"},      {"--projection-dim", "16"},
      {"--batch-size", "8"},  {"--steps", steps},    {"--learning-rate", "3e-3"},
      {"--seed", "2"},        {"--threads", "1"}};
  for (const auto& [k, v] : set) {
    auto it = std::find_if(o.begin(), o.end(), [&](const auto& kv) { return kv.first == k; });
    if (it != o.end())
      it->second = v;
    else
      o.emplace_back(k, v);
  }
  std::vector<std::string> args = {"train", "clip", "--quiet"};
  for (const auto& [k, v] : o)
    if (v != "-") args.insert(args.end(), {k, v});  // "-" leaves the option out
  return args;
}

std::vector<double> logged_losses(const std::string& log) {
  std::vector<double> v;
  std::ifstream in(log);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) v.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return v;
}

TEST(CLIPTrainCli, ShortRunLearnsAndDmxEmbedLoadsIt) {
  const std::string data = tiny_caption_folder("clip-cli-data", 8);
  const std::string dir = temp_subdir("clip-cli");
  const CliRun a = dmx_run(clip_args(data, dir + "/a", "40"));
  ASSERT_EQ(a.code, 0) << a.output;
  ASSERT_TRUE(loaders::is_clip_folder(dir + "/a"));
  const std::vector<double> loss = logged_losses(dir + "/a.train/train_log.jsonl");
  ASSERT_EQ(loss.size(), 40u);
  const double first = (loss[0] + loss[1] + loss[2]) / 3, last = (loss[37] + loss[38] + loss[39]) / 3;
  EXPECT_LT(last, 0.5 * first) << "first " << first << ", last " << last;

  // dmx embed loads the folder; each picture is closest to its own caption among the eight.
  std::vector<std::string> args = {"embed", "--model", dir + "/a", "--output", dir + "/e.json", "--quiet"};
  static const char* kWords[] = {"red", "green", "blue", "yellow", "cat", "dog", "sun", "moon"};
  for (int i = 0; i < 8; ++i) args.insert(args.end(), {"--image", data + "/p" + std::to_string(i) + ".png"});
  for (const char* w : kWords) args.insert(args.end(), {"--prompt", w});
  const CliRun e = dmx_run(args);
  ASSERT_EQ(e.code, 0) << e.output;
  std::ifstream in(dir + "/e.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  const auto cosine = j.at("cosine").get<std::vector<std::vector<double>>>();
  ASSERT_EQ(cosine.size(), 16u);
  int right = 0;
  for (int i = 0; i < 8; ++i) {
    int best = 8;
    for (int k = 9; k < 16; ++k)
      if (cosine[i][k] > cosine[i][best]) best = k;
    right += best == 8 + i;
  }
  EXPECT_GE(right, 7) << "pictures matched to their own caption";

  // Interrupted after 20 steps and resumed to 40: the weights of the run in one go.
  // (20 steps of the same constant learning rate, then 20 more from its checkpoint)
  ASSERT_EQ(dmx_run(clip_args(data, dir + "/b", "20")).code, 0);
  auto b2 = clip_args(data, dir + "/b", "40");
  b2.insert(b2.end(), {"--resume", dir + "/b.train", "--overwrite"});
  const CliRun b = dmx_run(b2);
  ASSERT_EQ(b.code, 0) << b.output;
  for (const char* f : {"/text_encoder/model.safetensors", "/image_encoder/model.safetensors"}) {
    const io::TensorMap wa = io::load_safetensors(dir + "/a" + f), wb = io::load_safetensors(dir + "/b" + f);
    ASSERT_EQ(wa.size(), wb.size());
    for (const auto& [k, v] : wa) EXPECT_TRUE(v.equal(wb.at(k))) << f << " " << k;
  }
}

TEST(CLIPTrainCli, BadInputExitsTwoNamingTheOptionAndWritesNothing) {
  const std::string data = tiny_caption_folder("clip-bad-data", 2);
  const std::string out = temp_subdir("clip-bad-out");
  const std::string target = out + "/m";
  struct Case {
    std::vector<std::string> args;
    const char* message;
  };
  auto with = [&](std::vector<std::pair<std::string, std::string>> set) { return clip_args(data, target, "1", set); };
  const std::vector<Case> cases = {
      {with({{"--data", "-"}}), "--data must be given"},
      {with({{"--data", out + "/none"}}), "--data: no such folder"},
      {with({{"--tokenizer", "-"}}), "--tokenizer must be given"},
      {with({{"--heads", "3"}}), "--heads must be in [1, 64] and divide --width 32, got 3"},
      {with({{"--patch-size", "5"}}), "--patch-size must divide --image-size 16, got 5"},
      {with({{"--image-size", "12"}}), "--image-size must be a multiple of 8"},
      {with({{"--width", "4"}}), "--width must be in [8, 4096], got 4"},
      {with({{"--layers", "0"}}), "--layers must be in [1, 48], got 0"},
      {with({{"--steps", "0"}}), "--steps must be > 0"},
      {with({{"--batch-size", "0"}}), "--batch-size must be in [1, 1024], got 0"},
      {with({{"--learning-rate", "-1"}}), "--learning-rate must be in [0, 1e+06], got -1"},
      {with({{"--mixed-precision", "fp16"}}), "--mixed-precision must be no, fp32 or bf16"},
      {with({{"--model", data}}), "is not a CLIP folder"},
      {with({{"--model", data}, {"--config", data}}), "--model (continue a CLIP folder) and --config"},
      {with({{"--snr-gamma", "5"}}), "unknown option --snr-gamma"},
  };
  for (const auto& c : cases) {
    const CliRun r = dmx_run(c.args);
    EXPECT_EQ(r.code, 2) << c.message << ": " << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.message << ": " << r.output;
  }
  EXPECT_TRUE(fs::is_empty(out));
  // dmx embed and dmx eval --clip refuse a folder that is not a CLIP model.
  const CliRun e = dmx_run({"embed", "--model", data, "--prompt", "red"});
  EXPECT_EQ(e.code, 2) << e.output;
  EXPECT_NE(e.output.find("CLIP folder"), std::string::npos) << e.output;
  const CliRun ev = dmx_run({"eval", "--clip", data});
  EXPECT_EQ(ev.code, 2) << ev.output;
  EXPECT_NE(ev.output.find("--clip"), std::string::npos) << ev.output;
}

}  // namespace
}  // namespace dmx::test
