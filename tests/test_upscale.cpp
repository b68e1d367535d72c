// The x4 upscaler (issue 15): the StableDiffusionUpscalePipeline loader, the pipeline (noise augmentation of the
// low-res picture, the UNet conditioning, the loop and the decode) and `dmx upscale`, against diffusers 0.27.2.
// Suites:
//   UpscaleLoaderGolden   the fixture folder loads; wrong folders and parts are refused (exit-2 error types)
//   UpscaleGolden         ref/upscale_x4/components: the noised picture, the UNet through the conditioning provider
//   UpscalePipelineGolden the fixture's pipeline cases in-process: every step's latents and the final latents
//                         (1e-3 absolute) and picture (3/255), the draw order
//   UpscaleSeededGolden   tests/ref/upscale_refs.* (tests/ref/make_upscale_refs.py): other sizes (a picture that
//                         is resized), noise levels (0, 350), schedulers (Euler, DPM++ 2M, DDIM eta 0.5), two
//                         images per prompt
//   UpscaleTilingGolden   diffusers' tiled VAE decode (tests/ref/upscale_refs.*), and the seams against a whole decode
//   UpscaleCascadeGolden  dmx generate --upscale-model (tests/ref/upscale_refs.json "cascade"): one generator through
//                         the base model and the upscaler, metadata and --from, the stage's errors
//   UpscaleErrorsGolden   bad input through the public API: nothing written
//   UpscaleCliGolden      the fixture case's dmx_args through the binary (it needs the fixture: golden), PNG
//                         metadata, exit 2 for a noise level above max_noise_level
//   UpscaleCli            exit codes without a model
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "dmx/upscale.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "loaders/upscale.h"
#include "pipelines/upscale.h"
#include "test_ref_cases.h"
#include "test_util.h"

namespace dmx::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr double kLatentTol = 1e-3;  // absolute, the fixtures' tolerance on latents
constexpr int kImageTol = 3;         // of 255, per channel

