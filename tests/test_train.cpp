// Trainer, LoRA / fine-tune / DreamBooth recipes, dmx::train and `dmx train` (docs/training.md), on a tiny random
// model (tests/tiny_models.h: the fixtures' "test" architecture).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/optim/adamw.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "api/train_sampler.h"
#include "core/fs.h"
#include "core/image.h"
#include "dmx/train.h"
#include "io/safetensors.h"
#include "loaders/lora_loader.h"
#include "loaders/model_bundle.h"
#include "models/unet_2d_condition.h"
#include "nn/lora.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "train_test_util.h"
#include "training/dreambooth.h"
#include "training/finetune.h"
#include "training/lora_train.h"
#include "training/trainer.h"

namespace fs = std::filesystem;
using namespace dmx;
using namespace dmx::test;
namespace tr = dmx::training;

namespace {

std::shared_ptr<loaders::StableDiffusionModels> fresh_model(const std::string& variant = "test") {
  return load_tiny_model(variant);
}

tr::TrainConfig base_config(const std::string& name, int64_t steps) {
  tr::TrainConfig c;
  c.output_dir = temp_dir() + "/" + name;
  c.max_train_steps = steps;
  c.train_batch_size = 2;
  c.learning_rate = 1e-3;
  c.quiet = true;
  c.save_final_checkpoint = false;
  c.seed = 3;
  c.sample_images = api::pipeline_sampler();  // validation images, when a test asks for them
  return c;
}

io::TensorMap params_of(tr::Recipe& r) {
  io::TensorMap m;
  for (const auto& p : r.trainable_parameters()) m[p.name] = p.tensor.detach().clone();
  return m;
}

at::Tensor unet_out(loaders::StableDiffusionModels& m, uint64_t seed = 11) {
  at::NoGradGuard no_grad;
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  models::UNetInputs in;
  in.sample = at::randn({1, 4, 8, 8}, g, at::TensorOptions().dtype(at::kFloat));
  in.timestep = at::tensor({500}, at::kLong);
  in.encoder_hidden_states = at::randn({1, 77, m.unet->config().cross_attention_dim}, g, at::TensorOptions());
  return m.unet->forward(in);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The pieces against their definitions.

TEST(TrainMathUnit, LRSchedulesMatchDiffusersGetScheduler) {
  using tr::LRSchedule;
  EXPECT_DOUBLE_EQ(tr::lr_lambda(LRSchedule::Constant, 0, 10, 100), 1.0);
  EXPECT_DOUBLE_EQ(tr::lr_lambda(LRSchedule::ConstantWithWarmup, 0, 10, 100), 0.0);
  EXPECT_DOUBLE_EQ(tr::lr_lambda(LRSchedule::ConstantWithWarmup, 5, 10, 100), 0.5);
  EXPECT_DOUBLE_EQ(tr::lr_lambda(LRSchedule::ConstantWithWarmup, 50, 10, 100), 1.0);
  EXPECT_DOUBLE_EQ(tr::lr_lambda(LRSchedule::Linear, 55, 10, 100), 45.0 / 90.0);
  EXPECT_DOUBLE_EQ(tr::lr_lambda(LRSchedule::Linear, 100, 10, 100), 0.0);
  EXPECT_NEAR(tr::lr_lambda(LRSchedule::Cosine, 55, 10, 100), 0.5, 1e-12);  // half way: cos(pi/2)
  EXPECT_NEAR(tr::lr_lambda(LRSchedule::Cosine, 10, 10, 100), 1.0, 1e-12);
  EXPECT_THROW(tr::parse_lr_schedule("exp"), InvalidArgument);
}

TEST(TrainMathUnit, AdamWEqualsLibtorchAdamW) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor a = at::randn({5, 3}, g, at::TensorOptions()).set_requires_grad(true);
  at::Tensor b = a.detach().clone().set_requires_grad(true);
  tr::AdamWOptions o;
  o.lr = 1e-2;
  tr::AdamW mine({{"a", a}}, o);
  torch::optim::AdamW ref({b}, torch::optim::AdamWOptions(1e-2).betas({0.9, 0.999}).eps(1e-8).weight_decay(1e-2));
  for (int s = 0; s < 5; ++s) {
    const at::Tensor x = at::randn({5, 3}, g, at::TensorOptions());
    mine.zero_grad();
    ref.zero_grad();
    (a * x).pow(2).sum().backward();
    (b * x).pow(2).sum().backward();
    mine.step(1e-2);
    ref.step();
  }
  DMX_EXPECT_CLOSE("AdamW after 5 steps vs torch::optim::AdamW", a.detach(), b.detach(), 1e-6);
}

TEST(TrainMathUnit, ClipGradNormEMAAndSNR) {
  at::Tensor p = at::zeros({4}).set_requires_grad(true);
  p.mutable_grad() = at::tensor({3.0f, 4.0f, 0.0f, 0.0f});
  const double n = tr::clip_grad_norm({{"p", p}}, 1.0);
  EXPECT_DOUBLE_EQ(n, 5.0);
  EXPECT_NEAR(p.grad().norm().item<double>(), 1.0, 1e-5);

  at::Tensor w = at::ones({2});
  tr::EMAModel ema({{"w", w}}, 0.9999, 0.0, 0);
  {
    at::NoGradGuard ng;
    w.fill_(3.0);
  }
  ema.step({{"w", w}});  // first step: decay 0 -> shadow = param
  EXPECT_DOUBLE_EQ(ema.state_dict().at("ema.w")[0].item<double>(), 3.0);
  {
    at::NoGradGuard ng;
    w.fill_(5.0);
  }
  ema.step({{"w", w}});  // step 2: decay (1 + 1) / (10 + 1)
  EXPECT_NEAR(ema.state_dict().at("ema.w")[0].item<double>(), 3.0 + (1 - 2.0 / 11.0) * 2.0, 1e-6);

  const at::Tensor ac = at::tensor({0.9f, 0.5f, 0.1f});
  const at::Tensor snr = tr::compute_snr(ac, at::tensor({0, 1, 2}, at::kLong));
  EXPECT_NEAR(snr[0].item<double>(), 9.0, 1e-5);
  EXPECT_NEAR(snr[1].item<double>(), 1.0, 1e-5);
  const at::Tensor w5 = tr::min_snr_weights(snr, 5.0, "epsilon");
  EXPECT_NEAR(w5[0].item<double>(), 5.0 / 9.0, 1e-6);
  EXPECT_NEAR(w5[1].item<double>(), 1.0, 1e-6);
  const at::Tensor wv = tr::min_snr_weights(snr, 5.0, "v_prediction");
  EXPECT_NEAR(wv[0].item<double>(), 5.0 / 10.0, 1e-6);
}

// ---------------------------------------------------------------------------------------------------
// LoRA

TEST(TrainLoRATiny, ParameterCountEqualsFormula) {
  for (const char* targets : {"attention", "all"}) {
    auto m = fresh_model();
    tr::LoRATrainOptions o;
    o.rank = 3;
    o.targets = targets;
    o.train_text_encoder = true;
    tr::LoRANetwork net(*m, o, 0);
    int64_t formula = 0;
    int unet_layers = 0, te_layers = 0;
    for (const auto& L : net.layers()) {
      formula += L.conv ? 3 * (L.in * L.kh * L.kw + L.out) : 3 * (L.in + L.out);
      (L.component == loaders::LoRAComponent::UNet ? unet_layers : te_layers)++;
    }
    EXPECT_EQ(net.num_parameters(), formula) << targets;
    EXPECT_EQ(tr::lora_parameter_formula(net.layers(), 3), formula);
    std::printf("[lora] targets %s: %d UNet layers, %d text-encoder layers, %lld parameters\n", targets, unet_layers,
                te_layers, static_cast<long long>(formula));
    // The tiny UNet has 2 transformer blocks (down 1, up 0: 3 + 1 mid), each with attn1 + attn2 x 4 linears.
    if (std::string(targets) == "attention") {
      int transformers = 0;
      for (const auto& item : m->unet->named_modules("", false))
        if (item.key().size() > 6 && item.key().compare(item.key().size() - 6, 6, ".attn1") == 0) ++transformers;
      EXPECT_EQ(unet_layers, transformers * 8);
      EXPECT_EQ(te_layers, m->text_encoder->config().num_hidden_layers * 4);
    }
    // A fresh adapter (up = 0) leaves the model output unchanged.
    auto plain = fresh_model();
    DMX_EXPECT_CLOSE(std::string("fresh LoRA output (") + targets + ")", unet_out(*m), unet_out(*plain), 0.0);
  }
}

TEST(TrainLoRATiny, FewStepsLowerTheLossOnAFixedBatch) {
  auto m = fresh_model();
  tr::LoRATrainOptions o;
  o.rank = 4;
  auto recipe = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Diffusers);
  auto src = std::make_shared<MemorySource>(2, 32, 2);
  tr::TrainConfig c = base_config("loss", 12);
  c.learning_rate = 5e-3;
  recipe->setup(c);  // a fresh network (up = 0): the base model's loss
  const tr::Batch b = src->get(0);
  const double before = fixed_draw_loss(*recipe, b, 99);
  // A new recipe for the run itself (setup attaches the network).
  auto m2 = fresh_model();
  auto recipe2 = std::make_shared<tr::LoRARecipe>(m2, o, tr::LoRASaveFormat::Diffusers);
  tr::Trainer t2(c, recipe2, src);
  const tr::TrainResult r = t2.run();
  const double after = fixed_draw_loss(*recipe2, b, 99);
  std::printf("[lora] fixed-draw loss before %.5f after %.5f (%lld steps; step losses %.4f .. %.4f)\n", before, after,
              static_cast<long long>(r.steps), r.history.front().loss, r.history.back().loss);
  EXPECT_EQ(r.steps, 12);
  EXPECT_LT(after, before);
  EXPECT_TRUE(fs::exists(c.output_dir + "/train_log.jsonl"));
}

