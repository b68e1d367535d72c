// Euler sampler (Algorithm 2 of Karras et al., "Elucidating the Design Space of Diffusion-Based
// Generative Models", arXiv:2206.00364) on the discrete VP schedule, after k-diffusion's sample_euler.
// Mirrors diffusers 0.27.2 EulerDiscreteScheduler (scheduling_euler_discrete.py) with s_churn = 0.
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class EulerDiscreteScheduler final : public SigmaScheduler {
 public:
  explicit EulerDiscreteScheduler(const SchedulerConfig& cfg) : SigmaScheduler(cfg, /*pin_zero_snr=*/true) {}
  std::string class_name() const override { return "EulerDiscreteScheduler"; }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    std::vector<double> ts = detail::spaced_timesteps(config_, num_inference_steps, /*integer_linspace=*/false);

    const std::vector<float> train_sigmas = training_sigmas();
    std::vector<float> log_sigmas(train_sigmas.size());
    for (size_t i = 0; i < train_sigmas.size(); ++i) log_sigmas[i] = std::log(train_sigmas[i]);

    std::vector<double> sig;
    if (config_.interpolation_type == "linear") {
      sig = detail::np_interp(ts, train_sigmas);
    } else {  // log_linear: num_inference_steps + 1 values, as diffusers 0.27 builds them
      const at::Tensor s = at::linspace(static_cast<double>(log_sigmas.back()), static_cast<double>(log_sigmas.front()),
                                        num_inference_steps + 1, at::TensorOptions().dtype(at::kFloat))
                               .exp();
      for (float v : detail::to_float_vector(s)) sig.push_back(v);
    }
    if (config_.use_karras_sigmas) {
      const double sigma_min = config_.sigma_min ? *config_.sigma_min : sig.back();
      const double sigma_max = config_.sigma_max ? *config_.sigma_max : sig.front();
      sig = detail::karras_sigmas(sigma_min, sigma_max, num_inference_steps);
      ts.clear();
      for (double s : sig) ts.push_back(detail::sigma_to_t(s, log_sigmas));
    }

    sigmas_.clear();
    for (double s : sig) sigmas_.push_back(static_cast<float>(s));
    timesteps_.clear();
    if (config_.timestep_type == "continuous" && config_.prediction_type == "v_prediction") {
      for (float s : sigmas_) timesteps_.push_back(static_cast<double>(0.25f * detail::torch_log(s)));  // EDM c_noise
    } else {
      for (double t : ts) timesteps_.push_back(static_cast<double>(static_cast<float>(t)));
    }
    sigmas_.push_back(0.0f);
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample_in,
                  const StepArgs& args) override {
    // Notation (code -> paper, Karras et al. 2022, Algorithm 2 with S_churn = 0):
    //   sigma -> σ_i, sigma_hat -> σ̂_i = σ_i (γ_i + 1) with γ_i = 0, sample -> x_i (already at σ̂_i),
    //   pred_original_sample -> D_θ(x̂_i; σ̂_i), derivative -> d_i = (x̂_i - D_θ) / σ̂_i,
    //   dt -> σ_{i+1} - σ̂_i, prev_sample -> x_{i+1} = x̂_i + (σ_{i+1} - σ̂_i) d_i.
    check_step_index(step_index, "step()");
    const at::Tensor sample = sample_in.to(at::kFloat);  // diffusers upcasts before the update
    const float sigma = sigma_at(step_index);
    const float gamma = 0.0f;  // s_churn = 0
    // diffusers draws the churn noise at every step even when γ = 0; keep the generator stream identical.
    (void)detail::step_noise(args, model_output);
    const float sigma_hat = sigma * (gamma + 1.0f);

    at::Tensor pred_original_sample;
    const std::string& pt = config_.prediction_type;
    if (pt == "sample" || pt == "original_sample") {
      pred_original_sample = model_output;
    } else if (pt == "epsilon") {
      pred_original_sample = sample - model_output * static_cast<double>(sigma_hat);
    } else {  // v_prediction: D = c_out v + c_skip x with c_out = -σ/sqrt(σ²+1), c_skip = 1/(σ²+1)
      const float c_out = -sigma / std::sqrt(sigma * sigma + 1.0f);
      pred_original_sample =
          model_output * static_cast<double>(c_out) + sample / static_cast<double>(sigma * sigma + 1.0f);
    }

    const at::Tensor derivative = (sample - pred_original_sample) / static_cast<double>(sigma_hat);
    const float dt = sigma_at(step_index + 1) - sigma_hat;
    const at::Tensor prev_sample = (sample + derivative * static_cast<double>(dt)).to(model_output.scalar_type());
    return {prev_sample, pred_original_sample};
  }
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& euler_class() {
  static const SchedulerClass c = {
      "EulerDiscreteScheduler",
      {"prediction_type", "interpolation_type", "use_karras_sigmas", "sigma_min", "sigma_max", "timestep_spacing",
       "timestep_type", "steps_offset", "rescale_betas_zero_snr"},
      detail::kBetaSchedules,
      {"epsilon", "sample", "v_prediction", "original_sample"},
      detail::kSpacings,
      [](SchedulerConfig& c) { c.timestep_spacing = "linspace"; },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> {
        return std::make_unique<EulerDiscreteScheduler>(c);
      },
      nullptr,
      [](const SchedulerConfig& c) {
        const char* cls = "EulerDiscreteScheduler";
        detail::check_one_of("interpolation_type", c.interpolation_type, {"linear", "log_linear"}, cls);
        detail::check_one_of("timestep_type", c.timestep_type, {"discrete", "continuous"}, cls);
        if (c.sigma_min)
          DMX_CHECK_ARG(*c.sigma_min > 0, "scheduler config field 'sigma_min' must be > 0, got ", *c.sigma_min);
        if (c.sigma_max)
          DMX_CHECK_ARG(*c.sigma_max > 0, "scheduler config field 'sigma_max' must be > 0, got ", *c.sigma_max);
      },
  };
  return c;
}

}  // namespace dmx::schedulers
