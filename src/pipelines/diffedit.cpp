// DiffEdit phases, step by step as diffusers 0.27.2 pipeline_stable_diffusion_diffedit.py runs them.
#include "pipelines/diffedit.h"

#include <cmath>

#include "dmx/error.h"
#include "pipelines/ddim_inversion.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

namespace {
at::IntArrayRef sizes_of(const at::Tensor& t) { return t.defined() ? t.sizes() : at::IntArrayRef{}; }
}  // namespace

DiffEditPipeline::DiffEditPipeline(std::shared_ptr<loaders::StableDiffusionModels> models) : m_(models), sd_(models) {}

void DiffEditPipeline::check_image(const at::Tensor& image, const char* what) const {
  DMX_CHECK_ARG(image.defined() && image.dim() == 4 && image.size(0) == 1 && image.size(1) == 3, what,
                ": image must be [1, 3, H, W], got ", sizes_of(image));
  const int f = std::max(8, m_->vae_scale_factor());
  DMX_CHECK_ARG(image.size(2) % f == 0 && image.size(3) % f == 0, what, ": image size must be a multiple of ", f,
                ", got ", image.size(3), "x", image.size(2));
  DMX_CHECK_ARG(image.size(2) <= 4096 && image.size(3) <= 4096, what, ": image size must be at most 4096x4096, got ",
                image.size(3), "x", image.size(2));
}

DiffEditMaskOutput DiffEditPipeline::generate_mask(const DiffEditMaskParams& p) {
  at::NoGradGuard no_grad;
  // 1. Check inputs.
  check_image(p.image, "generate_mask");
  check_num_inference_steps(p.num_inference_steps, "generate_mask: num_inference_steps");
  check_guidance_scale(p.guidance_scale, "generate_mask: guidance_scale");
  DMX_CHECK_ARG(p.num_maps_per_mask >= 1 && p.num_maps_per_mask <= 1000,
                "generate_mask: num_maps_per_mask must be in [1, 1000], got ", p.num_maps_per_mask);
  DMX_CHECK_ARG(std::isfinite(p.mask_encode_strength) && p.mask_encode_strength >= 0 && p.mask_encode_strength <= 1,
                "generate_mask: mask_encode_strength must be in [0, 1], got ", p.mask_encode_strength);
  DMX_CHECK_ARG(std::isfinite(p.mask_thresholding_ratio) && p.mask_thresholding_ratio > 0,
                "generate_mask: mask_thresholding_ratio must be positive, got ", p.mask_thresholding_ratio);
  DMX_CHECK_ARG(p.max_unet_batch >= 1, "generate_mask: max_unet_batch must be >= 1, got ", p.max_unet_batch);
  const int64_t n = p.num_maps_per_mask;
  const bool cfg = p.guidance_scale > 1.0;

  // 3. Encode the prompts. diffusers 0.27.2 unpacks encode_prompt's (cond, uncond) as (negative, cond), so its
  // batch is [source cond, source uncond, target cond, target uncond] and its "guided" estimates below are
  // ε_c + g (ε_u - ε_c). Kept as the reference computes it; with equal negative prompts for source and target
  // the uncond terms cancel and the thresholded mask equals the paper's (the scale normalises out).
  auto embeds_of = [&](const std::string& prompt, const std::string& negative) {
    at::Tensor cond = encode_prompt(*m_, prompt).repeat({n, 1, 1});
    if (!cfg) return cond;
    return at::cat({cond, encode_prompt(*m_, negative).repeat({n, 1, 1})}, 0);
  };
  const at::Tensor source_embeds = embeds_of(p.source_prompt, p.source_negative_prompt);
  const at::Tensor target_embeds = embeds_of(p.target_prompt, p.target_negative_prompt);
  const at::Tensor prompt_embeds = at::cat({source_embeds, target_embeds}, 0).to(m_->device, m_->dtype);

  // 5. Timesteps: the encode timestep is the first one img2img would run at mask_encode_strength.
  auto sched = make_scheduler(*m_, p.scheduler, p.num_inference_steps);
  const int start = strength_start_index(p.num_inference_steps, p.mask_encode_strength) * sched->order();
  DMX_CHECK_ARG(start < static_cast<int>(sched->timesteps().size()), "generate_mask: mask_encode_strength ",
                p.mask_encode_strength, " with ", p.num_inference_steps,
                " steps leaves no timestep to noise to (int(steps * strength) must be >= 1)");
  const double encode_timestep = sched->timesteps()[static_cast<size_t>(start)];

  // 6. Image latents (the image repeated num_maps times: one posterior draw of that batch), then noise.
  at::Tensor image_latents = encode_image_latents(*m_, p.image, p.generator, p.posterior_noise, n);  // [n, 4, h, w]
  DMX_CHECK_ARG(!p.noise.defined() || p.noise.sizes().equals(image_latents.sizes()),
                "generate_mask: noise must have shape ", image_latents.sizes(), ", got ", sizes_of(p.noise));
  const at::Tensor noise =
      p.noise.defined() ? p.noise.to(at::kFloat).to(at::kCPU) : randn_tensor(image_latents.sizes(), p.generator);
  image_latents = sched->add_noise(image_latents, noise, start);

  // 7. Noise estimates under both prompts at the encode timestep.
  at::Tensor model_in = at::cat(std::vector<at::Tensor>(cfg ? 4 : 2, image_latents), 0);
  model_in = sched->scale_model_input(model_in, start).to(m_->device, m_->dtype);
  std::vector<at::Tensor> preds;
  for (int64_t b = 0; b < model_in.size(0); b += p.max_unet_batch) {
    const int64_t len = std::min<int64_t>(p.max_unet_batch, model_in.size(0) - b);
    preds.push_back(predict_noise(*m_, model_in.narrow(0, b, len), encode_timestep, prompt_embeds.narrow(0, b, len)));
  }
  const at::Tensor noise_pred = at::cat(preds, 0);
  at::Tensor pred_source, pred_target;
  if (cfg) {
    auto c = noise_pred.chunk(4, 0);  // source cond, source uncond, target cond, target uncond (see 3.)
    pred_source = c[0] + p.guidance_scale * (c[1] - c[0]);
    pred_target = c[2] + p.guidance_scale * (c[3] - c[2]);
  } else {
    // diffusers 0.27.2 raises here (its unpacking leaves the embeddings None); the plain estimates are used.
    auto c = noise_pred.chunk(2, 0);
    pred_source = c[0];
    pred_target = c[1];
  }

  // 8. Mask: mean |difference| over the maps and channels, clipped at ratio x its mean, normalised, threshold 0.5.
  const int64_t h = noise_pred.size(2), w = noise_pred.size(3);
  DiffEditMaskOutput out;
  out.guidance_map = at::abs(pred_target - pred_source).reshape({1, n, noise_pred.size(1), h, w}).mean({1, 2});
  const at::Tensor clamp_magnitude = out.guidance_map.mean() * p.mask_thresholding_ratio;
  const at::Tensor semantic = at::clamp_max(at::clamp_min(out.guidance_map, 0), clamp_magnitude) / clamp_magnitude;
  out.mask = at::where(semantic <= 0.5, at::zeros_like(semantic), at::ones_like(semantic));
  return out;
}