TEST(TrainLoRATiny, ResumeEqualsUninterruptedBitForBit) {
  tr::LoRATrainOptions o;
  o.rank = 2;
  o.targets = "all";
  auto run = [&](const std::string& dir, int64_t stop, const std::string& resume) {
    auto m = fresh_model();
    auto recipe = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Kohya);
    tr::TrainConfig c = base_config(dir, 4);
    c.lr_scheduler = tr::LRSchedule::Cosine;
    c.lr_warmup_steps = 1;
    c.gradient_accumulation_steps = 2;
    c.use_ema = true;
    c.snr_gamma = 5.0;
    c.noise_offset = 0.1;
    c.stop_at_step = stop;
    c.save_final_checkpoint = true;
    c.resume_from_checkpoint = resume;
    tr::Trainer t(c, recipe, std::make_shared<MemorySource>(3, 32, 2));
    const tr::TrainResult r = t.run();
    io::TensorMap p = params_of(*recipe);
    return std::make_pair(p, r);
  };
  auto [straight, r1] = run("straight", 0, "");
  auto [half, r2] = run("resumed", 2, "");
  EXPECT_EQ(r2.steps, 2);
  auto [resumed, r3] = run("resumed", 0, temp_dir() + "/resumed");
  EXPECT_EQ(r3.first_step, 2);
  EXPECT_EQ(r3.steps, 4);
  ASSERT_EQ(straight.size(), resumed.size());
  double worst = 0;
  for (const auto& [k, v] : straight) {
    ASSERT_TRUE(resumed.count(k)) << k;
    EXPECT_TRUE(at::equal(v, resumed.at(k))) << k;
    worst = std::max(worst, (v - resumed.at(k)).abs().max().item<double>());
  }
  std::printf("[resume] %zu tensors, worst |straight - resumed| = %g\n", straight.size(), worst);
  // Loss history of steps 3-4 equal too, and the optimizer / EMA state of the final checkpoints.
  EXPECT_EQ(r1.history[2].loss, r3.history[0].loss);
  EXPECT_EQ(r1.history[3].loss, r3.history[1].loss);
  const auto o1 = io::load_safetensors(temp_dir() + "/straight/checkpoint-4/optimizer.safetensors");
  const auto o3 = io::load_safetensors(temp_dir() + "/resumed/checkpoint-4/optimizer.safetensors");
  ASSERT_EQ(o1.size(), o3.size());
  for (const auto& [k, v] : o1) EXPECT_TRUE(at::equal(v, o3.at(k))) << k;
  // The trained weights moved (the test is not vacuous).
  bool moved = false;
  for (const auto& [k, v] : straight)
    if (k.find("lora_up") != std::string::npos && v.abs().max().item<double>() > 0) moved = true;
  EXPECT_TRUE(moved);
}

