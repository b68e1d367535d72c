// Full fine-tuning recipe (see finetune.h): diffusers 0.27.2 train_text_to_image.py.
#include "training/finetune.h"

#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <filesystem>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/log.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/unet_2d_condition.h"
#include "training/lora_train.h"

namespace dmx::training {

namespace fs = std::filesystem;

AutocastBF16::AutocastBF16(const at::Device& d) : cuda_(d.is_cuda()) {
  if (cuda_) {
    prev_enabled_ = at::autocast::is_enabled();
    prev_dtype_ = at::autocast::get_autocast_gpu_dtype();
    at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
    at::autocast::set_enabled(true);
  } else {
    prev_enabled_ = at::autocast::is_cpu_enabled();
    prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    at::autocast::set_cpu_enabled(true);
  }
  at::autocast::increment_nesting();
}

AutocastBF16::~AutocastBF16() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  if (cuda_) {
    at::autocast::set_enabled(prev_enabled_);
    at::autocast::set_autocast_gpu_dtype(prev_dtype_);
  } else {
    at::autocast::set_cpu_enabled(prev_enabled_);
    at::autocast::set_autocast_cpu_dtype(prev_dtype_);
  }
}

FinetuneRecipe::FinetuneRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, bool train_text_encoder)
    : Recipe(std::move(m)), train_text_encoder_(train_text_encoder) {}

void FinetuneRecipe::setup(const TrainConfig& cfg) {
  auto& m = models();
  DMX_CHECK_SUPPORTED(is_directory(m.source_path),
                      "dmx train finetune writes a diffusers folder and needs one as --model, got ", m.source_path);
  freeze(*m.vae);
  freeze(*m.text_encoder);
  for (auto& p : m.unet->parameters()) p.set_requires_grad(true);
  if (train_text_encoder_)
    for (auto& p : m.text_encoder->parameters()) p.set_requires_grad(true);
  // bf16: the frozen parts are cast to bf16; the trained weights stay float32 masters and the UNet's forward
  // runs under autocast (convolutions and matrix products in bf16, normalisations and the loss in float32),
  // as accelerate's mixed precision does in the reference script.
  if (cfg.mixed_precision == MixedPrecision::BF16) {
    cast_frozen_for_mixed_precision(m, /*unet=*/false, /*text_encoder=*/!train_text_encoder_);
    autocast_bf16_ = true;
  }
  if (cfg.gradient_checkpointing) m.unet->set_gradient_checkpointing(true);
}

std::vector<NamedParameter> FinetuneRecipe::trainable_parameters() {
  std::vector<NamedParameter> v;
  for (const auto& p : models().unet->named_parameters(true)) v.push_back({"unet." + p.key(), p.value()});
  if (train_text_encoder_)
    for (const auto& p : models().text_encoder->named_parameters(true))
      v.push_back({"text_encoder." + p.key(), p.value()});
  return v;
}

void FinetuneRecipe::train_mode(bool on) {
  models().unet->train(on);
  if (train_text_encoder_) models().text_encoder->train(on);
}

at::Tensor FinetuneRecipe::predict(const at::Tensor& noisy, const at::Tensor& t, const at::Tensor& ehs, const Batch&) {
  models::UNetInputs in;
  in.sample = noisy;
  in.timestep = t;
  in.encoder_hidden_states = ehs.to(at::kFloat);
  if (!autocast_bf16_) return models().unet->forward(in);
  AutocastBF16 scope(noisy.device());
  return models().unet->forward(in);  // bf16 out of autocast; the trainer takes the loss in float32
}

void FinetuneRecipe::save(const std::string& dir) {
  save_diffusers_folder(models().source_path, dir, *models().unet,
                        train_text_encoder_ ? models().text_encoder.get() : nullptr);
}

namespace {
// The module's state with floating parameters in float32 (bf16 training keeps frozen copies in bf16).
io::TensorMap float_state(torch::nn::Module& m) {
  io::TensorMap t = io::module_state(m);
  for (const auto& p : m.named_parameters(true)) t[p.key()] = p.value().detach().to(at::kFloat);
  return t;
}

bool is_weight_file(const std::string& name) {
  return name.rfind("diffusion_pytorch_model", 0) == 0 || name.rfind("model.", 0) == 0 ||
         name.rfind("pytorch_model", 0) == 0 || name.rfind("model-", 0) == 0;
}
}  // namespace

void save_diffusers_folder(const std::string& source, const std::string& dir, torch::nn::Module& unet,
                           torch::nn::Module* text_encoder, torch::nn::Module* vae, const std::string& vae_config) {
  DMX_CHECK_SUPPORTED(is_directory(source) && path_exists(join_path(source, "unet/config.json")),
                      "saving a diffusers folder needs a diffusers folder as the source model, got ", source);
  write_directory_atomic(dir, "the diffusers folder", [&](const std::string& tmp) {
    const fs::path src(source);
    for (auto it = fs::recursive_directory_iterator(src); it != fs::recursive_directory_iterator(); ++it) {
      const fs::path rel = fs::relative(it->path(), src);
      const std::string top = rel.begin()->string();
      if (it->is_directory()) {
        fs::create_directories(fs::path(tmp) / rel);
        continue;
      }
      const std::string name = it->path().filename().string();
      if (top == "unet" && is_weight_file(name)) continue;
      if (top == "text_encoder" && text_encoder && is_weight_file(name)) continue;
      if (top == "vae" && vae && (is_weight_file(name) || (name == "config.json" && !vae_config.empty()))) continue;
      if (!it->is_regular_file()) {  // a device or FIFO (or a link to one) would be read forever or block
        log_warn("not copied into " + dir + ": " + it->path().string() + " is not a regular file");
        continue;
      }
      fs::copy_file(it->path(), fs::path(tmp) / rel, fs::copy_options::overwrite_existing);
    }
    io::save_safetensors(join_path(tmp, "unet/diffusion_pytorch_model.safetensors"), float_state(unet),
                         {{"format", "pt"}});
    if (text_encoder)
      io::save_safetensors(join_path(tmp, "text_encoder/model.safetensors"), float_state(*text_encoder),
                           {{"format", "pt"}});
    if (vae) {
      io::save_safetensors(join_path(tmp, "vae/diffusion_pytorch_model.safetensors"), float_state(*vae),
                           {{"format", "pt"}});
      if (!vae_config.empty())
        write_bytes_atomic(join_path(tmp, "vae/config.json"), vae_config.data(), vae_config.size());
    }
  });
}

}  // namespace dmx::training
