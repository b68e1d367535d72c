// Scheduler tests: step-by-step golden comparison with diffusers 0.27.2 (ref/<variant>/schedulers.*),
// config parsing and validation (from_config semantics), the factory, runtime errors, and
// hand-computed v-prediction steps, and the registry (every row round-trips; the README's table is the
// registry). Suites: SchedulerCaseGolden, SchedulerCoverageGolden, SchedulerPipelinesGolden (fixtures);
// SchedulerConfigUnit, SchedulerFactoryUnit, SchedulerRegistryUnit, SchedulerStepUnit. Golden cases are
// SchedulerGolden/SchedulerCaseGolden.*/<variant>_<case>.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>

#include "core/fs.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "schedulers/registry.h"
#include "schedulers/scheduler.h"
#include "schedulers/scheduler_impl.h"
#include "test_util.h"
#include "tiny_models.h"

namespace S = dmx::schedulers;
using json = nlohmann::json;

namespace {

constexpr double kTol = 1e-5;

// Stable Diffusion v1's scheduler_config.json (the fixtures' models/*/scheduler/scheduler_config.json).
const json& sd_scheduler_config() {
  static const json cfg = json::parse(R"({
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.27.2", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": false,
    "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null})");
  return cfg;
}

// A model's config as a row's class accepts it: a class with one beta schedule (UnCLIPScheduler: the cosine
// one; diffusers raises for any other) gets that schedule, every other field stays the model's.
json config_for_row(const std::string& name, json cfg) {
  const S::SchedulerEntry* row = S::find_scheduler(name);
  const auto& schedules = row ? row->cls().beta_schedules : std::vector<std::string>{};
  if (schedules.size() == 1 && cfg.value("beta_schedule", std::string()) != schedules[0])
    cfg["beta_schedule"] = schedules[0];
  return cfg;
}

template <typename E>
void expect_throws(const std::function<void()>& fn, const std::vector<std::string>& substrings,
                   const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << what << ": expected an exception";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& s : substrings)
      EXPECT_NE(msg.find(s), std::string::npos) << what << ": '" << s << "' not in: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": wrong exception type: " << e.what();
  }
}

// diffusers' dummy model for scheduler tests: sample * t / (t + 1).
at::Tensor dummy_model(const at::Tensor& sample, double t) { return sample * t / (t + 1); }

bool all_finite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

// ---------------------------------------------------------------------------------------------------
// Golden: every scheduler case of ref/<variant>/schedulers, step by step.

struct SchedulerRef {
  json meta;
  dmx::io::TensorMap tensors;
  const at::Tensor& operator[](const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw dmx::FormatError("scheduler reference has no tensor '" + name + "'");
    return it->second;
  }
  bool has(const std::string& name) const { return tensors.count(name) != 0; }
};

// The case JSON holds Python's -Infinity (DPM-Solver's lambda_min_clipped), hence parse_scheduler_config.
const SchedulerRef& load_scheduler_ref(const std::string& variant) {
  static std::map<std::string, SchedulerRef> cache;
  auto it = cache.find(variant);
  if (it != cache.end()) return it->second;
  const std::string base = dmx::test::fixtures_dir() + "/ref/" + variant + "/schedulers";
  SchedulerRef ref;
  ref.meta = S::parse_scheduler_config(
      dmx::read_text_file(base + ".json", "scheduler reference metadata", dmx::kMaxJsonFileBytes));
  ref.tensors = dmx::io::load_safetensors(base + ".safetensors");
  return cache.emplace(variant, std::move(ref)).first->second;
}

const std::vector<std::string> kGoldenCases = {"ddpm",         "ddim",          "ddim_eta0.5",  "pndm", "euler",
                                               "euler_a",      "dpm2m",         "dpm2m_karras", "lms",  "heun",
                                               "ddim_inverse", "ddim_trailing", "euler_leading"};

std::map<std::string, double>& worst_errors() {
  static std::map<std::string, double> w;
  return w;
}

using GoldenParam = std::tuple<std::string, std::string>;  // variant, case

class SchedulerCaseGolden : public ::testing::TestWithParam<GoldenParam> {};