TEST(TrainLoRATiny, SavedFilesLoadBackAndMatchTheMergeFormula) {
  auto m = fresh_model();
  tr::LoRATrainOptions o;
  o.rank = 4;
  o.alpha = 8;  // scale 2: the factor must survive every layout
  o.targets = "all";
  o.train_text_encoder = true;
  o.text_encoder_targets = "all";
  auto recipe = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Diffusers);
  tr::TrainConfig c = base_config("save", 3);
  c.learning_rate = 1e-2;
  tr::Trainer t(c, recipe, std::make_shared<MemorySource>(2, 32, 2));
  t.run();
  auto& net = recipe->network();
  const at::Tensor trained_out = unet_out(*m);  // runtime adapters of the training network
  const int n_layers = static_cast<int>(net.layers().size());

  // Expected: a fresh model with W += alpha / r * up @ down, patched by hand.
  auto manual = fresh_model();
  {
    at::NoGradGuard ng;
    std::map<std::string, at::Tensor> weights;
    for (const auto& item : manual->unet->named_parameters(true)) weights["unet." + item.key()] = item.value();
    for (const auto& item : manual->text_encoder->named_parameters(true))
      weights["text_encoder." + item.key()] = item.value();
    for (const auto& L : net.layers()) {
      const std::string key =
          std::string(L.component == loaders::LoRAComponent::UNet ? "unet." : "text_encoder.") + L.module + ".weight";
      at::Tensor& w = weights.at(key);
      const at::Tensor d = at::matmul(L.up.detach().reshape({L.out, -1}), L.down.detach().reshape({4, -1}));
      w.add_(d.reshape(w.sizes()) * 2.0);
    }
  }
  const at::Tensor manual_out = unet_out(*manual);
  DMX_EXPECT_CLOSE("training network (runtime) vs W + alpha/r * B@A", trained_out, manual_out, 1e-5);
  EXPECT_GT((manual_out - unet_out(*fresh_model())).abs().max().item<double>(), 0.0);

  for (const char* fmt : {"diffusers", "peft", "kohya"}) {
    const std::string dir = temp_dir() + "/save-" + fmt;
    fs::create_directories(dir);
    const std::string path = dir + "/trained.safetensors";
    net.save(path, tr::parse_lora_save_format(fmt));
    const io::TensorMap file = io::load_safetensors(path);
    for (const auto& [k, v] : file) {
      const std::string f = fmt;
      if (f == "kohya") {
        EXPECT_TRUE((k.rfind("lora_unet_", 0) == 0 || k.rfind("lora_te_", 0) == 0) &&
                    (k.find(".lora_down.weight") != std::string::npos ||
                     k.find(".lora_up.weight") != std::string::npos ||
                     (k.size() > 6 && k.compare(k.size() - 6, 6, ".alpha") == 0)))
            << k;
      } else if (f == "diffusers") {
        EXPECT_TRUE((k.rfind("unet.", 0) == 0 && k.find(".lora.") != std::string::npos) ||
                    (k.rfind("text_encoder.", 0) == 0 && k.find(".lora_linear_layer.") != std::string::npos))
            << k;
      } else {
        EXPECT_TRUE(k.find(".lora_A.weight") != std::string::npos || k.find(".lora_B.weight") != std::string::npos)
            << k;
      }
    }
    auto loaded = fresh_model();
    loaders::LoRAApplyOptions ao;
    ao.mode = loaders::LoRAMode::Merged;
    const auto reps = loaders::apply_loras(*loaded, {loaders::parse_lora_arg(path)}, ao);  // strict
    ASSERT_EQ(reps.size(), 1u);
    EXPECT_TRUE(reps[0].unmatched.empty());
    EXPECT_EQ(reps[0].unet_layers + reps[0].text_encoder_layers, n_layers) << fmt;
    EXPECT_EQ(reps[0].format, fmt);
    DMX_EXPECT_CLOSE(std::string("loaded ") + fmt + " LoRA (merged) vs W + alpha/r * B@A", unet_out(*loaded),
                     manual_out, 1e-5);
    loaders::set_lora_mode(*loaded, loaders::LoRAMode::Runtime);
    DMX_EXPECT_CLOSE(std::string("loaded ") + fmt + " LoRA (runtime) vs W + alpha/r * B@A", unet_out(*loaded),
                     manual_out, 1e-5);
  }
}

TEST(TrainLoRATiny, GradientCheckpointingGivesTheSameGradients) {
  auto grads = [&](bool ckpt) {
    auto m = fresh_model();
    tr::LoRATrainOptions o;
    o.rank = 2;
    o.targets = "all";
    o.init = "gaussian";
    auto recipe = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Diffusers);
    tr::TrainConfig c = base_config(ckpt ? "ckpt1" : "ckpt0", 1);
    c.gradient_checkpointing = ckpt;
    recipe->setup(c);
    // one step by hand with a non-zero up so every factor gets a gradient
    {
      at::NoGradGuard ng;
      at::Generator pg = at::make_generator<at::CPUGeneratorImpl>(17);
      for (auto& p : recipe->trainable_parameters()) p.tensor.normal_(0.0, 0.05, pg);
    }
    MemorySource src(2, 32, 2);
    const tr::Batch b = src.get(0);
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(5);
    const at::Tensor x = at::randn({2, 4, 4, 4}, g, at::TensorOptions());
    const at::Tensor t = at::tensor({100, 700}, at::kLong);
    const at::Tensor pred = recipe->predict(x, t, recipe->encode_prompt(b), b);
    pred.pow(2).mean().backward();
    io::TensorMap out;
    for (auto& p : recipe->trainable_parameters()) out[p.name] = p.tensor.grad().clone();
    return out;
  };
  const io::TensorMap a = grads(false), b = grads(true);
  ASSERT_EQ(a.size(), b.size());
  at::Tensor fa = at::cat([&] {
    std::vector<at::Tensor> v;
    for (auto& [k, t] : a) v.push_back(t.flatten());
    return v;
  }());
  at::Tensor fb = at::cat([&] {
    std::vector<at::Tensor> v;
    for (auto& [k, t] : b) v.push_back(t.flatten());
    return v;
  }());
  EXPECT_GT(fa.abs().max().item<double>(), 0.0);
  DMX_EXPECT_CLOSE("LoRA gradients with gradient checkpointing vs without", fb, fa, 1e-5);
}

