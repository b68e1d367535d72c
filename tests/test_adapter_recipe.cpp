// The T2I-Adapter recipe on the shared training loop and `dmx train adapter`: the cubic timestep draw against its
// formula and its place in the trainer's random order, a few steps lower a fixed-draw loss with the base frozen, a
// resumed run equals an uninterrupted one bit for bit, the output folder loads back through the adapter loader
// and runs in `dmx generate`, bad input exits 2 with nothing written. Suites: TimestepSamplingUnit,
// AdapterInputUnit, AdapterRecipeTiny, AdapterTrainCli.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "api/train_sampler.h"
#include "core/image.h"
#include "core/tensor_util.h"
#include "dmx/error.h"
#include "dmx/train.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "loaders/t2i_adapter_loader.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "train_test_util.h"
#include "training/adapter_train.h"
#include "training/dataset.h"
#include "training/trainer.h"

namespace fs = std::filesystem;
using namespace dmx;
using dmx::test::checker_image;
using dmx::test::fixed_draw_loss;
namespace tr = dmx::training;

namespace {

// An edge-map-like control picture: a white square outline on black (gray values, stored as RGB).
Image outline(int w, int h, int seed) {
  Image img;
  img.width = w;
  img.height = h;
  img.channels = 3;
  img.data.assign(static_cast<size_t>(w) * h * 3, 0);
  const int a = 2 + seed % 5, b = w - 3 - seed % 3;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      if (((x == a || x == b) && y >= a && y <= b) || ((y == a || y == b) && x >= a && x <= b))
        for (int c = 0; c < 3; ++c) img.data[(static_cast<size_t>(y) * w + x) * 3 + c] = 255;
  return img;
}

// metadata.jsonl with conditioning images; `with_cond` false leaves the column out.
std::string make_data(const std::string& name, int rows, bool with_cond = true) {
  const std::string d = test::temp_dir() + "/" + name;
  fs::remove_all(d);
  fs::create_directories(d + "/cond");
  std::ofstream meta(d + "/metadata.jsonl");
  for (int i = 0; i < rows; ++i) {
    const std::string n = "im" + std::to_string(i) + ".png";
    save_png(d + "/" + n, checker_image(64, 64, i));
    save_png(d + "/cond/" + n, outline(64, 64, i));
    meta << "{\"file_name\": \"" << n << "\", \"text\": \"a boxed thing " << i << "\"";
    if (with_cond) meta << ", \"conditioning_image\": \"cond/" << n << "\"";
    meta << "}\n";
  }
  return d;
}

io::TensorMap params_of(torch::nn::Module& m) {
  io::TensorMap out;
  for (const auto& p : m.named_parameters(true)) out.emplace(p.key(), p.value().detach().clone());
  return out;
}

// A fresh adapter fitting the tiny sd15 model (UNet widths 32/64/64/64, VAE factor 8), 1 input channel.
models::T2IAdapter fresh_adapter(const loaders::StableDiffusionModels& m, uint64_t seed = 0) {
  models::T2IAdapterConfig c;
  c.in_channels = 1;
  c.channels = m.unet->config().block_out_channels;
  c.num_res_blocks = 1;
  c.downscale_factor = m.vae_scale_factor();
  torch::manual_seed(seed);
  return models::T2IAdapter(c);
}

std::shared_ptr<tr::DatasetBatchSource> source_of(const std::string& data, int batch) {
  tr::DatasetOptions d;
  d.dir = data;
  d.resolution = 64;
  d.require_conditioning = true;
  auto ds = std::make_shared<tr::ImageCaptionDataset>(d);
  return std::make_shared<tr::DatasetBatchSource>(ds, batch, 0, 1, 0, /*shuffle=*/false);
}

}  // namespace