template <typename E>
void expect_throw_with(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected an exception containing '" << (needles.empty() ? "" : needles[0]) << "'";
  } catch (const E& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  if (!a.sizes().equals(b.sizes())) return INFINITY;
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

Image u8_image(const at::Tensor& u8) {  // [H, W, 3] uint8
  const at::Tensor t = u8.contiguous();
  Image img;
  img.height = static_cast<int>(t.size(0));
  img.width = static_cast<int>(t.size(1));
  img.channels = static_cast<int>(t.size(2));
  img.data.assign(t.data_ptr<uint8_t>(), t.data_ptr<uint8_t>() + t.numel());
  return img;
}

std::shared_ptr<loaders::UpscaleModels> fixture_upscaler() {
  static std::shared_ptr<loaders::UpscaleModels> m = loaders::load_upscale(fixture_model("upscale_x4"));
  return m;
}

// A copy of the fixture folder (components linked) with model_index.json replaced and parts left out.
std::string folder_variant(const std::string& name, const std::function<void(json&)>& edit,
                           const std::vector<std::string>& drop = {}) {
  const std::string src = fixture_model("upscale_x4");
  const std::string dir = temp_subdir("upscale-" + name);
  for (const char* c : {"tokenizer", "text_encoder", "unet", "vae", "scheduler", "low_res_scheduler"})
    if (std::find(drop.begin(), drop.end(), c) == drop.end())
      fs::create_directory_symlink(src + "/" + c, dir + "/" + c);
  json index = io::load_json_file(src + "/model_index.json", "model_index.json");
  edit(index);
  std::ofstream(dir + "/model_index.json") << index.dump(1);
  return dir;
}

// ---- loader ------------------------------------------------------------------------------------------------

TEST(UpscaleLoaderGolden, LoadsTheFolderWithItsSchedulesFromTheConfigs) {
  DMX_REQUIRE_FIXTURES();
  const auto m = fixture_upscaler();
  EXPECT_EQ(m->max_noise_level, 350);
  EXPECT_EQ(m->image_channels(), 3);
  EXPECT_DOUBLE_EQ(m->vae_scaling_factor, 0.08333);
  EXPECT_EQ(m->low_res_scheduler_config.value("_class_name", ""), "DDPMScheduler");
  EXPECT_EQ(m->sd->scheduler_config.value("_class_name", ""), "DDIMScheduler");
  // The low-res schedule is the config's: scaled_linear 1e-4..0.02, as the fixture's alphas_cumprod.
  const RefCase ref = load_ref("upscale_x4", "components");
  const auto low_res = m->make_low_res_scheduler();
  const at::Tensor acp = ref["low_res.alphas_cumprod"];
  for (int64_t t : {0, 20, 350, 999}) {
    const at::Tensor one = at::ones({1});
    const at::Tensor x = low_res->add_noise_at_timestep(one, at::zeros({1}), t);  // sqrt(acp[t])
    EXPECT_NEAR(x.item<double>(), std::sqrt(acp[t].item<double>()), 1e-7) << t;
  }
  const auto info = loaders::inspect_upscale_folder(fixture_model("upscale_x4"));
  EXPECT_EQ(info.max_noise_level, 350);
  EXPECT_EQ(info.vae_scale_factor, 4);
}

TEST(UpscaleLoaderGolden, RefusesOtherFoldersAndMissingOrMismatchedParts) {
  DMX_REQUIRE_FIXTURES();
  // A text-to-image folder is not an upscaler.
  expect_throw_with<InvalidArgument>([] { loaders::load_upscale(fixture_model("sd15")); },
                                     {"StableDiffusionUpscalePipeline", "StableDiffusionPipeline", "dmx generate"});
  expect_throw_with<InvalidArgument>([] { loaders::load_upscale(fixture_model("upscale_x4") + "/unet"); },
                                     {"no model_index.json"});
  expect_throw_with<InvalidArgument>([] { loaders::load_upscale(fixture_model("upscale_x4") + "/model_index.json"); },
                                     {"got a file"});
  // Missing parts, all named at once.
  const std::string no_parts = folder_variant("missing", [](json& j) { j.erase("low_res_scheduler"); }, {"vae"});
  expect_throw_with<FormatError>([&] { loaders::load_upscale(no_parts); },
                                 {"low_res_scheduler/ (not in model_index.json)", "vae/ (no such folder)"});
  // max_noise_level beyond the class embeddings (1000) / the low-res schedule.
  const std::string big = folder_variant("big-nl", [](json& j) { j["max_noise_level"] = 1000; });
  expect_throw_with<FormatError>([&] { loaders::load_upscale(big); }, {"max_noise_level 1000", "at most 999"});
  const std::string bad = folder_variant("bad-nl", [](json& j) { j["max_noise_level"] = "350"; });
  expect_throw_with<FormatError>([&] { loaders::load_upscale(bad); }, {"max_noise_level must be an integer"});
  // Absent: diffusers' default 350.
  const std::string dflt = folder_variant("default-nl", [](json& j) { j.erase("max_noise_level"); });
  EXPECT_EQ(loaders::inspect_upscale_folder(dflt).max_noise_level, 350);
}

// ---- components ----------------------------------------------------------------------------------------------

TEST(UpscaleGolden, NoisedLowResInputMatchesDiffusers) {
  DMX_REQUIRE_FIXTURES();
  const RefCase ref = load_ref("upscale_x4", "components");
  pipelines::UpscalePipeline pipe(fixture_upscaler());
  // VaeImageProcessor.preprocess: 2 * (u8 / 255) - 1.
  const at::Tensor image = pipelines::preprocess_low_res(u8_image(ref["input.image_u8"]), 4);
  EXPECT_LE(max_abs(image, ref["image"]), 1e-7);
  for (int nl : {0, 20, 60, 350}) {
    const at::Tensor noised = pipe.noise_image(image, ref["noise"], nl);
    const double err = max_abs(noised, ref["noised_image.nl" + std::to_string(nl)]);
    std::printf("[check] noised_image.nl%d: max_abs=%.3g\n", nl, err);
    EXPECT_LE(err, 1e-6) << nl;
  }
  expect_throw_with<InvalidArgument>([&] { pipe.noise_image(image, ref["noise"], 351); },
                                     {"noise_level must be in [0, 350]", "351"});
}

TEST(UpscaleGolden, RunParametersAreCheckedBeforeAnyDraw) {
  DMX_REQUIRE_FIXTURES();
  (void)fixture_model("upscale_x4");
  pipelines::UpscalePipeline pipe(fixture_upscaler());
  pipelines::UpscaleParams p;
  p.prompt = "x";
  p.image = at::zeros({1, 3, 8, 12});
  EXPECT_EQ(p.num_inference_steps, 75);  // diffusers' defaults
  EXPECT_EQ(p.guidance_scale, 9.0);
  EXPECT_EQ(p.noise_level, 20);
  pipe.check_params(p);
  auto refused = [&](const std::function<void(pipelines::UpscaleParams&)>& edit, const std::string& needle) {
    pipelines::UpscaleParams q = p;
    edit(q);
    expect_throw_with<InvalidArgument>([&] { pipe.check_params(q); }, {needle});
  };
  refused([](auto& q) { q.noise_level = 351; }, "noise_level must be in [0, 350]");
  refused([](auto& q) { q.noise_level = -1; }, "noise_level must be in [0, 350]");
  refused([](auto& q) { q.image = at::zeros({1, 4, 8, 12}); }, "image must be [1, 3, h, w]");
  refused([](auto& q) { q.image = at::zeros({1, 3, 8, 1028}); }, "at most 4096x4096");
  refused([](auto& q) { q.latents = at::zeros({1, 4, 8, 8}); }, "latents must have shape [1, 4, 8, 12]");
  refused([](auto& q) { q.image_noise = at::zeros({1, 3, 4, 4}); }, "image_noise must have shape");
  refused([](auto& q) { q.image = at::full({1, 3, 8, 12}, NAN); }, "non-finite");
}

// The UNet input is built by the pipeline's conditioning provider: the latents first, then the noised picture for
// both CFG halves, and the noise level as class label; the output is diffusers'.
TEST(UpscaleGolden, UNetThroughTheConditioningProviderMatchesDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const RefCase ref = load_ref("upscale_x4", "components");
  auto m = fixture_upscaler();
  for (int nl : {20, 60}) {
    pipelines::LowResConditioning cond(ref["noised_image.nl20"], nl);  // the case fed the nl20 picture to both
    const pipelines::ResidualRun run{*m->sd, 64, 96, 1, /*guided=*/true, false};
    cond.check(run);
    cond.prepare(run);
    models::UNetInputs in;
    in.sample = ref["unet.latents"];
    in.timestep = at::tensor(500.0f);
    in.encoder_hidden_states = ref["text.prompt_embeds"];
    auto sched = pipelines::make_scheduler(*m->sd, "", 10);
    const at::Tensor lat = ref["unet.latents"];
    const pipelines::ResidualStep step{0, 10, 500.0, lat, *sched, true};
    cond.apply(step, in);
    EXPECT_TRUE(in.sample.equal(ref["unet.input"]));
    EXPECT_TRUE(in.class_labels.equal(at::full({2}, nl, at::kLong)));
    const at::Tensor out = m->sd->unet->forward(in);
    const double err = max_abs(out, ref["unet.out.nl" + std::to_string(nl)]);
    std::printf("[check] unet.out.nl%d via LowResConditioning: max_abs=%.3g\n", nl, err);
    EXPECT_LE(err, 1e-4);
  }
}

// ---- whole runs ---------------------------------------------------------------------------------------------------

struct RunCheck {
  double worst_step = 0, latents = 0;
  int image = 0;
};

// One in-process run from the seed, every step's latents recorded.
RunCheck check_run(const std::string& what, const pipelines::UpscaleParams& p_in, const RefCase& ref,
                   const std::string& prefix, int num_steps, pipelines::UpscaleOutput* out_copy = nullptr) {
  pipelines::UpscaleParams p = p_in;
  std::vector<at::Tensor> steps;
  p.on_step_end = [&](int, double, at::Tensor& latents) { steps.push_back(latents.clone()); };
  p.show_progress = false;
  pipelines::UpscalePipeline pipe(fixture_upscaler());
  const auto out = pipe.run(p);
  RunCheck r;
  EXPECT_EQ(static_cast<int>(steps.size()), num_steps) << what;
  for (size_t i = 0; i < steps.size(); ++i) {
    const double e = max_abs(steps[i], ref[prefix + "step." + std::to_string(i) + ".latents"]);
    r.worst_step = std::max(r.worst_step, e);
  }
  r.latents = max_abs(out.latents, ref[prefix + "latents"]);
  const at::Tensor u8 = ref[prefix + "image_u8"];
  const at::Tensor want = u8.dim() == 3 ? u8.unsqueeze(0) : u8;
  const at::Tensor got = (out.images * 255).round().to(at::kByte);
  r.image = got.sizes().equals(want.sizes()) ? (got.to(at::kInt) - want.to(at::kInt)).abs().max().item<int>() : 255;
  std::printf("[check] %s: steps max_abs=%.3g, final latents max_abs=%.3g, picture max %d/255\n", what.c_str(),
              r.worst_step, r.latents, r.image);
  EXPECT_LE(r.worst_step, kLatentTol) << what;
  EXPECT_LE(r.latents, kLatentTol) << what;
  EXPECT_LE(r.image, kImageTol) << what;
  if (out_copy) *out_copy = out;
  return r;
}

class UpscalePipelineGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(UpscalePipelineGolden, PipelineCaseMatchesDiffusersStepByStep) {
  DMX_REQUIRE_FIXTURES();
  const RefCase ref = load_ref("upscale_x4", GetParam());
  const json& j = ref.meta;
  pipelines::UpscaleParams p;
  p.prompt = j.at("prompt");
  p.negative_prompt = j.at("negative_prompt");
  p.noise_level = j.at("noise_level");
  p.num_inference_steps = j.at("steps");
  p.guidance_scale = j.at("guidance_scale");
  // The case's scheduler: its dmx_args' --scheduler, or none (the folder's own).
  const auto& args = j.at("dmx_args");
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == "--scheduler") p.scheduler = args[i + 1];
  const Image low = load_image(fixtures_dir() + "/ref/upscale_x4/" + GetParam() + ".low.png", "--image");
  EXPECT_TRUE(u8_image(ref["input.image_u8"]).data == low.data);
  p.image = pipelines::preprocess_low_res(to_rgb(low), 4);
  at::Generator gen = pipelines::make_generator(j.at("seed").get<uint64_t>());
  p.generator = &gen;
  pipelines::UpscaleOutput out;
  check_run(GetParam(), p, ref, "", static_cast<int>(j.at("timesteps").size()), &out);
  std::vector<double> want;
  for (const auto& t : j.at("timesteps")) want.push_back(t.get<double>());
  EXPECT_EQ(out.timesteps, want);
  EXPECT_EQ(out.images.size(1), j.at("height").get<int>());
  EXPECT_EQ(out.images.size(2), j.at("width").get<int>());
  // The first draw noised the picture, the second made the latents: replaying them gives the same run.
  pipelines::UpscaleParams q = p;
  q.generator = nullptr;
  q.image_noise = ref["rng.0"];
  q.latents = ref["rng.1"];
  pipelines::UpscalePipeline pipe(fixture_upscaler());
  q.show_progress = false;
  EXPECT_TRUE(pipe.run(q).latents.equal(out.latents));
  EXPECT_LE(max_abs(out.noised_image, pipe.noise_image(p.image, ref["rng.0"], p.noise_level)), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Cases, UpscalePipelineGolden,
                         ::testing::Values("upscale_ddim_nl20", "upscale_ddim_nl60", "upscale_default_nl20"));

// ---- seed-driven cases of tests/ref --------------------------------------------------------------------------

const RefCase& seeded_refs() {
  static const RefCase r = load_ref_file(repo_ref_dir() + "/upscale_refs");
  return r;
}

class UpscaleSeededGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(UpscaleSeededGolden, SeedDrivenRunMatchesDiffusers) {
  DMX_REQUIRE_FIXTURES();
  (void)fixture_model("upscale_x4");
  const std::string name = GetParam();
  const json& c = seeded_refs().meta.at("cases").at(name);
  pipelines::UpscaleParams p;
  p.prompt = "a photograph of an astronaut riding a horse";
  p.negative_prompt = c.at("negative_prompt");
  p.noise_level = c.at("noise_level");
  p.num_inference_steps = c.at("steps");
  p.guidance_scale = c.at("guidance_scale");
  p.eta = c.at("eta");
  p.num_images_per_prompt = c.at("num_images");
  const std::string sched = c.at("scheduler");
  p.scheduler = sched == "dpm2m" ? "dpmpp_2m" : sched;
  const Image low = to_rgb(load_image(repo_ref_dir() + "/" + name + ".low.png", "--image"));
  EXPECT_EQ(low.width, c.at("width").get<int>());
  p.image = pipelines::preprocess_low_res(low, 4);
  at::Generator gen = pipelines::make_generator(c.at("seed").get<uint64_t>());
  p.generator = &gen;
  check_run(name, p, seeded_refs(), name + ".", static_cast<int>(c.at("timesteps").size()));
}

INSTANTIATE_TEST_SUITE_P(Cases, UpscaleSeededGolden,
                         ::testing::Values("upscale_seeded_euler_resize", "upscale_seeded_dpmpp2m_nl0",
                                           "upscale_seeded_ddim_eta_n2"));

// diffusers' AutoencoderKL tiled_decode (64-pixel tiles, overlap 0.25 on a 96x144 picture: 3 x 4 tiles), and how far
// tiling moves the picture from the whole decode (the seams).
TEST(UpscaleTilingGolden, TiledVaeDecodeIsDiffusersTiledDecode) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const RefCase& ref = seeded_refs();
  (void)fixture_model("upscale_x4");  // the model (loaded once per process) is the fixture's
  pipelines::UpscalePipeline pipe(fixture_upscaler());
  const at::Tensor z = ref["upscale_seeded_dpmpp2m_nl0.latents"] / 0.08333;
  pipelines::VaeTiling tiling;
  tiling.enabled = true;
  tiling.tile_sample_size = 64;
  const at::Tensor tiled = pipe.decode_raw(z, tiling);
  const at::Tensor whole = pipe.decode_raw(z, {});
  const double err_tiled = max_abs(tiled, ref["tiled.decode"]);
  const double err_whole = max_abs(whole, ref["untiled.decode"]);
  const double seam = max_abs(tiled, whole);
  std::printf(
      "[check] tiled decode vs diffusers' tiled: %.3g; whole vs diffusers': %.3g; tiled vs whole (seams): "
      "%.3g (diffusers: %.3g)\n",
      err_tiled, err_whole, seam, ref.meta.at("tiling").at("seam_max_abs").get<double>());
  EXPECT_LE(err_tiled, 1e-4);
  EXPECT_LE(err_whole, 1e-4);
  EXPECT_GT(seam, 1e-3);  // tiling is not the whole decode (a tiled path that decoded whole would pass the rest)
  // Latents within one tile are decoded whole.
  EXPECT_TRUE(pipe.decode_raw(z.slice(2, 0, 16).slice(3, 0, 16), tiling)
                  .equal(pipe.decode_raw(z.slice(2, 0, 16).slice(3, 0, 16), {})));
}

