// DDIM inversion and DiffEdit against diffusers 0.27.2 (fixture cases ddim_inversion and diffedit), the
// seeded draw order of the three DiffEdit phases, argument checks, and dmx::diffedit (what the CLI runs) on a
// tiny random model.
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>

#include "core/image.h"
#include "dmx/diffedit.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "pipelines/ddim_inversion.h"
#include "pipelines/diffedit.h"
#include "pipelines/stable_diffusion.h"
#include "schedulers/scheduler.h"
#include "test_ref_cases.h"
#include "test_util.h"
#include "tiny_models.h"

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
      worst =
          std::max(worst, check_close(v + "/ddim_inversion " + key + ".eps" + mode, eps[k], ref[key + ".eps"], tol));
      worst = std::max(
          worst, check_close(v + "/ddim_inversion " + key + ".latents" + mode, lat[k], ref[key + ".latents"], tol));
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
TEST(DiffEditSeedGolden, GeneratorRunEqualsReplayOfItsDraws) {
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

TEST(DiffEditArgsTiny, BadInputsNameTheRule) {
  auto m = shared_tiny_model("test");
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
// dmx::diffedit (what `dmx diffedit` runs) on the tiny "test" model.

// A 64x64 picture of our own: colour gradients with a disc.
std::string write_input_png(const std::string& name) {
  Image img;
  img.width = img.height = 64;
  img.channels = 3;
  img.data.resize(64 * 64 * 3);
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x) {
      const bool disc = (x - 28) * (x - 28) + (y - 36) * (y - 36) < 16 * 16;
      uint8_t* px = &img.data[static_cast<size_t>((y * 64 + x) * 3)];
      px[0] = static_cast<uint8_t>(disc ? 200 : x * 4);
      px[1] = static_cast<uint8_t>(disc ? 150 : y * 4);
      px[2] = static_cast<uint8_t>(disc ? 20 : 100);
    }
  const std::string path = temp_dir() + "/" + name;
  save_png(path, img);
  return path;
}

DiffEditOptions diffedit_options(const std::string& image, const std::string& out) {
  DiffEditOptions o;
  o.model = tiny_model_dir("test");
  o.image = image;
  o.source_prompt = "a bowl of fruit";
  o.target_prompt = "a basket of pears";
  o.output = out;
  o.steps = 4;
  o.num_maps = 2;
  o.progress = false;
  return o;
}

TEST(DiffEditTiny, BadInputNamesTheFlagAndWritesNothing) {
  const std::string image = write_input_png("diffedit-in.png");
  const std::string out = temp_dir() + "/diffedit-bad.png";
  auto expect = [&](const std::function<void(DiffEditOptions&)>& edit, const std::string& substr) {
    DiffEditOptions o = diffedit_options(image, out);
    edit(o);
    expect_invalid([&] { diffedit(o); }, substr);
    EXPECT_FALSE(std::ifstream(out).good()) << "no output on error: " << out;
  };
  expect([](DiffEditOptions& o) { o.source_prompt.clear(); }, "--source-prompt is required");
  expect([](DiffEditOptions& o) { o.target_prompt.clear(); }, "--target-prompt is required");
  expect([](DiffEditOptions& o) { o.image.clear(); }, "--image is required");
  const std::string junk = temp_dir() + "/diffedit-junk.png";
  { std::ofstream(junk) << "not an image"; }
  expect([&](DiffEditOptions& o) { o.image = junk; }, "--image");
  expect([&](DiffEditOptions& o) { o.image = temp_dir() + "/missing.png"; }, "--image");
  expect([](DiffEditOptions& o) { o.steps = 0; }, "--steps must be in [1, 1000], got 0");
  expect([](DiffEditOptions& o) { o.encode_ratio = 0; }, "--encode-ratio must be in (0, 1], got 0");
  expect([](DiffEditOptions& o) { o.encode_ratio = 1.5; }, "--encode-ratio must be in (0, 1], got 1.5");
  expect([](DiffEditOptions& o) { o.encode_ratio = 0.1; }, "--encode-ratio 0.1 with --steps 4 runs no step");
  expect([](DiffEditOptions& o) { o.mask_threshold = 0; }, "--mask-threshold must be > 0, got 0");
  expect([](DiffEditOptions& o) { o.mask_output = temp_dir() + "/m.jpg"; }, "--mask-output must end in .png");
  // An image whose sides are not multiples of 8.
  Image odd;
  odd.width = 60;
  odd.height = 64;
  odd.channels = 3;
  odd.data.assign(60 * 64 * 3, 128);
  const std::string odd_path = temp_dir() + "/diffedit-odd.png";
  save_png(odd_path, odd);
  expect([&](DiffEditOptions& o) { o.image = odd_path; }, "--image: width and height must be multiples of 8");
}

// The three phases through the public API with one seed: writes the image, the mask (image size, white = edit) and
// the latents, with metadata, and its latents equal the pipeline's with a torch-style generator of that seed run
// through the three phases.
at::Tensor pipeline_latents(const std::string& image, pipelines::DiffEditMaskOutput* mask_out) {
  pipelines::DiffEditPipeline pipe(shared_tiny_model("test"));
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
  ip.num_inference_steps = 4;  // guidance: DiffEditInvertParams' default, diffusers' 7.5, as the CLI's
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
  if (mask_out) *mask_out = mask;
  return pipe.run(ep).latents;
}

TEST(DiffEditTiny, SeededRunMatchesPipelineAndWritesOutputs) {
  const std::string image = write_input_png("diffedit-in2.png");
  const std::string dir = temp_subdir("DiffEditTiny-SeededRunMatchesPipelineAndWritesOutputs");
  DiffEditOptions o = diffedit_options(image, dir + "/de.png");
  o.seed = 77;
  o.mask_output = dir + "/de-mask.png";
  o.save_latents = dir + "/de.safetensors";
  const DiffEditResult r = diffedit(o);
  EXPECT_EQ(r.seed, 77u);
  EXPECT_EQ(r.mask, dir + "/de-mask.png");
  Image mask_png = load_image(dir + "/de-mask.png", "mask");
  EXPECT_EQ(mask_png.width, 64);
  EXPECT_EQ(mask_png.height, 64);
  EXPECT_EQ(mask_png.channels, 1);
  const std::string params = read_image_parameters(dir + "/de.png");
  EXPECT_NE(params.find("a basket of pears\n"), std::string::npos) << params;
  EXPECT_NE(params.find("Seed: 77"), std::string::npos) << params;
  EXPECT_NE(params.find("DiffEdit source prompt: \"a bowl of fruit\""), std::string::npos) << params;
  at::Tensor api_latents = io::load_safetensors(dir + "/de.safetensors").at("latents");
  pipelines::DiffEditMaskOutput mask;
  const at::Tensor expected = pipeline_latents(image, &mask);
  DMX_EXPECT_CLOSE("diffedit seed 77 latents vs pipeline", api_latents, expected, 1e-4);
  // The mask PNG is the latent mask scaled up by the VAE factor (2 for this model).
  at::Tensor m = at::from_blob(mask_png.data.data(), {64, 64}, at::kByte).to(at::kFloat) / 255;
  EXPECT_TRUE(
      at::equal(m.index({at::indexing::Slice(0, at::indexing::None, 2), at::indexing::Slice(0, at::indexing::None, 2)}),
                mask.mask[0]));
}

// ---------------------------------------------------------------------------------------------------
// Seed-driven DiffEdit end to end (issue 13): one generator through generate_mask, invert and the edit with
// nothing injected, against diffusers run the same way. Cases: the shared fixture diffedit_seeded (sd15,
// 192x128, 10 maps, encode ratio 0.5, no negative prompt) and the small references in tests/ref made by
// tests/ref/make_seeded_refs.py (sd15 square with 2 maps and a negative prompt; the test model wide at encode
// ratio 0.8 with a negative prompt, and square).
// Tolerances (issue 13): 5e-3 absolute on the latents, 8/255 on the picture, the mask exactly. The phases are
// checked in order (draws, mask, inverted latents, each edit step, the picture), so a failure names the first
// one that departs; the command line recorded with each case is then run as a user would.
constexpr double kSeededLatentTol = 5e-3;
constexpr int kSeededPictureTol = 8;

struct SeededDiffEdit {
  RefCase ref;
  std::string variant;  // sd15 | test (the fixture model the case ran on)
  std::string image;    // the input picture
  std::string negative_prompt;
  int num_maps = 10;  // diffusers' default
};

SeededDiffEdit seeded_case(const std::string& name) {
  SeededDiffEdit c;
  const bool shared = name == "diffedit_seeded";
  c.ref = shared ? load_ref("sd15", name) : load_ref_file(repo_ref_dir() + "/" + name);
  const std::string model_dir = c.ref.meta["model_dir"].get<std::string>();  // "models/<variant>"
  c.variant = model_dir.substr(model_dir.rfind('/') + 1);
  c.image = (shared ? fixtures_dir() + "/ref/sd15" : repo_ref_dir()) + "/" + c.ref.meta["image"].get<std::string>();
  c.negative_prompt = c.ref.meta.value("negative_prompt", std::string());
  c.num_maps = c.ref.meta.value("num_maps_per_mask", 10);
  return c;
}

// max |a - e| over the whole tensor, and inside / outside the latent mask [1, h, w].
double seeded_latent_error(const std::string& what, const at::Tensor& actual, const at::Tensor& expected,
                           const at::Tensor& mask) {
  check_close(what, actual, expected, kSeededLatentTol);  // prints the relative error and the worst values
  const at::Tensor d = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs();
  const at::Tensor in = mask.reshape({mask.size(-2), mask.size(-1)}).to(at::kBool).expand_as(d);
  const double inside = in.any().item<bool>() ? d.masked_select(in).max().item<double>() : 0.0;
  const double outside = (~in).any().item<bool>() ? d.masked_select(~in).max().item<double>() : 0.0;
  std::printf("[check] %-48s max_abs inside the mask %.3e, outside %.3e (tol %.0e)\n", what.c_str(), inside, outside,
              kSeededLatentTol);
  return std::max(inside, outside);
}

class DiffEditSeededGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(DiffEditSeededGolden, PhasesFromTheSeedMatchReference) {
  DMX_REQUIRE_FIXTURES();
  const SeededDiffEdit c = seeded_case(GetParam());
  const auto& meta = c.ref.meta;
  const std::string tag = GetParam();
  const uint64_t seed = meta["seed"].get<uint64_t>();
  const int steps = meta["steps"].get<int>();
  const double ratio = meta["encode_ratio"].get<double>();

  // 0. The draws: three (mask posterior [maps], mask noise [maps], inversion posterior [1]; the edit draws
  // nothing), and where recorded a generator of the seed gives them bit for bit.
  {
    auto replay = at::make_generator<at::CPUGeneratorImpl>(seed);
    const auto& shapes = meta["rng_shapes"];
    ASSERT_EQ(shapes.size(), 3u) << "mask posterior, mask noise, inversion posterior; the edit draws nothing";
    for (size_t k = 0; k < shapes.size(); ++k) {
      const at::Tensor draw = at::randn(shapes[k].get<std::vector<int64_t>>(), replay, at::kFloat);
      const std::string key = "rng." + std::to_string(k);
      if (c.ref.has(key)) {
        EXPECT_TRUE(at::equal(draw, c.ref[key])) << tag << " draw " << k;
      }
    }
  }

  pipelines::DiffEditPipeline pipe(model(c.variant));
  const at::Tensor image = image_to_tensor(to_rgb(load_image(c.image, "image")));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const std::string src = meta["source_prompt"].get<std::string>(), tgt = meta["target_prompt"].get<std::string>();

  // 1. generate_mask, every setting at diffusers' default but the maps: exact.
  pipelines::DiffEditMaskParams mp;
  mp.image = image;
  mp.source_prompt = src;
  mp.target_prompt = tgt;
  mp.source_negative_prompt = mp.target_negative_prompt = c.negative_prompt;
  mp.num_maps_per_mask = c.num_maps;
  mp.num_inference_steps = steps;
  mp.generator = &gen;
  const at::Tensor mask = pipe.generate_mask(mp).mask;
  const int64_t mismatched = mask.ne(c.ref["mask"]).sum().item<int64_t>();
  std::printf("[check] %s mask: %lld of %lld entries differ (%lld set)\n", tag.c_str(),
              static_cast<long long>(mismatched), static_cast<long long>(mask.numel()),
              static_cast<long long>(c.ref["mask"].sum().item<double>()));
  ASSERT_TRUE(mask.sizes().equals(c.ref["mask"].sizes())) << mask.sizes();
  EXPECT_EQ(mismatched, 0) << tag << " mask";

  // 2. invert at diffusers' defaults (guidance 7.5) with the same generator.
  pipelines::DiffEditInvertParams ip;
  ip.image = image;
  ip.prompt = src;
  ip.negative_prompt = c.negative_prompt;
  ip.num_inference_steps = steps;
  ip.inpaint_strength = ratio;
  ip.generator = &gen;
  ip.show_progress = false;
  const auto inv = pipe.invert(ip);
  EXPECT_EQ(inv.latents.size(1), pipelines::inverse_step_count(steps, ratio));
  if (c.ref.has("inv_latents")) {
    ASSERT_TRUE(inv.latents.sizes().equals(c.ref["inv_latents"].sizes())) << inv.latents.sizes();
    double worst_inv = 0;
    for (int64_t k = inv.latents.size(1) - 1; k >= 0; --k)  // in the order they were computed
      worst_inv = std::max(worst_inv, seeded_latent_error(tag + " inverted latents " + std::to_string(k),
                                                          inv.latents[0][k], c.ref["inv_latents"][0][k], mask));
    EXPECT_LE(worst_inv, kSeededLatentTol) << tag << " inverted latents";
  }

  // 3. The edit, same generator; every recorded step, then the picture.
  pipelines::DiffEditParams ep;
  ep.prompt = tgt;
  ep.negative_prompt = c.negative_prompt;
  ep.mask_image = mask;
  ep.image_latents = inv.latents;
  ep.inpaint_strength = ratio;
  ep.num_inference_steps = steps;
  ep.generator = &gen;
  ep.show_progress = false;
  std::vector<at::Tensor> lat;
  ep.on_step_end = [&](int, double, at::Tensor& l) { lat.push_back(l.clone()); };
  const auto out = pipe.run(ep);
  if (meta.contains("timesteps")) {
    EXPECT_EQ(out.timesteps, doubles(meta["timesteps"])) << tag;
  }
  for (size_t k = 0; k < lat.size(); ++k) {
    const std::string key = "step." + std::to_string(k) + ".latents";
    if (c.ref.has(key)) {
      EXPECT_LE(seeded_latent_error(tag + " edit " + key, lat[k], c.ref[key], mask), kSeededLatentTol) << key;
    }
  }
  EXPECT_LE(seeded_latent_error(tag + " final latents", out.latents, c.ref["latents"], mask), kSeededLatentTol);
  const int picture = max_u8_diff(tensor_to_image(out.images[0]), c.ref["image_u8"]);
  std::printf("[check] %s picture: max |diff| %d/255 (tol %d)\n", tag.c_str(), picture, kSeededPictureTol);
  EXPECT_LE(picture, kSeededPictureTol) << tag << " picture";
}

// The command line recorded with the case (the fixture's JSON "dmx"), run as a user runs it: only the model,
// the input and the output paths are replaced.
TEST_P(DiffEditSeededGolden, CommandLineMatchesReference) {
  DMX_REQUIRE_FIXTURES();
  const SeededDiffEdit c = seeded_case(GetParam());
  const std::string tag = GetParam();
  const std::string dir = temp_dir() + "/seeded-" + tag;
  std::filesystem::create_directories(dir);
  const CliRun r = run_recorded_command(c.ref.meta["dmx"].get<std::string>(), "diffedit",
                                        {{"--model", fixture_model(c.variant)},
                                         {"--image", c.image},
                                         {"--save-latents", dir + "/latents.safetensors"},
                                         {"--mask-output", dir + "/mask.png"},
                                         {"--output", dir + "/edit.png"}});
  ASSERT_EQ(r.code, 0) << r.output;

  const at::Tensor mask = c.ref["mask"];  // [1, h, w]
  const at::Tensor latents = io::load_safetensors(dir + "/latents.safetensors").at("latents");
  EXPECT_LE(seeded_latent_error(tag + " CLI final latents", latents, c.ref["latents"], mask), kSeededLatentTol);
  const int picture = max_u8_diff(load_image(dir + "/edit.png", "output"), c.ref["image_u8"]);
  std::printf("[check] %s CLI picture: max |diff| %d/255 (tol %d)\n", tag.c_str(), picture, kSeededPictureTol);
  EXPECT_LE(picture, kSeededPictureTol) << tag << " picture";
  // The mask PNG: the latent mask scaled up by the VAE factor, white = edit.
  const Image m = load_image(dir + "/mask.png", "mask");
  ASSERT_EQ(m.channels, 1);
  const int64_t f = m.height / mask.size(1);
  ASSERT_EQ(m.width, mask.size(2) * f);
  using at::indexing::None;
  using at::indexing::Slice;
  const at::Tensor m_latent = at::from_blob(const_cast<uint8_t*>(m.data.data()), {m.height, m.width}, at::kByte)
                                  .index({Slice(0, None, f), Slice(0, None, f)})
                                  .to(at::kFloat)
                                  .div(255);
  EXPECT_TRUE(at::equal(m_latent, mask[0])) << tag << " mask PNG";
}

INSTANTIATE_TEST_SUITE_P(Seeded, DiffEditSeededGolden,
                         ::testing::Values("diffedit_seeded", "diffedit_seeded_sd15_square_neg",
                                           "diffedit_seeded_test_wide_neg", "diffedit_seeded_test_square"));

// The command: help, a missing flag (exit 2, nothing written), and a seeded run (exit 0) equal to the API's.
TEST(DiffEditCli, HelpAndExitCodes) {
  CliRun help = dmx_run({"diffedit", "--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.output.find("--encode-ratio"), std::string::npos);
  const std::string image = write_input_png("diffedit-cli.png");
  const std::string dir = temp_subdir("DiffEditCli-HelpAndExitCodes");
  const std::vector<std::string> args = {"diffedit",
                                         "--model",
                                         tiny_model_dir("test"),
                                         "--source-prompt",
                                         "a bowl of fruit",
                                         "--target-prompt",
                                         "a basket of pears",
                                         "--output",
                                         dir + "/cli.png",
                                         "--steps",
                                         "4",
                                         "--num-maps",
                                         "2",
                                         "--quiet"};
  CliRun r = dmx_run(args);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("error: --image is required"), std::string::npos) << r.output;
  EXPECT_FALSE(std::ifstream(dir + "/cli.png").good());
  auto ok = args;
  ok.insert(ok.end(), {"--image", image, "--seed", "77", "--save-latents", dir + "/cli.safetensors"});
  r = dmx_run(ok);
  ASSERT_EQ(r.code, 0) << r.output;
  // Same draws, another thread count: rounding only (a different draw order changes everything).
  DMX_EXPECT_CLOSE("diffedit CLI seed 77 latents vs pipeline",
                   io::load_safetensors(dir + "/cli.safetensors").at("latents"), pipeline_latents(image, nullptr),
                   1e-4);
}

}  // namespace
}  // namespace dmx::test
