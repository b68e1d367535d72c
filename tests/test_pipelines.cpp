// Golden tests of whole pipelines against diffusers 0.27.2 (txt2img with every scheduler, img2img); seeds,
// batches and errors on a tiny random model.
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <functional>

#include "core/image.h"
#include "dmx/error.h"
#include "loaders/model_bundle.h"
#include "pipelines/stable_diffusion.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

std::string short_scheduler(const std::string& cls) {
  static const std::map<std::string, std::string> m = {{"DDIMScheduler", "ddim"},
                                                       {"PNDMScheduler", "pndm"},
                                                       {"EulerDiscreteScheduler", "euler"},
                                                       {"EulerAncestralDiscreteScheduler", "euler_a"},
                                                       {"DPMSolverMultistepScheduler", "dpmpp_2m"},
                                                       {"LMSDiscreteScheduler", "lms"},
                                                       {"DDPMScheduler", "ddpm"},
                                                       {"HeunDiscreteScheduler", "heun"}};
  return m.at(cls);
}

std::shared_ptr<loaders::StableDiffusionModels> load_model(const std::string& variant) {
  static std::map<std::string, std::shared_ptr<loaders::StableDiffusionModels>> cache;
  auto& m = cache[variant];
  if (!m) m = loaders::load_stable_diffusion(fixture_model(variant));
  return m;
}

// Runs a txt2img/img2img case and checks every step's latents (1e-4) and the image (1e-3).
void run_case(const std::string& variant, const std::string& name) {
  RefCase ref = load_ref(variant, name);
  const auto& meta = ref.meta;
  pipelines::StableDiffusionPipeline pipe(load_model(variant));
  pipelines::StableDiffusionParams p;
  p.prompt = meta["prompt"].get<std::string>();
  p.negative_prompt = meta.value("negative_prompt", std::string());
  p.num_inference_steps = meta["steps"].get<int>();
  p.guidance_scale = meta["guidance_scale"].get<double>();
  // img2img's case records no class: its doc says DDIM.
  p.scheduler = short_scheduler(meta.value("scheduler_class", std::string("DDIMScheduler")));
  p.eta = meta.value("eta", 0.0);
  p.show_progress = false;
  if (ref.has("input.latents")) p.latents = ref["input.latents"];
  // Replay the reference's random draws where it recorded them.
  std::vector<at::Tensor> rng;
  for (int k = 0; ref.has("rng." + std::to_string(k)); ++k) rng.push_back(ref["rng." + std::to_string(k)]);
  if (ref.has("input.image_u8")) {
    at::Tensor u8 = ref["input.image_u8"];
    Image img;
    img.height = static_cast<int>(u8.size(0));
    img.width = static_cast<int>(u8.size(1));
    img.channels = 3;
    img.data.assign(u8.data_ptr<uint8_t>(), u8.data_ptr<uint8_t>() + u8.numel());
    p.init_image = image_to_tensor(img);
    p.strength = meta["strength"].get<double>();
    p.posterior_noise = rng.at(0);
    p.latents = rng.at(1);
  } else {
    p.step_noises = rng;
  }
  std::vector<at::Tensor> steps;
  p.on_step_end = [&](int, double, at::Tensor& lat) { steps.push_back(lat.clone()); };
  auto out = pipe.run(p);
  std::vector<double> expected_ts;
  for (const auto& t : meta["timesteps"]) expected_ts.push_back(t.get<double>());
  EXPECT_EQ(out.timesteps, expected_ts) << name;
  double worst = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string key = "step." + std::to_string(i) + ".latents";
    if (!ref.has(key)) continue;
    worst = std::max(worst, check_close(variant + "/" + name + " " + key, steps[i], ref[key], 1e-4));
  }
  EXPECT_LE(worst, 1e-4) << name << " latents";
  DMX_EXPECT_CLOSE(variant + "/" + name + " image", out.images, ref["image"], 1e-3);
}

