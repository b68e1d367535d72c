// Common scheduler interface (diffusers' SchedulerMixin contract, made index-based).
// Schedulers are pure tensor math: config separate from per-run state; one algorithm per file.
// Step indices are positions in timesteps(): a loop that starts part-way (img2img) passes the
// absolute index, which is what diffusers' set_begin_index does.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace dmx::schedulers {

// Every config field any of our schedulers reads, with diffusers' names. Defaults depend on the
// class (diffusers' from_config fills missing fields from the new class's defaults), so build one
// with SchedulerConfig::for_class(class_name, json).
struct SchedulerConfig {
  int num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string beta_schedule = "linear";      // linear | scaled_linear | squaredcos_cap_v2 (+ sigmoid: DDPM, exp: Heun)
  std::vector<double> trained_betas;         // empty = none
  std::string prediction_type = "epsilon";   // epsilon | v_prediction | sample
  std::string timestep_spacing = "leading";  // leading | trailing | linspace
  int steps_offset = 0;
  bool set_alpha_to_one = true;
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool thresholding = false;
  double dynamic_thresholding_ratio = 0.995;
  double sample_max_value = 1.0;
  bool rescale_betas_zero_snr = false;
  std::string variance_type = "fixed_small";  // DDPM; DPM-Solver: "" (None), learned, learned_range
  bool skip_prk_steps = false;                // PNDM
  bool use_karras_sigmas = false;             // Euler, LMS, Heun, DPM-Solver
  std::string interpolation_type = "linear";  // Euler: linear | log_linear
  std::string timestep_type = "discrete";     // Euler: discrete | continuous
  std::optional<double> sigma_min;            // Euler: Karras range (unset = from the schedule)
  std::optional<double> sigma_max;
  int solver_order = 2;  // DPM-Solver
  std::string algorithm_type = "dpmsolver++";
  std::string solver_type = "midpoint";
  bool lower_order_final = true;
  bool euler_at_final = false;
  std::string final_sigmas_type = "zero";  // zero | sigma_min
  bool use_lu_lambdas = false;
  double lambda_min_clipped = -std::numeric_limits<double>::infinity();
  int original_inference_steps = 50;  // LCM: the distillation schedule's length
  double timestep_scaling = 10.0;     // LCM: timestep factor of the boundary-condition scalings c_skip, c_out

  // class_name is diffusers' class (DDIMScheduler, ...). Unknown json fields are ignored.
  static SchedulerConfig for_class(const std::string& class_name, const nlohmann::json& config);
  // Every field by its diffusers name (unset optionals and empty trained_betas as null).
  nlohmann::json to_json() const;
};

struct StepArgs {
  double eta = 0.0;                    // DDIM only
  at::Generator* generator = nullptr;  // for schedulers that draw noise (DDPM, Euler, Euler a, DDIM eta>0, LCM)
  // Explicit noise instead of a draw, for every scheduler that draws (DDIM eta>0, DDPM, Euler, Euler a,
  // SDE DPM-Solver, LCM): replays recorded draws. Takes precedence over the generator, which then draws nothing.
  at::Tensor variance_noise;
};

struct StepOutput {
  at::Tensor prev_sample;
  at::Tensor pred_original_sample;  // undefined where the scheduler does not compute it
};

class Scheduler {
 public:
  virtual ~Scheduler() = default;
  virtual std::string class_name() const = 0;
  const SchedulerConfig& config() const { return config_; }

  virtual void set_timesteps(int num_inference_steps) = 0;
  // The timesteps the model sees, in loop order (floats: Karras and Euler produce fractional ones).
  const std::vector<double>& timesteps() const { return timesteps_; }
  virtual double init_noise_sigma() const { return 1.0; }
  // Entries in timesteps() per model evaluation pair (Heun = 2; used by img2img's start index).
  virtual int order() const { return 1; }
  virtual at::Tensor scale_model_input(const at::Tensor& sample, int step_index) { return sample; }
  // One denoising step at timesteps()[step_index]. A run may start at any index (img2img); stateful
  // schedulers (PNDM, LMS, Heun, DPM-Solver) then need consecutive indices (InvalidArgument otherwise)
  // until set_timesteps() starts a new run.
  virtual StepOutput step(const at::Tensor& model_output, int step_index, const at::Tensor& sample,
                          const StepArgs& args = {}) = 0;
  // Noise original to the level of timesteps()[step_index] (sigma-based schedulers use their sigmas).
  virtual at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise, int step_index) const = 0;
  // diffusers' add_noise(original, noise, timesteps=[timestep]) at a training timestep that need not be a step of
  // the run (a noise level: Stable unCLIP's image-embedding noising). The DDPM family (DDPM, DDIM, PNDM, UnCLIP);
  // Unsupported for the others. InvalidArgument unless 0 <= timestep < num_train_timesteps. No set_timesteps needed.
  virtual at::Tensor add_noise_at_timestep(const at::Tensor& original, const at::Tensor& noise, int64_t timestep) const;

 protected:
  SchedulerConfig config_;
  std::vector<double> timesteps_;
};

// name: a name of the scheduler registry (schedulers/registry.h: ddim, euler_a, dpmpp_2m_karras, ...) or a
// diffusers class name. base_config is the model's scheduler_config.json (any class): the class is swapped,
// and the row's config overrides set, as diffusers' from_config does. Unknown name: InvalidArgument listing the
// choices.
std::unique_ptr<Scheduler> create_scheduler(const std::string& name, const nlohmann::json& base_config);
std::vector<std::string> scheduler_names();  // every row of the registry, in table order

// Shared math (scheduler.cpp): betas for a config, alphas_cumprod as float32 like diffusers.
at::Tensor make_betas(const SchedulerConfig& cfg);

// Parses the text of a diffusers scheduler_config.json. diffusers writes Python's json, which may hold
// NaN / Infinity / -Infinity (DPMSolverMultistepScheduler saves "lambda_min_clipped": -Infinity); plain
// JSON parsers reject those, so they become the strings "NaN" / "Infinity" / "-Infinity", which
// for_class reads as numbers. Throws FormatError on malformed text.
nlohmann::json parse_scheduler_config(const std::string& text);
}  // namespace dmx::schedulers
