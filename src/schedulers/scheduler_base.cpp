// The scheduler base classes (scheduler_impl.h): index checks, and the two families' tables and add_noise
// (AlphaScheduler: DDPM, DDIM, DDIM inverse, PNDM; SigmaScheduler: Euler, Euler a, Heun, LMS, DPM-Solver).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dmx/error.h"
#include "schedulers/scheduler.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {

std::vector<double> SchedulerBase::base_timesteps(int n) const {
  return detail::spaced_timesteps(config_, n, /*integer_linspace=*/true);
}

namespace {
// "" when the timesteps are distinct training timesteps, else what is wrong with them.
std::string timestep_problem(std::vector<double> ts, int T) {
  for (double t : ts)
    if (!(t >= 0 && t <= T - 1))
      return dmx::detail::concat("would reach timestep ", t, ", outside the training timesteps [0, ", T - 1, "]");
  std::sort(ts.begin(), ts.end());
  for (size_t i = 1; i < ts.size(); ++i)
    if (ts[i] == ts[i - 1]) return dmx::detail::concat("would repeat timestep ", ts[i]);
  return "";
}
}  // namespace

// The step count is checked against what this scheduler's own timesteps would be (base_timesteps): a count
// that reaches past the training timesteps or repeats one is refused, naming the most steps that work.
void SchedulerBase::check_num_inference_steps(int n) const {
  const int T = config_.num_train_timesteps;
  DMX_CHECK_ARG(n > 0 && n <= T, "num_inference_steps must be in [1, ", T, "] (num_train_timesteps) for ", class_name(),
                ", got ", n);
  const std::string problem = timestep_problem(base_timesteps(n), T);
  if (problem.empty()) return;
  int most = n - 1;
  while (most >= 1 && !timestep_problem(base_timesteps(most), T).empty()) --most;
  DMX_CHECK_ARG(most >= 1, class_name(), ": this scheduler config gives no valid timesteps for any number of steps (",
                problem, ")");
  throw InvalidArgument(dmx::detail::concat("steps must be at most ", most, " for ", class_name(),
                                            " with this model's scheduler config (timestep_spacing \"",
                                            config_.timestep_spacing, "\", steps_offset ", config_.steps_offset,
                                            ", num_train_timesteps ", T, "): ", n, " steps ", problem, "; got ", n));
}

void SchedulerBase::check_step_index(int step_index, const char* what) const {
  DMX_CHECK_ARG(!timesteps_.empty(), class_name(), ": call set_timesteps() before ", what);
  DMX_CHECK_ARG(step_index >= 0 && step_index < static_cast<int>(timesteps_.size()), "step_index must be in [0, ",
                timesteps_.size(), ") for ", class_name(), ", got ", step_index);
}

AlphaScheduler::AlphaScheduler(const SchedulerConfig& cfg) : SchedulerBase(cfg) {
  betas_ = make_betas(cfg);
  alphas_cumprod_ = detail::to_float_vector(detail::alphas_cumprod_of(betas_));
}

float AlphaScheduler::alpha_prod(int64_t t) const {
  DMX_CHECK_ARG(t >= 0 && t < static_cast<int64_t>(alphas_cumprod_.size()), class_name(),
                ": training timestep must be in [0, ", alphas_cumprod_.size(), "), got ", t);
  return alphas_cumprod_[t];
}

at::Tensor Scheduler::add_noise_at_timestep(const at::Tensor& original, const at::Tensor& noise,
                                            int64_t timestep) const {
  throw Unsupported(class_name() +
                    " adds noise at the steps of a run only (add_noise by step index); noising at a "
                    "training timestep needs a DDPM-family scheduler (DDPMScheduler, DDIMScheduler, PNDMScheduler)");
}

at::Tensor AlphaScheduler::add_noise(const at::Tensor& original, const at::Tensor& noise, int step_index) const {
  check_step_index(step_index, "add_noise()");
  return add_noise_at_timestep(original, noise, static_cast<int64_t>(timesteps_[step_index]));
}

at::Tensor AlphaScheduler::add_noise_at_timestep(const at::Tensor& original, const at::Tensor& noise,
                                                 int64_t timestep) const {
  const float a = alpha_prod(timestep);
  const float sqrt_alpha_prod = std::sqrt(a);
  const float sqrt_one_minus_alpha_prod = std::sqrt(1.0f - a);
  return original * static_cast<double>(sqrt_alpha_prod) + noise * static_cast<double>(sqrt_one_minus_alpha_prod);
}

SigmaScheduler::SigmaScheduler(const SchedulerConfig& cfg, bool pin_zero_snr) : SchedulerBase(cfg) {
  alphas_cumprod_t_ = detail::alphas_cumprod_of(make_betas(cfg));
  // Close to 0 without being 0 so the first sigma is not inf (fp16's smallest subnormal, as diffusers).
  if (pin_zero_snr && cfg.rescale_betas_zero_snr) alphas_cumprod_t_[-1].fill_(std::pow(2.0, -24));
  alphas_cumprod_ = detail::to_float_vector(alphas_cumprod_t_);
  // Before set_timesteps diffusers holds all training sigmas, descending, then 0.
  sigmas_ = training_sigmas();
  std::reverse(sigmas_.begin(), sigmas_.end());
  sigmas_.push_back(0.0f);
}

std::vector<float> SigmaScheduler::training_sigmas() const {
  return detail::to_float_vector((at::rsub(alphas_cumprod_t_, 1) / alphas_cumprod_t_).pow(0.5));
}

float SigmaScheduler::sigma_at(int index) const {
  DMX_CHECK_ARG(index >= 0 && index < static_cast<int>(sigmas_.size()), class_name(), ": sigma index must be in [0, ",
                sigmas_.size(), "), got ", index);
  return sigmas_[index];
}

double SigmaScheduler::init_noise_sigma() const {
  const float max_sigma = *std::max_element(sigmas_.begin(), sigmas_.end());
  if (config_.timestep_spacing == "linspace" || config_.timestep_spacing == "trailing") return max_sigma;
  return std::sqrt(max_sigma * max_sigma + 1.0f);
}

at::Tensor SigmaScheduler::scale_model_input(const at::Tensor& sample, int step_index) {
  check_step_index(step_index, "scale_model_input()");
  const float sigma = sigma_at(step_index);
  return sample / static_cast<double>(std::sqrt(sigma * sigma + 1.0f));
}

at::Tensor SigmaScheduler::add_noise(const at::Tensor& original, const at::Tensor& noise, int step_index) const {
  check_step_index(step_index, "add_noise()");
  return original + noise * static_cast<double>(sigma_at(step_index));
}

}  // namespace dmx::schedulers