// The cascade (dmx generate --upscale-model) through the public API: the base run, then the upscaler on its
// 8-bit picture with the same prompts, one generator through both (tests/ref/upscale_refs.json "cascade").
TEST(UpscaleCascadeGolden, GenerateThenUpscaleMatchesDiffusersWithOneGenerator) {
  DMX_REQUIRE_FIXTURES();
  const RefCase& ref = seeded_refs();
  const std::string dir = temp_subdir("upscale-cascade");
  GenerateOptions o;
  o.model = fixture_model("test");
  o.prompt = "a photograph of an astronaut riding a horse";
  o.negative_prompt = "low quality, blurry";
  o.width = o.height = 32;
  o.steps = 5;
  o.guidance_scale = 7.5;
  o.scheduler = "ddim";
  o.seed = 3101;
  o.upscale_model = fixture_model("upscale_x4");
  o.upscale_noise_level = 30;
  o.upscale_steps = 4;
  o.upscale_guidance_scale = 9.0;
  o.output = dir + "/cascade.png";
  o.save_latents = dir + "/cascade.safetensors";
  o.progress = false;
  generate(o);
  const io::TensorMap saved = io::load_safetensors(o.save_latents);
  const double base = max_abs(saved.at("latents"), ref["cascade.base_latents"]);
  const double up = max_abs(saved.at("upscale_latents"), ref["cascade.latents"]);
  const Image png = load_image(o.output, "test");
  const int pic = max_u8_diff(png, ref["cascade.image_u8"][0]);
  std::printf("[check] cascade: base latents max_abs=%.3g, upscaled latents max_abs=%.3g, picture max %d/255\n", base,
              up, pic);
  EXPECT_LE(base, kLatentTol);
  EXPECT_LE(up, kLatentTol);
  EXPECT_LE(pic, kImageTol);
  EXPECT_EQ(png.width, 128);
  std::string params;
  for (const auto& kv : read_png_text(o.output))
    if (kv.first == "parameters") params = kv.second;
  for (const char* s : {"Size: 32x32", "Upscale model: upscale_x4", "Upscale noise level: 30", "Upscale steps: 4",
                        "Upscale CFG scale: 9"})
    EXPECT_NE(params.find(s), std::string::npos) << s << " not in: " << params;
  // --from reads the cascade's settings back.
  const GenerateOptions back = parse_parameters(params);
  EXPECT_EQ(back.upscale_noise_level, 30);
  EXPECT_EQ(back.upscale_steps, 4);
  EXPECT_EQ(back.upscale_guidance_scale, 9.0);
  EXPECT_EQ(back.width, 32);
  // The upscaler's bad input is refused before the base run: nothing more is written.
  GenerateOptions bad = o;
  bad.output = dir + "/bad.png";
  bad.save_latents.clear();
  bad.upscale_noise_level = 351;
  expect_throw_with<InvalidArgument>([&] { generate(bad); }, {"--upscale-noise-level must be in [0, 350]"});
  bad.upscale_noise_level = 20;
  bad.upscale_model = fixture_model("sd15");
  expect_throw_with<InvalidArgument>([&] { generate(bad); }, {"--upscale-model", "StableDiffusionUpscalePipeline"});
  bad.upscale_model = fixture_model("upscale_x4");
  bad.width = bad.height = 1032;
  expect_throw_with<InvalidArgument>([&] { generate(bad); }, {"--upscale-model", "at most 1024", "1032x1032"});
  EXPECT_FALSE(fs::exists(bad.output));
}

