// `dmx train vae`: trains the AutoencoderKL of a diffusers folder (encoder and decoder) on images, as the
// first stage of a latent diffusion model (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
// Diffusion Models", appendix G: reconstruction loss + a slight KL penalty towards a standard normal).
// Loss per example: mean |x - D(z)| + mse_weight * mean (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, I)) summed
// over the latent and divided by the number of pixel values (the ratio of the reference's summed losses,
// kl_weight 1e-6); z = mean + std * eps is a posterior sample. No perceptual or adversarial term.
// Optional random crops (the same offset for the whole global batch) train the convolutional model on
// smaller windows, as Stable Diffusion's autoencoder was trained on 256-px crops and runs at 512 px.
// The saved folder's vae/config.json gets scaling_factor = 1 / std of the posterior samples seen in
// training (an exponential moving average), which the diffusion model's latents then have unit variance with.
// Internal header of the training layer.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "training/trainer.h"

namespace dmx::training {

struct VAETrainOptions {
  double kl_weight = 1e-6;
  double mse_weight = 0.0;
  int crop = 0;  // > 0: random crop side in pixels (a multiple of the VAE factor), 0: whole images
};

class VAERecipe : public Recipe {
 public:
  VAERecipe(std::shared_ptr<loaders::StableDiffusionModels> m, VAETrainOptions o);
  std::string name() const override { return "vae"; }
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  at::Tensor custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) override;
  void save(const std::string& dir) override;
  void validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) override;
  io::TensorMap extra_state() override;
  void load_extra_state(const io::TensorMap& s) override;
  double latent_std() const { return latent_var_ > 0 ? std::sqrt(latent_var_) : 1.0; }

 private:
  VAETrainOptions o_;
  double latent_var_ = 0;  // EMA of the posterior samples' variance
  at::Tensor last_batch_;  // for validation pictures
};
}  // namespace dmx::training
