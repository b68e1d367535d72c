// The generation core (see generation.h).
#include "pipelines/generation.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "dmx/error.h"

namespace dmx::pipelines {

at::Generator make_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

void check_num_inference_steps(int steps, const std::string& name) {
  DMX_CHECK_ARG(steps >= 1 && steps <= 1000, name, " must be in [1, 1000], got ", steps);
}

void check_guidance_scale(double g, const std::string& name) {
  DMX_CHECK_ARG(std::isfinite(g) && g >= 0 && g <= 100, name, " must be in [0, 100], got ", g);
}

void check_eta(double eta, const std::string& name) {
  DMX_CHECK_ARG(std::isfinite(eta) && eta >= 0 && eta <= 1, name, " must be in [0, 1], got ", eta);
}

void check_num_images(int n, const std::string& name) {
  DMX_CHECK_ARG(n >= 1 && n <= 64, name, " must be in [1, 64], got ", n);
}

void check_clip_skip(int clip_skip, const loaders::StableDiffusionModels& m, const std::string& name) {
  const int layers = m.text_encoder->config().num_hidden_layers;
  DMX_CHECK_ARG(clip_skip >= 0 && clip_skip < layers, name, " must be in [0, ", layers - 1, "], got ", clip_skip);
}

void check_generation_params(const GenerationParams& p, const loaders::StableDiffusionModels& m) {
  check_num_inference_steps(p.num_inference_steps);
  check_guidance_scale(p.guidance_scale);
  check_eta(p.eta);
  check_num_images(p.num_images_per_prompt);
  check_clip_skip(p.clip_skip, m);
}

at::Tensor encode_prompt(const loaders::StableDiffusionModels& m, const std::string& prompt, int clip_skip) {
  const int max_len = m.tokenizer->model_max_length();
  std::vector<int64_t> ids = m.tokenizer->encode_padded(prompt, max_len);
  at::Tensor input = at::tensor(ids, at::kLong).unsqueeze(0).to(m.device);
  at::NoGradGuard no_grad;
  models::CLIPTextModel text_encoder = m.text_encoder;  // shared handle (forward is non-const)
  return text_encoder->encode(input, clip_skip);
}

at::Tensor encode_prompts(const loaders::StableDiffusionModels& m, const GenerationParams& p) {
  const int n = p.num_images_per_prompt;
  at::Tensor embeds = encode_prompt(m, p.prompt, p.clip_skip).repeat({n, 1, 1});
  if (!p.guided()) return embeds;
  return at::cat({encode_prompt(m, p.negative_prompt, p.clip_skip).repeat({n, 1, 1}), embeds}, 0);
}

std::unique_ptr<schedulers::Scheduler> make_scheduler(const loaders::StableDiffusionModels& m, const std::string& name,
                                                      int num_inference_steps) {
  const std::string cls = name.empty() ? m.scheduler_config.value("_class_name", std::string("PNDMScheduler")) : name;
  auto sched = schedulers::create_scheduler(cls, m.scheduler_config);
  sched->set_timesteps(num_inference_steps);
  return sched;
}

int strength_start_index(int num_inference_steps, double strength) {
  const int init_timestep = std::min(static_cast<int>(num_inference_steps * strength), num_inference_steps);
  return std::max(num_inference_steps - init_timestep, 0);
}

int strength_first_step(const schedulers::Scheduler& sched, int num_inference_steps, double strength, bool by_order) {
  const int t_start = strength_start_index(num_inference_steps, strength);
  const int start = by_order ? t_start * sched.order() : t_start;
  DMX_CHECK_ARG(t_start < num_inference_steps && start < static_cast<int>(sched.timesteps().size()), "strength ",
                strength, " with ", num_inference_steps, " steps leaves no denoising step; raise strength or steps");
  return start;
}

at::Tensor randn_tensor(at::IntArrayRef shape, at::Generator* generator) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  return generator ? at::randn(shape, *generator, opts) : at::randn(shape, opts);
}

at::Tensor encode_image_latents(const loaders::StableDiffusionModels& m, const at::Tensor& image,
                                at::Generator* generator, const at::Tensor& noise, int64_t batch) {
  at::NoGradGuard no_grad;
  models::AutoencoderKL vae = m.vae;  // shared handle (forward is non-const)
  auto dist = vae->encode(image.to(m.device, m.dtype));
  // The encoder runs once; every copy of the image has the same mean and std.
  at::Tensor mean = dist.mean.to(at::kFloat).to(at::kCPU), std = dist.std.to(at::kFloat).to(at::kCPU);
  if (batch != 1) {
    mean = mean.repeat({batch, 1, 1, 1});
    std = std.repeat({batch, 1, 1, 1});
  }
  at::Tensor eps;
  if (noise.defined()) {
    DMX_CHECK_ARG(noise.sizes().equals(mean.sizes()), "posterior noise must have shape ", mean.sizes(), ", got ",
                  noise.sizes());
    eps = noise.to(at::kFloat).to(at::kCPU);
  } else {
    eps = randn_tensor(mean.sizes(), generator);
  }
  return (mean + std * eps) * m.vae->config().scaling_factor;
}

