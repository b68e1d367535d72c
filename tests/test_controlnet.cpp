// ControlNet: golden residuals and UNet output against diffusers 0.27.2 (ref/<variant>/controlnet), the
// StableDiffusionControlNetPipeline (ref/<variant>/controlnet_pipe, both scales), original control_model.*
// layout == diffusers layout, keep schedule, guess mode, MultiControlNet sums, image preparation, Canny,
// errors, dmx::generate with ControlNets (what the CLI runs). Suites: ControlNetUnit, ControlNetTiny and
// ControlNetGenerateTiny (tiny random models), ControlNetGolden (fixtures), ControlNetCli (the command's flags).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>

#include "core/canny.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/resize.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "io/ldm_names.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/controlnet.h"
#include "pipelines/controlnet.h"
#include "pipelines/stable_diffusion.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

constexpr double kTol = 1e-5;

template <typename E>
void expect_throw_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception mentioning '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

std::shared_ptr<loaders::StableDiffusionModels> load_model(const std::string& variant) {
  static std::map<std::string, std::shared_ptr<loaders::StableDiffusionModels>> cache;
  auto& m = cache[variant];
  if (!m) m = loaders::load_stable_diffusion(fixture_model(variant));
  return m;
}

std::string cn_folder(const std::string& variant) { return fixture_model(variant) + "/controlnet"; }
std::string cn_single() { return fixture_model("sd15") + "/ldm/control_sd15.safetensors"; }

// A control map of our own: a disc and a bar on black, w x h RGB.
Image control_picture(int w, int h) {
  Image img;
  img.width = w;
  img.height = h;
  img.channels = 3;
  img.data.assign(static_cast<size_t>(w * h * 3), 0);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      const bool disc = (x - w / 3) * (x - w / 3) + (y - h / 2) * (y - h / 2) < (w / 5) * (w / 5);
      const bool bar = x > 2 * w / 3 && x < 2 * w / 3 + w / 8 && y > h / 6 && y < 5 * h / 6;
      if (disc || bar)
        for (int c = 0; c < 3; ++c) img.data[static_cast<size_t>((y * w + x) * 3 + c)] = disc ? 255 : 160;
    }
  return img;
}

// The sampling settings of the pipeline tests (DDIM, guidance 7.5) with seeded latents for the tiny "test" model.
pipelines::StableDiffusionParams tiny_params() {
  pipelines::StableDiffusionParams p;
  p.prompt = "a house on a hill";
  p.negative_prompt = "blurry";
  p.num_inference_steps = 8;
  p.guidance_scale = 7.5;
  p.scheduler = "ddim";
  p.show_progress = false;
  p.latents = at::randn({1, 4, 32, 32}, at::make_generator<at::CPUGeneratorImpl>(17));
  return p;
}

Image u8_image(const at::Tensor& u8) {  // [H, W, 3] uint8
  Image img;
  img.height = static_cast<int>(u8.size(0));
  img.width = static_cast<int>(u8.size(1));
  img.channels = static_cast<int>(u8.size(2));
  at::Tensor c = u8.contiguous();
  img.data.assign(c.data_ptr<uint8_t>(), c.data_ptr<uint8_t>() + c.numel());
  return img;
}

// -------------------------------------------------------------------------------------------------
TEST(ControlNetUnit, KeepScheduleFollowsDiffusers) {
  // 1 - float(i / n < start or (i + 1) / n > end), n = 10
  std::vector<double> keep;
  for (int i = 0; i < 10; ++i) keep.push_back(pipelines::controlnet_keep(i, 10, 0.2, 0.7));
  EXPECT_EQ(keep, (std::vector<double>{0, 0, 1, 1, 1, 1, 1, 0, 0, 0}));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(pipelines::controlnet_keep(i, 8, 0.0, 1.0), 1.0);
  // Boundaries: step i acts iff [i/n, (i+1)/n] lies inside [start, end].
  EXPECT_EQ(pipelines::controlnet_keep(0, 3, 0.0, 1.0 / 3.0), 1.0);
  EXPECT_EQ(pipelines::controlnet_keep(1, 3, 0.0, 0.5), 0.0);
  EXPECT_EQ(pipelines::controlnet_keep(2, 4, 0.5, 1.0), 1.0);
  EXPECT_EQ(pipelines::controlnet_keep(1, 4, 0.5, 1.0), 0.0);
}