TEST(TrainLoRATiny, BF16FrozenModelTrainsFloat32Adapters) {
  auto m = fresh_model();
  tr::LoRATrainOptions o;
  auto recipe = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Diffusers);
  tr::TrainConfig c = base_config("bf16", 2);
  c.mixed_precision = tr::MixedPrecision::BF16;
  tr::Trainer t(c, recipe, std::make_shared<MemorySource>(2, 32, 2));
  const tr::TrainResult r = t.run();
  EXPECT_TRUE(std::isfinite(r.history.back().loss));
  EXPECT_EQ(m->unet->parameters().front().scalar_type(), at::kBFloat16);
  for (const auto& p : recipe->trainable_parameters()) {
    EXPECT_EQ(p.tensor.scalar_type(), at::kFloat);
  }
  bool moved = false;
  for (const auto& p : recipe->trainable_parameters())
    if (p.name.find("lora_up") != std::string::npos && p.tensor.abs().max().item<double>() > 0) moved = true;
  EXPECT_TRUE(moved);
}

// ---------------------------------------------------------------------------------------------------
// Fine-tune and DreamBooth

// --mixed-precision bf16 fine-tuning: the UNet's weights stay float32 masters, its forward runs under bf16
// autocast (so the first loss differs from float32's by bf16 rounding, and only by that), and autocast is off
// again after the step.
TEST(TrainFinetuneTiny, BF16AutocastForwardFloat32Masters) {
  auto run = [](const char* name, bool bf16) {
    auto m = fresh_model();
    auto recipe = std::make_shared<tr::FinetuneRecipe>(m, false);
    tr::TrainConfig c = base_config(name, 2);
    c.learning_rate = 1e-4;
    if (bf16) c.mixed_precision = tr::MixedPrecision::BF16;
    const at::Tensor before = m->unet->parameters().front().detach().clone();
    const tr::TrainResult r = tr::Trainer(c, recipe, std::make_shared<MemorySource>(2, 32, 2)).run();
    EXPECT_EQ(m->unet->parameters().front().scalar_type(), at::kFloat);
    EXPECT_FALSE(at::equal(before, m->unet->parameters().front().detach()));  // the masters moved
    EXPECT_FALSE(at::autocast::is_cpu_enabled());
    return r.history.front().loss;
  };
  const double l32 = run("ft-fp32", false), l16 = run("ft-bf16", true);
  std::printf("[check] first fine-tuning loss: float32 %.6f, bf16 autocast %.6f\n", l32, l16);
  ASSERT_TRUE(std::isfinite(l16));
  EXPECT_NE(l16, l32);                          // the forward did run in bf16
  EXPECT_NEAR(l16, l32, 0.05 * std::abs(l32));  // ... and bf16 rounding is all that changed
}

TEST(TrainFinetuneTiny, SavesADiffusersFolderThatLoads) {
  auto m = fresh_model();
  auto recipe = std::make_shared<tr::FinetuneRecipe>(m, /*train_text_encoder=*/true);
  tr::TrainConfig c = base_config("finetune", 2);
  c.learning_rate = 1e-4;
  c.use_ema = true;
  c.output = temp_dir() + "/finetuned";
  tr::Trainer t(c, recipe, std::make_shared<MemorySource>(2, 32, 2));
  const tr::TrainResult r = t.run();
  EXPECT_EQ(r.steps, 2);
  auto loaded = loaders::load_stable_diffusion(c.output);
  // The saved UNet holds the EMA weights: compare with the EMA of the last checkpoint... the saved folder
  // must differ from the base model and load strictly.
  const at::Tensor base = unet_out(*fresh_model());
  const at::Tensor out = unet_out(*loaded);
  EXPECT_GT((out - base).abs().max().item<double>(), 0.0);
  EXPECT_TRUE(fs::exists(c.output + "/model_index.json"));
  EXPECT_TRUE(fs::exists(c.output + "/tokenizer/vocab.json"));
  // Without EMA, the saved weights are the trained ones exactly.
  auto m2 = fresh_model();
  auto recipe2 = std::make_shared<tr::FinetuneRecipe>(m2, false);
  tr::TrainConfig c2 = base_config("finetune2", 1);
  c2.output = temp_dir() + "/finetuned2";
  tr::Trainer t2(c2, recipe2, std::make_shared<MemorySource>(2, 32, 2));
  t2.run();
  auto loaded2 = loaders::load_stable_diffusion(c2.output);
  DMX_EXPECT_CLOSE("finetuned UNet reloaded from the diffusers folder", unet_out(*loaded2), unet_out(*m2), 0.0);
}

TEST(TrainDreamBoothTiny, PriorPreservationGeneratesClassImagesAndTrains) {
  auto m = fresh_model();
  const std::string cls = temp_dir() + "/class";
  tr::ClassImageOptions ci;
  ci.dir = cls;
  ci.prompt = "a photo of a dog";
  ci.num_class_images = 2;
  ci.resolution = 32;
  ci.num_inference_steps = 2;
  EXPECT_EQ(tr::generate_class_images(m, ci, api::pipeline_sampler()), 2);
  EXPECT_EQ(tr::list_images(cls).size(), 2u);
  EXPECT_EQ(tr::generate_class_images(m, ci, api::pipeline_sampler()), 0);  // folder already full
  ci.num_class_images = 3;
  EXPECT_EQ(tr::generate_class_images(m, ci, api::pipeline_sampler()), 1);  // short by one

  // Prior loss: instance rows then class rows.
  tr::LoRATrainOptions o;
  auto inner = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Kohya);
  auto db = std::make_shared<tr::DreamBoothRecipe>(inner, true, 0.5);
  tr::Batch b;
  const at::Tensor per = at::tensor({1.0f, 3.0f, 10.0f, 20.0f});
  EXPECT_NEAR(db->reduce_loss(per, b).item<double>(), 2.0 + 0.5 * 15.0, 1e-6);
  // A short run on instance + class rows (an in-memory source of 2 + 2 rows).
  struct TwoPart : MemorySource {
    TwoPart() : MemorySource(4, 32, 4) {
      captions = {"a photo of sks dog", "a photo of sks dog", "a photo of a dog", "a photo of a dog"};
    }
  };
  tr::TrainConfig c = base_config("dreambooth", 2);
  c.train_batch_size = 2;
  c.output = temp_dir() + "/db.safetensors";
  tr::Trainer t(c, db, std::make_shared<TwoPart>());
  const tr::TrainResult r = t.run();
  EXPECT_EQ(r.steps, 2);
  EXPECT_TRUE(fs::exists(c.output));
  EXPECT_EQ(db->name(), "dreambooth-lora");
}

