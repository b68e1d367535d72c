// DDIM inversion and DiffEdit against diffusers 0.27.2 (fixture cases ddim_inversion and diffedit), the
// seeded draw order of the three DiffEdit phases, and argument checks.
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <fstream>

#include "core/image.h"
#include "dmx/dmx.h"
#include "io/safetensors.h"
#include "dmx/error.h"
#include "pipelines/ddim_inversion.h"
#include "pipelines/diffedit.h"
#include "loaders/model_bundle.h"
#include "pipelines/stable_diffusion.h"
#include "schedulers/scheduler.h"
#include "test_util.h"

namespace dmx::test {
namespace {

constexpr double kTol = 1e-5;

std::shared_ptr<loaders::StableDiffusionModels> model(const std::string& variant) {
  static std::map<std::string, std::shared_ptr<loaders::StableDiffusionModels>> cache;
  auto& m = cache[variant];
  if (!m) m = loaders::load_stable_diffusion(fixture_model(variant));
  return m;
}

at::Tensor input_image(const RefCase& ref) {
  at::Tensor u8 = ref["input.image_u8"].contiguous();
  Image img;
  img.height = static_cast<int>(u8.size(0));
  img.width = static_cast<int>(u8.size(1));
  img.channels = 3;
  img.data.assign(u8.data_ptr<uint8_t>(), u8.data_ptr<uint8_t>() + u8.numel());
  return image_to_tensor(img);
}

std::vector<double> doubles(const nlohmann::json& j) {
  std::vector<double> v;
  for (const auto& x : j) v.push_back(x.get<double>());
  return v;
}

// ---------------------------------------------------------------------------------------------------
// ddim_inversion: z0 (posterior mean), 10 inversion steps at guidance 1, then 10 DDIM steps back.
// Each step is checked on the reference's own input (teacher forcing: the step's output is replaced by the
// reference's before the next step) at 1e-5; the free-running chain, where the inversion amplifies float
// rounding step by step, at the whole-pipeline tolerance 1e-4.
constexpr double kChainTol = 1e-4;

class DDIMInversionGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(DDIMInversionGolden, MatchesReference) {
  DMX_REQUIRE_FIXTURES();
  const std::string v = GetParam();
  RefCase ref = load_ref(v, "ddim_inversion");
  auto m = model(v);
  pipelines::StableDiffusionPipeline sd(m);
  const std::string prompt = ref.meta["prompt"].get<std::string>();
  DMX_EXPECT_CLOSE(v + "/ddim_inversion prompt_embeds", sd.encode_prompt(prompt), ref["input.prompt_embeds"], kTol);
  {
    at::NoGradGuard g;
    at::Tensor z0 = m->vae->encode(input_image(ref)).mean * m->vae->config().scaling_factor;
    DMX_EXPECT_CLOSE(v + "/ddim_inversion z0", z0, ref["z0"], kTol);
  }

  pipelines::DDIMInversionParams p;
  p.latents = ref["z0"];
  p.prompt_embeds = ref["input.prompt_embeds"];
  p.num_inference_steps = 10;
  p.guidance_scale = 1.0;
  p.show_progress = false;
  for (bool forced : {true, false}) {
    const std::string mode = forced ? " (per step)" : " (chain)";
    const double tol = forced ? kTol : kChainTol;
    std::vector<at::Tensor> eps, lat;
    p.on_step_end = [&](int k, double, at::Tensor& l, const at::Tensor& e) {
      eps.push_back(e.clone());
      lat.push_back(l.clone());
      if (forced) l = ref["inv." + std::to_string(k) + ".latents"].clone();
    };
    auto inv = pipelines::ddim_invert(*m, p);
    EXPECT_EQ(inv.timesteps, doubles(ref.meta["inverse_timesteps"]));
    ASSERT_EQ(lat.size(), 10u);
    double worst = 0;
    for (size_t k = 0; k < lat.size(); ++k) {
      const std::string key = "inv." + std::to_string(k);
      worst = std::max(worst, check_close(v + "/ddim_inversion " + key + ".eps" + mode, eps[k], ref[key + ".eps"], tol));
      worst = std::max(worst,
                       check_close(v + "/ddim_inversion " + key + ".latents" + mode, lat[k], ref[key + ".latents"], tol));
    }
    EXPECT_LE(worst, tol) << "inversion steps" << mode;
    if (!forced) {
      DMX_EXPECT_CLOSE(v + "/ddim_inversion zT (chain)", inv.latents.back(), ref["zT"], kChainTol);
    }
  }