TEST(ControlNetUnit, GuessModeScalesAreTorchLogspace) {
  at::Tensor s = models::guess_mode_scales(13, 1.0);
  ASSERT_EQ(s.numel(), 13);
  EXPECT_FLOAT_EQ(s[0].item<float>(), 0.1f);
  EXPECT_FLOAT_EQ(s[12].item<float>(), 1.0f);
  for (int i = 0; i < 13; ++i) EXPECT_NEAR(s[i].item<double>(), std::pow(10.0, -1.0 + i / 12.0), 1e-6);
  EXPECT_TRUE(at::allclose(models::guess_mode_scales(13, 0.5), s * 0.5));
}

TEST(ControlNetUnit, ResizeLanczosKeepsSizeAndConstants) {
  Image img;
  img.width = 20;
  img.height = 12;
  img.channels = 3;
  img.data.assign(20 * 12 * 3, 77);
  Image same = resize_lanczos(img, 20, 12);
  EXPECT_EQ(same.data, img.data);
  Image r = resize_lanczos(img, 33, 7);  // constants stay constant (normalised coefficients)
  EXPECT_EQ(r.width, 33);
  EXPECT_EQ(r.height, 7);
  for (uint8_t v : r.data) EXPECT_EQ(v, 77);
  // An upscaled step edge stays within [0, 255] and keeps its sides.
  for (int y = 0; y < 12; ++y)
    for (int x = 0; x < 20; ++x)
      for (int c = 0; c < 3; ++c) img.data[(y * 20 + x) * 3 + c] = x < 10 ? 0 : 255;
  Image e = resize_lanczos(img, 40, 24);
  EXPECT_EQ(e.data[0], 0);
  EXPECT_EQ(e.data[(39) * 3], 255);
  EXPECT_THROW(resize_lanczos(img, 0, 5), InvalidArgument);
}

TEST(ControlNetUnit, PrepareControlImageIsUnnormalised) {
  Image img;
  img.width = 16;
  img.height = 8;
  img.channels = 1;  // gray: converted to RGB first
  for (int i = 0; i < 16 * 8; ++i) img.data.push_back(static_cast<uint8_t>(i));
  at::Tensor t = pipelines::prepare_control_image(img, 16, 8);
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{1, 3, 8, 16}));
  EXPECT_FLOAT_EQ(t[0][2][1][3].item<float>(), static_cast<float>(19) / 255.0f);
  EXPECT_EQ(pipelines::prepare_control_image(img, 24, 16).sizes(), (std::vector<int64_t>{1, 3, 16, 24}));
  Image odd;
  odd.width = 70;
  odd.height = 45;
  EXPECT_EQ(pipelines::default_control_size(odd, 8), (std::pair<int, int>{64, 40}));
}

TEST(ControlNetUnit, CannyFindsEdgesAndChecksThresholds) {
  Image img;
  img.width = 32;
  img.height = 32;
  img.channels = 3;
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 32; ++x)
      for (int c = 0; c < 3; ++c) img.data.push_back(x >= 8 && x < 24 && y >= 8 && y < 24 ? 255 : 0);
  Image e = canny_edges(img, 100, 200);
  ASSERT_EQ(e.channels, 3);
  int on = 0;
  for (size_t i = 0; i < e.data.size(); i += 3) {
    EXPECT_TRUE(e.data[i] == 0 || e.data[i] == 255);
    EXPECT_EQ(e.data[i], e.data[i + 1]);
    on += e.data[i] == 255;
  }
  EXPECT_GT(on, 40);   // the square's outline
  EXPECT_LT(on, 200);  // and nothing else
  EXPECT_EQ(e.data[(0 * 32 + 0) * 3], 0);
  EXPECT_EQ(e.data[(16 * 32 + 16) * 3], 0);  // inside the square
  expect_throw_with<InvalidArgument>([&] { canny_edges(img, 200, 100); }, "--canny-low");
  expect_throw_with<InvalidArgument>([&] { canny_edges(img, -1, 100); }, "--canny-low");
  expect_throw_with<InvalidArgument>([&] { canny_edges(img, 1, 5000); }, "--canny-high");
}

TEST(ControlNetUnit, ConfigFromJsonAndErrors) {
  nlohmann::json j = {{"block_out_channels", {32, 64}},
                      {"down_block_types", {"DownBlock2D", "CrossAttnDownBlock2D"}},
                      {"attention_head_dim", 8},
                      {"cross_attention_dim", 32},
                      {"conditioning_embedding_out_channels", {16, 32}}};
  auto c = models::ControlNetConfig::from_json(j);
  EXPECT_EQ(c.num_down_residuals(), 6u);
  EXPECT_EQ(c.heads_per_block(), (std::vector<int>{8, 8}));
  j["class_embed_type"] = "timestep";
  EXPECT_THROW(models::ControlNetConfig::from_json(j), Unsupported);
  j.erase("class_embed_type");
  j["controlnet_conditioning_channel_order"] = "xyz";
  expect_throw_with<FormatError>([&] { models::ControlNetConfig::from_json(j); },
                                 "controlnet_conditioning_channel_order");
  j["controlnet_conditioning_channel_order"] = "rgb";
  j["block_out_channels"] = "wide";
  expect_throw_with<FormatError>([&] { models::ControlNetConfig::from_json(j); }, "block_out_channels");
}

