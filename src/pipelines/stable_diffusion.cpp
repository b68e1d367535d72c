#include "pipelines/stable_diffusion.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "core/phase_timer.h"
#include "core/progress.h"
#include "dmx/error.h"
#include "loaders/lora_loader.h"
#include "pipelines/memory_estimate.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

namespace {
constexpr int kMaxSide = 4096;

void check_controlnet_params(const StableDiffusionParams& p, const loaders::StableDiffusionModels& m) {
  if (p.controlnets.empty()) return;
  DMX_CHECK_SUPPORTED(!p.init_image.defined(), "ControlNet with an init image (img2img) is not supported yet");
  for (size_t c = 0; c < p.controlnets.size(); ++c) {
    const ControlNetUnit& u = p.controlnets[c];
    const std::string what = "controlnet[" + std::to_string(c) + "]" + (u.name.empty() ? "" : " (" + u.name + ")");
    DMX_CHECK_ARG(static_cast<bool>(u.model), what, ": no model loaded");
    models::check_controlnet_matches_unet(u.model->config(), m.unet->config(), what);
    DMX_CHECK_ARG(std::isfinite(u.scale), what, ": control scale must be finite, got ", u.scale);
    DMX_CHECK_ARG(u.start >= 0 && u.start <= 1, what, ": control start must be in [0, 1], got ", u.start);
    DMX_CHECK_ARG(u.end >= 0 && u.end <= 1, what, ": control end must be in [0, 1], got ", u.end);
    DMX_CHECK_ARG(u.start < u.end, what, ": control start (", u.start, ") must be smaller than control end (", u.end,
                  ")");
    DMX_CHECK_ARG(u.image.defined() && u.image.dim() == 4 && u.image.size(0) == 1 &&
                      u.image.size(1) == u.model->config().conditioning_channels,
                  what, ": control image must be [1, ", u.model->config().conditioning_channels, ", H, W], got ",
                  u.image.defined() ? u.image.sizes() : at::IntArrayRef{});
    DMX_CHECK_ARG(u.image.size(2) == p.height && u.image.size(3) == p.width, what, ": control image is ",
                  u.image.size(3), "x", u.image.size(2), " but the output is ", p.width, "x", p.height,
                  " (prepare it with prepare_control_image at the output size)");
  }
}
}

at::Tensor encode_image_latents(const loaders::StableDiffusionModels& m, const at::Tensor& image, at::Generator* generator,
                                const at::Tensor& noise) {
  at::NoGradGuard no_grad;
  models::AutoencoderKL vae = m.vae;  // shared handle (forward is non-const)
  auto dist = vae->encode(image.to(m.device, m.dtype));
  const at::Tensor mean = dist.mean.to(at::kFloat).to(at::kCPU), std = dist.std.to(at::kFloat).to(at::kCPU);
  at::Tensor eps;
  if (noise.defined()) {
    DMX_CHECK_ARG(noise.sizes().equals(mean.sizes()), "posterior noise must have shape ", mean.sizes(), ", got ",
                  noise.sizes());
    eps = noise.to(at::kFloat).to(at::kCPU);
  } else {
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    eps = generator ? at::randn(mean.sizes(), *generator, opts) : at::randn(mean.sizes(), opts);
  }
  return (mean + std * eps) * m.vae->config().scaling_factor;
}

StableDiffusionPipeline::StableDiffusionPipeline(std::shared_ptr<loaders::StableDiffusionModels> models)
    : m_(std::move(models)) {
  DMX_CHECK_ARG(m_ != nullptr, "StableDiffusionPipeline: models must not be null");
}

