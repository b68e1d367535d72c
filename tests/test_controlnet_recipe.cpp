// The ControlNet recipe on the shared training loop and `dmx train controlnet`, on a tiny random model of the sd15
// architecture: a fresh ControlNet predicts what the UNet alone does, a short run writes both layouts and they load
// back, bad input is rejected with nothing written, and 2 ranks on loopback end with the weights of 1 process with
// the same global batch. Suites: ControlNetRecipeTiny, ControlNetTrainCli (the processes).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "api/train_sampler.h"
#include "core/image.h"
#include "dmx/error.h"
#include "dmx/train.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "pipelines/controlnet.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "train_test_util.h"
#include "training/controlnet_init.h"
#include "training/controlnet_train.h"
#include "training/dataset.h"
#include "training/trainer.h"

extern char** environ;

namespace fs = std::filesystem;
using namespace dmx;
using dmx::test::checker_image;
using dmx::test::fixed_draw_loss;

namespace {

// metadata.jsonl with conditioning images; `with_cond` false leaves the column out.
std::string make_cn_data(const std::string& name, int rows, bool with_cond = true) {
  const std::string d = test::temp_dir() + "/" + name;
  fs::remove_all(d);
  fs::create_directories(d + "/cond");
  std::ofstream meta(d + "/metadata.jsonl");
  for (int i = 0; i < rows; ++i) {
    const std::string n = "im" + std::to_string(i) + ".png";
    save_png(d + "/" + n, checker_image(128 + 8 * (i % 3), 128, i));
    save_png(d + "/cond/" + n, checker_image(128 + 8 * (i % 3), 128, i + 1));
    meta << "{\"file_name\": \"" << n << "\", \"text\": \"a striped thing " << i << "\"";
    if (with_cond) meta << ", \"conditioning_image\": \"cond/" << n << "\"";
    meta << "}\n";
  }
  return d;
}

std::shared_ptr<loaders::StableDiffusionModels> fresh_models() { return test::load_tiny_model("sd15"); }

io::TensorMap params_of(torch::nn::Module& m) {
  io::TensorMap out;
  for (const auto& p : m.named_parameters(true)) out.emplace(p.key(), p.value().detach().clone());
  return out;
}

at::Tensor flat(const io::TensorMap& m) {
  std::vector<at::Tensor> v;
  for (const auto& [k, t] : m) v.push_back(t.reshape({-1}).to(at::kDouble));
  return at::cat(v);
}

int free_port() {
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  close(s);
  return port;
}

// Starts the dmx binary with args and extra environment; returns the pid.
pid_t spawn_dmx(const std::vector<std::string>& args, const std::vector<std::string>& extra_env) {
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    bool drop = false;
    for (const char* k : {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "MASTER_ADDR=", "MASTER_PORT="})
      if (kv.rfind(k, 0) == 0) drop = true;
    if (!drop) env_s.push_back(kv);
  }
  for (const auto& e : extra_env) env_s.push_back(e);
  std::vector<char*> envp;
  for (auto& s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);
  const std::string cli = test::cli_path();
  std::vector<std::string> argv_s{cli};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  EXPECT_EQ(posix_spawn(&pid, cli.c_str(), nullptr, nullptr, argv.data(), envp.data()), 0);
  return pid;
}

int wait_for(pid_t pid, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}
}  // namespace

TEST(ControlNetRecipeTiny, FreshControlNetPredictsWhatTheUNetDoes) {
  auto m = fresh_models();
  auto recipe = std::make_shared<training::ControlNetRecipe>(m, training::controlnet_from_unet(m->unet));
  training::TrainConfig cfg;
  recipe->setup(cfg);
  for (const auto& p : m->unet->parameters()) ASSERT_FALSE(p.requires_grad());
  for (const auto& p : recipe->trainable_parameters()) ASSERT_TRUE(p.tensor.requires_grad()) << p.name;
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(5);
  const at::Tensor noisy = at::randn({2, 4, 8, 8}, g), ehs = at::randn({2, 77, 32}, g);
  const at::Tensor t = at::tensor({500, 20}, at::kLong);
  training::Batch b;
  b.conditioning = at::rand({2, 3, 64, 64}, g);
  at::NoGradGuard ng;
  const at::Tensor a = recipe->predict(noisy, t, ehs, b);
  models::UNetInputs ui;
  ui.sample = noisy;
  ui.timestep = t;
  ui.encoder_hidden_states = ehs;
  EXPECT_TRUE(at::equal(a, m->unet->forward(ui)));
  training::Batch no_cond;
  EXPECT_THROW(recipe->predict(noisy, t, ehs, no_cond), InvalidArgument);
}

