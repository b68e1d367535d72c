// Tests for the Stable unCLIP pipelines and commands (issue 16, "Real checkpoints, equal to the reference"):
// StableUnCLIPPipeline (text -> prior -> noised CLIP image embedding -> decoder) and StableUnCLIPImg2ImgPipeline
// (image variations) against diffusers 0.27.2, `dmx generate` on an unCLIP folder, `dmx variations`, `dmx embed`.
// Suites:
//   StableUnCLIPGolden, StableUnCLIPVariationsGolden
//                             in-process runs of the fixtures' seed-driven cases unclip/unclip_nl0, unclip_nl100,
//                             variations_nl0, variations_nl50: the whole prior run, the noised embedding, every
//                             decoder step; the fixtures' tolerances (1e-3 absolute on latents, 3/255 on the
//                             picture)
//   UnCLIPInputGolden         bad input on the fixture folders: exit-2 errors, nothing written
//   UnCLIPCommandGolden       the fixtures' recorded command lines (dmx_args) run by the dmx binary; dmx embed
//   StableUnCLIPSeededGolden  tests/ref/{unclip,variations}_seeded_* (tests/ref/make_seeded_refs.py): settings the
//                             fixtures lack, through the recorded command lines
//   UnCLIPMetadataUnit        the PNG "parameters" fields
//   UnCLIPCli                 help and exit codes of the three commands (no fixtures)
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "dmx/unclip.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "loaders/unclip.h"
#include "pipelines/stable_unclip.h"
#include "test_ref_cases.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr double kLatentTol = 1e-3;  // the fixtures' tolerance: absolute, on latents
constexpr int kPictureTol = 3;       // of 255, per channel
constexpr double kEmbedTol = 1e-5;   // prior run and embeddings: relative to the largest reference value

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  if (!a.sizes().equals(b.sizes())) return 1e30;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

Image u8_image(const at::Tensor& u8) {  // [H, W, C] uint8
  const at::Tensor t = u8.contiguous();
  Image img;
  img.height = static_cast<int>(t.size(0));
  img.width = static_cast<int>(t.size(1));
  img.channels = static_cast<int>(t.size(2));
  img.data.assign(t.data_ptr<uint8_t>(), t.data_ptr<uint8_t>() + t.numel());
  return img;
}

int picture_diff(const at::Tensor& images01, const at::Tensor& ref_u8) {  // [H, W, 3] float in [0, 1] vs uint8
  const at::Tensor u8 = (images01 * 255).round().clamp(0, 255).to(at::kInt);
  return (u8 - ref_u8.to(at::kInt)).abs().max().item<int>();
}

struct Folders {
  std::shared_ptr<loaders::StableDiffusionModels> decoder_t2i, decoder_i2i;
  std::shared_ptr<loaders::UnCLIPComponents> t2i, i2i;
};
const Folders& folders() {
  static Folders f = [] {
    Folders x;
    x.t2i = loaders::load_unclip_components(fixture_model("unclip"));
    x.decoder_t2i = loaders::load_stable_diffusion(fixture_model("unclip"));
    x.i2i = loaders::load_unclip_components(fixture_model("unclip_img2img"));
    x.decoder_i2i = loaders::load_stable_diffusion(fixture_model("unclip_img2img"));
    return x;
  }();
  return f;
}

// Compares a run's recorded decoder steps and final outputs with a case; returns the final latents' error.
double check_decoder(const std::string& name, const RefCase& ref, const pipelines::StableUnCLIPOutput& out,
                     const std::vector<at::Tensor>& steps) {
  std::vector<double> ts(out.timesteps.begin(), out.timesteps.end());
  EXPECT_EQ(ts, ref.meta.at("timesteps").get<std::vector<double>>()) << name;
  double worst_step = 0;
  for (size_t i = 0; i < steps.size(); ++i)
    worst_step = std::max(worst_step, max_abs(steps[i], ref["step." + std::to_string(i) + ".latents"]));
  EXPECT_EQ(steps.size(), ts.size());
  const double lat = max_abs(out.latents, ref["latents"]);
  const int pic = picture_diff(out.images[0], ref["image_u8"]);
  std::printf("[check] %s: decoder steps max |diff| %.3g, final latents %.3g (tol %.0e), picture %d/255 (tol %d)\n",
              name.c_str(), worst_step, lat, kLatentTol, pic, kPictureTol);
  EXPECT_LE(worst_step, kLatentTol) << name;
  EXPECT_LE(lat, kLatentTol) << name;
  EXPECT_LE(pic, kPictureTol) << name;
  return lat;
}

