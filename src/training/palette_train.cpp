// Palette training recipe (see palette_train.h).
#include "training/palette_train.h"

#include <ATen/ATen.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdio>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "training/finetune.h"
#include "training/lora_train.h"

namespace dmx::training {

PaletteStep palette_step_inputs(const at::Tensor& gammas, const at::Tensor& y0, const at::Tensor& mask,
                                const at::Tensor& t, const at::Tensor& u, const at::Tensor& eps) {
  PaletteStep s;
  s.gammas = schedulers::palette_sample_gammas(gammas, t, u);
  const at::Tensor y_noisy = schedulers::palette_q_sample(y0, s.gammas, eps);
  s.mask = mask;
  if (mask.defined()) {
    s.model_y = y_noisy * mask + (1 - mask) * y0;
    s.target = mask * eps;
  } else {
    s.model_y = y_noisy;
    s.target = eps;
  }
  return s;
}

at::Tensor palette_loss(const std::string& loss, const at::Tensor& target, const at::Tensor& eps_hat,
                        const at::Tensor& mask) {
  const at::Tensor pred = mask.defined() ? mask * eps_hat.to(at::kFloat) : eps_hat.to(at::kFloat);
  const at::Tensor d = pred - target;
  const std::vector<int64_t> chw{1, 2, 3};
  if (loss == "l1") return d.abs().mean(chw);
  DMX_CHECK_ARG(loss == "l2", "--loss must be l1 or l2, got '", loss, "'");
  return d.pow(2).mean(chw);
}

PaletteRecipe::PaletteRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, loaders::PaletteConfig cfg)
    : Recipe(std::move(m)), cfg_(std::move(cfg)), task_(degrade::parse_task(cfg_.task)) {
  cfg_.validate();
  DMX_CHECK_ARG(!models().unet.is_empty(), "palette: no denoiser");
  gammas_ = schedulers::palette_gammas(schedulers::palette_betas(cfg_.train_schedule));
}

void PaletteRecipe::setup(const TrainConfig& cfg) {
  DMX_CHECK_SUPPORTED(!cfg.cache_latents, "dmx train palette works in pixel space: --cache-latents does not apply");
  DMX_CHECK_SUPPORTED(cfg.snr_gamma == 0 && cfg.noise_offset == 0 && cfg.proportion_empty_prompts == 0 &&
                          (cfg.prediction_type.empty() || cfg.prediction_type == "epsilon"),
                      "dmx train palette predicts the noise with Palette's loss: --snr-gamma, --noise-offset, "
                      "--proportion-empty-prompts and --prediction-type do not apply");
  for (auto& p : models().unet->parameters()) p.set_requires_grad(true);
  models().unet->set_gradient_checkpointing(cfg.gradient_checkpointing);
  autocast_bf16_ = cfg.mixed_precision == MixedPrecision::BF16;
}

std::vector<NamedParameter> PaletteRecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& p : models().unet->named_parameters(true)) v.push_back({"unet." + p.key(), p.value()});
  return v;
}

void PaletteRecipe::train_mode(bool on) { models().unet->train(on); }

at::Tensor PaletteRecipe::custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) {
  const at::Tensor x = batch.pixel_values.to(at::kFloat);  // [B, 3, R, R] in [-1, 1]
  const int64_t rows = x.size(0), h = x.size(2), w = x.size(3);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // 1. Degradations, row by row over the global batch (rows of other ranks are drawn on a stand-in picture so
  //    that every rank consumes the same numbers; only this rank's rows are kept).
  std::vector<at::Tensor> conds, masks;
  for (int64_t g = 0; g < global_rows; ++g) {
    const bool mine = g >= r0 && g < r0 + rows;
    const at::Tensor xi = mine ? x[g - r0] : at::zeros({3, h, w}, f32);
    at::Tensor m;
    at::Tensor c = degrade::make_condition(task_, xi, gen, &m);
    if (!mine) continue;
    conds.push_back(c);
    if (m.defined()) masks.push_back(m);
  }
  const at::Tensor cond = at::stack(conds);
  const at::Tensor mask = masks.empty() ? at::Tensor() : at::stack(masks);
  // 2. Noise levels and noise.
  const int64_t T = gammas_.size(0);
  const at::Tensor t = at::randint(1, T, {global_rows}, gen, at::TensorOptions().dtype(at::kLong)).narrow(0, r0, rows);
  const at::Tensor u = at::rand({global_rows}, gen, f32).narrow(0, r0, rows);
  const at::Tensor eps = at::randn({global_rows, 3, h, w}, gen, f32).narrow(0, r0, rows);
  const PaletteStep s = palette_step_inputs(gammas_, x, mask, t, u, eps);
  at::Tensor eps_hat;
  if (autocast_bf16_) {
    AutocastBF16 scope(x.device());
    eps_hat = loaders::palette_denoise(*models().unet, cfg_, cond, s.model_y, s.gammas);
  } else {
    eps_hat = loaders::palette_denoise(*models().unet, cfg_, cond, s.model_y, s.gammas);
  }
  {
    const int64_t keep = std::min<int64_t>(rows, 4);
    last_y0_ = x.narrow(0, 0, keep).detach().clone();
    last_cond_ = cond.narrow(0, 0, keep).detach().clone();
    last_mask_ = mask.defined() ? mask.narrow(0, 0, keep).detach().clone() : at::Tensor();
  }
  return palette_loss(cfg_.loss, s.target, eps_hat, mask);
}

at::Tensor PaletteRecipe::predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) {
  throw Unsupported("the Palette recipe computes its own loss (custom_loss)");
}

void PaletteRecipe::save(const std::string& dir) { loaders::save_palette(dir, cfg_, *models().unet); }

void PaletteRecipe::validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) {
  if (!last_y0_.defined()) return;
  auto& unet = *models().unet;
  unet.eval();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(cfg.seed);
  const schedulers::PaletteSampler sampler(
      schedulers::palette_respaced_betas(schedulers::palette_betas(cfg_.test_schedule), 50));
  const at::Tensor y = loaders::palette_restore(unet, cfg_, sampler, last_cond_, last_y0_, last_mask_, gen);
  unet.train(true);
  auto row = [](const at::Tensor& b) { return at::cat(b.unbind(0), 2); };  // [3, h, n*w]
  const at::Tensor grid = at::cat({row(last_cond_), row(y), row(last_y0_)}, 1);
  const at::Tensor img = ((grid.clamp(-1, 1) + 1) * 0.5).permute({1, 2, 0}).contiguous();
  char name[96];
  std::snprintf(name, sizeof name, "validation-%06lld-0.png", static_cast<long long>(step));
  save_png(join_path(out_dir, name), tensor_to_image(img));
}

std::shared_ptr<loaders::StableDiffusionModels> palette_bundle(const loaders::PaletteModel& m) {
  auto b = std::make_shared<loaders::StableDiffusionModels>();
  b->name = "palette";
  b->source_path = m.path;
  b->unet = m.unet;
  // The trainer reads a DDPM config for its generic loop; Palette's recipe uses its own schedule (palette.json).
  b->scheduler_config = {{"_class_name", "DDPMScheduler"}, {"num_train_timesteps", 1000}};
  return b;
}
}  // namespace dmx::training