  // Reconstruction: DDIM from the reference zT, guidance 1 (chained; DDIM does not amplify rounding).
  pipelines::StableDiffusionParams rp;
  rp.prompt = prompt;
  rp.num_inference_steps = 10;
  rp.guidance_scale = 1.0;
  rp.scheduler = "ddim";
  rp.latents = ref["zT"];
  rp.width = static_cast<int>(ref["zT"].size(3)) * m->vae_scale_factor();
  rp.height = static_cast<int>(ref["zT"].size(2)) * m->vae_scale_factor();
  rp.show_progress = false;
  std::vector<at::Tensor> rec;
  rp.on_step_end = [&](int, double, at::Tensor& lat) { rec.push_back(lat.clone()); };
  auto out = sd.run(rp);
  EXPECT_EQ(out.timesteps, doubles(ref.meta["forward_timesteps"]));
  double worst = 0;
  for (size_t k = 0; k < rec.size(); ++k) {
    const std::string key = "rec." + std::to_string(k) + ".latents";
    worst = std::max(worst, check_close(v + "/ddim_inversion " + key, rec[k], ref[key], kTol));
  }
  EXPECT_LE(worst, kTol) << "reconstruction steps";
  at::NoGradGuard g;
  at::Tensor image = m->vae->decode(out.latents / m->vae->config().scaling_factor);  // raw decoder output
  DMX_EXPECT_CLOSE(v + "/ddim_inversion rec.image", image, ref["rec.image"], kTol);
}

INSTANTIATE_TEST_SUITE_P(DDIMInversion, DDIMInversionGolden, ::testing::Values("sd15", "test"));

// ---------------------------------------------------------------------------------------------------
// diffedit: generate_mask (2 maps) + invert (guidance 1) + edit, DDIM 10 steps, strength 0.8.
struct DiffEditCase {
  pipelines::DiffEditMaskParams mask;
  pipelines::DiffEditInvertParams invert;
  pipelines::DiffEditParams edit;
};

DiffEditCase diffedit_case(const RefCase& ref) {
  const auto& meta = ref.meta;
  DiffEditCase c;
  const at::Tensor image = input_image(ref);
  const std::string neg = meta["negative_prompt"].get<std::string>();
  c.mask.image = image;
  c.mask.source_prompt = meta["source_prompt"].get<std::string>();
  c.mask.target_prompt = meta["target_prompt"].get<std::string>();
  c.mask.source_negative_prompt = neg;
  c.mask.target_negative_prompt = neg;
  c.mask.num_maps_per_mask = meta["num_maps_per_mask"].get<int>();
  c.mask.mask_encode_strength = meta["mask_encode_strength"].get<double>();
  c.mask.mask_thresholding_ratio = meta["mask_thresholding_ratio"].get<double>();
  c.mask.num_inference_steps = meta["mask_steps"].get<int>();
  c.invert.image = image;
  c.invert.prompt = c.mask.source_prompt;
  c.invert.num_inference_steps = meta["invert_steps"].get<int>();
  c.invert.inpaint_strength = meta["inpaint_strength"].get<double>();
  c.invert.guidance_scale = meta["invert_guidance_scale"].get<double>();
  c.invert.show_progress = false;
  c.edit.prompt = c.mask.target_prompt;
  c.edit.negative_prompt = neg;
  c.edit.num_inference_steps = meta["invert_steps"].get<int>();
  c.edit.inpaint_strength = meta["inpaint_strength"].get<double>();
  c.edit.guidance_scale = meta["edit_guidance_scale"].get<double>();
  c.edit.show_progress = false;
  return c;
}

class DiffEditGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(DiffEditGolden, MatchesReference) {
  DMX_REQUIRE_FIXTURES();
  const std::string v = GetParam();
  RefCase ref = load_ref(v, "diffedit");
  pipelines::DiffEditPipeline pipe(model(v));
  DiffEditCase c = diffedit_case(ref);
  const at::Tensor ref_inv = ref["inv_latents"];  // [1, K, 4, h, w], noisiest first
  const int64_t K = ref_inv.size(1);