// ---------------------------------------------------------------------------------------------------------------
// In-process: the fixtures' seed-driven cases.

class StableUnCLIPGolden : public ::testing::TestWithParam<std::string> {};
class StableUnCLIPVariationsGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(StableUnCLIPGolden, TextToImageEqualsDiffusers) {
  DMX_REQUIRE_FIXTURES();
  const std::string name = GetParam();
  const RefCase ref = load_ref("unclip", name);
  const auto& m = ref.meta;
  const auto& f = folders();
  pipelines::StableUnCLIPPipeline pipe(f.decoder_t2i, f.t2i);
  ASSERT_TRUE(pipe.text_to_image());
  pipelines::StableUnCLIPParams p;
  p.prompt = m.at("prompt").get<std::string>();
  p.width = m.at("width");
  p.height = m.at("height");
  p.num_inference_steps = m.at("steps");
  p.guidance_scale = m.at("guidance_scale");
  p.scheduler = "ddim";
  p.noise_level = m.at("noise_level");
  p.prior_num_inference_steps = m.at("prior_steps");
  p.prior_guidance_scale = m.at("prior_guidance_scale");
  p.show_progress = false;
  at::Generator gen = pipelines::make_generator(m.at("seed").get<uint64_t>());
  p.generator = &gen;
  std::vector<at::Tensor> prior_steps, steps;
  p.on_prior_step_end = [&](int, double, const at::Tensor& l) { prior_steps.push_back(l.clone()); };
  p.on_step_end = [&](int, double, at::Tensor& l) { steps.push_back(l.clone()); };
  const pipelines::StableUnCLIPOutput out = pipe.run(p);
  // The whole prior sampling run, step by step.
  EXPECT_EQ(out.prior_timesteps, m.at("prior_timesteps").get<std::vector<double>>());
  ASSERT_EQ(prior_steps.size(), out.prior_timesteps.size());
  double worst = 0;
  for (size_t i = 0; i < prior_steps.size(); ++i)
    worst = std::max(worst, check_close(name + " prior.step." + std::to_string(i), prior_steps[i],
                                        ref["prior.step." + std::to_string(i) + ".latents"], kEmbedTol));
  EXPECT_LE(worst, kEmbedTol);
  DMX_EXPECT_CLOSE(name + " prior.image_embeds", out.image_embeds, ref["prior.image_embeds"], kEmbedTol);
  DMX_EXPECT_CLOSE(name + " noised_image_embeds", out.noised_image_embeds, ref["noised_image_embeds"], kEmbedTol);
  check_decoder(name, ref, out, steps);
  // Without the image embedding the latents would be this far off: the comparison sees the feature.
  EXPECT_GT(m.at("max_abs_diff_vs_zero_image_embeds").get<double>(), 100 * kLatentTol);
}