TEST(ControlNetRecipeTiny, ShortRunWritesBothLayoutsThatLoadBack) {
  const std::string data = make_cn_data("cn_recipe_data", 3);
  const std::string out = test::temp_dir() + "/cn_recipe_out";
  fs::remove_all(out);
  fs::remove_all(out + ".train");
  auto m = fresh_models();
  torch::manual_seed(0);
  auto cn = training::controlnet_from_unet(m->unet);
  const io::TensorMap before = params_of(*cn);
  auto recipe = std::make_shared<training::ControlNetRecipe>(m, cn);
  training::DatasetOptions d;
  d.dir = data;
  d.resolution = 64;
  d.require_conditioning = true;
  auto ds = std::make_shared<training::ImageCaptionDataset>(d);
  auto source = std::make_shared<training::DatasetBatchSource>(ds, 2, 0, 1, 0);
  training::TrainConfig cfg;
  cfg.output = out;
  cfg.max_train_steps = 2;
  cfg.train_batch_size = 2;
  cfg.learning_rate = 1e-3;
  cfg.quiet = true;
  training::Trainer trainer(cfg, recipe, source);
  const training::TrainResult r = trainer.run();
  EXPECT_EQ(r.steps, 2);
  ASSERT_TRUE(fs::exists(out + "/config.json"));
  ASSERT_TRUE(fs::exists(out + "/diffusion_pytorch_model.safetensors"));
  ASSERT_TRUE(fs::exists(out + "/" + training::kControlNetOriginalFile));
  const io::TensorMap trained = params_of(*cn);
  EXPECT_GT((flat(trained) - flat(before)).abs().max().item<double>(), 1e-5) << "training changed nothing";
  EXPECT_GT(trained.at("controlnet_mid_block.weight").abs().max().item<float>(), 0.0f);
  auto a = pipelines::load_controlnet(out);
  auto b = pipelines::load_controlnet(out + "/" + training::kControlNetOriginalFile);
  for (const io::TensorMap& back : {params_of(*a), params_of(*b)}) {
    ASSERT_EQ(back.size(), trained.size());
    for (const auto& [k, v] : trained) EXPECT_TRUE(at::equal(v, back.at(k))) << k;
  }
}

// dmx::train with recipe controlnet (what `dmx train controlnet` runs) rejects bad input before writing anything.
TEST(ControlNetRecipeTiny, BadInputNamesTheFlagAndWritesNothing) {
  const std::string no_cond = make_cn_data("cn_api_nocond", 2, false);
  const std::string good = make_cn_data("cn_api_good", 2);
  const std::string out = test::temp_dir() + "/cn_api_bad_out";
  fs::remove_all(out);
  TrainOptions base;
  base.recipe = "controlnet";
  base.model = test::tiny_model_dir("sd15");
  base.data = good;
  base.output = out;
  base.steps = 1;
  base.resolution = 64;
  base.quiet = true;
  auto expect_invalid = [&](const std::function<void(TrainOptions&)>& edit, const std::vector<std::string>& needles) {
    TrainOptions o = base;
    edit(o);
    try {
      train(o);
      ADD_FAILURE() << "expected InvalidArgument naming " << needles[0];
    } catch (const InvalidArgument& e) {
      for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(out));
    EXPECT_FALSE(fs::exists(out + ".train"));
  };
  expect_invalid([&](TrainOptions& o) { o.data = no_cond; }, {"metadata.jsonl:1", "conditioning_image"});
  expect_invalid([](TrainOptions& o) { o.steps = 0; }, {"--steps"});
  expect_invalid([](TrainOptions& o) { o.resolution = 60; }, {"--resolution"});
  expect_invalid([](TrainOptions& o) { o.model.clear(); }, {"--model"});
}

