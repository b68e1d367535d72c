// `dmx train finetune`: full fine-tuning of the UNet (optionally the text encoder), diffusers 0.27.2
// examples/text_to_image/train_text_to_image.py (train_text_encoder as in dreambooth/train_dreambooth.py).
// The result is a diffusers folder: the source folder's files with the trained unet (and text_encoder)
// weights, written into a temporary folder and renamed.
// Internal header of the training layer.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "training/trainer.h"

namespace dmx::training {

// Enables bf16 autocast on the device's autocast key for the life of the scope, restoring the previous state
// (and dropping autocast's cache of cast weights, which would otherwise go stale after the optimizer step).
class AutocastBF16 {
 public:
  explicit AutocastBF16(const at::Device& d);
  ~AutocastBF16();
  AutocastBF16(const AutocastBF16&) = delete;
  AutocastBF16& operator=(const AutocastBF16&) = delete;

 private:
  bool cuda_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

class FinetuneRecipe : public Recipe {
 public:
  FinetuneRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, bool train_text_encoder);
  std::string name() const override { return "finetune"; }
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  bool text_encoder_trainable() const override { return train_text_encoder_; }
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  void save(const std::string& dir) override;

 private:
  bool train_text_encoder_;
  bool autocast_bf16_ = false;  // --mixed-precision bf16: the trained UNet's forward runs under bf16 autocast
};

// Writes a diffusers folder at `dir` from the diffusers folder `source`, replacing the UNet weights (and the
// text encoder's and VAE's when given; vae_config, when not empty, replaces vae/config.json) by the module's.
// Unsupported when `source` is not a diffusers folder.
void save_diffusers_folder(const std::string& source, const std::string& dir, torch::nn::Module& unet,
                           torch::nn::Module* text_encoder, torch::nn::Module* vae = nullptr,
                           const std::string& vae_config = "");
}  // namespace dmx::training