  // generate_mask with the recorded draws: exact.
  c.mask.posterior_noise = ref["mask_rng.0"];
  c.mask.noise = ref["mask_rng.1"];
  auto mask = pipe.generate_mask(c.mask);
  const int64_t mismatched = mask.mask.ne(ref["mask"]).sum().item<int64_t>();
  std::printf("[check] %s/diffedit mask: %lld of %lld entries differ (mean %.6f, reference %.6f)\n", v.c_str(),
              static_cast<long long>(mismatched), static_cast<long long>(mask.mask.numel()),
              mask.mask.mean().item<double>(), ref.meta["mask_mean"].get<double>());
  EXPECT_EQ(mismatched, 0) << "mask";
  EXPECT_TRUE(mask.mask.sizes().equals(ref["mask"].sizes()));

  // invert with the recorded posterior draw: per step (each step after the first starts from the
  // reference's previous latents) at 1e-5, then the free chain at 1e-4.
  c.invert.posterior_noise = ref["invert_rng.0"];
  pipelines::DiffEditInvertOutput inv;
  for (bool forced : {true, false}) {
    const std::string mode = forced ? " (per step)" : " (chain)";
    const double tol = forced ? kTol : kChainTol;
    std::vector<at::Tensor> lat;
    c.invert.on_step_end = [&](int k, double, at::Tensor& l, const at::Tensor&) {
      lat.push_back(l.clone());
      if (forced) l = ref_inv[0][K - 1 - k].unsqueeze(0).clone();
    };
    inv = pipe.invert(c.invert);
    ASSERT_TRUE(inv.latents.sizes().equals(ref_inv.sizes())) << inv.latents.sizes();
    double worst = 0;
    // Step k produced inv_latents[0, K-1-k]. Step 0 starts from our own VAE posterior sample, so it belongs to
    // the chain (its input is not the reference's).
    for (int64_t k = forced ? 1 : 0; k < K; ++k)
      worst = std::max(worst, check_close(v + "/diffedit invert step " + std::to_string(k) + mode,
                                          lat[static_cast<size_t>(k)][0], ref_inv[0][K - 1 - k], tol));
    EXPECT_LE(worst, tol) << "inverted latents" << mode;
  }
  c.invert.on_step_end = nullptr;