// -------------------------------------------------------------------------------------------------
// Golden: residuals at scale 1 and 0.5, and the UNet that consumes them, for both variants and layouts.
void run_controlnet_golden(const std::string& variant, models::ControlNetModel net, const std::string& label) {
  RefCase ref = load_ref(variant, "controlnet");
  auto m = load_model(variant);
  // The reference's cond is the control image / 255, duplicated for the two halves.
  at::Tensor cond1 = pipelines::prepare_control_image(u8_image(ref["input.control_u8"]),
                                                      static_cast<int>(ref["input.control_u8"].size(1)),
                                                      static_cast<int>(ref["input.control_u8"].size(0)));
  EXPECT_TRUE(at::equal(at::cat({cond1, cond1}, 0), ref["input.cond"])) << "prepared control image";
  at::NoGradGuard ng;
  double worst = 0;
  models::UNetInputs plain;
  plain.sample = ref["input.sample"];
  plain.timestep = ref["input.timestep"];
  plain.encoder_hidden_states = ref["input.encoder_hidden_states"];
  DMX_EXPECT_CLOSE(label + " no_control.unet_out", m->unet->forward(plain), ref["no_control.unet_out"], kTol);
  for (const char* scale : {"1", "0.5"}) {
    models::ControlNetInputs ci;
    ci.sample = ref["input.sample"];
    ci.timestep = ref["input.timestep"];
    ci.encoder_hidden_states = ref["input.encoder_hidden_states"];
    ci.controlnet_cond = ref["input.cond"];
    ci.conditioning_scale = std::stod(scale);
    TensorRecorder rec;
    ci.recorder = &rec;
    models::ControlNetOutput out = net->forward(ci);
    const std::string pre = std::string("scale") + scale + ".";
    if (std::string(scale) == "1") {
      DMX_EXPECT_CLOSE(label + " cond_embedding", rec.tensors.at("cond_embedding"), ref["cond_embedding"], kTol);
    }
    ASSERT_EQ(out.down_block_res_samples.size(), ref.meta["n_down_residuals"].get<size_t>());
    for (size_t k = 0; k < out.down_block_res_samples.size(); ++k)
      worst = std::max(worst, check_close(label + " " + pre + "down." + std::to_string(k),
                                          out.down_block_res_samples[k], ref[pre + "down." + std::to_string(k)], kTol));
    DMX_EXPECT_CLOSE(label + " " + pre + "mid", out.mid_block_res_sample, ref[pre + "mid"], kTol);
    models::UNetInputs ui = plain;
    ui.down_block_additional_residuals = out.down_block_res_samples;
    ui.mid_block_additional_residual = out.mid_block_res_sample;
    DMX_EXPECT_CLOSE(label + " " + pre + "unet_out", m->unet->forward(ui), ref[pre + "unet_out"], kTol);
  }
  EXPECT_LE(worst, kTol) << label << " down residuals";
}

TEST(ControlNetGolden, ResidualsAndUNet) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string variant : {"sd15", "test"})
    run_controlnet_golden(variant, pipelines::load_controlnet(cn_folder(variant)), variant + "/controlnet");
}

TEST(ControlNetGolden, OriginalLayoutMatchesDiffusersLayout) {
  DMX_REQUIRE_FIXTURES();
  auto a = pipelines::load_controlnet(cn_folder("sd15"));
  auto b = pipelines::load_controlnet(cn_single());
  // Same config (hint widths read from the shapes) and bitwise-equal weights.
  EXPECT_EQ(b->config().conditioning_embedding_out_channels, (std::vector<int>{8, 16, 32, 32}));
  EXPECT_EQ(b->config().block_out_channels, a->config().block_out_channels);
  io::TensorMap sa = io::module_state(*a), sb = io::module_state(*b);
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [k, v] : sa) {
    ASSERT_EQ(sb.count(k), 1u) << k;
    EXPECT_TRUE(at::equal(v, sb[k])) << k;
  }
  run_controlnet_golden("sd15", b, "sd15/controlnet (control_model.* file)");
}

