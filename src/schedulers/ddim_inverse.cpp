// DDIM inversion: the deterministic DDIM update (Song et al., arXiv:2010.02502, eq. 12) run from x_0
// towards noise, as used by Null-text inversion / DiffEdit. Mirrors diffusers 0.27.2 DDIMInverseScheduler
// (scheduling_ddim_inverse.py). diffusers has no add_noise here; ours noises like DDIM's.
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class DDIMInverseScheduler final : public AlphaScheduler {
 public:
  explicit DDIMInverseScheduler(const SchedulerConfig& cfg) : AlphaScheduler(cfg) {
    // The first step starts from x_0, where there is no ᾱ: 1 (set_alpha_to_one) or ᾱ_0.
    initial_alpha_cumprod_ = cfg.set_alpha_to_one ? 1.0f : alphas_cumprod_[0];
  }
  std::string class_name() const override { return "DDIMInverseScheduler"; }

  std::vector<double> base_timesteps(int n) const override {
    const int T = config_.num_train_timesteps;
    std::vector<double> out;
    if (config_.timestep_spacing == "leading") {  // ascending: 0, r, 2r, ... + steps_offset
      const int ratio = T / n;
      for (int i = 0; i < n; ++i) out.push_back(static_cast<double>(i) * ratio + config_.steps_offset);
    } else {  // trailing, ascending
      std::vector<double> ts = detail::np_arange(T, 0, -static_cast<double>(T) / n);
      std::reverse(ts.begin(), ts.end());
      for (double t : ts) out.push_back(detail::np_round(t) - 1);
    }
    return out;
  }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    timesteps_ = base_timesteps(num_inference_steps);
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample,
                  const StepArgs& args) override {
    // Notation (code -> paper, Song et al. 2020, eq. 12 read from t-Δ to t):
    //   timestep -> t - Δ (the level we come from), prev_timestep -> t (the level we go to),
    //   alpha_prod_t -> α_{t-Δ}, alpha_prod_t_prev -> α_t, pred_epsilon -> ε_θ(x, t),
    //   pred_original_sample -> predicted x_0, prev_sample -> x_t (one step noisier).
    check_step_index(step_index, "step()");
    // 1. the level we go to is the current timestep; we come from one inference step earlier
    const int64_t prev_timestep = static_cast<int64_t>(timesteps_[step_index]);
    const int64_t timestep = std::min<int64_t>(prev_timestep - config_.num_train_timesteps / num_inference_steps_,
                                               config_.num_train_timesteps - 1);

    // 2. alphas, betas
    const float alpha_prod_t = timestep >= 0 ? alpha_prod(timestep) : initial_alpha_cumprod_;
    const float alpha_prod_t_prev = alpha_prod(prev_timestep);
    const float beta_prod_t = 1.0f - alpha_prod_t;
    const double sqrt_alpha = std::sqrt(alpha_prod_t), sqrt_beta = std::sqrt(beta_prod_t);

    // 3. predicted x_0
    at::Tensor pred_original_sample, pred_epsilon;
    const std::string& pt = config_.prediction_type;
    if (pt == "epsilon") {
      pred_original_sample = (sample - model_output * sqrt_beta) / sqrt_alpha;
      pred_epsilon = model_output;
    } else if (pt == "sample") {
      pred_original_sample = model_output;
      pred_epsilon = (sample - pred_original_sample * sqrt_alpha) / sqrt_beta;
    } else {  // v_prediction
      pred_original_sample = sample * sqrt_alpha - model_output * sqrt_beta;
      pred_epsilon = model_output * sqrt_alpha + sample * sqrt_beta;
    }

    // 4. clip x_0
    if (config_.clip_sample)
      pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);

    // 5. direction pointing to x_t; 6. x_t
    const at::Tensor pred_sample_direction = pred_epsilon * static_cast<double>(std::sqrt(1.0f - alpha_prod_t_prev));
    const at::Tensor prev_sample =
        pred_original_sample * static_cast<double>(std::sqrt(alpha_prod_t_prev)) + pred_sample_direction;
    return {prev_sample, pred_original_sample};
  }

 private:
  float initial_alpha_cumprod_ = 1.0f;
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& ddim_inverse_class() {
  static const SchedulerClass c = {
      "DDIMInverseScheduler",
      {"clip_sample", "set_alpha_to_one", "steps_offset", "prediction_type", "clip_sample_range", "timestep_spacing",
       "rescale_betas_zero_snr"},
      detail::kBetaSchedules,
      detail::kPredictionTypes,
      {"leading", "trailing"},
      [](SchedulerConfig& c) {
        c.clip_sample = true;
        c.set_alpha_to_one = true;
        c.timestep_spacing = "leading";
      },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<DDIMInverseScheduler>(c); },
  };
  return c;
}

}  // namespace dmx::schedulers
