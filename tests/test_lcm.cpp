// Few-step sampling (issue 20): the LCM scheduler against diffusers 0.27.2's LCMScheduler step by step
// (tests/ref/lcm_scheduler.*, made by tests/ref/make_lcm_refs.py), seeded `dmx generate --scheduler lcm` runs
// against whole diffusers pipelines (an LCM-LoRA in the layout of latent-consistency/lcm-lora-sdv1-5, CFG, img2img),
// the LCM-LoRA layout against a hand merge, the registry row and the rules, and the bench's whole-picture figure.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/lora_loader.h"
#include "loaders/model_bundle.h"
#include "models/unet_2d_condition.h"
#include "pipelines/guidance_embedding.h"
#include "schedulers/lcm.h"
#include "schedulers/registry.h"
#include "schedulers/scheduler.h"
#include "schedulers/scheduler_impl.h"
#include "test_ref_cases.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

namespace S = dmx::schedulers;
using json = nlohmann::json;

// Scheduler steps: float32 arithmetic in the reference's order, so 1e-6 relative (to the largest value).
constexpr double kStepTol = 1e-6;

std::unique_ptr<S::Scheduler> lcm_for_case(const json& c) {
  auto sched = S::create_scheduler("LCMScheduler", c.at("config"));
  const json& st = c.at("set_timesteps");
  if (st.size() == 1 && st.contains("num_inference_steps")) {
    sched->set_timesteps(st["num_inference_steps"].get<int>());
  } else {
    S::LCMTimestepOptions o;
    if (st.contains("num_inference_steps")) o.num_inference_steps = st["num_inference_steps"].get<int>();
    if (st.contains("original_inference_steps")) o.original_inference_steps = st["original_inference_steps"].get<int>();
    if (st.contains("timesteps")) o.custom_timesteps = st["timesteps"].get<std::vector<int64_t>>();
    if (st.contains("strength")) o.strength = st["strength"].get<double>();
    S::set_lcm_timesteps(*sched, o);
  }
  return sched;
}