// ---------------------------------------------------------------------------------------------------
// dmx::train (what `dmx train` runs) and the command

TEST(TrainTiny, BadInputNamesTheFlagAndWritesNothing) {
  const std::string model = tiny_model_dir("test");
  const std::string data = temp_dir() + "/cli-data";
  fs::create_directories(data);
  const std::string out = temp_dir() + "/cli-out.safetensors";
  // Through the API (the CLI maps every InvalidArgument to exit 2; TrainCli.ExitCodes checks that once):
  // validate_train_options, and train() itself, which validates before it loads or writes anything.
  auto expect_invalid = [&](TrainOptions o, const std::string& needle) {
    try {
      validate_train_options(o);
      ADD_FAILURE() << "expected InvalidArgument naming " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    try {
      train(o);
      ADD_FAILURE() << "train: expected InvalidArgument naming " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(out));
    EXPECT_FALSE(fs::exists(out + ".train"));
  };
  TrainOptions lo;
  lo.recipe = "lora";
  lo.model = model;
  lo.data = data;
  lo.output = out;
  validate_train_options(lo);  // the base case is valid
  auto with = [&](auto f) {
    TrainOptions o = lo;
    f(o);
    return o;
  };
  expect_invalid(with([](TrainOptions& o) { o.data.clear(); }), "--data");
  expect_invalid(with([](TrainOptions& o) { o.rank = 0; }), "--rank");
  expect_invalid(with([](TrainOptions& o) { o.steps = 0; }), "--steps");
  expect_invalid(with([](TrainOptions& o) { o.save_format = "ckpt"; }), "--save-format");
  expect_invalid(with([](TrainOptions& o) { o.recipe = "sdxl"; }), "recipe");
  expect_invalid(with([](TrainOptions& o) { o.rank = -3; }), "--rank");
  expect_invalid(with([](TrainOptions& o) { o.lr_scheduler = "exp"; }), "--lr-scheduler");
  expect_invalid(with([&](TrainOptions& o) { o.data = data + "/missing"; }), "--data");
  expect_invalid(with([](TrainOptions& o) { o.batch_size = 0; }), "--batch-size");
  expect_invalid(with([](TrainOptions& o) { o.resolution = 30; }), "--resolution");
  expect_invalid(with([](TrainOptions& o) { o.mixed_precision = "fp8"; }), "--mixed-precision");
  expect_invalid(with([](TrainOptions& o) { o.lora_targets = "mlp"; }), "--lora-targets");
  expect_invalid(with([](TrainOptions& o) { o.output = "/nonexistent-dir/x.safetensors"; }), "--output");
  expect_invalid(with([](TrainOptions& o) { o.snr_gamma = -1; }), "--snr-gamma");
  expect_invalid(with([](TrainOptions& o) { o.validation_steps = 5; }), "--validation-prompt");
  TrainOptions db = lo;
  db.recipe = "dreambooth";
  db.data = "";
  db.instance_data = data;
  expect_invalid(db, "--instance-prompt");
  db.instance_prompt = "a photo of sks dog";
  db.class_data = data;
  expect_invalid(db, "--class-prompt");
  db.class_prompt = "a photo of a dog";
  db.lora_rank = -1;
  expect_invalid(db, "--lora-rank");
}

// The command: an unknown recipe and a rule the API checks both exit 2 and write nothing. (Runs that exit 0:
// TrainDistributedCli.)
TEST(TrainCli, ExitCodes) {
  const std::string data = temp_dir() + "/cli-data";
  fs::create_directories(data);
  const std::string out = temp_dir() + "/cli-out.safetensors";
  for (const auto& [args, needle] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"train", "sdxl"}, "recipe"},
           {{"train", "lora", "--model", tiny_model_dir("test"), "--data", data, "--output", out, "--rank", "0"},
            "--rank"}}) {
    const CliRun r = dmx_run(args);
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
    EXPECT_FALSE(fs::exists(out));
    EXPECT_FALSE(fs::exists(out + ".train"));
  }
}

TEST(TrainTiny, LoRAOnAnImageFolderWritesAFileTheLoaderTakes) {
  const std::string data = temp_dir() + "/cli-images";
  fs::create_directories(data);
  // Two images with captions, drawn with the tiny model itself.
  auto m = fresh_model();
  tr::ClassImageOptions ci;
  ci.dir = data;
  ci.prompt = "a red square";
  ci.num_class_images = 2;
  ci.resolution = 32;
  ci.num_inference_steps = 1;
  tr::generate_class_images(m, ci, api::pipeline_sampler());
  for (const auto& img : tr::list_images(data)) {
    const std::string txt = img.substr(0, img.size() - 4) + ".txt";
    const std::string cap = "a red square";
    write_bytes_atomic(txt, cap.data(), cap.size());
  }
  const std::string out = temp_dir() + "/cli-lora.safetensors";
  TrainOptions o;
  o.recipe = "lora";
  o.model = tiny_model_dir("test");
  o.data = data;
  o.output = out;
  o.resolution = 32;
  o.steps = 2;
  o.batch_size = 2;
  o.save_format = "kohya";
  o.checkpoint_every = 1;
  o.quiet = true;
  const TrainReport rep = train(o);
  EXPECT_EQ(rep.steps, 2);
  EXPECT_EQ(rep.output, out);
  EXPECT_TRUE(fs::exists(out));
  EXPECT_TRUE(fs::exists(out + ".train/checkpoint-1/trainer_state.json"));
  EXPECT_TRUE(fs::exists(out + ".train/checkpoint-2/optimizer.safetensors"));
  EXPECT_TRUE(fs::exists(out + ".train/train_log.jsonl"));
  auto loaded = fresh_model();
  const auto reps = loaders::apply_loras(*loaded, {loaders::parse_lora_arg(out)}, {});
  EXPECT_TRUE(reps[0].unmatched.empty());
  EXPECT_GT(reps[0].unet_layers, 0);
}