TEST_P(SchedulerCaseGolden, MatchesDiffusersStepByStep) {
  DMX_REQUIRE_FIXTURES();
  const auto& [variant, name] = GetParam();
  const SchedulerRef& ref = load_scheduler_ref(variant);
  const json& m = ref.meta;
  ASSERT_TRUE(m.contains(name + ".class")) << "reference lacks case " << name;
  const std::string cls = m[name + ".class"];
  const std::string tag = variant + "/" + name;
  double worst = 0;
  const auto check = [&](const std::string& what, const at::Tensor& actual, const at::Tensor& expected) {
    const double rel = dmx::test::check_close(tag + " " + what, actual, expected, kTol);
    EXPECT_LE(rel, kTol) << tag << " " << what;
    worst = std::max(worst, rel);
  };

  // Built as diffusers' Class.from_config(case config) does.
  auto sched = S::create_scheduler(cls, m[name + ".config"]);
  ASSERT_EQ(sched->class_name(), cls);
  sched->set_timesteps(m["N"].get<int>());

  const std::vector<double> expected_ts = m[name + ".timesteps"].get<std::vector<double>>();
  EXPECT_EQ(sched->timesteps(), expected_ts) << tag << " timesteps";
  const at::Tensor ts_ref = ref[name + ".timesteps"].to(at::kDouble);
  ASSERT_EQ(ts_ref.numel(), static_cast<int64_t>(sched->timesteps().size()));
  for (int64_t i = 0; i < ts_ref.numel(); ++i) EXPECT_EQ(sched->timesteps()[i], ts_ref[i].item<double>());
  EXPECT_EQ(static_cast<float>(sched->init_noise_sigma()), m[name + ".init_noise_sigma"].get<float>())
      << tag << " init_noise_sigma";
  if (ref.has(name + ".sigmas")) {
    const auto* sigma_sched = dynamic_cast<const S::SigmaScheduler*>(sched.get());
    ASSERT_NE(sigma_sched, nullptr);
    check("sigmas", S::detail::float_tensor(sigma_sched->sigmas()), ref[name + ".sigmas"]);
  }

  at::Tensor x = name == "ddim_inverse" ? ref["add_noise.x0"].clone() : ref["x_T"] * sched->init_noise_sigma();
  // ddpm and euler_a draw from a generator seeded 400 + i at step i (the fixture's notes). Euler draws too
  // but never uses the draw; the fixture took it from torch's global stream (seeded 0, continuing across
  // the Euler cases in order), so Euler runs on that stream here and the checks below verify that it
  // takes exactly diffusers' draws, one per step.
  const auto draws_of = [&](const std::string& c) { return m[c + ".rng_shapes"].size(); };
  const auto is_per_step_seed = [](const std::string& c) { return c == "ddpm" || c == "euler_a"; };
  const size_t n_draws = draws_of(name);
  const bool per_step_seed = n_draws > 0 && is_per_step_seed(name);
  const bool shared_stream = n_draws > 0 && !per_step_seed;
  size_t stream_offset = 0;
  for (const auto& c : kGoldenCases) {
    if (c == name) break;
    if (!is_per_step_seed(c)) stream_offset += draws_of(c);
  }
  const auto global_stream = [&]() {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(0);
    for (size_t k = 0; k < stream_offset; ++k) S::detail::randn_like(ref["x_T"], &g);
    return g;
  };
  at::Generator shared = global_stream();
  const int n_steps = m[name + ".n_steps_run"].get<int>();
  for (int i = 0; i < n_steps; ++i) {
    const std::string p = name + "." + std::to_string(i) + ".";
    check(p + "model_input", sched->scale_model_input(x, i), ref[p + "model_input"]);
    S::StepArgs args;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(400 + i);
    if (per_step_seed) args.generator = &gen;
    if (shared_stream) args.generator = &shared;
    if (name == "ddim_eta0.5") {
      args.eta = 0.5;
      args.variance_noise = ref[p + "variance_noise"];
    }
    const S::StepOutput out = sched->step(ref["eps." + std::to_string(i)], i, x, args);
    check(p + "prev_sample", out.prev_sample, ref[p + "prev_sample"]);
    if (ref.has(p + "pred_original_sample"))
      check(p + "pred_original_sample", out.pred_original_sample, ref[p + "pred_original_sample"]);
    x = out.prev_sample;
  }

  // The generator stream: our draws are diffusers' randn_tensor draws, one per step.
  if (per_step_seed) {
    for (size_t k = 0; k < n_draws; ++k) {
      const std::string key = name + ".rng." + std::to_string(k);
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(400 + static_cast<int>(k));
      EXPECT_TRUE(at::equal(S::detail::randn_like(ref[key], &gen), ref[key])) << tag << " " << key;
    }
  } else if (shared_stream) {
    at::Generator replay = global_stream();
    for (size_t k = 0; k < n_draws; ++k) {
      const std::string key = name + ".rng." + std::to_string(k);
      EXPECT_TRUE(at::equal(S::detail::randn_like(ref[key], &replay), ref[key])) << tag << " " << key;
    }
    EXPECT_TRUE(at::equal(S::detail::randn_like(x, &replay), S::detail::randn_like(x, &shared)))
        << tag << ": Euler must take exactly one draw per step";
  }

  if (ref.has(name + ".add_noise")) {
    const double t = m[name + ".add_noise_t"].get<double>();
    const auto& ts = sched->timesteps();
    const auto pos = std::find(ts.begin(), ts.end(), t);
    ASSERT_NE(pos, ts.end()) << tag << " add_noise_t " << t << " not in timesteps";
    const int idx = static_cast<int>(pos - ts.begin());
    check("add_noise", sched->add_noise(ref["add_noise.x0"], ref["add_noise.noise"], idx), ref[name + ".add_noise"]);
  }
  worst_errors()[tag] = worst;
  std::printf("[worst] %-28s %-32s rel=%.3e\n", tag.c_str(), cls.c_str(), worst);
}

std::string golden_name(const ::testing::TestParamInfo<GoldenParam>& info) {
  std::string s = std::get<0>(info.param) + "_" + std::get<1>(info.param);
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(SchedulerGolden, SchedulerCaseGolden,
                         ::testing::Combine(::testing::Values("sd15", "test"), ::testing::ValuesIn(kGoldenCases)),
                         golden_name);

TEST(SchedulerCoverageGolden, EveryReferenceCaseIsTested) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string variant : {"sd15", "test"}) {
    const SchedulerRef& ref = load_scheduler_ref(variant);
    std::set<std::string> cases;
    for (const auto& [key, value] : ref.meta.items()) {
      const std::string suffix = ".class";
      if (key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0)
        cases.insert(key.substr(0, key.size() - suffix.size()));
    }
    EXPECT_EQ(cases, std::set<std::string>(kGoldenCases.begin(), kGoldenCases.end())) << variant;
  }
}

