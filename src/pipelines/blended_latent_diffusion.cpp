#include "pipelines/blended_latent_diffusion.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/phase_timer.h"
#include "dmx/error.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

using extensions::Background;

BlendedLatentDiffusionPipeline::BlendedLatentDiffusionPipeline(std::shared_ptr<loaders::StableDiffusionModels> models)
    : m_(models), sd_(models) {}

void BlendedLatentDiffusionPipeline::check_params(const BlendedLatentDiffusionParams& p) const {
  DMX_CHECK_ARG(
      p.init_image.defined() && p.init_image.dim() == 4 && p.init_image.size(0) == 1 && p.init_image.size(1) == 3,
      "init_image must be [1, 3, H, W], got ", p.init_image.defined() ? p.init_image.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(p.mask.defined() && p.mask.dim() == 4 && p.mask.size(0) == 1 && p.mask.size(1) == 1,
                "mask must be [1, 1, H, W], got ", p.mask.defined() ? p.mask.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(p.mask.size(2) == p.init_image.size(2) && p.mask.size(3) == p.init_image.size(3), "mask is ",
                p.mask.size(3), "x", p.mask.size(2), " but the image is ", p.init_image.size(3), "x",
                p.init_image.size(2), " (the mask must have the image's size)");
  DMX_CHECK_ARG(std::isfinite(p.strength) && p.strength >= 0 && p.strength <= 1, "strength must be in [0, 1], got ",
                p.strength);
  DMX_CHECK_ARG(std::isfinite(p.blend_start) && p.blend_start >= 0 && p.blend_start < 1,
                "blend_start must be in [0, 1), got ", p.blend_start);
  DMX_CHECK_ARG(p.mask_dilation >= 0 && p.mask_dilation <= 64, "mask_dilation must be in [0, 64], got ",
                p.mask_dilation);
  DMX_CHECK_SUPPORTED(
      m_->unet->config().in_channels == 4, "blended latent diffusion needs a 4-channel UNet; this one has ",
      m_->unet->config().in_channels,
      " input channels (a dedicated inpainting model, whose 9-channel path dmx does not implement yet)");
  // The remaining rules (steps, guidance, eta, sizes, clip skip) are StableDiffusionPipeline's img2img ones.
  StableDiffusionParams sp;
  static_cast<GenerationParams&>(sp) = p;
  sp.init_image = p.init_image;
  sp.strength = p.strength;
  sd_.check_params(sp);
  for (int t : p.rank_options.timesteps)
    DMX_CHECK_ARG(t >= 0 && t < 1000, "rank timesteps must be in [0, 1000), got ", t);
}

at::Tensor BlendedLatentDiffusionPipeline::prepare_latent_mask(const at::Tensor& mask, BlendVariant variant) const {
  const int f = m_->vae_scale_factor();
  const int64_t h = mask.size(2) / f, w = mask.size(3) / f;
  if (variant == BlendVariant::kInpaint)  // mask_processor (binarize) then F.interpolate(size=latent size)
    return extensions::resize_mask_nearest(extensions::binarize_mask(mask), h, w, extensions::NearestMode::kTorch);
  return extensions::resize_mask_nearest(mask, h, w, extensions::NearestMode::kPil);  // preprocess_mask
}

BlendedLatentDiffusionOutput BlendedLatentDiffusionPipeline::run(const BlendedLatentDiffusionParams& p) {
  at::NoGradGuard no_grad;
  // 1. Check inputs.
  check_params(p);
  const int n = p.num_images_per_prompt;
  const bool legacy = p.variant == BlendVariant::kLegacy;

  // 2. Encode the prompt (uncond first).
  PhaseTimer encode_timer("text encode");
  const at::Tensor embeds = encode_prompts(*m_, p);
  encode_timer.stop();

  // 3. Timesteps, cut by strength (get_timesteps); the legacy pipeline slices without the scheduler order.
  auto sched = make_scheduler(*m_, p.scheduler, p.num_inference_steps);
  const int start = strength_first_step(*sched, p.num_inference_steps, p.strength, !legacy);
  const std::vector<double>& ts = sched->timesteps();
  const int total = static_cast<int>(ts.size()) - start;

  // 4. Latents, drawing as the reference does: the image's posterior sample, then the noise, then (inpaint)
  //    the masked image's posterior sample, which a 4-channel UNet never uses.
  PhaseTimer latents_timer("encode image");
  at::Tensor image_latents = encode_image_latents(*m_, p.init_image, p.generator, p.posterior_noise);  // [1, 4, h, w]
  const auto latent_shape = image_latents.sizes().vec();
  image_latents = image_latents.repeat({n, 1, 1, 1});  // [N, 4, h, w]
  at::Tensor noise;
  at::Tensor latents;
  if (p.latents.defined()) {
    DMX_CHECK_ARG(p.latents.sizes().equals(image_latents.sizes()), "init latents must have shape ",
                  image_latents.sizes(), ", got ", p.latents.sizes());
    noise = p.latents.to(at::kFloat);
    latents = legacy ? sched->add_noise(image_latents, noise, start) : noise * sched->init_noise_sigma();
  } else {
    noise = randn_tensor(image_latents.sizes(), p.generator);
    if (legacy)
      latents = sched->add_noise(image_latents, noise, start);
    else
      latents = p.strength == 1.0 ? noise * sched->init_noise_sigma() : sched->add_noise(image_latents, noise, start);
  }
  if (!legacy && !p.posterior_noise.defined()) (void)randn_tensor(latent_shape, p.generator);  // masked image's
  latents_timer.stop();

  // 5. Masks at latent size; progressive shrinking puts the dilated ones first.
  const at::Tensor latent_mask = prepare_latent_mask(p.mask, p.variant);  // [1, 1, h, w]
  extensions::LatentBlendConfig bc;
  bc.image_latents = image_latents;
  bc.noise = noise;
  bc.masks = extensions::progressive_masks(latent_mask, p.mask_dilation);
  if (p.mask_dilation > 0) {
    // Dilation needs a binary mask; the final blend keeps the mask itself.
    for (auto& m : bc.masks) m = extensions::binarize_mask(m);
  }
  bc.final_mask = latent_mask;
  bc.schedule = legacy ? extensions::BlendSchedule::kSameTimestep : extensions::BlendSchedule::kNextTimestep;
  bc.start_index = start;
  bc.num_steps = total;
  bc.blend_start_step = static_cast<int>(total * p.blend_start);
  const extensions::LatentBlend blender(*sched, bc);

  // 6. Denoising: the Stable Diffusion loop, with the blend as its step callback (before the caller's).
  PhaseTimer denoise_timer("denoise");
  GenerationParams loop = p;
  loop.on_step_end = [&](int step, double t, at::Tensor& l) {
    blender.on_step_end(step, l);
    if (p.on_step_end) p.on_step_end(step, t, l);
  };
  latents = sd_.denoise(*sched, latents, start, embeds, loop);
  denoise_timer.stop();

  // 7. Final blend: z_init outside the mask.
  latents = blender.final_blend(latents);

  // 8. Decode.
  PhaseTimer decode_timer("decode");
  BlendedLatentDiffusionOutput out;
  out.latents = latents.contiguous();
  out.timesteps.assign(ts.begin() + start, ts.end());
  out.decoded = sd_.decode_latents(latents, p.show_progress);
  out.original = (p.init_image[0].to(at::kFloat).permute({1, 2, 0}) / 2 + 0.5).clamp(0, 1).contiguous();
  out.pixel_mask = extensions::binarize_mask(p.mask)[0][0].contiguous();
  out.latent_mask = latent_mask;
  decode_timer.stop();

  // 9. Background reconstruction (BLD section 4.1), per sample.
  PhaseTimer bg_timer("background");
  std::vector<at::Tensor> images;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor edited = out.decoded[i];
    switch (p.background) {
      case Background::kLatent:
        images.push_back(edited);
        break;
      case Background::kPixel:
        images.push_back(extensions::pixel_stitch(edited, out.original, out.pixel_mask));
        break;
      case Background::kPoisson:
        images.push_back(extensions::poisson_blend(edited, out.original, out.pixel_mask));
        break;
      case Background::kOptimizeLatents:
        images.push_back(extensions::optimize_latents(m_->vae, latents.narrow(0, i, 1), edited, out.original,
                                                      out.pixel_mask, p.reconstruction));
        break;
      case Background::kFinetuneDecoder:
        images.push_back(extensions::finetune_decoder(m_->vae, latents.narrow(0, i, 1), edited, out.original,
                                                      out.pixel_mask, p.reconstruction));
        break;
    }
  }
  out.images = at::stack(images, 0).contiguous();
  bg_timer.stop();

  // 10. Ranking.
  out.order.resize(static_cast<size_t>(n));
  std::iota(out.order.begin(), out.order.end(), 0);
  if (p.rank) {
    PhaseTimer rank_timer("rank");
    out.scores = rank_scores(latents, latent_mask, p.prompt, p.clip_skip, p.rank_options);
    std::stable_sort(out.order.begin(), out.order.end(), [&](int a, int b) {
      return out.scores[static_cast<size_t>(a)] > out.scores[static_cast<size_t>(b)];
    });
  }
  return out;
}

std::vector<double> BlendedLatentDiffusionPipeline::rank_scores(const at::Tensor& latents,
                                                                const at::Tensor& latent_mask,
                                                                const std::string& prompt, int clip_skip,
                                                                const RankOptions& o) {
  at::NoGradGuard no_grad;
  DMX_CHECK_ARG(!o.timesteps.empty(), "rank: no timesteps");
  const int64_t n = latents.size(0);
  // Noise levels of the training schedule (the model's betas).
  const auto cfg = schedulers::SchedulerConfig::for_class("DDPMScheduler", m_->scheduler_config);
  const at::Tensor ac = at::cumprod(1 - schedulers::make_betas(cfg).to(at::kDouble), 0);
  const at::Tensor cond = encode_prompt(*m_, prompt, clip_skip), uncond = encode_prompt(*m_, "", clip_skip);
  const at::Tensor embeds = at::cat({uncond, cond}, 0).to(m_->dtype);  // [2, 77, D]
  auto gen = make_generator(o.seed);
  const at::Tensor m = latent_mask.to(at::kFloat);
  const double area = std::max(m.sum().item<double>(), 1.0) * latents.size(1);
  std::vector<double> scores(static_cast<size_t>(n), 0.0);
  for (int t : o.timesteps) {
    DMX_CHECK_ARG(t >= 0 && t < ac.size(0), "rank timesteps must be in [0, ", ac.size(0), "), got ", t);
    const at::Tensor eps = randn_tensor(latents.sizes().slice(1), &gen).unsqueeze(0);
    const double a = ac[t].item<double>();
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor z0 = latents.narrow(0, i, 1).to(at::kFloat);
      const at::Tensor zt = z0 * std::sqrt(a) + eps * std::sqrt(1 - a);
      const auto pr = predict_noise(*m_, at::cat({zt, zt}, 0), static_cast<double>(t), embeds).chunk(2, 0);
      const double err_u = ((pr[0] - eps).pow(2) * m).sum().item<double>() / area;
      const double err_c = ((pr[1] - eps).pow(2) * m).sum().item<double>() / area;
      scores[static_cast<size_t>(i)] += (err_u - err_c) / static_cast<double>(o.timesteps.size());
    }
  }
  return scores;
}
}  // namespace dmx::pipelines
