// Schedule math every scheduler shares: beta schedules (make_betas), numpy emulation for set_timesteps,
// Karras sigmas, sigma <-> t, noise draws and dynamic thresholding. Mirrors diffusers 0.27.2
// (schedulers/scheduling_*.py and utils/torch_utils.py) and numpy 1.x.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "dmx/error.h"
#include "schedulers/scheduler.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

// diffusers' betas_for_alpha_bar (Python floats, then float32).
at::Tensor betas_for_alpha_bar(int n, const std::string& transform, double max_beta = 0.999) {
  const auto alpha_bar = [&](double t) {
    if (transform == "cosine") return std::pow(std::cos((t + 0.008) / 1.008 * M_PI / 2), 2.0);
    return std::exp(t * -12.0);
  };
  std::vector<double> betas(n);
  for (int i = 0; i < n; ++i) {
    const double t1 = static_cast<double>(i) / n, t2 = static_cast<double>(i + 1) / n;
    betas[i] = std::min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta);
  }
  return at::tensor(betas, at::kDouble).to(at::kFloat);
}

// Common Diffusion Noise Schedules and Sample Steps are Flawed (https://arxiv.org/abs/2305.08891), Algorithm 1.
at::Tensor rescale_zero_terminal_snr(const at::Tensor& betas) {
  at::Tensor alphas = at::rsub(betas, 1.0);
  at::Tensor alphas_bar_sqrt = at::cumprod(alphas, 0).sqrt();
  const at::Tensor a0 = alphas_bar_sqrt[0].clone();
  const at::Tensor aT = alphas_bar_sqrt[-1].clone();
  alphas_bar_sqrt -= aT;
  alphas_bar_sqrt *= a0 / (a0 - aT);
  const at::Tensor alphas_bar = alphas_bar_sqrt.pow(2);
  alphas = alphas_bar.slice(0, 1) / alphas_bar.slice(0, 0, -1);
  alphas = at::cat({alphas_bar.slice(0, 0, 1), alphas});
  return at::rsub(alphas, 1);
}

}  // namespace

at::Tensor make_betas(const SchedulerConfig& cfg) {
  const int n = cfg.num_train_timesteps;
  DMX_CHECK_ARG(n > 0, "num_train_timesteps must be > 0, got ", n);
  at::Tensor betas;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (!cfg.trained_betas.empty()) {
    betas = at::tensor(cfg.trained_betas, at::kDouble).to(at::kFloat);
  } else if (cfg.beta_schedule == "linear") {
    betas = at::linspace(cfg.beta_start, cfg.beta_end, n, f32);
  } else if (cfg.beta_schedule == "scaled_linear") {  // latent diffusion's schedule
    betas = at::linspace(std::pow(cfg.beta_start, 0.5), std::pow(cfg.beta_end, 0.5), n, f32).pow(2);
  } else if (cfg.beta_schedule == "squaredcos_cap_v2") {  // GLIDE cosine
    betas = betas_for_alpha_bar(n, "cosine");
  } else if (cfg.beta_schedule == "exp") {
    betas = betas_for_alpha_bar(n, "exp");
  } else if (cfg.beta_schedule == "sigmoid") {  // GeoDiff
    betas = at::linspace(-6, 6, n, f32).sigmoid() * (cfg.beta_end - cfg.beta_start) + cfg.beta_start;
  } else {
    throw InvalidArgument("beta_schedule must be one of linear, scaled_linear, squaredcos_cap_v2, exp, sigmoid, got '" +
                          cfg.beta_schedule + "'");
  }
  if (cfg.rescale_betas_zero_snr) betas = rescale_zero_terminal_snr(betas);
  return betas;
}

namespace detail {

std::vector<double> np_linspace(double start, double stop, int64_t num) {
  std::vector<double> y(std::max<int64_t>(num, 0));
  if (num <= 0) return y;
  if (num == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t i = 0; i < num; ++i) y[i] = static_cast<double>(i) * step + start;
  y[num - 1] = stop;
  return y;
}

std::vector<double> np_arange(double start, double stop, double step) {
  const double len_d = std::ceil((stop - start) / step);
  const int64_t len = len_d > 0 ? static_cast<int64_t>(len_d) : 0;
  std::vector<double> y(len);
  if (len == 0) return y;
  y[0] = start;
  if (len == 1) return y;
  y[1] = start + step;
  const double delta = y[1] - y[0];  // numpy's fill() recomputes the step from the first two values
  for (int64_t i = 2; i < len; ++i) y[i] = start + static_cast<double>(i) * delta;
  return y;
}

double np_round(double x) { return std::nearbyint(x); }

std::vector<double> np_interp(const std::vector<double>& x, const std::vector<float>& fp) {
  const int64_t n = static_cast<int64_t>(fp.size());
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double xv = x[i];
    if (std::isnan(xv)) {
      out[i] = xv;
    } else if (xv <= 0) {
      out[i] = fp[0];
    } else if (xv >= static_cast<double>(n - 1)) {
      out[i] = fp[n - 1];
    } else {
      const int64_t j = static_cast<int64_t>(std::floor(xv));
      if (static_cast<double>(j) == xv) {
        out[i] = fp[j];
      } else {
        const double slope = (static_cast<double>(fp[j + 1]) - fp[j]) / 1.0;
        out[i] = slope * (xv - static_cast<double>(j)) + fp[j];
      }
    }
  }
  return out;
}

