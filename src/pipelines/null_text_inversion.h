// Null-text inversion (Mokady et al. 2022, "Null-text Inversion for Editing Real Images using Guided
// Diffusion Models"; google/prompt-to-prompt null_text_w_ptp.ipynb): DDIM-invert a real image under its
// prompt with guidance 1, then, step by step from the noisiest latent, optimise the unconditional
// ("null-text") embedding with Adam so that the guided DDIM step lands on the inversion path. The per-step
// embeddings then let Prompt-to-Prompt edit the image (PromptToPromptParams::uncond_embeddings).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "loaders/model_bundle.h"

namespace dmx::pipelines {

struct NullTextInversionParams {
  at::Tensor image;  // [1, 3, H, W] in [-1, 1], H and W multiples of the VAE factor
  std::string prompt;
  int num_inference_steps = 50;
  double guidance_scale = 7.5;
  int num_inner_steps = 10;          // Adam iterations per step at most
  double early_stop_epsilon = 1e-5;  // stop when loss < epsilon + i * 2e-5 (the paper's code)
  double learning_rate = 1e-2;       // lr at step i: learning_rate * (1 - i / 100)
  bool show_progress = true;
};

struct NullTextInversionOutput {
  at::Tensor z0;                              // [1, 4, h, w] VAE posterior mean * scaling factor
  std::vector<at::Tensor> ddim_latents;       // N + 1 latents: z0, then after each inversion step (ascending)
  std::vector<at::Tensor> uncond_embeddings;  // one [1, 77, D] per denoising step, in denoising order
  std::vector<double> timesteps;              // the denoising timesteps (descending)
  std::vector<int> inner_steps;               // Adam iterations used per step
  std::vector<double> first_losses;           // loss before the first Adam update, per step
  std::vector<double> losses;                 // last loss per step
  at::Tensor x_T() const { return ddim_latents.back(); }
};

// Plain DDIM inversion (DDIMInverseScheduler, guidance 1, conditional branch only) of scaled latents z0 under
// cond [1, 77, D]: returns z0 followed by the latent after each of the num_inference_steps steps
// (pipelines::ddim_invert over the whole schedule).
std::vector<at::Tensor> ddim_inversion_path(loaders::StableDiffusionModels& m, const at::Tensor& z0,
                                            const at::Tensor& cond, int num_inference_steps,
                                            bool show_progress = false);

NullTextInversionOutput null_text_invert(loaders::StableDiffusionModels& m, const NullTextInversionParams& p);

// DDIM sampling from x_T with guidance: uncond is one [1, 77, D] embedding for all steps or one per step
// (the generation core's guided noise prediction; guidance_scale <= 1 runs the conditional branch only, as
// every pipeline does). Returns the final latents [1, 4, h, w].
at::Tensor ddim_sample(loaders::StableDiffusionModels& m, const at::Tensor& x_T, const at::Tensor& cond,
                       const std::vector<at::Tensor>& uncond, int num_inference_steps, double guidance_scale);

// Peak signal-to-noise ratio in dB of two images in [0, 1] (any equal shapes): 10 log10(1 / MSE).
double psnr(const at::Tensor& a, const at::Tensor& b);
}  // namespace dmx::pipelines
