// DDIM inversion (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 13 run backwards; diffusers'
// DDIMInverseScheduler): maps clean latents z0 to noisy latents along the deterministic DDIM path, under a
// prompt with classifier-free guidance (1.0 = conditional branch only). Shared by DiffEdit (Couairon et al.
// 2022) and null-text inversion (Mokady et al. 2022).
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

#include "loaders/model_bundle.h"

namespace dmx::pipelines {

struct DDIMInversionParams {
  at::Tensor latents;                 // z0 [N, 4, h, w], already multiplied by the VAE scaling factor
  at::Tensor prompt_embeds;           // [N, 77, D] conditional
  at::Tensor negative_prompt_embeds;  // [N, 77, D]; needed when guidance_scale > 1
  int num_inference_steps = 50;
  double guidance_scale = 1.0;
  double inpaint_strength = 1.0;  // fraction of the schedule inverted (DiffEdit's encode ratio), in (0, 1]
  bool show_progress = true;
  // Called after each step with the step index, its timestep, the new latents and the (guided) noise
  // prediction that produced them. It may replace the latents (the next step and the output use what it
  // leaves): tests record ε and feed reference latents step by step.
  std::function<void(int step, double t, at::Tensor& latents, const at::Tensor& noise_pred)> on_step_end;
};

struct DDIMInversionOutput {
  std::vector<at::Tensor> latents;  // z after each inversion step, ascending noise level (float32)
  std::vector<double> timesteps;    // the timestep of each step, ascending
};

// Steps the inversion runs: get_inverse_timesteps' num_inference_steps - t_start, t_start = steps - int(steps *
// strength).
int inverse_step_count(int num_inference_steps, double inpaint_strength);

DDIMInversionOutput ddim_invert(const loaders::StableDiffusionModels& m, const DDIMInversionParams& p);
}  // namespace dmx::pipelines
