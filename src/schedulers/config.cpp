// Scheduler configuration (diffusers' ConfigMixin.from_config, per class), beta schedules, the factory,
// and the numeric helpers every scheduler shares. Mirrors diffusers 0.27.2 (src/diffusers/schedulers).
#include "schedulers/scheduler.h"

#include <ATen/ATen.h>

#include <cmath>
#include <functional>
#include <limits>
#include <map>

#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {
namespace {

using json = nlohmann::json;

std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

bool contains(const std::vector<std::string>& items, const std::string& s) {
  return std::find(items.begin(), items.end(), s) != items.end();
}

// ---- JSON field readers: type errors name the field and show the value. ----

[[noreturn]] void bad_type(const std::string& key, const char* expected, const json& v) {
  throw InvalidArgument("scheduler config field '" + key + "' must be " + expected + ", got " + v.dump());
}

double read_double(const std::string& key, const json& v) {
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {  // Python's json writes Infinity / -Infinity / NaN (see parse_scheduler_config)
    const std::string s = v.get<std::string>();
    if (s == "Infinity" || s == "inf") return std::numeric_limits<double>::infinity();
    if (s == "-Infinity" || s == "-inf") return -std::numeric_limits<double>::infinity();
    if (s == "NaN" || s == "nan") return std::numeric_limits<double>::quiet_NaN();
  }
  bad_type(key, "a number", v);
}

int read_int(const std::string& key, const json& v) {
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i >= std::numeric_limits<int>::min() && i <= std::numeric_limits<int>::max()) return static_cast<int>(i);
  } else if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 2e9) return static_cast<int>(d);
  }
  bad_type(key, "an integer", v);
}

bool read_bool(const std::string& key, const json& v) {
  if (v.is_boolean()) return v.get<bool>();
  bad_type(key, "true or false", v);
}

std::string read_string(const std::string& key, const json& v) {
  if (v.is_string()) return v.get<std::string>();
  bad_type(key, "a string", v);
}

using Setter = std::function<void(SchedulerConfig&, const std::string&, const json&)>;

const std::map<std::string, Setter>& field_setters() {
  static const std::map<std::string, Setter> setters = {
      {"num_train_timesteps", [](auto& c, auto& k, auto& v) { c.num_train_timesteps = read_int(k, v); }},
      {"beta_start", [](auto& c, auto& k, auto& v) { c.beta_start = read_double(k, v); }},
      {"beta_end", [](auto& c, auto& k, auto& v) { c.beta_end = read_double(k, v); }},
      {"beta_schedule", [](auto& c, auto& k, auto& v) { c.beta_schedule = read_string(k, v); }},
      {"trained_betas",
       [](auto& c, auto& k, auto& v) {
         if (!v.is_array()) bad_type(k, "an array of numbers", v);
         c.trained_betas.clear();
         for (const auto& b : v) c.trained_betas.push_back(read_double(k, b));
       }},
      {"prediction_type", [](auto& c, auto& k, auto& v) { c.prediction_type = read_string(k, v); }},
      {"timestep_spacing", [](auto& c, auto& k, auto& v) { c.timestep_spacing = read_string(k, v); }},
      {"steps_offset", [](auto& c, auto& k, auto& v) { c.steps_offset = read_int(k, v); }},
      {"set_alpha_to_one", [](auto& c, auto& k, auto& v) { c.set_alpha_to_one = read_bool(k, v); }},
      {"clip_sample", [](auto& c, auto& k, auto& v) { c.clip_sample = read_bool(k, v); }},
      {"clip_sample_range", [](auto& c, auto& k, auto& v) { c.clip_sample_range = read_double(k, v); }},
      {"thresholding", [](auto& c, auto& k, auto& v) { c.thresholding = read_bool(k, v); }},
      {"dynamic_thresholding_ratio",
       [](auto& c, auto& k, auto& v) { c.dynamic_thresholding_ratio = read_double(k, v); }},
      {"sample_max_value", [](auto& c, auto& k, auto& v) { c.sample_max_value = read_double(k, v); }},
      {"rescale_betas_zero_snr", [](auto& c, auto& k, auto& v) { c.rescale_betas_zero_snr = read_bool(k, v); }},
      {"variance_type", [](auto& c, auto& k, auto& v) { c.variance_type = read_string(k, v); }},
      {"skip_prk_steps", [](auto& c, auto& k, auto& v) { c.skip_prk_steps = read_bool(k, v); }},
      {"use_karras_sigmas", [](auto& c, auto& k, auto& v) { c.use_karras_sigmas = read_bool(k, v); }},
      {"interpolation_type", [](auto& c, auto& k, auto& v) { c.interpolation_type = read_string(k, v); }},
      {"timestep_type", [](auto& c, auto& k, auto& v) { c.timestep_type = read_string(k, v); }},
      {"sigma_min", [](auto& c, auto& k, auto& v) { c.sigma_min = read_double(k, v); }},
      {"sigma_max", [](auto& c, auto& k, auto& v) { c.sigma_max = read_double(k, v); }},
      {"solver_order", [](auto& c, auto& k, auto& v) { c.solver_order = read_int(k, v); }},
      {"algorithm_type", [](auto& c, auto& k, auto& v) { c.algorithm_type = read_string(k, v); }},
      {"solver_type", [](auto& c, auto& k, auto& v) { c.solver_type = read_string(k, v); }},
      {"lower_order_final", [](auto& c, auto& k, auto& v) { c.lower_order_final = read_bool(k, v); }},
      {"euler_at_final", [](auto& c, auto& k, auto& v) { c.euler_at_final = read_bool(k, v); }},
      {"final_sigmas_type", [](auto& c, auto& k, auto& v) { c.final_sigmas_type = read_string(k, v); }},
      {"use_lu_lambdas", [](auto& c, auto& k, auto& v) { c.use_lu_lambdas = read_bool(k, v); }},
      {"lambda_min_clipped", [](auto& c, auto& k, auto& v) { c.lambda_min_clipped = read_double(k, v); }},
  };
  return setters;
}