// ---- errors through the API -------------------------------------------------------------------------------------

UpscaleOptions fixture_options(const std::string& out_dir) {
  UpscaleOptions o;
  o.model = fixture_model("upscale_x4");
  o.image = fixtures_dir() + "/ref/upscale_x4/upscale_ddim_nl20.low.png";
  o.prompt = "a photograph of an astronaut riding a horse";
  o.output = out_dir + "/out.png";
  o.save_latents = out_dir + "/out.safetensors";
  o.steps = 2;
  o.seed = 1;
  o.progress = false;
  return o;
}

void expect_nothing_written(const std::string& dir) {
  EXPECT_TRUE(fs::is_empty(dir)) << dir << " holds files after a refused run";
}

TEST(UpscaleErrorsGolden, BadInputIsRefusedBeforeAnythingIsWritten) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("upscale-errors");
  {
    UpscaleOptions o = fixture_options(dir);
    o.noise_level = 351;
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"--noise-level must be in [0, 350]", "351"});
  }
  {
    UpscaleOptions o = fixture_options(dir);
    o.model = fixture_model("sd15");
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"--model", "StableDiffusionUpscalePipeline"});
  }
  {  // unreadable picture
    const std::string bad = dir + "-bad.png";
    std::ofstream(bad) << "not a picture";
    UpscaleOptions o = fixture_options(dir);
    o.image = bad;
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"--image"});
  }
  {  // a picture whose 4x output would pass 4096 x 4096 (pixel limit on the header)
    Image big;
    big.width = 1100;
    big.height = 1000;
    big.channels = 3;
    big.data.assign(static_cast<size_t>(big.width) * big.height * 3, 128);
    const std::string path = dir + "-big.png";
    const auto png = encode_png(big);
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(png.data()), static_cast<long>(png.size()));
    UpscaleOptions o = fixture_options(dir);
    o.image = path;
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"--image", "1100x1000"});
  }
  {  // too wide for the output limit although within the pixel limit
    Image wide;
    wide.width = 1040;
    wide.height = 8;
    wide.channels = 3;
    wide.data.assign(static_cast<size_t>(wide.width) * wide.height * 3, 128);
    const std::string path = dir + "-wide.png";
    const auto png = encode_png(wide);
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(png.data()), static_cast<long>(png.size()));
    UpscaleOptions o = fixture_options(dir);
    o.image = path;
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"at most 1024", "1040x8"});
  }
  {  // the memory the 4x output needs, against a budget
    UpscaleOptions o = fixture_options(dir);
    o.memory_limit_mb = 1;
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"would need about", "--memory-limit"});
  }
  {
    UpscaleOptions o = fixture_options(dir);
    o.vae_tiling = "sometimes";
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"--vae-tiling must be auto, on or off"});
  }
  {
    UpscaleOptions o = fixture_options(dir);
    o.scheduler = "nope";
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"--scheduler must be one of"});
  }
  {  // an output that is an input, or that exists (without --overwrite)
    const std::string low = dir + "-low.png";
    fs::copy_file(fixtures_dir() + "/ref/upscale_x4/upscale_ddim_nl20.low.png", low,
                  fs::copy_options::overwrite_existing);
    UpscaleOptions o = fixture_options(dir);
    o.image = low;
    o.output = low;
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"is the input --image"});
    o.output = dir + "/out.png";
    o.save_latents = low;
    o.image = fixtures_dir() + "/ref/upscale_x4/upscale_ddim_nl20.low.png";
    expect_throw_with<InvalidArgument>([&] { upscale(o); }, {"--save-latents"});
  }
  expect_nothing_written(dir);
}