// u = rand(n) from the generator, t = long((1 - u^3) * T) clamped to [0, T - 1]: element for element (away from
// integer boundaries, where float32 and double rounding of (1 - u^3) T may disagree), and the distribution the
// formula implies: E[t / T] = 1 - E[u^3] = 3/4, P(t >= T / 2) = P(u^3 <= 1/2) = 0.5^(1/3) = 0.794.
TEST(TimestepSamplingUnit, CubicDrawFollowsItsFormula) {
  const int64_t n = 20000, T = 1000;
  at::Generator g1 = at::make_generator<at::CPUGeneratorImpl>(42), g2 = at::make_generator<at::CPUGeneratorImpl>(42);
  const at::Tensor t = tr::cubic_timesteps(g1, n, T);
  const at::Tensor u = at::rand({n}, g2, at::TensorOptions().dtype(at::kFloat));
  ASSERT_EQ(t.scalar_type(), at::kLong);
  ASSERT_EQ(t.size(0), n);
  const auto ta = t.accessor<int64_t, 1>();
  const auto ua = u.accessor<float, 1>();
  int64_t exact = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = (1.0 - std::pow(static_cast<double>(ua[i]), 3)) * T;
    const int64_t want = std::min<int64_t>(T - 1, std::max<int64_t>(0, static_cast<int64_t>(x)));
    if (std::abs(x - std::round(x)) < 1e-3)  // float32 may round across the integer: one step either way
      ASSERT_LE(std::abs(ta[i] - want), 1) << "u = " << ua[i];
    else
      ASSERT_EQ(ta[i], want) << "u = " << ua[i];
    exact += ta[i] == want;
  }
  EXPECT_GT(exact, n * 999 / 1000);
  EXPECT_GE(t.min().item<int64_t>(), 0);
  EXPECT_LE(t.max().item<int64_t>(), T - 1);
  const double mean = t.to(at::kDouble).mean().item<double>() / T;
  const double late = t.ge(T / 2).to(at::kDouble).mean().item<double>();
  std::printf("[cubic] mean t/T %.4f (3/4), P(t >= T/2) %.4f (0.794)\n", mean, late);
  EXPECT_NEAR(mean, 0.75, 0.01);
  EXPECT_NEAR(late, std::pow(0.5, 1.0 / 3.0), 0.01);
  // The uniform draw is the trainer's randint: E[t / T] = 1/2.
  at::Generator g3 = at::make_generator<at::CPUGeneratorImpl>(42);
  EXPECT_NEAR(tr::uniform_timesteps(g3, n, T).to(at::kDouble).mean().item<double>() / T, 0.5, 0.01);
  EXPECT_THROW(tr::parse_timestep_sampling("cubical"), InvalidArgument);
}

// The trainer asks the recipe for draw 4 of its documented order: after the posterior sample and the noise (both
// [G, 4, h, w]), the adapter recipe's timesteps are cubic_timesteps of the same generator.
TEST(AdapterRecipeTiny, TrainerDrawsTheRecipesCubicTimestepsInTheDocumentedOrder) {
  struct Recording : tr::AdapterRecipe {
    using AdapterRecipe::AdapterRecipe;
    std::vector<at::Tensor> seen;
    at::Tensor predict(const at::Tensor& x, const at::Tensor& t, const at::Tensor& e, const tr::Batch& b) override {
      seen.push_back(t.clone());
      return AdapterRecipe::predict(x, t, e, b);
    }
  };
  auto m = test::load_tiny_model("sd15");
  auto recipe = std::make_shared<Recording>(m, fresh_adapter(*m));
  tr::TrainConfig cfg;
  cfg.output_dir = test::temp_dir() + "/adapter_order";
  fs::remove_all(cfg.output_dir);
  cfg.max_train_steps = 3;
  cfg.train_batch_size = 2;
  cfg.seed = 11;
  cfg.save_final_checkpoint = false;
  cfg.write_log = false;
  cfg.quiet = true;
  tr::Trainer(cfg, recipe, source_of(make_data("adapter_order_data", 2), 2)).run();
  ASSERT_EQ(recipe->seen.size(), 3u);
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(11);
  const int64_t lat = 64 / m->vae_scale_factor();
  for (const auto& t : recipe->seen) {
    (void)at::randn({2, 4, lat, lat}, g);  // 1. posterior sample
    (void)at::randn({2, 4, lat, lat}, g);  // 2. noise
    const at::Tensor want = tr::cubic_timesteps(g, 2, 1000);
    EXPECT_TRUE(at::equal(t, want)) << t << " vs " << want;
  }
}

