#include "pipelines/stable_diffusion.h"

#include <cmath>
#include <optional>

#include "core/phase_timer.h"
#include "core/progress.h"
#include "dmx/error.h"
#include "loaders/lora_loader.h"
#include "pipelines/guidance_embedding.h"
#include "pipelines/memory_estimate.h"
#include "schedulers/lcm.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

namespace {
constexpr int kMaxSide = 4096;
}

StableDiffusionPipeline::StableDiffusionPipeline(std::shared_ptr<loaders::StableDiffusionModels> models)
    : m_(std::move(models)) {
  DMX_CHECK_ARG(m_ != nullptr, "StableDiffusionPipeline: models must not be null");
}

namespace {
// Sides at most kMaxSide; the message gives the memory the size would need.
void check_max_side(const loaders::StableDiffusionModels& m, int w, int h, int num_images, bool cfg, bool img2img) {
  if (w <= kMaxSide && h <= kMaxSide) return;
  const int n = std::max(1, num_images);
  const MemoryEstimate need = estimate_memory(m, w, h, n, cfg);
  const MemoryEstimate at_max = estimate_memory(m, kMaxSide, kMaxSide, n, cfg);
  const char* dtype = m.dtype == at::kHalf ? "fp16" : m.dtype == at::kBFloat16 ? "bf16" : "fp32";
  throw InvalidArgument(
      detail::concat(img2img ? "init image size " : "width x height ", w, "x", h, " exceeds the maximum of ", kMaxSide,
                     "x", kMaxSide, " (width and height must be at most ", kMaxSide, "); it would need about ",
                     format_bytes(need.total()), " of memory in ", dtype, " (weights ", format_bytes(need.weights),
                     ", UNet activations ", format_bytes(need.unet), ", VAE decode ", format_bytes(need.vae),
                     "), against about ", format_bytes(at_max.total()), " at ", kMaxSide, "x", kMaxSide));
}
}  // namespace

void check_output_size(const loaders::StableDiffusionModels& m, int width, int height, int batch, bool guided) {
  // diffusers requires multiples of 8 whatever the VAE; a deeper VAE needs multiples of its factor.
  const int f = std::max(8, m.vae_scale_factor());
  DMX_CHECK_ARG(width >= 0 && height >= 0, "width and height must be positive, got ", width, "x", height);
  DMX_CHECK_ARG(width % f == 0, "width must be a multiple of ", f, ", got ", width);
  DMX_CHECK_ARG(height % f == 0, "height must be a multiple of ", f, ", got ", height);
  check_max_side(m, width, height, batch, guided, false);
}

void StableDiffusionPipeline::check_max_size(const StableDiffusionParams& p) const {
  const bool img2img = p.init_image.defined() && p.init_image.dim() == 4;
  const int w = img2img ? static_cast<int>(p.init_image.size(3)) : p.width;
  const int h = img2img ? static_cast<int>(p.init_image.size(2)) : p.height;
  check_max_side(*m_, w, h, p.num_images_per_prompt, p.guided(), img2img);
}

void StableDiffusionPipeline::check_params(const StableDiffusionParams& p) const {
  const bool img2img = p.init_image.defined();
  if (img2img)
    check_max_size(p);
  else
    check_output_size(*m_, p.width, p.height, p.num_images_per_prompt, p.guided());
  check_generation_params(p, *m_);
  const ResidualRun run{*m_, p.width, p.height, p.num_images_per_prompt, p.guided(), img2img};
  for (const auto& r : p.residual_providers) {
    DMX_CHECK_ARG(r != nullptr, "residual_providers: a provider is null");
    r->check(run);
  }
  if (img2img) {
    const int f = std::max(8, m_->vae_scale_factor());
    DMX_CHECK_ARG(std::isfinite(p.strength) && p.strength >= 0 && p.strength <= 1, "strength must be in [0, 1], got ",
                  p.strength);
    DMX_CHECK_ARG(p.init_image.dim() == 4 && p.init_image.size(0) == 1 && p.init_image.size(1) == 3,
                  "init_image must be [1, 3, H, W], got ", p.init_image.sizes());
    DMX_CHECK_ARG(p.init_image.size(2) % f == 0 && p.init_image.size(3) % f == 0,
                  "init image size must be a multiple of ", f, ", got ", p.init_image.size(3), "x",
                  p.init_image.size(2));
  }
}