double sigma_to_t(double sigma, const std::vector<float>& log_sigmas) {
  const int64_t n = static_cast<int64_t>(log_sigmas.size());
  const double log_sigma = std::log(std::max(sigma, 1e-10));
  // numpy 1.x: float64 scalar - float32 array stays float32.
  const float log_sigma32 = static_cast<float>(log_sigma);
  int64_t low_idx = 0;  // cumsum(dists >= 0).argmax(): the last index with dists >= 0 (0 if none)
  for (int64_t i = 0; i < n; ++i)
    if (log_sigma32 - log_sigmas[i] >= 0.0f) low_idx = i;
  low_idx = std::min(low_idx, n - 2);
  const int64_t high_idx = low_idx + 1;
  const float low = log_sigmas[low_idx], high = log_sigmas[high_idx];
  double w = (static_cast<double>(low) - log_sigma) / static_cast<double>(low - high);
  w = std::min(std::max(w, 0.0), 1.0);
  return (1 - w) * static_cast<double>(low_idx) + w * static_cast<double>(high_idx);
}

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t num_inference_steps) {
  const double rho = 7.0;  // Karras et al. (2022)
  const std::vector<double> ramp = np_linspace(0, 1, num_inference_steps);
  const double min_inv_rho = std::pow(sigma_min, 1 / rho);
  const double max_inv_rho = std::pow(sigma_max, 1 / rho);
  std::vector<double> sigmas(ramp.size());
  for (size_t i = 0; i < ramp.size(); ++i)
    sigmas[i] = std::pow(max_inv_rho + ramp[i] * (min_inv_rho - max_inv_rho), rho);
  return sigmas;
}

std::vector<double> spaced_timesteps(const SchedulerConfig& cfg, int n, bool integer_linspace) {
  const int T = cfg.num_train_timesteps;
  std::vector<double> ts;
  if (cfg.timestep_spacing == "linspace") {
    ts = np_linspace(0, T - 1, n);
    std::reverse(ts.begin(), ts.end());
    for (double& t : ts) t = integer_linspace ? np_round(t) : static_cast<double>(static_cast<float>(t));
  } else if (cfg.timestep_spacing == "leading") {
    const int ratio = T / n;
    for (int i = n - 1; i >= 0; --i) ts.push_back(static_cast<double>(i) * ratio + cfg.steps_offset);
  } else if (cfg.timestep_spacing == "trailing") {
    ts = np_arange(T, 0, -static_cast<double>(T) / n);
    for (double& t : ts) t = np_round(t) - 1;
  } else {
    throw InvalidArgument("timestep_spacing must be one of linspace, leading, trailing, got '" + cfg.timestep_spacing +
                          "'");
  }
  return ts;
}

std::vector<float> to_float_vector(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kCPU, at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

at::Tensor float_tensor(const std::vector<float>& v) {
  return at::tensor(at::ArrayRef<float>(v), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor step_noise(const StepArgs& args, const at::Tensor& like) {
  if (!args.variance_noise.defined()) return randn_like(like, args.generator);
  DMX_CHECK_ARG(args.variance_noise.sizes().equals(like.sizes()), "variance_noise must have shape ", like.sizes(),
                ", got ", args.variance_noise.sizes());
  return args.variance_noise.to(like.device(), like.scalar_type());
}

at::Tensor randn_like(const at::Tensor& like, at::Generator* generator) {
  const at::Device device = like.device();
  const auto options = at::TensorOptions().dtype(like.scalar_type()).layout(like.layout());
  if (generator == nullptr) return at::randn(like.sizes(), options.device(device));
  const at::Device gen_device = generator->device();
  if (gen_device.type() != device.type()) {
    DMX_CHECK_ARG(gen_device.is_cpu(), "a generator on ", gen_device, " cannot draw noise for a tensor on ", device,
                  "; use a CPU generator or one on ", device);
    return at::randn(like.sizes(), *generator, options.device(at::kCPU)).to(device);
  }
  return at::randn(like.sizes(), *generator, options.device(device));
}

at::Tensor threshold_sample(const at::Tensor& sample, const SchedulerConfig& cfg) {
  const auto dtype = sample.scalar_type();
  at::Tensor x = sample;
  if (dtype != at::kFloat && dtype != at::kDouble) x = x.to(at::kFloat);  // quantile needs float
  const int64_t batch = x.size(0);
  x = x.reshape({batch, -1});  // [B, C*H*W]
  at::Tensor s = at::quantile(x.abs(), cfg.dynamic_thresholding_ratio, /*dim=*/1);
  s = at::clamp(s, 1, cfg.sample_max_value).unsqueeze(1);  // [B, 1]; min 1 = plain clipping to [-1, 1]
  x = at::clamp(x, -s, s) / s;
  return x.reshape(sample.sizes()).to(dtype);
}

float torch_log(float x) { return at::log(at::scalar_tensor(x, at::kFloat)).item<float>(); }
float torch_exp(float x) { return at::exp(at::scalar_tensor(x, at::kFloat)).item<float>(); }

at::Tensor alphas_cumprod_of(const at::Tensor& betas) { return at::cumprod(at::rsub(betas, 1.0), 0); }

}  // namespace detail

}  // namespace dmx::schedulers
