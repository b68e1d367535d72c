// dmx train unclip (training/unclip_train.h, docs/unclip.md "Training the decoder") and dmx variations
// --interpolate-to (api/unclip.cpp):
//   UnCLIPTrainUnit  the decoder's UNet config (projection class embedding of width 2E; refusals)
//   UnCLIPTrainTiny  the added class embedding starts as a no-op (the first forward equals the base UNet's for any
//                    class labels); the per-row noise augmentation equals the pipelines' noise_image_embeddings
//   UnCLIPTrainCli   a few steps on a tiny model and a tiny CLIP write a folder dmx variations runs (and
//                    --interpolate-to, whose first picture is plain variations); stop at 2 + resume to 4 equals 4 in
//                    one go; bad input exits 2 and writes nothing
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/clip.h"
#include "loaders/unclip.h"
#include "pipelines/unclip_steps.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/clip_train.h"
#include "training/unclip_train.h"

namespace dmx::test {
namespace {

namespace fs = std::filesystem;

TEST(UnCLIPTrainUnit, DecoderConfigAddsAProjectionClassEmbedding) {
  const nlohmann::json base = {{"class_embed_type", nullptr}, {"num_class_embeds", nullptr}, {"sample_size", 8}};
  const nlohmann::json d = training::unclip_unet_config(base, 128);
  EXPECT_EQ(d.at("class_embed_type"), "projection");
  EXPECT_EQ(d.at("projection_class_embeddings_input_dim"), 256);
  EXPECT_EQ(d.at("sample_size"), 8);
  // A decoder already: kept when the width fits, refused when it does not; another class embedding refused.
  EXPECT_EQ(training::unclip_unet_config(d, 128), d);
  EXPECT_THROW(training::unclip_unet_config(d, 64), InvalidArgument);
  nlohmann::json other = base;
  other["num_class_embeds"] = 10;
  try {
    (void)training::unclip_unet_config(other, 128);
    ADD_FAILURE() << "took a UNet with num_class_embeds";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("already has a class embedding"), std::string::npos) << e.what();
  }
  EXPECT_EQ(training::stable_unclip_noising_scheduler_config().at("beta_schedule"), "squaredcos_cap_v2");
}

TEST(UnCLIPTrainTiny, AddedClassEmbeddingStartsAsTheBaseModel) {
  auto m = load_tiny_model("test");
  const nlohmann::json cfg = nlohmann::json::parse(
      read_text_file(tiny_model_dir("test") + "/unet/config.json", "unet config", kMaxJsonFileBytes));
  at::manual_seed(3);
  auto decoder = training::add_image_embedding_class(m->unet, training::unclip_unet_config(cfg, 16));
  ASSERT_EQ(decoder->config().projection_class_embeddings_input_dim, 32);
  ASSERT_EQ(decoder->config().class_embed_type, "projection");
  at::NoGradGuard no_grad;
  m->unet->eval();
  decoder->eval();
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(5);
  models::UNetInputs in;
  in.sample = at::randn({3, 4, 8, 8}, g);
  in.timestep = at::tensor({10, 500, 990}, at::kLong);
  in.encoder_hidden_states = at::randn({3, 77, 32}, g);
  const at::Tensor base = m->unet->forward(in);
  in.class_labels = at::randn({3, 32}, g) * 3;  // any labels: linear_2 is zero
  const at::Tensor first = decoder->forward(in);
  EXPECT_TRUE(first.equal(base)) << "max |diff| " << (first - base).abs().max().item<double>();
  // The embedding is live: linear_1 was drawn (not zero), and once linear_2 moves the labels change the output.
  const auto params = decoder->named_parameters(true);
  EXPECT_GT(params["class_embedding.linear_1.weight"].abs().sum().item<double>(), 0.0);
  params["class_embedding.linear_2.weight"].normal_(0, 0.1, g);
  EXPECT_FALSE(decoder->forward(in).equal(base));
}

TEST(UnCLIPTrainTiny, PerRowNoiseAugmentationIsThePipelines) {
  note_use(kUsedTinyModel);
  models::StableUnCLIPImageNormalizerConfig nc;
  nc.embedding_dim = 16;
  models::StableUnCLIPImageNormalizer normalizer(nc);
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(7);
  {
    at::NoGradGuard no_grad;
    normalizer->mean.copy_(at::randn({1, 16}, g));
    normalizer->std.copy_(at::rand({1, 16}, g) + 0.5);
  }
  const auto cfg = training::stable_unclip_noising_scheduler_config();
  auto noising = schedulers::create_scheduler("DDPMScheduler", cfg);
  const at::Tensor e = at::randn({4, 16}, g), noise = at::randn({4, 16}, g);
  const at::Tensor levels = at::tensor({0, 1, 500, 999}, at::kLong);
  const at::Tensor rows = training::noise_image_embeddings_per_row(normalizer, *noising, e, levels, noise);
  ASSERT_EQ(rows.sizes(), (std::vector<int64_t>{4, 32}));
  for (int64_t i = 0; i < 4; ++i) {
    const at::Tensor ref = pipelines::noise_image_embeddings(normalizer, *noising, e.narrow(0, i, 1),
                                                             levels[i].item<int64_t>(), noise.narrow(0, i, 1));
    EXPECT_TRUE(rows.narrow(0, i, 1).equal(ref)) << "row " << i;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The command.

// n 16-px pictures (a coloured square at a different place and colour each) with captions.
std::string picture_folder(const std::string& name, int n) {
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

// A tiny CLIP folder (random weights; 16-px pictures, projection 16) on the tiny tokenizer.
std::string tiny_clip_dir() {
  static const std::string dir = [] {
    training::CLIPArchitecture a;
    a.width = 32;
    a.layers = 1;
    a.heads = 2;
    a.patch_size = 4;
    a.projection_dim = 16;
    a.image_size = 16;
    at::manual_seed(11);
    const auto m = training::new_clip_model(a, tiny_tokenizer_dir());
    const std::string d = temp_subdir("unclip-train-clip") + "/clip";
    loaders::save_clip(d, *m);
    return d;
  }();
  return dir;
}

std::vector<std::string> unclip_args(const std::string& data, const std::string& out, const std::string& steps,
                                     const std::vector<std::string>& extra = {}) {
  std::vector<std::string> a = {"train",           "unclip",
                                "--model",         tiny_model_dir("test"),
                                "--clip",          tiny_clip_dir(),
                                "--data",          data,
                                "--output",        out,
                                "--resolution",    "16",
                                "--batch-size",    "4",
                                "--steps",         steps,
                                "--learning-rate", "1e-3",
                                "--seed",          "3",
                                "--threads",       "1",
                                "--quiet"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

bool same_weights(const std::string& a, const std::string& b) {
  const io::TensorMap wa = io::load_safetensors(a), wb = io::load_safetensors(b);
  if (wa.size() != wb.size()) return false;
  for (const auto& [k, v] : wa)
    if (!wb.count(k) || !v.equal(wb.at(k))) return false;
  return true;
}

TEST(UnCLIPTrainCli, FewStepsWriteAFolderThatDmxVariationsRuns) {
  const std::string data = picture_folder("unclip-cli-data", 6);
  const std::string dir = temp_subdir("unclip-cli");
  const CliRun t = dmx_run(unclip_args(data, dir + "/dec", "3", {"--data", picture_folder("unclip-cli-data2", 2)}));
  ASSERT_EQ(t.code, 0) << t.output;
  // A StableUnCLIPImg2ImgPipeline folder: the loaders take it, the UNet has the projection class embedding of
  // width 2 x 16, the normalizer holds the statistics of the training embeddings, the image tower is the CLIP's.
  const auto c = loaders::load_unclip_components(dir + "/dec");
  EXPECT_EQ(c->pipeline_class, "StableUnCLIPImg2ImgPipeline");
  EXPECT_EQ(c->image_normalizer->config().embedding_dim, 16);
  EXPECT_GT(c->image_normalizer->std.min().item<double>(), 0.0);
  EXPECT_FALSE(c->image_normalizer->mean.equal(at::zeros({1, 16})));
  EXPECT_TRUE(
      same_weights(dir + "/dec/image_encoder/model.safetensors", tiny_clip_dir() + "/image_encoder/model.safetensors"));
  const nlohmann::json ucfg = nlohmann::json::parse(read_text_file(dir + "/dec/unet/config.json", "", 1 << 20));
  EXPECT_EQ(ucfg.at("class_embed_type"), "projection");
  EXPECT_EQ(ucfg.at("projection_class_embeddings_input_dim"), 32);
  std::ifstream log(dir + "/dec.train/train_log.jsonl");
  int lines = 0;
  for (std::string line; std::getline(log, line);) {
    ++lines;
    EXPECT_TRUE(std::isfinite(nlohmann::json::parse(line).at("loss").get<double>())) << line;
  }
  EXPECT_EQ(lines, 3);

  // dmx variations runs the folder; --interpolate-to writes the strip and the pictures, the first equal to plain
  // variations of --image with the same seed.
  const std::vector<std::string> common = {"variations", "--model",  dir + "/dec", "--steps", "2", "--width",
                                           "16",         "--height", "16",         "--seed",  "4", "--quiet"};
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> a = common;
    a.insert(a.end(), more.begin(), more.end());
    return a;
  };
  const CliRun v = dmx_run(with({"--image", data + "/p1.png", "--output", dir + "/v.png"}));
  ASSERT_EQ(v.code, 0) << v.output;
  const CliRun i = dmx_run(with({"--image", data + "/p1.png", "--interpolate-to", data + "/p2.png", "--num-images", "3",
                                 "--output", dir + "/i.png", "--save-latents", dir + "/i.safetensors"}));
  ASSERT_EQ(i.code, 0) << i.output;
  const Image strip = load_image(dir + "/i.png", "strip");
  EXPECT_EQ(strip.width, 48);
  EXPECT_EQ(strip.height, 16);
  const Image first = load_image(dir + "/i-0.png", "first"), plain = load_image(dir + "/v.png", "plain");
  EXPECT_EQ(first.data, plain.data) << "the first picture of the strip is dmx variations of --image";
  const Image last = load_image(dir + "/i-2.png", "last");
  EXPECT_NE(first.data, last.data);
  EXPECT_EQ(io::load_safetensors(dir + "/i.safetensors").at("latents").size(0), 3);
  for (int x = 0; x < 16; ++x)  // the strip's left picture is the first one
    for (int ch = 0; ch < 3; ++ch)
      EXPECT_EQ(strip.data[static_cast<size_t>((5 * 48 + x) * 3 + ch)],
                first.data[static_cast<size_t>((5 * 16 + x) * 3 + ch)]);
}

TEST(UnCLIPTrainCli, ResumedRunEqualsOneRun) {
  const std::string data = picture_folder("unclip-resume-data", 6);
  const std::string dir = temp_subdir("unclip-resume");
  const std::vector<std::string> more = {"--lr-scheduler",
                                         "cosine",
                                         "--lr-warmup-steps",
                                         "1",
                                         "--use-ema",
                                         "--image-embedding-dropout",
                                         "0.3",
                                         "--gradient-accumulation-steps",
                                         "2"};
  ASSERT_EQ(dmx_run(unclip_args(data, dir + "/a", "4", more)).code, 0);
  // Interrupted after 2 steps (the checkpoint of a run of 4), resumed to 4.
  auto first = unclip_args(data, dir + "/b", "4", more);
  first.insert(first.end(), {"--checkpoint-every", "2"});
  const CliRun b1 = dmx_run(first);
  ASSERT_EQ(b1.code, 0) << b1.output;
  fs::remove_all(dir + "/b");
  fs::remove_all(dir + "/b.train/checkpoint-4");
  auto second = unclip_args(data, dir + "/b", "4", more);
  second.insert(second.end(), {"--resume", dir + "/b.train"});
  const CliRun b2 = dmx_run(second);
  ASSERT_EQ(b2.code, 0) << b2.output;
  EXPECT_TRUE(same_weights(dir + "/a/unet/diffusion_pytorch_model.safetensors",
                           dir + "/b/unet/diffusion_pytorch_model.safetensors"));
  EXPECT_TRUE(same_weights(dir + "/a/image_normalizer/diffusion_pytorch_model.safetensors",
                           dir + "/b/image_normalizer/diffusion_pytorch_model.safetensors"));
  // and the run trained: the class embedding's last linear left zero
  const io::TensorMap w = io::load_safetensors(dir + "/a/unet/diffusion_pytorch_model.safetensors");
  EXPECT_GT(w.at("class_embedding.linear_2.weight").abs().sum().item<double>(), 0.0);
}

TEST(UnCLIPTrainCli, BadInputExitsTwoAndWritesNothing) {
  const std::string data = picture_folder("unclip-bad-data", 2);
  const std::string out = temp_subdir("unclip-bad-out");
  const std::string target = out + "/m";
  auto with = [&](const std::vector<std::string>& extra) { return unclip_args(data, target, "1", extra); };
  auto clip = [&](const std::string& dir) {  // the run with another --clip
    std::vector<std::string> a = unclip_args(data, target, "1");
    *(std::find(a.begin(), a.end(), "--clip") + 1) = dir;
    return a;
  };
  struct Case {
    std::vector<std::string> args;
    const char* message;
  };
  const std::vector<Case> cases = {
      {clip(data), "must be a CLIP folder"},
      {clip(out + "/none"), "--clip: no such folder"},
      {with({"--data", out + "/none"}), "--data: no such folder"},
      {with({"--image-embedding-dropout", "1.5"}), "--image-embedding-dropout"},
      {with({"--proportion-empty-prompts", "-0.1"}), "--proportion-empty-prompts"},
      {with({"--random-flip"}), "unknown option --random-flip"},
      {with({"--validation-steps", "1"}), "unknown option --validation-steps"},
      {{"train", "unclip", "--model", tiny_model_dir("test"), "--output", target}, "--data must be given"},
      {{"train", "unclip", "--model", data, "--data", data, "--output", target}, "must be a diffusers folder"},
  };
  for (const auto& c : cases) {
    const CliRun r = dmx_run(c.args);
    EXPECT_EQ(r.code, 2) << c.message << ": " << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.message << ": " << r.output;
  }
  EXPECT_TRUE(fs::is_empty(out));
  // --interpolate-to: one picture is no interpolation; an unreadable picture; both exit 2 writing nothing.
  const std::string sd = tiny_model_dir("test");
  const CliRun one = dmx_run({"variations", "--model", sd, "--image", data + "/p0.png", "--interpolate-to",
                              data + "/p1.png", "--output", out + "/v.png"});
  EXPECT_EQ(one.code, 2) << one.output;  // not an unCLIP folder, refused first
  const std::string dec = temp_subdir("unclip-bad-dec") + "/dec";
  ASSERT_EQ(dmx_run(unclip_args(data, dec, "1")).code, 0);
  const CliRun n1 = dmx_run({"variations", "--model", dec, "--image", data + "/p0.png", "--interpolate-to",
                             data + "/p1.png", "--output", out + "/v.png", "--steps", "1"});
  EXPECT_EQ(n1.code, 2) << n1.output;
  EXPECT_NE(n1.output.find("--interpolate-to needs --num-images N >= 2"), std::string::npos) << n1.output;
  std::ofstream(out + "/bad.png") << "not a png";
  const CliRun bad = dmx_run({"variations", "--model", dec, "--image", data + "/p0.png", "--interpolate-to",
                              out + "/bad.png", "--num-images", "2", "--output", out + "/v.png", "--steps", "1"});
  EXPECT_EQ(bad.code, 2) << bad.output;
  EXPECT_NE(bad.output.find("--interpolate-to"), std::string::npos) << bad.output;
  const CliRun missing = dmx_run({"variations", "--model", dec, "--image", data + "/p0.png", "--interpolate-to",
                                  out + "/none.png", "--num-images", "2", "--output", out + "/v.png"});
  EXPECT_EQ(missing.code, 2) << missing.output;
  for (const auto& e : fs::directory_iterator(out)) EXPECT_EQ(e.path().filename(), "bad.png") << e.path();
}

}  // namespace
}  // namespace dmx::test
