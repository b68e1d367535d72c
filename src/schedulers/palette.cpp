// Palette's schedule and sampler (see palette.h).
#include "schedulers/palette.h"

#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"

namespace dmx::schedulers {

namespace {
const auto kF64 = at::TensorOptions().dtype(at::kDouble);
constexpr double kPi = 3.14159265358979323846;
}  // namespace

void PaletteBetaSchedule::validate(const std::string& what) const {
  DMX_CHECK_ARG(schedule == "linear" || schedule == "quad" || schedule == "warmup10" || schedule == "warmup50" ||
                    schedule == "const" || schedule == "jsd" || schedule == "cosine",
                what, ": schedule must be linear, quad, warmup10, warmup50, const, jsd or cosine, got '", schedule,
                "'");
  DMX_CHECK_ARG(n_timestep >= 2 && n_timestep <= 100000, what, ": n_timestep must be in [2, 100000], got ", n_timestep);
  DMX_CHECK_ARG(std::isfinite(linear_start) && std::isfinite(linear_end) && linear_start > 0 && linear_end > 0 &&
                    linear_start < 1 && linear_end < 1,
                what, ": linear_start and linear_end must be in (0, 1), got ", linear_start, " and ", linear_end);
  DMX_CHECK_ARG(std::isfinite(cosine_s) && cosine_s >= 0 && cosine_s < 1, what, ": cosine_s must be in [0, 1), got ",
                cosine_s);
}

PaletteBetaSchedule palette_train_schedule() { return {"linear", 2000, 1e-6, 1e-2, 8e-3}; }
PaletteBetaSchedule palette_test_schedule() { return {"linear", 1000, 1e-4, 0.09, 8e-3}; }

at::Tensor palette_betas(const PaletteBetaSchedule& s) {
  s.validate("beta schedule");
  const int64_t n = s.n_timestep;
  if (s.schedule == "quad") return at::linspace(std::sqrt(s.linear_start), std::sqrt(s.linear_end), n, kF64).pow(2);
  if (s.schedule == "linear") return at::linspace(s.linear_start, s.linear_end, n, kF64);
  if (s.schedule == "warmup10" || s.schedule == "warmup50") {
    at::Tensor b = at::full({n}, s.linear_end, kF64);
    const int64_t warm = static_cast<int64_t>(static_cast<double>(n) * (s.schedule == "warmup10" ? 0.1 : 0.5));
    if (warm > 0) b.narrow(0, 0, warm).copy_(at::linspace(s.linear_start, s.linear_end, warm, kF64));
    return b;
  }
  if (s.schedule == "const") return at::full({n}, s.linear_end, kF64);
  if (s.schedule == "jsd") return 1.0 / at::linspace(static_cast<double>(n), 1.0, n, kF64);
  // cosine (Nichol & Dhariwal 2021), as the code computes it in float64 torch.
  at::Tensor ts = at::arange(n + 1, kF64) / static_cast<double>(n) + s.cosine_s;
  at::Tensor al = (ts / (1 + s.cosine_s) * kPi / 2).cos().pow(2);
  al = al / al[0];
  return (1 - al.narrow(0, 1, n) / al.narrow(0, 0, n)).clamp_max(0.999);
}

at::Tensor palette_gammas(const at::Tensor& betas) {
  return at::cumprod(1.0 - betas.to(at::kDouble), 0).to(at::kFloat);
}

std::vector<int64_t> palette_respaced_indices(int64_t n, int64_t steps) {
  DMX_CHECK_ARG(n >= 1 && steps >= 1, "respacing: steps must be >= 1, got ", steps);
  std::vector<int64_t> idx;
  if (steps >= n) {
    for (int64_t i = 0; i < n; ++i) idx.push_back(i);
    return idx;
  }
  if (steps == 1) return {n - 1};
  for (int64_t k = 0; k < steps; ++k)
    idx.push_back(static_cast<int64_t>(
        std::llround(static_cast<double>(k) * static_cast<double>(n - 1) / static_cast<double>(steps - 1))));
  return idx;
}

at::Tensor palette_respaced_betas(const at::Tensor& betas, int64_t steps) {
  const at::Tensor g = at::cumprod(1.0 - betas.to(at::kDouble), 0);
  const std::vector<int64_t> idx = palette_respaced_indices(g.size(0), steps);
  std::vector<double> out;
  double prev = 1.0;
  const double* gp = g.data_ptr<double>();
  for (int64_t i : idx) {
    out.push_back(1.0 - gp[i] / prev);
    prev = gp[i];
  }
  return at::tensor(out, kF64);
}

at::Tensor palette_sample_gammas(const at::Tensor& gammas, const at::Tensor& t, const at::Tensor& u) {
  const at::Tensor g1 = gammas.index_select(0, t - 1), g2 = gammas.index_select(0, t);
  return (g2 - g1) * u.to(at::kFloat) + g1;
}

at::Tensor palette_q_sample(const at::Tensor& y0, const at::Tensor& g, const at::Tensor& noise) {
  const at::Tensor gv = g.to(at::kFloat).view({-1, 1, 1, 1});
  return gv.sqrt() * y0 + (1 - gv).sqrt() * noise;
}

PaletteSampler::PaletteSampler(const at::Tensor& betas_in) {
  const at::Tensor betas = betas_in.to(at::kDouble).contiguous();
  DMX_CHECK_ARG(betas.dim() == 1 && betas.size(0) >= 1, "Palette sampler: betas must be [T], got ", betas.sizes());
  n_ = betas.size(0);
  const at::Tensor alphas = 1.0 - betas;
  const at::Tensor gammas = at::cumprod(alphas, 0);
  const at::Tensor gammas_prev = at::cat({at::ones({1}, kF64), gammas.narrow(0, 0, n_ - 1)});
  gammas_ = gammas.to(at::kFloat);
  sqrt_recip_gammas_ = (1.0 / gammas).sqrt().to(at::kFloat);
  sqrt_recipm1_gammas_ = (1.0 / gammas - 1).sqrt().to(at::kFloat);
  const at::Tensor post_var = betas * (1.0 - gammas_prev) / (1.0 - gammas);
  log_var_ = at::clamp_min(post_var, 1e-20).log().to(at::kFloat);
  coef1_ = (betas * gammas_prev.sqrt() / (1.0 - gammas)).to(at::kFloat);
  coef2_ = ((1.0 - gammas_prev) * alphas.sqrt() / (1.0 - gammas)).to(at::kFloat);
}

at::Tensor PaletteSampler::predict_start(const at::Tensor& y_t, int64_t i, const at::Tensor& eps, bool clip) const {
  DMX_CHECK_ARG(i >= 0 && i < n_, "Palette sampler: step index ", i, " out of [0, ", n_, ")");
  at::Tensor y0 = sqrt_recip_gammas_[i] * y_t - sqrt_recipm1_gammas_[i] * eps;
  if (clip) y0 = y0.clamp(-1.0, 1.0);
  return y0;
}

at::Tensor PaletteSampler::step(const at::Tensor& y_t, int64_t i, const at::Tensor& eps, const at::Tensor& noise,
                                bool clip) const {
  const at::Tensor y0 = predict_start(y_t, i, eps, clip);
  const at::Tensor mean = coef1_[i] * y0 + coef2_[i] * y_t;
  if (i == 0 || !noise.defined()) return mean;
  return mean + noise * (0.5 * log_var_[i]).exp();
}

at::Tensor palette_sample(const PaletteSampler& sampler, const at::Tensor& cond, const at::Tensor& known,
                          const at::Tensor& mask, at::Generator& gen, const PaletteDenoiser& denoise,
                          const std::function<void(int64_t, int64_t)>& on_step) {
  DMX_CHECK_ARG(cond.dim() == 4 && cond.size(1) == 3, "palette_sample: cond must be [B, 3, H, W], got ", cond.sizes());
  DMX_CHECK_ARG(!mask.defined() || (known.defined() && known.sizes().equals(cond.sizes())),
                "palette_sample: a mask needs the known picture of cond's shape");
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor y = mask.defined() ? cond.to(at::kFloat).clone() : at::randn(cond.sizes(), gen, f32);
  const int64_t n = sampler.num_steps();
  for (int64_t i = n - 1; i >= 0; --i) {
    const at::Tensor eps = denoise(cond, y, sampler.noise_level(i).reshape({1})).to(at::kFloat);
    at::Tensor z;
    if (i > 0) z = at::randn(y.sizes(), gen, f32);
    y = sampler.step(y, i, eps, z);
    if (mask.defined()) y = known * (1 - mask) + mask * y;
    if (on_step) on_step(n - i, n);
  }
  return y;
}
}  // namespace dmx::schedulers
