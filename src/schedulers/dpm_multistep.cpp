// Multistep DPM-Solver: Lu et al., "DPM-Solver" (arXiv:2206.00927) and "DPM-Solver++" (arXiv:2211.01095),
// orders 1-3, midpoint/heun second-order variants, and the SDE variants. Mirrors diffusers 0.27.2
// DPMSolverMultistepScheduler (scheduling_dpmsolver_multistep.py) without custom timesteps.
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

// Scalar log/exp as diffusers' 0-d float32 tensors compute them.
float texp(float x) { return detail::torch_exp(x); }
float tlog(float x) { return detail::torch_log(x); }

// VP coefficients of a sigma (float32 like diffusers' 0-d tensors): α_t = 1/sqrt(σ²+1), σ_t = σ α_t,
// λ_t = log α_t - log σ_t (the half log-SNR).
struct VP {
  float alpha, sigma, lambda;
};
VP vp(float s) {
  VP v;
  v.alpha = 1.0f / std::sqrt(s * s + 1.0f);
  v.sigma = s * v.alpha;
  v.lambda = tlog(v.alpha) - tlog(v.sigma);
  return v;
}

class DPMSolverMultistepScheduler final : public SigmaScheduler {
 public:
  explicit DPMSolverMultistepScheduler(const SchedulerConfig& cfg) : SigmaScheduler(cfg, /*pin_zero_snr=*/true) {
    model_outputs_.resize(cfg.solver_order);
  }
  std::string class_name() const override { return "DPMSolverMultistepScheduler"; }
  double init_noise_sigma() const override { return 1.0; }
  at::Tensor scale_model_input(const at::Tensor& sample, int step_index) override {
    check_step_index(step_index, "scale_model_input()");
    return sample;
  }
  // α_t x_0 + σ_t ε at the loop's sigma (diffusers' add_noise with begin_index).
  at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise, int step_index) const override {
    check_step_index(step_index, "add_noise()");
    const VP v = vp(sigma_at(step_index));
    return original * static_cast<double>(v.alpha) + noise * static_cast<double>(v.sigma);
  }

  std::vector<double> base_timesteps(int n) const override { return spaced(n); }

  // diffusers' spacing for DPM-Solver: over [0, last_timestep), n + 1 points with the last dropped.
  std::vector<double> spaced(int n) const {
    const int T = config_.num_train_timesteps;
    // Clip the minimum λ(t) for numerical stability (critical for the cosine schedule):
    // last_timestep = T - searchsorted(flip(λ), lambda_min_clipped).
    int64_t clipped_idx = 0;
    {
      const float clip = static_cast<float>(config_.lambda_min_clipped);
      for (int64_t t = T - 1; t >= 0; --t) {  // flip(λ) ascends; count entries < clip
        const float a = alphas_cumprod_[t];
        const float lambda_t = tlog(std::sqrt(a)) - tlog(std::sqrt(1.0f - a));
        if (lambda_t < clip)
          ++clipped_idx;
        else
          break;
      }
    }
    const int64_t last_timestep = T - clipped_idx;

    std::vector<double> ts;
    if (config_.timestep_spacing == "linspace") {
      std::vector<double> v = detail::np_linspace(0, static_cast<double>(last_timestep - 1), n + 1);
      for (int i = n; i >= 1; --i) ts.push_back(detail::np_round(v[i]));  // [::-1][:-1]
    } else if (config_.timestep_spacing == "leading") {
      const int64_t ratio = last_timestep / (n + 1);
      for (int i = n; i >= 1; --i) ts.push_back(static_cast<double>(i * ratio + config_.steps_offset));
    } else {  // trailing
      for (double t : detail::np_arange(static_cast<double>(last_timestep), 0, -static_cast<double>(T) / n))
        ts.push_back(detail::np_round(t) - 1);
    }
    return ts;
  }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    const int n = num_inference_steps;
    std::vector<double> ts = spaced(n);

    const std::vector<float> train_sigmas = training_sigmas();
    std::vector<float> log_sigmas(train_sigmas.size());
    for (size_t i = 0; i < train_sigmas.size(); ++i) log_sigmas[i] = std::log(train_sigmas[i]);
    std::vector<double> sig;
    if (config_.use_karras_sigmas) {
      sig = detail::karras_sigmas(train_sigmas.front(), train_sigmas.back(), n);
      ts.clear();
      for (double s : sig) ts.push_back(detail::np_round(detail::sigma_to_t(s, log_sigmas)));
    } else if (config_.use_lu_lambdas) {  // uniform log-SNR steps (Lu et al.)
      const double lambda_min = log_sigmas.front(), lambda_max = log_sigmas.back();
      ts.clear();
      for (double r : detail::np_linspace(0, 1, n)) {
        const double s = std::exp(lambda_max + r * (lambda_min - lambda_max));
        sig.push_back(s);
        ts.push_back(detail::np_round(detail::sigma_to_t(s, log_sigmas)));
      }
    } else {
      sig = detail::np_interp(ts, train_sigmas);
    }
    const float sigma_last =
        config_.final_sigmas_type == "sigma_min" ? std::sqrt((1.0f - alphas_cumprod_[0]) / alphas_cumprod_[0]) : 0.0f;
    sigmas_.clear();
    for (double s : sig) sigmas_.push_back(static_cast<float>(s));
    sigmas_.push_back(sigma_last);
    timesteps_ = ts;
    num_inference_steps_ = static_cast<int>(ts.size());

    for (auto& m : model_outputs_) m = at::Tensor();
    lower_order_nums_ = 0;
    last_step_index_ = -1;
  }

  StepOutput step(const at::Tensor& model_output_in, int step_index, const at::Tensor& sample_in,
                  const StepArgs& args) override {
    // Notation (code -> paper, Lu et al. 2022, DPM-Solver++ Algorithm 2 with h_i = λ_{t_i} - λ_{t_{i-1}}):
    //   sigma_s0 / sigma_t -> the current / next noise level (as α_s, σ_s / α_t, σ_t after vp()),
    //   lambda -> λ = log(α/σ), h -> h_i, r0 -> r_i = h_{i-1} / h_i,
    //   model_outputs -> the history of converted outputs x_θ (dpmsolver++) or ε_θ (dpmsolver),
    //   D0 / D1 -> the zeroth and first divided differences, prev_sample -> x̃_{t_i}.
    check_step_index(step_index, "step()");
    DMX_CHECK_ARG(lower_order_nums_ == 0 || step_index == last_step_index_ + 1,
                  "DPMSolverMultistepScheduler keeps a multistep history: steps must be consecutive (expected "
                  "step_index ",
                  last_step_index_ + 1, ", got ", step_index, "); call set_timesteps() to start a new run");
    last_step_index_ = step_index;
    const int n = static_cast<int>(timesteps_.size());
    const bool few_steps = config_.lower_order_final && n < 15;
    const bool lower_order_final =
        step_index == n - 1 && (config_.euler_at_final || few_steps || config_.final_sigmas_type == "zero");
    const bool lower_order_second = step_index == n - 2 && few_steps;

    const at::Tensor model_output = convert_model_output(model_output_in, sample_in, step_index);
    for (int i = 0; i + 1 < config_.solver_order; ++i) model_outputs_[i] = model_outputs_[i + 1];
    model_outputs_.back() = model_output;

    const at::Tensor sample = sample_in.to(at::kFloat);  // diffusers upcasts before the update
    at::Tensor noise;
    if (sde()) {
      noise = args.variance_noise.defined() ? args.variance_noise.to(model_output.device(), at::kFloat)
                                            : detail::randn_like(model_output.to(at::kFloat), args.generator);
    }

    at::Tensor prev_sample;
    if (config_.solver_order == 1 || lower_order_nums_ < 1 || lower_order_final)
      prev_sample = first_order_update(model_output, step_index, sample, noise);
    else if (config_.solver_order == 2 || lower_order_nums_ < 2 || lower_order_second)
      prev_sample = second_order_update(step_index, sample, noise);
    else
      prev_sample = third_order_update(step_index, sample);
    if (lower_order_nums_ < config_.solver_order) ++lower_order_nums_;
    return {prev_sample.to(model_output.scalar_type()), at::Tensor()};
  }

 private:
  bool plus_plus() const {
    return config_.algorithm_type == "dpmsolver++" || config_.algorithm_type == "sde-dpmsolver++";
  }
  bool sde() const { return config_.algorithm_type == "sde-dpmsolver" || config_.algorithm_type == "sde-dpmsolver++"; }

  // DPM-Solver++ integrates the data prediction x_θ; DPM-Solver the noise prediction ε_θ.
  at::Tensor convert_model_output(at::Tensor model_output, const at::Tensor& sample, int step_index) const {
    const std::string& pt = config_.prediction_type;
    const VP v = vp(sigma_at(step_index));
    const double a = v.alpha, s = v.sigma;
    const bool learned = config_.variance_type == "learned" || config_.variance_type == "learned_range";
    if (plus_plus()) {
      at::Tensor x0_pred;
      if (pt == "epsilon") {
        if (learned) model_output = model_output.slice(1, 0, 3);
        x0_pred = (sample - model_output * s) / a;
      } else if (pt == "sample") {
        x0_pred = model_output;
      } else {  // v_prediction
        x0_pred = sample * a - model_output * s;
      }
      if (config_.thresholding) x0_pred = detail::threshold_sample(x0_pred, config_);
      return x0_pred;
    }
    at::Tensor epsilon;
    if (pt == "epsilon") {
      epsilon = learned ? model_output.slice(1, 0, 3) : model_output;
    } else if (pt == "sample") {
      epsilon = (sample - model_output * a) / s;
    } else {  // v_prediction
      epsilon = model_output * a + sample * s;
    }
    if (config_.thresholding) {
      at::Tensor x0_pred = detail::threshold_sample((sample - epsilon * s) / a, config_);
      epsilon = (sample - x0_pred * a) / s;
    }
    return epsilon;
  }

  // One first-order step (DDIM-equivalent), eq. (5) of DPM-Solver++.
  at::Tensor first_order_update(const at::Tensor& m, int i, const at::Tensor& sample, const at::Tensor& noise) const {
    const VP t = vp(sigma_at(i + 1)), s = vp(sigma_at(i));
    const float h = t.lambda - s.lambda;
    const std::string& alg = config_.algorithm_type;
    if (alg == "dpmsolver++")
      return sample * static_cast<double>(t.sigma / s.sigma) - m * static_cast<double>(t.alpha * (texp(-h) - 1.0f));
    if (alg == "dpmsolver")
      return sample * static_cast<double>(t.alpha / s.alpha) - m * static_cast<double>(t.sigma * (texp(h) - 1.0f));
    if (alg == "sde-dpmsolver++")
      return sample * static_cast<double>(t.sigma / s.sigma * texp(-h)) +
             m * static_cast<double>(t.alpha * (1.0f - texp(-2.0f * h))) +
             noise * static_cast<double>(t.sigma * std::sqrt(1.0f - texp(-2.0f * h)));
    // sde-dpmsolver
    return sample * static_cast<double>(t.alpha / s.alpha) -
           m * static_cast<double>(2.0f * (t.sigma * (texp(h) - 1.0f))) +
           noise * static_cast<double>(t.sigma * std::sqrt(texp(2.0f * h) - 1.0f));
  }

  at::Tensor second_order_update(int i, const at::Tensor& sample, const at::Tensor& noise) const {
    const VP t = vp(sigma_at(i + 1)), s0 = vp(sigma_at(i)), s1 = vp(sigma_at(i - 1));
    const at::Tensor& m0 = model_outputs_[model_outputs_.size() - 1];
    const at::Tensor& m1 = model_outputs_[model_outputs_.size() - 2];
    const float h = t.lambda - s0.lambda, h_0 = s0.lambda - s1.lambda;
    const float r0 = h_0 / h;
    const at::Tensor& D0 = m0;
    const at::Tensor D1 = (m0 - m1) * static_cast<double>(1.0f / r0);
    const bool midpoint = config_.solver_type == "midpoint";
    const std::string& alg = config_.algorithm_type;
    if (alg == "dpmsolver++") {
      const float c = t.alpha * (texp(-h) - 1.0f);
      const at::Tensor x = sample * static_cast<double>(t.sigma / s0.sigma) - D0 * static_cast<double>(c);
      if (midpoint) return x - D1 * static_cast<double>(0.5f * c);
      return x + D1 * static_cast<double>(t.alpha * ((texp(-h) - 1.0f) / h + 1.0f));
    }
    if (alg == "dpmsolver") {
      const float c = t.sigma * (texp(h) - 1.0f);
      const at::Tensor x = sample * static_cast<double>(t.alpha / s0.alpha) - D0 * static_cast<double>(c);
      if (midpoint) return x - D1 * static_cast<double>(0.5f * c);
      return x - D1 * static_cast<double>(t.sigma * ((texp(h) - 1.0f) / h - 1.0f));
    }
    if (alg == "sde-dpmsolver++") {
      const float c = t.alpha * (1.0f - texp(-2.0f * h));
      const at::Tensor x = sample * static_cast<double>(t.sigma / s0.sigma * texp(-h)) + D0 * static_cast<double>(c);
      const at::Tensor y =
          midpoint ? x + D1 * static_cast<double>(0.5f * c)
                   : x + D1 * static_cast<double>(t.alpha * ((1.0f - texp(-2.0f * h)) / (-2.0f * h) + 1.0f));
      return y + noise * static_cast<double>(t.sigma * std::sqrt(1.0f - texp(-2.0f * h)));
    }
    // sde-dpmsolver
    const float c = t.sigma * (texp(h) - 1.0f);
    const at::Tensor x = sample * static_cast<double>(t.alpha / s0.alpha) - D0 * static_cast<double>(2.0f * c);
    const at::Tensor y = midpoint ? x - D1 * static_cast<double>(c)
                                  : x - D1 * static_cast<double>(2.0f * (t.sigma * ((texp(h) - 1.0f) / h - 1.0f)));
    return y + noise * static_cast<double>(t.sigma * std::sqrt(texp(2.0f * h) - 1.0f));
  }

  at::Tensor third_order_update(int i, const at::Tensor& sample) const {
    const VP t = vp(sigma_at(i + 1)), s0 = vp(sigma_at(i)), s1 = vp(sigma_at(i - 1)), s2 = vp(sigma_at(i - 2));
    const size_t k = model_outputs_.size();
    const at::Tensor &m0 = model_outputs_[k - 1], &m1 = model_outputs_[k - 2], &m2 = model_outputs_[k - 3];
    const float h = t.lambda - s0.lambda, h_0 = s0.lambda - s1.lambda, h_1 = s1.lambda - s2.lambda;
    const float r0 = h_0 / h, r1 = h_1 / h;
    const at::Tensor& D0 = m0;
    const at::Tensor D1_0 = (m0 - m1) * static_cast<double>(1.0f / r0);
    const at::Tensor D1_1 = (m1 - m2) * static_cast<double>(1.0f / r1);
    const at::Tensor D1 = D1_0 + (D1_0 - D1_1) * static_cast<double>(r0 / (r0 + r1));
    const at::Tensor D2 = (D1_0 - D1_1) * static_cast<double>(1.0f / (r0 + r1));
    if (config_.algorithm_type == "dpmsolver++") {
      return sample * static_cast<double>(t.sigma / s0.sigma) - D0 * static_cast<double>(t.alpha * (texp(-h) - 1.0f)) +
             D1 * static_cast<double>(t.alpha * ((texp(-h) - 1.0f) / h + 1.0f)) -
             D2 * static_cast<double>(t.alpha * ((texp(-h) - 1.0f + h) / (h * h) - 0.5f));
    }
    if (config_.algorithm_type == "dpmsolver") {
      return sample * static_cast<double>(t.alpha / s0.alpha) - D0 * static_cast<double>(t.sigma * (texp(h) - 1.0f)) -
             D1 * static_cast<double>(t.sigma * ((texp(h) - 1.0f) / h - 1.0f)) -
             D2 * static_cast<double>(t.sigma * ((texp(h) - 1.0f - h) / (h * h) - 0.5f));
    }
    // diffusers 0.27 has no third-order SDE update (it returns None).
    throw Unsupported("DPMSolverMultistepScheduler: solver_order 3 is not implemented for algorithm_type '" +
                      config_.algorithm_type + "' (diffusers 0.27 has none); use solver_order 2");
  }

  std::vector<at::Tensor> model_outputs_;
  int lower_order_nums_ = 0;
  int last_step_index_ = -1;
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& dpm_multistep_class() {
  static const SchedulerClass c = {
      "DPMSolverMultistepScheduler",
      {"solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
       "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_lu_lambdas",
       "final_sigmas_type", "lambda_min_clipped", "variance_type", "timestep_spacing", "steps_offset",
       "rescale_betas_zero_snr"},
      detail::kBetaSchedules,
      detail::kPredictionTypes,
      detail::kSpacings,
      [](SchedulerConfig& c) { c.timestep_spacing = "linspace"; },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> {
        return std::make_unique<DPMSolverMultistepScheduler>(c);
      },
      [](SchedulerConfig& c) {  // deprecated names diffusers maps on load
        if (c.algorithm_type == "deis") c.algorithm_type = "dpmsolver++";
        if (c.solver_type == "logrho" || c.solver_type == "bh1" || c.solver_type == "bh2") c.solver_type = "midpoint";
      },
      [](const SchedulerConfig& c) {
        const char* cls = "DPMSolverMultistepScheduler";
        DMX_CHECK_ARG(c.solver_order >= 1 && c.solver_order <= 3,
                      "scheduler config field 'solver_order' must be 1, 2 or 3, got ", c.solver_order);
        detail::check_one_of("algorithm_type", c.algorithm_type,
                             {"dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"}, cls);
        detail::check_one_of("solver_type", c.solver_type, {"midpoint", "heun"}, cls);
        detail::check_one_of("final_sigmas_type", c.final_sigmas_type, {"zero", "sigma_min"}, cls);
        if (c.final_sigmas_type == "zero")
          DMX_CHECK_ARG(c.algorithm_type == "dpmsolver++" || c.algorithm_type == "sde-dpmsolver++",
                        "scheduler config field 'final_sigmas_type' 'zero' is not supported with algorithm_type '",
                        c.algorithm_type, "'; use 'sigma_min'");
        DMX_CHECK_ARG(!std::isnan(c.lambda_min_clipped),
                      "scheduler config field 'lambda_min_clipped' must be a number");
      },
  };
  return c;
}

}  // namespace dmx::schedulers
