// Stable Diffusion text-to-image and image-to-image (diffusers' StableDiffusionPipeline and
// StableDiffusionImg2ImgPipeline, 0.27.2), with classifier-free guidance (Ho & Salimans 2022) and residual
// providers (ControlNet: StableDiffusionControlNetPipeline). Its denoising loop is the one other pipelines
// run their per-step edits through (denoise + a step callback).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "loaders/model_bundle.h"
#include "pipelines/generation.h"
#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

struct StableDiffusionParams : GenerationParams {
  int width = 0;       // 0 = the first residual provider's size (a ControlNet's image), else the model default
  int height = 0;      //     (unet.sample_size * vae scale)
  at::Tensor latents;  // given initial noise [N, 4, h, w] (before init_noise_sigma)
  // img2img: [1, 3, H, W] in [-1, 1]; strength in [0, 1].
  at::Tensor init_image;
  double strength = 0.8;
  // Replay of the VAE posterior noise of img2img (tests, debugging); GenerationParams::step_noises replays the
  // scheduler's.
  at::Tensor posterior_noise;
  // Residuals added to the UNet at every step: ControlNets (controlnet_providers: one per net, their residuals
  // add up; txt2img only), and later T2I-Adapters and layout conditioners.
  ResidualProviders residual_providers;
  // For a one-shot run (dmx generate): the text encoder is released once the prompts are encoded and the UNet
  // after the last step (the models' text_encoder / unet become empty), so the VAE decode does not hold them
  // (docs/performance.md, "Peak memory"). Each is kept when what it produced is not finite, for
  // check_finite_output's diagnosis. The outputs are unchanged; the models cannot run another generation.
  bool release_models = false;
};

struct StableDiffusionOutput {
  at::Tensor images;              // [N, H, W, 3] float32 in [0, 1]
  at::Tensor latents;             // [N, 4, h, w] float32: after the last scheduler step (before 1/scaling)
  std::vector<double> timesteps;  // the timesteps the loop ran
};

// Output size rules of a run from noise: width and height non-negative multiples of max(8, VAE factor), at
// most 4096 (InvalidArgument with the memory the size would need for `batch` images, guided or not).
void check_output_size(const loaders::StableDiffusionModels& m, int width, int height, int batch, bool guided);

// NaN or Inf in the final latents or the decoded picture would save a black image: checked once per run (in
// decode_latents, which every pipeline decodes through). On failure the models are scanned to name the likely
// source: non-finite weights (FormatError, naming the tensors), LoRA adapters attached (InvalidArgument naming
// them and their scales), else a numerical overflow (Error, exit 1) with the settings that can cause it.
void check_finite_output(const loaders::StableDiffusionModels& m, const at::Tensor& t, const std::string& what);

class StableDiffusionPipeline {
 public:
  explicit StableDiffusionPipeline(std::shared_ptr<loaders::StableDiffusionModels> models);
  StableDiffusionOutput run(const StableDiffusionParams& p);

  // Phases, exposed for other pipelines and tests.
  at::Tensor encode_prompt(const std::string& prompt, int clip_skip = 0);  // [1, 77, D]
  // 5. The denoising loop from loop index `start` (img2img: the strength's) to the end of the schedule: the
  // guided noise prediction (with the residual providers, prepared for the run), the scheduler step (p.eta,
  // p.generator, p.step_noises), then p.on_step_end, which may edit the latents. Other pipelines run their
  // edits through this loop as a step callback (Blended Latent Diffusion's blend, DiffEdit's background).
  at::Tensor denoise(schedulers::Scheduler& sched, at::Tensor latents, int start, const at::Tensor& embeds,
                     const GenerationParams& p, const ResidualProviders& residuals = {});
  at::Tensor decode_latents(const at::Tensor& latents, bool show_progress = false);  // -> [N, H, W, 3] in [0, 1]
  void check_params(const StableDiffusionParams& p) const;
  // width/height (or the init image size) at most 4096: InvalidArgument with the memory it would need.
  void check_max_size(const StableDiffusionParams& p) const;
  const loaders::StableDiffusionModels& models() const { return *m_; }

 private:
  std::shared_ptr<loaders::StableDiffusionModels> m_;
};
}  // namespace dmx::pipelines