// Every case of the reference: timesteps, prev_sample and denoised of every step, the draws of the run's generator
// (seed 300, one per step but the last), add_noise.
TEST(LCMSchedulerUnit, MatchesDiffusersStepByStep) {
  const RefCase ref = load_ref_file(repo_ref_dir() + "/lcm_scheduler");
  ASSERT_GE(ref.meta["cases"].size(), 10u);
  for (const json& c : ref.meta["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto sched = lcm_for_case(c);
    EXPECT_EQ(sched->class_name(), "LCMScheduler");
    std::vector<double> expected_ts;
    for (const auto& t : c["timesteps"]) expected_ts.push_back(t.get<double>());
    ASSERT_EQ(sched->timesteps(), expected_ts);
    at::Tensor x = ref[name + ".x_T"] * sched->init_noise_sigma();
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(300);
    double worst = 0;
    for (size_t i = 0; i < expected_ts.size(); ++i) {
      const std::string p = name + "." + std::to_string(i) + ".";
      EXPECT_TRUE(at::equal(sched->scale_model_input(x, static_cast<int>(i)), x));
      S::StepArgs args;
      args.generator = &gen;
      const S::StepOutput out = sched->step(ref[name + ".eps." + std::to_string(i)], static_cast<int>(i), x, args);
      worst = std::max(worst, check_close(p + "denoised", out.pred_original_sample, ref[p + "denoised"], kStepTol));
      worst = std::max(worst, check_close(p + "prev_sample", out.prev_sample, ref[p + "prev_sample"], kStepTol));
      x = out.prev_sample;
    }
    EXPECT_LE(worst, kStepTol);
    // The generator took exactly the reference's draws, in order, and no more.
    at::Generator replay = at::make_generator<at::CPUGeneratorImpl>(300);
    const int draws = c["draws"].get<int>();
    for (int k = 0; k < draws; ++k)
      EXPECT_TRUE(at::equal(S::detail::randn_like(x, &replay), ref[name + ".rng." + std::to_string(k)]))
          << "draw " << k;
    EXPECT_TRUE(at::equal(S::detail::randn_like(x, &replay), S::detail::randn_like(x, &gen)))
        << "the scheduler drew more or fewer than " << draws << " times";
    if (!c["add_noise_index"].is_null()) {
      const int idx = c["add_noise_index"].get<int>();
      DMX_EXPECT_CLOSE(name + " add_noise",
                       sched->add_noise(ref[name + ".add_noise.x0"], ref[name + ".add_noise.noise"], idx),
                       ref[name + ".add_noise"], kStepTol);
    }
  }
}

// Boundary-condition scalings and the step by hand: epsilon, one step with noise, one without.
TEST(LCMSchedulerUnit, StepIsTheConsistencyFunctionByHand) {
  auto sched = S::create_scheduler("lcm", json::object());  // LCMScheduler's own defaults
  EXPECT_EQ(sched->config().beta_schedule, "scaled_linear");
  EXPECT_EQ(sched->config().original_inference_steps, 50);
  EXPECT_EQ(sched->config().timestep_scaling, 10.0);
  sched->set_timesteps(2);
  ASSERT_EQ(sched->timesteps(), (std::vector<double>{999, 499}));
  const auto& ac = dynamic_cast<const S::AlphaScheduler&>(*sched).alphas_cumprod();
  at::Tensor x = at::randn({1, 4, 3, 3}), eps = at::randn({1, 4, 3, 3}), noise = at::randn({1, 4, 3, 3});
  auto expected = [&](int64_t t) {
    const double a = ac[t], scaled = 10.0 * t;
    const double c_skip = 0.25 / (scaled * scaled + 0.25), c_out = scaled / std::sqrt(scaled * scaled + 0.25);
    const at::Tensor x0 = (x.to(at::kDouble) - std::sqrt(1 - a) * eps.to(at::kDouble)) / std::sqrt(a);
    return c_out * x0 + c_skip * x.to(at::kDouble);
  };
  S::StepArgs args;
  args.variance_noise = noise;
  const S::StepOutput first = sched->step(eps, 0, x, args);
  DMX_EXPECT_CLOSE("denoised at 999", first.pred_original_sample, expected(999), 1e-5);
  DMX_EXPECT_CLOSE("noised to 499", first.prev_sample,
                   std::sqrt(ac[499]) * expected(999) + std::sqrt(1 - ac[499]) * noise.to(at::kDouble), 1e-5);
  const S::StepOutput last = sched->step(eps, 1, x, args);
  DMX_EXPECT_CLOSE("the last step returns the denoised sample", last.prev_sample, expected(499), 1e-5);
  EXPECT_TRUE(at::equal(last.prev_sample, last.pred_original_sample));
}

TEST(LCMSchedulerUnit, RulesNameTheParameter) {
  auto expect_arg = [](const std::function<void()>& f, const std::string& sub) {
    try {
      f();
      ADD_FAILURE() << "expected InvalidArgument containing '" << sub << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(sub), std::string::npos) << e.what();
    }
  };
  auto sched = S::create_scheduler("lcm", json::object());
  expect_arg([&] { sched->set_timesteps(51); }, "steps must be at most 50 for LCMScheduler");
  expect_arg([&] { sched->set_timesteps(0); }, "steps must be >= 1");
  expect_arg([&] { S::set_lcm_timesteps(*sched, {4, std::nullopt, {}, 0.05}); }, "lower the steps or raise strength");
  expect_arg([&] { S::set_lcm_timesteps(*sched, {4, std::nullopt, {}, 1.5}); }, "strength must be in (0, 1]");
  expect_arg([&] { S::set_lcm_timesteps(*sched, {0, std::nullopt, {999, 999}, 1.0}); }, "descending");
  expect_arg([&] { S::set_lcm_timesteps(*sched, {0, std::nullopt, {1000, 500}, 1.0}); }, "before num_train_timesteps");
  expect_arg([&] { S::set_lcm_timesteps(*sched, {4, std::nullopt, {999, 500}, 1.0}); }, "exactly one of");
  expect_arg([&] { S::set_lcm_timesteps(*sched, {4, 1001, {}, 1.0}); }, "original_inference_steps must be in");
  auto ddim = S::create_scheduler("ddim", json::object());
  expect_arg([&] { S::set_lcm_timesteps(*ddim, {4, std::nullopt, {}, 1.0}); }, "need an LCMScheduler");
  expect_arg([&] { S::create_scheduler("lcm", {{"original_inference_steps", 0}}); }, "original_inference_steps");
  expect_arg([&] { S::create_scheduler("lcm", {{"timestep_scaling", -1.0}}); }, "timestep_scaling");
  expect_arg([&] { S::create_scheduler("lcm", {{"prediction_type", "x0"}}); }, "prediction_type");
  expect_arg([&] { sched->step(at::zeros({1}), 0, at::zeros({1})); }, "call set_timesteps() before step()");
  // A custom schedule that strength cuts to nothing is refused and leaves the previous schedule in place.
  sched->set_timesteps(4);
  expect_arg([&] { S::set_lcm_timesteps(*sched, {0, std::nullopt, {999, 499}, 0.3}); }, "leaves none");
  EXPECT_EQ(sched->timesteps(), (std::vector<double>{999, 759, 499, 259}));
  expect_arg([&] { sched->step(at::zeros({1}), 4, at::zeros({1})); }, "step_index must be in [0, 4)");
}