// ---- the binary ---------------------------------------------------------------------------------------------

// The fixture case's command line (dmx_args, `data:` = the fixtures folder) with the output options added.
TEST(UpscaleCliGolden, FixtureCommandLineSavesTheReferenceLatents) {
  DMX_REQUIRE_FIXTURES();
  const RefCase ref = load_ref("upscale_x4", "upscale_ddim_nl20");
  std::vector<std::string> args;
  for (const auto& a : ref.meta.at("dmx_args")) {
    std::string s = a.get<std::string>();
    if (s.rfind("data:", 0) == 0) s = fixtures_dir() + "/" + s.substr(5);
    args.push_back(s);
  }
  const std::string dir = temp_subdir("upscale-cli");
  const std::vector<std::string> outputs = {"--output", dir + "/up.png", "--save-latents", dir + "/up.safetensors",
                                            "--quiet"};
  // Above the model's max_noise_level: exit 2, nothing written.
  std::vector<std::string> bad = args;
  for (size_t i = 0; i + 1 < bad.size(); ++i)
    if (bad[i] == "--noise-level") bad[i + 1] = "351";
  bad.insert(bad.end(), outputs.begin(), outputs.end());
  const CliRun refused = dmx_run(bad);
  EXPECT_EQ(refused.code, 2) << refused.output;
  EXPECT_NE(refused.output.find("--noise-level must be in [0, 350]"), std::string::npos) << refused.output;
  EXPECT_TRUE(fs::is_empty(dir));

  args.insert(args.end(), outputs.begin(), outputs.end());
  const CliRun r = dmx_run(args);
  ASSERT_EQ(r.code, 0) << r.output;
  const io::TensorMap saved = io::load_safetensors(dir + "/up.safetensors");
  const double err = max_abs(saved.at("latents"), ref["latents"]);
  std::printf("[check] dmx upscale (CLI) latents: max_abs=%.3g\n", err);
  EXPECT_LE(err, kLatentTol);
  const Image png = load_image(dir + "/up.png", "test");
  EXPECT_EQ(png.width, 128);
  EXPECT_EQ(png.height, 192);
  EXPECT_LE(max_u8_diff(png, ref["image_u8"]), kImageTol);
  std::string params;
  for (const auto& kv : read_png_text(dir + "/up.png"))
    if (kv.first == "parameters") params = kv.second;
  for (const char* s : {"a photograph of an astronaut riding a horse\nNegative prompt: low quality, blurry\n",
                        "Steps: 6", "Sampler: DDIM", "CFG scale: 7.5", "Seed: 1201", "Size: 128x192",
                        "Upscale noise level: 20", "Upscale source size: 32x48"})
    EXPECT_NE(params.find(s), std::string::npos) << s << " not in: " << params;
  // --from re-runs those settings (prompts, steps, sampler, guidance, seed, noise level) on the picture given again.
  const CliRun again =
      dmx_run({"upscale", "--model", args[2], "--image", args[4], "--from", dir + "/up.png", "--output",
               dir + "/again.png", "--save-latents", dir + "/again.safetensors", "--quiet"});
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_TRUE(io::load_safetensors(dir + "/again.safetensors").at("latents").equal(saved.at("latents")));
}

TEST(UpscaleCli, ExitCodes) {
  const std::string dir = temp_subdir("upscale-cli-codes");
  const std::string model = temp_subdir("upscale-cli-codes-model");
  CliRun help = dmx_run({"upscale", "--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.output.find("--noise-level"), std::string::npos);
  CliRun missing = dmx_run({"upscale", "--model", model, "--prompt", "x", "--output", dir + "/o.png"});
  EXPECT_EQ(missing.code, 2);
  EXPECT_NE(missing.output.find("--image is required"), std::string::npos) << missing.output;
  CliRun not_folder =
      dmx_run({"upscale", "--model", model, "--image", dir + "/none.png", "--prompt", "x", "--output", dir + "/o.png"});
  EXPECT_EQ(not_folder.code, 2) << not_folder.output;
  CliRun negative = dmx_run({"upscale", "--model", model, "--image", dir + "/none.png", "--prompt", "x",
                             "--noise-level", "-1", "--output", dir + "/o.png"});
  EXPECT_EQ(negative.code, 2);
  EXPECT_NE(negative.output.find("--noise-level"), std::string::npos) << negative.output;
  EXPECT_TRUE(fs::is_empty(dir));
}

}  // namespace
}  // namespace dmx::test
