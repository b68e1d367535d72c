// PNDM: Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds" (arXiv:2202.09778):
// Runge-Kutta warm-up (PRK, 4 half steps per step) then linear multistep (PLMS); with skip_prk_steps
// the PLMS warm-up of crowsonkb's sampler (CompVis/latent-diffusion#51), Stable Diffusion's default.
// Mirrors diffusers 0.27.2 PNDMScheduler (scheduling_pndm.py).
#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

class PNDMScheduler final : public AlphaScheduler {
 public:
  explicit PNDMScheduler(const SchedulerConfig& cfg) : AlphaScheduler(cfg) {
    final_alpha_cumprod_ = cfg.set_alpha_to_one ? 1.0f : alphas_cumprod_[0];
  }
  std::string class_name() const override { return "PNDMScheduler"; }

  // Ascending, diffusers' _timesteps.
  std::vector<int64_t> pndm_timesteps(int n) const {
    const int T = config_.num_train_timesteps;
    std::vector<int64_t> base;
    if (config_.timestep_spacing == "linspace") {
      for (double t : detail::np_linspace(0, T - 1, n)) base.push_back(static_cast<int64_t>(detail::np_round(t)));
    } else if (config_.timestep_spacing == "leading") {
      const int ratio = T / n;
      for (int i = 0; i < n; ++i) base.push_back(static_cast<int64_t>(i) * ratio + config_.steps_offset);
    } else {  // trailing
      std::vector<double> ts = detail::np_arange(T, 0, -static_cast<double>(T) / n);
      std::reverse(ts.begin(), ts.end());
      for (double t : ts) base.push_back(static_cast<int64_t>(detail::np_round(t)) - 1);
    }
    return base;
  }

  // The Runge-Kutta warm-up also visits the last four timesteps plus half a step: that one must be a training
  // timestep too.
  std::vector<double> base_timesteps(int n) const override {
    const std::vector<int64_t> base = pndm_timesteps(n);
    std::vector<double> out(base.begin(), base.end());
    const int64_t half = config_.num_train_timesteps / n / 2;
    if (!config_.skip_prk_steps && half > 0 && !base.empty()) out.push_back(static_cast<double>(base.back() + half));
    return out;
  }

  void set_timesteps(int num_inference_steps) override {
    check_num_inference_steps(num_inference_steps);
    num_inference_steps_ = num_inference_steps;
    const int T = config_.num_train_timesteps;
    const int n = num_inference_steps;
    const std::vector<int64_t> base = pndm_timesteps(n);

    prk_timesteps_.clear();
    std::vector<int64_t> plms;
    if (config_.skip_prk_steps) {
      // [t_0 .. t_{n-2}, t_{n-2}, t_{n-1}] reversed: the second step repeats the first one's successor.
      // numpy: concatenate([_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:]])[::-1]
      std::vector<int64_t> ts(base.begin(), base.end() - 1);
      if (base.size() >= 2) ts.push_back(base[base.size() - 2]);
      ts.push_back(base.back());
      plms.assign(ts.rbegin(), ts.rend());
    } else {
      DMX_CHECK_ARG(base.size() >= 4, "PNDMScheduler without skip_prk_steps needs num_inference_steps >= 4, got ", n);
      // The last 4 timesteps, each followed by its half step, as Runge-Kutta stages.
      const int64_t half = T / n / 2;
      std::vector<int64_t> prk;
      for (size_t i = base.size() - 4; i < base.size(); ++i) {
        prk.push_back(base[i]);
        prk.push_back(base[i] + half);
      }
      std::vector<int64_t> rep;  // prk[:-1].repeat(2)[1:-1]
      for (size_t i = 0; i + 1 < prk.size(); ++i) {
        rep.push_back(prk[i]);
        rep.push_back(prk[i]);
      }
      prk_timesteps_.assign(rep.rbegin() + 1, rep.rend() - 1);
      plms.assign(base.rbegin() + 3, base.rend());
    }
    timesteps_.clear();
    for (int64_t t : prk_timesteps_) timesteps_.push_back(static_cast<double>(t));
    for (int64_t t : plms) timesteps_.push_back(static_cast<double>(t));

    ets_.clear();
    counter_ = 0;
    cur_model_output_ = at::Tensor();
    cur_sample_ = at::Tensor();
    last_step_index_ = -1;
  }

  StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample,
                  const StepArgs& args) override {
    // Notation (code -> paper, Liu et al. 2022):
    //   model_output -> ε_θ(x_t, t), ets -> the history e_{t}, e_{t+δ}, ... of ε_θ,
    //   combined model_output -> e'_t (PRK: (e1 + 2 e2 + 2 e3 + e4)/6, eq. 13; PLMS: (55e_t - 59e_{t+δ}
    //   + 37e_{t+2δ} - 9e_{t+3δ})/24, eq. 12), _get_prev_sample -> the transfer φ(x_t, e'_t, t, t-δ) (eq. 9),
    //   counter -> steps taken since set_timesteps.
    check_step_index(step_index, "step()");
    DMX_CHECK_ARG(counter_ == 0 || step_index == last_step_index_ + 1,
                  "PNDMScheduler keeps a multistep history: "
                  "steps must be consecutive (expected step_index ",
                  last_step_index_ + 1, ", got ", step_index, "); call set_timesteps() to start a new run");
    last_step_index_ = step_index;
    const int64_t timestep = static_cast<int64_t>(timesteps_[step_index]);
    at::Tensor prev;
    if (counter_ < static_cast<int64_t>(prk_timesteps_.size()) && !config_.skip_prk_steps)
      prev = step_prk(model_output, timestep, sample);
    else
      prev = step_plms(model_output, timestep, sample);
    return {prev, at::Tensor()};
  }

 private:
  at::Tensor step_prk(const at::Tensor& model_output_in, int64_t timestep, const at::Tensor& sample) {
    const int64_t diff_to_prev = counter_ % 2 ? 0 : config_.num_train_timesteps / num_inference_steps_ / 2;
    const int64_t prev_timestep = timestep - diff_to_prev;
    timestep = prk_timesteps_[counter_ / 4 * 4];

    at::Tensor model_output = model_output_in;
    const auto accumulate = [&](double w) {
      const at::Tensor term = model_output * w;
      cur_model_output_ = cur_model_output_.defined() ? cur_model_output_ + term : term;
    };
    if (counter_ % 4 == 0) {
      accumulate(1.0 / 6);
      ets_.push_back(model_output);
      cur_sample_ = sample;
    } else if ((counter_ - 1) % 4 == 0 || (counter_ - 2) % 4 == 0) {
      accumulate(1.0 / 3);
    } else {
      model_output =
          (cur_model_output_.defined() ? cur_model_output_ : at::zeros_like(model_output)) + model_output * (1.0 / 6);
      cur_model_output_ = at::Tensor();
    }
    const at::Tensor cur_sample = cur_sample_.defined() ? cur_sample_ : sample;
    at::Tensor prev = get_prev_sample(cur_sample, timestep, prev_timestep, model_output);
    ++counter_;
    return prev;
  }

  at::Tensor step_plms(const at::Tensor& model_output_in, int64_t timestep, const at::Tensor& sample_in) {
    DMX_CHECK_ARG(config_.skip_prk_steps || ets_.size() >= 3,
                  "PNDMScheduler runs PLMS only after 12 Runge-Kutta (PRK) steps; start at step_index 0 "
                  "or use skip_prk_steps=true");
    const int64_t ratio = config_.num_train_timesteps / num_inference_steps_;
    int64_t prev_timestep = timestep - ratio;
    if (counter_ != 1) {
      if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
      ets_.push_back(model_output_in);
    } else {
      prev_timestep = timestep;
      timestep = timestep + ratio;
    }

    at::Tensor model_output = model_output_in;
    at::Tensor sample = sample_in;
    const size_t n = ets_.size();
    if (n == 1 && counter_ == 0) {
      cur_sample_ = sample;
    } else if (n == 1 && counter_ == 1) {
      model_output = (model_output + ets_.back()) / 2;
      sample = cur_sample_;
      cur_sample_ = at::Tensor();
    } else if (n == 2) {
      model_output = (ets_[1] * 3 - ets_[0]) / 2;
    } else if (n == 3) {
      model_output = (ets_[2] * 23 - ets_[1] * 16 + ets_[0] * 5) / 12;
    } else {
      model_output = (ets_[n - 1] * 55 - ets_[n - 2] * 59 + ets_[n - 3] * 37 - ets_[n - 4] * 9) * (1.0 / 24);
    }
    at::Tensor prev = get_prev_sample(sample, timestep, prev_timestep, model_output);
    ++counter_;
    return prev;
  }

  // Formula (9) of the PNDM paper: x_{t-δ} from x_t and e'_t.
  at::Tensor get_prev_sample(const at::Tensor& sample, int64_t timestep, int64_t prev_timestep,
                             at::Tensor model_output) const {
    const float alpha_prod_t = alpha_prod(timestep);
    const float alpha_prod_t_prev = prev_timestep >= 0 ? alpha_prod(prev_timestep) : final_alpha_cumprod_;
    const float beta_prod_t = 1.0f - alpha_prod_t;
    const float beta_prod_t_prev = 1.0f - alpha_prod_t_prev;
    if (config_.prediction_type == "v_prediction")
      model_output = model_output * static_cast<double>(std::sqrt(alpha_prod_t)) +
                     sample * static_cast<double>(std::sqrt(beta_prod_t));
    // (α_{t-δ} - α_t) / (sqrt(α_t) (sqrt(α_{t-δ}) + sqrt(α_t))) + 1 = sqrt(α_{t-δ} / α_t)
    const float sample_coeff = std::sqrt(alpha_prod_t_prev / alpha_prod_t);
    const float model_output_denom_coeff =
        alpha_prod_t * std::sqrt(beta_prod_t_prev) + std::sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev);
    return sample * static_cast<double>(sample_coeff) - model_output *
                                                            static_cast<double>(alpha_prod_t_prev - alpha_prod_t) /
                                                            static_cast<double>(model_output_denom_coeff);
  }

  float final_alpha_cumprod_ = 1.0f;
  std::vector<int64_t> prk_timesteps_;
  std::vector<at::Tensor> ets_;
  int64_t counter_ = 0;
  int last_step_index_ = -1;
  at::Tensor cur_model_output_;
  at::Tensor cur_sample_;
};

}  // namespace

// The diffusers class: __init__ fields besides the beta ones, allowed values, defaults (diffusers 0.27.2), constructor.
const SchedulerClass& pndm_class() {
  static const SchedulerClass c = {
      "PNDMScheduler",
      {"skip_prk_steps", "set_alpha_to_one", "prediction_type", "timestep_spacing", "steps_offset"},
      detail::kBetaSchedules,
      {"epsilon", "v_prediction"},
      detail::kSpacings,
      [](SchedulerConfig& c) { c.timestep_spacing = "leading"; },
      [](const SchedulerConfig& c) -> std::unique_ptr<Scheduler> { return std::make_unique<PNDMScheduler>(c); },
  };
  return c;
}

}  // namespace dmx::schedulers
