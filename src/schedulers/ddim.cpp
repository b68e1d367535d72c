// DDIM: Song et al., "Denoising Diffusion Implicit Models" (arXiv:2010.02502), eqs. (12) and (16).
// Mirrors diffusers 0.27.2 DDIMScheduler (scheduling_ddim.py); use_clipped_model_output is not exposed.
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class DDIMScheduler final : public AlphaScheduler {
 public:
  explicit DDIMScheduler(const SchedulerConfig& cfg) : AlphaScheduler(cfg) {
    // The step after the last one has no previous ᾱ: 1 (set_alpha_to_one) or ᾱ_0.
    final_alpha_cumprod_ = cfg.set_alpha_to_one ? 1.0f : alphas_cumprod_[0];
  }
  std::string class_name() const override { return "DDIMScheduler"; }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    timesteps_ = detail::spaced_timesteps(config_, num_inference_steps, /*integer_linspace=*/true);
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample,
                  const StepArgs& args) override {
    // Notation (code -> paper, Song et al. 2020):
    //   alpha_prod_t -> α_t (the paper's α is diffusers' alphas_cumprod), alpha_prod_t_prev -> α_{t-1},
    //   model_output / pred_epsilon -> ε_θ(x_t, t), pred_original_sample -> f_θ(x_t, t) = "predicted x_0",
    //   std_dev_t -> σ_t(η) (eq. 16), eta -> η, pred_sample_direction -> "direction pointing to x_t",
    //   prev_sample -> x_{t-1} (eq. 12).
    check_step_index(step_index, "step()");
    DMX_CHECK_ARG(std::isfinite(args.eta) && args.eta >= 0, "eta must be >= 0, got ", args.eta);
    const int64_t timestep = static_cast<int64_t>(timesteps_[step_index]);
    // 1. previous step value (= t - T/N, also for "trailing" spacing, as diffusers)
    const int64_t prev_timestep = timestep - config_.num_train_timesteps / num_inference_steps_;

    // 2. alphas, betas
    const float alpha_prod_t = alpha_prod(timestep);
    const float alpha_prod_t_prev = prev_timestep >= 0 ? alpha_prod(prev_timestep) : final_alpha_cumprod_;
    const float beta_prod_t = 1.0f - alpha_prod_t;
    const double sqrt_alpha = std::sqrt(alpha_prod_t), sqrt_beta = std::sqrt(beta_prod_t);

    // 3. predicted x_0 (eq. 12)
    at::Tensor pred_original_sample, pred_epsilon;
    const std::string& pt = config_.prediction_type;
    if (pt == "epsilon") {
      pred_original_sample = (sample - model_output * sqrt_beta) / sqrt_alpha;
      pred_epsilon = model_output;
    } else if (pt == "sample") {
      pred_original_sample = model_output;
      pred_epsilon = (sample - pred_original_sample * sqrt_alpha) / sqrt_beta;
    } else {  // v_prediction (Salimans & Ho 2022): x_0 = α_t^½ x_t - σ_t v, ε = α_t^½ v + σ_t x_t
      pred_original_sample = sample * sqrt_alpha - model_output * sqrt_beta;
      pred_epsilon = model_output * sqrt_alpha + sample * sqrt_beta;
    }

    // 4. clip or threshold x_0
    if (config_.thresholding) {
      pred_original_sample = detail::threshold_sample(pred_original_sample, config_);
    } else if (config_.clip_sample) {
      pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);
    }

    // 5. σ_t(η) (eq. 16)
    const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    const float variance = (beta_prod_t_prev / beta_prod_t) * (1.0f - alpha_prod_t / alpha_prod_t_prev);
    const float std_dev_t = static_cast<float>(args.eta) * std::sqrt(variance);

    // 6. direction pointing to x_t; 7. x_{t-1} without noise (eq. 12)
    const float dir_coeff = std::sqrt(1.0f - alpha_prod_t_prev - std_dev_t * std_dev_t);
    const at::Tensor pred_sample_direction = pred_epsilon * static_cast<double>(dir_coeff);
    at::Tensor prev_sample =
        pred_original_sample * static_cast<double>(std::sqrt(alpha_prod_t_prev)) + pred_sample_direction;

    if (args.eta > 0) {
      const at::Tensor variance_noise = detail::step_noise(args, model_output);
      prev_sample = prev_sample + variance_noise * static_cast<double>(std_dev_t);
    }
    return {prev_sample, pred_original_sample};
  }

 private:
  float final_alpha_cumprod_ = 1.0f;
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& ddim_class() {
  static const SchedulerClass c = {
      "DDIMScheduler",
      {"clip_sample", "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding",
       "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value", "timestep_spacing",
       "rescale_betas_zero_snr"},
      detail::kBetaSchedules,
      detail::kPredictionTypes,
      detail::kSpacings,
      [](SchedulerConfig& c) {
        c.clip_sample = true;
        c.set_alpha_to_one = true;
        c.timestep_spacing = "leading";
      },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<DDIMScheduler>(c); },
  };
  return c;
}

}  // namespace dmx::schedulers
