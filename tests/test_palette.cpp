// Palette (docs/palette.md): degradations, the schedule, the noise-level embedding, the training step and the
// sampler against the unofficial Palette code, and dmx train palette / dmx restore end to end.
//   PaletteRefUnit      tests/ref/palette_refs.* (tests/ref/make_palette_refs.py: Janspiry's code, commit 136b29f)
//   PaletteDegradeUnit  grayscale, masks, JPEG round trips, training conditions
//   PaletteCli          a tiny train-then-restore run, resume, and restore's bad input (exit 2, nothing written)
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/degradations.h"
#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "loaders/palette.h"
#include "nn/layers.h"
#include "schedulers/palette.h"
#include "test_ref_cases.h"
#include "test_util.h"
#include "training/palette_train.h"

namespace dmx::test {
namespace {

namespace fs = std::filesystem;
namespace sch = dmx::schedulers;

const RefCase& refs() {
  static const RefCase r = load_ref_file(repo_ref_dir() + "/palette_refs");
  return r;
}

// The reference's stand-in denoiser: eps_hat = tanh(0.5 cond + 0.7 y) (0.5 + gamma).
at::Tensor ref_denoise(const at::Tensor& cond, const at::Tensor& y, const at::Tensor& g) {
  return at::tanh(0.5 * cond + 0.7 * y) * (0.5 + g.reshape({-1, 1, 1, 1}));
}

// ---------------------------------------------------------------------------------------------------------------
// Against the unofficial code.

TEST(PaletteRefUnit, BetaSchedulesMatchMakeBetaSchedule) {
  for (const auto& [name, c] : refs().meta.at("cases").items()) {
    if (name.rfind("schedule.", 0) != 0) continue;
    sch::PaletteBetaSchedule s;
    s.schedule = c.at("schedule").get<std::string>();
    s.n_timestep = c.at("n_timestep").get<int64_t>();
    s.linear_start = c.at("linear_start").get<double>();
    s.linear_end = c.at("linear_end").get<double>();
    // float64 both sides: the same linspace / cumprod formulas; 1e-12 relative leaves room for libm's cos.
    EXPECT_LE(check_close(name + " betas", sch::palette_betas(s), refs()[name + ".betas"], 1e-12), 1e-12) << name;
  }
}

TEST(PaletteRefUnit, GammasOfTheTestSchedule) {
  const at::Tensor betas = sch::palette_betas(sch::palette_test_schedule());
  // float32 buffers made from float64 values: equal to the last bit.
  EXPECT_EQ(check_close("gammas", sch::palette_gammas(betas), refs()["schedule.test.gammas"], 0), 0);
  const sch::PaletteSampler s(betas);
  EXPECT_EQ(check_close("sampler gammas", s.gammas(), refs()["schedule.test.gammas"], 0), 0);
}

TEST(PaletteRefUnit, NoiseLevelEmbeddingIsGammaEmbeddingAndCondEmbed) {
  const RefCase& r = refs();
  const at::Tensor g = r["embedding.gammas"];
  // diffusers' time projection (flip_sin_to_cos, freq_shift 0) of the continuous level = gamma_embedding.
  const at::Tensor f = nn::get_timestep_embedding(g, 64, true, 0, 1.0, 10000);
  EXPECT_LE(check_close("gamma_embedding", f, r["embedding.features"], 1e-6), 1e-6);
  // TimestepEmbedding(64 -> 256, SiLU) with the reference's cond_embed weights = cond_embed.
  nn::TimestepEmbedding te(64, 256, nn::Act::SiLU);
  {
    at::NoGradGuard ng;
    te->linear_1->weight.copy_(r["embedding.linear_1.weight"]);
    te->linear_1->bias.copy_(r["embedding.linear_1.bias"]);
    te->linear_2->weight.copy_(r["embedding.linear_2.weight"]);
    te->linear_2->bias.copy_(r["embedding.linear_2.bias"]);
    EXPECT_LE(check_close("cond_embed", te->forward(f), r["embedding.emb"], 1e-5), 1e-5);
  }
}

TEST(PaletteRefUnit, TrainingStepMatchesNetworkForward) {
  const RefCase& r = refs();
  const at::Tensor gammas = sch::palette_gammas(sch::palette_betas(sch::palette_train_schedule()));
  for (const char* task : {"inpaint", "colorize"})
    for (const char* loss : {"l2", "l1"}) {
      const std::string k = std::string("train_") + task + "_" + loss;
      const at::Tensor mask = r.has(k + ".mask") ? r[k + ".mask"] : at::Tensor();
      const training::PaletteStep s =
          training::palette_step_inputs(gammas, r[k + ".y0"], mask, r[k + ".t"], r[k + ".u"], r[k + ".noise"]);
      EXPECT_LE(check_close(k + " gammas", s.gammas, r[k + ".gammas"], 1e-6), 1e-6);
      const at::Tensor input = at::cat({r[k + ".cond"], s.model_y}, 1);
      EXPECT_LE(check_close(k + " model input", input, r[k + ".model_input"], 1e-6), 1e-6);
      const at::Tensor eps_hat = ref_denoise(r[k + ".cond"], s.model_y, s.gammas);
      const at::Tensor l = training::palette_loss(loss, s.target, eps_hat, mask).mean();
      EXPECT_LE(check_close(k + " loss", l.reshape({1}), r[k + ".loss"], 1e-5), 1e-5);
    }
}

TEST(PaletteRefUnit, OneSamplerStepMatchesPSample) {
  const RefCase& r = refs();
  const sch::PaletteSampler s(sch::palette_betas(sch::palette_test_schedule()));
  for (int t : {999, 500, 1, 0}) {
    const at::Tensor eps = ref_denoise(r["step.cond"], r["step.y_t"], s.noise_level(t).reshape({1}));
    const at::Tensor out = s.step(r["step.y_t"], t, eps, r["step.noise"]);
    EXPECT_LE(check_close("p_sample t=" + std::to_string(t), out, r["step.out_" + std::to_string(t)], 1e-5), 1e-5);
  }
}

TEST(PaletteRefUnit, RestorationLoopsMatchWithTheSameSeed) {
  const RefCase& r = refs();
  sch::PaletteBetaSchedule b{"linear", 10, 1e-2, 0.5, 8e-3};
  const sch::PaletteSampler s(sch::palette_betas(b));
  for (const char* task : {"inpaint", "colorize"}) {
    const std::string k = std::string("loop_") + task;
    const at::Tensor mask = r.has(k + ".mask") ? r[k + ".mask"] : at::Tensor();
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(77);
    const at::Tensor out = sch::palette_sample(s, r[k + ".cond"], r[k + ".known"], mask, gen, ref_denoise);
    EXPECT_LE(check_close(k, out, r[k + ".out"], 1e-5), 1e-5);
  }
}

TEST(PaletteRefUnit, RespacingKeepsTheGammasOfTheStepsKept) {
  const at::Tensor betas = sch::palette_betas(sch::palette_test_schedule());
  const at::Tensor full = sch::palette_gammas(betas);
  const auto idx = sch::palette_respaced_indices(1000, 50);
  ASSERT_EQ(idx.size(), 50u);
  EXPECT_EQ(idx.front(), 0);
  EXPECT_EQ(idx.back(), 999);
  const sch::PaletteSampler s(sch::palette_respaced_betas(betas, 50));
  for (size_t k = 0; k < idx.size(); ++k)
    EXPECT_NEAR(s.gammas()[static_cast<int64_t>(k)].item<double>(), full[idx[k]].item<double>(),
                1e-6 * full[idx[k]].item<double>() + 1e-30);
  // All the steps: the schedule itself.
  EXPECT_EQ(check_close("respaced 1000", sch::palette_respaced_betas(betas, 1000), betas, 1e-12) <= 1e-12, true);
}

// ---------------------------------------------------------------------------------------------------------------
// Degradations.

at::Tensor test_picture(int64_t h, int64_t w) {  // smooth gradients and a disc, in [-1, 1]
  const at::Tensor y = at::linspace(-1, 1, h).view({h, 1}).expand({h, w});
  const at::Tensor x = at::linspace(-1, 1, w).view({1, w}).expand({h, w});
  const at::Tensor disc = ((x * x + y * y) < 0.3).to(at::kFloat);
  return at::stack({x * 0.8, y * 0.6, disc * 1.6 - 0.8}).contiguous();
}

TEST(PaletteDegradeUnit, GrayscaleIsTheLumaFormula) {
  const at::Tensor x = test_picture(16, 24);
  const at::Tensor g = degrade::grayscale(x);
  ASSERT_EQ(g.sizes(), x.sizes());
  const at::Tensor l = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2];
  for (int c = 0; c < 3; ++c) EXPECT_LE((g[c] - l).abs().max().item<double>(), 1e-6);
  // Idempotent on gray pictures, batched too.
  EXPECT_LE((degrade::grayscale(g.unsqueeze(0))[0] - g).abs().max().item<double>(), 1e-6);
}

TEST(PaletteDegradeUnit, FixedMasksHaveTheirShapes) {
  const at::Tensor c = degrade::center_mask(32, 48);
  EXPECT_EQ(c.sizes(), (std::vector<int64_t>{1, 32, 48}));
  EXPECT_EQ(c.sum().item<double>(), 16 * 24);
  EXPECT_EQ(c[0][8][12].item<float>(), 1.f);
  EXPECT_EQ(c[0][7][12].item<float>(), 0.f);
  EXPECT_EQ(c[0][24][36].item<float>(), 0.f);
  // Uncropping: left, top, bottom, right halves.
  const at::Tensor l = degrade::uncrop_mask(32, 48, 0), t = degrade::uncrop_mask(32, 48, 1);
  const at::Tensor b = degrade::uncrop_mask(32, 48, 2), r = degrade::uncrop_mask(32, 48, 3);
  for (const auto& m : {l, t, b, r}) EXPECT_EQ(m.sum().item<double>(), 32 * 48 / 2);
  EXPECT_EQ(l[0][5][0].item<float>(), 1.f);
  EXPECT_EQ(l[0][5][47].item<float>(), 0.f);
  EXPECT_EQ(t[0][0][5].item<float>(), 1.f);
  EXPECT_EQ(t[0][31][5].item<float>(), 0.f);
  EXPECT_EQ(b[0][31][5].item<float>(), 1.f);
  EXPECT_EQ(r[0][5][47].item<float>(), 1.f);
  EXPECT_EQ((l + r).min().item<float>(), 1.f);
  EXPECT_THROW(degrade::uncrop_mask(32, 48, 4), InvalidArgument);
}

TEST(PaletteDegradeUnit, RandomMasksStayInTheirRangesAndFollowTheSeed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const int64_t h = 64, w = 64;
  double min_area = 1e9, max_area = 0;
  for (int i = 0; i < 50; ++i) {
    const at::Tensor m = degrade::box_mask(h, w, gen);
    const at::Tensor rows = m[0].amax(1).nonzero(), cols = m[0].amax(0).nonzero();
    ASSERT_GT(rows.size(0), 0);
    const int64_t top = rows.min().item<int64_t>(), bottom = rows.max().item<int64_t>();
    const int64_t left = cols.min().item<int64_t>(), right = cols.max().item<int64_t>();
    const int64_t bh = bottom - top + 1, bw = right - left + 1;
    EXPECT_EQ(m.sum().item<double>(), static_cast<double>(bh * bw));  // one solid box
    EXPECT_GE(top, h * 20 / 256);
    EXPECT_GE(left, w * 20 / 256);
    EXPECT_LE(bh, h / 2);
    EXPECT_LE(bw, w / 2);
    EXPECT_GE(bh, h / 2 - h * 40 / 256 / 2);
    min_area = std::min(min_area, m.sum().item<double>());
    max_area = std::max(max_area, m.sum().item<double>());
  }
  EXPECT_LT(min_area, max_area);  // the draws vary
  int nonempty = 0;
  for (int i = 0; i < 30; ++i) {
    const at::Tensor m = degrade::free_form_mask(h, w, gen);
    EXPECT_EQ(m.sizes(), (std::vector<int64_t>{1, h, w}));
    EXPECT_TRUE(((m == 0) | (m == 1)).all().item<bool>());
    EXPECT_LT(m.mean().item<double>(), 0.9);
    nonempty += m.sum().item<double>() > 0;
  }
  EXPECT_EQ(nonempty, 30);
  at::Generator a = at::make_generator<at::CPUGeneratorImpl>(9), b = at::make_generator<at::CPUGeneratorImpl>(9);
  at::Generator c = at::make_generator<at::CPUGeneratorImpl>(10);
  const at::Tensor ma = degrade::hybrid_mask(h, w, a), mb = degrade::hybrid_mask(h, w, b);
  EXPECT_TRUE(ma.equal(mb));
  EXPECT_FALSE(ma.equal(degrade::hybrid_mask(h, w, c)));
  EXPECT_THROW(degrade::random_mask(degrade::Task::Colorize, h, w, a), InvalidArgument);
}

TEST(PaletteDegradeUnit, JpegErrorFallsWithQuality) {
  const at::Tensor x = test_picture(64, 64);
  double last = 1e9;
  for (int q : {5, 10, 20, 90}) {
    const at::Tensor j = degrade::jpeg_roundtrip(x, q);
    ASSERT_EQ(j.sizes(), x.sizes());
    const double err = (j - x).abs().mean().item<double>();
    std::printf("[jpeg] quality %d: mean |error| %.4f (of 2)\n", q, err);
    EXPECT_LT(err, last) << "quality " << q;
    last = err;
  }
  EXPECT_GT((degrade::jpeg_roundtrip(x, 5) - x).abs().mean().item<double>(), 0.02);
  EXPECT_THROW(degrade::jpeg_roundtrip(x, 0), InvalidArgument);
  EXPECT_THROW(degrade::jpeg_roundtrip(x, 101), InvalidArgument);
}

TEST(PaletteDegradeUnit, TrainingConditionsOfEachTask) {
  const at::Tensor x = test_picture(32, 32);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor m;
  EXPECT_TRUE(degrade::make_condition(degrade::Task::Colorize, x, gen, &m).equal(degrade::grayscale(x)));
  EXPECT_FALSE(m.defined());
  const at::Tensor j = degrade::make_condition(degrade::Task::Jpeg, x, gen, &m);
  bool one_of = false;
  for (int q : degrade::kJpegQualities) one_of |= j.equal(degrade::jpeg_roundtrip(x, q));
  EXPECT_TRUE(one_of);
  for (auto t : {degrade::Task::Inpaint, degrade::Task::Uncrop}) {
    const at::Tensor c = degrade::make_condition(t, x, gen, &m);
    ASSERT_TRUE(m.defined());
    EXPECT_TRUE(((c - x).abs() * (1 - m)).max().item<double>() == 0);  // known region kept
    EXPECT_GT(((c - x).abs() * m).sum().item<double>(), 0);            // noise in the hole
  }
  EXPECT_EQ(degrade::parse_task("uncrop"), degrade::Task::Uncrop);
  EXPECT_THROW(degrade::parse_task("sharpen"), InvalidArgument);
}

// ---------------------------------------------------------------------------------------------------------------
// The commands.

// A folder of n 16x16 pictures (coloured squares on white).
std::string tiny_pictures(const std::string& name, int n) {
  const std::string dir = temp_subdir(name);
  for (int i = 0; i < n; ++i) {
    Image img;
    img.width = img.height = 16;
    img.channels = 3;
    img.data.assign(16 * 16 * 3, 255);
    for (int y = 3 + i % 3; y < 11 + i % 3; ++y)
      for (int x = 4; x < 12; ++x) {
        uint8_t* p = &img.data[static_cast<size_t>((y * 16 + x) * 3)];
        p[0] = static_cast<uint8_t>(40 * i);
        p[1] = 200;
        p[2] = static_cast<uint8_t>(255 - 30 * i);
      }
    save_png(dir + "/p" + std::to_string(i) + ".png", img);
  }
  return dir;
}

std::vector<std::string> train_args(const std::string& data, const std::string& out, const std::string& steps) {
  return {"train",        "palette", "--task",  "inpaint", "--data",       data, "--output",           out,
          "--resolution", "16",      "--steps", steps,     "--batch-size", "2",  "--palette-channels", "32",
          "--threads",    "1",       "--seed",  "3",       "--quiet"};
}

TEST(PaletteCli, TrainThenRestoreAndResumeEqualsOneRun) {
  const std::string data = tiny_pictures("palette-cli-data", 4);
  const std::string dir = temp_subdir("palette-cli");
  const CliRun a = dmx_run(train_args(data, dir + "/a", "4"));
  ASSERT_EQ(a.code, 0) << a.output;
  ASSERT_TRUE(path_exists(dir + "/a/palette.json"));
  // Interrupted after 2 steps (a checkpoint), resumed to 4: the same weights as the run in one go.
  auto b1 = train_args(data, dir + "/b", "2");
  b1.insert(b1.end(), {"--output-dir", dir + "/b.train"});
  ASSERT_EQ(dmx_run(b1).code, 0);
  auto b2 = train_args(data, dir + "/b", "4");
  b2.insert(b2.end(), {"--output-dir", dir + "/b.train", "--resume", dir + "/b.train", "--overwrite"});
  const CliRun b = dmx_run(b2);
  ASSERT_EQ(b.code, 0) << b.output;
  const io::TensorMap wa = io::load_safetensors(dir + "/a/diffusion_pytorch_model.safetensors");
  const io::TensorMap wb = io::load_safetensors(dir + "/b/diffusion_pytorch_model.safetensors");
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [k, v] : wa) EXPECT_TRUE(v.equal(wb.at(k))) << k;