void add_unet_residuals(models::UNetInputs& in, const std::vector<at::Tensor>& down, const at::Tensor& mid) {
  if (in.down_block_additional_residuals.empty()) {
    in.down_block_additional_residuals = down;
    in.mid_block_additional_residual = mid;
    return;
  }
  DMX_CHECK_ARG(in.down_block_additional_residuals.size() == down.size(),
                "residual providers return different numbers of down-block residuals (",
                in.down_block_additional_residuals.size(), " vs ", down.size(), ")");
  for (size_t k = 0; k < down.size(); ++k)
    in.down_block_additional_residuals[k] = in.down_block_additional_residuals[k] + down[k];
  in.mid_block_additional_residual = in.mid_block_additional_residual + mid;
}

at::Tensor predict_noise(const loaders::StableDiffusionModels& m, const at::Tensor& sample, double t,
                         const at::Tensor& embeds, const ResidualProviders& residuals, const ResidualStep* step) {
  models::UNetInputs in;
  in.sample = sample.to(m.device, m.dtype);
  in.timestep = at::scalar_tensor(t, at::TensorOptions().dtype(at::kFloat)).to(m.device);
  in.encoder_hidden_states = embeds.to(m.device, m.dtype);
  if (!residuals.empty()) {
    DMX_CHECK_ARG(step != nullptr, "predict_noise: residual providers need the step they run at");
    for (const auto& r : residuals) r->apply(*step, in);
  }
  models::UNet2DConditionModel unet = m.unet;  // shared handle (forward is non-const)
  return unet->forward(in).to(at::kFloat).to(at::kCPU);
}

at::Tensor combine_guidance(const at::Tensor& noise_pred, double guidance_scale,
                            const std::vector<GuidanceBranch>& branches) {
  const int64_t groups = 2 + static_cast<int64_t>(branches.size());
  DMX_CHECK_ARG(noise_pred.size(0) % groups == 0, "combine_guidance: ", noise_pred.size(0), " rows are not ", groups,
                " groups of equal size");
  const auto chunks = noise_pred.chunk(groups, 0);  // uncond, cond, extra branches
  at::Tensor out = chunks[0] + guidance_scale * (chunks[1] - chunks[0]);
  for (size_t k = 0; k < branches.size(); ++k) out = out + branches[k].scale * (chunks[2 + k] - chunks[0]);
  return out;
}

at::Tensor guided_noise_prediction(const loaders::StableDiffusionModels& m, schedulers::Scheduler& sched,
                                   const at::Tensor& latents, int index, const at::Tensor& embeds,
                                   double guidance_scale, const ResidualProviders& residuals) {
  const bool guided = guidance_scale > 1.0;
  std::vector<GuidanceBranch> branches;
  if (guided)
    for (const auto& r : residuals) {
      auto b = r->guidance_branches();
      branches.insert(branches.end(), b.begin(), b.end());
    }
  DMX_CHECK_SUPPORTED(branches.empty() || residuals.size() == 1,
                      "a provider with its own guidance branches (SpaText's map) runs without other providers "
                      "(ControlNet, T2I-Adapters, regional prompts), got ",
                      residuals.size(), " providers");
  const auto& ts = sched.timesteps();
  const double t = ts[static_cast<size_t>(index)];
  const int groups = guided ? 2 + static_cast<int>(branches.size()) : 1;
  at::Tensor model_in = groups > 1 ? latents.repeat({groups, 1, 1, 1}) : latents;
  model_in = sched.scale_model_input(model_in, index);
  at::Tensor run_embeds = embeds;
  if (!branches.empty()) {  // the extra groups' prompt rows: the unconditional or the conditional ones
    const auto halves = embeds.chunk(2, 0);
    std::vector<at::Tensor> rows{embeds};
    for (const auto& b : branches) rows.push_back(b.text ? halves[1] : halves[0]);
    run_embeds = at::cat(rows, 0);
  }
  const ResidualStep step{index, static_cast<int>(ts.size()), t, latents, sched, guided, groups};
  at::Tensor noise_pred = predict_noise(m, model_in, t, run_embeds, residuals, &step);
  if (guided) noise_pred = combine_guidance(noise_pred, guidance_scale, branches);
  return noise_pred;
}
}  // namespace dmx::pipelines