class PipelineGolden : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(PipelineGolden, MatchesReference) {
  DMX_REQUIRE_FIXTURES();
  run_case(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(Golden, PipelineGolden,
                         ::testing::Combine(::testing::Values("sd15", "test"),
                                            ::testing::Values("txt2img_ddim", "txt2img_pndm", "txt2img_euler",
                                                              "txt2img_euler_a", "txt2img_dpm2m", "txt2img_lms",
                                                              "txt2img_ddim_eta", "img2img")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// The seeded path draws exactly what the reference drew: DDIM eta=1 with generator seed 52.
TEST(PipelineSeedGolden, DdimEtaDrawsMatchSeed52) {
  DMX_REQUIRE_FIXTURES();
  RefCase ref = load_ref("sd15", "txt2img_ddim_eta");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(52);
  for (int k = 0; ref.has("rng." + std::to_string(k)); ++k) {
    at::Tensor draw = at::randn(ref["rng." + std::to_string(k)].sizes(), gen, at::TensorOptions().dtype(at::kFloat));
    EXPECT_TRUE(at::equal(draw, ref["rng." + std::to_string(k)])) << "draw " << k;
  }
  pipelines::StableDiffusionPipeline pipe(load_model("sd15"));
  pipelines::StableDiffusionParams p;
  p.prompt = ref.meta["prompt"].get<std::string>();
  p.negative_prompt = ref.meta["negative_prompt"].get<std::string>();
  p.num_inference_steps = 8;
  p.scheduler = "ddim";
  p.eta = 1.0;
  at::Generator gen52 = pipelines::make_generator(52);
  p.generator = &gen52;
  p.latents = ref["input.latents"];
  p.show_progress = false;
  auto out = pipe.run(p);
  DMX_EXPECT_CLOSE("sd15/txt2img_ddim_eta seeded image", out.images, ref["image"], 1e-3);
}

TEST(PipelineTiny, NumImagesMatchesSingleRuns) {
  pipelines::StableDiffusionPipeline pipe(shared_tiny_model("test"));
  pipelines::StableDiffusionParams p;
  p.prompt = "a photograph of an astronaut riding a horse";
  p.negative_prompt = "blurry";
  p.num_inference_steps = 4;
  p.scheduler = "ddim";
  p.show_progress = false;
  at::Tensor noise = at::randn({2, 4, 32, 32}, at::make_generator<at::CPUGeneratorImpl>(7));
  p.num_images_per_prompt = 2;
  p.latents = noise;
  auto both = pipe.run(p);
  ASSERT_EQ(both.images.size(0), 2);
  p.num_images_per_prompt = 1;
  for (int i = 0; i < 2; ++i) {
    p.latents = noise.narrow(0, i, 1);
    auto one = pipe.run(p);
    DMX_EXPECT_CLOSE("batch image " + std::to_string(i), both.latents.narrow(0, i, 1), one.latents, 1e-4);
  }
}

TEST(PipelineTiny, SameSeedSameImageDifferentSeedDifferentImage) {
  pipelines::StableDiffusionPipeline pipe(shared_tiny_model("test"));
  pipelines::StableDiffusionParams p;
  p.prompt = "a red apple";
  p.num_inference_steps = 3;
  p.scheduler = "euler_a";
  p.width = 48;
  p.height = 64;
  p.show_progress = false;
  at::Generator gen = pipelines::make_generator(2718281828ull);
  p.generator = &gen;
  auto a = pipe.run(p);
  gen = pipelines::make_generator(2718281828ull);
  auto b = pipe.run(p);
  EXPECT_TRUE(at::equal(a.latents, b.latents));
  EXPECT_EQ(a.images.size(1), 64);
  EXPECT_EQ(a.images.size(2), 48);
  gen = pipelines::make_generator(1);
  auto c = pipe.run(p);
  EXPECT_FALSE(at::allclose(a.latents, c.latents));
}

TEST(PipelineTiny, BadParamsNameTheRule) {
  pipelines::StableDiffusionPipeline pipe(shared_tiny_model("test"));
  pipelines::StableDiffusionParams p;
  p.prompt = "x";
  p.show_progress = false;
  p.width = 100;
  p.height = 64;
  try {
    pipe.run(p);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("width must be a multiple of 8, got 100"), std::string::npos) << e.what();
  }
  p.width = 64;
  p.num_inference_steps = 0;
  EXPECT_THROW(pipe.run(p), InvalidArgument);
  p.num_inference_steps = 2;
  p.init_image = at::zeros({1, 3, 64, 64});
  p.strength = 1.5;
  EXPECT_THROW(pipe.run(p), InvalidArgument);
  p.strength = 0.1;  // int(2 * 0.1) = 0 steps left
  EXPECT_THROW(pipe.run(p), InvalidArgument);
  p.init_image = at::Tensor();
  p.scheduler = "nope";
  EXPECT_THROW(pipe.run(p), InvalidArgument);
}
}  // namespace
}  // namespace dmx::test

namespace dmx::test {
namespace {

template <typename E>
void expect_message(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception mentioning '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// The generation core's rules: one function per shared parameter, naming the parameter as the caller spells it.
TEST(GenerationCoreUnit, OneRulePerSharedParameter) {
  using namespace pipelines;
  expect_message<InvalidArgument>([] { check_guidance_scale(101); }, "guidance_scale must be in [0, 100], got 101");
  expect_message<InvalidArgument>([] { check_guidance_scale(-1, "--guidance-scale"); },
                                  "--guidance-scale must be in [0, 100], got -1");
  EXPECT_THROW(check_guidance_scale(std::nan("")), InvalidArgument);
  EXPECT_NO_THROW(check_guidance_scale(0));
  EXPECT_NO_THROW(check_guidance_scale(100));
  expect_message<InvalidArgument>([] { check_num_inference_steps(0); }, "steps must be in [1, 1000], got 0");
  expect_message<InvalidArgument>([] { check_num_inference_steps(1001, "--steps"); },
                                  "--steps must be in [1, 1000], got 1001");
  expect_message<InvalidArgument>([] { check_eta(1.5); }, "eta must be in [0, 1], got 1.5");
  expect_message<InvalidArgument>([] { check_num_images(65); }, "num_images must be in [1, 64], got 65");
}

// diffusers' get_timesteps: t_start = steps - int(steps * strength), times the scheduler order.
TEST(GenerationCoreUnit, StrengthFirstStep) {
  using namespace pipelines;
  EXPECT_EQ(strength_start_index(10, 0.6), 4);
  EXPECT_EQ(strength_start_index(10, 1.0), 0);
  EXPECT_EQ(strength_start_index(10, 0.0), 10);
  const nlohmann::json cfg = {{"_class_name", "DDIMScheduler"}};
  auto ddim = schedulers::create_scheduler("ddim", cfg);
  ddim->set_timesteps(10);
  EXPECT_EQ(strength_first_step(*ddim, 10, 0.6), 4);
  auto heun = schedulers::create_scheduler("heun", cfg);  // order 2
  heun->set_timesteps(10);
  EXPECT_EQ(strength_first_step(*heun, 10, 0.6), 8);
  EXPECT_EQ(strength_first_step(*heun, 10, 0.6, /*by_order=*/false), 4);
  expect_message<InvalidArgument>([&] { strength_first_step(*ddim, 10, 0.05); }, "leaves no denoising step");
}

// Prompt batching for guidance (negative rows first, repeated per image) and the one guided prediction:
// eps_u + g (eps_c - eps_u) over one UNet batch, the conditional prediction alone without guidance.
TEST(GenerationCoreTiny, PromptBatchAndGuidedNoisePrediction) {
  using namespace pipelines;
  auto m = shared_tiny_model("test");
  GenerationParams p;
  p.prompt = "a red apple";
  p.negative_prompt = "blurry";
  p.num_images_per_prompt = 2;
  p.guidance_scale = 5.0;
  const at::Tensor embeds = encode_prompts(*m, p);
  const at::Tensor cond = encode_prompt(*m, p.prompt), uncond = encode_prompt(*m, p.negative_prompt);
  ASSERT_EQ(embeds.size(0), 4);
  for (int64_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(at::equal(embeds[i], uncond[0]));
    EXPECT_TRUE(at::equal(embeds[2 + i], cond[0]));
  }
  auto sched = make_scheduler(*m, "euler", 4);  // scales its input
  const at::Tensor latents = at::randn({2, 4, 16, 16}, make_generator(3));
  const at::Tensor guided = guided_noise_prediction(*m, *sched, latents, 1, embeds, p.guidance_scale);
  const double t = sched->timesteps()[1];
  const auto both = predict_noise(*m, sched->scale_model_input(at::cat({latents, latents}, 0), 1), t, embeds).chunk(2);
  EXPECT_TRUE(at::equal(guided, both[0] + p.guidance_scale * (both[1] - both[0])));
  p.guidance_scale = 1.0;
  const at::Tensor cond_only = encode_prompts(*m, p);
  ASSERT_EQ(cond_only.size(0), 2);
  EXPECT_TRUE(at::equal(guided_noise_prediction(*m, *sched, latents, 1, cond_only, 1.0),
                        predict_noise(*m, sched->scale_model_input(latents, 1), t, cond_only)));
}
}  // namespace
}  // namespace dmx::test