TEST(ControlNetGolden, UnprefixedOriginalKeysAndUnmatchedKeyErrors) {
  DMX_REQUIRE_FIXTURES();
  io::TensorMap ck = io::load_safetensors(cn_single());
  io::TensorMap bare;
  for (const auto& [k, v] : ck) bare[k.substr(std::string("control_model.").size())] = v;
  EXPECT_EQ(io::ldm_controlnet_prefix(bare), "");
  auto cfg = io::detect_ldm_controlnet_config(bare);
  EXPECT_EQ(io::convert_ldm_controlnet(bare, cfg).size(), io::convert_ldm_controlnet(ck, cfg).size());
  ck["control_model.zero_convs.99.0.weight"] = at::zeros({1});
  expect_throw_with<FormatError>([&] { io::convert_ldm_controlnet(ck, cfg); }, "zero_convs.99");
  expect_throw_with<FormatError>(
      [&] {
        io::ldm_controlnet_prefix(io::TensorMap{{"x", at::zeros({1})}});
      },
      "ControlNet");
}

// Several ControlNets add up: two copies at scales a and b == one at a + b (residual sum, up to rounding).
TEST(ControlNetTiny, MultiControlNetSumsResiduals) {
  auto net = pipelines::load_controlnet(tiny_controlnet_dir("test"));
  at::NoGradGuard ng;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(4);
  models::ControlNetInputs ci;
  ci.sample = at::randn({2, 4, 16, 16}, gen, at::TensorOptions().dtype(at::kFloat));
  ci.timestep = at::tensor(500.0f);
  ci.encoder_hidden_states = at::randn({2, 77, 32}, gen, at::TensorOptions().dtype(at::kFloat));
  ci.controlnet_cond = at::rand({2, 3, 32, 32}, gen, at::TensorOptions().dtype(at::kFloat));
  models::ControlNetOutput sum;
  ci.conditioning_scale = 0.3;
  pipelines::add_residuals(sum, net->forward(ci));
  ci.conditioning_scale = 0.45;
  pipelines::add_residuals(sum, net->forward(ci));
  ci.conditioning_scale = 0.75;
  models::ControlNetOutput one = net->forward(ci);
  for (size_t k = 0; k < one.down_block_res_samples.size(); ++k)
    DMX_EXPECT_CLOSE("multi sum down." + std::to_string(k), sum.down_block_res_samples[k],
                     one.down_block_res_samples[k], 1e-6);
  DMX_EXPECT_CLOSE("multi sum mid", sum.mid_block_res_sample, one.mid_block_res_sample, 1e-6);
  // Guess mode ramps the residuals from 0.1 to 1.
  ci.guess_mode = true;
  ci.conditioning_scale = 1.0;
  models::ControlNetOutput g = net->forward(ci);
  ci.guess_mode = false;
  models::ControlNetOutput plain = net->forward(ci);
  at::Tensor s = models::guess_mode_scales(static_cast<int64_t>(plain.down_block_res_samples.size()) + 1, 1.0);
  EXPECT_TRUE(at::equal(g.down_block_res_samples[0], plain.down_block_res_samples[0] * s[0]));
  EXPECT_TRUE(at::equal(g.mid_block_res_sample, plain.mid_block_res_sample * s[-1]));
}

// -------------------------------------------------------------------------------------------------
pipelines::StableDiffusionParams pipe_params(const RefCase& ref) {
  pipelines::StableDiffusionParams p;
  p.prompt = ref.meta["prompt"].get<std::string>();
  p.negative_prompt = ref.meta.value("negative_prompt", std::string());
  p.num_inference_steps = ref.meta["steps"].get<int>();
  p.guidance_scale = ref.meta["guidance_scale"].get<double>();
  p.scheduler = "ddim";
  p.show_progress = false;
  p.latents = ref["input.latents"];
  return p;
}

void run_pipe_golden(const std::string& variant, const std::string& cn_path) {
  RefCase ref = load_ref(variant, "controlnet_pipe");
  pipelines::StableDiffusionPipeline pipe(load_model(variant));
  auto net = pipelines::load_controlnet(cn_path);
  const Image control = u8_image(ref["input.control_u8"]);
  for (const char* scale : {"1", "0.5"}) {
    pipelines::StableDiffusionParams p = pipe_params(ref);
    pipelines::ControlNetUnit u;
    u.model = net;
    u.image = pipelines::prepare_control_image(control, control.width, control.height);
    u.scale = std::stod(scale);
    p.residual_providers = pipelines::controlnet_providers({u}, ref.meta.value("guess_mode", false));
    std::vector<at::Tensor> steps;
    p.on_step_end = [&](int, double, at::Tensor& lat) { steps.push_back(lat.clone()); };
    auto out = pipe.run(p);
    std::vector<double> expected_ts;
    for (const auto& t : ref.meta["timesteps"]) expected_ts.push_back(t.get<double>());
    EXPECT_EQ(out.timesteps, expected_ts);
    const std::string pre = std::string("scale") + scale + ".";
    const std::string label = variant + "/controlnet_pipe " + pre;
    double worst = 0;
    ASSERT_EQ(steps.size(), expected_ts.size());
    for (size_t i = 0; i < steps.size(); ++i) {
      const std::string key = pre + "step." + std::to_string(i) + ".latents";
      worst = std::max(worst, check_close(label + "step." + std::to_string(i) + ".latents", steps[i], ref[key], 1e-4));
    }
    EXPECT_LE(worst, 1e-4) << label << " latents";
    DMX_EXPECT_CLOSE(label + "image", out.images, ref[pre + "image"], 1e-3);
  }
}