DiffEditInvertOutput DiffEditPipeline::invert(const DiffEditInvertParams& p) {
  at::NoGradGuard no_grad;
  // 1. Check inputs.
  check_image(p.image, "invert");
  check_num_inference_steps(p.num_inference_steps, "invert: num_inference_steps");
  check_guidance_scale(p.guidance_scale, "invert: guidance_scale");
  DMX_CHECK_ARG(std::isfinite(p.inpaint_strength) && p.inpaint_strength > 0 && p.inpaint_strength <= 1,
                "invert: inpaint_strength must be in (0, 1], got ", p.inpaint_strength);
  // 4. Image latents: one posterior draw. 5. Prompt.
  DDIMInversionParams ip;
  ip.latents = encode_image_latents(*m_, p.image, p.generator, p.posterior_noise);
  ip.prompt_embeds = encode_prompt(*m_, p.prompt);
  if (p.guidance_scale > 1.0) ip.negative_prompt_embeds = encode_prompt(*m_, p.negative_prompt);
  ip.num_inference_steps = p.num_inference_steps;
  ip.guidance_scale = p.guidance_scale;
  ip.inpaint_strength = p.inpaint_strength;
  ip.show_progress = p.show_progress;
  ip.on_step_end = p.on_step_end;
  // 6-7. Inversion loop.
  DDIMInversionOutput inv = ddim_invert(*m_, ip);
  // Stacked noisiest first: latents[:, k] is the k-th latent the edit loop blends with.
  DiffEditInvertOutput out;
  std::vector<at::Tensor> rev(inv.latents.rbegin(), inv.latents.rend());
  out.latents = at::stack(rev, 1).contiguous();  // [1, K, 4, h, w]
  out.timesteps.assign(inv.timesteps.rbegin(), inv.timesteps.rend());
  return out;
}