void StableDiffusionPipeline::check_max_size(const StableDiffusionParams& p) const {
  const bool img2img = p.init_image.defined() && p.init_image.dim() == 4;
  const int w = img2img ? static_cast<int>(p.init_image.size(3)) : p.width;
  const int h = img2img ? static_cast<int>(p.init_image.size(2)) : p.height;
  if (w <= kMaxSide && h <= kMaxSide) return;
  const bool cfg = p.guidance_scale > 1.0;
  const int n = std::max(1, p.num_images_per_prompt);
  const MemoryEstimate need = estimate_memory(*m_, w, h, n, cfg);
  const MemoryEstimate at_max = estimate_memory(*m_, kMaxSide, kMaxSide, n, cfg);
  const char* dtype = m_->dtype == at::kHalf ? "fp16" : m_->dtype == at::kBFloat16 ? "bf16" : "fp32";
  throw InvalidArgument(detail::concat(
      img2img ? "init image size " : "width x height ", w, "x", h, " exceeds the maximum of ", kMaxSide, "x",
      kMaxSide, " (width and height must be at most ", kMaxSide, "); it would need about ", format_bytes(need.total()),
      " of memory in ", dtype, " (weights ", format_bytes(need.weights), ", UNet activations ", format_bytes(need.unet),
      ", VAE decode ", format_bytes(need.vae), "), against about ", format_bytes(at_max.total()), " at ", kMaxSide,
      "x", kMaxSide));
}

void StableDiffusionPipeline::check_params(const StableDiffusionParams& p) const {
  // diffusers requires multiples of 8 whatever the VAE; a deeper VAE needs multiples of its factor.
  const int f = std::max(8, m_->vae_scale_factor());
  if (!p.init_image.defined()) {
    DMX_CHECK_ARG(p.width >= 0 && p.height >= 0, "width and height must be positive, got ", p.width, "x", p.height);
    DMX_CHECK_ARG(p.width % f == 0, "width must be a multiple of ", f, ", got ", p.width);
    DMX_CHECK_ARG(p.height % f == 0, "height must be a multiple of ", f, ", got ", p.height);
  }
  check_max_size(p);
  DMX_CHECK_ARG(p.num_inference_steps >= 1 && p.num_inference_steps <= 1000,
                "steps must be in [1, 1000], got ", p.num_inference_steps);
  DMX_CHECK_ARG(std::isfinite(p.guidance_scale) && p.guidance_scale >= 0 && p.guidance_scale <= 100,
                "guidance_scale must be in [0, 100], got ", p.guidance_scale);
  DMX_CHECK_ARG(std::isfinite(p.eta) && p.eta >= 0 && p.eta <= 1, "eta must be in [0, 1], got ", p.eta);
  DMX_CHECK_ARG(p.num_images_per_prompt >= 1 && p.num_images_per_prompt <= 64,
                "num_images must be in [1, 64], got ", p.num_images_per_prompt);
  check_controlnet_params(p, *m_);
  DMX_CHECK_ARG(p.clip_skip >= 0 && p.clip_skip < m_->text_encoder->config().num_hidden_layers,
                "clip_skip must be in [0, ", m_->text_encoder->config().num_hidden_layers - 1, "], got ", p.clip_skip);
  if (p.init_image.defined()) {
    DMX_CHECK_ARG(std::isfinite(p.strength) && p.strength >= 0 && p.strength <= 1,
                  "strength must be in [0, 1], got ", p.strength);
    DMX_CHECK_ARG(p.init_image.dim() == 4 && p.init_image.size(0) == 1 && p.init_image.size(1) == 3,
                  "init_image must be [1, 3, H, W], got ", p.init_image.sizes());
    DMX_CHECK_ARG(p.init_image.size(2) % f == 0 && p.init_image.size(3) % f == 0, "init image size must be a multiple of ",
                  f, ", got ", p.init_image.size(3), "x", p.init_image.size(2));
  }
}

at::Tensor StableDiffusionPipeline::encode_prompt(const std::string& prompt, int clip_skip) {
  const int max_len = m_->tokenizer->model_max_length();
  std::vector<int64_t> ids = m_->tokenizer->encode_padded(prompt, max_len);
  at::Tensor input = at::tensor(ids, at::kLong).unsqueeze(0).to(m_->device);
  at::NoGradGuard no_grad;
  return m_->text_encoder->encode(input, clip_skip);
}

