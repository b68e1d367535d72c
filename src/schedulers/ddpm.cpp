// DDPM ancestral sampling: Ho et al., "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239).
// Mirrors diffusers 0.27.2 DDPMScheduler (scheduling_ddpm.py), set_timesteps without custom timesteps.
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class DDPMScheduler final : public AlphaScheduler {
 public:
  explicit DDPMScheduler(const SchedulerConfig& cfg) : AlphaScheduler(cfg) {}
  std::string class_name() const override { return "DDPMScheduler"; }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    timesteps_ = detail::spaced_timesteps(config_, num_inference_steps, /*integer_linspace=*/true);
  }

  StepOutput step(const at::Tensor& model_output_in, int step_index, const at::Tensor& sample,
                  const StepArgs& args) override {
    // Notation (code -> paper, Ho et al. 2020):
    //   alpha_prod_t -> ᾱ_t, alpha_prod_t_prev -> ᾱ_{t-1} (previous *inference* timestep),
    //   current_alpha_t -> α_t = ᾱ_t / ᾱ_{t-1}, current_beta_t -> β_t = 1 - α_t,
    //   pred_original_sample -> x̂_0 (eq. 15), pred_prev_sample -> μ̃_t(x_t, x̂_0) (eq. 7),
    //   variance -> β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t (eq. 7, "fixed_small") or β_t ("fixed_large").
    check_step_index(step_index, "step()");
    const int64_t t = static_cast<int64_t>(timesteps_[step_index]);
    const int64_t prev_t = previous_timestep(t);

    at::Tensor model_output = model_output_in;
    at::Tensor predicted_variance;
    const std::string& vt = config_.variance_type;
    const bool learned = vt == "learned" || vt == "learned_range";
    if (learned && model_output.size(1) == sample.size(1) * 2) {
      auto parts = at::split(model_output, sample.size(1), 1);
      model_output = parts[0];
      predicted_variance = parts[1];
    }

    // 1. alphas, betas
    const float alpha_prod_t = alpha_prod(t);
    const float alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : 1.0f;
    const float beta_prod_t = 1.0f - alpha_prod_t;
    const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    const float current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
    const float current_beta_t = 1.0f - current_alpha_t;

    // 2. predicted x_0 (eq. 15)
    at::Tensor pred_original_sample;
    const std::string& pt = config_.prediction_type;
    if (pt == "epsilon") {
      pred_original_sample = (sample - model_output * static_cast<double>(std::sqrt(beta_prod_t))) /
                             static_cast<double>(std::sqrt(alpha_prod_t));
    } else if (pt == "sample") {
      pred_original_sample = model_output;
    } else {  // v_prediction
      pred_original_sample = sample * static_cast<double>(std::sqrt(alpha_prod_t)) -
                             model_output * static_cast<double>(std::sqrt(beta_prod_t));
    }

    // 3. clip or threshold x_0
    if (config_.thresholding) {
      pred_original_sample = detail::threshold_sample(pred_original_sample, config_);
    } else if (config_.clip_sample) {
      pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);
    }

    // 4-5. posterior mean μ̃_t (eq. 7)
    const float pred_original_sample_coeff = (std::sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t;
    const float current_sample_coeff = std::sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t;
    at::Tensor pred_prev_sample = pred_original_sample * static_cast<double>(pred_original_sample_coeff) +
                                  sample * static_cast<double>(current_sample_coeff);

    // 6. add noise (drawn at every t > 0, the same draw as diffusers' randn_tensor)
    if (t > 0) {
      const at::Tensor variance_noise = detail::step_noise(args, model_output);
      at::Tensor variance;
      if (vt == "fixed_small_log") {
        variance = variance_noise * static_cast<double>(scalar_variance(t));
      } else if (vt == "learned_range") {
        variance = at::exp(0.5 * learned_variance(t, predicted_variance)) * variance_noise;
      } else if (vt == "learned") {
        variance = learned_variance(t, predicted_variance).pow(0.5) * variance_noise;
      } else {
        variance = variance_noise * static_cast<double>(std::sqrt(scalar_variance(t)));
      }
      pred_prev_sample = pred_prev_sample + variance;
    }
    return {pred_prev_sample, pred_original_sample};
  }

 private:
  int64_t previous_timestep(int64_t t) const { return t - config_.num_train_timesteps / num_inference_steps_; }

  // _get_variance for the fixed variance types (float32 scalars like diffusers' 0-d tensors).
  float scalar_variance(int64_t t) const {
    const int64_t prev_t = previous_timestep(t);
    const float alpha_prod_t = alpha_prod(t);
    const float alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : 1.0f;
    const float current_beta_t = 1.0f - alpha_prod_t / alpha_prod_t_prev;
    float variance = (1.0f - alpha_prod_t_prev) / (1.0f - alpha_prod_t) * current_beta_t;
    variance = std::max(variance, 1e-20f);  // log of it is taken below: keep it > 0
    const std::string& vt = config_.variance_type;
    if (vt == "fixed_small") return variance;
    if (vt == "fixed_small_log") return detail::torch_exp(0.5f * detail::torch_log(variance));
    if (vt == "fixed_large") return current_beta_t;
    // fixed_large_log returns log(β_t) and the step then takes its square root: NaN in diffusers 0.27.
    throw Unsupported(
        "DDPMScheduler variance_type 'fixed_large_log' produces NaN in diffusers 0.27 "
        "(sqrt of a log-variance); use fixed_small, fixed_small_log or fixed_large");
  }

  at::Tensor learned_variance(int64_t t, const at::Tensor& predicted_variance) const {
    DMX_CHECK_ARG(predicted_variance.defined(), "DDPMScheduler with variance_type '", config_.variance_type,
                  "' needs a model_output with twice the sample's channels (mean and variance)");
    if (config_.variance_type == "learned") return predicted_variance;
    const int64_t prev_t = previous_timestep(t);
    const float alpha_prod_t = alpha_prod(t);
    const float alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : 1.0f;
    const float current_beta_t = 1.0f - alpha_prod_t / alpha_prod_t_prev;
    const float variance = std::max((1.0f - alpha_prod_t_prev) / (1.0f - alpha_prod_t) * current_beta_t, 1e-20f);
    const float min_log = detail::torch_log(variance);
    const float max_log = detail::torch_log(current_beta_t);
    const at::Tensor frac = (predicted_variance + 1) / 2;
    return frac * static_cast<double>(max_log) + at::rsub(frac, 1) * static_cast<double>(min_log);
  }
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& ddpm_class() {
  static const SchedulerClass c = {
      "DDPMScheduler",
      {"variance_type", "clip_sample", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
       "clip_sample_range", "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"},
      {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"},
      detail::kPredictionTypes,
      detail::kSpacings,
      [](SchedulerConfig& c) {
        c.variance_type = "fixed_small";
        c.clip_sample = true;
        c.timestep_spacing = "leading";
      },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<DDPMScheduler>(c); },
      nullptr,
      [](const SchedulerConfig& c) {
        detail::check_one_of(
            "variance_type", c.variance_type,
            {"fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"},
            "DDPMScheduler");
      },
  };
  return c;
}

}  // namespace dmx::schedulers
