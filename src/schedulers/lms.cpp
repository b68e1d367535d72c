// Linear multistep sampler (k-diffusion's sample_lms, Katherine Crowson): an Adams-Bashforth-type
// method of order up to 4 in σ, with coefficients from integrating the Lagrange basis polynomials over
// [σ_i, σ_{i+1}]. Mirrors diffusers 0.27.2 LMSDiscreteScheduler (scheduling_lms_discrete.py).
#include <ATen/ATen.h>

#include <cmath>
#include <deque>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class LMSDiscreteScheduler final : public SigmaScheduler {
 public:
  explicit LMSDiscreteScheduler(const SchedulerConfig& cfg) : SigmaScheduler(cfg, /*pin_zero_snr=*/false) {}
  std::string class_name() const override { return "LMSDiscreteScheduler"; }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    std::vector<double> ts = detail::spaced_timesteps(config_, num_inference_steps, /*integer_linspace=*/false);
    const std::vector<float> train_sigmas = training_sigmas();
    std::vector<double> sig = detail::np_interp(ts, train_sigmas);
    timesteps_.clear();
    if (config_.use_karras_sigmas) {
      std::vector<float> log_sigmas(train_sigmas.size());
      for (size_t i = 0; i < train_sigmas.size(); ++i) log_sigmas[i] = std::log(train_sigmas[i]);
      sig = detail::karras_sigmas(sig.back(), sig.front(), num_inference_steps);
      for (double s : sig) timesteps_.push_back(detail::sigma_to_t(s, log_sigmas));  // float64 in diffusers
    } else {
      for (double t : ts) timesteps_.push_back(static_cast<double>(static_cast<float>(t)));
    }
    sigmas_.clear();
    for (double s : sig) sigmas_.push_back(static_cast<float>(s));
    sigmas_.push_back(0.0f);
    derivatives_.clear();
    last_step_index_ = -1;
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample,
                  const StepArgs& args) override {
    // Notation (code -> k-diffusion sample_lms):
    //   sigma -> σ_i, pred_original_sample -> D_θ(x_i; σ_i), derivative -> d_i = (x_i - D_θ) / σ_i,
    //   derivatives -> [d_{i-3}, ..., d_i], lms_coeffs[j] -> ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ with ℓ_j the
    //   Lagrange basis on σ_i, σ_{i-1}, ..., prev_sample -> x_{i+1} = x_i + Σ_j lms_coeffs[j] d_{i-j}.
    check_step_index(step_index, "step()");
    DMX_CHECK_ARG(derivatives_.empty() || step_index == last_step_index_ + 1,
                  "LMSDiscreteScheduler keeps a multistep history: steps must be consecutive (expected step_index ",
                  last_step_index_ + 1, ", got ", step_index, "); call set_timesteps() to start a new run");
    last_step_index_ = step_index;
    const float sigma = sigma_at(step_index);

    at::Tensor pred_original_sample;
    const std::string& pt = config_.prediction_type;
    if (pt == "epsilon") {
      pred_original_sample = sample - model_output * static_cast<double>(sigma);
    } else if (pt == "v_prediction") {
      const float c_out = -sigma / std::sqrt(sigma * sigma + 1.0f);
      pred_original_sample =
          model_output * static_cast<double>(c_out) + sample / static_cast<double>(sigma * sigma + 1.0f);
    } else {  // sample
      pred_original_sample = model_output;
    }

    const at::Tensor derivative = (sample - pred_original_sample) / static_cast<double>(sigma);
    derivatives_.push_back(derivative);
    if (derivatives_.size() > static_cast<size_t>(kMaxOrder)) derivatives_.pop_front();

    // The order follows the absolute step index, as diffusers' min(step_index + 1, 4); a run that
    // starts part-way (img2img) uses only the derivatives it has.
    const int order = std::min(step_index + 1, kMaxOrder);
    at::Tensor update;
    const int terms = std::min<int>(order, static_cast<int>(derivatives_.size()));
    for (int j = 0; j < terms; ++j) {
      const double coeff = lms_coefficient(order, step_index, j);
      const at::Tensor term = derivatives_[derivatives_.size() - 1 - j] * coeff;
      update = update.defined() ? update + term : term;
    }
    const at::Tensor prev_sample = sample + update;
    return {prev_sample, pred_original_sample};
  }

 private:
  static constexpr int kMaxOrder = 4;

  // ∫_{σ_t}^{σ_{t+1}} Π_{k≠j} (τ - σ_{t-k}) / (σ_{t-j} - σ_{t-k}) dτ, as scipy.integrate.quad computes it
  // for diffusers: QUADPACK's 21-point Gauss-Kronrod rule (dqk21), whose first estimate quad accepts for
  // these cubic-at-most integrands. The integrand is evaluated in float32 like diffusers' (it multiplies
  // float32 0-d tensors).
  double lms_coefficient(int order, int t, int current_order) const {
    const auto f = [&](double tau) {
      float prod = 1.0f;
      const float tau32 = static_cast<float>(tau);
      for (int k = 0; k < order; ++k) {
        if (k == current_order) continue;
        prod *= (tau32 - sigmas_[t - k]) / (sigmas_[t - current_order] - sigmas_[t - k]);
      }
      return static_cast<double>(prod);
    };
    // Abscissae and weights of the 21-point Kronrod rule on [-1, 1] (QUADPACK dqk21); xgk[1], xgk[3], ...
    // are the 10-point Gauss nodes.
    static const double xgk[11] = {0.995657163025808080735527280689003,
                                   0.973906528517171720077964012084452,
                                   0.930157491355708226001207180059508,
                                   0.865063366688984510732096688423493,
                                   0.780817726586416897063717578345042,
                                   0.679409568299024406234327365114874,
                                   0.562757134668604683339000099272694,
                                   0.433395394129247190799265943165784,
                                   0.294392862701460198131126603103866,
                                   0.148874338981631210884826001129720,
                                   0.0};
    static const double wgk[11] = {
        0.011694638867371874278064396062192, 0.032558162307964727478818972459390, 0.054755896574351996031381300244580,
        0.075039674810919952767043140916190, 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
        0.123491976262065851077958109831074, 0.134709217311473325928054001771707, 0.142775938577060080797094273138717,
        0.147739104901338491374841515972068, 0.149445554002916905664936468389821};
    const double a = sigmas_[t], b = sigmas_[t + 1];
    const double centr = 0.5 * (a + b), hlgth = 0.5 * (b - a);
    double resk = wgk[10] * f(centr);
    for (int j = 1; j <= 5; ++j) {  // Gauss nodes first, then the Kronrod extension, as dqk21 sums them
      const double absc = hlgth * xgk[2 * j - 1];
      resk += wgk[2 * j - 1] * (f(centr - absc) + f(centr + absc));
    }
    for (int j = 1; j <= 5; ++j) {
      const double absc = hlgth * xgk[2 * j - 2];
      resk += wgk[2 * j - 2] * (f(centr - absc) + f(centr + absc));
    }
    return resk * hlgth;
  }

  std::deque<at::Tensor> derivatives_;
  int last_step_index_ = -1;
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& lms_class() {
  static const SchedulerClass c = {
      "LMSDiscreteScheduler",
      {"use_karras_sigmas", "prediction_type", "timestep_spacing", "steps_offset"},
      detail::kBetaSchedules,
      detail::kPredictionTypes,
      detail::kSpacings,
      [](SchedulerConfig& c) { c.timestep_spacing = "linspace"; },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<LMSDiscreteScheduler>(c); },
  };
  return c;
}

}  // namespace dmx::schedulers