// A model whose scheduler_config.json names LCMScheduler runs it without --scheduler, and its metadata says LCM.
TEST(LCMSchedulerUnit, RegistryRowAndModelConfig) {
  const S::SchedulerEntry* row = S::find_scheduler("lcm");
  ASSERT_NE(row, nullptr);
  EXPECT_EQ(row->class_name(), "LCMScheduler");
  EXPECT_EQ(S::sampler_label("lcm"), "LCM");
  EXPECT_EQ(S::sampler_for_label("LCM"), "lcm");
  EXPECT_EQ(S::scheduler_name_for_config({{"_class_name", "LCMScheduler"}, {"original_inference_steps", 50}}), "lcm");
  // from_config semantics: the SD config's betas and steps_offset, LCM's own fields at their defaults
  auto sched = S::create_scheduler("LCMScheduler", {{"_class_name", "PNDMScheduler"},
                                                    {"beta_schedule", "linear"},
                                                    {"steps_offset", 1},
                                                    {"skip_prk_steps", true},
                                                    {"timestep_scaling", 4.0}});
  EXPECT_EQ(sched->config().beta_schedule, "linear");
  EXPECT_EQ(sched->config().timestep_scaling, 4.0);
  EXPECT_FALSE(sched->config().skip_prk_steps);
  const auto names = scheduler_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "lcm"), names.end());
}

// time_cond_proj_dim (an LCM-distilled UNet's guidance embedding) is read from the config; out-of-range values are a
// FormatError naming the field.
TEST(LCMDistilledUnit, ConfigFieldAndRules) {
  json cfg = json::parse(read_text_file(tiny_config_dir("test") + "/unet/config.json", "unet config", 1 << 20));
  EXPECT_EQ(models::UNet2DConditionConfig::from_json(cfg).time_cond_proj_dim, 0);
  cfg["time_cond_proj_dim"] = 256;
  EXPECT_EQ(models::UNet2DConditionConfig::from_json(cfg).time_cond_proj_dim, 256);
  for (const json& bad : {json(0), json(-3), json(1 << 20), json("8")}) {
    cfg["time_cond_proj_dim"] = bad;
    try {
      models::UNet2DConditionConfig::from_json(cfg);
      ADD_FAILURE() << "time_cond_proj_dim = " << bad.dump() << " was accepted";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("time_cond_proj_dim"), std::string::npos) << e.what();
    }
  }
}