// ---- Per-class __init__ signatures and defaults (diffusers 0.27.2). ----

struct ClassSpec {
  std::string name;
  std::vector<std::string> params;  // __init__ arguments besides the beta ones
  std::vector<std::string> beta_schedules;
  std::vector<std::string> prediction_types;
  std::vector<std::string> spacings;
  std::function<void(SchedulerConfig&)> defaults;
  std::unique_ptr<Scheduler> (*make)(const SchedulerConfig&);
};

const std::vector<std::string> kBetaParams = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                              "trained_betas"};
const std::vector<std::string> kBetaSchedules = {"linear", "scaled_linear", "squaredcos_cap_v2"};
const std::vector<std::string> kPredictionTypes = {"epsilon", "sample", "v_prediction"};
const std::vector<std::string> kSpacings = {"linspace", "leading", "trailing"};

// Fields a class does not have keep neutral values, so config() never claims e.g. clipping for Euler.
void neutral(SchedulerConfig& c) {
  c = SchedulerConfig{};
  c.clip_sample = false;
  c.set_alpha_to_one = false;
  c.variance_type = "";
}

const std::vector<ClassSpec>& class_specs() {
  static const std::vector<ClassSpec> specs = {
      {"DDPMScheduler",
       {"variance_type", "clip_sample", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
        "clip_sample_range", "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"},
       {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"},
       kPredictionTypes,
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.variance_type = "fixed_small";
         c.clip_sample = true;
         c.timestep_spacing = "leading";
       },
       make_ddpm},
      {"DDIMScheduler",
       {"clip_sample", "set_alpha_to_one", "steps_offset", "prediction_type", "thresholding",
        "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value", "timestep_spacing",
        "rescale_betas_zero_snr"},
       kBetaSchedules,
       kPredictionTypes,
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.clip_sample = true;
         c.set_alpha_to_one = true;
         c.timestep_spacing = "leading";
       },
       make_ddim},
      {"DDIMInverseScheduler",
       {"clip_sample", "set_alpha_to_one", "steps_offset", "prediction_type", "clip_sample_range", "timestep_spacing",
        "rescale_betas_zero_snr"},
       kBetaSchedules,
       kPredictionTypes,
       {"leading", "trailing"},
       [](SchedulerConfig& c) {
         neutral(c);
         c.clip_sample = true;
         c.set_alpha_to_one = true;
         c.timestep_spacing = "leading";
       },
       make_ddim_inverse},
      {"PNDMScheduler",
       {"skip_prk_steps", "set_alpha_to_one", "prediction_type", "timestep_spacing", "steps_offset"},
       kBetaSchedules,
       {"epsilon", "v_prediction"},
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.timestep_spacing = "leading";
       },
       make_pndm},
      {"EulerDiscreteScheduler",
       {"prediction_type", "interpolation_type", "use_karras_sigmas", "sigma_min", "sigma_max", "timestep_spacing",
        "timestep_type", "steps_offset", "rescale_betas_zero_snr"},
       kBetaSchedules,
       {"epsilon", "sample", "v_prediction", "original_sample"},
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.timestep_spacing = "linspace";
       },
       make_euler},
      {"EulerAncestralDiscreteScheduler",
       {"prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"},
       kBetaSchedules,
       kPredictionTypes,
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.timestep_spacing = "linspace";
       },
       make_euler_ancestral},
      {"HeunDiscreteScheduler",
       {"prediction_type", "use_karras_sigmas", "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset"},
       {"linear", "scaled_linear", "squaredcos_cap_v2", "exp"},
       kPredictionTypes,
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.beta_start = 0.00085;
         c.beta_end = 0.012;
         c.timestep_spacing = "linspace";
       },
       make_heun},
      {"LMSDiscreteScheduler",
       {"use_karras_sigmas", "prediction_type", "timestep_spacing", "steps_offset"},
       kBetaSchedules,
       kPredictionTypes,
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.timestep_spacing = "linspace";
       },
       make_lms},
      {"DPMSolverMultistepScheduler",
       {"solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
        "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_lu_lambdas",
        "final_sigmas_type", "lambda_min_clipped", "variance_type", "timestep_spacing", "steps_offset",
        "rescale_betas_zero_snr"},
       kBetaSchedules,
       kPredictionTypes,
       kSpacings,
       [](SchedulerConfig& c) {
         neutral(c);
         c.timestep_spacing = "linspace";
       },
       make_dpm_multistep},
  };
  return specs;
}

