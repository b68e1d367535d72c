// Null-text inversion (see null_text_inversion.h).
#include "pipelines/null_text_inversion.h"

#include <cmath>

#include "core/phase_timer.h"
#include "core/progress.h"
#include "dmx/error.h"
#include "pipelines/ddim_inversion.h"
#include "pipelines/generation.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

namespace {
// Freezes a module's parameters for a scope (only the null-text embedding is optimised) and restores
// their requires_grad flags after, so the model is left as it was.
class FrozenParameters {
 public:
  explicit FrozenParameters(torch::nn::Module& module) {
    for (auto& p : module.parameters()) {
      saved_.emplace_back(p, p.requires_grad());
      p.set_requires_grad(false);
    }
  }
  ~FrozenParameters() {
    for (auto& s : saved_) s.first.set_requires_grad(s.second);
  }
  FrozenParameters(const FrozenParameters&) = delete;
  FrozenParameters& operator=(const FrozenParameters&) = delete;

 private:
  std::vector<std::pair<at::Tensor, bool>> saved_;
};

}  // namespace

std::vector<at::Tensor> ddim_inversion_path(loaders::StableDiffusionModels& m, const at::Tensor& z0,
                                            const at::Tensor& cond, int num_inference_steps, bool show_progress) {
  // The whole schedule (inpaint_strength 1) at guidance 1: the same loop DiffEdit inverts with.
  DDIMInversionParams ip;
  ip.latents = z0;
  ip.prompt_embeds = cond;
  ip.num_inference_steps = num_inference_steps;
  ip.guidance_scale = 1.0;
  ip.inpaint_strength = 1.0;
  ip.show_progress = show_progress;
  DDIMInversionOutput inv = ddim_invert(m, ip);
  std::vector<at::Tensor> path{z0.to(at::kFloat)};
  path.insert(path.end(), inv.latents.begin(), inv.latents.end());
  return path;
}

at::Tensor ddim_sample(loaders::StableDiffusionModels& m, const at::Tensor& x_T, const at::Tensor& cond,
                       const std::vector<at::Tensor>& uncond, int num_inference_steps, double guidance_scale) {
  at::NoGradGuard no_grad;
  check_guidance_scale(guidance_scale, "ddim_sample: guidance_scale");
  auto sched = make_scheduler(m, "ddim", num_inference_steps);
  const auto& ts = sched->timesteps();
  DMX_CHECK_ARG(uncond.size() == 1 || uncond.size() == ts.size(), "ddim_sample: uncond must hold 1 or ", ts.size(),
                " embeddings, got ", uncond.size());
  at::Tensor z = x_T.to(at::kFloat);
  for (size_t i = 0; i < ts.size(); ++i) {
    const int k = static_cast<int>(i);
    const at::Tensor& un = uncond.size() == 1 ? uncond[0] : uncond[i];
    const at::Tensor embeds = guidance_scale > 1.0 ? at::cat({un, cond}, 0) : cond;
    z = sched->step(guided_noise_prediction(m, *sched, z, k, embeds, guidance_scale), k, z).prev_sample;
  }
  return z;
}

