// Latent Consistency Models: Luo et al., "Latent Consistency Models: Synthesizing High-Resolution Images with
// Few-Step Inference" (arXiv:2310.04378), Algorithm 1 (multistep latent consistency sampling), with the
// consistency-model boundary condition of Song et al., "Consistency Models" (arXiv:2303.01469), eq. (7).
// Mirrors diffusers 0.27.2 LCMScheduler (scheduling_lcm.py): the skipping-step schedule over
// original_inference_steps, custom timesteps, strength, timestep_scaling, clip / threshold, and the noise drawn
// at every step but the schedule's last.
#include "schedulers/lcm.h"

#include <ATen/ATen.h>

#include <cmath>
#include <set>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class LCMScheduler final : public AlphaScheduler {
 public:
  explicit LCMScheduler(const SchedulerConfig& cfg) : AlphaScheduler(cfg) {
    final_alpha_cumprod_ = cfg.set_alpha_to_one ? 1.0f : alphas_cumprod_[0];
  }
  std::string class_name() const override { return "LCMScheduler"; }

  void set_timesteps(int num_inference_steps) override {
    DMX_CHECK_ARG(num_inference_steps >= 1, "steps must be >= 1 for LCMScheduler, got ", num_inference_steps);
    LCMTimestepOptions o;
    o.num_inference_steps = num_inference_steps;
    set(o);
  }

  void set(const LCMTimestepOptions& o) {
    const int T = config_.num_train_timesteps;
    const bool custom = !o.custom_timesteps.empty();
    DMX_CHECK_ARG(custom != (o.num_inference_steps != 0),
                  "LCMScheduler: pass exactly one of num_inference_steps (steps) and custom timesteps, got ",
                  o.num_inference_steps, " steps and ", o.custom_timesteps.size(), " custom timesteps");
    DMX_CHECK_ARG(std::isfinite(o.strength) && o.strength > 0 && o.strength <= 1,
                  "LCMScheduler: strength must be in (0, 1], got ", o.strength);
    // 1. The LCM training/distillation schedule: every k-th training timestep, k = T / original_steps
    //    (the skipping step of the paper), k - 1, 2k - 1, ..., original_steps * strength * k - 1.
    const int original_steps = o.original_inference_steps.value_or(config_.original_inference_steps);
    DMX_CHECK_ARG(original_steps >= 1 && original_steps <= T,
                  "LCMScheduler: original_inference_steps must be in [1, num_train_timesteps = ", T, "], got ",
                  original_steps);
    const int64_t k = T / original_steps;
    const int64_t n_origin = static_cast<int64_t>(original_steps * o.strength);  // int() truncates, as Python
    std::vector<int64_t> origin;
    for (int64_t i = 1; i <= n_origin; ++i) origin.push_back(i * k - 1);

    std::vector<int64_t> ts;
    int n_steps = 0;  // diffusers' num_inference_steps (custom: the full schedule's length)
    if (custom) {
      // 2.1 Custom schedule: descending, below T; diffusers only warns when it leaves the training schedule.
      const auto& c = o.custom_timesteps;
      for (size_t i = 1; i < c.size(); ++i)
        DMX_CHECK_ARG(c[i] < c[i - 1], "LCMScheduler: custom timesteps must be in descending order, got ", c[i - 1],
                      " then ", c[i]);
      DMX_CHECK_ARG(c[0] < T, "LCMScheduler: custom timesteps must start before num_train_timesteps = ", T, ", got ",
                    c[0]);
      DMX_CHECK_ARG(c.back() >= 0, "LCMScheduler: custom timesteps must be >= 0, got ", c.back());
      n_steps = static_cast<int>(c.size());
      // Strength as StableDiffusionImg2ImgPipeline.get_timesteps; num_inference_steps stays the full count.
      const int init_timestep = std::min(static_cast<int>(n_steps * o.strength), n_steps);
      const int t_start = std::max(n_steps - init_timestep, 0);
      ts.assign(c.begin() + t_start, c.end());
      DMX_CHECK_ARG(!ts.empty(), "LCMScheduler: strength ", o.strength, " leaves none of the ", c.size(),
                    " custom timesteps");
    } else {
      // 2.2 The standard schedule: num_inference_steps evenly spaced indices into the reversed origin schedule.
      const int n = o.num_inference_steps;
      DMX_CHECK_ARG(n >= 1, "steps must be >= 1 for LCMScheduler, got ", n);
      DMX_CHECK_ARG(n <= original_steps, "steps must be at most ", original_steps,
                    " for LCMScheduler (original_inference_steps: its timesteps are a subset of that schedule), got ",
                    n);
      const int64_t skipping_step = static_cast<int64_t>(origin.size()) / n;
      DMX_CHECK_ARG(skipping_step >= 1, "LCMScheduler: original_inference_steps x strength = ", original_steps, " x ",
                    o.strength, " gives ", origin.size(), " timesteps, fewer than the ", n,
                    " steps; lower the steps or raise strength");
      n_steps = n;
      std::vector<int64_t> reversed(origin.rbegin(), origin.rend());
      for (double idx : detail::np_linspace(0, static_cast<double>(reversed.size()), n + 1)) {  // endpoint=False
        if (static_cast<int>(ts.size()) == n) break;
        ts.push_back(reversed[static_cast<size_t>(std::floor(idx))]);
      }
    }
    // Only a schedule that passed every rule replaces the previous one.
    num_inference_steps_ = n_steps;
    timesteps_.assign(ts.begin(), ts.end());
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample,
                  const StepArgs& args) override {
    // Notation (code -> paper, Luo et al. 2023, Algorithm 1; Song et al. 2023, eq. 7):
    //   timestep -> τ_n, alpha_prod_t -> α(τ_n)² (diffusers' alphas_cumprod), beta_prod_t -> σ(τ_n)²,
    //   pred_original_sample -> x̂_0 from the parameterisation, c_skip / c_out -> c_skip(τ), c_out(τ) with
    //   σ_data = 0.5 at τ·timestep_scaling, denoised -> f_θ(z_τ, ω, c, τ) = c_skip z + c_out x̂_0,
    //   prev_sample -> z_{τ_{n+1}} = α(τ_{n+1}) f_θ + σ(τ_{n+1}) ξ, ξ ~ N(0, I) (none after the last step).
    check_step_index(step_index, "step()");
    const int64_t timestep = static_cast<int64_t>(timesteps_[step_index]);
    // 1. previous timestep: the next entry, or this one at the end of the schedule
    const size_t prev_index = static_cast<size_t>(step_index) + 1;
    const int64_t prev_timestep =
        prev_index < timesteps_.size() ? static_cast<int64_t>(timesteps_[prev_index]) : timestep;

    // 2. alphas, betas (float32 scalars, as diffusers' 0-d tensors)
    const float alpha_prod_t = alpha_prod(timestep);
    const float alpha_prod_t_prev = prev_timestep >= 0 ? alpha_prod(prev_timestep) : final_alpha_cumprod_;
    const float beta_prod_t = 1.0f - alpha_prod_t;
    const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;

    // 3. boundary-condition scalings: timestep * timestep_scaling is a float32 tensor in diffusers; 0.25 / x is
    //    Tensor.__rtruediv__ = reciprocal(x) * 0.25, and (x)**0.5 is sqrt.
    const float sigma_data_sq = 0.25f;
    const float scaled = static_cast<float>(static_cast<double>(timestep) * config_.timestep_scaling);
    const float denom = scaled * scaled + sigma_data_sq;
    const float c_skip = (1.0f / denom) * sigma_data_sq;
    const float c_out = scaled / std::sqrt(denom);

    // 4. predicted x_0 from the parameterisation
    const double sqrt_alpha = std::sqrt(alpha_prod_t), sqrt_beta = std::sqrt(beta_prod_t);
    at::Tensor pred_original_sample;
    const std::string& pt = config_.prediction_type;
    if (pt == "epsilon") {
      pred_original_sample = (sample - model_output * sqrt_beta) / sqrt_alpha;
    } else if (pt == "sample") {
      pred_original_sample = model_output;
    } else {  // v_prediction
      pred_original_sample = sample * sqrt_alpha - model_output * sqrt_beta;
    }

    // 5. clip or threshold x_0
    if (config_.thresholding) {
      pred_original_sample = detail::threshold_sample(pred_original_sample, config_);
    } else if (config_.clip_sample) {
      pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);
    }

    // 6. the consistency function's output (boundary condition)
    const at::Tensor denoised =
        pred_original_sample * static_cast<double>(c_out) + sample * static_cast<double>(c_skip);

    // 7. noise for the next point of the chain, except at index num_inference_steps - 1 (diffusers compares the
    //    step index with num_inference_steps, which a strength-cut custom schedule never reaches)
    at::Tensor prev_sample = denoised;
    if (step_index != num_inference_steps_ - 1) {
      const at::Tensor noise = detail::step_noise(args, model_output);
      prev_sample = denoised * static_cast<double>(std::sqrt(alpha_prod_t_prev)) +
                    noise * static_cast<double>(std::sqrt(beta_prod_t_prev));
    }
    return {prev_sample, denoised};
  }

 private:
  float final_alpha_cumprod_ = 1.0f;
};

}  // namespace

