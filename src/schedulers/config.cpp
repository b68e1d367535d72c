// Scheduler configuration: diffusers' ConfigMixin.from_config for each class (the class's own __init__ fields
// and defaults come from its SchedulerClass, in its own file), the common validation, and the tolerant reader
// of scheduler_config.json. Mirrors diffusers 0.27.2 (src/diffusers/schedulers).
#include "schedulers/scheduler.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>

#include "core/text.h"
#include "dmx/error.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {

namespace detail {

const std::vector<std::string> kBetaSchedules = {"linear", "scaled_linear", "squaredcos_cap_v2"};
const std::vector<std::string> kPredictionTypes = {"epsilon", "sample", "v_prediction"};
const std::vector<std::string> kSpacings = {"linspace", "leading", "trailing"};

bool contains(const std::vector<std::string>& items, const std::string& s) {
  return std::find(items.begin(), items.end(), s) != items.end();
}

void check_one_of(const std::string& field, const std::string& value, const std::vector<std::string>& allowed,
                  const std::string& class_name) {
  if (!contains(allowed, value))
    throw InvalidArgument("scheduler config field '" + field + "' must be one of " + join(allowed, ", ") + " for " +
                          class_name + ", got '" + value + "'");
}

// Fields a class does not have keep neutral values, so config() never claims e.g. clipping for Euler.
SchedulerConfig neutral_config() {
  SchedulerConfig c;
  c.clip_sample = false;
  c.set_alpha_to_one = false;
  c.variance_type = "";
  return c;
}

}  // namespace detail

namespace {

using json = nlohmann::json;
using detail::check_one_of;
using detail::contains;

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
      {"original_inference_steps", [](auto& c, auto& k, auto& v) { c.original_inference_steps = read_int(k, v); }},
      {"timestep_scaling", [](auto& c, auto& k, auto& v) { c.timestep_scaling = read_double(k, v); }},
  };
  return setters;
}

const std::vector<std::string> kBetaParams = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                              "trained_betas"};

void validate(const SchedulerConfig& c, const SchedulerClass& spec) {
  const auto has = [&](const char* p) { return contains(spec.params, p); };
  const std::string& cls = spec.name;
  // Bounded (docs/limits.md): the beta, alpha and sigma tables hold num_train_timesteps values each.
  DMX_CHECK_ARG(c.num_train_timesteps > 0 && c.num_train_timesteps <= 100000,
                "scheduler config field 'num_train_timesteps' must be in [1, 100000], got ", c.num_train_timesteps);
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
  if (spec.validate) spec.validate(c);
}

}  // namespace

SchedulerConfig SchedulerConfig::for_class(const std::string& class_name, const nlohmann::json& config) {
  const SchedulerClass& spec = find_scheduler_class(class_name);
  DMX_CHECK_ARG(config.is_object() || config.is_null(), "scheduler config for ", class_name,
                " must be a JSON object, got ", config.dump());
  SchedulerConfig c = detail::neutral_config();
  if (spec.defaults) spec.defaults(c);
  if (config.is_object()) {
    const auto& setters = field_setters();
    for (const auto& [key, value] : config.items()) {
      if (value.is_null()) continue;  // None: the class default stays
      if (!contains(kBetaParams, key) && !contains(spec.params, key)) continue;
      setters.at(key)(c, key, value);
    }
  }
  if (spec.normalize) spec.normalize(c);  // deprecated values diffusers maps on load
  validate(c, spec);
  return c;
}

nlohmann::json SchedulerConfig::to_json() const {
  json j = {{"num_train_timesteps", num_train_timesteps},
            {"beta_start", beta_start},
            {"beta_end", beta_end},
            {"beta_schedule", beta_schedule},
            {"trained_betas", trained_betas.empty() ? json(nullptr) : json(trained_betas)},
            {"prediction_type", prediction_type},
            {"timestep_spacing", timestep_spacing},
            {"steps_offset", steps_offset},
            {"set_alpha_to_one", set_alpha_to_one},
            {"clip_sample", clip_sample},
            {"clip_sample_range", clip_sample_range},
            {"thresholding", thresholding},
            {"dynamic_thresholding_ratio", dynamic_thresholding_ratio},
            {"sample_max_value", sample_max_value},
            {"rescale_betas_zero_snr", rescale_betas_zero_snr},
            {"variance_type", variance_type},
            {"skip_prk_steps", skip_prk_steps},
            {"use_karras_sigmas", use_karras_sigmas},
            {"interpolation_type", interpolation_type},
            {"timestep_type", timestep_type},
            {"sigma_min", sigma_min ? json(*sigma_min) : json(nullptr)},
            {"sigma_max", sigma_max ? json(*sigma_max) : json(nullptr)},
            {"solver_order", solver_order},
            {"algorithm_type", algorithm_type},
            {"solver_type", solver_type},
            {"lower_order_final", lower_order_final},
            {"euler_at_final", euler_at_final},
            {"final_sigmas_type", final_sigmas_type},
            {"use_lu_lambdas", use_lu_lambdas},
            {"lambda_min_clipped", lambda_min_clipped},
            {"original_inference_steps", original_inference_steps},
            {"timestep_scaling", timestep_scaling}};
  return j;
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

}  // namespace dmx::schedulers
