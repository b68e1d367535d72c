// DiffEdit (Couairon et al. 2022, "DiffEdit: Diffusion-based semantic image editing with mask guidance",
// arXiv:2210.11427), mirroring diffusers 0.27.2 StableDiffusionDiffEditPipeline: three phases, each exposed,
//   generate_mask: noise the image to mask_encode_strength, contrast the guided noise estimates under the
//                  source and target prompts over num_maps_per_mask noise maps, clip, normalise, threshold;
//   invert:        DDIM inversion of the image (ddim_invert) up to inpaint_strength;
//   run:           DDIM decoding from the inverted latents, keeping the unmasked region on the inversion path
//                  (Stable Diffusion's denoising loop, the background blend as its step callback).
// One generator may run through the phases in this order (diffusers' generator passed to all three).
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loaders/model_bundle.h"
#include "pipelines/stable_diffusion.h"

namespace dmx::pipelines {

// generate_mask(...) arguments, diffusers' names and defaults.
struct DiffEditMaskParams {
  at::Tensor image;  // [1, 3, H, W] in [-1, 1]; H, W multiples of max(8, vae factor)
  std::string source_prompt;
  std::string target_prompt;
  std::string source_negative_prompt;  // "" = unconditional
  std::string target_negative_prompt;
  int num_maps_per_mask = 10;
  double mask_encode_strength = 0.5;
  double mask_thresholding_ratio = 3.0;
  int num_inference_steps = 50;
  double guidance_scale = 7.5;
  std::string scheduler = "ddim";      // the pipeline's scheduler (noise level of the encode timestep)
  at::Generator* generator = nullptr;  // nullptr = the global generator
  // Replay of recorded draws: VAE posterior noise and the noise added at the encode timestep, both
  // [num_maps_per_mask, 4, h, w]. Given ones are used instead of drawing.
  at::Tensor posterior_noise;
  at::Tensor noise;
  int max_unet_batch = 8;  // the 4 x num_maps UNet batch runs in chunks of at most this many samples
};

struct DiffEditMaskOutput {
  at::Tensor mask;          // [1, h, w] float32 in {0, 1}, latent size, 1 = edit
  at::Tensor guidance_map;  // [1, h, w] the mean |ε_target - ε_source| before clipping
};

// invert(...) arguments.
struct DiffEditInvertParams {
  at::Tensor image;  // [1, 3, H, W] in [-1, 1]
  std::string prompt;
  std::string negative_prompt;
  int num_inference_steps = 50;
  double inpaint_strength = 0.8;
  double guidance_scale = 7.5;  // diffusers' invert default, also dmx diffedit's (--inversion-guidance-scale)
  at::Generator* generator = nullptr;
  at::Tensor posterior_noise;  // replay: [1, 4, h, w]
  bool show_progress = true;
  // Per inversion step (ascending), as DDIMInversionParams::on_step_end: may replace the latents.
  std::function<void(int step, double t, at::Tensor& latents, const at::Tensor& noise_pred)> on_step_end;
};

struct DiffEditInvertOutput {
  at::Tensor latents;             // [1, K, 4, h, w] float32, noisiest first (diffusers' order), K = steps run
  std::vector<double> timesteps;  // the inversion timestep of each entry of latents (descending)
};

// __call__(...) arguments: the shared ones (GenerationParams; scheduler DDIM, one image) and the edit's.
// generator draws only when the scheduler does (DDIM eta > 0); on_step_end runs after the mask blend of each
// step.
struct DiffEditParams : GenerationParams {
  DiffEditParams() { scheduler = "ddim"; }
  at::Tensor mask_image;     // [h, w], [1, h, w] or [1, 1, h, w] in [0, 1] at latent size; >= 0.5 = edit
  at::Tensor image_latents;  // [1, K, 4, h, w] from invert()
  double inpaint_strength = 0.8;
};

class DiffEditPipeline {
 public:
  explicit DiffEditPipeline(std::shared_ptr<loaders::StableDiffusionModels> models);

  DiffEditMaskOutput generate_mask(const DiffEditMaskParams& p);
  DiffEditInvertOutput invert(const DiffEditInvertParams& p);
  StableDiffusionOutput run(const DiffEditParams& p);  // images [1, H, W, 3] in [0, 1], latents after the last step

  const loaders::StableDiffusionModels& models() const { return *m_; }

 private:
  void check_image(const at::Tensor& image, const char* what) const;
  std::shared_ptr<loaders::StableDiffusionModels> m_;
  StableDiffusionPipeline sd_;
};
}  // namespace dmx::pipelines