namespace {
// diffusers' test model made LCM-distilled as tests/ref/make_lcm_refs.py lcm_seeded_test_distilled makes it: the
// fixture folder with time_cond_proj_dim 8 in the UNet config, the reference's cond_proj weight added to the UNet's
// weights, LCMScheduler as the folder's scheduler and LatentConsistencyModelPipeline as its class.
std::string distilled_test_model(const RefCase& ref) {
  const std::string dir = temp_dir() + "/lcm_distilled_model";
  if (std::filesystem::exists(dir + "/model_index.json")) return dir;
  std::filesystem::copy(fixture_model("test"), dir, std::filesystem::copy_options::recursive);
  auto patch = [&](const std::string& file, const std::function<void(json&)>& f) {
    json j = json::parse(read_text_file(dir + "/" + file, file, 1 << 20));
    f(j);
    std::ofstream(dir + "/" + file) << j.dump(2);
  };
  patch("unet/config.json", [](json& j) { j["time_cond_proj_dim"] = 8; });
  patch("scheduler/scheduler_config.json", [](json& j) { j["_class_name"] = "LCMScheduler"; });
  patch("model_index.json", [](json& j) {
    j["_class_name"] = "LatentConsistencyModelPipeline";
    j["scheduler"] = json::array({"diffusers", "LCMScheduler"});
  });
  const std::string weights = dir + "/unet/diffusion_pytorch_model.safetensors";
  io::TensorMap out = io::load_safetensors(weights);
  for (auto& [k, v] : out) v = v.clone();  // off the file's mapping before it is replaced
  out["time_embedding.cond_proj.weight"] = ref["cond_proj_weight"].contiguous();
  io::save_safetensors(weights + ".tmp", out);
  std::filesystem::rename(weights + ".tmp", weights);
  return dir;
}
}  // namespace

// get_guidance_scale_embedding of LatentConsistencyModelPipeline, against the reference's values.
TEST(LCMDistilledUnit, GuidanceEmbeddingMatchesDiffusers) {
  const RefCase ref = load_ref_file(repo_ref_dir() + "/lcm_seeded_test_distilled");
  const at::Tensor w = at::tensor(ref.meta["w_embedding_of"].get<std::vector<double>>(), at::kFloat);
  DMX_EXPECT_CLOSE("w embedding", pipelines::guidance_scale_embedding(w, 8), ref["w_embedding"], 1e-6);
}

// A seeded `dmx generate` on an LCM-distilled folder against LatentConsistencyModelPipeline (the recorded command
// line, nothing injected): every step's latents within 1e-4 relative, the picture within 1/255. Without --steps and
// --guidance-scale the folder gets the pipeline's defaults (4, 8.5): the same picture. A negative prompt is refused
// (the pipeline has none), exit 2, nothing written.
TEST(LCMDistilledGolden, CommandLineMatchesLatentConsistencyPipeline) {
  DMX_REQUIRE_FIXTURES();
  const RefCase ref = load_ref_file(repo_ref_dir() + "/lcm_seeded_test_distilled");
  EXPECT_GT(ref.meta["max_abs_latents_diff_guidance_1"].get<double>(), 1e-2);  // the embedding matters
  const std::string model = distilled_test_model(ref);
  EXPECT_TRUE(is_lcm_distilled_model(model));
  EXPECT_FALSE(is_lcm_distilled_model(fixture_model("test")));
  const std::string dir = temp_dir() + "/lcm_distilled_run";
  std::filesystem::create_directories(dir);
  const CliRun r = run_recorded_command(
      ref.meta["dmx"].get<std::string>(), "generate",
      {{"--model", model}, {"--save-latents", dir + "/latents.safetensors"}, {"--output", dir + "/out.png"}});
  ASSERT_EQ(r.code, 0) << r.output;
  DMX_EXPECT_CLOSE("distilled latents", io::load_safetensors(dir + "/latents.safetensors").at("latents"),
                   ref["latents"], 1e-4);
  const int diff = max_u8_diff(load_image(dir + "/out.png", "output"), ref["image_u8"]);
  std::printf("[check] LCM-distilled picture: max |diff| %d/255 (tol 1)\n", diff);
  EXPECT_LE(diff, 1);

  const std::string prompt = ref.meta["prompt"].get<std::string>();
  const std::string seed = std::to_string(ref.meta["seed"].get<int>());
  const CliRun d = dmx_run({"generate", "--model", model, "--prompt", prompt, "--seed", seed, "--save-latents",
                            dir + "/defaults.safetensors", "--output", dir + "/defaults.png", "--quiet"});
  ASSERT_EQ(d.code, 0) << d.output;
  DMX_EXPECT_CLOSE("distilled latents, default steps and guidance",
                   io::load_safetensors(dir + "/defaults.safetensors").at("latents"), ref["latents"], 1e-4);

  const CliRun neg = dmx_run({"generate", "--model", model, "--prompt", prompt, "--negative-prompt", "fog", "--output",
                              dir + "/neg.png", "--quiet"});
  EXPECT_EQ(neg.code, 2) << neg.output;
  EXPECT_NE(neg.output.find("negative"), std::string::npos) << neg.output;
  EXPECT_FALSE(std::filesystem::exists(dir + "/neg.png"));
}