// Base frozen (no gradient reaches UNet, VAE or text encoder), the adapter's float32 weights train, a fixed-draw
// loss goes down in a few steps; the saved folder loads back with the trained weights and gives the same features.
TEST(AdapterRecipeTiny, FewStepsLowerAFixedDrawLossAndTheFolderLoadsBack) {
  auto m = test::load_tiny_model("sd15");
  auto recipe = std::make_shared<tr::AdapterRecipe>(m, fresh_adapter(*m));
  const io::TensorMap before_w = params_of(*recipe->adapter());
  auto source = source_of(make_data("adapter_loss_data", 2), 2);
  tr::TrainConfig cfg;
  cfg.output = test::temp_dir() + "/adapter_loss_out";
  cfg.output_dir = cfg.output + ".train";
  fs::remove_all(cfg.output);
  fs::remove_all(cfg.output_dir);
  cfg.max_train_steps = 10;
  cfg.train_batch_size = 2;
  cfg.learning_rate = 1e-3;
  cfg.quiet = true;
  const tr::Batch b = source->get(0);
  recipe->setup(cfg);
  const double before = fixed_draw_loss(*recipe, b, 99);
  const tr::TrainResult r = tr::Trainer(cfg, recipe, source).run();
  const double after = fixed_draw_loss(*recipe, b, 99);
  std::printf("[adapter] fixed-draw loss before %.5f after %.5f\n", before, after);
  EXPECT_EQ(r.steps, 10);
  // The tiny random UNet's prediction depends little on the features (the same draws: 1.0256 with the adapter's
  // weights at zero, 1.0231 fresh, 1.0680 at 10x): the 10 steps take the loss down by about half of that range.
  EXPECT_LT(after, before - 1e-3);
  for (auto* mod : {static_cast<torch::nn::Module*>(m->unet.get()), static_cast<torch::nn::Module*>(m->vae.get()),
                    static_cast<torch::nn::Module*>(m->text_encoder.get())})
    for (const auto& p : mod->parameters()) {
      EXPECT_FALSE(p.requires_grad());
      EXPECT_FALSE(p.grad().defined());
    }
  const io::TensorMap trained = params_of(*recipe->adapter());
  double moved = 0;
  for (const auto& [k, v] : trained) moved = std::max(moved, (v - before_w.at(k)).abs().max().item<double>());
  EXPECT_GT(moved, 1e-4);
  ASSERT_TRUE(fs::exists(cfg.output + "/config.json"));
  ASSERT_TRUE(fs::exists(cfg.output + "/diffusion_pytorch_model.safetensors"));
  models::T2IAdapter back = loaders::load_t2i_adapter(cfg.output);
  const io::TensorMap loaded = params_of(*back);
  ASSERT_EQ(loaded.size(), trained.size());
  for (const auto& [k, v] : trained) EXPECT_TRUE(at::equal(v, loaded.at(k))) << k;
  EXPECT_EQ(back->config().to_json(), recipe->adapter()->config().to_json());
  at::NoGradGuard ng;
  recipe->adapter()->eval();
  const at::Tensor x = tr::adapter_input(b.conditioning, 1);
  const auto fa = recipe->adapter()->forward(x), fb = back->forward(x);
  ASSERT_EQ(fa.size(), fb.size());
  for (size_t k = 0; k < fa.size(); ++k) EXPECT_TRUE(at::equal(fa[k], fb[k])) << k;
}