void check_finite_output(const loaders::StableDiffusionModels& m, const at::Tensor& t, const std::string& what) {
  at::NoGradGuard no_grad;
  const int64_t bad = t.numel() - at::isfinite(t).sum().item<int64_t>();
  if (bad == 0) return;
  const std::string head = detail::concat(what, " hold ", bad, " non-finite value(s) (NaN or Inf) of ", t.numel(),
                                          ": the picture would be black, so nothing is written. ");
  // Which weights are not finite (merged LoRAs show here too)?
  std::vector<std::string> weights;
  size_t count = 0;
  const std::pair<const char*, const torch::nn::Module*> parts[] = {
      {"unet", m.unet.is_empty() ? nullptr : m.unet.get()},
      {"vae", m.vae.is_empty() ? nullptr : m.vae.get()},
      {"text_encoder", m.text_encoder.is_empty() ? nullptr : m.text_encoder.get()}};
  for (const auto& [name, mod] : parts) {
    if (!mod) continue;
    for (const auto& kv : mod->named_parameters(true)) {
      if (at::isfinite(kv.value()).all().item<bool>()) continue;
      if (++count <= 5) weights.push_back(std::string(name) + "." + kv.key());
    }
  }
  std::string list;
  for (const auto& w : weights) list += (list.empty() ? "" : ", ") + w;
  if (count > weights.size()) list += ", ... (" + std::to_string(count) + " tensors in all)";
  const int loras = loaders::count_lora_layers(m);
  if (loras > 0)
    throw InvalidArgument(detail::concat(
        head, "Likely source: the LoRA(s) applied to ", loras, " layer(s) (a non-finite or huge alpha or scale, or "
        "non-finite LoRA weights)", count ? "; non-finite weights after merging: " + list : std::string(),
        ". Check the --lora scales and the LoRA files."));
  if (count > 0)
    throw FormatError(detail::concat(head, "Likely source: the model's weights hold non-finite values: ", list, " (",
                                     m.source_path, ")."));
  throw Error(detail::concat(head, "The weights are finite: a numerical overflow, e.g. from --init-latents with huge "
                                   "values, an extreme --guidance-scale, or a reduced --dtype (try fp32)."));
}

at::Tensor StableDiffusionPipeline::decode_latents(const at::Tensor& latents, bool show_progress) {
  at::NoGradGuard no_grad;
  check_finite_output(*m_, latents, "the denoised latents");
  const double sf = m_->vae->config().scaling_factor;
  std::vector<at::Tensor> out;
  ProgressBar bar("decode", show_progress && latents.size(0) > 1 ? static_cast<int>(latents.size(0)) : 0);
  // Decoded one image at a time: the VAE decoder dominates peak memory at large sizes.
  for (int64_t i = 0; i < latents.size(0); ++i) {
    at::Tensor z = (latents.narrow(0, i, 1) / sf).to(m_->device, m_->dtype);
    at::Tensor x = m_->vae->decode(z).to(at::kFloat);
    check_finite_output(*m_, x, "the decoded image");  // before the clamp, which would hide an Inf
    out.push_back((x / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1}).to(at::kCPU));
    bar.tick();
  }
  bar.finish();
  return at::cat(out, 0).contiguous();
}