std::vector<std::string> class_names() {
  std::vector<std::string> out;
  for (const auto& s : class_specs()) out.push_back(s.name);
  return out;
}

const ClassSpec& find_class(const std::string& class_name) {
  for (const auto& s : class_specs())
    if (s.name == class_name) return s;
  throw InvalidArgument("unknown scheduler class '" + class_name + "'; supported classes: " + join(class_names()));
}

void check_one_of(const std::string& field, const std::string& value, const std::vector<std::string>& allowed,
                  const std::string& class_name) {
  if (!contains(allowed, value))
    throw InvalidArgument("scheduler config field '" + field + "' must be one of " + join(allowed) + " for " +
                          class_name + ", got '" + value + "'");
}

void validate(const SchedulerConfig& c, const ClassSpec& spec) {
  const auto has = [&](const char* p) { return contains(spec.params, p); };
  const std::string& cls = spec.name;
  DMX_CHECK_ARG(c.num_train_timesteps > 0, "scheduler config field 'num_train_timesteps' must be > 0, got ",
                c.num_train_timesteps);
  if (c.trained_betas.empty()) {
    check_one_of("beta_schedule", c.beta_schedule, spec.beta_schedules, cls);
    DMX_CHECK_ARG(std::isfinite(c.beta_start) && c.beta_start >= 0 && c.beta_start < 1,
                  "scheduler config field 'beta_start' must be in [0, 1), got ", c.beta_start);
    DMX_CHECK_ARG(std::isfinite(c.beta_end) && c.beta_end >= 0 && c.beta_end < 1,
                  "scheduler config field 'beta_end' must be in [0, 1), got ", c.beta_end);
  } else {
    DMX_CHECK_ARG(static_cast<int>(c.trained_betas.size()) == c.num_train_timesteps,
                  "scheduler config field 'trained_betas' must hold num_train_timesteps (", c.num_train_timesteps,
                  ") values, got ", c.trained_betas.size());
    for (double b : c.trained_betas)
      DMX_CHECK_ARG(std::isfinite(b) && b >= 0 && b < 1,
                    "scheduler config field 'trained_betas' values must be in [0, 1), got ", b);
  }
  if (has("prediction_type")) {
    if (cls == "EulerAncestralDiscreteScheduler" && c.prediction_type == "sample")
      throw Unsupported(
          "EulerAncestralDiscreteScheduler does not implement prediction_type 'sample' "
          "(diffusers 0.27 raises NotImplementedError); use epsilon or v_prediction");
    check_one_of("prediction_type", c.prediction_type, spec.prediction_types, cls);
  }
  if (has("timestep_spacing")) check_one_of("timestep_spacing", c.timestep_spacing, spec.spacings, cls);
  if (has("steps_offset"))
    DMX_CHECK_ARG(c.steps_offset >= 0 && c.steps_offset < c.num_train_timesteps,
                  "scheduler config field 'steps_offset' must be in [0, num_train_timesteps), got ", c.steps_offset);
  if (has("clip_sample_range"))
    DMX_CHECK_ARG(c.clip_sample_range > 0, "scheduler config field 'clip_sample_range' must be > 0, got ",
                  c.clip_sample_range);
  if (has("thresholding")) {
    DMX_CHECK_ARG(c.dynamic_thresholding_ratio > 0 && c.dynamic_thresholding_ratio <= 1,
                  "scheduler config field 'dynamic_thresholding_ratio' must be in (0, 1], got ",
                  c.dynamic_thresholding_ratio);
    DMX_CHECK_ARG(c.sample_max_value >= 1, "scheduler config field 'sample_max_value' must be >= 1, got ",
                  c.sample_max_value);
  }
  if (cls == "DDPMScheduler")
    check_one_of("variance_type", c.variance_type,
                 {"fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"}, cls);
  if (cls == "EulerDiscreteScheduler") {
    check_one_of("interpolation_type", c.interpolation_type, {"linear", "log_linear"}, cls);
    check_one_of("timestep_type", c.timestep_type, {"discrete", "continuous"}, cls);
    if (c.sigma_min)
      DMX_CHECK_ARG(*c.sigma_min > 0, "scheduler config field 'sigma_min' must be > 0, got ", *c.sigma_min);
    if (c.sigma_max)
      DMX_CHECK_ARG(*c.sigma_max > 0, "scheduler config field 'sigma_max' must be > 0, got ", *c.sigma_max);
  }
  if (cls == "DPMSolverMultistepScheduler") {
    DMX_CHECK_ARG(c.solver_order >= 1 && c.solver_order <= 3,
                  "scheduler config field 'solver_order' must be 1, 2 or 3, got ", c.solver_order);
    check_one_of("algorithm_type", c.algorithm_type, {"dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"},
                 cls);
    check_one_of("solver_type", c.solver_type, {"midpoint", "heun"}, cls);
    check_one_of("final_sigmas_type", c.final_sigmas_type, {"zero", "sigma_min"}, cls);
    if (c.final_sigmas_type == "zero")
      DMX_CHECK_ARG(c.algorithm_type == "dpmsolver++" || c.algorithm_type == "sde-dpmsolver++",
                    "scheduler config field 'final_sigmas_type' 'zero' is not supported with algorithm_type '",
                    c.algorithm_type, "'; use 'sigma_min'");
    DMX_CHECK_ARG(!std::isnan(c.lambda_min_clipped), "scheduler config field 'lambda_min_clipped' must be a number");
  }
}

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

