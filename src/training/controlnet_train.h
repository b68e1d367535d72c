// `dmx train controlnet`: the ControlNet recipe for the shared training loop (training/trainer.h). Mirrors
// diffusers 0.27.2 examples/controlnet/train_controlnet.py: the VAE, text encoder and UNet are frozen; the
// ControlNet (a fresh copy of the UNet encoder, controlnet_from_unet, or an existing one to fine-tune) is
// trained; the prediction is
//   down, mid = controlnet(noisy_latents, t, encoder_hidden_states, controlnet_cond = conditioning [0, 1])
//   pred      = unet(noisy_latents, t, encoder_hidden_states, + down / mid residuals)
// and the loss is the trainer's (epsilon or v-prediction MSE). The dataset needs a conditioning image per row
// (metadata.jsonl `conditioning_image`); images are center-cropped as the script does.
// --mixed-precision bf16: the frozen UNet, VAE and text encoder in bf16 (the script's weight_dtype); the
// ControlNet keeps float32 weights and runs in float32, its residuals are cast to bf16 for the UNet.
// --gradient-checkpointing: the ControlNet's down / mid blocks (controlnet.enable_gradient_checkpointing()) and
// the UNet's blocks, whose activations the gradient of the residuals passes through, are recomputed in backward.
// Validation (log_validation): StableDiffusionControlNetPipeline with the validation prompt and conditioning
// image, the trained ControlNet at scale 1.
// Internal header of the training layer.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "loaders/model_bundle.h"
#include "models/controlnet.h"
#include "training/trainer.h"

namespace dmx::training {

class ControlNetRecipe : public Recipe {
 public:
  // controlnet: the net to train (from controlnet_from_unet or a loaded one); it must fit the UNet.
  ControlNetRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, models::ControlNetModel controlnet);
  std::string name() const override { return "controlnet"; }
  // Freezes UNet, VAE and text encoder (bf16 with --mixed-precision bf16); the ControlNet's parameters
  // require grad. validation_steps > 0 needs set_validation_image first.
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;  // the ControlNet's parameters, diffusers names
  void train_mode(bool on) override;
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  // path: the output folder. Writes the diffusers layout (config.json + diffusion_pytorch_model.safetensors)
  // and the original single file <path>/controlnet_original.safetensors (control_model.* keys).
  void save(const std::string& path) override;
  // txt2img with the ControlNet through cfg.sample_images (num_validation_images images of validation_prompt,
  // seed cfg.seed).
  void validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) override;
  // The conditioning image of the validation images: [1, 3, H, W] float32 in [0, 1] (H, W multiples of the
  // VAE scale factor); the images are H x W.
  void set_validation_image(const at::Tensor& image);
  models::ControlNetModel& controlnet() { return controlnet_; }

 private:
  models::ControlNetModel controlnet_;
  at::Tensor validation_image_;
  at::ScalarType unet_dtype_ = at::kFloat;
};

// File name of the original-layout copy inside the output folder.
inline constexpr const char* kControlNetOriginalFile = "controlnet_original.safetensors";
}  // namespace dmx::training