// LatentConsistencyModelImg2ImgPipeline: on an LCM-distilled folder `dmx generate --init-image` takes the timesteps
// of LCMScheduler.set_timesteps(steps, strength) (not the img2img pipelines' get_timesteps), samples the picture's
// latents from the posterior, noises them to the first timestep and runs the guidance-embedded loop.
TEST(LCMDistilledGolden, Img2ImgMatchesLatentConsistencyImg2ImgPipeline) {
  DMX_REQUIRE_FIXTURES();
  const RefCase ref = load_ref_file(repo_ref_dir() + "/lcm_seeded_test_distilled_img2img");
  EXPECT_EQ(ref.meta["timesteps"], json::array({599, 459, 299, 159}));
  EXPECT_FALSE(is_lcm_distilled_model(fixture_model("test")));  // the fixture model, before its distilled copy
  const std::string model = distilled_test_model(load_ref_file(repo_ref_dir() + "/lcm_seeded_test_distilled"));
  EXPECT_TRUE(ref["cond_proj_weight"].equal(
      io::load_safetensors(model + "/unet/diffusion_pytorch_model.safetensors").at("time_embedding.cond_proj.weight")));
  const std::string dir = temp_dir() + "/lcm_distilled_img2img_run";
  std::filesystem::create_directories(dir);
  const CliRun r = run_recorded_command(ref.meta["dmx"].get<std::string>(), "generate",
                                        {{"--model", model},
                                         {"--init-image", repo_ref_dir() + "/" + ref.meta["image"].get<std::string>()},
                                         {"--save-latents", dir + "/latents.safetensors"},
                                         {"--output", dir + "/out.png"}});
  ASSERT_EQ(r.code, 0) << r.output;
  DMX_EXPECT_CLOSE("distilled img2img latents", io::load_safetensors(dir + "/latents.safetensors").at("latents"),
                   ref["latents"], 1e-4);
  const int diff = max_u8_diff(load_image(dir + "/out.png", "output"), ref["image_u8"]);
  std::printf("[check] LCM-distilled img2img picture: max |diff| %d/255 (tol 1)\n", diff);
  EXPECT_LE(diff, 1);
}