// Two notes on the settings. Resolution 128, not 64: at 64 px the tiny UNet's deepest blocks are 1x1 with two
// channels per GroupNorm group, a normalisation over 2 numbers whose gradient amplifies float rounding ~1000x (the
// batch gradient then departs from the mean of row gradients by 2e-3 in one process alone). --adam-epsilon 1e-4:
// Adam's first steps move every element by about +-lr whatever its gradient's size, so elements whose gradient is
// at rounding level (those just behind the zero convolutions at step 2) would flip with the summation order; an
// epsilon above that level keeps the comparison about the gradients. Measured: 6e-8 with 1e-4, 6e-5 with 1e-8.
TEST(ControlNetTrainCli, TwoRanksOnLoopbackEqualOneProcess) {
  const std::string model = test::tiny_model_dir("sd15");
  const std::string data = make_cn_data("cn_cli_dist_data", 5);
  const std::string one = test::temp_dir() + "/cn_cli_one", two = test::temp_dir() + "/cn_cli_two";
  for (const auto& p : {one, two, one + ".train", two + ".train"}) fs::remove_all(p);
  auto args = [&](const std::string& out, int batch) {
    return std::vector<std::string>{
        "train",        "controlnet", "--model",         model,  "--data",         data,
        "--output",     out,          "--steps",         "2",    "--batch-size",   std::to_string(batch),
        "--resolution", "128",        "--learning-rate", "1e-3", "--adam-epsilon", "1e-4",
        "--seed",       "11",         "--threads",       "1",    "--quiet"};
  };
  const pid_t single = spawn_dmx(args(one, 2), {"OMP_NUM_THREADS=1"});
  ASSERT_EQ(wait_for(single, 120), 0);
  const std::string port = std::to_string(free_port());
  std::vector<pid_t> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.push_back(
        spawn_dmx(args(two, 1), {"RANK=" + std::to_string(r), "LOCAL_RANK=" + std::to_string(r), "WORLD_SIZE=2",
                                 "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + port, "OMP_NUM_THREADS=1"}));
  for (pid_t p : ranks) EXPECT_EQ(wait_for(p, 120), 0);
  const io::TensorMap a = io::load_safetensors(one + "/diffusion_pytorch_model.safetensors");
  const io::TensorMap b = io::load_safetensors(two + "/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(a.size(), b.size());
  DMX_EXPECT_CLOSE("ControlNet weights, 2 ranks x batch 1 vs 1 process x batch 2 (2 steps)", flat(b), flat(a), 1e-5);
  // The run moved the zero convolutions, so the comparison covers trained weights.
  EXPECT_GT(a.at("controlnet_mid_block.weight").abs().max().item<float>(), 0.0f);
}

// Data parallelism rests on this: the gradient of a batch's mean loss is the mean of the per-row gradients.
// (At 8x8 latents the tiny UNet's deepest GroupNorms see 2 numbers each and the check fails at 2e-3 from float
// rounding alone; 16x16 latents are well conditioned.)
TEST(ControlNetRecipeTiny, BatchGradientIsTheMeanOfRowGradients) {
  auto m = fresh_models();
  torch::manual_seed(0);
  auto recipe = std::make_shared<training::ControlNetRecipe>(m, training::controlnet_from_unet(m->unet));
  training::TrainConfig cfg;
  recipe->setup(cfg);
  {  // non-zero zero-convs so that every part of the net gets a gradient
    at::NoGradGuard ng;
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(8);
    for (auto& p : recipe->trainable_parameters()) p.tensor.add_(at::randn(p.tensor.sizes(), g) * 0.02);
  }
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(6);
  const at::Tensor noisy = at::randn({2, 4, 16, 16}, g), ehs = at::randn({2, 77, 32}, g),
                   eps = at::randn({2, 4, 16, 16}, g);
  const at::Tensor t = at::tensor({700, 30}, at::kLong);
  training::Batch b;
  b.conditioning = at::rand({2, 3, 128, 128}, g);
  auto grads = [&](int64_t first, int64_t n) {
    for (auto& p : recipe->trainable_parameters()) p.tensor.mutable_grad() = at::Tensor();
    training::Batch part;
    part.conditioning = b.conditioning.narrow(0, first, n);
    const at::Tensor pred =
        recipe->predict(noisy.narrow(0, first, n), t.narrow(0, first, n), ehs.narrow(0, first, n), part);
    at::mse_loss(pred, eps.narrow(0, first, n)).backward();
    std::vector<at::Tensor> v;
    for (auto& p : recipe->trainable_parameters()) v.push_back(p.tensor.grad().reshape({-1}).clone());
    return at::cat(v);
  };
  {
    at::NoGradGuard ng;
    training::Batch p0, p1;
    p0.conditioning = b.conditioning.narrow(0, 0, 1);
    p1.conditioning = b.conditioning.narrow(0, 1, 1);
    const at::Tensor full = recipe->predict(noisy, t, ehs, b);
    const at::Tensor rows =
        at::cat({recipe->predict(noisy.narrow(0, 0, 1), t.narrow(0, 0, 1), ehs.narrow(0, 0, 1), p0),
                 recipe->predict(noisy.narrow(0, 1, 1), t.narrow(0, 1, 1), ehs.narrow(0, 1, 1), p1)});
    DMX_EXPECT_CLOSE("prediction of a batch of 2 vs its rows", rows, full, 1e-5);
    models::ControlNetInputs ci;
    ci.sample = noisy;
    ci.timestep = t;
    ci.encoder_hidden_states = ehs;
    ci.controlnet_cond = b.conditioning;
    const auto res = recipe->controlnet()->forward(ci);
    ci.sample = noisy.narrow(0, 1, 1);
    ci.timestep = t.narrow(0, 1, 1);
    ci.encoder_hidden_states = ehs.narrow(0, 1, 1);
    ci.controlnet_cond = b.conditioning.narrow(0, 1, 1);
    const auto res1 = recipe->controlnet()->forward(ci);
    DMX_EXPECT_CLOSE("ControlNet mid residual, row 1 of a batch of 2 vs alone", res1.mid_block_res_sample,
                     res.mid_block_res_sample.narrow(0, 1, 1), 1e-5);
    DMX_EXPECT_CLOSE("ControlNet first residual, row 1 of a batch of 2 vs alone", res1.down_block_res_samples[0],
                     res.down_block_res_samples[0].narrow(0, 1, 1), 1e-5);
  }
  const at::Tensor both = grads(0, 2), r0 = grads(0, 1), r1 = grads(1, 1);
  DMX_EXPECT_CLOSE("batch-of-2 gradient vs mean of the 2 row gradients", (r0 + r1) / 2, both, 1e-5);
}

// --gradient-checkpointing recomputes the ControlNet's and the UNet's blocks in backward: the same gradients.
TEST(ControlNetRecipeTiny, GradientCheckpointingGivesTheSameGradients) {
  auto m = fresh_models();
  torch::manual_seed(0);
  auto recipe = std::make_shared<training::ControlNetRecipe>(m, training::controlnet_from_unet(m->unet));
  training::TrainConfig cfg;
  recipe->setup(cfg);
  {  // non-zero zero-convs so that every part of the net gets a gradient
    at::NoGradGuard ng;
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(8);
    for (auto& p : recipe->trainable_parameters()) p.tensor.add_(at::randn(p.tensor.sizes(), g) * 0.02);
  }
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(6);
  const at::Tensor noisy = at::randn({2, 4, 16, 16}, g), ehs = at::randn({2, 77, 32}, g),
                   eps = at::randn({2, 4, 16, 16}, g);
  const at::Tensor t = at::tensor({700, 30}, at::kLong);
  training::Batch b;
  b.conditioning = at::rand({2, 3, 128, 128}, g);
  auto grads = [&](bool ckpt) {
    recipe->controlnet()->set_gradient_checkpointing(ckpt);
    m->unet->set_gradient_checkpointing(ckpt);
    for (auto& p : recipe->trainable_parameters()) p.tensor.mutable_grad() = at::Tensor();
    at::mse_loss(recipe->predict(noisy, t, ehs, b), eps).backward();
    std::vector<at::Tensor> v;
    for (auto& p : recipe->trainable_parameters()) v.push_back(p.tensor.grad().reshape({-1}).clone());
    return at::cat(v);
  };
  const at::Tensor plain = grads(false), ckpt = grads(true);
  EXPECT_GT(plain.abs().min().item<double>() + plain.abs().max().item<double>(), 0.0);
  DMX_EXPECT_CLOSE("ControlNet gradients with gradient checkpointing vs without", ckpt, plain, 1e-6);
  // setup() switches it on for both nets.
  cfg.gradient_checkpointing = true;
  recipe->setup(cfg);
  EXPECT_TRUE(recipe->controlnet()->gradient_checkpointing());
  EXPECT_TRUE(m->unet->gradient_checkpointing());
}

// --mixed-precision bf16: frozen UNet / VAE / text encoder in bf16, the ControlNet's float32 weights train and the
// loss on a fixed batch goes down; validation images (float32 pipeline) are written in the middle of the run.
TEST(ControlNetRecipeTiny, BF16FrozenModelTrainsFloat32ControlNetAndWritesValidationImages) {
  const std::string data = make_cn_data("cn_bf16_data", 2);
  auto m = fresh_models();
  torch::manual_seed(0);
  auto recipe = std::make_shared<training::ControlNetRecipe>(m, training::controlnet_from_unet(m->unet));
  training::DatasetOptions d;
  d.dir = data;
  d.resolution = 128;
  d.require_conditioning = true;
  auto ds = std::make_shared<training::ImageCaptionDataset>(d);
  auto source = std::make_shared<training::DatasetBatchSource>(ds, 2, 0, 1, 0, /*shuffle=*/false);
  training::TrainConfig cfg;
  cfg.output_dir = test::temp_dir() + "/cn_bf16";
  fs::remove_all(cfg.output_dir);
  cfg.max_train_steps = 8;
  cfg.train_batch_size = 2;
  cfg.learning_rate = 2e-3;
  cfg.mixed_precision = training::MixedPrecision::BF16;
  cfg.gradient_checkpointing = true;
  cfg.save_final_checkpoint = false;
  cfg.validation_steps = 4;
  cfg.validation_prompt = "a striped thing";
  cfg.validation_inference_steps = 2;
  cfg.sample_images = api::pipeline_sampler();
  cfg.quiet = true;
  EXPECT_THROW(training::Trainer(cfg, recipe, source).run(), InvalidArgument);  // no validation image yet
  recipe->set_validation_image(ds->get(0, 0).conditioning.unsqueeze(0));
  EXPECT_THROW(recipe->set_validation_image(at::rand({1, 3, 60, 64})), InvalidArgument);
  const training::Batch b = source->get(0);
  recipe->setup(cfg);
  const double before = fixed_draw_loss(*recipe, b, 99);
  training::Trainer trainer(cfg, recipe, source);
  const training::TrainResult r = trainer.run();
  const double after = fixed_draw_loss(*recipe, b, 99);
  std::printf("[controlnet bf16] fixed-draw loss before %.5f after %.5f; step losses:", before, after);
  for (const auto& h : r.history) std::printf(" %.4f", h.loss);
  std::printf("\n");
  EXPECT_EQ(r.steps, 8);
  EXPECT_LT(after, before);
  for (const auto& h : r.history) EXPECT_TRUE(std::isfinite(h.loss));
  EXPECT_EQ(m->unet->parameters().front().scalar_type(), at::kBFloat16);
  EXPECT_EQ(m->vae->parameters().front().scalar_type(), at::kBFloat16);
  EXPECT_EQ(m->text_encoder->parameters().front().scalar_type(), at::kBFloat16);
  for (const auto& p : recipe->trainable_parameters()) EXPECT_EQ(p.tensor.scalar_type(), at::kFloat) << p.name;
  EXPECT_GT(recipe->controlnet()->named_parameters()["controlnet_mid_block.weight"].abs().max().item<float>(), 0.0f);
  for (const char* f : {"/validation-000004-0.png", "/validation-000008-0.png"}) {
    ASSERT_TRUE(fs::exists(cfg.output_dir + f)) << f;
    const Image img = load_image(cfg.output_dir + f, "validation image");
    EXPECT_EQ(img.width, 128);
    EXPECT_EQ(img.height, 128);
  }
}

// dmx::train controlnet with validation_image (at its own size) and the default (the first row's conditioning image
// at the training resolution), with bf16 and gradient checkpointing.
TEST(ControlNetRecipeTiny, ValidationImagesWithBF16AndCheckpointing) {
  const std::string model = test::tiny_model_dir("sd15");
  const std::string data = make_cn_data("cn_api_val_data", 2);
  const std::string vimg = test::temp_dir() + "/cn_val_cond.png";
  save_png(vimg, checker_image(100, 84, 3));  // -> 96 x 80
  for (const bool given : {true, false}) {
    const std::string out = test::temp_dir() + (given ? "/cn_api_val_given" : "/cn_api_val_default");
    fs::remove_all(out);
    fs::remove_all(out + ".train");
    TrainOptions o;
    o.recipe = "controlnet";
    o.model = model;
    o.data = data;
    o.output = out;
    o.steps = 1;
    o.batch_size = 1;
    o.resolution = 64;
    o.mixed_precision = "bf16";
    o.gradient_checkpointing = true;
    o.validation_steps = 1;
    o.validation_prompt = "stripes";
    o.quiet = true;
    if (given) o.validation_image = vimg;
    train(o);
    const Image img = load_image(out + ".train/validation-000001-0.png", "validation image");
    EXPECT_EQ(img.width, given ? 96 : 64);
    EXPECT_EQ(img.height, given ? 80 : 64);
    EXPECT_TRUE(fs::exists(out + "/diffusion_pytorch_model.safetensors"));
  }
  TrainOptions bad;
  bad.recipe = "controlnet";
  bad.model = model;
  bad.data = data;
  bad.output = test::temp_dir() + "/cn_api_val_bad";
  bad.validation_steps = 1;
  bad.validation_prompt = "x";
  bad.validation_image = "/nonexistent.png";
  try {
    train(bad);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--validation-image"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(bad.output));
}