// The pipeline cases record the scheduler each run used: the short names built from the model's
// scheduler_config.json give the same class, config and timesteps.
TEST(SchedulerPipelinesGolden, ShortNamesMatchPipelineCases) {
  DMX_REQUIRE_FIXTURES();
  const std::map<std::string, std::string> cases = {{"txt2img_ddim", "ddim"},       {"txt2img_ddim_eta", "ddim"},
                                                    {"txt2img_dpm2m", "dpmpp_2m"},  {"txt2img_euler", "euler"},
                                                    {"txt2img_euler_a", "euler_a"}, {"txt2img_lms", "lms"},
                                                    {"txt2img_pndm", "pndm"},       {"img2img", "ddim"}};
  for (const std::string variant : {"sd15", "test"}) {
    const json model_cfg = S::parse_scheduler_config(
        dmx::read_text_file(dmx::test::fixture_model(variant) + "/scheduler/scheduler_config.json", "scheduler config",
                            dmx::kMaxJsonFileBytes));
    for (const auto& [case_name, short_name] : cases) {
      SCOPED_TRACE(variant + "/" + case_name);
      const json meta = S::parse_scheduler_config(
          dmx::read_text_file(dmx::test::fixtures_dir() + "/ref/" + variant + "/" + case_name + ".json",
                              "case metadata", dmx::kMaxJsonFileBytes));
      const json& rec = meta["scheduler"];
      const json recorded = rec.is_string() ? S::parse_scheduler_config(rec.get<std::string>()) : rec;
      auto ours = S::create_scheduler(short_name, model_cfg);
      if (meta.contains("scheduler_class")) {
        EXPECT_EQ(ours->class_name(), meta["scheduler_class"].get<std::string>());
      }
      auto theirs = S::create_scheduler(ours->class_name(), recorded);
      const int steps = meta["steps"].get<int>();
      ours->set_timesteps(steps);
      theirs->set_timesteps(steps);
      EXPECT_EQ(ours->timesteps(), theirs->timesteps());
      std::vector<double> expected = ours->timesteps();
      if (meta.contains("strength")) {  // img2img: the last int(steps * strength) steps
        const int init_timestep = std::min(static_cast<int>(steps * meta["strength"].get<double>()), steps);
        expected.erase(expected.begin(), expected.begin() + (steps - init_timestep) * ours->order());
      }
      EXPECT_EQ(expected, meta["timesteps"].get<std::vector<double>>());
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Config: from_config semantics and validation.

TEST(SchedulerConfigUnit, ClassDefaultsThenJsonFields) {
  const auto ddim_default = S::SchedulerConfig::for_class("DDIMScheduler", json::object());
  EXPECT_TRUE(ddim_default.clip_sample);
  EXPECT_TRUE(ddim_default.set_alpha_to_one);
  EXPECT_EQ(ddim_default.timestep_spacing, "leading");
  EXPECT_EQ(ddim_default.beta_schedule, "linear");
  EXPECT_DOUBLE_EQ(ddim_default.beta_start, 0.0001);

  const auto ddim = S::SchedulerConfig::for_class("DDIMScheduler", sd_scheduler_config());
  EXPECT_FALSE(ddim.clip_sample);
  EXPECT_FALSE(ddim.set_alpha_to_one);
  EXPECT_EQ(ddim.steps_offset, 1);
  EXPECT_EQ(ddim.beta_schedule, "scaled_linear");
  EXPECT_DOUBLE_EQ(ddim.beta_end, 0.012);

  EXPECT_FALSE(S::SchedulerConfig::for_class("PNDMScheduler", json::object()).skip_prk_steps);
  EXPECT_FALSE(S::SchedulerConfig::for_class("PNDMScheduler", json::object()).set_alpha_to_one);
  EXPECT_TRUE(S::SchedulerConfig::for_class("PNDMScheduler", sd_scheduler_config()).skip_prk_steps);
  EXPECT_EQ(S::SchedulerConfig::for_class("EulerDiscreteScheduler", json::object()).timestep_spacing, "linspace");
  EXPECT_EQ(S::SchedulerConfig::for_class("EulerDiscreteScheduler", sd_scheduler_config()).timestep_spacing, "leading");
  // Euler has no clip_sample: the json's value is ignored, the class never clips.
  json clip = {{"clip_sample", true}};
  EXPECT_FALSE(S::SchedulerConfig::for_class("EulerDiscreteScheduler", clip).clip_sample);
  const auto heun = S::SchedulerConfig::for_class("HeunDiscreteScheduler", json::object());
  EXPECT_DOUBLE_EQ(heun.beta_start, 0.00085);
  EXPECT_DOUBLE_EQ(heun.beta_end, 0.012);
  EXPECT_FALSE(heun.clip_sample);
  const auto dpm = S::SchedulerConfig::for_class("DPMSolverMultistepScheduler", json::object());
  EXPECT_EQ(dpm.variance_type, "");
  EXPECT_EQ(dpm.algorithm_type, "dpmsolver++");
  EXPECT_EQ(dpm.solver_order, 2);
  EXPECT_TRUE(std::isinf(dpm.lambda_min_clipped) && dpm.lambda_min_clipped < 0);

  // null keeps the default, unknown fields are ignored, deprecated names map as diffusers does.
  json j = {{"steps_offset", nullptr},
            {"not_a_field", 3},
            {"algorithm_type", "deis"},
            {"solver_type", "bh2"},
            {"sigma_min", nullptr}};
  const auto mapped = S::SchedulerConfig::for_class("DPMSolverMultistepScheduler", j);
  EXPECT_EQ(mapped.steps_offset, 0);
  EXPECT_EQ(mapped.algorithm_type, "dpmsolver++");
  EXPECT_EQ(mapped.solver_type, "midpoint");
  const auto euler = S::SchedulerConfig::for_class("EulerDiscreteScheduler", {{"sigma_min", 0.1}, {"sigma_max", 10}});
  ASSERT_TRUE(euler.sigma_min && euler.sigma_max);
  EXPECT_DOUBLE_EQ(*euler.sigma_min, 0.1);
  EXPECT_DOUBLE_EQ(*euler.sigma_max, 10.0);
}

TEST(SchedulerConfigUnit, PythonJsonLiterals) {
  const json j = S::parse_scheduler_config(
      R"({"lambda_min_clipped": -Infinity, "note": "NaN and -Infinity stay text", "sample_max_value": 1.5})");
  EXPECT_EQ(j["note"], "NaN and -Infinity stay text");
  const auto c = S::SchedulerConfig::for_class("DPMSolverMultistepScheduler", j);
  EXPECT_TRUE(std::isinf(c.lambda_min_clipped) && c.lambda_min_clipped < 0);
  EXPECT_DOUBLE_EQ(c.sample_max_value, 1.5);
  expect_throws<dmx::FormatError>([] { S::parse_scheduler_config("{\"a\": }"); }, {"malformed"}, "bad json");
}

TEST(SchedulerConfigUnit, RejectsBadValues) {
  struct Case {
    std::string cls;
    json fields;
    std::vector<std::string> substrings;
  };
  const std::vector<Case> cases = {
      {"DDIMScheduler", {{"beta_schedule", "cubic"}}, {"beta_schedule", "cubic", "scaled_linear"}},
      {"DDIMScheduler", {{"prediction_type", "noise"}}, {"prediction_type", "noise", "v_prediction"}},
      {"EulerDiscreteScheduler", {{"timestep_spacing", "random"}}, {"timestep_spacing", "random"}},
      {"DDIMInverseScheduler", {{"timestep_spacing", "linspace"}}, {"timestep_spacing", "linspace", "trailing"}},
      {"DDPMScheduler", {{"num_train_timesteps", 0}}, {"num_train_timesteps", "must be in [1, 100000]", "0"}},
      {"DDPMScheduler", {{"num_train_timesteps", 2000000000}}, {"num_train_timesteps", "must be in [1, 100000]"}},
      {"DDPMScheduler", {{"beta_start", "abc"}}, {"beta_start", "number", "abc"}},
      {"DDPMScheduler", {{"beta_end", 1.5}}, {"beta_end", "[0, 1)", "1.5"}},
      {"DDPMScheduler", {{"variance_type", "huge"}}, {"variance_type", "huge"}},
      {"DDPMScheduler", {{"steps_offset", -1}}, {"steps_offset", "-1"}},
      {"DDIMScheduler", {{"clip_sample", "yes"}}, {"clip_sample", "true or false", "yes"}},
      {"DDIMScheduler", {{"trained_betas", {0.1, 0.2}}}, {"trained_betas", "1000", "2"}},
      {"DDIMScheduler", {{"num_train_timesteps", 1.5}}, {"num_train_timesteps", "integer", "1.5"}},
      {"PNDMScheduler", {{"prediction_type", "sample"}}, {"prediction_type", "sample", "PNDMScheduler"}},
      {"DPMSolverMultistepScheduler", {{"solver_order", 4}}, {"solver_order", "4"}},
      {"DPMSolverMultistepScheduler", {{"algorithm_type", "unipc"}}, {"algorithm_type", "unipc"}},
      {"DPMSolverMultistepScheduler", {{"algorithm_type", "dpmsolver"}}, {"final_sigmas_type", "zero", "sigma_min"}},
      {"DPMSolverMultistepScheduler", {{"final_sigmas_type", "one"}}, {"final_sigmas_type", "one"}},
      {"EulerDiscreteScheduler", {{"interpolation_type", "cubic"}}, {"interpolation_type", "cubic"}},
      {"EulerDiscreteScheduler", {{"sigma_min", -1}}, {"sigma_min", "-1"}},
      {"HeunDiscreteScheduler", {{"beta_schedule", "sigmoid"}}, {"beta_schedule", "sigmoid", "exp"}},
  };
  for (const auto& c : cases)
    expect_throws<dmx::InvalidArgument>([&] { S::SchedulerConfig::for_class(c.cls, c.fields); }, c.substrings,
                                        c.cls + " " + c.fields.dump());
  expect_throws<dmx::InvalidArgument>([] { S::SchedulerConfig::for_class("FooScheduler", json::object()); },
                                      {"FooScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"},
                                      "unknown class");
  expect_throws<dmx::Unsupported>(
      [] {
        S::SchedulerConfig::for_class("EulerAncestralDiscreteScheduler", {{"prediction_type", "sample"}});
      },
      {"EulerAncestralDiscreteScheduler", "sample"}, "euler_a sample");
  // What diffusers accepts per class: DDPM's sigmoid, Heun's exp.
  EXPECT_NO_THROW(S::SchedulerConfig::for_class("DDPMScheduler", {{"beta_schedule", "sigmoid"}}));
  EXPECT_NO_THROW(S::SchedulerConfig::for_class("HeunDiscreteScheduler", {{"beta_schedule", "exp"}}));
}

TEST(SchedulerConfigUnit, BetaSchedules) {
  S::SchedulerConfig c;
  c.beta_schedule = "linear";
  at::Tensor b = S::make_betas(c);
  ASSERT_EQ(b.numel(), 1000);
  EXPECT_EQ(b.scalar_type(), at::kFloat);
  EXPECT_FLOAT_EQ(b[0].item<float>(), 0.0001f);
  EXPECT_FLOAT_EQ(b[-1].item<float>(), 0.02f);

  c.beta_schedule = "scaled_linear";
  c.beta_start = 0.00085;
  c.beta_end = 0.012;
  b = S::make_betas(c);
  EXPECT_NEAR(b[0].item<float>(), 0.00085f, 1e-9);
  EXPECT_NEAR(b[-1].item<float>(), 0.012f, 1e-8);
  EXPECT_NEAR(b[500].item<double>(),
              std::pow(std::sqrt(0.00085) + 500.0 / 999 * (std::sqrt(0.012) - std::sqrt(0.00085)), 2), 1e-8);

  c.beta_schedule = "squaredcos_cap_v2";
  b = S::make_betas(c);
  EXPECT_FLOAT_EQ(b[-1].item<float>(), 0.999f);  // capped at max_beta
  const double ab1 = std::pow(std::cos((1.0 / 1000 + 0.008) / 1.008 * M_PI / 2), 2);
  const double ab0 = std::pow(std::cos(0.008 / 1.008 * M_PI / 2), 2);
  EXPECT_FLOAT_EQ(b[0].item<float>(), static_cast<float>(1 - ab1 / ab0));

  c.beta_schedule = "scaled_linear";
  c.rescale_betas_zero_snr = true;
  const at::Tensor ac = S::detail::alphas_cumprod_of(S::make_betas(c));
  EXPECT_NEAR(ac[-1].item<float>(), 0.0f, 1e-7);  // zero terminal SNR
  c.rescale_betas_zero_snr = false;
  EXPECT_NEAR(ac[0].item<float>(), S::detail::alphas_cumprod_of(S::make_betas(c))[0].item<float>(), 1e-6);

  c.trained_betas = std::vector<double>(1000, 0.01);
  b = S::make_betas(c);
  EXPECT_FLOAT_EQ(b[123].item<float>(), 0.01f);
}

// ---------------------------------------------------------------------------------------------------
// Factory.

TEST(SchedulerFactoryUnit, Names) {
  EXPECT_EQ(S::scheduler_names(),
            (std::vector<std::string>{"ddim", "ddpm", "pndm", "euler", "euler_a", "heun", "lms", "dpmpp_2m",
                                      "dpmpp_2m_karras", "lcm", "ddim_inverse", "unclip"}));
  expect_throws<dmx::InvalidArgument>(
      [] { S::create_scheduler("dpm_fast", sd_scheduler_config()); },
      {"unknown scheduler", "dpm_fast", "ddim", "euler_a", "dpmpp_2m_karras", "DPMSolverMultistepScheduler"},
      "unknown name");
  const std::map<std::string, std::string> classes = {{"ddim", "DDIMScheduler"},
                                                      {"ddpm", "DDPMScheduler"},
                                                      {"pndm", "PNDMScheduler"},
                                                      {"euler", "EulerDiscreteScheduler"},
                                                      {"euler_a", "EulerAncestralDiscreteScheduler"},
                                                      {"heun", "HeunDiscreteScheduler"},
                                                      {"lms", "LMSDiscreteScheduler"},
                                                      {"dpmpp_2m", "DPMSolverMultistepScheduler"},
                                                      {"dpmpp_2m_karras", "DPMSolverMultistepScheduler"},
                                                      {"lcm", "LCMScheduler"},
                                                      {"ddim_inverse", "DDIMInverseScheduler"}};
  for (const auto& [name, cls] : classes) {
    EXPECT_EQ(S::create_scheduler(name, sd_scheduler_config())->class_name(), cls) << name;
    EXPECT_EQ(S::create_scheduler(cls, sd_scheduler_config())->class_name(), cls) << cls;
  }
  json dpm3 = sd_scheduler_config();
  dpm3["solver_order"] = 3;
  dpm3["algorithm_type"] = "sde-dpmsolver++";
  const auto k = S::create_scheduler("dpmpp_2m_karras", dpm3);
  EXPECT_EQ(k->config().solver_order, 2);
  EXPECT_EQ(k->config().algorithm_type, "dpmsolver++");
  EXPECT_TRUE(k->config().use_karras_sigmas);
  EXPECT_FALSE(S::create_scheduler("dpmpp_2m", dpm3)->config().use_karras_sigmas);
}

// ---------------------------------------------------------------------------------------------------
// Registry: every row goes name -> scheduler -> class name -> A1111 label -> name, through the factory, the
// PNG metadata (format_parameters / parse_parameters, what --from reads) and the name of a model's own
// scheduler config.

TEST(SchedulerRegistryUnit, EveryRowRoundTrips) {
  std::set<std::string> names, labels;
  for (const auto& row : S::scheduler_registry()) {
    SCOPED_TRACE(row.name);
    EXPECT_TRUE(names.insert(row.name).second) << "duplicate name";
    EXPECT_TRUE(row.overrides.is_object());
    const auto sched = S::create_scheduler(row.name, config_for_row(row.name, sd_scheduler_config()));
    EXPECT_EQ(sched->class_name(), row.class_name());
    for (const auto& [key, value] : row.overrides.items()) EXPECT_EQ(sched->config().to_json().at(key), value) << key;
    // A model whose own config is what the row produces is named by the row (the metadata of its images).
    json own = config_for_row(row.name, sd_scheduler_config());
    own["_class_name"] = row.class_name();
    for (const auto& [key, value] : row.overrides.items()) own[key] = value;
    EXPECT_EQ(S::scheduler_name_for_config(own), row.name);
    if (row.a1111_label.empty()) {  // not a sampler: generation does not offer it; the README says what it is for
      EXPECT_FALSE(row.use.empty());
      EXPECT_EQ(S::sampler_for_label(row.name), "");
      const std::vector<std::string> offered = dmx::scheduler_names();
      EXPECT_EQ(std::count(offered.begin(), offered.end(), row.name), 0);
      continue;
    }
    EXPECT_TRUE(labels.insert(row.a1111_label).second) << "duplicate label " << row.a1111_label;
    EXPECT_EQ(S::sampler_label(row.name), row.a1111_label);
    EXPECT_EQ(S::sampler_for_label(row.a1111_label), row.name);
    EXPECT_EQ(S::sampler_for_label(row.name), row.name);
    dmx::GenerateOptions o;
    o.prompt = "a lighthouse";
    o.scheduler = row.name;
    const std::string text = dmx::format_parameters(o, 7, 64, 64, "model", "");
    EXPECT_NE(text.find("Sampler: " + row.a1111_label + ","), std::string::npos) << text;
    EXPECT_EQ(dmx::parse_parameters(text).scheduler, row.name) << text;
  }
  EXPECT_EQ(S::scheduler_names().size(), S::scheduler_registry().size());
  // A config no row reproduces keeps its class name; one that no class accepts too.
  json dpm3 = sd_scheduler_config();
  dpm3["_class_name"] = "DPMSolverMultistepScheduler";
  dpm3["solver_order"] = 3;
  EXPECT_EQ(S::scheduler_name_for_config(dpm3), "DPMSolverMultistepScheduler");
  json unknown = sd_scheduler_config();
  unknown["_class_name"] = "UniPCMultistepScheduler";
  EXPECT_EQ(S::scheduler_name_for_config(unknown), "UniPCMultistepScheduler");
  EXPECT_EQ(S::sampler_for_label("DPM++ SDE Karras"), "");
}

// The README's scheduler table and the --scheduler choices of its synopsis are the registry.
TEST(SchedulerRegistryUnit, ReadmeTableIsTheRegistry) {
  const std::string readme =
      dmx::read_text_file(std::string(DMX_SOURCE_DIR) + "/README.md", "README", dmx::kMaxTextFileBytes);
  const size_t begin = readme.find("<!-- schedulers:begin");
  const size_t end = readme.find("<!-- schedulers:end -->");
  ASSERT_NE(begin, std::string::npos) << "README.md has no <!-- schedulers:begin ... --> marker";
  ASSERT_NE(end, std::string::npos) << "README.md has no <!-- schedulers:end --> marker";
  const size_t first = readme.find('\n', begin) + 1;
  EXPECT_EQ(readme.substr(first, end - first), S::scheduler_table_markdown())
      << "README.md's scheduler table differs from the registry; paste this between the markers:\n"
      << S::scheduler_table_markdown();
  std::string choices;
  for (const auto& n : dmx::scheduler_names()) choices += (choices.empty() ? "" : "|") + n;
  EXPECT_NE(readme.find("[--scheduler " + choices + "]"), std::string::npos)
      << "README.md's generate synopsis should read [--scheduler " << choices << "]";
}

// Every short name from a model's scheduler_config.json runs 3 steps of the dummy model.
void run_dummy_steps(const json& base_config, const std::string& source) {
  for (const auto& name : S::scheduler_names()) {
    SCOPED_TRACE(name + " from " + source);
    auto sched = S::create_scheduler(name, config_for_row(name, base_config));
    sched->set_timesteps(10);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
    at::Tensor x = at::randn({1, 4, 8, 8}, gen, at::TensorOptions().dtype(at::kFloat)) * sched->init_noise_sigma();
    for (int i = 0; i < 3; ++i) {
      const at::Tensor model_input = sched->scale_model_input(x, i);
      const at::Tensor model_output = dummy_model(model_input, sched->timesteps()[i]);
      S::StepArgs args;
      args.generator = &gen;
      const S::StepOutput out = sched->step(model_output, i, x, args);
      ASSERT_TRUE(out.prev_sample.defined());
      EXPECT_EQ(out.prev_sample.sizes(), x.sizes());
      EXPECT_TRUE(all_finite(out.prev_sample)) << "step " << i;
      if (out.pred_original_sample.defined()) {
        EXPECT_TRUE(all_finite(out.pred_original_sample));
      }
      x = out.prev_sample;
    }
  }
}

TEST(SchedulerFactoryUnit, EveryNameRunsDummyModel) { run_dummy_steps(sd_scheduler_config(), "SD config"); }

// The fixture models' scheduler_config.json, as diffusers wrote it (copied into tests/data/tiny-sd).
TEST(SchedulerFactoryUnit, EveryNameRunsDummyModelFromFixtureConfig) {
  for (const std::string variant : {"sd15", "test"}) {
    const std::string path = dmx::test::tiny_config_dir(variant) + "/scheduler/scheduler_config.json";
    run_dummy_steps(S::parse_scheduler_config(dmx::read_text_file(path, "scheduler config", dmx::kMaxJsonFileBytes)),
                    path);
  }
}

// ---------------------------------------------------------------------------------------------------
// Steps: hand-computed formulas, runtime errors, state.

std::vector<double> alphas_cumprod_double(const S::SchedulerConfig& c) {
  const at::Tensor ac = S::detail::alphas_cumprod_of(S::make_betas(c)).to(at::kDouble);
  return std::vector<double>(ac.data_ptr<double>(), ac.data_ptr<double>() + ac.numel());
}

TEST(SchedulerStepUnit, DDIMVPrediction) {
  json j = sd_scheduler_config();
  j["prediction_type"] = "v_prediction";
  auto sched = S::create_scheduler("ddim", j);
  sched->set_timesteps(10);
  const std::vector<double> ac = alphas_cumprod_double(sched->config());
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({2, 4, 5, 5}, gen, f64), v = at::randn({2, 4, 5, 5}, gen, f64);
  for (int i : {0, 4, 9}) {
    const int t = static_cast<int>(sched->timesteps()[i]);
    const double a = ac[t], ap = t - 100 >= 0 ? ac[t - 100] : ac[0];  // set_alpha_to_one=false: ᾱ_0 at the end
    const at::Tensor x0 = std::sqrt(a) * x - std::sqrt(1 - a) * v;
    const at::Tensor eps = std::sqrt(a) * v + std::sqrt(1 - a) * x;
    const at::Tensor expected = std::sqrt(ap) * x0 + std::sqrt(1 - ap) * eps;
    const auto out = sched->step(v.to(at::kFloat), i, x.to(at::kFloat));
    EXPECT_LE(dmx::test::check_close("ddim v step " + std::to_string(i), out.prev_sample, expected, kTol), kTol);
    EXPECT_LE(dmx::test::check_close("ddim v x0 " + std::to_string(i), out.pred_original_sample, x0, kTol), kTol);
  }
}

TEST(SchedulerStepUnit, EulerVPrediction) {
  json j = sd_scheduler_config();
  j["prediction_type"] = "v_prediction";
  auto sched = S::create_scheduler("euler", j);
  sched->set_timesteps(10);
  const std::vector<double> ac = alphas_cumprod_double(sched->config());
  const auto sigma_of = [&](double t) { return std::sqrt((1 - ac[static_cast<int>(t)]) / ac[static_cast<int>(t)]); };
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({1, 4, 6, 6}, gen, f64) * 3.0, v = at::randn({1, 4, 6, 6}, gen, f64);
  for (int i : {0, 5, 9}) {
    const double s = sigma_of(sched->timesteps()[i]);
    const double s_next = i + 1 < 10 ? sigma_of(sched->timesteps()[i + 1]) : 0.0;
    const at::Tensor x0 = v * (-s / std::sqrt(s * s + 1)) + x / (s * s + 1);
    const at::Tensor expected = x + (x - x0) / s * (s_next - s);
    const auto out = sched->step(v.to(at::kFloat), i, x.to(at::kFloat));
    EXPECT_LE(dmx::test::check_close("euler v step " + std::to_string(i), out.prev_sample, expected, kTol), kTol);
    EXPECT_LE(dmx::test::check_close("euler v x0 " + std::to_string(i), out.pred_original_sample, x0, kTol), kTol);
    // scale_model_input divides by sqrt(σ² + 1).
    EXPECT_LE(dmx::test::check_close("euler scale " + std::to_string(i), sched->scale_model_input(x.to(at::kFloat), i),
                                     x / std::sqrt(s * s + 1), kTol),
              kTol);
  }
}

TEST(SchedulerStepUnit, RuntimeErrors) {
  auto ddim = S::create_scheduler("ddim", sd_scheduler_config());
  const at::Tensor x = at::zeros({1, 4, 4, 4});
  expect_throws<dmx::InvalidArgument>([&] { ddim->step(x, 0, x); }, {"set_timesteps"}, "step before set_timesteps");
  expect_throws<dmx::InvalidArgument>([&] { ddim->set_timesteps(0); }, {"num_inference_steps", "0"}, "0 steps");
  expect_throws<dmx::InvalidArgument>([&] { ddim->set_timesteps(1001); }, {"num_inference_steps", "1001"}, "too many");
  ddim->set_timesteps(10);
  expect_throws<dmx::InvalidArgument>([&] { ddim->step(x, 10, x); }, {"step_index", "[0, 10)", "10"}, "index");
  expect_throws<dmx::InvalidArgument>([&] { ddim->add_noise(x, x, -1); }, {"step_index", "-1"}, "add_noise index");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  // Given noise takes precedence over the generator, which then draws nothing (replay of recorded draws).
  S::StepArgs both;
  both.eta = 1.0;
  both.generator = &gen;
  both.variance_noise = at::ones({1, 4, 4, 4});
  const at::Tensor state_before = gen.get_state();
  const at::Tensor with_noise = ddim->step(x, 0, x, both).prev_sample;
  EXPECT_TRUE(at::equal(gen.get_state(), state_before)) << "the generator must not draw when noise is given";
  both.generator = nullptr;
  EXPECT_TRUE(at::equal(with_noise, ddim->step(x, 0, x, both).prev_sample));
  both.variance_noise = at::ones({1, 4, 2, 2});
  expect_throws<dmx::InvalidArgument>([&] { ddim->step(x, 0, x, both); }, {"variance_noise", "shape"}, "noise shape");
  S::StepArgs negative;
  negative.eta = -0.5;
  expect_throws<dmx::InvalidArgument>([&] { ddim->step(x, 0, x, negative); }, {"eta", "-0.5"}, "eta");

  for (const std::string name : {"pndm", "lms", "dpmpp_2m", "heun"}) {
    auto sched = S::create_scheduler(name, sd_scheduler_config());
    sched->set_timesteps(10);
    sched->step(x, 0, x);
    expect_throws<dmx::InvalidArgument>([&] { sched->step(x, 3, x); }, {"consecutive", "set_timesteps"}, name);
  }
}

TEST(SchedulerStepUnit, Img2ImgStartAndReset) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const at::Tensor x = at::randn({1, 4, 4, 4}, gen, at::TensorOptions().dtype(at::kFloat));
  for (const auto& name : S::scheduler_names()) {
    SCOPED_TRACE(name);
    auto sched = S::create_scheduler(name, config_for_row(name, sd_scheduler_config()));
    sched->set_timesteps(10);
    const int start = 4 * sched->order();
    const at::Tensor noisy = sched->add_noise(x, x * 0.5, start);
    at::Tensor y = noisy;
    for (int i = start; i < static_cast<int>(sched->timesteps().size()); ++i) {
      S::StepArgs args;
      args.generator = &gen;
      y = sched->step(dummy_model(sched->scale_model_input(y, i), sched->timesteps()[i]), i, y, args).prev_sample;
    }
    EXPECT_TRUE(all_finite(y));
    // set_timesteps resets the per-run history: a new run may start anywhere.
    sched->set_timesteps(10);
    EXPECT_NO_THROW(sched->step(x, 2 * sched->order(), x));
  }
}

TEST(SchedulerStepUnit, FirstStepOfStatefulSchedulersIsFirstOrder) {
  // DPM-Solver++ with no history takes the DDIM-equivalent first-order step from any start index.
  auto dpm = S::create_scheduler("dpmpp_2m", sd_scheduler_config());
  dpm->set_timesteps(10);
  const auto* sig = dynamic_cast<const S::SigmaScheduler*>(dpm.get());
  ASSERT_NE(sig, nullptr);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(2);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({1, 4, 4, 4}, gen, f64), eps = at::randn({1, 4, 4, 4}, gen, f64);
  const int i = 3;
  const double s = sig->sigmas()[i], s_next = sig->sigmas()[i + 1];
  const double a_s = 1 / std::sqrt(s * s + 1), sg_s = s * a_s;
  const double a_t = 1 / std::sqrt(s_next * s_next + 1), sg_t = s_next * a_t;
  const at::Tensor x0 = (x - sg_s * eps) / a_s;
  const double h = std::log(a_t / sg_t) - std::log(a_s / sg_s);
  const at::Tensor expected = (sg_t / sg_s) * x - a_t * (std::exp(-h) - 1) * x0;
  const auto out = dpm->step(eps.to(at::kFloat), i, x.to(at::kFloat));
  EXPECT_LE(dmx::test::check_close("dpm first-order from index 3", out.prev_sample, expected, kTol), kTol);
}

TEST(SchedulerStepUnit, TimestepLayouts) {
  auto heun = S::create_scheduler("heun", sd_scheduler_config());
  heun->set_timesteps(10);
  EXPECT_EQ(heun->order(), 2);
  EXPECT_EQ(heun->timesteps().size(), 19u);
  auto pndm = S::create_scheduler("pndm", sd_scheduler_config());
  pndm->set_timesteps(10);
  EXPECT_EQ(pndm->timesteps().size(), 11u);

  // PNDM with Runge-Kutta warm-up (skip_prk_steps false): 12 PRK entries + N-3 PLMS entries.
  json prk_cfg = sd_scheduler_config();
  prk_cfg["skip_prk_steps"] = false;
  auto prk = S::create_scheduler("pndm", prk_cfg);
  prk->set_timesteps(10);
  const std::vector<double> expected = {901, 851, 851, 801, 801, 751, 751, 701, 701, 651,
                                        651, 601, 601, 501, 401, 301, 201, 101, 1};
  EXPECT_EQ(prk->timesteps(), expected);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(9);
  at::Tensor x = at::randn({1, 4, 4, 4}, gen, at::TensorOptions().dtype(at::kFloat));
  for (int i = 0; i < static_cast<int>(prk->timesteps().size()); ++i)
    x = prk->step(dummy_model(x, prk->timesteps()[i]), i, x).prev_sample;
  EXPECT_TRUE(all_finite(x));

  // Linspace / trailing spacings (diffusers' own test expectations for 1000 training steps).
  json lin = sd_scheduler_config();
  lin["timestep_spacing"] = "linspace";
  auto euler_lin = S::create_scheduler("euler", lin);
  euler_lin->set_timesteps(4);
  EXPECT_EQ(euler_lin->timesteps(), (std::vector<double>{999, 666, 333, 0}));
  auto ddim_lin = S::create_scheduler("ddim", lin);
  ddim_lin->set_timesteps(3);
  EXPECT_EQ(ddim_lin->timesteps(), (std::vector<double>{999, 500, 0}));  // 499.5 rounds half to even
  json trailing = sd_scheduler_config();
  trailing["timestep_spacing"] = "trailing";
  auto dpm_trailing = S::create_scheduler("dpmpp_2m", trailing);
  dpm_trailing->set_timesteps(4);
  EXPECT_EQ(dpm_trailing->timesteps(), (std::vector<double>{999, 749, 499, 249}));
  auto inverse_trailing = S::create_scheduler("ddim_inverse", trailing);
  inverse_trailing->set_timesteps(4);
  EXPECT_EQ(inverse_trailing->timesteps(), (std::vector<double>{249, 499, 749, 999}));

  // Karras sigmas on Euler span the spaced sigmas (901 .. 1 here) and give fractional timesteps.
  json karras = sd_scheduler_config();
  karras["use_karras_sigmas"] = true;
  auto ek = S::create_scheduler("euler", karras);
  ek->set_timesteps(10);
  EXPECT_NEAR(ek->timesteps().front(), 901, 1e-3);
  EXPECT_NEAR(ek->timesteps().back(), 1, 1e-3);
  bool fractional = false;
  for (double t : ek->timesteps()) fractional |= t != std::floor(t);
  EXPECT_TRUE(fractional);
}

TEST(SchedulerStepUnit, DDPMDrawsFromDefaultGeneratorWithoutOne) {
  auto ddpm = S::create_scheduler("ddpm", sd_scheduler_config());
  ddpm->set_timesteps(10);
  const at::Tensor x = at::ones({1, 4, 4, 4});
  const auto a = ddpm->step(x, 0, x).prev_sample;
  const auto b = ddpm->step(x, 0, x).prev_sample;
  EXPECT_FALSE(at::equal(a, b));  // fresh noise each call
  at::Generator g1 = at::make_generator<at::CPUGeneratorImpl>(42), g2 = at::make_generator<at::CPUGeneratorImpl>(42);
  S::StepArgs a1, a2;
  a1.generator = &g1;
  a2.generator = &g2;
  EXPECT_TRUE(at::equal(ddpm->step(x, 0, x, a1).prev_sample, ddpm->step(x, 0, x, a2).prev_sample));
}

}  // namespace