  // The reference's own posterior sample z0, recovered from its first inversion step: that step is
  // x1 = a z0 + b eps(z0) with b = 0.012, so z0 = (x1 - b eps(z0)) / a converges in a few iterations (the
  // recovered z0 reproduces the reference's x1 to ~1e-7 relative). The posterior noise that makes our encode
  // give it: (z0 / scaling - mean) / std.
  const at::Tensor ref_posterior_noise = [&] {
    at::NoGradGuard g;
    auto m = model(v);
    pipelines::StableDiffusionPipeline sd(m);
    const at::Tensor cond = sd.encode_prompt(c.invert.prompt);
    auto sched = schedulers::create_scheduler("ddim_inverse", m->scheduler_config);
    sched->set_timesteps(c.invert.num_inference_steps);
    const at::Tensor x1 = ref_inv[0][K - 1].unsqueeze(0).to(at::kDouble);
    const at::Tensor one = at::ones({1, 1, 1, 1}), zero = at::zeros({1, 1, 1, 1});
    const double a = sched->step(zero, 0, one).prev_sample.item<double>();
    const double b = sched->step(one, 0, zero).prev_sample.item<double>();
    at::Tensor z0 = pipelines::encode_image_latents(*m, c.invert.image, nullptr, ref["invert_rng.0"]).to(at::kDouble);
    for (int it = 0; it < 4; ++it) {
      models::UNetInputs in;
      in.sample = z0.to(at::kFloat);
      in.timestep = at::scalar_tensor(sched->timesteps()[0], at::kFloat);
      in.encoder_hidden_states = cond;
      z0 = (x1 - b * m->unet->forward(in).to(at::kDouble)) / a;
    }
    auto dist = m->vae->encode(c.invert.image);
    const double sf = m->vae->config().scaling_factor;
    return ((z0 / sf - dist.mean.to(at::kDouble)) / dist.std.to(at::kDouble)).to(at::kFloat);
  }();
  {
    at::NoGradGuard g;
    auto m = model(v);
    const at::Tensor ours = pipelines::encode_image_latents(*m, c.invert.image, nullptr, ref["invert_rng.0"]);
    const at::Tensor theirs = pipelines::encode_image_latents(*m, c.invert.image, nullptr, ref_posterior_noise);
    // Printed, not asserted: sd15 1.5e-5 (our float32 encode is within 8e-7 of a float64 one; the reference's is
    // 1.5e-5 away from both), test 7e-7.
    check_close(v + "/diffedit invert posterior sample vs the reference's (recovered)", ours, theirs, 1.0);
  }