NullTextInversionOutput null_text_invert(loaders::StableDiffusionModels& m, const NullTextInversionParams& p) {
  DMX_CHECK_ARG(p.image.defined() && p.image.dim() == 4 && p.image.size(0) == 1 && p.image.size(1) == 3,
                "null-text inversion: image must be [1, 3, H, W], got ",
                p.image.defined() ? p.image.sizes() : at::IntArrayRef{});
  const int f = m.vae_scale_factor();
  DMX_CHECK_ARG(p.image.size(2) % f == 0 && p.image.size(3) % f == 0, "null-text inversion: image size must be a ",
                "multiple of ", f, ", got ", p.image.size(3), "x", p.image.size(2));
  check_num_inference_steps(p.num_inference_steps);
  DMX_CHECK_ARG(p.num_inner_steps >= 1 && p.num_inner_steps <= 1000, "num_inner_steps must be in [1, 1000], got ",
                p.num_inner_steps);
  check_guidance_scale(p.guidance_scale);
  DMX_CHECK_ARG(p.guidance_scale > 1, "null-text inversion needs guidance_scale > 1 (it optimises the ",
                "unconditional embedding of classifier-free guidance), got ", p.guidance_scale);
  DMX_CHECK_ARG(std::isfinite(p.learning_rate) && p.learning_rate > 0, "learning_rate must be > 0, got ",
                p.learning_rate);
  DMX_CHECK_ARG(std::isfinite(p.early_stop_epsilon) && p.early_stop_epsilon >= 0,
                "early_stop_epsilon must be >= 0, got ", p.early_stop_epsilon);
  NullTextInversionOutput out;

  // 1. Encode: image -> z0 (posterior mean, as the paper's image2latent), prompt and "".
  PhaseTimer encode_timer("encode");
  at::Tensor cond, uncond;
  {
    at::NoGradGuard no_grad;
    cond = encode_prompt(m, p.prompt).to(at::kFloat);
    uncond = encode_prompt(m, "").to(at::kFloat);
    auto dist = m.vae->encode(p.image.to(m.device, m.dtype));
    out.z0 = dist.mean.to(at::kFloat).to(at::kCPU) * m.vae->config().scaling_factor;
  }
  encode_timer.stop();

  // 2. DDIM inversion with guidance 1.
  PhaseTimer invert_timer("ddim inversion");
  out.ddim_latents = ddim_inversion_path(m, out.z0, cond, p.num_inference_steps, p.show_progress);
  invert_timer.stop();

  // 3. Null-text optimisation, from the noisiest latent down.
  PhaseTimer optimise_timer("null-text optimisation");
  auto sched = make_scheduler(m, "ddim", p.num_inference_steps);
  out.timesteps = sched->timesteps();
  const int N = static_cast<int>(out.timesteps.size());
  DMX_CHECK_ARG(static_cast<int>(out.ddim_latents.size()) == N + 1, "null-text inversion: the inversion made ",
                out.ddim_latents.size() - 1, " steps, the sampler has ", N);
  FrozenParameters frozen_unet(*m.unet);
  at::Tensor latent_cur = out.ddim_latents.back();
  at::Tensor uncond_cur = uncond;
  ProgressBar bar("null-text", N * p.num_inner_steps, p.show_progress);
  for (int i = 0; i < N; ++i) {
    const double t = out.timesteps[static_cast<size_t>(i)];
    const at::Tensor& target = out.ddim_latents[static_cast<size_t>(N - 1 - i)];
    at::Tensor eps_cond;
    {
      at::NoGradGuard no_grad;
      eps_cond = predict_noise(m, latent_cur, t, cond);
    }
    at::Tensor emb = uncond_cur.clone().detach().set_requires_grad(true);
    torch::optim::Adam opt({emb}, torch::optim::AdamOptions(p.learning_rate * (1.0 - i / 100.0)));
    int used = 0;
    double loss_item = 0;
    for (int j = 0; j < p.num_inner_steps; ++j) {
      const at::Tensor eps_uncond = predict_noise(m, latent_cur, t, emb);
      const at::Tensor eps = eps_uncond + p.guidance_scale * (eps_cond - eps_uncond);
      const at::Tensor prev = sched->step(eps, i, latent_cur).prev_sample;
      at::Tensor loss = at::mse_loss(prev, target);
      opt.zero_grad();
      loss.backward();
      opt.step();
      loss_item = loss.item<double>();
      if (j == 0) out.first_losses.push_back(loss_item);
      ++used;
      bar.tick();
      if (loss_item < p.early_stop_epsilon + i * 2e-5) break;
    }
    bar.tick(p.num_inner_steps - used);
    out.inner_steps.push_back(used);
    out.losses.push_back(loss_item);
    at::NoGradGuard no_grad;
    uncond_cur = emb.detach();
    out.uncond_embeddings.push_back(uncond_cur.clone());
    const at::Tensor embeds = at::cat({uncond_cur, cond}, 0);
    const at::Tensor eps = guided_noise_prediction(m, *sched, latent_cur, i, embeds, p.guidance_scale);
    latent_cur = sched->step(eps, i, latent_cur).prev_sample;
  }
  bar.finish();
  optimise_timer.stop();
  return out;
}

double psnr(const at::Tensor& a, const at::Tensor& b) {
  DMX_CHECK_ARG(a.sizes().equals(b.sizes()), "psnr: shapes differ: ", a.sizes(), " vs ", b.sizes());
  const double mse = (a.to(at::kDouble) - b.to(at::kDouble)).pow(2).mean().item<double>();
  return mse <= 0 ? std::numeric_limits<double>::infinity() : 10.0 * std::log10(1.0 / mse);
}
}  // namespace dmx::pipelines