TEST_P(StableUnCLIPVariationsGolden, VariationsEqualDiffusers) {
  DMX_REQUIRE_FIXTURES();
  const std::string name = GetParam();
  const RefCase ref = load_ref("unclip", name);
  const auto& m = ref.meta;
  const auto& f = folders();
  pipelines::StableUnCLIPPipeline pipe(f.decoder_i2i, f.i2i);
  ASSERT_FALSE(pipe.text_to_image());
  pipelines::StableUnCLIPParams p;
  p.prompt = m.at("prompt").get<std::string>();
  p.num_inference_steps = m.at("steps");
  p.guidance_scale = m.at("guidance_scale");
  p.scheduler = "ddim";
  p.noise_level = m.at("noise_level");
  p.image = u8_image(ref["input.image_u8"]);
  p.show_progress = false;
  at::Generator gen = pipelines::make_generator(m.at("seed").get<uint64_t>());
  p.generator = &gen;
  std::vector<at::Tensor> steps;
  p.on_step_end = [&](int, double, at::Tensor& l) { steps.push_back(l.clone()); };
  const pipelines::StableUnCLIPOutput out = pipe.run(p);
  EXPECT_EQ(out.latents.size(3) * 8, m.at("width").get<int64_t>());  // unet.sample_size x 8 by default
  DMX_EXPECT_CLOSE(name + " clip_image_embeds", out.image_embeds, ref["clip_image_embeds"], kEmbedTol);
  DMX_EXPECT_CLOSE(name + " noised_image_embeds", out.noised_image_embeds, ref["noised_image_embeds"], kEmbedTol);
  check_decoder(name, ref, out, steps);
}

INSTANTIATE_TEST_SUITE_P(Cases, StableUnCLIPGolden, ::testing::Values("unclip_nl0", "unclip_nl100"));
INSTANTIATE_TEST_SUITE_P(Cases, StableUnCLIPVariationsGolden, ::testing::Values("variations_nl0", "variations_nl50"));

// ---------------------------------------------------------------------------------------------------------------
// The fixtures' recorded command lines through the binary.

// dmx_args with `data:` resolved against the fixtures folder, plus the outputs.
CliRun run_fixture_args(const RefCase& ref, const std::string& dir) {
  std::vector<std::string> args;
  for (const auto& a : ref.meta.at("dmx_args")) {
    std::string s = a.get<std::string>();
    if (s.rfind("data:", 0) == 0) s = fixtures_dir() + "/" + s.substr(5);
    args.push_back(s);
  }
  args.insert(args.end(), {"--save-latents", dir + "/latents.safetensors", "--output", dir + "/out.png", "--quiet"});
  return dmx_run(args);
}

void check_command_outputs(const std::string& name, const RefCase& ref, const std::string& dir, int n) {
  const double lat = max_abs(io::load_safetensors(dir + "/latents.safetensors").at("latents"), ref["latents"]);
  EXPECT_LE(lat, kLatentTol) << name;
  const at::Tensor u8 = ref["image_u8"].dim() == 3 ? ref["image_u8"].unsqueeze(0) : ref["image_u8"];
  int worst = 0;
  for (int i = 0; i < n; ++i) {
    const std::string png = n == 1 ? dir + "/out.png" : dir + "/out-" + std::to_string(i) + ".png";
    worst = std::max(worst, max_u8_diff(load_image(png, "output"), u8[i]));
  }
  std::printf("[check] %s (dmx binary): latents max |diff| %.3g (tol %.0e), pictures %d/255 (tol %d)\n", name.c_str(),
              lat, kLatentTol, worst, kPictureTol);
  EXPECT_LE(worst, kPictureTol) << name;
}

TEST(UnCLIPCommandGolden, GenerateRunsTheFixtureCommandLine) {
  DMX_REQUIRE_FIXTURES();
  const RefCase ref = load_ref("unclip", "unclip_nl100");
  const std::string dir = temp_subdir("UnCLIPCommandGolden-generate");
  const CliRun r = run_fixture_args(ref, dir);
  ASSERT_EQ(r.code, 0) << r.output;
  check_command_outputs("unclip_nl100", ref, dir, 1);
  // The picture carries the unCLIP settings, and --from reads them back.
  const std::string params = read_image_parameters(dir + "/out.png");
  EXPECT_NE(params.find("Prior steps: 5, Prior CFG scale: 4, Noise level: 100"), std::string::npos) << params;
  const GenerateOptions back = parse_parameters(params);
  EXPECT_EQ(back.prior_steps, 5);
  EXPECT_EQ(back.noise_level, 100);
  EXPECT_EQ(back.steps, 6);
}