at::Tensor StableDiffusionPipeline::encode_prompt(const std::string& prompt, int clip_skip) {
  return pipelines::encode_prompt(*m_, prompt, clip_skip);
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
    throw InvalidArgument(detail::concat(head, "Likely source: the LoRA(s) applied to ", loras,
                                         " layer(s) (a non-finite or huge alpha or scale, or "
                                         "non-finite LoRA weights)",
                                         count ? "; non-finite weights after merging: " + list : std::string(),
                                         ". Check the --lora scales and the LoRA files."));
  if (count > 0)
    throw FormatError(detail::concat(head, "Likely source: the model's weights hold non-finite values: ", list, " (",
                                     m.source_path, ")."));
  throw Error(detail::concat(head,
                             "The weights are finite: a numerical overflow, e.g. from --init-latents with huge "
                             "values, an extreme --guidance-scale, or a reduced --dtype (try fp32)."));
}

at::Tensor StableDiffusionPipeline::decode_latents(const at::Tensor& latents, bool show_progress) {
  at::NoGradGuard no_grad;
  check_finite_output(*m_, latents, "the denoised latents");
  const double sf = m_->vae->config().scaling_factor;
  std::vector<at::Tensor> out;
  ProgressBar bar("decode", latents.size(0) > 1 ? static_cast<int>(latents.size(0)) : 0, show_progress);
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

at::Tensor StableDiffusionPipeline::denoise(schedulers::Scheduler& sched, at::Tensor latents, int start,
                                            const at::Tensor& embeds, const GenerationParams& p,
                                            const ResidualProviders& residuals) {
  at::NoGradGuard no_grad;
  const std::vector<double>& ts = sched.timesteps();
  const int end = static_cast<int>(ts.size());
  schedulers::StepArgs args;
  args.eta = p.eta;
  args.generator = p.generator;
  ProgressBar bar("steps", end - start, p.show_progress);
  for (int i = start; i < end; ++i) {
    const size_t k = static_cast<size_t>(i - start);  // steps this run has made
    const at::Tensor noise_pred = guided_noise_prediction(*m_, sched, latents, i, embeds, p.guidance_scale, residuals);
    args.variance_noise = k < p.step_noises.size() ? p.step_noises[k] : at::Tensor();
    latents = sched.step(noise_pred, i, latents, args).prev_sample;
    if (p.on_step_end) p.on_step_end(static_cast<int>(k), ts[static_cast<size_t>(i)], latents);
    bar.tick();
  }
  bar.finish();
  return latents;
}

StableDiffusionOutput StableDiffusionPipeline::run(const StableDiffusionParams& p_in) {
  at::NoGradGuard no_grad;
  DMX_CHECK_ARG(!m_->text_encoder.is_empty() && !m_->unet.is_empty(),
                "the model's text encoder and UNet were released by an earlier run with release_models: load the "
                "model again");
  StableDiffusionParams p = p_in;
  if (takes_guidance_embedding(*m_)) {
    // An LCM-distilled UNet (LatentConsistencyModelPipeline): the guidance scale goes in as an embedding, one UNet
    // pass per step, no negative prompt.
    DMX_CHECK_ARG(p.negative_prompt.empty(), "negative_prompt: this model's UNet is LCM-distilled (time_cond_proj_dim ",
                  m_->unet->config().time_cond_proj_dim,
                  "): it takes the guidance scale as an input and no negative prompt (diffusers' "
                  "LatentConsistencyModelPipeline has none), got '",
                  p.negative_prompt, "'");
    p.residual_providers.insert(p.residual_providers.begin(), std::make_shared<GuidanceEmbedding>(p.guidance_scale));
    p.guidance_scale = 1.0;
  }
  const bool img2img = p.init_image.defined();
  const int f = m_->vae_scale_factor();
  if (!img2img) {
    // A provider may set the size: diffusers' ControlNet pipeline takes it from the (prepared) control image.
    for (const auto& r : p.residual_providers) {
      const auto size = r ? r->default_size() : std::nullopt;
      if (!size) continue;
      if (p.width == 0) p.width = size->first;
      if (p.height == 0) p.height = size->second;
      break;
    }
    if (p.width == 0) p.width = m_->default_sample_size();
    if (p.height == 0) p.height = m_->default_sample_size();
  }
  // 1. Check inputs.
  check_params(p);
  DMX_CHECK_ARG(!p.latents.defined() || at::isfinite(p.latents).all().item<bool>(),
                "init latents hold non-finite values (NaN or Inf): every step would propagate them into a black "
                "picture");
  const int n = p.num_images_per_prompt;

  // 2. Timesteps (img2img: from the strength's), and the residual providers prepared for the run; before the
  //    text encoder, so a step count or strength that leaves no step fails before any work.
  auto sched = make_scheduler(*m_, p.scheduler, p.num_inference_steps);
  int start = 0;
  if (img2img && takes_guidance_embedding(*m_) && sched->class_name() == "LCMScheduler") {
    // LatentConsistencyModelImg2ImgPipeline: the scheduler's own strength schedule
    // (LCMScheduler.set_timesteps(steps, strength=)), every one of its timesteps run.
    schedulers::LCMTimestepOptions lo;
    lo.num_inference_steps = p.num_inference_steps;
    lo.strength = p.strength;
    schedulers::set_lcm_timesteps(*sched, lo);
  } else if (img2img) {
    start = strength_first_step(*sched, p.num_inference_steps, p.strength);
  }
  const std::vector<double>& ts = sched->timesteps();
  for (const auto& r : p.residual_providers) r->prepare({*m_, p.width, p.height, n, p.guided(), img2img});

  // 3. Encode the prompt (and the negative prompt for guidance); uncond first, as diffusers.
  PhaseTimer encode_timer("text encode");
  const at::Tensor embeds = encode_prompts(*m_, p);
  if (p.release_models && at::isfinite(embeds).all().item<bool>()) m_->text_encoder = models::CLIPTextModel(nullptr);
  encode_timer.stop();

  // 4. Latents: noise x init_noise_sigma, or (img2img) the image's latents noised to the first timestep; the
  //    posterior sample draws first, then the noise: the reference's order.
  at::Tensor latents;
  if (!img2img) {
    const int64_t h = p.height / f, w = p.width / f;
    int64_t c = m_->unet->config().in_channels;  // diffusers' num_channels_latents
    for (const auto& r : p.residual_providers) c -= r->extra_input_channels();
    DMX_CHECK_ARG(c > 0, "the residual providers add ", m_->unet->config().in_channels - c,
                  " input channels, the UNet takes ", m_->unet->config().in_channels);
    if (p.latents.defined()) {
      DMX_CHECK_ARG(p.latents.dim() == 4 && p.latents.size(0) == n && p.latents.size(1) == c &&
                        p.latents.size(2) == h && p.latents.size(3) == w,
                    "init latents must have shape [", n, ", ", c, ", ", h, ", ", w, "], got ", p.latents.sizes());
      latents = p.latents.to(at::kFloat);
    } else {
      latents = randn_tensor({n, c, h, w}, p.generator);
    }
    latents = latents * sched->init_noise_sigma();
  } else {
    const at::Tensor init =
        encode_image_latents(*m_, p.init_image, p.generator, p.posterior_noise).repeat({n, 1, 1, 1});
    at::Tensor noise = p.latents.defined() ? p.latents.to(at::kFloat) : randn_tensor(init.sizes(), p.generator);
    DMX_CHECK_ARG(noise.sizes().equals(init.sizes()), "init latents must have shape ", init.sizes(), ", got ",
                  noise.sizes());
    latents = sched->add_noise(init, noise, start);
  }

  // 5. Denoising loop.
  PhaseTimer denoise_timer("denoise");
  latents = denoise(*sched, latents, start, embeds, p, p.residual_providers);
  if (p.release_models && at::isfinite(latents).all().item<bool>()) m_->unet = models::UNet2DConditionModel(nullptr);
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