namespace {
// `count` captioned images drawn by the tiny model itself.
std::string make_image_folder(const std::string& name, int count) {
  const std::string data = temp_dir() + "/" + name;
  fs::create_directories(data);
  auto m = fresh_model();
  const char* caps[] = {"a red square", "a blue circle", "a green cat", "a photo of a dog"};
  for (int k = 0; k < count; ++k) {
    tr::ClassImageOptions ci;
    ci.dir = data;
    ci.prompt = caps[k % 4];
    ci.num_class_images = k + 1;
    ci.resolution = 32;
    ci.num_inference_steps = 1;
    ci.seed = static_cast<uint64_t>(k);
    tr::generate_class_images(m, ci, api::pipeline_sampler());
  }
  const auto imgs = tr::list_images(data);
  for (size_t k = 0; k < imgs.size(); ++k) {
    const std::string txt = imgs[k].substr(0, imgs[k].size() - 4) + ".txt";
    const std::string cap = caps[k % 4];
    write_bytes_atomic(txt, cap.data(), cap.size());
  }
  return data;
}
}  // namespace

// --cache-latents: each image is encoded once, alone; with one image per batch that is exactly what the
// uncached loop computes, so the trained weights are bitwise equal. Random flips make the cache invalid.
TEST(TrainLoRATiny, CachedLatentsTrainExactlyLikeUncached) {
  const std::string data = make_image_folder("cache-images", 3);
  auto run = [&](const std::string& dir, bool cache, bool flip) {
    auto m = fresh_model();
    tr::LoRATrainOptions o;
    o.rank = 2;
    auto recipe = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Kohya);
    tr::TrainConfig c = base_config(dir, 4);
    c.train_batch_size = 1;
    c.cache_latents = cache;
    tr::DatasetOptions d;
    d.dir = data;
    d.resolution = 32;
    d.random_flip = flip;
    auto ds = std::make_shared<tr::ImageCaptionDataset>(d);
    tr::Trainer t(c, recipe, std::make_shared<tr::DatasetBatchSource>(ds, 1, 0, 1, 5));
    t.run();
    return params_of(*recipe);
  };
  const io::TensorMap plain = run("cache-off", false, false);
  const io::TensorMap cached = run("cache-on", true, false);
  ASSERT_EQ(plain.size(), cached.size());
  bool moved = false;
  for (const auto& [k, v] : plain) {
    EXPECT_TRUE(at::equal(v, cached.at(k))) << k;
    if (k.find("lora_up") != std::string::npos && v.abs().max().item<double>() > 0) moved = true;
  }
  EXPECT_TRUE(moved);
  try {
    run("cache-flip", true, true);
    FAIL() << "--cache-latents with random flips must be refused";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--cache-latents"), std::string::npos) << e.what();
  }
}

// Acceptance: 2 processes on loopback (Gloo, torchrun's variables) give the weights of 1 process with the same
// global batch. Skips while this build lacks the dataset or c10d (dist branch).
// The two runs sum the same gradients in a different order, so they differ at float rounding level; AdamW
// divides by sqrt(v) + eps, which with the default eps 1e-8 turns rounding noise in near-zero gradient components
// (|g| ~ 1e-9) into updates of up to lr: how far depends on the CPU's kernels (within 1e-5 on the AMD EPYC machines,
// 1.3e-5 on an Intel Xeon with AMX, at lr 1e-4; 3e-4 at lr 1e-2), not on the data-parallel code. An eps of 1e-3
// keeps the update linear in such components, so the comparison measures the summed gradients at rounding level.
namespace {
// Runs `dmx <common> --batch-size 2*per_rank --output one` in one process and `dmx <common> --batch-size per_rank
// --output two` as 2 ranks on loopback; returns false (after GTEST_SKIP) when this build lacks the pieces.
bool run_one_and_two_processes(const std::vector<std::string>& common, int per_rank, const std::string& one,
                               const std::string& two) {
  std::vector<std::string> a1 = common;
  a1.insert(a1.end(), {"--batch-size", std::to_string(2 * per_rank), "--output", one});
  const CliRun r1 = dmx_run(a1);
  if (r1.code == 2 && r1.output.find("dataset.cpp is missing") != std::string::npos) {
    ADD_FAILURE() << "the image-caption dataset is not in this build";
    return false;
  }
  EXPECT_EQ(r1.code, 0) << r1.output;
  if (r1.code != 0) return false;
  const std::string tag = fs::path(two).stem().string();
  const int port = 20000 + static_cast<int>((getpid() + 7919 * tag.size()) % 20000);
  std::string cmd;
  for (int rank = 0; rank < 2; ++rank) {
    const std::string base = temp_dir() + "/" + tag + "-rank" + std::to_string(rank);
    cmd += "( env WORLD_SIZE=2 RANK=" + std::to_string(rank) + " LOCAL_RANK=" + std::to_string(rank) +
           " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " '" + cli_path() + "'";
    for (const auto& x : common) cmd += " '" + x + "'";
    cmd += " --batch-size " + std::to_string(per_rank) + " --output '" + two + "' > '" + base +
           ".log' 2>&1; echo $? > '" + base + ".rc' ) & ";
  }
  cmd += "wait";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  for (int rank = 0; rank < 2; ++rank) {
    const std::string base = temp_dir() + "/" + tag + "-rank" + std::to_string(rank);
    const std::string log = read_text_file(base + ".log", "log", dmx::kMaxJsonFileBytes);
    const std::string rc = read_text_file(base + ".rc", "rc", dmx::kMaxJsonFileBytes);
    EXPECT_EQ(std::atoi(rc.c_str()), 0) << "rank " << rank << ": " << log;
    if (std::atoi(rc.c_str()) != 0) return false;
  }
  return true;
}

// Two LoRA files as one flat vector each (kohya .alpha entries must be equal and are left out).
void expect_same_lora_weights(const std::string& what, const std::string& one, const std::string& two, double tol) {
  const io::TensorMap w1 = io::load_safetensors(one), w2 = io::load_safetensors(two);
  ASSERT_EQ(w1.size(), w2.size());
  std::vector<at::Tensor> f1, f2;
  for (const auto& [k, v] : w1) {
    ASSERT_TRUE(w2.count(k)) << k;
    if (k.size() > 6 && k.compare(k.size() - 6, 6, ".alpha") == 0) {
      EXPECT_TRUE(at::equal(v, w2.at(k))) << k;
      continue;
    }
    f1.push_back(v.flatten());
    f2.push_back(w2.at(k).flatten());
  }
  DMX_EXPECT_CLOSE(what, at::cat(f2), at::cat(f1), tol);
  // The run moved the weights (lora_up starts at zero).
  EXPECT_GT(at::cat(f1).abs().max().item<double>(), 0.0);
}
}  // namespace

