// Euler ancestral sampler: k-diffusion's sample_euler_ancestral (Katherine Crowson) on the discrete VP
// schedule; each step is an Euler step to σ_down followed by fresh noise of std σ_up.
// Mirrors diffusers 0.27.2 EulerAncestralDiscreteScheduler (scheduling_euler_ancestral_discrete.py).
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class EulerAncestralDiscreteScheduler final : public SigmaScheduler {
 public:
  explicit EulerAncestralDiscreteScheduler(const SchedulerConfig& cfg) : SigmaScheduler(cfg, /*pin_zero_snr=*/true) {}
  std::string class_name() const override { return "EulerAncestralDiscreteScheduler"; }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    std::vector<double> ts = detail::spaced_timesteps(config_, num_inference_steps, /*integer_linspace=*/false);
    const std::vector<double> sig = detail::np_interp(ts, training_sigmas());
    sigmas_.clear();
    for (double s : sig) sigmas_.push_back(static_cast<float>(s));
    sigmas_.push_back(0.0f);
    timesteps_.clear();
    for (double t : ts) timesteps_.push_back(static_cast<double>(static_cast<float>(t)));
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample_in,
                  const StepArgs& args) override {
    // Notation (code -> k-diffusion / Karras et al. 2022):
    //   sigma_from -> σ_i, sigma_to -> σ_{i+1}, pred_original_sample -> D_θ(x_i; σ_i),
    //   derivative -> d_i = (x_i - D_θ) / σ_i, sigma_up -> σ_up = sqrt(σ_{i+1}² (σ_i² - σ_{i+1}²) / σ_i²),
    //   sigma_down -> σ_down = sqrt(σ_{i+1}² - σ_up²), dt -> σ_down - σ_i,
    //   prev_sample -> x_{i+1} = x_i + d_i dt + σ_up z, z ~ N(0, I) from the generator.
    check_step_index(step_index, "step()");
    const float sigma = sigma_at(step_index);
    const at::Tensor sample = sample_in.to(at::kFloat);

    at::Tensor pred_original_sample;
    if (config_.prediction_type == "epsilon") {
      pred_original_sample = sample - model_output * static_cast<double>(sigma);
    } else {  // v_prediction (for_class rejects "sample", which diffusers does not implement here)
      const float c_out = -sigma / std::sqrt(sigma * sigma + 1.0f);
      pred_original_sample =
          model_output * static_cast<double>(c_out) + sample / static_cast<double>(sigma * sigma + 1.0f);
    }

    const float sigma_from = sigma;
    const float sigma_to = sigma_at(step_index + 1);
    const float sigma_up =
        std::sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from));
    const float sigma_down = std::sqrt(sigma_to * sigma_to - sigma_up * sigma_up);

    const at::Tensor derivative = (sample - pred_original_sample) / static_cast<double>(sigma);
    const float dt = sigma_down - sigma;
    at::Tensor prev_sample = sample + derivative * static_cast<double>(dt);
    const at::Tensor noise = detail::step_noise(args, model_output);
    prev_sample = (prev_sample + noise * static_cast<double>(sigma_up)).to(model_output.scalar_type());
    return {prev_sample, pred_original_sample};
  }
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& euler_ancestral_class() {
  static const SchedulerClass c = {
      "EulerAncestralDiscreteScheduler",
      {"prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"},
      detail::kBetaSchedules,
      detail::kPredictionTypes,
      detail::kSpacings,
      [](SchedulerConfig& c) { c.timestep_spacing = "linspace"; },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> {
        return std::make_unique<EulerAncestralDiscreteScheduler>(c);
      },
      nullptr,
      [](const SchedulerConfig& c) {
        if (c.prediction_type == "sample")
          throw Unsupported(
              "EulerAncestralDiscreteScheduler does not implement prediction_type 'sample' "
              "(diffusers 0.27 raises NotImplementedError); use epsilon or v_prediction");
      },
  };
  return c;
}

}  // namespace dmx::schedulers