struct ShortName {
  const char* name;
  const char* class_name;
  std::function<void(json&)> overrides;
};

const std::vector<ShortName>& short_names() {
  static const std::vector<ShortName> names = {
      {"ddim", "DDIMScheduler", nullptr},
      {"ddpm", "DDPMScheduler", nullptr},
      {"pndm", "PNDMScheduler", nullptr},
      {"euler", "EulerDiscreteScheduler", nullptr},
      {"euler_a", "EulerAncestralDiscreteScheduler", nullptr},
      {"heun", "HeunDiscreteScheduler", nullptr},
      {"lms", "LMSDiscreteScheduler", nullptr},
      {"dpmpp_2m", "DPMSolverMultistepScheduler",
       [](json& j) {
         j["algorithm_type"] = "dpmsolver++";
         j["solver_order"] = 2;
       }},
      {"dpmpp_2m_karras", "DPMSolverMultistepScheduler",
       [](json& j) {
         j["algorithm_type"] = "dpmsolver++";
         j["solver_order"] = 2;
         j["use_karras_sigmas"] = true;
       }},
      {"ddim_inverse", "DDIMInverseScheduler", nullptr},
  };
  return names;
}

}  // namespace

SchedulerConfig SchedulerConfig::for_class(const std::string& class_name, const nlohmann::json& config) {
  const ClassSpec& spec = find_class(class_name);
  DMX_CHECK_ARG(config.is_object() || config.is_null(), "scheduler config for ", class_name,
                " must be a JSON object, got ", config.dump());
  SchedulerConfig c;
  spec.defaults(c);
  if (config.is_object()) {
    const auto& setters = field_setters();
    for (const auto& [key, value] : config.items()) {
      if (value.is_null()) continue;  // None: the class default stays
      if (!contains(kBetaParams, key) && !contains(spec.params, key)) continue;
      setters.at(key)(c, key, value);
    }
  }
  if (class_name == "DPMSolverMultistepScheduler") {  // deprecated names diffusers maps on load
    if (c.algorithm_type == "deis") c.algorithm_type = "dpmsolver++";
    if (c.solver_type == "logrho" || c.solver_type == "bh1" || c.solver_type == "bh2") c.solver_type = "midpoint";
  }
  validate(c, spec);
  return c;
}

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