TEST(TrainDistributedCli, TwoProcessesOnLoopbackEqualOneProcessWithTheGlobalBatch) {
  const std::string data = make_image_folder("dist-images", 4);
  const std::vector<std::string> common = {"train",
                                           "lora",
                                           "--model",
                                           tiny_model_dir("test"),
                                           "--data",
                                           data,
                                           "--resolution",
                                           "32",
                                           "--steps",
                                           "3",
                                           "--learning-rate",
                                           "1e-4",
                                           "--adam-epsilon",
                                           "1e-3",
                                           "--save-format",
                                           "kohya",
                                           "--lora-targets",
                                           "all",
                                           "--seed",
                                           "5",
                                           "--quiet",
                                           "--threads",
                                           "1"};
  const std::string one = temp_dir() + "/dist-one.safetensors", two = temp_dir() + "/dist-two.safetensors";
  if (!run_one_and_two_processes(common, 2, one, two)) return;
  expect_same_lora_weights("2 processes x batch 2 vs 1 process x batch 4 (LoRA weights after 3 steps)", one, two, 1e-5);
}

// DreamBooth with prior preservation: the global batch is the single-process one (4 instance rows, then 4 class
// rows); with 2 ranks x 2 rank 0 holds the 4 instance rows and rank 1 the 4 class rows, and reduce_loss weighs each
// share so that the mean over ranks is mean(instance) + w * mean(class). Random flips check that every row keeps its
// single-process augmentation.
TEST(TrainDistributedCli, DreamBoothPriorPreservationTwoProcessesEqualOneProcess) {
  const std::string inst = make_image_folder("dist-db-instance", 3);
  const std::string cls = make_image_folder("dist-db-class", 5);
  const std::vector<std::string> common = {"train",
                                           "dreambooth",
                                           "--model",
                                           tiny_model_dir("test"),
                                           "--instance-data",
                                           inst,
                                           "--instance-prompt",
                                           "a photo of sks dog",
                                           "--class-data",
                                           cls,
                                           "--class-prompt",
                                           "a photo of a dog",
                                           "--num-class-images",
                                           "5",
                                           "--prior-loss-weight",
                                           "0.5",
                                           "--lora-rank",
                                           "2",
                                           "--lora-targets",
                                           "all",
                                           "--save-format",
                                           "kohya",
                                           "--resolution",
                                           "32",
                                           "--random-flip",
                                           "--steps",
                                           "3",
                                           "--learning-rate",
                                           "1e-4",
                                           "--seed",
                                           "9",
                                           "--quiet",
                                           "--threads",
                                           "1"};
  const std::string one = temp_dir() + "/dist-db-one.safetensors", two = temp_dir() + "/dist-db-two.safetensors";
  if (!run_one_and_two_processes(common, 2, one, two)) return;
  expect_same_lora_weights("DreamBooth + prior: 2 processes x batch 2 vs 1 process x batch 4 (3 steps)", one, two,
                           1e-5);
}

TEST(TrainLoRATiny, ValidationImagesJsonlLogAndCheckpointRotation) {
  auto m = fresh_model();
  auto recipe = std::make_shared<tr::LoRARecipe>(m, tr::LoRATrainOptions{}, tr::LoRASaveFormat::PEFT);
  tr::TrainConfig c = base_config("validation", 3);
  c.output = temp_dir() + "/validation/out.safetensors";
  c.validation_steps = 2;
  c.validation_prompt = "a cat";
  c.validation_inference_steps = 2;
  c.checkpointing_steps = 1;
  c.checkpoints_total_limit = 2;
  c.save_final_checkpoint = true;
  tr::Trainer t(c, recipe, std::make_shared<MemorySource>(2, 32, 2));
  t.run();
  EXPECT_TRUE(fs::exists(c.output_dir + "/validation-000002-0.png"));
  EXPECT_FALSE(fs::exists(c.output_dir + "/validation-000001-0.png"));
  EXPECT_FALSE(fs::exists(c.output_dir + "/checkpoint-1"));
  EXPECT_TRUE(fs::exists(c.output_dir + "/checkpoint-2/trainer_state.json"));
  EXPECT_TRUE(fs::exists(c.output_dir + "/checkpoint-3/trainable.safetensors"));
  EXPECT_TRUE(fs::exists(c.output));
  EXPECT_TRUE(fs::exists(temp_dir() + "/validation/adapter_config.json"));
  const std::string log = read_text_file(c.output_dir + "/train_log.jsonl", "log", dmx::kMaxJsonFileBytes);
  int lines = 0;
  for (size_t p = 0; (p = log.find('\n', p)) != std::string::npos; ++p) ++lines;
  EXPECT_EQ(lines, 3);
  const auto first = nlohmann::json::parse(log.substr(0, log.find('\n')));
  for (const char* k : {"step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"})
    EXPECT_TRUE(first.contains(k)) << k;
}

TEST(TrainTiny, DreamBoothLoRAWithPriorPreservationGeneratesClassImages) {
  const std::string inst = make_image_folder("db-instance", 2);
  const std::string cls = temp_dir() + "/db-class";  // empty: the base model fills it
  const std::string out = temp_dir() + "/db-lora.safetensors";
  TrainOptions o;
  o.recipe = "dreambooth";
  o.model = tiny_model_dir("test");
  o.instance_data = inst;
  o.instance_prompt = "a photo of sks dog";
  o.class_data = cls;
  o.class_prompt = "a photo of a dog";
  o.num_class_images = 3;
  o.class_inference_steps = 1;
  o.prior_loss_weight = 0.5;
  o.lora_rank = 2;
  o.resolution = 32;
  o.steps = 2;
  o.batch_size = 2;
  o.output = out;
  o.quiet = true;
  EXPECT_EQ(train(o).output, out);
  EXPECT_EQ(tr::list_images(cls).size(), 3u);
  auto loaded = fresh_model();
  const auto reps = loaders::apply_loras(*loaded, {loaders::parse_lora_arg(out)}, {});
  EXPECT_TRUE(reps[0].unmatched.empty());
  EXPECT_GT(reps[0].unet_layers, 0);
}