StableDiffusionOutput DiffEditPipeline::run(const DiffEditParams& p) {
  at::NoGradGuard no_grad;
  // 1. Check inputs.
  check_generation_params(p, *m_);
  DMX_CHECK_SUPPORTED(p.num_images_per_prompt == 1, "diffedit: one edit per image (num_images_per_prompt 1), got ",
                      p.num_images_per_prompt);
  DMX_CHECK_ARG(std::isfinite(p.inpaint_strength) && p.inpaint_strength >= 0 && p.inpaint_strength <= 1,
                "diffedit: inpaint_strength must be in [0, 1], got ", p.inpaint_strength);
  DMX_CHECK_ARG(p.mask_image.defined(),
                "diffedit: mask_image is required (use generate_mask() to compute it from text prompts)");
  DMX_CHECK_ARG(p.image_latents.defined(),
                "diffedit: image_latents is required (use invert() to compute them from the input image)");

  // 3. Prompt (uncond first).
  const at::Tensor embeds = encode_prompts(*m_, p);

  // 4. Mask (preprocess_mask): [1, 1, h, w], values in [0, 1], binarised at 0.5.
  at::Tensor mask = p.mask_image.to(at::kFloat).to(at::kCPU);
  if (mask.dim() == 2) mask = mask.unsqueeze(0);
  if (mask.dim() == 3) mask = mask.unsqueeze(0);
  DMX_CHECK_ARG(mask.dim() == 4 && mask.size(0) == 1 && mask.size(1) == 1,
                "diffedit: mask_image must be [h, w], [1, h, w] or [1, 1, h, w], got ", p.mask_image.sizes());
  DMX_CHECK_ARG(mask.min().item<float>() >= 0 && mask.max().item<float>() <= 1,
                "diffedit: mask_image must be in [0, 1], got values in [", mask.min().item<float>(), ", ",
                mask.max().item<float>(), "]");
  mask = at::where(mask >= 0.5, at::ones_like(mask), at::zeros_like(mask));
  const int64_t lh = mask.size(2), lw = mask.size(3);

  // 5. Timesteps.
  auto sched = make_scheduler(*m_, p.scheduler, p.num_inference_steps);
  const std::vector<double>& ts = sched->timesteps();
  const int start = strength_start_index(p.num_inference_steps, p.inpaint_strength) * sched->order();
  const int64_t count = static_cast<int64_t>(ts.size()) - start;
  DMX_CHECK_ARG(count >= 1, "diffedit: inpaint_strength ", p.inpaint_strength, " with ", p.num_inference_steps,
                " steps runs no step (int(steps * inpaint_strength) must be >= 1)");

  // 6. Inverted latents: [1, K, 4, h, w] -> [K, 1, 4, h, w].
  const int64_t c = m_->vae->config().latent_channels;
  const at::Tensor& il = p.image_latents;
  DMX_CHECK_ARG(il.dim() == 5 && il.size(2) == c && il.size(3) == lh && il.size(4) == lw,
                "diffedit: each latent image in image_latents must have shape [", c, ", ", lh, ", ", lw,
                "] (the mask's latent size), got image_latents ", il.sizes());
  DMX_CHECK_ARG(il.size(0) == 1 && il.size(1) == count, "diffedit: image_latents must have batch size 1 with latent ",
                "images from ", count, " timesteps (invert with the same steps and inpaint_strength), got ",
                il.sizes());
  const at::Tensor inverted = il.transpose(0, 1).to(at::kFloat).to(at::kCPU);

  // 8. Denoising: the Stable Diffusion loop, with the background taken from the inversion path as its step
  //    callback (before the caller's).
  GenerationParams loop = p;
  loop.on_step_end = [&](int k, double t, at::Tensor& latents) {
    // The reference blends with the inverted latent of the level it came from (index k, not k + 1).
    latents = latents * mask + inverted[k] * (1 - mask);
    if (p.on_step_end) p.on_step_end(k, t, latents);
  };
  const at::Tensor latents = sd_.denoise(*sched, inverted[0].clone(), start, embeds, loop);

  StableDiffusionOutput out;
  out.latents = latents.contiguous();
  out.timesteps.assign(ts.begin() + start, ts.end());
  out.images = sd_.decode_latents(latents, false);
  return out;
}
}  // namespace dmx::pipelines