  // edit: per step from the reference's mask, inverted latents and previous step (1e-5), the decoder on the
  // reference's last latents (1e-5), then chained (1e-4 on latents, 1e-3 on the image).
  // mode 0: per step from the reference's inputs; 1: the edit chained from the reference's mask and inverted
  // latents; 2: everything chained from our own mask and inversion, the inversion starting from the reference's
  // posterior sample (recovered above); 3: the same from our own posterior sample of the recorded noise.
  //
  // Mode 3 on sd15 is looser, and why (investigated, not hidden): the reference's VAE posterior sample of this
  // image is 1.5e-5 (relative) away from ours. Not a draw, order, mode()/mean or preprocessing difference: (a) a
  // float64 run of our encoder agrees with our float32 one to 8e-7 and with the reference's to 1.5e-5 only, so the
  // departure is inside the reference's float32 encode of this image (where exactly is not identified: its encode
  // of the vae fixture's image matches ours to 1e-6); (b) the difference is uncorrelated with the noise term
  // std * eps (0.002) and with the mean (0.06), and the noise it implies equals invert_rng.0 to 1.9e-5; (c) the
  // same image is encoded: noise of +-0.5/255 on it (uint8 quantisation) would move the sample by 8.8e-3, of
  // +-0.005/255 still by 9e-5; the invert phase encodes batch 1 (generate_mask's batch of num_maps only feeds the
  // mask, which is exact). Eight inversion steps at guidance 1 grow the 1.5e-5 to 7e-5, the
  // guided (7.5) edit to 5.2e-4 on the latents and 2.0e-3 on the image. Mode 2, the same chain from the reference's
  // own posterior sample, meets 1e-4 / 1e-3, so every phase after the encode matches. The test variant's mode 3
  // meets 1e-4 / 1e-3 as it is.
  const double full_latent_tol = v == "sd15" ? 1e-3 : kChainTol;  // measured 5.2e-4
  const double full_image_tol = v == "sd15" ? 4e-3 : 1e-3;        // measured 2.0e-3
  for (int mode_i : {0, 1, 2, 3}) {
    const bool forced = mode_i == 0;
    const std::string mode = forced        ? " (per step)"
                             : mode_i == 1 ? " (edit chain)"
                             : mode_i == 2 ? " (full chain, reference's posterior sample)"
                                           : " (full chain)";
    const double tol = forced ? kTol : mode_i == 3 ? full_latent_tol : kChainTol;
    const double image_tol = forced ? kTol : mode_i == 3 ? full_image_tol : 1e-3;
    if (mode_i >= 2) {
      c.invert.posterior_noise = mode_i == 2 ? ref_posterior_noise : ref["invert_rng.0"];
      inv = pipe.invert(c.invert);
    }
    c.edit.mask_image = mode_i < 2 ? ref["mask"] : mask.mask;
    c.edit.image_latents = mode_i < 2 ? ref_inv : inv.latents;
    std::vector<at::Tensor> steps;
    c.edit.on_step_end = [&](int k, double, at::Tensor& lat) {
      steps.push_back(lat.clone());
      if (forced) lat = ref["edit.step." + std::to_string(k) + ".latents"].clone();
    };
    auto out = pipe.run(c.edit);
    EXPECT_EQ(out.timesteps, doubles(ref.meta["edit_timesteps"]));
    double worst = 0;
    for (size_t k = 0; k < steps.size(); ++k) {
      const std::string key = "edit.step." + std::to_string(k) + ".latents";
      worst = std::max(worst, check_close(v + "/diffedit " + key + mode, steps[k], ref[key], tol));
    }
    const double image_err = check_close(v + "/diffedit image" + mode, out.images, ref["image"], image_tol);
    std::printf("[check] %s/diffedit worst%s: latents rel %.3e (tol %.0e), image rel %.3e (tol %.0e)\n", v.c_str(),
                mode.c_str(), worst, tol, image_err, image_tol);
    EXPECT_LE(worst, tol) << "edit steps" << mode;
    EXPECT_LE(image_err, image_tol) << "image" << mode;
  }
}

INSTANTIATE_TEST_SUITE_P(DiffEdit, DiffEditGolden, ::testing::Values("sd15", "test"));

// A seeded generator through the three phases draws what a replay of the same draws, in diffusers' order
// (mask posterior [maps], mask noise [maps], invert posterior [1]), reproduces.
TEST(DiffEditSeed, GeneratorRunEqualsReplayOfItsDraws) {
  DMX_REQUIRE_FIXTURES();
  RefCase ref = load_ref("test", "diffedit");
  pipelines::DiffEditPipeline pipe(model("test"));
  DiffEditCase c = diffedit_case(ref);
  c.edit.eta = 0.5;  // the DDIM steps draw too

  auto run = [&](DiffEditCase cc, at::Generator* gen) {
    cc.mask.generator = cc.invert.generator = cc.edit.generator = gen;
    auto mask = pipe.generate_mask(cc.mask);
    auto inv = pipe.invert(cc.invert);
    cc.edit.mask_image = mask.mask;
    cc.edit.image_latents = inv.latents;
    return std::make_tuple(mask.mask, inv.latents, pipe.run(cc.edit).latents);
  };
  const uint64_t seed = 1234;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto [mask_a, inv_a, lat_a] = run(c, &gen);

  auto replay = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const std::vector<int64_t> maps_shape = {c.mask.num_maps_per_mask, 4, 32, 32};
  c.mask.posterior_noise = at::randn(maps_shape, replay, f32);
  c.mask.noise = at::randn(maps_shape, replay, f32);
  c.invert.posterior_noise = at::randn({1, 4, 32, 32}, replay, f32);
  for (int k = 0; k < 8; ++k) c.edit.step_noises.push_back(at::randn({1, 4, 32, 32}, replay, f32));
  auto [mask_b, inv_b, lat_b] = run(c, nullptr);
  EXPECT_TRUE(at::equal(mask_a, mask_b));
  EXPECT_TRUE(at::equal(inv_a, inv_b));
  EXPECT_TRUE(at::equal(lat_a, lat_b));
  // The fixture's draws are not from a known seed; a different seed must give different inverted latents.
  auto other = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  auto [mask_c, inv_c, lat_c] = run(diffedit_case(ref), &other);
  EXPECT_FALSE(at::equal(inv_a, inv_c));
}

// ---------------------------------------------------------------------------------------------------
template <typename F>
void expect_invalid(F&& f, const std::string& substr) {
  try {
    f();
    ADD_FAILURE() << "expected InvalidArgument containing '" << substr << "'";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(substr), std::string::npos) << e.what();
  }
}

TEST(DiffEditArgs, BadInputsNameTheRule) {
  DMX_REQUIRE_FIXTURES();
  auto m = model("test");
  pipelines::DiffEditPipeline pipe(m);
  const at::Tensor image = at::zeros({1, 3, 64, 64});
  pipelines::DiffEditMaskParams mp;
  mp.image = image;
  mp.source_prompt = "a";
  mp.target_prompt = "b";
  mp.num_maps_per_mask = 1;
  mp.num_inference_steps = 4;
  {
    auto q = mp;
    q.image = at::zeros({1, 3, 60, 64});
    expect_invalid([&] { pipe.generate_mask(q); }, "multiple of 8, got 64x60");
  }
  {
    auto q = mp;
    q.mask_thresholding_ratio = 0;
    expect_invalid([&] { pipe.generate_mask(q); }, "mask_thresholding_ratio must be positive, got 0");
  }
  {
    auto q = mp;
    q.mask_encode_strength = 1.5;
    expect_invalid([&] { pipe.generate_mask(q); }, "mask_encode_strength must be in [0, 1], got 1.5");
  }
  {
    auto q = mp;
    q.mask_encode_strength = 0.1;  // int(4 * 0.1) = 0
    expect_invalid([&] { pipe.generate_mask(q); }, "leaves no timestep");
  }
  {
    auto q = mp;
    q.noise = at::zeros({2, 4, 32, 32});
    expect_invalid([&] { pipe.generate_mask(q); }, "noise must have shape [1, 4, 32, 32]");
  }
  pipelines::DiffEditInvertParams ip;
  ip.image = image;
  ip.prompt = "a";
  ip.num_inference_steps = 4;
  ip.inpaint_strength = 0;
  expect_invalid([&] { pipe.invert(ip); }, "inpaint_strength must be in (0, 1], got 0");
  ip.inpaint_strength = 0.2;  // int(4 * 0.2) = 0 steps
  expect_invalid([&] { pipe.invert(ip); }, "inverts no step");

  pipelines::DiffEditParams ep;
  ep.prompt = "b";
  ep.num_inference_steps = 4;
  expect_invalid([&] { pipe.run(ep); }, "mask_image is required");
  ep.mask_image = at::full({1, 32, 32}, 2.0);
  ep.image_latents = at::zeros({1, 2, 4, 32, 32});  // 4 steps at 0.8 run 3
  expect_invalid([&] { pipe.run(ep); }, "mask_image must be in [0, 1]");
  ep.mask_image = at::ones({1, 32, 32});
  expect_invalid([&] { pipe.run(ep); }, "latent images from 3 timesteps");
  ep.image_latents = at::zeros({1, 3, 4, 16, 16});
  expect_invalid([&] { pipe.run(ep); }, "must have shape [4, 32, 32]");

  pipelines::DDIMInversionParams dp;
  dp.latents = at::zeros({1, 4, 32, 32});
  dp.prompt_embeds = at::zeros({1, 77, 32});
  dp.guidance_scale = 3.0;
  expect_invalid([&] { pipelines::ddim_invert(*m, dp); }, "needs negative_prompt_embeds");
}

TEST(DiffEditUnit, StepCounts) {
  EXPECT_EQ(pipelines::inverse_step_count(10, 0.8), 8);
  EXPECT_EQ(pipelines::inverse_step_count(10, 1.0), 10);
  EXPECT_EQ(pipelines::inverse_step_count(50, 0.5), 25);
  EXPECT_EQ(pipelines::inverse_step_count(4, 0.2), 0);
  EXPECT_EQ(pipelines::strength_start_index(10, 0.8), 2);
  EXPECT_EQ(pipelines::strength_start_index(10, 0.5), 5);
}

// ---------------------------------------------------------------------------------------------------
// dmx diffedit
std::string write_input_png(const std::string& name) {
  RefCase ref = load_ref("test", "diffedit");
  at::Tensor u8 = ref["input.image_u8"].contiguous();
  Image img;
  img.height = static_cast<int>(u8.size(0));
  img.width = static_cast<int>(u8.size(1));
  img.channels = 3;
  img.data.assign(u8.data_ptr<uint8_t>(), u8.data_ptr<uint8_t>() + u8.numel());
  const std::string path = temp_dir() + "/" + name;
  save_png(path, img);
  return path;
}

std::vector<std::string> diffedit_args(const std::string& image, const std::string& out) {
  return {"diffedit", "--model", fixture_model("test"), "--image", image, "--source-prompt", "a bowl of fruit",
          "--target-prompt", "a basket of pears", "--output", out, "--steps", "4", "--num-maps", "2", "--quiet"};
}

void expect_cli_error(std::vector<std::string> args, const std::string& substr, const std::string& out) {
  CliRun r = dmx_run(args);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find(substr), std::string::npos) << r.output;
  EXPECT_FALSE(std::ifstream(out).good()) << "no output on error: " << out;
}

