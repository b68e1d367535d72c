// VAE training recipe (see vae_train.h).
#include "training/vae_train.h"

#include <cmath>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "training/finetune.h"
#include "training/lora_train.h"

namespace dmx::training {

VAERecipe::VAERecipe(std::shared_ptr<loaders::StableDiffusionModels> m, VAETrainOptions o)
    : Recipe(std::move(m)), o_(o) {
  DMX_CHECK_ARG(std::isfinite(o_.kl_weight) && o_.kl_weight >= 0, "--kl-weight must be >= 0, got ", o_.kl_weight);
  DMX_CHECK_ARG(std::isfinite(o_.mse_weight) && o_.mse_weight >= 0, "--mse-weight must be >= 0, got ", o_.mse_weight);
  DMX_CHECK_ARG(o_.crop >= 0, "--vae-crop must be >= 0 (0 = whole images), got ", o_.crop);
  const int f = models().vae->config().downscale_factor();
  DMX_CHECK_ARG(o_.crop % f == 0, "--vae-crop must be a multiple of the VAE's downscale factor ", f, ", got ", o_.crop);
}

void VAERecipe::setup(const TrainConfig& cfg) {
  auto& m = models();
  DMX_CHECK_SUPPORTED(is_directory(m.source_path),
                      "dmx train vae writes a diffusers folder and needs one as --model, got ", m.source_path);
  DMX_CHECK_SUPPORTED(cfg.mixed_precision == MixedPrecision::No,
                      "dmx train vae trains in float32 only (--mixed-precision no), got bf16");
  DMX_CHECK_SUPPORTED(!cfg.cache_latents, "dmx train vae trains the encoder: --cache-latents does not apply");
  freeze(*m.unet);
  freeze(*m.text_encoder);
  for (auto& p : m.vae->parameters()) p.set_requires_grad(true);
}

std::vector<NamedParameter> VAERecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& p : models().vae->named_parameters(true)) v.push_back({"vae." + p.key(), p.value()});
  return v;
}

void VAERecipe::train_mode(bool on) { models().vae->train(on); }

at::Tensor VAERecipe::custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) {
  at::Tensor x = batch.pixel_values.to(at::kFloat);  // [B, 3, R, R] in [-1, 1]
  const int64_t rows = x.size(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (o_.crop > 0) {
    DMX_CHECK_ARG(o_.crop <= x.size(2) && o_.crop <= x.size(3), "--vae-crop ", o_.crop,
                  " must not exceed the training resolution ", x.size(2));
    // One offset for the global batch, drawn by every rank alike.
    const at::Tensor off = at::randint(0, 1 << 30, {2}, gen, at::TensorOptions().dtype(at::kLong));
    const int64_t oy = off[0].item<int64_t>() % (x.size(2) - o_.crop + 1);
    const int64_t ox = off[1].item<int64_t>() % (x.size(3) - o_.crop + 1);
    x = x.narrow(2, oy, o_.crop).narrow(3, ox, o_.crop).contiguous();
  }
  auto& vae = models().vae;
  const models::DiagonalGaussian d = vae->encode(x);  // [B, C, h, w]
  std::vector<int64_t> gshape(d.mean.sizes().begin(), d.mean.sizes().end());
  gshape[0] = global_rows;
  const at::Tensor eps = at::randn(gshape, gen, f32).narrow(0, r0, rows);
  const at::Tensor z = d.mean + d.std * eps;
  const at::Tensor rec = vae->decode(z);  // [B, 3, H, W]
  const std::vector<int64_t> chw{1, 2, 3};
  const at::Tensor diff = rec - x;
  at::Tensor per = diff.abs().mean(chw);
  if (o_.mse_weight > 0) per = per + o_.mse_weight * diff.pow(2).mean(chw);
  if (o_.kl_weight > 0) {
    const at::Tensor kl = 0.5 * (d.mean.pow(2) + d.std.pow(2) - 1.0 - d.logvar).sum(chw);
    per = per + o_.kl_weight * kl / static_cast<double>(x[0].numel());
  }
  {
    at::NoGradGuard no_grad;
    const double var = z.var().item<double>();
    latent_var_ = latent_var_ == 0 ? var : 0.99 * latent_var_ + 0.01 * var;
    last_batch_ = x.detach().narrow(0, 0, std::min<int64_t>(rows, 8)).clone();
  }
  return per;
}

at::Tensor VAERecipe::predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) {
  throw Unsupported("the VAE recipe computes its own loss (custom_loss), it does not predict noise");
}

void VAERecipe::save(const std::string& dir) {
  auto& m = models();
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(
      read_text_file(join_path(m.source_path, "vae/config.json"), "vae config", kMaxJsonFileBytes));
  cfg["scaling_factor"] = 1.0 / latent_std();
  const std::string text = cfg.dump(2) + "\n";
  save_diffusers_folder(m.source_path, dir, *m.unet, nullptr, m.vae.get(), text);
}

// Originals (top row) and their reconstructions from the posterior mean (bottom row), one PNG per call.
void VAERecipe::validate(const TrainConfig&, int64_t step, const std::string& out_dir) {
  if (!last_batch_.defined()) return;
  at::NoGradGuard no_grad;
  auto& vae = models().vae;
  vae->eval();
  const at::Tensor rec = vae->decode(vae->encode(last_batch_).mean).clamp(-1, 1);
  vae->train(true);
  const at::Tensor top = at::cat(last_batch_.unbind(0), 2), bottom = at::cat(rec.unbind(0), 2);  // [3, h, n*w]
  const at::Tensor grid = ((at::cat({top, bottom}, 1) + 1) * 0.5).permute({1, 2, 0}).contiguous();
  save_png(join_path(out_dir, "reconstruction-" + std::to_string(step) + ".png"), tensor_to_image(grid));
}

io::TensorMap VAERecipe::extra_state() {
  return {{"latent_var", at::tensor(std::vector<double>{latent_var_}, at::kDouble)}};
}

void VAERecipe::load_extra_state(const io::TensorMap& s) {
  auto it = s.find("latent_var");
  if (it != s.end()) latent_var_ = it->second.item<double>();
}
}  // namespace dmx::training