void set_lcm_timesteps(Scheduler& sched, const LCMTimestepOptions& options) {
  auto* lcm = dynamic_cast<LCMScheduler*>(&sched);
  DMX_CHECK_ARG(lcm != nullptr,
                "LCM timestep options (original_inference_steps, custom timesteps, strength) need "
                "an LCMScheduler, got ",
                sched.class_name());
  lcm->set(options);
}

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& lcm_class() {
  static const SchedulerClass c = {
      "LCMScheduler",
      {"original_inference_steps", "clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset",
       "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing",
       "timestep_scaling", "rescale_betas_zero_snr"},
      detail::kBetaSchedules,
      detail::kPredictionTypes,
      detail::kSpacings,
      [](SchedulerConfig& c) {
        c.beta_start = 0.00085;
        c.beta_end = 0.012;
        c.beta_schedule = "scaled_linear";
        c.original_inference_steps = 50;
        c.clip_sample = false;
        c.set_alpha_to_one = true;
        c.timestep_spacing = "leading";
        c.timestep_scaling = 10.0;
      },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<LCMScheduler>(c); },
      nullptr,
      [](const SchedulerConfig& c) {
        DMX_CHECK_ARG(c.original_inference_steps >= 1 && c.original_inference_steps <= c.num_train_timesteps,
                      "scheduler config field 'original_inference_steps' must be in [1, num_train_timesteps = ",
                      c.num_train_timesteps, "], got ", c.original_inference_steps);
        DMX_CHECK_ARG(std::isfinite(c.timestep_scaling) && c.timestep_scaling > 0,
                      "scheduler config field 'timestep_scaling' must be a finite number > 0, got ",
                      c.timestep_scaling);
      },
  };
  return c;
}

}  // namespace dmx::schedulers