TEST(DiffEditCli, BadInputExitsTwoNamingTheFlag) {
  DMX_REQUIRE_FIXTURES();
  const std::string image = write_input_png("diffedit-in.png");
  const std::string out = temp_dir() + "/diffedit-bad.png";
  auto with = [&](std::vector<std::string> extra) {  // sets (or adds) one option
    auto a = diffedit_args(image, out);
    auto it = std::find(a.begin(), a.end(), extra[0]);
    if (it != a.end()) {
      *(it + 1) = extra[1];
    } else {
      a.insert(a.end(), extra.begin(), extra.end());
    }
    return a;
  };
  auto without = [&](const std::string& flag) {
    auto a = diffedit_args(image, out);
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] == flag) {
        a.erase(a.begin() + static_cast<long>(i), a.begin() + static_cast<long>(i) + 2);
        break;
      }
    return a;
  };
  expect_cli_error(without("--source-prompt"), "--source-prompt is required", out);
  expect_cli_error(without("--target-prompt"), "--target-prompt is required", out);
  expect_cli_error(without("--image"), "--image is required", out);
  auto empty_prompt = diffedit_args(image, out);
  empty_prompt[6] = "";  // --source-prompt ""
  expect_cli_error(empty_prompt, "--source-prompt is required", out);
  const std::string junk = temp_dir() + "/diffedit-junk.png";
  { std::ofstream(junk) << "not an image"; }
  auto unreadable = diffedit_args(junk, out);
  expect_cli_error(unreadable, "--image", out);
  expect_cli_error(diffedit_args(temp_dir() + "/missing.png", out), "--image", out);
  expect_cli_error(with({"--steps", "0"}), "--steps must be in [1, 1000], got 0", out);
  expect_cli_error(with({"--encode-ratio", "0"}), "--encode-ratio must be in (0, 1], got 0", out);
  expect_cli_error(with({"--encode-ratio", "1.5"}), "--encode-ratio must be in (0, 1], got 1.5", out);
  expect_cli_error(with({"--encode-ratio", "0.1"}), "--encode-ratio 0.1 with --steps 4 runs no step", out);
  expect_cli_error(with({"--mask-threshold", "0"}), "--mask-threshold must be > 0, got 0", out);
  expect_cli_error(with({"--mask-output", temp_dir() + "/m.jpg"}), "--mask-output must end in .png", out);
  // An image whose sides are not multiples of 8.
  Image odd;
  odd.width = 60;
  odd.height = 64;
  odd.channels = 3;
  odd.data.assign(60 * 64 * 3, 128);
  const std::string odd_path = temp_dir() + "/diffedit-odd.png";
  save_png(odd_path, odd);
  expect_cli_error(diffedit_args(odd_path, out), "--image: width and height must be multiples of 8", out);
  CliRun help = dmx_run({"diffedit", "--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.output.find("--encode-ratio"), std::string::npos);
}

// A seeded CLI run writes the image, the mask (image size, white = edit) and the latents, with metadata, and its
// latents equal the pipeline's with a torch-style generator of that seed run through the three phases.
TEST(DiffEditCli, SeededRunMatchesPipelineAndWritesOutputs) {
  DMX_REQUIRE_FIXTURES();
  const std::string image = write_input_png("diffedit-in2.png");
  const std::string dir = temp_dir();
  auto args = diffedit_args(image, dir + "/de.png");
  for (const char* extra : {"--seed", "77", "--mask-output", "", "--save-latents", ""}) args.push_back(extra);
  args[args.size() - 3] = dir + "/de-mask.png";
  args[args.size() - 1] = dir + "/de.safetensors";
  CliRun r = dmx_run(args);
  ASSERT_EQ(r.code, 0) << r.output;
  Image mask_png = load_image(dir + "/de-mask.png", "mask");
  EXPECT_EQ(mask_png.width, 64);
  EXPECT_EQ(mask_png.height, 64);
  EXPECT_EQ(mask_png.channels, 1);
  const std::string params = read_image_parameters(dir + "/de.png");
  EXPECT_NE(params.find("a basket of pears\n"), std::string::npos) << params;
  EXPECT_NE(params.find("Seed: 77"), std::string::npos) << params;
  EXPECT_NE(params.find("DiffEdit source prompt: \"a bowl of fruit\""), std::string::npos) << params;
  at::Tensor cli_latents = io::load_safetensors(dir + "/de.safetensors").at("latents");

  pipelines::DiffEditPipeline pipe(model("test"));
  const at::Tensor img = image_to_tensor(load_image(image, "image"));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(77);
  pipelines::DiffEditMaskParams mp;
  mp.image = img;
  mp.source_prompt = "a bowl of fruit";
  mp.target_prompt = "a basket of pears";
  mp.num_maps_per_mask = 2;
  mp.num_inference_steps = 4;
  mp.generator = &gen;
  auto mask = pipe.generate_mask(mp);
  pipelines::DiffEditInvertParams ip;
  ip.image = img;
  ip.prompt = mp.source_prompt;
  ip.num_inference_steps = 4;
  ip.guidance_scale = 1.0;
  ip.generator = &gen;
  ip.show_progress = false;
  auto inv = pipe.invert(ip);
  pipelines::DiffEditParams ep;
  ep.prompt = mp.target_prompt;
  ep.mask_image = mask.mask;
  ep.image_latents = inv.latents;
  ep.num_inference_steps = 4;
  ep.generator = &gen;
  ep.show_progress = false;
  auto out = pipe.run(ep);
  // Same draws, different thread count: rounding only (a different draw order changes everything).
  DMX_EXPECT_CLOSE("diffedit CLI seed 77 latents vs pipeline", cli_latents, out.latents, 1e-4);
  // The mask PNG is the latent mask scaled up by the VAE factor (2 for this model).
  at::Tensor m = at::from_blob(mask_png.data.data(), {64, 64}, at::kByte).to(at::kFloat) / 255;
  EXPECT_TRUE(at::equal(m.index({at::indexing::Slice(0, at::indexing::None, 2), at::indexing::Slice(0, at::indexing::None, 2)}),
                        mask.mask[0]));
}

}  // namespace
}  // namespace dmx::test
