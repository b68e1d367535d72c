// Stable Diffusion text-to-image and image-to-image (diffusers' StableDiffusionPipeline and
// StableDiffusionImg2ImgPipeline, 0.27.2), with classifier-free guidance (Ho & Salimans 2022).
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "pipelines/controlnet.h"
#include "loaders/model_bundle.h"

namespace dmx::pipelines {

// Per-step callback: may edit latents in place (latent blending etc.).
using StepCallback = std::function<void(int step, double t, at::Tensor& latents)>;

struct StableDiffusionParams {
  std::string prompt;
  std::string negative_prompt;  // "" = unconditional
  int width = 0;                // 0 = model default (unet.sample_size * vae scale)
  int height = 0;
  int num_inference_steps = 50;
  double guidance_scale = 7.5;
  std::string scheduler;  // short name (ddim, euler, ...) or "" = the model's own scheduler
  double eta = 0.0;
  int num_images_per_prompt = 1;
  int clip_skip = 0;
  std::optional<uint64_t> seed;  // one CPU generator per run, drawn in the reference's order
  at::Tensor latents;            // given initial noise [N, 4, h, w] (before init_noise_sigma)
  // img2img: [1, 3, H, W] in [-1, 1]; strength in [0, 1].
  at::Tensor init_image;
  double strength = 0.8;
  StepCallback on_step_end;
  // Replay of recorded random draws (tests, debugging): the VAE posterior noise for img2img, and
  // per-step scheduler noise (DDIM eta > 0, DDPM, Euler, Euler a) in loop order.
  at::Tensor posterior_noise;
  std::vector<at::Tensor> step_noises;
  bool show_progress = true;
  // ControlNet (diffusers' StableDiffusionControlNetPipeline / MultiControlNetModel): one unit per net, each
  // with its own prepared image, scale and start/end; their residuals add up. txt2img only. With no
  // width/height given, the first image's size is the output size.
  std::vector<ControlNetUnit> controlnets;
  bool guess_mode = false;  // nets see only the conditional half; the unconditional half gets zeros
};

struct StableDiffusionOutput {
  at::Tensor images;   // [N, H, W, 3] float32 in [0, 1]
  at::Tensor latents;  // [N, 4, h, w] float32: after the last scheduler step (before 1/scaling)
  std::vector<double> timesteps;  // the timesteps the loop ran
};

// Image latents as the reference pipelines prepare them (retrieve_latents(vae.encode(image)).sample(generator)
// * scaling_factor): image [N, 3, H, W] in [-1, 1] -> [N, 4, H/f, W/f] float32 on the CPU. The posterior
// noise [N, 4, H/f, W/f] is `noise` when given (replay), else one draw of that shape from `generator` (on
// the CPU, float32, like diffusers' randn_tensor; nullptr = the global generator).
at::Tensor encode_image_latents(const loaders::StableDiffusionModels& m, const at::Tensor& image, at::Generator* generator,
                                const at::Tensor& noise = {});

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
  at::Tensor decode_latents(const at::Tensor& latents, bool show_progress = false);  // -> [N, H, W, 3] in [0, 1]
  void check_params(const StableDiffusionParams& p) const;
  // width/height (or the init image size) at most 4096: InvalidArgument with the memory it would need.
  void check_max_size(const StableDiffusionParams& p) const;
  const loaders::StableDiffusionModels& models() const { return *m_; }

 private:
  std::shared_ptr<loaders::StableDiffusionModels> m_;
};
}  // namespace dmx::pipelines