StableDiffusionOutput StableDiffusionPipeline::run(const StableDiffusionParams& p_in) {
  at::NoGradGuard no_grad;
  StableDiffusionParams p = p_in;
  const bool img2img = p.init_image.defined();
  const int f = m_->vae_scale_factor();
  if (!img2img && !p.controlnets.empty() && p.controlnets[0].image.defined()) {
    // diffusers' ControlNet pipeline takes the output size from the (prepared) control image.
    if (p.width == 0) p.width = static_cast<int>(p.controlnets[0].image.size(3));
    if (p.height == 0) p.height = static_cast<int>(p.controlnets[0].image.size(2));
  }
  if (!img2img) {
    if (p.width == 0) p.width = m_->default_sample_size();
    if (p.height == 0) p.height = m_->default_sample_size();
  }
  // 1. Check inputs.
  check_params(p);
  DMX_CHECK_ARG(!p.latents.defined() || at::isfinite(p.latents).all().item<bool>(),
                "init latents hold non-finite values (NaN or Inf): every step would propagate them into a black "
                "picture");
  const int n = p.num_images_per_prompt;
  const bool cfg = p.guidance_scale > 1.0;
  std::optional<at::Generator> gen;
  if (p.seed) gen = at::make_generator<at::CPUGeneratorImpl>(*p.seed);
  auto randn = [&](at::IntArrayRef shape) {
    return gen ? at::randn(shape, *gen, at::TensorOptions().dtype(at::kFloat))
               : at::randn(shape, at::TensorOptions().dtype(at::kFloat));
  };

  // 2. Timesteps (before the text encoder: a step count this scheduler refuses fails before any work).
  const std::string sched_name =
      p.scheduler.empty() ? m_->scheduler_config.value("_class_name", std::string("PNDMScheduler")) : p.scheduler;
  auto sched = schedulers::create_scheduler(sched_name, m_->scheduler_config);
  sched->set_timesteps(p.num_inference_steps);
  int start = 0;
  if (img2img) {
    const int init_timestep = std::min(static_cast<int>(p.num_inference_steps * p.strength), p.num_inference_steps);
    const int t_start = std::max(p.num_inference_steps - init_timestep, 0);
    start = t_start * sched->order();
    DMX_CHECK_ARG(init_timestep >= 1 && start < static_cast<int>(sched->timesteps().size()), "strength ", p.strength, " with ",
                  p.num_inference_steps, " steps leaves no denoising step; raise strength or steps");
  }
  const std::vector<double>& ts = sched->timesteps();

  // 3. Encode the prompt (and the negative prompt for guidance); uncond first, as diffusers.
  PhaseTimer encode_timer("text encode");
  at::Tensor cond = encode_prompt(p.prompt, p.clip_skip);
  at::Tensor embeds = cond.repeat({n, 1, 1});
  if (cfg) {
    at::Tensor uncond = encode_prompt(p.negative_prompt, p.clip_skip).repeat({n, 1, 1});
    embeds = at::cat({uncond, embeds}, 0);
  }
  encode_timer.stop();

  // 3b. ControlNet images: repeated per image, doubled for guidance unless in guess mode.
  const bool guess = p.guess_mode || (!p.controlnets.empty() && p.controlnets[0].model &&
                                      p.controlnets[0].model->config().global_pool_conditions);
  std::vector<at::Tensor> control_images;
  for (const ControlNetUnit& u : p.controlnets) {
    at::Tensor img = u.image.repeat_interleave(n, 0);
    control_images.push_back((cfg && !guess ? at::cat({img, img}, 0) : img).to(m_->device, m_->dtype));
  }

  // 4. Latents.
  at::Tensor latents;
  if (!img2img) {
    const int64_t h = p.height / f, w = p.width / f;
    const int64_t c = m_->unet->config().in_channels;
    if (p.latents.defined()) {
      DMX_CHECK_ARG(p.latents.dim() == 4 && p.latents.size(0) == n && p.latents.size(1) == c &&
                        p.latents.size(2) == h && p.latents.size(3) == w,
                    "init latents must have shape [", n, ", ", c, ", ", h, ", ", w, "], got ", p.latents.sizes());
      latents = p.latents.to(at::kFloat);
    } else {
      latents = randn({n, c, h, w});
    }
    latents = latents * sched->init_noise_sigma();
  } else {
    at::Tensor image = p.init_image.to(m_->device, m_->dtype);
    auto dist = m_->vae->encode(image);
    // The posterior sample draws first, then the noise: the reference's order.
    at::Tensor eps = p.posterior_noise.defined() ? p.posterior_noise.to(at::kFloat) : randn(dist.mean.sizes());
    at::Tensor init = (dist.mean.to(at::kFloat) + dist.std.to(at::kFloat) * eps) * m_->vae->config().scaling_factor;
    init = init.repeat({n, 1, 1, 1});
    at::Tensor noise = p.latents.defined() ? p.latents.to(at::kFloat) : randn(init.sizes());
    DMX_CHECK_ARG(noise.sizes().equals(init.sizes()), "init latents must have shape ", init.sizes(), ", got ",
                  noise.sizes());
    latents = sched->add_noise(init, noise, start);
  }

  // 5. Denoising loop.
  PhaseTimer denoise_timer("denoise");
  schedulers::StepArgs args;
  args.eta = p.eta;
  args.generator = gen ? &*gen : nullptr;
  const int total = static_cast<int>(ts.size()) - start;
  ProgressBar bar("steps", p.show_progress ? total : 0);
  for (int i = start; i < static_cast<int>(ts.size()); ++i) {
    const double t = ts[i];
    at::Tensor model_in = cfg ? at::cat({latents, latents}, 0) : latents;
    model_in = sched->scale_model_input(model_in, i);
    models::UNetInputs in;
    in.sample = model_in.to(m_->device, m_->dtype);
    in.timestep = at::scalar_tensor(t, at::TensorOptions().dtype(at::kFloat)).to(m_->device);
    in.encoder_hidden_states = embeds.to(m_->dtype);
    if (!p.controlnets.empty()) {
      // ControlNet residuals (guess mode: the nets see only the conditional half).
      at::Tensor control_in = in.sample, control_embeds = in.encoder_hidden_states;
      if (guess && cfg) {
        control_in = sched->scale_model_input(latents, i).to(m_->device, m_->dtype);
        control_embeds = in.encoder_hidden_states.chunk(2, 0)[1];
      }
      models::ControlNetOutput res;
      for (size_t c = 0; c < p.controlnets.size(); ++c) {
        const ControlNetUnit& u = p.controlnets[c];
        const double cond_scale = u.scale * controlnet_keep(i, static_cast<int>(ts.size()), u.start, u.end);
        if (cond_scale == 0.0) continue;  // its residuals would be exact zeros
        models::ControlNetInputs ci;
        ci.sample = control_in;
        ci.timestep = in.timestep;
        ci.encoder_hidden_states = control_embeds;
        ci.controlnet_cond = control_images[c];
        ci.conditioning_scale = cond_scale;
        ci.guess_mode = guess;
        models::ControlNetModel net = u.model;  // shared handle (forward is non-const)
        add_residuals(res, net->forward(ci));
      }
      if (guess && cfg && !res.down_block_res_samples.empty()) {
        for (auto& d : res.down_block_res_samples) d = at::cat({at::zeros_like(d), d}, 0);
        res.mid_block_res_sample = at::cat({at::zeros_like(res.mid_block_res_sample), res.mid_block_res_sample}, 0);
      }
      in.down_block_additional_residuals = res.down_block_res_samples;
      in.mid_block_additional_residual = res.mid_block_res_sample;
    }
    at::Tensor noise_pred = m_->unet->forward(in).to(at::kFloat).to(at::kCPU);
    if (cfg) {
      auto chunks = noise_pred.chunk(2, 0);
      noise_pred = chunks[0] + p.guidance_scale * (chunks[1] - chunks[0]);
    }
    const size_t k = static_cast<size_t>(i - start);
    args.variance_noise = k < p.step_noises.size() ? p.step_noises[k] : at::Tensor();
    latents = sched->step(noise_pred, i, latents, args).prev_sample;
    if (p.on_step_end) p.on_step_end(i - start, t, latents);
    bar.tick();
  }
  bar.finish();
  denoise_timer.stop();

  // 6. Decode.
  PhaseTimer decode_timer("decode");
  StableDiffusionOutput out;
  out.latents = latents.contiguous();
  out.timesteps.assign(ts.begin() + start, ts.end());
  out.images = decode_latents(latents, p.show_progress);
  return out;
}
}  // namespace dmx::pipelines