TEST(UnCLIPCommandGolden, VariationsRunsTheFixtureCommandLine) {
  DMX_REQUIRE_FIXTURES();
  const RefCase ref = load_ref("unclip", "variations_nl0");
  const std::string dir = temp_subdir("UnCLIPCommandGolden-variations");
  const CliRun r = run_fixture_args(ref, dir);
  ASSERT_EQ(r.code, 0) << r.output;
  check_command_outputs("variations_nl0", ref, dir, 1);
  EXPECT_NE(read_image_parameters(dir + "/out.png").find("Noise level: 0"), std::string::npos);
}

TEST(UnCLIPCommandGolden, EmbedPrintsAndSavesTheCosineMatrix) {
  DMX_REQUIRE_FIXTURES();
  const RefCase comp = load_ref("unclip", "components");
  const std::string dir = temp_subdir("UnCLIPCommandGolden-embed");
  save_png(dir + "/exact.png", u8_image(comp["vision.exact.image_u8"]));
  save_png(dir + "/resize.png", u8_image(comp["vision.resize.image_u8"]));
  const std::string prompt = "a photograph of an astronaut riding a horse";  // the components' prior_text prompt
  const CliRun r = dmx_run({"embed", "--model", fixture_model("unclip_img2img"), "--model", fixture_model("unclip"),
                            "--image", dir + "/exact.png", "--image", dir + "/resize.png", "--prompt", prompt,
                            "--output", dir + "/embeds.safetensors"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("cosine similarity"), std::string::npos) << r.output;
  const io::TensorMap t = io::load_safetensors(dir + "/embeds.safetensors");
  const at::Tensor images = at::cat({comp["vision.exact.image_embeds"], comp["vision.resize.image_embeds"]});
  const at::Tensor text = comp["prior_text.text_embeds"].narrow(0, 0, 1);  // rows [prompt, '']
  DMX_EXPECT_CLOSE("embed image_embeds", t.at("image_embeds"), images, kEmbedTol);
  DMX_EXPECT_CLOSE("embed text_embeds", t.at("text_embeds"), text, kEmbedTol);
  const at::Tensor all = at::cat({images, text}).to(at::kDouble);
  const at::Tensor unit = all / all.norm(2, 1, true);
  DMX_EXPECT_CLOSE("embed cosine", t.at("cosine"), unit.matmul(unit.t()).to(at::kFloat), kEmbedTol);
  // The same through the API, as JSON.
  EmbedOptions o;
  o.models = {fixture_model("unclip_img2img")};
  o.images = {dir + "/exact.png"};
  o.output = dir + "/embeds.json";
  o.progress = false;
  const EmbedResult e = embed(o);
  ASSERT_EQ(e.labels.size(), 1u);
  EXPECT_NEAR(e.cosine[0][0], 1.0, 1e-9);
  const json j = json::parse(read_text_file(dir + "/embeds.json", "embeds.json", 1 << 20));
  EXPECT_EQ(j.at("embeddings").at(0).size(), 32u);
}

// ---------------------------------------------------------------------------------------------------------------
// Seed-driven cases the fixtures lack (tests/ref/make_seeded_refs.py), through the recorded command lines.

class StableUnCLIPSeededGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(StableUnCLIPSeededGolden, CommandLineEqualsDiffusers) {
  DMX_REQUIRE_FIXTURES();
  const std::string name = GetParam();
  const RefCase ref = load_ref_file(repo_ref_dir() + "/" + name);
  const std::string model_dir = ref.meta.at("model_dir").get<std::string>();  // models/<variant>
  const std::string dir = temp_subdir("StableUnCLIPSeededGolden-" + name);
  const bool variations = ref.meta.contains("image");
  std::map<std::string, std::string> paths = {{"--model", fixture_model(model_dir.substr(model_dir.rfind('/') + 1))},
                                              {"--save-latents", dir + "/latents.safetensors"},
                                              {"--output", dir + "/out.png"}};
  if (variations) paths["--image"] = repo_ref_dir() + "/" + ref.meta.at("image").get<std::string>();
  const CliRun r =
      run_recorded_command(ref.meta.at("dmx").get<std::string>(), variations ? "variations" : "generate", paths);
  ASSERT_EQ(r.code, 0) << r.output;
  check_command_outputs(name, ref, dir, ref.meta.at("num_images").get<int>());
}

INSTANTIATE_TEST_SUITE_P(Seeded, StableUnCLIPSeededGolden,
                         ::testing::Values("unclip_seeded_defaults", "unclip_seeded_neg_n2_euler_a",
                                           "unclip_seeded_unguided_default", "variations_seeded_crop_n2_dpm"));

// ---------------------------------------------------------------------------------------------------------------
// Bad input: exit-2 errors (InvalidArgument, FormatError, Unsupported) naming the parameter, nothing written.

template <typename E>
void expect_refused(const std::function<void()>& f, const std::string& needle, const std::string& output) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type for '" << needle << "': " << e.what();
  }
  EXPECT_FALSE(path_exists(output)) << output << " was written";
}