TEST(ControlNetGolden, PipelineBothScales) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string variant : {"sd15", "test"}) run_pipe_golden(variant, cn_folder(variant));
}

TEST(ControlNetGolden, PipelineWithOriginalLayoutFile) {
  DMX_REQUIRE_FIXTURES();
  run_pipe_golden("sd15", cn_single());
}

// Multi-ControlNet in the pipeline: two copies at 0.5 each == one at 1.0; a net switched off by start/end
// changes nothing; guess mode and the keep schedule run.
TEST(ControlNetTiny, PipelineMultiAndSchedule) {
  pipelines::StableDiffusionPipeline pipe(shared_tiny_model("test"));
  auto net = pipelines::load_controlnet(tiny_controlnet_dir("test"));
  const Image control = control_picture(64, 64);
  auto unit = [&](double scale, double start = 0.0, double end = 1.0) {
    pipelines::ControlNetUnit u;
    u.model = net;
    u.image = pipelines::prepare_control_image(control, control.width, control.height);
    u.scale = scale;
    u.start = start;
    u.end = end;
    return u;
  };
  auto run = [&](std::vector<pipelines::ControlNetUnit> units, bool guess = false) {
    pipelines::StableDiffusionParams p = tiny_params();
    p.num_inference_steps = 4;
    p.residual_providers = pipelines::controlnet_providers(units, guess);
    return pipe.run(p).latents;
  };
  at::Tensor one = run({unit(1.0)});
  at::Tensor two = run({unit(0.5), unit(0.5)});
  DMX_EXPECT_CLOSE("multi 0.5 + 0.5 vs 1.0 latents", two, one, 1e-5);
  at::Tensor none = run({});
  at::Tensor off = run({unit(1.0, 0.0, 1.0), unit(1.0, 0.5, 0.75)});  // second net acts at step 2 only
  at::Tensor first_only = run({unit(1.0)});
  EXPECT_FALSE(at::equal(off, first_only));
  at::Tensor late = run({unit(1.0, 0.5, 1.0)});
  EXPECT_FALSE(at::equal(late, none));
  EXPECT_FALSE(at::equal(late, one));
  at::Tensor guess = run({unit(1.0)}, true);
  EXPECT_FALSE(at::equal(guess, one));
  EXPECT_TRUE(at::isfinite(guess).all().item<bool>());
}

// The residual-provider seam: the core checks and prepares every provider of a run once and applies them in
// order at every UNet call, each seeing what the earlier ones added. A second provider after a ControlNet that
// adds zeros (and records what it is shown) leaves the run bit for bit as the ControlNet alone made it.
class RecordingZeros : public pipelines::ResidualProvider {
 public:
  std::string name() const override { return "recording zeros"; }
  void check(const pipelines::ResidualRun& run) const override { checks.push_back(run.batch); }
  void prepare(const pipelines::ResidualRun& run) override { prepared.push_back(run.guided); }
  void apply(const pipelines::ResidualStep& step, models::UNetInputs& in) override {
    indices.push_back(step.index);
    rows.push_back(in.sample.size(0));
    ASSERT_FALSE(in.down_block_additional_residuals.empty());  // the ControlNet's, added before
    std::vector<at::Tensor> zeros;
    for (const auto& d : in.down_block_additional_residuals) zeros.push_back(at::zeros_like(d));
    pipelines::add_unet_residuals(in, zeros, at::zeros_like(in.mid_block_additional_residual));
  }
  mutable std::vector<int> checks;
  std::vector<bool> prepared;
  std::vector<int> indices;
  std::vector<int64_t> rows;
};