  // Restore: two samples of one picture, the known region kept exactly.
  const std::string img = data + "/p1.png";
  const CliRun r =
      dmx_run({"restore", "--model", dir + "/a", "--image", img, "--steps", "5", "--seed", "1", "--num-images", "2",
               "--output", dir + "/r.png", "--save-input", dir + "/in.png", "--quiet"});
  ASSERT_EQ(r.code, 0) << r.output;
  const Image src = load_image(img, "x");
  const at::Tensor mask = degrade::center_mask(16, 16)[0];
  for (const char* name : {"/r-0.png", "/r-1.png"}) {
    const Image o = load_image(dir + name, "x");
    ASSERT_EQ(o.width, 16);
    ASSERT_EQ(o.height, 16);
    int outside = 0;
    for (int y = 0; y < 16; ++y)
      for (int x = 0; x < 16; ++x)
        if (mask[y][x].item<float>() == 0)
          for (int ch = 0; ch < 3; ++ch) {
            const size_t i = static_cast<size_t>((y * 16 + x) * 3 + ch);
            outside = std::max(outside, std::abs(int(o.data[i]) - int(src.data[i])));
          }
    EXPECT_LE(outside, 1) << name;  // pasted back (one 8-bit step of rounding)
  }
  EXPECT_NE(load_image(dir + "/r-0.png", "x").data, load_image(dir + "/r-1.png", "x").data);
  EXPECT_TRUE(path_exists(dir + "/in.png"));
  // The same seed and batch give the same pictures (the draws cover the batch, so one image alone differs).
  const CliRun again = dmx_run({"restore", "--model", dir + "/a", "--image", img, "--steps", "5", "--seed", "1",
                                "--num-images", "2", "--output", dir + "/again.png", "--quiet"});
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_EQ(load_image(dir + "/again-0.png", "x").data, load_image(dir + "/r-0.png", "x").data);
  EXPECT_EQ(load_image(dir + "/again-1.png", "x").data, load_image(dir + "/r-1.png", "x").data);
}