TEST(UnCLIPInputGolden, BadInputIsRefusedAndNothingWritten) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = temp_subdir("StableUnCLIPGolden-bad");
  const std::string out = dir + "/out.png";
  GenerateOptions g;
  g.model = fixture_model("unclip");
  g.prompt = "a cat";
  g.steps = 2;
  g.prior_steps = 2;
  g.output = out;
  g.save_latents = dir + "/latents.safetensors";
  g.progress = false;
  auto gen = [&](const std::function<void(GenerateOptions&)>& edit) {
    GenerateOptions o = g;
    edit(o);
    return [o] { generate(o); };
  };
  // Noise levels outside the image-noising scheduler's range [0, 999].
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.noise_level = 1000; }),
                                  "--noise-level must be in [0, 999]", out);
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.noise_level = -1; }), "--noise-level", out);
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.prior_steps = 0; }), "--prior-steps", out);
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.prior_guidance_scale = -1; }),
                                  "--prior-guidance-scale", out);
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.width = 60; }), "width must be a multiple of 8", out);
  // Options a Stable unCLIP run does not take.
  expect_refused<InvalidArgument>(gen([&](GenerateOptions& o) { o.init_image = dir + "/x.png"; }), "--init-image", out);
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.controlnets = {"cn"}; }), "--controlnet", out);
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.loras = {"l.safetensors"}; }), "--lora", out);
  // unCLIP options on another model; the variations folder given to generate, and the other way round.
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.model = fixture_model("sd15"); }),
                                  "--prior-steps applies to Stable unCLIP", out);
  expect_refused<InvalidArgument>(gen([](GenerateOptions& o) { o.model = fixture_model("unclip_img2img"); }),
                                  "dmx variations", out);
  // A folder missing the prior.
  const std::string broken = dir + "/unclip-no-prior";
  fs::copy(fixture_model("unclip"), broken, fs::copy_options::recursive);
  fs::remove_all(broken + "/prior");
  expect_refused<FormatError>(gen([&](GenerateOptions& o) { o.model = broken; }), "missing prior/", out);

  VariationsOptions v;
  v.model = fixture_model("unclip_img2img");
  v.image = fixtures_dir() + "/ref/unclip/variations_nl50.image.png";
  v.steps = 2;
  v.output = out;
  v.progress = false;
  auto var = [&](const std::function<void(VariationsOptions&)>& edit) {
    VariationsOptions o = v;
    edit(o);
    return [o] { variations(o); };
  };
  const std::string garbage = dir + "/garbage.png";
  std::ofstream(garbage) << "not a picture";
  expect_refused<InvalidArgument>(var([&](VariationsOptions& o) { o.image = garbage; }), "--image", out);
  expect_refused<InvalidArgument>(var([&](VariationsOptions& o) { o.image = dir + "/missing.png"; }), "--image", out);
  expect_refused<InvalidArgument>(var([](VariationsOptions& o) { o.noise_level = 1000; }),
                                  "--noise-level must be in [0, 999]", out);
  expect_refused<InvalidArgument>(var([](VariationsOptions& o) { o.model = fixture_model("unclip"); }),
                                  "StableUnCLIPImg2ImgPipeline", out);
  expect_refused<InvalidArgument>(var([](VariationsOptions& o) { o.scheduler = "warp"; }), "--scheduler", out);
  const std::string no_encoder = dir + "/img2img-no-encoder";
  fs::copy(fixture_model("unclip_img2img"), no_encoder, fs::copy_options::recursive);
  fs::remove_all(no_encoder + "/image_encoder");
  expect_refused<FormatError>(var([&](VariationsOptions& o) { o.model = no_encoder; }), "missing image_encoder/", out);

  EmbedOptions e;
  e.models = {fixture_model("unclip")};
  e.images = {v.image};
  e.output = dir + "/e.safetensors";
  e.progress = false;
  expect_refused<InvalidArgument>([&] { embed(e); }, "--image needs a StableUnCLIPImg2ImgPipeline", e.output);
  e.images.clear();
  e.prompts = {"x"};
  e.models = {fixture_model("unclip_img2img")};
  expect_refused<InvalidArgument>([&] { embed(e); }, "--prompt needs a StableUnCLIPPipeline", e.output);
  e.output = dir + "/e.txt";
  expect_refused<InvalidArgument>([&] { embed(e); }, "--output must end in .safetensors or .json", e.output);
}