TEST(ControlNetTiny, ResidualProvidersComposeInOrder) {
  pipelines::StableDiffusionPipeline pipe(shared_tiny_model("test"));
  const Image control = control_picture(64, 64);
  pipelines::ControlNetUnit u;
  u.model = pipelines::load_controlnet(tiny_controlnet_dir("test"));
  u.image = pipelines::prepare_control_image(control, control.width, control.height);
  pipelines::StableDiffusionParams p = tiny_params();
  p.num_inference_steps = 3;
  p.residual_providers = pipelines::controlnet_providers({u});
  const at::Tensor alone = pipe.run(p).latents;
  auto recorder = std::make_shared<RecordingZeros>();
  p.residual_providers.push_back(recorder);
  const at::Tensor both = pipe.run(p).latents;
  EXPECT_TRUE(at::equal(alone, both));
  EXPECT_EQ(recorder->checks, std::vector<int>{1});
  EXPECT_EQ(recorder->prepared, std::vector<bool>{true});
  EXPECT_EQ(recorder->indices, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(recorder->rows, (std::vector<int64_t>{2, 2, 2}));  // [uncond; cond]
  // A provider's check stops the run before anything is drawn: ControlNet refuses img2img.
  p.init_image = at::zeros({1, 3, control.height, control.width});
  expect_throw_with<Unsupported>([&] { pipe.run(p); }, "ControlNet with an init image");
}

// A seeded run draws its latents first, exactly like txt2img (the control image draws nothing).
TEST(ControlNetTiny, SeededRunDrawsLatentsLikeTxt2Img) {
  pipelines::StableDiffusionPipeline pipe(shared_tiny_model("test"));
  const Image control = control_picture(64, 64);
  pipelines::ControlNetUnit u;
  u.model = pipelines::load_controlnet(tiny_controlnet_dir("test"));
  u.image = pipelines::prepare_control_image(control, control.width, control.height);
  pipelines::StableDiffusionParams p = tiny_params();
  const auto latent_sizes = p.latents.sizes().vec();
  p.num_inference_steps = 3;
  p.residual_providers = pipelines::controlnet_providers({u});
  p.latents = at::Tensor();
  at::Generator seeded_gen = pipelines::make_generator(1234);
  p.generator = &seeded_gen;
  at::Tensor seeded = pipe.run(p).latents;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  p.generator = nullptr;
  p.latents = at::randn(latent_sizes, gen, at::TensorOptions().dtype(at::kFloat));
  EXPECT_TRUE(at::equal(seeded, pipe.run(p).latents));
}

TEST(ControlNetTiny, PipelineErrors) {
  pipelines::StableDiffusionPipeline pipe(shared_tiny_model("test"));
  auto net = pipelines::load_controlnet(tiny_controlnet_dir("test"));
  const Image control = control_picture(64, 64);
  pipelines::StableDiffusionParams p = tiny_params();
  pipelines::ControlNetUnit u;
  u.model = net;
  u.image = pipelines::prepare_control_image(control, control.width, control.height);
  u.start = 0.6;
  u.end = 0.4;
  p.residual_providers = pipelines::controlnet_providers({u});
  expect_throw_with<InvalidArgument>([&] { pipe.run(p); }, "control start");
  u.start = 0.0;
  u.end = 1.0;
  p.residual_providers = pipelines::controlnet_providers({u});
  p.width = control.width + 8;
  expect_throw_with<InvalidArgument>([&] { pipe.run(p); }, "control image is");
  // A ControlNet built for another UNet: both values named.
  pipelines::StableDiffusionPipeline sd15(shared_tiny_model("sd15"));
  pipelines::StableDiffusionParams q = tiny_params();
  q.latents = at::randn({1, 4, 16, 16});
  u.image = pipelines::prepare_control_image(control, 128, 128);
  q.residual_providers = pipelines::controlnet_providers({u});
  expect_throw_with<InvalidArgument>([&] { sd15.run(q); }, "block_out_channels");
  expect_throw_with<InvalidArgument>([&] { pipelines::load_controlnet("/nonexistent/cn"); }, "--controlnet");
  expect_throw_with<FormatError>([&] { pipelines::load_controlnet(tiny_model_dir("sd15") + "/unet"); },
                                 "not a ControlNetModel");
}

// -------------------------------------------------------------------------------------------------
// dmx::generate with ControlNets (what `dmx generate --controlnet ...` runs).

GenerateOptions tiny_generate(const std::string& output) {
  GenerateOptions o;
  o.model = tiny_model_dir("sd15");
  o.prompt = "a house";
  o.steps = 3;
  o.seed = 5;
  o.progress = false;
  o.output = output;
  return o;
}

TEST(ControlNetGenerateTiny, WithControlNetAndCanny) {
  const std::string dir = temp_dir() + "/cn-generate";
  ASSERT_TRUE(std::filesystem::create_directories(dir));
  const std::string control = dir + "/control.png";
  save_png(control, control_picture(128, 128));
  const std::string cn = tiny_controlnet_dir("sd15"), cn_file = tiny_controlnet_file("sd15");
  GenerateOptions a = tiny_generate(dir + "/a.png");
  a.controlnets = {cn};
  a.control_images = {control};
  generate(a);
  Image ia = load_image(dir + "/a.png", "a");
  EXPECT_EQ(ia.width, 128);
  EXPECT_EQ(ia.height, 128);
  // The original single file gives the same image.
  GenerateOptions b = a;
  b.controlnets = {cn_file};
  b.output = dir + "/b.png";
  generate(b);
  EXPECT_EQ(load_image(dir + "/b.png", "b").data, ia.data);
  // Without the ControlNet the image differs.
  GenerateOptions c = tiny_generate(dir + "/c.png");
  c.width = c.height = 128;
  generate(c);
  EXPECT_NE(load_image(dir + "/c.png", "c").data, ia.data);
  // Canny preprocessing, saved map, two nets with scales / start / end, guess mode.
  GenerateOptions d = tiny_generate(dir + "/d.png");
  d.controlnets = {cn, cn_file};
  d.control_images = {control, control};
  d.control_scales = {0.7, 0.4};
  d.control_starts = {0, 0.3};
  d.control_ends = {1, 0.8};
  d.control_preprocess = {"canny"};
  d.canny_low = 50;
  d.canny_high = 150;
  d.guess_mode = true;
  d.save_control_image = dir + "/map.png";
  generate(d);
  EXPECT_TRUE(path_exists(dir + "/d.png"));
  // Two nets: one saved map each (the Canny edges, exactly 0 / 255), equal here.
  Image map = load_image(dir + "/map-0.png", "map");
  EXPECT_EQ(map.width, 128);
  for (uint8_t v : map.data) EXPECT_TRUE(v == 0 || v == 255);
  EXPECT_EQ(load_image(dir + "/map-1.png", "map").data, map.data);
  // A map of another size: the output takes its size rounded down to 8, the map is Lanczos-resized to it;
  // a given width is rounded down the same way.
  Image odd = resize_lanczos(load_image(control, "c"), 100, 70);
  save_png(dir + "/odd.png", odd);
  GenerateOptions f = tiny_generate(dir + "/f.png");
  f.controlnets = {cn};
  f.control_images = {dir + "/odd.png"};
  f.save_control_image = dir + "/odd-map.png";
  generate(f);
  Image fi = load_image(dir + "/f.png", "f");
  EXPECT_EQ(fi.width, 96);
  EXPECT_EQ(fi.height, 64);
  EXPECT_EQ(load_image(dir + "/odd-map.png", "m").data, resize_lanczos(odd, 96, 64).data);
  GenerateOptions g = tiny_generate(dir + "/g.png");
  g.controlnets = {cn};
  g.control_images = {dir + "/odd.png"};
  g.width = 100;
  g.height = 52;
  generate(g);
  EXPECT_EQ(load_image(dir + "/g.png", "g").width, 96);
  EXPECT_EQ(load_image(dir + "/g.png", "g").height, 48);
  // One net: the map is written under the given name.
  GenerateOptions e = tiny_generate(dir + "/e.png");
  e.controlnets = {cn};
  e.control_images = {control};
  e.control_preprocess = {"canny"};
  e.save_control_image = dir + "/one.png";
  generate(e);
  EXPECT_EQ(load_image(dir + "/one.png", "one").data, map.data);
}

TEST(ControlNetGenerateTiny, BadInputNamesTheFlagAndWritesNothing) {
  const std::string dir = temp_dir() + "/cn-errors";
  ASSERT_TRUE(std::filesystem::create_directories(dir));
  const std::string control = dir + "/control.png";
  save_png(control, control_picture(128, 128));
  const std::string out = dir + "/never.png";
  std::ofstream(dir + "/bad.png") << "garbage";
  const std::string cn = tiny_controlnet_dir("sd15");
  auto expect_error = [&](const std::function<void(GenerateOptions&)>& edit, const std::string& needle) {
    GenerateOptions o = tiny_generate(out);
    o.steps = 2;
    edit(o);
    try {
      generate(o);
      ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    } catch (const Error& e) {  // FormatError / Unsupported: exit 2 as well, but say which
      ADD_FAILURE() << "expected InvalidArgument, got " << e.what();
    }
    EXPECT_FALSE(path_exists(out));
  };
  expect_error([&](GenerateOptions& o) { o.controlnets = {cn}; }, "--control-image");
  expect_error([&](GenerateOptions& o) { o.control_images = {control}; }, "--controlnet");
  expect_error([&](GenerateOptions& o) { o.controlnets = {cn}, o.control_images = {dir + "/bad.png"}; },
               "--control-image");
  expect_error([&](GenerateOptions& o) { o.controlnets = {cn}, o.control_images = {dir + "/missing.png"}; },
               "--control-image");
  expect_error(
      [&](GenerateOptions& o) {
        o.controlnets = {cn}, o.control_images = {control}, o.control_scales = {1, 2};
      },
      "--control-scale");
  expect_error(
      [&](GenerateOptions& o) {
        o.controlnets = {cn}, o.control_images = {control}, o.control_starts = {0.9}, o.control_ends = {0.2};
      },
      "control start");
  expect_error(
      [&](GenerateOptions& o) { o.controlnets = {cn}, o.control_images = {control}, o.control_preprocess = {"hed"}; },
      "--control-preprocess");
  expect_error(
      [&](GenerateOptions& o) {
        o.controlnets = {cn}, o.control_images = {control}, o.control_preprocess = {"canny"}, o.canny_low = 300,
        o.canny_high = 100;
      },
      "--canny-low");
  expect_error([&](GenerateOptions& o) { o.controlnets = {tiny_controlnet_dir("test")}, o.control_images = {control}; },
               "block_out_channels");
  expect_error([&](GenerateOptions& o) { o.controlnets = {dir + "/nothing"}, o.control_images = {control}; },
               "--controlnet");
  std::ofstream(dir + "/control_v11p_sd15_canny.pth") << "PK\x03\x04 not really";
  try {
    GenerateOptions o = tiny_generate(out);
    o.controlnets = {dir + "/control_v11p_sd15_canny.pth"};
    o.control_images = {control};
    generate(o);
    ADD_FAILURE() << "a pickle ControlNet was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("pickle"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(path_exists(out));
  expect_error([&](GenerateOptions& o) { o.guess_mode = true; }, "--guess-mode");
  expect_error([&](GenerateOptions& o) { o.controlnets = {cn}, o.control_images = {control}, o.init_image = control; },
               "img2img");
}

// The command line's ControlNet flags (repeatable, one per net) reach GenerateOptions as the API takes them:
// the CLI's image and maps equal the in-process run's.
TEST(ControlNetCli, FlagsMapOntoGenerateOptions) {
  const std::string dir = temp_dir() + "/cn-cli";
  ASSERT_TRUE(std::filesystem::create_directories(dir));
  const std::string control = dir + "/control.png";
  save_png(control, control_picture(128, 128));
  const std::string cn = tiny_controlnet_dir("sd15"), cn_file = tiny_controlnet_file("sd15");
  CliRun r = dmx_run({"generate",
                      "--model",
                      tiny_model_dir("sd15"),
                      "--prompt",
                      "a house",
                      "--steps",
                      "3",
                      "--seed",
                      "5",
                      "--quiet",
                      "--controlnet",
                      cn,
                      "--control-image",
                      control,
                      "--control-scale",
                      "0.7",
                      "--controlnet",
                      cn_file,
                      "--control-image",
                      control,
                      "--control-scale",
                      "0.4",
                      "--control-start",
                      "0",
                      "--control-start",
                      "0.3",
                      "--control-end",
                      "1",
                      "--control-end",
                      "0.8",
                      "--control-preprocess",
                      "canny",
                      "--canny-low",
                      "50",
                      "--canny-high",
                      "150",
                      "--guess-mode",
                      "--save-control-image",
                      dir + "/cli-map.png",
                      "--output",
                      dir + "/cli.png"});
  ASSERT_EQ(r.code, 0) << r.output;
  GenerateOptions d = tiny_generate(dir + "/api.png");
  d.controlnets = {cn, cn_file};
  d.control_images = {control, control};
  d.control_scales = {0.7, 0.4};
  d.control_starts = {0, 0.3};
  d.control_ends = {1, 0.8};
  d.control_preprocess = {"canny"};
  d.canny_low = 50;
  d.canny_high = 150;
  d.guess_mode = true;
  d.save_control_image = dir + "/api-map.png";
  generate(d);
  EXPECT_EQ(load_image(dir + "/cli.png", "cli").data, load_image(dir + "/api.png", "api").data);
  EXPECT_EQ(load_image(dir + "/cli-map-1.png", "cli").data, load_image(dir + "/api-map-1.png", "api").data);
  r = dmx_run({"generate", "--model", tiny_model_dir("sd15"), "--prompt", "x", "--output", dir + "/never.png",
               "--controlnet", cn, "--control-image", control, "--control-scale", "lots"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--control-scale must be a number, got 'lots'"), std::string::npos) << r.output;
  EXPECT_FALSE(path_exists(dir + "/never.png"));
}
}  // namespace
}  // namespace dmx::test
