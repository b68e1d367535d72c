// DDIM inversion loop: diffusers 0.27.2 StableDiffusionDiffEditPipeline.invert steps 6-7 (get_inverse_timesteps
// and the noising loop with DDIMInverseScheduler), without the Pix2Pix-Zero regularisation (num_reg_steps = 0,
// the reference's default).
#include "pipelines/ddim_inversion.h"

#include <cmath>

#include "core/progress.h"
#include "dmx/error.h"
#include "pipelines/generation.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

int inverse_step_count(int num_inference_steps, double inpaint_strength) {
  // get_inverse_timesteps: the first int(steps * strength) ascending timesteps (all of them when t_start is 0).
  const int init_timestep = std::min(static_cast<int>(num_inference_steps * inpaint_strength), num_inference_steps);
  const int t_start = std::max(num_inference_steps - init_timestep, 0);
  return num_inference_steps - t_start;
}

DDIMInversionOutput ddim_invert(const loaders::StableDiffusionModels& m, const DDIMInversionParams& p) {
  at::NoGradGuard no_grad;
  // 1. Check inputs.
  DMX_CHECK_ARG(p.latents.defined() && p.latents.dim() == 4 && p.latents.size(1) == m.unet->config().in_channels,
                "ddim_invert: latents must be [N, ", m.unet->config().in_channels, ", h, w], got ",
                p.latents.defined() ? p.latents.sizes() : at::IntArrayRef{});
  const int64_t n = p.latents.size(0);
  check_num_inference_steps(p.num_inference_steps, "ddim_invert: num_inference_steps");
  check_guidance_scale(p.guidance_scale, "ddim_invert: guidance_scale");
  DMX_CHECK_ARG(std::isfinite(p.inpaint_strength) && p.inpaint_strength > 0 && p.inpaint_strength <= 1,
                "ddim_invert: inpaint_strength must be in (0, 1], got ", p.inpaint_strength);
  const int count = inverse_step_count(p.num_inference_steps, p.inpaint_strength);
  DMX_CHECK_ARG(count >= 1, "ddim_invert: inpaint_strength ", p.inpaint_strength, " with ", p.num_inference_steps,
                " steps inverts no step (int(steps * inpaint_strength) must be >= 1); raise either");
  DMX_CHECK_ARG(p.prompt_embeds.defined() && p.prompt_embeds.dim() == 3 && p.prompt_embeds.size(0) == n,
                "ddim_invert: prompt_embeds must be [", n, ", L, D], got ",
                p.prompt_embeds.defined() ? p.prompt_embeds.sizes() : at::IntArrayRef{});
  const bool cfg = p.guidance_scale > 1.0;
  at::Tensor embeds = p.prompt_embeds;
  if (cfg) {
    DMX_CHECK_ARG(
        p.negative_prompt_embeds.defined() && p.negative_prompt_embeds.sizes().equals(p.prompt_embeds.sizes()),
        "ddim_invert: guidance_scale ", p.guidance_scale, " > 1 needs negative_prompt_embeds of shape ",
        p.prompt_embeds.sizes());
    embeds = at::cat({p.negative_prompt_embeds, p.prompt_embeds}, 0);  // uncond first, as diffusers
  }
  embeds = embeds.to(m.device, m.dtype);

  // 2. Timesteps: DDIMInverseScheduler from the model's scheduler config (from_config swaps the class).
  auto sched = make_scheduler(m, "ddim_inverse", p.num_inference_steps);
  const std::vector<double>& ts = sched->timesteps();

  // 3. Noising loop: z_{t} -> z_{t+Δ} with ε_θ(z_t, t).
  DDIMInversionOutput out;
  at::Tensor latents = p.latents.to(at::kFloat).to(at::kCPU);
  ProgressBar bar("invert", count, p.show_progress);
  for (int i = 0; i < count; ++i) {
    const double t = ts[static_cast<size_t>(i)];
    const at::Tensor noise_pred = guided_noise_prediction(m, *sched, latents, i, embeds, p.guidance_scale);
    latents = sched->step(noise_pred, i, latents).prev_sample;
    if (p.on_step_end) p.on_step_end(i, t, latents, noise_pred);
    out.latents.push_back(latents.clone());
    out.timesteps.push_back(t);
    bar.tick();
  }
  bar.finish();
  return out;
}
}  // namespace dmx::pipelines
