// Private to src/schedulers (and the scheduler tests): the description of a diffusers scheduler class (each
// scheduler's file defines its own; registry.cpp lists them), the two scheduler families' shared state and
// numpy emulation for set_timesteps.
//
// Numerics follow diffusers 0.27.2 on the CPU: schedule tables are float32 tensors built with the same
// ATen ops; per-step scalars (alphas_cumprod[t], sigmas[i], ...) are float32 0-d tensors in diffusers,
// so they are plain `float` arithmetic here; spacing code that diffusers runs in numpy float64 is
// reproduced in double with numpy's formulas (linspace, arange, interp, round half to even).
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "schedulers/scheduler.h"

namespace dmx::schedulers {

// A diffusers scheduler class as from_config sees it (diffusers 0.27.2): the __init__ fields it reads besides
// the beta ones (other fields of a config are ignored), the values it accepts, its defaults and constructor.
struct SchedulerClass {
  std::string name;                 // DDIMScheduler, ...
  std::vector<std::string> params;  // __init__ fields besides num_train_timesteps and the beta schedule
  std::vector<std::string> beta_schedules;
  std::vector<std::string> prediction_types;
  std::vector<std::string> spacings;               // timestep_spacing values
  std::function<void(SchedulerConfig&)> defaults;  // applied over detail::neutral_config()
  std::function<std::unique_ptr<Scheduler>(const SchedulerConfig&)> make;
  std::function<void(SchedulerConfig&)> normalize = nullptr;       // deprecated values diffusers maps on load
  std::function<void(const SchedulerConfig&)> validate = nullptr;  // class rules after the common ones
};

// The classes of the registry's rows, by diffusers name (InvalidArgument listing them when unknown).
const SchedulerClass& find_scheduler_class(const std::string& class_name);
std::vector<std::string> scheduler_class_names();

namespace detail {

extern const std::vector<std::string> kBetaSchedules;    // linear, scaled_linear, squaredcos_cap_v2
extern const std::vector<std::string> kPredictionTypes;  // epsilon, sample, v_prediction
extern const std::vector<std::string> kSpacings;         // linspace, leading, trailing
// SchedulerConfig with the fields a class may not have at neutral values (no clipping, ...).
SchedulerConfig neutral_config();
// InvalidArgument "scheduler config field 'F' must be one of A, B for CLASS, got 'V'" unless value is allowed.
void check_one_of(const std::string& field, const std::string& value, const std::vector<std::string>& allowed,
                  const std::string& class_name);
bool contains(const std::vector<std::string>& items, const std::string& s);

// numpy.linspace(start, stop, num) in float64.
std::vector<double> np_linspace(double start, double stop, int64_t num);
// numpy.arange(start, stop, step) for float64 (numpy's length rule and fill formula).
std::vector<double> np_arange(double start, double stop, double step);
// numpy.round / rint: half to even.
double np_round(double x);
// numpy.interp(x, arange(len(fp)), fp) with float32 table values, in float64.
std::vector<double> np_interp(const std::vector<double>& x, const std::vector<float>& fp);
// diffusers' _sigma_to_t (EulerDiscreteScheduler): fractional timestep of a sigma, log_sigmas float32.
double sigma_to_t(double sigma, const std::vector<float>& log_sigmas);
// diffusers' _convert_to_karras: rho = 7 between sigma_max and sigma_min (float64).
std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t num_inference_steps);

// The descending timesteps that DDPM, DDIM, Euler, Euler a, Heun and LMS build in set_timesteps for
// "linspace" / "leading" / "trailing". integer_linspace: DDPM/DDIM round linspace to integers; the
// sigma schedulers keep float32 values.
std::vector<double> spaced_timesteps(const SchedulerConfig& cfg, int num_inference_steps, bool integer_linspace);

std::vector<float> to_float_vector(const at::Tensor& t);  // 1-D float32 contiguous copy
at::Tensor float_tensor(const std::vector<float>& v);     // 1-D float32 CPU tensor

// diffusers.utils.torch_utils.randn_tensor(shape, generator, device=like.device, dtype=like.dtype):
// a CPU generator draws on the CPU and the result moves to like's device.
at::Tensor randn_like(const at::Tensor& like, at::Generator* generator);
// The noise of one step: args.variance_noise when given (shape-checked), else a draw like randn_like.
at::Tensor step_noise(const StepArgs& args, const at::Tensor& like);

// Dynamic thresholding (Imagen, https://arxiv.org/abs/2205.11487): DDPMScheduler._threshold_sample.
at::Tensor threshold_sample(const at::Tensor& sample, const SchedulerConfig& cfg);

// log / exp of a float32 scalar through ATen's CPU kernels, i.e. what diffusers' arithmetic on 0-d
// float32 tensors computes (ATen's vectorised log/exp can differ from libm in the last bit).
float torch_log(float x);
float torch_exp(float x);

// alphas_cumprod = cumprod(1 - betas) (float32).
at::Tensor alphas_cumprod_of(const at::Tensor& betas);

}  // namespace detail