// ---------------------------------------------------------------------------------------------------
// The LCM-LoRA layout (diffusers' train_lcm_distill_lora_sd_wds.py get_module_kohya_state_dict, the layout of
// latent-consistency/lcm-lora-sdv1-5): lora_unet_<diffusers path with _>.{lora_down,lora_up}.weight and a 0-d .alpha,
// float16, on every module that script targets (attention, proj_in/out, feed-forward, resnet convolutions,
// conv_shortcut, time_emb_proj, down/upsampler convolutions). Written as a file and read by the real loader; the
// merged weights must be W + scale * alpha / r * up @ down, for every targeted layer.
TEST(LCMLoRATiny, LcmLoraLayoutMergesLikeTheHandMerge) {
  auto m = load_tiny_model("test");
  const std::vector<std::string> targets = {"to_q",
                                            "to_k",
                                            "to_v",
                                            "to_out.0",
                                            "proj_in",
                                            "proj_out",
                                            "ff.net.0.proj",
                                            "ff.net.2",
                                            "conv1",
                                            "conv2",
                                            "conv_shortcut",
                                            "downsamplers.0.conv",
                                            "upsamplers.0.conv",
                                            "time_emb_proj"};
  auto targeted = [&](const std::string& name) {
    for (const auto& t : targets)
      if (name == t ||
          (name.size() > t.size() + 1 && name.compare(name.size() - t.size() - 1, t.size() + 1, "." + t) == 0))
        return true;
    return false;
  };
  at::manual_seed(5);
  const int64_t r = 4;
  const double alpha = 8.0, scale = 0.7;
  io::TensorMap file;
  std::map<std::string, at::Tensor> expected;  // parameter -> hand-merged weight
  std::set<std::string> kinds;
  for (const auto& item : m->unet->named_parameters(true)) {
    const std::string key = item.key();
    if (key.size() < 7 || key.compare(key.size() - 7, 7, ".weight") != 0) continue;
    const std::string mod = key.substr(0, key.size() - 7);
    if (!targeted(mod)) continue;
    const at::Tensor w = item.value().detach().clone();
    if (w.dim() != 2 && w.dim() != 4) continue;
    std::string k = "lora_unet_" + mod;
    for (char& ch : k)
      if (ch == '.') ch = '_';
    at::Tensor down, up;
    if (w.dim() == 4) {
      down = (at::randn({r, w.size(1), w.size(2), w.size(3)}) * 0.2).to(at::kHalf);
      up = (at::randn({w.size(0), r, 1, 1}) * 0.05).to(at::kHalf);
      expected[key] =
          w + scale * (alpha / r) * at::einsum("or,rihw->oihw", {up.to(at::kFloat).flatten(1), down.to(at::kFloat)});
    } else {
      down = (at::randn({r, w.size(1)}) * 0.2).to(at::kHalf);
      up = (at::randn({w.size(0), r}) * 0.05).to(at::kHalf);
      expected[key] = w + scale * (alpha / r) * at::matmul(up.to(at::kFloat), down.to(at::kFloat));
    }
    file[k + ".lora_down.weight"] = down;
    file[k + ".lora_up.weight"] = up;
    file[k + ".alpha"] = at::scalar_tensor(alpha, at::kHalf);
    kinds.insert(mod.substr(mod.rfind('.') + 1));
  }
  for (const char* kind : {"to_q", "proj_in", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "2"})
    EXPECT_TRUE(kinds.count(kind)) << "the tiny model has no targeted layer of kind " << kind;
  const std::string path = temp_dir() + "/lcm_lora_layout.safetensors";
  io::save_safetensors(path, file);
  loaders::LoRAApplyOptions o;
  o.mode = loaders::LoRAMode::Merged;
  auto reps = loaders::apply_loras(*m, {loaders::parse_lora_arg(path + ":0.7")}, o);
  ASSERT_EQ(reps.size(), 1u);
  EXPECT_EQ(reps[0].unet_layers, static_cast<int>(expected.size()));
  EXPECT_EQ(reps[0].unet_tensors, static_cast<int>(file.size()));
  EXPECT_EQ(reps[0].format, "kohya");
  double worst = 0;
  for (const auto& item : m->unet->named_parameters(true))
    if (auto it = expected.find(item.key()); it != expected.end())
      worst = std::max(worst, check_close("hand merge " + item.key(), item.value(), it->second, 1e-6));
  EXPECT_LE(worst, 1e-6);
}

