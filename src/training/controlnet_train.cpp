// The ControlNet recipe (diffusers 0.27.2 examples/controlnet/train_controlnet.py). See controlnet_train.h.
#include "training/controlnet_train.h"

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "dmx/error.h"
#include "training/controlnet_init.h"
#include "training/lora_train.h"

namespace dmx::training {

ControlNetRecipe::ControlNetRecipe(std::shared_ptr<loaders::StableDiffusionModels> m,
                                   models::ControlNetModel controlnet)
    : Recipe(std::move(m)), controlnet_(std::move(controlnet)) {
  DMX_CHECK_ARG(!controlnet_.is_empty(), "ControlNetRecipe: no ControlNet given");
  models::check_controlnet_matches_unet(controlnet_->config(), models().unet->config(), "--controlnet");
}

void ControlNetRecipe::setup(const TrainConfig& cfg) {
  DMX_CHECK_ARG(cfg.validation_steps == 0 || validation_image_.defined(),
                "validation images during ControlNet training need a conditioning image (--validation-image)");
  auto& m = models();
  unet_dtype_ = freeze_base_models(m, cfg);
  m.unet->eval();
  controlnet_->to(m.device, at::kFloat);
  for (auto& p : controlnet_->parameters()) p.set_requires_grad(true);
  controlnet_->set_gradient_checkpointing(cfg.gradient_checkpointing);
  m.unet->set_gradient_checkpointing(cfg.gradient_checkpointing);
  controlnet_->train();
}

std::vector<NamedParameter> ControlNetRecipe::trainable_parameters() {
  std::vector<NamedParameter> out;
  for (const auto& p : controlnet_->named_parameters(true)) out.push_back({p.key(), p.value()});
  return out;
}

void ControlNetRecipe::train_mode(bool on) { controlnet_->train(on); }

at::Tensor ControlNetRecipe::predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                                     const at::Tensor& encoder_hidden_states, const Batch& batch) {
  DMX_CHECK_ARG(batch.conditioning.defined(),
                "ControlNet training needs a conditioning image for every row (metadata.jsonl column "
                "'conditioning_image')");
  DMX_CHECK_ARG(batch.conditioning.size(0) == noisy_latents.size(0),
                "ControlNet training: ", batch.conditioning.size(0), " conditioning images for a batch of ",
                noisy_latents.size(0));
  models::ControlNetInputs ci;  // [B, 4, h, w], [B], [B, 77, D], [B, 3, 8h, 8w] in [0, 1], all float32
  ci.sample = noisy_latents.to(at::kFloat);
  ci.timestep = timesteps;
  ci.encoder_hidden_states = encoder_hidden_states.to(at::kFloat);
  ci.controlnet_cond = batch.conditioning.to(noisy_latents.device(), at::kFloat);
  const models::ControlNetOutput res = controlnet_->forward(ci);
  models::UNetInputs ui;  // in the UNet's dtype (bf16 with mixed precision)
  ui.sample = noisy_latents.to(unet_dtype_);
  ui.timestep = timesteps;
  ui.encoder_hidden_states = encoder_hidden_states.to(unet_dtype_);
  for (const auto& r : res.down_block_res_samples) ui.down_block_additional_residuals.push_back(r.to(unet_dtype_));
  ui.mid_block_additional_residual = res.mid_block_res_sample.to(unet_dtype_);
  return models().unet->forward(ui).to(at::kFloat);  // [B, 4, h, w]
}

void ControlNetRecipe::save(const std::string& path) {
  write_directory_atomic(path, "the ControlNet folder", [&](const std::string& tmp) {
    save_controlnet_diffusers(controlnet_, tmp);
    save_controlnet_original(controlnet_, join_path(tmp, kControlNetOriginalFile));
  });
}

void ControlNetRecipe::set_validation_image(const at::Tensor& image) {
  const int f = models().vae_scale_factor();
  DMX_CHECK_ARG(image.defined() && image.dim() == 4 && image.size(0) == 1 &&
                    image.size(1) == controlnet_->config().conditioning_channels && image.size(2) % f == 0 &&
                    image.size(3) % f == 0 && image.size(2) > 0 && image.size(3) > 0,
                "--validation-image must be [1, ", controlnet_->config().conditioning_channels,
                ", H, W] with H and W multiples of ", f, ", got ", image.sizes());
  validation_image_ = image.to(at::kFloat).contiguous();
}

void ControlNetRecipe::validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) {
  if (cfg.validation_prompt.empty()) return;
  DMX_CHECK_ARG(validation_image_.defined(),
                "validation images during ControlNet training need a conditioning image (--validation-image)");
  save_validation_images(sample_validation_images(models_, cfg, controlnet_, validation_image_), cfg, step, out_dir);
}
}  // namespace dmx::training