// Shared base: index checks and the "set_timesteps before step" rule.
class SchedulerBase : public Scheduler {
 protected:
  explicit SchedulerBase(const SchedulerConfig& cfg) { config_ = cfg; }
  // The timesteps set_timesteps(n) spaces out (diffusers' timestep_spacing), before any interleaving or
  // karras resampling. Default: detail::spaced_timesteps; schedulers with their own spacing override it.
  virtual std::vector<double> base_timesteps(int n) const;
  // n in [1, num_train_timesteps], and n steps must give distinct training timesteps in [0, T - 1]: with
  // "leading" spacing and steps_offset 1 (Stable Diffusion's configs), 1000 steps reach timestep 1000 (an
  // index past the tables of the DDPM family, a clamped duplicate sigma that divides by zero in LMS and
  // DPM-Solver). InvalidArgument stating the most steps this configuration accepts; set_timesteps calls it
  // first, so a run fails before any denoising.
  void check_num_inference_steps(int n) const;
  // Throws InvalidArgument unless set_timesteps ran and 0 <= step_index < timesteps().size().
  void check_step_index(int step_index, const char* what) const;
  int num_inference_steps_ = 0;
};

// DDPM family (DDPM, DDIM, DDIM inverse, PNDM): tables indexed by the integer training timestep.
class AlphaScheduler : public SchedulerBase {
 public:
  // sqrt(alphas_cumprod[t]) * original + sqrt(1 - alphas_cumprod[t]) * noise, t = timesteps()[step_index].
  at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise, int step_index) const override;
  at::Tensor add_noise_at_timestep(const at::Tensor& original, const at::Tensor& noise,
                                   int64_t timestep) const override;
  const std::vector<float>& alphas_cumprod() const { return alphas_cumprod_; }

 protected:
  explicit AlphaScheduler(const SchedulerConfig& cfg);
  float alpha_prod(int64_t t) const;  // alphas_cumprod[t], checked
  at::Tensor betas_;
  std::vector<float> alphas_cumprod_;
};

// k-diffusion family (Euler, Euler a, Heun, LMS, DPM-Solver): sigmas = sqrt((1 - a) / a).
class SigmaScheduler : public SchedulerBase {
 public:
  // max sigma, or sqrt(max^2 + 1) for "leading" spacing (as diffusers' init_noise_sigma property).
  double init_noise_sigma() const override;
  at::Tensor scale_model_input(const at::Tensor& sample, int step_index) override;  // x / sqrt(sigma^2 + 1)
  at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise, int step_index) const override;
  // Loop sigmas (timesteps().size() + 1 entries for most; Heun: 2 per pair), float32 like diffusers.
  const std::vector<float>& sigmas() const { return sigmas_; }

 protected:
  // rescale_betas_zero_snr also pins alphas_cumprod[-1] to 2^-24 (Euler, Euler a, DPM-Solver do so).
  SigmaScheduler(const SchedulerConfig& cfg, bool pin_zero_snr);
  std::vector<float> training_sigmas() const;  // sqrt((1 - a) / a) for t = 0..T-1 (float32)
  float sigma_at(int index) const;             // sigmas_[index], checked
  at::Tensor alphas_cumprod_t_;                // float32 [T]
  std::vector<float> alphas_cumprod_;
  std::vector<float> sigmas_;
};

}  // namespace dmx::schedulers
