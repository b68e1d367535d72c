// The Karlo unCLIP scheduler (Ramesh et al., "Hierarchical Text-Conditional Image Generation with CLIP Latents",
// arXiv:2204.06125; kakaobrain/karlo): DDPM ancestral sampling whose betas are re-computed between the timesteps a
// run actually takes. Mirrors diffusers 0.27.2 UnCLIPScheduler (scheduling_unclip.py), what the prior_scheduler/
// (and decoder_scheduler/) folders of Karlo and Kandinsky 2.x ship.
//
// diffusers' step() takes the previous timestep as an argument; the pipelines that use this scheduler (UnCLIPPipeline,
// the Kandinsky prior pipelines) pass the next timestep of the run, and nothing after the last (t - 1). This
// index-based step does the same: prev = timesteps()[step_index + 1], or t - 1 at the last index.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class UnCLIPScheduler final : public AlphaScheduler {
 public:
  explicit UnCLIPScheduler(const SchedulerConfig& cfg)
      : AlphaScheduler(cfg), betas_f_(detail::to_float_vector(betas_)) {}
  std::string class_name() const override { return "UnCLIPScheduler"; }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    // step_ratio = (T - 1) / (n - 1): Python raises ZeroDivisionError for one step.
    DMX_CHECK_ARG(num_inference_steps >= 2, "num_inference_steps must be >= 2 for UnCLIPScheduler (its step ratio is ",
                  "(num_train_timesteps - 1) / (num_inference_steps - 1)), got ", num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    const double step_ratio =
        static_cast<double>(config_.num_train_timesteps - 1) / static_cast<double>(num_inference_steps - 1);
    timesteps_.clear();
    for (int i = num_inference_steps - 1; i >= 0; --i)  // (arange(0, n) * step_ratio).round()[::-1]
      timesteps_.push_back(detail::np_round(static_cast<double>(i) * step_ratio));
  }

  StepOutput step(const at::Tensor& model_output_in, int step_index, const at::Tensor& sample,
                  const StepArgs& args) override {
    check_step_index(step_index, "step()");
    const int64_t t = static_cast<int64_t>(timesteps_[step_index]);
    const int64_t prev_t =
        step_index + 1 < static_cast<int>(timesteps_.size()) ? static_cast<int64_t>(timesteps_[step_index + 1]) : t - 1;

    at::Tensor model_output = model_output_in;
    at::Tensor predicted_variance;
    const bool learned_range = config_.variance_type == "learned_range";
    if (learned_range && model_output.dim() >= 2 && sample.dim() >= 2 && model_output.size(1) == sample.size(1) * 2) {
      auto parts = at::split(model_output, sample.size(1), 1);
      model_output = parts[0];
      predicted_variance = parts[1];
    }

    // 1. alphas, betas (float32 scalars, as diffusers' 0-d tensors); beta re-spaced between t and prev_t.
    const Coeffs k = coeffs(t, prev_t);

    // 2. predicted x_0
    at::Tensor pred_original_sample;
    if (config_.prediction_type == "epsilon") {
      pred_original_sample = (sample - model_output * static_cast<double>(std::sqrt(k.beta_prod_t))) /
                             static_cast<double>(std::sqrt(k.alpha_prod_t));
    } else {  // sample
      pred_original_sample = model_output;
    }

    // 3. clip x_0
    if (config_.clip_sample)
      pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);

    // 4-5. posterior mean (Ho et al. 2020, eq. 7)
    const float pred_original_sample_coeff = (std::sqrt(k.alpha_prod_t_prev) * k.beta) / k.beta_prod_t;
    const float current_sample_coeff = std::sqrt(k.alpha) * k.beta_prod_t_prev / k.beta_prod_t;
    at::Tensor pred_prev_sample = pred_original_sample * static_cast<double>(pred_original_sample_coeff) +
                                  sample * static_cast<double>(current_sample_coeff);

    // 6. noise for t > 0 (the draw comes before the variance, as in diffusers)
    if (t > 0) {
      const at::Tensor variance_noise = detail::step_noise(args, model_output);
      // posterior variance β̃ = (1 - ᾱ_prev) / (1 - ᾱ_t) β
      const float variance = k.beta_prod_t_prev / k.beta_prod_t * k.beta;
      at::Tensor scaled;
      if (learned_range) {
        DMX_CHECK_ARG(predicted_variance.defined(), "UnCLIPScheduler with variance_type 'learned_range' needs a ",
                      "model_output with twice the sample's channels (mean and variance)");
        // diffusers takes log(variance) unclamped here (only fixed_small_log clamps to 1e-20).
        const float min_log = detail::torch_log(variance);
        const float max_log = detail::torch_log(k.beta);
        const at::Tensor frac = (predicted_variance + 1) / 2;
        const at::Tensor log_var =
            frac * static_cast<double>(max_log) + at::rsub(frac, 1) * static_cast<double>(min_log);
        scaled = (log_var * 0.5).exp() * variance_noise;
      } else {  // fixed_small_log
        const float std_dev = detail::torch_exp(0.5f * detail::torch_log(std::max(variance, 1e-20f)));
        scaled = variance_noise * static_cast<double>(std_dev);
      }
      pred_prev_sample = pred_prev_sample + scaled;
    }
    return {pred_prev_sample, pred_original_sample};
  }

 private:
  struct Coeffs {
    float alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev, beta, alpha;
  };
  Coeffs coeffs(int64_t t, int64_t prev_t) const {
    Coeffs k{};
    k.alpha_prod_t = alpha_prod(t);
    k.alpha_prod_t_prev = prev_t >= 0 ? alpha_prod(prev_t) : 1.0f;
    k.beta_prod_t = 1.0f - k.alpha_prod_t;
    k.beta_prod_t_prev = 1.0f - k.alpha_prod_t_prev;
    if (prev_t == t - 1) {  // the training table's own beta_t and alpha_t = 1 - beta_t
      k.beta = betas_f_[static_cast<size_t>(t)];
      k.alpha = 1.0f - k.beta;
    } else {
      k.beta = 1.0f - k.alpha_prod_t / k.alpha_prod_t_prev;
      k.alpha = 1.0f - k.beta;
    }
    return k;
  }
  std::vector<float> betas_f_;
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& unclip_class() {
  static const SchedulerClass c = {
      "UnCLIPScheduler",
      {"variance_type", "clip_sample", "clip_sample_range", "prediction_type"},
      {"squaredcos_cap_v2"},  // __init__ raises for any other beta_schedule
      {"epsilon", "sample"},
      {},
      [](SchedulerConfig& c) {
        c.variance_type = "fixed_small_log";
        c.clip_sample = true;
        c.clip_sample_range = 1.0;
        c.prediction_type = "epsilon";
        c.beta_schedule = "squaredcos_cap_v2";
      },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<UnCLIPScheduler>(c); },
      // Its __init__ has no trained_betas, beta_start or beta_end: from_config drops them.
      [](SchedulerConfig& c) { c.trained_betas.clear(); },
      [](const SchedulerConfig& c) {
        // diffusers raises at step() for another variance type; dmx refuses the config when it is read.
        detail::check_one_of("variance_type", c.variance_type, {"fixed_small_log", "learned_range"}, "UnCLIPScheduler");
      },
  };
  return c;
}

}  // namespace dmx::schedulers
