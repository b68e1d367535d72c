// Heun's 2nd-order sampler: Algorithm 1 of Karras et al., "Elucidating the Design Space of
// Diffusion-Based Generative Models" (arXiv:2206.00364), on the discrete VP schedule. Each sigma
// interval takes two model evaluations, so timesteps() holds two entries per interval.
// Mirrors diffusers 0.27.2 HeunDiscreteScheduler (scheduling_heun_discrete.py).
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class HeunDiscreteScheduler final : public SigmaScheduler {
 public:
  explicit HeunDiscreteScheduler(const SchedulerConfig& cfg) : SigmaScheduler(cfg, /*pin_zero_snr=*/false) {}
  std::string class_name() const override { return "HeunDiscreteScheduler"; }
  int order() const override { return 2; }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    std::vector<double> ts = detail::spaced_timesteps(config_, num_inference_steps, /*integer_linspace=*/false);
    const std::vector<float> train_sigmas = training_sigmas();
    std::vector<double> sig = detail::np_interp(ts, train_sigmas);
    if (config_.use_karras_sigmas) {
      std::vector<float> log_sigmas(train_sigmas.size());
      for (size_t i = 0; i < train_sigmas.size(); ++i) log_sigmas[i] = std::log(train_sigmas[i]);
      sig = detail::karras_sigmas(sig.back(), sig.front(), num_inference_steps);
      ts.clear();
      for (double s : sig) ts.push_back(detail::sigma_to_t(s, log_sigmas));
    }
    // sigmas: [s_0, s_1, s_1, ..., s_{N-1}, s_{N-1}, 0]; timesteps: [t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}]
    sigmas_.clear();
    sigmas_.push_back(static_cast<float>(sig.front()));
    for (size_t i = 1; i < sig.size(); ++i) {
      sigmas_.push_back(static_cast<float>(sig[i]));
      sigmas_.push_back(static_cast<float>(sig[i]));
    }
    sigmas_.push_back(0.0f);
    // Karras timesteps stay float64 in diffusers; spaced ones are float32.
    const auto cast = [&](double t) {
      return config_.use_karras_sigmas ? t : static_cast<double>(static_cast<float>(t));
    };
    timesteps_.assign(1, cast(ts.front()));
    for (size_t i = 1; i < ts.size(); ++i) timesteps_.insert(timesteps_.end(), 2, cast(ts[i]));
    reset_state();
    last_step_index_ = -1;
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample_in,
                  const StepArgs& args) override {
    // Notation (code -> paper, Karras et al. 2022, Algorithm 1, γ = 0):
    //   first call: sigma -> σ_i, sigma_next -> σ_{i+1}, derivative -> d_i = (x_i - D_θ(x_i; σ_i)) / σ_i,
    //     prev_sample -> x_{i+1} (Euler step), stored as prev_derivative_, dt_, sample_;
    //   second call (at σ_{i+1}): derivative -> d'_i = (x_{i+1} - D_θ(x_{i+1}; σ_{i+1})) / σ_{i+1},
    //     prev_sample -> x_{i+1} = x_i + (σ_{i+1} - σ_i) (d_i + d'_i) / 2.
    check_step_index(step_index, "step()");
    const bool first_order = !dt_.has_value();
    if (!first_order)
      DMX_CHECK_ARG(step_index == last_step_index_ + 1,
                    "HeunDiscreteScheduler: the correction call must follow its "
                    "first call, steps must be consecutive (expected step_index ",
                    last_step_index_ + 1, ", got ", step_index, "); call set_timesteps() to start a new run");
    last_step_index_ = step_index;
    at::Tensor sample = sample_in;

    float sigma, sigma_next;
    if (first_order) {
      sigma = sigma_at(step_index);
      sigma_next = sigma_at(step_index + 1);
    } else {
      sigma = sigma_at(step_index - 1);
      sigma_next = sigma_at(step_index);
    }
    const float gamma = 0.0f;
    const float sigma_hat = sigma * (gamma + 1.0f);

    at::Tensor pred_original_sample;
    const float sigma_input = first_order ? sigma_hat : sigma_next;
    const std::string& pt = config_.prediction_type;
    if (pt == "epsilon") {
      pred_original_sample = sample - model_output * static_cast<double>(sigma_input);
    } else if (pt == "v_prediction") {
      const float c_out = -sigma_input / std::sqrt(sigma_input * sigma_input + 1.0f);
      pred_original_sample =
          model_output * static_cast<double>(c_out) + sample / static_cast<double>(sigma_input * sigma_input + 1.0f);
    } else {  // sample
      pred_original_sample = model_output;
    }
    if (config_.clip_sample)
      pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);

    at::Tensor derivative;
    float dt;
    if (first_order) {
      derivative = (sample - pred_original_sample) / static_cast<double>(sigma_hat);
      dt = sigma_next - sigma_hat;
      prev_derivative_ = derivative;
      dt_ = dt;
      sample_ = sample;
    } else {
      derivative = (sample - pred_original_sample) / static_cast<double>(sigma_next);
      derivative = (prev_derivative_ + derivative) / 2;
      dt = *dt_;
      sample = sample_;
      reset_state();
    }
    const at::Tensor prev_sample = sample + derivative * static_cast<double>(dt);
    return {prev_sample, pred_original_sample};
  }

 private:
  void reset_state() {
    prev_derivative_ = at::Tensor();
    sample_ = at::Tensor();
    dt_.reset();
  }

  at::Tensor prev_derivative_;
  at::Tensor sample_;
  std::optional<float> dt_;
  int last_step_index_ = -1;
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& heun_class() {
  static const SchedulerClass c = {
      "HeunDiscreteScheduler",
      {"prediction_type", "use_karras_sigmas", "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset"},
      {"linear", "scaled_linear", "squaredcos_cap_v2", "exp"},
      detail::kPredictionTypes,
      detail::kSpacings,
      [](SchedulerConfig& c) {
        c.beta_start = 0.00085;
        c.beta_end = 0.012;
        c.timestep_spacing = "linspace";
      },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<HeunDiscreteScheduler>(c); },
  };
  return c;
}

}  // namespace dmx::schedulers