// ---------------------------------------------------------------------------------------------------------------

TEST(UnCLIPMetadataUnit, ParametersCarryThePriorAndNoiseLevel) {
  GenerateOptions o;
  o.prompt = "a cat";
  o.steps = 20;
  o.guidance_scale = 10;
  o.scheduler = "ddim";
  o.prior_steps = 25;
  o.prior_guidance_scale = 4.5;
  o.noise_level = 0;
  const std::string text = format_parameters(o, 7, 768, 768, "unclip");
  EXPECT_NE(text.find("Prior steps: 25, Prior CFG scale: 4.5, Noise level: 0"), std::string::npos) << text;
  const GenerateOptions back = parse_parameters(text);
  EXPECT_EQ(back.prior_steps, 25);
  EXPECT_EQ(back.prior_guidance_scale, 4.5);
  EXPECT_EQ(back.noise_level, 0);
  // Other runs carry none of them.
  GenerateOptions plain;
  plain.prompt = "a cat";
  const GenerateOptions none = parse_parameters(format_parameters(plain, 7, 64, 64, "sd15"));
  EXPECT_FALSE(none.prior_steps || none.prior_guidance_scale || none.noise_level);
}

TEST(UnCLIPCli, HelpAndExitCodes) {
  for (const std::string cmd : {"variations", "embed"}) {
    const CliRun help = dmx_run({cmd, "--help"});
    EXPECT_EQ(help.code, 0) << help.output;
    EXPECT_NE(help.output.find("--model"), std::string::npos) << help.output;
  }
  const CliRun help = dmx_run({"generate", "--help"});
  EXPECT_NE(help.output.find("--prior-guidance-scale"), std::string::npos) << help.output;
  const std::string dir = temp_subdir("UnCLIPCli");
  const std::string out = dir + "/out.png";
  const std::string sd = tiny_model_dir("test");
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{"generate", "--model", sd, "--prompt", "x", "--noise-level", "5", "--output", out}, "--noise-level applies"},
      {{"generate", "--model", sd, "--prompt", "x", "--prior-steps", "5", "--output", out}, "--prior-steps applies"},
      {{"variations", "--model", sd, "--image", out, "--output", out}, "StableUnCLIPImg2ImgPipeline"},
      {{"variations", "--model", sd, "--output", out}, "--image is required"},
      {{"variations", "--model", sd, "--image", out, "--output", out, "--noise-level", "x"}, "--noise-level"},
      {{"embed", "--image", out}, "--model is required"},
      {{"embed", "--model", sd, "--prompt", "x"}, "not a Stable unCLIP folder"},
  };
  for (const auto& c : cases) {
    const CliRun r = dmx_run(c.args);
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(c.needle), std::string::npos) << r.output;
    EXPECT_FALSE(path_exists(out));
  }
}

}  // namespace
}  // namespace dmx::test