TEST(PaletteCli, RestoreRefusesBadInputAndWritesNothing) {
  const std::string data = tiny_pictures("palette-bad-data", 2);
  const std::string model_dir = temp_subdir("palette-bad-model");
  ASSERT_EQ(dmx_run(train_args(data, model_dir + "/m", "1")).code, 0);
  const std::string m = model_dir + "/m";
  const std::string out = temp_subdir("palette-bad-out");
  // A mask of another size.
  Image mask;
  mask.width = mask.height = 24;
  mask.channels = 1;
  mask.data.assign(24 * 24, 255);
  save_png(out + "/../palette-bad-mask.png", mask);
  const std::string img = data + "/p0.png";
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"restore", "--model", m, "--output", out + "/o.png", "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return dmx_run(args);
  };
  struct Case {
    std::vector<std::string> extra;
    const char* message;
  };
  std::ofstream(out + "/../palette-bad-text.png") << "not a picture";
  const std::vector<Case> cases = {
      {{"--image", img, "--mask", out + "/../palette-bad-mask.png"}, "--mask must be 16x16"},
      {{"--image", out + "/../palette-bad-text.png"}, "--image"},
      {{"--image", out + "/../none.png"}, "--image"},
      {{"--image", img, "--task", "sharpen"}, "--task must be colorize, inpaint, uncrop or jpeg"},
      {{"--image", img, "--task", "colorize"}, "was trained for inpaint"},
      {{"--image", img, "--jpeg-quality", "10"}, "--jpeg-quality is for the jpeg task"},
      {{"--image", img, "--steps", "0"}, "--steps"},
  };
  for (const auto& c : cases) {
    const CliRun r = run(c.extra);
    EXPECT_EQ(r.code, 2) << c.message << ": " << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << r.output;
  }
  const CliRun not_palette = dmx_run({"restore", "--model", data, "--image", img, "--output", out + "/o.png"});
  EXPECT_EQ(not_palette.code, 2);
  EXPECT_NE(not_palette.output.find("not a Palette model folder"), std::string::npos) << not_palette.output;
  const CliRun bad_train = dmx_run({"train", "palette", "--task", "denoise", "--data", data, "--output", out + "/t"});
  EXPECT_EQ(bad_train.code, 2);
  EXPECT_NE(bad_train.output.find("--task must be colorize"), std::string::npos) << bad_train.output;
  const CliRun bad_loss =
      dmx_run({"train", "palette", "--task", "jpeg", "--loss", "l3", "--data", data, "--output", out + "/t"});
  EXPECT_EQ(bad_loss.code, 2);
  EXPECT_NE(bad_loss.output.find("--loss must be l1 or l2"), std::string::npos) << bad_loss.output;
  EXPECT_TRUE(fs::is_empty(out));
}

}  // namespace
}  // namespace dmx::test
