// `dmx train adapter`: the T2I-Adapter recipe for the shared training loop (training/trainer.h). Mirrors diffusers
// 0.27.2 examples/t2i_adapter/train_t2i_adapter_sdxl.py on a Stable Diffusion UNet (Mou et al. 2023,
// "T2I-Adapter"): the VAE, text encoder and UNet are frozen; the adapter (a fresh T2IAdapter, or an existing one to
// fine-tune) is trained; the prediction is
//   features = adapter(conditioning [0, 1])                     (once per example, not per denoising step)
//   pred     = unet(noisy_latents, t, encoder_hidden_states, down_intrablock_additional_residuals = features)
// and the timesteps are drawn with the paper's cubic sampling (section 3.4, the script's
//   t = long((1 - u^3) * T).clamp(0, T - 1), u ~ U[0, 1)
// through Recipe::sample_timesteps; --timestep-sampling uniform draws as the other recipes do).
// The loss is the trainer's epsilon (or v) MSE. The script computes it on Euler-scaled inputs against the denoised
// latents weighted by sigma^-2: with noisy = x0 + sigma eps, the UNet input noisy / sqrt(sigma^2 + 1) is exactly
// DDPM's sqrt(a_t) x0 + sqrt(1 - a_t) eps, and sigma^-2 (noisy - sigma eps_hat - x0)^2 = (eps_hat - eps)^2: the
// same loss as epsilon MSE, so the trainer's is used.
// The dataset needs a conditioning image per row (metadata.jsonl `conditioning_image`, as ControlNet training);
// a 1-channel adapter sees its luma (PIL's convert("L"), what generate feeds it), a 3-channel one the RGB picture.
// --mixed-precision bf16: the frozen UNet, VAE and text encoder in bf16; the adapter keeps float32 weights and runs
// in float32, its features are cast to bf16 for the UNet.
// A fresh adapter gets PyTorch's default initialisation of its convolutions (what diffusers' T2IAdapter
// constructor does: no custom init, no zero convolutions), seeded with --seed.
// Internal header of the training layer.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/image.h"
#include "loaders/model_bundle.h"
#include "models/t2i_adapter.h"
#include "training/trainer.h"

namespace dmx::training {

enum class TimestepSampling { Uniform, Cubic };
TimestepSampling parse_timestep_sampling(const std::string& s);  // uniform | cubic (InvalidArgument otherwise)

class AdapterRecipe : public Recipe {
 public:
  // adapter: the net to train; it must fit the UNet (feature widths = down block widths, downscale_factor = the VAE
  // factor; InvalidArgument naming --adapter-* otherwise).
  AdapterRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, models::T2IAdapter adapter,
                TimestepSampling sampling = TimestepSampling::Cubic);
  std::string name() const override { return "adapter"; }
  // Freezes UNet, VAE and text encoder (bf16 with --mixed-precision bf16); the adapter's parameters require grad.
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;  // the adapter's parameters, diffusers names
  void train_mode(bool on) override;
  at::Tensor sample_timesteps(at::Generator& gen, int64_t global_rows, int64_t num_train_timesteps) override;
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  // path: the output folder in diffusers' layout (config.json + diffusion_pytorch_model.safetensors, what
  // T2IAdapter.save_pretrained writes; float32).
  void save(const std::string& path) override;
  // txt2img with the adapter at scale 1 through cfg.sample_images.
  void validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) override;
  // The control picture of the validation images (any channels, 8 bits); the images are its size.
  void set_validation_image(const Image& image);
  models::T2IAdapter& adapter() { return adapter_; }

 private:
  models::T2IAdapter adapter_;
  TimestepSampling sampling_;
  Image validation_image_;
  at::ScalarType unet_dtype_ = at::kFloat;
};

// The adapter's input from a conditioning batch [B, 3, H, W] in [0, 1] (8-bit values): as is for 3 channels, the
// luma of PIL's convert("L") for 1 channel. InvalidArgument for other channel counts.
at::Tensor adapter_input(const at::Tensor& conditioning, int in_channels);

// Writes config.json + diffusion_pytorch_model.safetensors (float32) of `adapter` into dir (created).
void save_t2i_adapter_diffusers(models::T2IAdapter& adapter, const std::string& dir);
}  // namespace dmx::training
