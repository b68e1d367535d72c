// DDIM inversion (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 13 run backwards; diffusers'
// DDIMInverseScheduler): maps clean latents z0 to noisy latents along the deterministic DDIM path, under a
// prompt with classifier-free guidance (1.0 = conditional branch only). Shared by DiffEdit (Couairon et al.
// 2022) and null-text inversion (Mokady et al. 2022).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "pipelines/model_bundle.h"

namespace dmx::pipelines {

struct DDIMInversionParams {
  at::Tensor latents;                 // z0 [N, 4, h, w], already multiplied by the VAE scaling factor
  at::Tensor prompt_embeds;           // [N, 77, D] conditional
  at::Tensor negative_prompt_embeds;  // [N, 77, D]; needed when guidance_scale > 1
  int num_inference_steps = 50;
  double guidance_scale = 1.0;
  double inpaint_strength = 1.0;  // fraction of the schedule inverted (DiffEdit's encode ratio), in (0, 1]
  bool show_progress = true;
};

struct DDIMInversionOutput {
  std::vector<at::Tensor> latents;  // z after each inversion step, ascending noise level (float32)
  std::vector<double> timesteps;    // the timestep of each step, ascending
};

DDIMInversionOutput ddim_invert(const StableDiffusionModels& m, const DDIMInversionParams& p);
}  // namespace dmx::pipelines