// The shards of DreamBooth's global batch: for any world size, the ranks' rows in rank order are the single-process
// batch (pixels with their crops and flips, captions, instance / class marks), and the mean over ranks of the
// per-rank reduce_loss is the single-process loss.
TEST(TrainDreamBoothUnit, RankShardsAreTheSingleProcessBatch) {
  auto folder = [](const std::string& name, int n, int seed) {
    const std::string d = temp_dir() + "/" + name;
    fs::remove_all(d);
    fs::create_directories(d);
    for (int i = 0; i < n; ++i) {
      Image img;
      img.width = 20 + 4 * i;
      img.height = 16;
      img.channels = 3;
      img.data.resize(static_cast<size_t>(img.width) * img.height * 3);
      for (size_t k = 0; k < img.data.size(); ++k) img.data[k] = static_cast<uint8_t>((k * 31 + i * 97 + seed) % 251);
      save_png(d + "/im" + std::to_string(i) + ".png", img);
    }
    tr::DatasetOptions o;
    o.dir = d;
    o.resolution = 16;
    o.center_crop = false;
    o.random_flip = true;
    o.require_captions = false;
    return std::make_shared<tr::ImageCaptionDataset>(o);
  };
  const auto inst = folder("shard-instance", 3, 1), cls = folder("shard-class", 4, 2);
  auto db = std::make_shared<tr::DreamBoothRecipe>(
      std::make_shared<tr::LoRARecipe>(nullptr, tr::LoRATrainOptions{}, tr::LoRASaveFormat::Kohya), true, 0.5);
  for (const int world : {2, 3}) {
    for (const int per_rank : {1, 2}) {
      tr::DreamBoothBatchSource single(inst, "sks", cls, "dog", per_rank * world, 0, 1, 4);
      for (int64_t step = 0; step < 3; ++step) {
        const tr::Batch whole = single.get(step);
        ASSERT_EQ(whole.pixel_values.size(0), 2 * per_rank * world);
        std::vector<at::Tensor> px;
        std::vector<std::string> caps;
        std::vector<bool> prior;
        at::Generator g = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(step));
        const at::Tensor per = at::rand({whole.pixel_values.size(0)}, g);
        double ranks_loss = 0;
        for (int r = 0; r < world; ++r) {
          tr::DreamBoothBatchSource shard(inst, "sks", cls, "dog", per_rank, r, world, 4);
          const tr::Batch b = shard.get(step);
          ASSERT_EQ(b.pixel_values.size(0), 2 * per_rank);
          px.push_back(b.pixel_values);
          caps.insert(caps.end(), b.captions.begin(), b.captions.end());
          prior.insert(prior.end(), b.prior_rows.begin(), b.prior_rows.end());
          ranks_loss += db->reduce_loss(per.narrow(0, 2 * per_rank * r, 2 * per_rank), b).item<double>() / world;
        }
        const std::string what =
            "world " + std::to_string(world) + " x " + std::to_string(per_rank) + " step " + std::to_string(step);
        EXPECT_TRUE(at::equal(at::cat(px), whole.pixel_values)) << what;
        EXPECT_EQ(caps, whole.captions) << what;
        EXPECT_EQ(prior, whole.prior_rows) << what;
        const int64_t G = per_rank * world;
        const double expect =
            per.narrow(0, 0, G).mean().item<double>() + 0.5 * per.narrow(0, G, G).mean().item<double>();
        EXPECT_NEAR(db->reduce_loss(per, whole).item<double>(), expect, 1e-6) << what;
        EXPECT_NEAR(ranks_loss, expect, 1e-6) << what;
      }
    }
  }
}

// --mixed-precision bf16 with validation images: the pipeline runs in float32 (the frozen bf16 modules are cast
// back for the call and to bf16 again), images are written, and the run's weights are bit for bit those of the
// same run without validation.
TEST(TrainLoRATiny, BF16ValidationImagesLeaveTrainingUnchanged) {
  auto run = [&](const std::string& name, bool validate) {
    auto m = fresh_model();
    tr::LoRATrainOptions o;
    o.rank = 2;
    o.train_text_encoder = true;
    auto recipe = std::make_shared<tr::LoRARecipe>(m, o, tr::LoRASaveFormat::Diffusers);
    tr::TrainConfig c = base_config(name, 3);
    fs::remove_all(c.output_dir);
    c.mixed_precision = tr::MixedPrecision::BF16;
    if (validate) {
      c.validation_steps = 1;
      c.validation_prompt = "a cat";
      c.validation_inference_steps = 2;
    }
    tr::Trainer t(c, recipe, std::make_shared<MemorySource>(2, 32, 2));
    t.run();
    EXPECT_EQ(m->unet->parameters().front().scalar_type(), at::kBFloat16);
    EXPECT_EQ(m->vae->parameters().front().scalar_type(), at::kBFloat16);
    EXPECT_EQ(m->text_encoder->parameters().front().scalar_type(), at::kBFloat16);
    return params_of(*recipe);
  };
  const io::TensorMap with = run("bf16-val", true), without = run("bf16-noval", false);
  for (int step = 1; step <= 3; ++step) {
    char name[64];
    std::snprintf(name, sizeof name, "/validation-%06d-0.png", step);
    EXPECT_TRUE(fs::exists(temp_dir() + "/bf16-val" + name)) << name;
  }
  ASSERT_EQ(with.size(), without.size());
  for (const auto& [k, v] : with) EXPECT_TRUE(at::equal(v, without.at(k))) << k;
  // Fine-tuning in bf16 (UNet float32, VAE and text encoder bf16) writes validation images too.
  auto m = fresh_model();
  auto ft = std::make_shared<tr::FinetuneRecipe>(m, false);
  tr::TrainConfig c = base_config("bf16-ft-val", 1);
  c.learning_rate = 1e-5;
  c.mixed_precision = tr::MixedPrecision::BF16;
  c.validation_steps = 1;
  c.validation_prompt = "a cat";
  c.validation_inference_steps = 2;
  tr::Trainer(c, ft, std::make_shared<MemorySource>(2, 32, 2)).run();
  EXPECT_TRUE(fs::exists(c.output_dir + "/validation-000001-0.png"));
  EXPECT_EQ(m->vae->parameters().front().scalar_type(), at::kBFloat16);
  EXPECT_EQ(m->unet->parameters().front().scalar_type(), at::kFloat);
}
