// The T2I-Adapter recipe (diffusers 0.27.2 examples/t2i_adapter/train_t2i_adapter_sdxl.py). See adapter_train.h.
#include "training/adapter_train.h"

#include <ATen/ATen.h>

#include <filesystem>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "training/lora_train.h"

namespace dmx::training {

TimestepSampling parse_timestep_sampling(const std::string& s) {
  if (s == "cubic") return TimestepSampling::Cubic;
  if (s == "uniform") return TimestepSampling::Uniform;
  throw InvalidArgument("--timestep-sampling must be cubic or uniform, got '" + s + "'");
}

AdapterRecipe::AdapterRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, models::T2IAdapter adapter,
                             TimestepSampling sampling)
    : Recipe(std::move(m)), adapter_(std::move(adapter)), sampling_(sampling) {
  DMX_CHECK_ARG(!adapter_.is_empty(), "AdapterRecipe: no adapter given");
  const auto& c = adapter_->config();
  DMX_CHECK_SUPPORTED(c.adapter_type != "full_adapter_xl",
                      "training a full_adapter_xl (the SDXL layout) is not supported: dmx trains Stable Diffusion "
                      "UNets (full_adapter, light_adapter)");
  DMX_CHECK_ARG(c.in_channels == 1 || c.in_channels == 3, "--adapter-in-channels must be 1 or 3, got ", c.in_channels);
  models::check_t2i_adapter_matches_unet(c, models().unet->config(), models().vae_scale_factor(), "--adapter");
}

void AdapterRecipe::setup(const TrainConfig& cfg) {
  DMX_CHECK_ARG(cfg.validation_steps == 0 || validation_image_.width > 0,
                "validation images during adapter training need a control picture (--validation-image)");
  auto& m = models();
  unet_dtype_ = freeze_base_models(m, cfg);
  m.unet->eval();
  adapter_->to(m.device, at::kFloat);
  for (auto& p : adapter_->parameters()) p.set_requires_grad(true);
  m.unet->set_gradient_checkpointing(cfg.gradient_checkpointing);
  adapter_->train();
}

std::vector<NamedParameter> AdapterRecipe::trainable_parameters() {
  std::vector<NamedParameter> out;
  for (const auto& p : adapter_->named_parameters(true)) out.push_back({p.key(), p.value()});
  return out;
}

void AdapterRecipe::train_mode(bool on) { adapter_->train(on); }

at::Tensor AdapterRecipe::sample_timesteps(at::Generator& gen, int64_t global_rows, int64_t num_train_timesteps) {
  return sampling_ == TimestepSampling::Cubic ? cubic_timesteps(gen, global_rows, num_train_timesteps)
                                              : uniform_timesteps(gen, global_rows, num_train_timesteps);
}

at::Tensor adapter_input(const at::Tensor& cond, int in_channels) {
  DMX_CHECK_ARG(cond.defined() && cond.dim() == 4 && cond.size(1) == 3,
                "adapter training: conditioning images must be [B, 3, H, W], got ",
                cond.defined() ? cond.sizes() : at::IntArrayRef{});
  if (in_channels == 3) return cond.to(at::kFloat);
  DMX_CHECK_ARG(in_channels == 1, "adapter in_channels must be 1 or 3, got ", in_channels);
  // PIL's convert("L") on the 8-bit values: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, then / 255.
  const at::Tensor v = (cond.to(at::kFloat) * 255).round().to(at::kLong);  // [B, 3, H, W]
  const at::Tensor l = (v.select(1, 0) * 19595 + v.select(1, 1) * 38470 + v.select(1, 2) * 7471 + 0x8000)
                           .div(65536, "floor");   // [B, H, W]
  return (l.to(at::kFloat) / 255.0).unsqueeze(1);  // [B, 1, H, W]
}

at::Tensor AdapterRecipe::predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                                  const at::Tensor& encoder_hidden_states, const Batch& batch) {
  DMX_CHECK_ARG(batch.conditioning.defined(),
                "adapter training needs a conditioning image for every row (metadata.jsonl column "
                "'conditioning_image')");
  DMX_CHECK_ARG(batch.conditioning.size(0) == noisy_latents.size(0), "adapter training: ", batch.conditioning.size(0),
                " conditioning images for a batch of ", noisy_latents.size(0));
  const at::Tensor x = adapter_input(batch.conditioning.to(noisy_latents.device()), adapter_->config().in_channels);
  const std::vector<at::Tensor> features = adapter_->forward(x);  // float32, [B, C_k, h / 2^k, w / 2^k]
  models::UNetInputs ui;                                          // in the UNet's dtype (bf16 with mixed precision)
  ui.sample = noisy_latents.to(unet_dtype_);
  ui.timestep = timesteps;
  ui.encoder_hidden_states = encoder_hidden_states.to(unet_dtype_);
  for (const auto& f : features) ui.down_intrablock_additional_residuals.push_back(f.to(unet_dtype_));
  return models().unet->forward(ui).to(at::kFloat);  // [B, 4, h, w]
}

void save_t2i_adapter_diffusers(models::T2IAdapter& adapter, const std::string& dir) {
  DMX_CHECK_ARG(!dir.empty(), "adapter output folder must not be empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DMX_CHECK_IO(!ec && is_directory(dir), "cannot create adapter output folder '", dir, "': ", ec.message());
  io::TensorMap sd;
  for (const auto& p : adapter->named_parameters(true))
    sd.emplace(p.key(), p.value().detach().to(at::kCPU, at::kFloat).contiguous());
  io::save_safetensors(join_path(dir, "diffusion_pytorch_model.safetensors"), sd, {{"format", "pt"}});
  nlohmann::json j = adapter->config().to_json();
  j["_diffusers_version"] = "0.27.2";
  const std::string text = j.dump(2) + "\n";
  write_bytes_atomic(join_path(dir, "config.json"), text.data(), text.size());
}

void AdapterRecipe::save(const std::string& path) {
  write_directory_atomic(path, "the T2I-Adapter folder",
                         [&](const std::string& tmp) { save_t2i_adapter_diffusers(adapter_, tmp); });
}

void AdapterRecipe::set_validation_image(const Image& image) {
  const int f = adapter_->config().downscale_factor;
  DMX_CHECK_ARG(image.width >= f && image.height >= f && !image.data.empty(), "--validation-image must be at least ", f,
                " pixels on each side (the adapter's downscale_factor), got ", image.width, "x", image.height);
  validation_image_ = image;
}

void AdapterRecipe::validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) {
  if (cfg.validation_prompt.empty()) return;
  DMX_CHECK_ARG(validation_image_.width > 0,
                "validation images during adapter training need a control picture (--validation-image)");
  DMX_CHECK_ARG(static_cast<bool>(cfg.sample_images), "validation images need a sampler (TrainConfig::sample_images)");
  const int f = adapter_->config().downscale_factor;
  SampleRequest r;
  r.prompt = cfg.validation_prompt;
  r.width = validation_image_.width / f * f;
  r.height = validation_image_.height / f * f;
  r.num_inference_steps = cfg.validation_inference_steps;
  r.num_images = cfg.num_validation_images;
  r.seed = cfg.seed;
  r.adapter = adapter_;
  r.adapter_image = validation_image_;
  const bool was_training = adapter_->is_training();
  adapter_->eval();
  at::Tensor images;
  {
    at::NoGradGuard no_grad;
    images = cfg.sample_images(models_, r);
  }
  adapter_->train(was_training);
  save_validation_images(images, cfg, step, out_dir);
}
}  // namespace dmx::training