// ---------------------------------------------------------------------------------------------------
// Seeded `dmx generate --scheduler lcm` against whole diffusers pipelines (tests/ref/make_lcm_refs.py): the recorded
// command line, nothing injected. Latents within 1e-4 relative (the whole-pipeline tolerance of the fixtures), the
// written picture within 1/255 (PNG rounding).
class LCMSeededGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(LCMSeededGolden, CommandLineMatchesDiffusersPipeline) {
  DMX_REQUIRE_FIXTURES();
  const std::string name = GetParam();
  const RefCase ref = load_ref_file(repo_ref_dir() + "/" + name);
  const std::string model_dir = ref.meta["model_dir"].get<std::string>();
  const std::string dir = temp_dir() + "/" + name;
  std::filesystem::create_directories(dir);
  std::map<std::string, std::string> paths = {{"--model", fixture_model(model_dir.substr(model_dir.rfind('/') + 1))},
                                              {"--save-latents", dir + "/latents.safetensors"},
                                              {"--output", dir + "/out.png"}};
  if (ref.meta.contains("lora_file")) paths["--lora"] = repo_ref_dir() + "/" + ref.meta["lora_file"].get<std::string>();
  if (ref.meta.contains("image")) paths["--init-image"] = repo_ref_dir() + "/" + ref.meta["image"].get<std::string>();
  const CliRun r = run_recorded_command(ref.meta["dmx"].get<std::string>(), "generate", paths);
  ASSERT_EQ(r.code, 0) << r.output;
  DMX_EXPECT_CLOSE(name + " latents", io::load_safetensors(dir + "/latents.safetensors").at("latents"), ref["latents"],
                   1e-4);
  const int diff = max_u8_diff(load_image(dir + "/out.png", "output"), ref["image_u8"]);
  std::printf("[check] %s picture: max |diff| %d/255 (tol 1)\n", name.c_str(), diff);
  EXPECT_LE(diff, 1);
  if (ref.meta.contains("max_abs_latents_diff_without_lora")) {  // the LoRA matters: a run without it would fail
    EXPECT_GT(ref.meta["max_abs_latents_diff_without_lora"].get<double>(), 1e-2);
  }
  // The PNG metadata names the sampler so that --from re-runs it.
  EXPECT_NE(read_image_parameters(dir + "/out.png").find("Sampler: LCM"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Seeded, LCMSeededGolden,
                         ::testing::Values("lcm_seeded_sd15_lora", "lcm_seeded_test_cfg", "lcm_seeded_sd15_img2img"));

// ---------------------------------------------------------------------------------------------------
// The bench's whole-picture figure on a tiny model folder: measured, in the JSON beside every earlier key, and the
// picture options checked before any work.
TEST(LCMBenchTiny, WholePictureFigureKeepsEveryKey) {
  BenchOptions o;
  o.preset = "tiny";
  o.runs = 1;
  o.warmup = 0;
  o.measure_peak = false;
  o.picture_model = tiny_model_dir("test");
  const BenchResult r = bench(o);
  EXPECT_GT(r.picture_s, 0);
  EXPECT_EQ(r.picture_steps, 4);
  EXPECT_EQ(r.picture_scheduler, "lcm");
  const json j = json::parse(bench_json(r));
  for (const char* key : {"preset",
                          "width",
                          "height",
                          "dtype",
                          "device",
                          "threads",
                          "runs",
                          "layout",
                          "omp_wait_policy",
                          "omp_proc_bind",
                          "text_encode_s",
                          "unet_step_s",
                          "vae_decode_s",
                          "text_encode_cpu_s",
                          "unet_step_cpu_s",
                          "vae_decode_cpu_s",
                          "text_encode_gflop",
                          "unet_step_gflop",
                          "vae_decode_gflop",
                          "matmul_peak_gflops",
                          "build_s",
                          "peak_rss_mb",
                          "fused_kernels",
                          "picture_s",
                          "picture_cpu_s",
                          "picture_steps",
                          "picture_scheduler"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_NE(bench_table(r).find("whole picture (load, text encode, 4 lcm steps, decode, PNG"), std::string::npos)
      << bench_table(r);
  BenchOptions bad = o;
  bad.picture_scheduler = "ddim_inverse";
  EXPECT_THROW(bench(bad), InvalidArgument);
  bad = o;
  bad.picture_model = temp_dir() + "/no-such-model";
  EXPECT_THROW(bench(bad), InvalidArgument);
  bad = o;
  bad.picture_controlnet = tiny_controlnet_dir("test");  // a control net without its picture
  EXPECT_THROW(bench(bad), InvalidArgument);
  bad = o;
  bad.picture_control_image = temp_dir() + "/control.png";  // a picture without a net
  EXPECT_THROW(bench(bad), InvalidArgument);

  // A ControlNet picture: timed, named in the table and the JSON.
  const std::string control = temp_dir() + "/bench-control.png";
  Image img{32, 32, 3, std::vector<uint8_t>(32 * 32 * 3)};
  for (size_t i = 0; i < img.data.size(); ++i) img.data[i] = static_cast<uint8_t>((i * 37) % 251);
  save_png(control, img);
  BenchOptions cn = o;
  cn.picture_controlnet = tiny_controlnet_dir("test");
  cn.picture_control_image = control;
  const BenchResult rc = bench(cn);
  EXPECT_GT(rc.picture_s, 0);
  EXPECT_EQ(json::parse(bench_json(rc)).at("picture_controlnet"), cn.picture_controlnet);
  EXPECT_NE(bench_table(rc).find("with the ControlNet"), std::string::npos) << bench_table(rc);
}

}  // namespace
}  // namespace dmx::test
