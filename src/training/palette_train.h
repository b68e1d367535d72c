// `dmx train palette`: Palette (Saharia et al. 2022, "Palette: Image-to-Image Diffusion Models") in pixel space, as
// the unofficial code computes a training step (Janspiry/Palette-Image-to-Image-Diffusion-Models, models/network.py
// Network.forward):
//   cond      the degraded picture (core/degradations.h): grayscale, JPEG at quality 5/10/20, or for inpainting and
//             uncropping the picture outside a random mask with Gaussian noise inside it
//   t         ~ U{1, .., T-1};  gamma ~ U[gammas[t-1], gammas[t])   (schedulers/palette.h)
//   y_noisy   = sqrt(gamma) y0 + sqrt(1 - gamma) eps
//   masked    (inpaint, uncrop) the model sees y_noisy m + (1 - m) y0, and the loss is loss(m eps, m eps_hat)
//   eps_hat   = UNet(cat(cond, y_noisy), gamma)                      (loaders/palette.h)
//   loss      mean |.| (l1) or mean (.)^2 (l2) over every value of the example (the code's F.l1_loss / F.mse_loss)
// Random draws per micro-step, from the trainer's generator for the global batch (every rank alike, each keeping its
// rows): for each row in order its degradation's draws (mask shape and size, JPEG quality, the hole's noise), then
// t [G] (randint 1..T-1), u [G] (rand), eps [G, 3, H, W] (randn).
// Internal header of the training layer.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/degradations.h"
#include "loaders/palette.h"
#include "training/trainer.h"

namespace dmx::training {

// One step's tensors, for the loop and for tests: what the model sees, its noise level and what the loss compares.
struct PaletteStep {
  at::Tensor model_y;  // the noisy half of the model input [B, 3, H, W] (known region pasted for masked tasks)
  at::Tensor gammas;   // [B]
  at::Tensor target;   // eps (times the mask for masked tasks)
  at::Tensor mask;     // [B, 1, H, W] or undefined
};
// y0, cond: [B, 3, H, W]; mask [B, 1, H, W] or undefined; t [B] int64 in [1, T); u [B] in [0, 1); eps like y0.
PaletteStep palette_step_inputs(const at::Tensor& gammas, const at::Tensor& y0, const at::Tensor& mask,
                                const at::Tensor& t, const at::Tensor& u, const at::Tensor& eps);
// Per-example loss [B]: mean over C, H, W of |a - b| (l1) or (a - b)^2 (l2), a = target, b = eps_hat (masked).
at::Tensor palette_loss(const std::string& loss, const at::Tensor& target, const at::Tensor& eps_hat,
                        const at::Tensor& mask);

class PaletteRecipe : public Recipe {
 public:
  // models: a bundle holding only the UNet (the denoiser); cfg: what palette.json will say.
  PaletteRecipe(std::shared_ptr<loaders::StableDiffusionModels> models, loaders::PaletteConfig cfg);
  std::string name() const override { return "palette"; }
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  at::Tensor custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) override;
  void save(const std::string& dir) override;
  // Restorations of the last batch's first rows with 50 respaced sampling steps: top row the condition, middle
  // the restoration, bottom the original (validation-<step>-0.png).
  void validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) override;
  const loaders::PaletteConfig& palette_config() const { return cfg_; }

 private:
  loaders::PaletteConfig cfg_;
  degrade::Task task_;
  at::Tensor gammas_;  // float32 [T] of the training schedule
  bool autocast_bf16_ = false;
  at::Tensor last_y0_, last_cond_, last_mask_;  // for validation pictures
};

// A new Palette bundle: the UNet of palette_unet_config(resolution, base_channels) with PyTorch's default
// initialisation under `seed`, or the UNet of an existing Palette folder (training goes on from it).
std::shared_ptr<loaders::StableDiffusionModels> palette_bundle(const loaders::PaletteModel& m);
}  // namespace dmx::training
