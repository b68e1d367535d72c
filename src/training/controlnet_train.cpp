// The ControlNet recipe (diffusers 0.27.2 examples/controlnet/train_controlnet.py). See controlnet_train.h.
#include "training/controlnet_train.h"

#include "core/fs.h"
#include "dmx/error.h"
#include "training/controlnet_init.h"

namespace dmx::training {

ControlNetRecipe::ControlNetRecipe(std::shared_ptr<pipelines::StableDiffusionModels> m,
                                   models::ControlNetModel controlnet)
    : Recipe(std::move(m)), controlnet_(std::move(controlnet)) {
  DMX_CHECK_ARG(!controlnet_.is_empty(), "ControlNetRecipe: no ControlNet given");
  models::check_controlnet_matches_unet(controlnet_->config(), models().unet->config(), "--controlnet");
}

void ControlNetRecipe::setup(const TrainConfig& cfg) {
  DMX_CHECK_SUPPORTED(cfg.mixed_precision == MixedPrecision::No,
                      "--mixed-precision bf16 is not implemented for ControlNet training; use fp32");
  DMX_CHECK_SUPPORTED(!cfg.gradient_checkpointing,
                      "--gradient-checkpointing is not implemented for ControlNet training");
  DMX_CHECK_SUPPORTED(cfg.validation_steps == 0,
                      "validation images during ControlNet training need a conditioning image and are not "
                      "implemented; leave --validation-steps at 0");
  auto& m = models();
  for (auto& p : m.unet->parameters()) p.set_requires_grad(false);
  if (!m.vae.is_empty())
    for (auto& p : m.vae->parameters()) p.set_requires_grad(false);
  if (!m.text_encoder.is_empty())
    for (auto& p : m.text_encoder->parameters()) p.set_requires_grad(false);
  m.unet->eval();
  controlnet_->to(m.device, at::kFloat);
  for (auto& p : controlnet_->parameters()) p.set_requires_grad(true);
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
  DMX_CHECK_ARG(batch.conditioning.size(0) == noisy_latents.size(0), "ControlNet training: ",
                batch.conditioning.size(0), " conditioning images for a batch of ", noisy_latents.size(0));
  models::ControlNetInputs ci;  // [B, 4, h, w], [B], [B, 77, D], [B, 3, 8h, 8w] in [0, 1]
  ci.sample = noisy_latents;
  ci.timestep = timesteps;
  ci.encoder_hidden_states = encoder_hidden_states;
  ci.controlnet_cond = batch.conditioning.to(noisy_latents.device(), at::kFloat);
  const models::ControlNetOutput res = controlnet_->forward(ci);
  models::UNetInputs ui;
  ui.sample = noisy_latents;
  ui.timestep = timesteps;
  ui.encoder_hidden_states = encoder_hidden_states;
  ui.down_block_additional_residuals = res.down_block_res_samples;
  ui.mid_block_additional_residual = res.mid_block_res_sample;
  return models().unet->forward(ui);  // [B, 4, h, w]
}

void ControlNetRecipe::save(const std::string& path) {
  save_controlnet_diffusers(controlnet_, path);
  save_controlnet_original(controlnet_, join_path(path, kControlNetOriginalFile));
}

void ControlNetRecipe::validate(const TrainConfig&, int64_t, const std::string&) {
  throw Unsupported("validation images during ControlNet training are not implemented");
}
}  // namespace dmx::training
