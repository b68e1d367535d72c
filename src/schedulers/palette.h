// Palette's noise schedule and sampler (Saharia et al. 2022, "Palette: Image-to-Image Diffusion Models", as the
// unofficial code computes it: Janspiry/Palette-Image-to-Image-Diffusion-Models models/network.py):
//   betas      make_beta_schedule(schedule, n_timestep, linear_start, linear_end), float64
//   gammas     cumprod(1 - betas) (float64, stored float32 as the code's registered buffers)
//   training   t ~ U{1, .., T-1}, gamma ~ U[gammas[t-1], gammas[t]) (a continuous noise level between two
//              adjacent steps), y_noisy = sqrt(gamma) y0 + sqrt(1 - gamma) eps; the model sees gamma itself
//   sampling   p_sample: y0_hat = sqrt(1/g_t) y_t - sqrt(1/g_t - 1) eps_hat, clamped to [-1, 1]; the posterior
//              mean coef1_t y0_hat + coef2_t y_t plus exp(0.5 log var_t) z (z = 0 at t = 0), conditioned on gammas[t]
// The model is conditioned on the continuous noise level, so sampling may use another schedule than training (the
// code's configs do: 2000 linear steps 1e-6..0.01 to train, 1000 linear steps 1e-4..0.09 to sample). Fewer
// sampling steps respace the sampling schedule (Nichol & Dhariwal 2021): N of its steps, evenly spaced, with the
// betas recomputed from the gammas kept, so N = n_timestep is the code's sampler exactly. docs/palette.md.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dmx::schedulers {

struct PaletteBetaSchedule {
  std::string schedule = "linear";  // linear | quad | warmup10 | warmup50 | const | jsd | cosine
  int64_t n_timestep = 2000;
  double linear_start = 1e-6;
  double linear_end = 1e-2;
  double cosine_s = 8e-3;
  void validate(const std::string& what) const;  // InvalidArgument naming `what` and the field
};
// The code's train and test schedules (config/*.json of the unofficial code).
PaletteBetaSchedule palette_train_schedule();  // linear, 2000, 1e-6 .. 0.01
PaletteBetaSchedule palette_test_schedule();   // linear, 1000, 1e-4 .. 0.09

// make_beta_schedule: [T] float64.
at::Tensor palette_betas(const PaletteBetaSchedule& s);
// cumprod(1 - betas) in float64, returned as float32 [T] (the code's `gammas` buffer).
at::Tensor palette_gammas(const at::Tensor& betas);
// The evenly spaced indices of `steps` steps out of `n` (round(k (n - 1) / (steps - 1)), k = 0..steps-1; all of them
// when steps >= n) and the betas that keep their gammas: 1 - g[i_k] / g[i_{k-1}] (float64).
std::vector<int64_t> palette_respaced_indices(int64_t n, int64_t steps);
at::Tensor palette_respaced_betas(const at::Tensor& betas, int64_t steps);

// Training draw of the noise levels: gammas[t-1] + u (gammas[t] - gammas[t-1]) for t [B] int64 in [1, T) and
// u [B] in [0, 1): [B] float32.
at::Tensor palette_sample_gammas(const at::Tensor& gammas, const at::Tensor& t, const at::Tensor& u);
// q_sample: sqrt(g) y0 + sqrt(1 - g) noise, g [B] broadcast over [B, C, H, W].
at::Tensor palette_q_sample(const at::Tensor& y0, const at::Tensor& g, const at::Tensor& noise);

// The ancestral sampler of Network.set_new_noise_schedule / p_sample on float64 betas.
class PaletteSampler {
 public:
  explicit PaletteSampler(const at::Tensor& betas);
  int64_t num_steps() const { return n_; }
  // The noise level the model sees at step index i (gammas[i], float32 0-d).
  at::Tensor noise_level(int64_t i) const { return gammas_[i]; }
  const at::Tensor& gammas() const { return gammas_; }
  // y0_hat from the predicted noise, clamped to [-1, 1] when clip.
  at::Tensor predict_start(const at::Tensor& y_t, int64_t i, const at::Tensor& eps, bool clip = true) const;
  // One p_sample step from index i to i - 1: the posterior mean plus exp(0.5 log var_i) * noise; noise is ignored
  // (zero) at i = 0.
  at::Tensor step(const at::Tensor& y_t, int64_t i, const at::Tensor& eps, const at::Tensor& noise,
                  bool clip = true) const;

 private:
  int64_t n_ = 0;
  at::Tensor gammas_, sqrt_recip_gammas_, sqrt_recipm1_gammas_, log_var_, coef1_, coef2_;  // float32 [T]
};

// The noise prediction of the model: eps_hat(cond, y_t, gamma [1]).
using PaletteDenoiser = std::function<at::Tensor(const at::Tensor& cond, const at::Tensor& y, const at::Tensor& gamma)>;
// The restoration loop (the code's Network.restoration): y_T = randn_like(cond) drawn from gen, or, for the masked
// tasks (mask defined), cond itself (the known region with noise in the hole, as the code's y_t=cond_image); for
// each step i from the last to 0: eps = denoise(cond, y, gammas[i]); z = randn_like(y) from gen (after the model
// call, none at i = 0); y = step(y, i, eps, z); masked tasks paste the known region back, y = known (1 - m) + m y.
// cond, known: [B, 3, H, W]; mask [B or 1, 1, H, W] or undefined. on_step(k, n) after each step when given.
at::Tensor palette_sample(const PaletteSampler& sampler, const at::Tensor& cond, const at::Tensor& known,
                          const at::Tensor& mask, at::Generator& gen, const PaletteDenoiser& denoise,
                          const std::function<void(int64_t, int64_t)>& on_step = nullptr);
}  // namespace dmx::schedulers