nlohmann::json parse_scheduler_config(const std::string& text) {
  std::string out;
  out.reserve(text.size() + 16);
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      out += ch;
      if (ch == '\\' && i + 1 < text.size())
        out += text[++i];
      else if (ch == '"')
        in_string = false;
      continue;
    }
    if (ch == '"') {
      in_string = true;
      out += ch;
      continue;
    }
    bool replaced = false;
    for (const char* token : {"-Infinity", "Infinity", "NaN"}) {
      const size_t len = std::char_traits<char>::length(token);
      if (text.compare(i, len, token) == 0) {
        out += '"';
        out += token;
        out += '"';
        i += len - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += ch;
  }
  try {
    return nlohmann::json::parse(out);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(std::string("malformed scheduler config JSON: ") + e.what());
  }
}

std::unique_ptr<Scheduler> create_scheduler(const std::string& name, const nlohmann::json& base_config) {
  json cfg = base_config.is_object() ? base_config : json::object();
  for (const auto& s : short_names()) {
    if (name != s.name) continue;
    if (s.overrides) s.overrides(cfg);
    return find_class(s.class_name).make(SchedulerConfig::for_class(s.class_name, cfg));
  }
  for (const auto& spec : class_specs())
    if (name == spec.name) return spec.make(SchedulerConfig::for_class(spec.name, cfg));
  throw InvalidArgument("unknown scheduler '" + name + "'; valid names: " + join(scheduler_names()) +
                        " (or a diffusers class: " + join(class_names()) + ")");
}

std::vector<std::string> scheduler_names() {
  std::vector<std::string> out;
  for (const auto& s : short_names()) out.push_back(s.name);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Shared helpers.

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

// ---------------------------------------------------------------------------------------------------
// Family bases.

void SchedulerBase::check_num_inference_steps(int n) const {
  DMX_CHECK_ARG(n > 0 && n <= config_.num_train_timesteps, "num_inference_steps must be in [1, ",
                config_.num_train_timesteps, "] (num_train_timesteps) for ", class_name(), ", got ", n);
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

at::Tensor AlphaScheduler::add_noise(const at::Tensor& original, const at::Tensor& noise, int step_index) const {
  check_step_index(step_index, "add_noise()");
  const float a = alpha_prod(static_cast<int64_t>(timesteps_[step_index]));
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