// A 1-channel adapter sees PIL's convert("L") of the conditioning picture, what generate feeds it.
TEST(AdapterInputUnit, GrayInputIsPilLuma) {
  Image img = checker_image(8, 8, 3);
  at::Tensor t = at::from_blob(img.data.data(), {8, 8, 3}, at::kByte).to(at::kFloat).div(255).permute({2, 0, 1});
  const at::Tensor got = tr::adapter_input(t.unsqueeze(0), 1);
  const Image gray = to_gray(img);
  const at::Tensor want =
      at::from_blob(const_cast<uint8_t*>(gray.data.data()), {1, 1, 8, 8}, at::kByte).to(at::kFloat) / 255.0;
  EXPECT_TRUE(at::equal(got, want));
  EXPECT_TRUE(at::equal(tr::adapter_input(t.unsqueeze(0), 3), t.unsqueeze(0)));
  EXPECT_THROW(tr::adapter_input(t.unsqueeze(0), 2), InvalidArgument);
}

// Stopped after 2 of 4 steps and resumed from its checkpoint, a run ends with the weights, loss history and optimizer
// state of the uninterrupted one, bit for bit (gradient accumulation, EMA, cosine schedule and bf16 on).
TEST(AdapterRecipeTiny, ResumeEqualsUninterruptedBitForBit) {
  const std::string data = make_data("adapter_resume_data", 3);
  auto run = [&](const std::string& dir, int64_t stop, const std::string& resume) {
    auto m = test::load_tiny_model("sd15");
    auto recipe = std::make_shared<tr::AdapterRecipe>(m, fresh_adapter(*m, 5));
    tr::TrainConfig c;
    c.output_dir = test::temp_dir() + "/" + dir;
    c.max_train_steps = 4;
    c.train_batch_size = 1;
    c.gradient_accumulation_steps = 2;
    c.learning_rate = 1e-3;
    c.lr_scheduler = tr::LRSchedule::Cosine;
    c.lr_warmup_steps = 1;
    c.use_ema = true;
    c.mixed_precision = tr::MixedPrecision::BF16;
    c.checkpointing_steps = 2;
    c.stop_at_step = stop;
    c.resume_from_checkpoint = resume;
    c.quiet = true;
    tr::Trainer t(c, recipe, source_of(data, 1));
    const tr::TrainResult r = t.run();
    return std::make_pair(params_of(*recipe->adapter()), r);
  };
  fs::remove_all(test::temp_dir() + "/adapter_straight");
  fs::remove_all(test::temp_dir() + "/adapter_resumed");
  auto [straight, r1] = run("adapter_straight", 0, "");
  auto [half, r2] = run("adapter_resumed", 2, "");
  EXPECT_EQ(r2.steps, 2);
  auto [resumed, r3] = run("adapter_resumed", 0, test::temp_dir() + "/adapter_resumed");
  EXPECT_EQ(r3.first_step, 2);
  EXPECT_EQ(r3.steps, 4);
  ASSERT_EQ(straight.size(), resumed.size());
  for (const auto& [k, v] : straight) EXPECT_TRUE(at::equal(v, resumed.at(k))) << k;
  ASSERT_EQ(r1.history.size(), 4u);
  ASSERT_EQ(r3.history.size(), 2u);
  EXPECT_EQ(r1.history[2].loss, r3.history[0].loss);
  EXPECT_EQ(r1.history[3].loss, r3.history[1].loss);
  const auto o1 = io::load_safetensors(test::temp_dir() + "/adapter_straight/checkpoint-4/optimizer.safetensors");
  const auto o3 = io::load_safetensors(test::temp_dir() + "/adapter_resumed/checkpoint-4/optimizer.safetensors");
  ASSERT_EQ(o1.size(), o3.size());
  for (const auto& [k, v] : o1) EXPECT_TRUE(at::equal(v, o3.at(k))) << k;
  // Not vacuous: the half run's weights differ from the final ones.
  double d = 0;
  for (const auto& [k, v] : straight) d = std::max(d, (v - half.at(k)).abs().max().item<double>());
  EXPECT_GT(d, 0.0);
}

// `dmx train adapter` end to end: defaults (a fresh full adapter as wide as the UNet, VAE factor) and validation
// images; the folder runs in `dmx generate --adapter` and changes the picture.
TEST(AdapterTrainCli, TrainThenGenerate) {
  const std::string model = test::tiny_model_dir("sd15");
  const std::string data = make_data("adapter_cli_data", 2);
  const std::string dir = test::temp_subdir("adapter_cli");
  const std::string out = dir + "/ad";
  const test::CliRun r = test::dmx_run({"train",
                                        "adapter",
                                        "--model",
                                        model,
                                        "--data",
                                        data,
                                        "--output",
                                        out,
                                        "--resolution",
                                        "64",
                                        "--steps",
                                        "2",
                                        "--batch-size",
                                        "2",
                                        "--learning-rate",
                                        "1e-3",
                                        "--adapter-in-channels",
                                        "1",
                                        "--validation-steps",
                                        "2",
                                        "--validation-prompt",
                                        "a boxed thing",
                                        "--threads",
                                        "1"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("trained adapter: 2 steps"), std::string::npos) << r.output;
  ASSERT_TRUE(fs::exists(out + "/config.json"));
  EXPECT_TRUE(fs::exists(out + ".train/validation-000002-0.png"));
  models::T2IAdapter back = loaders::load_t2i_adapter(out);
  EXPECT_EQ(back->config().channels, (std::vector<int>{32, 64, 64, 64}));
  EXPECT_EQ(back->config().in_channels, 1);
  EXPECT_EQ(back->config().downscale_factor, 8);
  EXPECT_EQ(back->config().adapter_type, "full_adapter");
  save_png(dir + "/map.png", outline(64, 64, 1));
  const std::vector<std::string> gen = {"generate", "--model", model,       "--prompt", "a boxed thing", "--steps", "2",
                                        "--seed",   "3",       "--threads", "1"};
  std::vector<std::string> with = gen, without = gen;
  for (const std::string& s :
       std::vector<std::string>{"--adapter", out, "--adapter-image", dir + "/map.png", "--output", dir + "/with.png"})
    with.push_back(s);
  without.push_back("--output");
  without.push_back(dir + "/without.png");
  const test::CliRun g1 = test::dmx_run(with), g2 = test::dmx_run(without);
  ASSERT_EQ(g1.code, 0) << g1.output;
  ASSERT_EQ(g2.code, 0) << g2.output;
  const Image a = load_image(dir + "/with.png", "with"), b = load_image(dir + "/without.png", "without");
  EXPECT_EQ(a.width, 64);
  EXPECT_NE(a.data, b.data) << "the adapter changed nothing";
}

// Bad input exits 2, names the flag and writes nothing (neither the output folder nor the training folder).
TEST(AdapterTrainCli, BadInputExitsTwoWritingNothing) {
  const std::string model = test::tiny_model_dir("sd15");
  const std::string good = make_data("adapter_bad_good", 2);
  const std::string no_cond = make_data("adapter_bad_nocond", 2, false);
  const std::string dir = test::temp_subdir("adapter_bad");
  const std::string out = dir + "/ad";
  const std::vector<std::string> base = {"train",    "adapter", "--model", model, "--data",       good,
                                         "--output", out,       "--steps", "1",   "--resolution", "64"};
  auto run_bad = [&](const std::vector<std::string>& args, const std::vector<std::string>& needles) {
    const test::CliRun r = test::dmx_run(args);
    EXPECT_EQ(r.code, 2) << r.output;
    for (const auto& n : needles) EXPECT_NE(r.output.find(n), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(out)) << needles[0];
    EXPECT_FALSE(fs::exists(out + ".train")) << needles[0];
  };
  auto expect_bad = [&](const std::vector<std::string>& extra, const std::vector<std::string>& needles) {
    std::vector<std::string> args = base;
    for (const auto& e : extra) args.push_back(e);
    run_bad(args, needles);
  };
  expect_bad({"--adapter-type", "full_adapter_xl"}, {"--adapter-type", "full_adapter_xl"});
  expect_bad({"--adapter-channels", "32,x"}, {"--adapter-channels", "32,x"});
  expect_bad({"--adapter-channels", "16,64,64,64"}, {"feature 0 is 16", "down block 0 is 32"});
  expect_bad({"--adapter-downscale-factor", "4"}, {"downscale_factor is 4", "VAE downscales by 8"});
  expect_bad({"--adapter-type", "light_adapter", "--adapter-channels", "32,64,64,64"},
             {"the adapter has 5 features", "4 down blocks"});
  expect_bad({"--adapter-in-channels", "2"}, {"--adapter-in-channels", "2"});
  expect_bad({"--adapter-num-res-blocks", "0"}, {"--adapter-num-res-blocks", "0"});
  expect_bad({"--timestep-sampling", "cube"}, {"--timestep-sampling", "cube"});
  expect_bad({"--adapter", dir + "/missing"}, {"--adapter", "missing"});
  run_bad(
      {"train", "adapter", "--model", model, "--data", no_cond, "--output", out, "--steps", "1", "--resolution", "64"},
      {"conditioning_image"});
  expect_bad({"--steps", "0"}, {"--steps"});
  // A UNet whose first down block is plain (no cross-attention) adds feature 0 after its downsampler: refused.
  run_bad({"train", "adapter", "--model", test::tiny_model_dir("test"), "--data", good, "--output", out, "--steps", "1",
           "--resolution", "64"},
          {"added after UNet down block 0 (DownBlock2D)"});
}

// Folders written by `dmx train adapter` load in diffusers 0.27.2 (T2IAdapter.from_pretrained) and give the same
// features there as in dmx within 1e-5: tests/ref/make_adapter_train_refs.py ran diffusers on them and recorded its
// inputs and features; dmx loads the same folder and runs the same inputs.
TEST(AdapterParityUnit, TrainedFoldersMatchDiffusers) {
  const std::string src = DMX_SOURCE_DIR;
  for (const std::string name : {"emoji_canny", "tiny_light"}) {
    const std::string base = src + "/tests/ref/adapter_train_" + name;
    std::ifstream jf(base + ".json");
    ASSERT_TRUE(jf.good()) << base << ".json missing: run tests/ref/make_adapter_train_refs.py";
    const nlohmann::json j = nlohmann::json::parse(jf);
    const io::TensorMap ref = io::load_safetensors(base + ".safetensors");
    models::T2IAdapter a = loaders::load_t2i_adapter(src + "/" + j.at("folder").get<std::string>());
    EXPECT_EQ(a->config().to_json().at("channels"), j.at("config").at("channels")) << name;
    EXPECT_EQ(a->config().adapter_type, j.at("config").at("adapter_type").get<std::string>()) << name;
    int64_t params = 0;
    for (const auto& p : a->parameters()) params += p.numel();
    EXPECT_EQ(params, j.at("parameters").get<int64_t>()) << name;
    at::NoGradGuard ng;
    for (size_t i = 0; i < j.at("inputs").size(); ++i) {
      const auto f = a->forward(ref.at("input_" + std::to_string(i)));
      const size_t nf = j.at("inputs")[i].at("features").size();
      ASSERT_EQ(f.size(), nf) << name;
      for (size_t k = 0; k < nf; ++k) {
        const at::Tensor& want = ref.at("feature_" + std::to_string(i) + "_" + std::to_string(k));
        ASSERT_TRUE(f[k].sizes().equals(want.sizes())) << name << " " << k;
        const double err = (f[k].to(at::kFloat) - want).abs().max().item<double>();
        std::printf("[adapter parity] %s input %zu feature %zu %s: max |dmx - diffusers| = %.3g\n", name.c_str(), i, k,
                    shape_string(want).c_str(), err);
        EXPECT_LE(err, 1e-5) << name << " input " << i << " feature " << k;
      }
    }
  }
}
