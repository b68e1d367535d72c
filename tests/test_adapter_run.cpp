// Issue 17, the run-time parts: the T2I-Adapter residual provider (pipelines/t2i_adapter_provider.h) and
// `dmx generate --adapter ... / --hypernetwork ...` against diffusers 0.27.2's StableDiffusionAdapterPipeline and
// AUTOMATIC1111's hypernetwork semantics (../shared/fixtures/sd-tiny t2i_adapter/*, hypernet/*, and the
// seed-driven cases of tests/ref/make_adapter_refs.py).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>

#include "core/canny.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/resize.h"
#include "dmx/dmx.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/hypernetwork_loader.h"
#include "loaders/lora_loader.h"
#include "loaders/model_bundle.h"
#include "loaders/t2i_adapter_loader.h"
#include "models/hypernetwork.h"
#include "pipelines/generation.h"
#include "pipelines/stable_diffusion.h"
#include "pipelines/t2i_adapter_provider.h"
#include "schedulers/registry.h"
#include "schedulers/scheduler.h"
#include "test_ref_cases.h"
#include "test_util.h"

namespace dmx {
namespace {

using test::check_close;

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

Image gradient(int w, int h, int channels) {
  Image img;
  img.width = w;
  img.height = h;
  img.channels = channels;
  img.data.resize(static_cast<size_t>(w) * h * channels);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < channels; ++c)
        img.data[(static_cast<size_t>(y) * w + x) * channels + c] =
            static_cast<uint8_t>((x * 7 + y * 3 + c * 50) % 256);
  return img;
}

// ------------------------------------------------------------------------------------------------ unit

TEST(AdapterRunUnit, CondTauIsTencentARCsIndexRule) {
  auto kept = [](int n, double tau) {
    std::vector<int> k;
    for (int i = 0; i < n; ++i)
      if (pipelines::adapter_keep(i, n, tau)) k.push_back(i);
    return k;
  };
  EXPECT_EQ(kept(6, 1.0), (std::vector<int>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(kept(6, 0.4), (std::vector<int>{0, 1, 2}));  // int(0.6 * 6) = int(3.5999999999999996) = 3
  EXPECT_EQ(kept(6, 0.5), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(kept(6, 0.7), (std::vector<int>{0, 1, 2, 3, 4}));  // int(1.7999999999999998) = 1: five, not four
  EXPECT_EQ(kept(6, 0.01), (std::vector<int>{0}));
  EXPECT_EQ(kept(50, 0.3).size(), 15u);
  EXPECT_EQ(kept(10, 0.35).size(), 4u);
}

TEST(AdapterRunUnit, PicturesAreConvertedResizedAndScaledAsThePipelineDoes) {
  const Image gray = gradient(24, 16, 1), rgb = gradient(24, 16, 3), rgba = gradient(24, 16, 4);
  // A gray picture for a 1-channel adapter: the pixels / 255, no normalisation.
  at::Tensor g = pipelines::prepare_adapter_image(gray, 1, 24, 16);
  ASSERT_EQ(g.sizes(), (std::vector<int64_t>{1, 1, 16, 24}));
  EXPECT_FLOAT_EQ(g[0][0][2][5].item<float>(), ((5 * 7 + 2 * 3) % 256) / 255.0f);
  // RGB for a 1-channel adapter: PIL's convert("L") luma first.
  at::Tensor l = pipelines::prepare_adapter_image(rgb, 1, 24, 16);
  const Image luma = to_gray(rgb);
  EXPECT_FLOAT_EQ(l[0][0][3][4].item<float>(), luma.data[3 * 24 + 4] / 255.0f);
  // Gray for a 3-channel adapter: repeated; RGBA: alpha dropped.
  at::Tensor g3 = pipelines::prepare_adapter_image(gray, 3, 24, 16);
  ASSERT_EQ(g3.size(1), 3);
  EXPECT_TRUE(at::equal(g3[0][0], g3[0][2]));
  EXPECT_TRUE(at::equal(pipelines::prepare_adapter_image(rgba, 3, 24, 16),
                        pipelines::prepare_adapter_image(to_rgb(rgba), 3, 24, 16)));
  // Another size: PIL's Lanczos to width x height.
  at::Tensor r = pipelines::prepare_adapter_image(rgb, 3, 32, 40);
  ASSERT_EQ(r.sizes(), (std::vector<int64_t>{1, 3, 40, 32}));
  const Image resized = resize_lanczos(rgb, 32, 40);
  EXPECT_FLOAT_EQ(r[0][1][7][9].item<float>(), resized.data[(7 * 32 + 9) * 3 + 1] / 255.0f);
  // Default size: rounded down to the downscale factor.
  EXPECT_EQ(pipelines::default_adapter_size(gradient(150, 100, 3), 8), std::make_pair(144, 96));
  expect_throw_with<InvalidArgument>([&] { pipelines::prepare_adapter_image(rgb, 2, 8, 8); }, "in_channels");
}

TEST(AdapterRunUnit, HypernetworkArgumentsAndPromptTags) {
  auto s = loaders::parse_hypernetwork_arg("dir/anime.pt:0.8");
  EXPECT_EQ(s.path, "dir/anime.pt");
  EXPECT_DOUBLE_EQ(s.multiplier, 0.8);
  EXPECT_EQ(s.name, "anime");
  EXPECT_DOUBLE_EQ(loaders::parse_hypernetwork_arg("dir/anime.pt").multiplier, 1.0);
  expect_throw_with<InvalidArgument>([] { loaders::parse_hypernetwork_arg("a.pt:lots"); }, "--hypernetwork");
  expect_throw_with<InvalidArgument>([] { loaders::parse_hypernetwork_arg("a.pt:1e300"); }, "[-100, 100]");
  expect_throw_with<InvalidArgument>([] { loaders::parse_hypernetwork_arg(":0.5"); }, "FILE[:MULT]");

  std::vector<loaders::HypernetworkSpec> tags;
  const std::string cleaned =
      loaders::extract_prompt_hypernetworks("a cat <hypernet:anime:0.6>, <lora:x:1> <hypernet:style> done", tags);
  EXPECT_EQ(cleaned, "a cat , <lora:x:1>  done");  // LoRA tags are the LoRA parser's
  ASSERT_EQ(tags.size(), 2u);
  EXPECT_EQ(tags[0].name, "anime");
  EXPECT_DOUBLE_EQ(tags[0].multiplier, 0.6);
  EXPECT_EQ(tags[1].name, "style");
  EXPECT_DOUBLE_EQ(tags[1].multiplier, 1.0);
  expect_throw_with<InvalidArgument>([&] { loaders::extract_prompt_hypernetworks("<hypernet:a:b>", tags); },
                                     "<hypernet:a:b>");
  expect_throw_with<InvalidArgument>([&] { loaders::extract_prompt_hypernetworks("<hypernet::1>", tags); },
                                     "has no name");

  // Tags resolve inside --hypernetwork-dir only.
  const std::string dir = test::temp_subdir("hypernet_dir");
  const std::string outside = test::temp_subdir("hypernet_outside");
  std::ofstream(dir + "/anime.pt") << "x";
  std::ofstream(dir + "/style.safetensors") << "x";
  std::ofstream(outside + "/evil.pt") << "x";
  EXPECT_EQ(loaders::resolve_hypernetwork_name(dir, "anime"), dir + "/anime.pt");
  EXPECT_EQ(loaders::resolve_hypernetwork_name(dir, "style"), dir + "/style.safetensors");
  expect_throw_with<InvalidArgument>([&] { loaders::resolve_hypernetwork_name("", "anime"); }, "--hypernetwork-dir");
  expect_throw_with<InvalidArgument>([&] { loaders::resolve_hypernetwork_name(dir, "../hypernet_outside/evil"); },
                                     "'..'");
  expect_throw_with<InvalidArgument>([&] { loaders::resolve_hypernetwork_name(dir, outside + "/evil"); }, "absolute");
  expect_throw_with<InvalidArgument>([&] { loaders::resolve_hypernetwork_name(dir, "missing"); }, "not found");
  ASSERT_EQ(::symlink((outside + "/evil.pt").c_str(), (dir + "/link.pt").c_str()), 0);
  expect_throw_with<InvalidArgument>([&] { loaders::resolve_hypernetwork_name(dir, "link"); }, "symlink");
}

TEST(AdapterRunUnit, MetadataRecordsAdaptersAndHypernetworks) {
  GenerateOptions o;
  o.prompt = "a car <hypernet:style:0.5>";
  o.adapters = {"models/t2i_adapter/sketch/", "color.pth"};
  o.adapter_scales = {0.6, 0.4};
  o.adapter_preprocess = {"canny", "none"};
  o.adapter_ends = {0.5};
  o.hypernetworks = {"h/tiny_hypernet.pt:0.8", "h/second.safetensors"};
  const std::string text = format_parameters(o, 7, 128, 192, "sd15");
  EXPECT_NE(text.find("T2I-Adapter 0: \"Model: sketch, Weight: 0.6, Preprocess: canny, End: 0.5\""), std::string::npos)
      << text;
  EXPECT_NE(text.find("T2I-Adapter 1: \"Model: color, Weight: 0.4, End: 0.5\""), std::string::npos) << text;
  EXPECT_NE(text.find("Hypernet: \"tiny_hypernet: 0.8, second: 1\""), std::string::npos) << text;
  // Read back: the prompt keeps its tags; the other fields still parse.
  const GenerateOptions back = parse_parameters(text);
  EXPECT_EQ(back.prompt, o.prompt);
  EXPECT_EQ(back.seed, 7u);
  EXPECT_EQ(back.height, 192);
}

// The provider on two small random adapters (no UNet): features batched per image and doubled for guidance, the
// sum of scale_i x features_i equal to MultiAdapter's with the scales as weights, an adapter past its end adding
// nothing, and features added to those an earlier provider gave.
TEST(AdapterProviderTiny, BatchesSumsAndSwitchesOffAsThePipeline) {
  at::NoGradGuard no_grad;
  at::manual_seed(3);
  models::T2IAdapterConfig ca, cb;
  ca.in_channels = 1;
  cb.in_channels = 3;
  for (auto* c : {&ca, &cb}) {
    c->channels = {8, 16};
    c->num_res_blocks = 1;
    c->downscale_factor = 2;
  }
  models::T2IAdapter a(ca), b(cb);
  a->eval();
  b->eval();
  const Image ga = gradient(16, 12, 1), gb = gradient(16, 12, 3);
  std::vector<pipelines::T2IAdapterUnit> units(2);
  units[0].model = a;
  units[0].image = ga;
  units[0].scale = 0.6;
  units[1].model = b;
  units[1].image = gb;
  units[1].scale = 0.4;
  units[1].end = 0.01;  // 6 steps: only step 0
  pipelines::T2IAdapterProvider provider(units);
  EXPECT_EQ(provider.default_size(), std::make_optional(std::make_pair(16, 12)));
  loaders::StableDiffusionModels none;
  provider.prepare({none, 16, 12, 2, true, false});
  std::vector<models::T2IAdapter> both{a, b};
  const std::vector<at::Tensor> xs{pipelines::prepare_adapter_image(ga, 1, 16, 12),
                                   pipelines::prepare_adapter_image(gb, 3, 16, 12)};
  const auto multi = models::multi_adapter_features(both, xs, std::vector<double>{0.6, 0.4});
  auto sched = schedulers::create_scheduler("ddim", nlohmann::json::object());
  sched->set_timesteps(6);
  const at::Tensor lat = at::zeros({2, 4, 6, 8});
  auto at_step = [&](int i) {
    models::UNetInputs in;
    provider.apply({i, 6, 0.0, lat, *sched, true}, in);
    return in.down_intrablock_additional_residuals;
  };
  const auto s0 = at_step(0), s1 = at_step(1);
  ASSERT_EQ(s0.size(), 2u);
  for (size_t k = 0; k < 2; ++k) {
    ASSERT_EQ(s0[k].size(0), 4);  // [uncond x 2 images; cond x 2 images]
    for (int64_t r = 0; r < 4; ++r) EXPECT_TRUE(at::equal(s0[k][r], multi[k][0])) << k << " row " << r;
    EXPECT_TRUE(at::equal(s1[k][0], (at::scalar_tensor(0.6, at::kFloat) * a->forward(xs[0])[k])[0])) << k;
  }
  // Added to what an earlier provider put there.
  models::UNetInputs in;
  for (const auto& f : s0) in.down_intrablock_additional_residuals.push_back(at::ones_like(f));
  provider.apply({0, 6, 0.0, lat, *sched, true}, in);
  EXPECT_TRUE(at::allclose(in.down_intrablock_additional_residuals[1], s0[1] + 1));
}

// ------------------------------------------------------------------------------------------------ golden

std::shared_ptr<loaders::StableDiffusionModels> sd15() {
  static std::shared_ptr<loaders::StableDiffusionModels> m;
  if (!m) m = loaders::load_stable_diffusion(test::fixture_model("sd15"));
  return m;
}

std::string adapter_dir(const std::string& name) { return test::fixture_model("t2i_adapter") + "/" + name; }

pipelines::StableDiffusionParams seeded_params(const test::RefCase& ref, at::Generator& gen) {
  pipelines::StableDiffusionParams p;
  p.prompt = ref.meta["prompt"].get<std::string>();
  p.negative_prompt = ref.meta.value("negative_prompt", std::string());
  p.width = ref.meta["width"].get<int>();
  p.height = ref.meta["height"].get<int>();
  p.num_inference_steps = ref.meta["steps"].get<int>();
  p.guidance_scale = ref.meta["guidance_scale"].get<double>();
  p.scheduler = "ddim";
  p.show_progress = false;
  p.generator = &gen;
  return p;
}

// Runs p, compares every step's latents, the final latents (1e-3 absolute: the fixtures' tolerance) and the
// picture (3/255). Returns the final latents' max abs error.
double run_and_compare(const std::string& label, const test::RefCase& ref, pipelines::StableDiffusionParams p,
                       std::vector<at::Tensor>* steps_out = nullptr) {
  std::vector<at::Tensor> steps;
  p.on_step_end = [&](int, double, at::Tensor& lat) { steps.push_back(lat.clone()); };
  pipelines::StableDiffusionPipeline pipe(sd15());
  const auto out = pipe.run(p);
  std::vector<double> ts;
  for (const auto& t : ref.meta["timesteps"]) ts.push_back(t.get<double>());
  EXPECT_EQ(out.timesteps, ts) << label;
  double worst_step = 0;
  EXPECT_EQ(steps.size(), ts.size()) << label;
  for (size_t i = 0; i < steps.size() && i < ts.size(); ++i) {
    const at::Tensor& want = ref["step." + std::to_string(i) + ".latents"];
    const double e = (steps[i] - want).abs().max().item<double>();
    worst_step = std::max(worst_step, e);
    EXPECT_LE(e, 1e-3) << label << " step " << i;
  }
  const double e = (out.latents - ref["latents"]).abs().max().item<double>();
  const int px = test::max_u8_diff(tensor_to_image(out.images[0]), ref["image_u8"]);
  std::printf("[parity] %s: final latents max abs %.3g (worst step %.3g), picture max %d/255\n", label.c_str(), e,
              worst_step, px);
  EXPECT_LE(e, 1e-3) << label;
  EXPECT_LE(px, 3) << label;
  if (steps_out) *steps_out = steps;
  return e;
}

std::shared_ptr<pipelines::T2IAdapterProvider> fixture_provider(const test::RefCase& ref, const std::string& base,
                                                                std::vector<double> ends = {}) {
  std::vector<pipelines::T2IAdapterUnit> units;
  const auto names = ref.meta["adapters"].get<std::vector<std::string>>();
  const auto scales = ref.meta["adapter_scales"].get<std::vector<double>>();
  for (size_t i = 0; i < names.size(); ++i) {
    pipelines::T2IAdapterUnit u;
    u.name = names[i];
    u.model = loaders::load_t2i_adapter(adapter_dir(names[i]));
    u.image = load_image(test::fixtures_dir() + "/ref/t2i_adapter/" + base + "." + names[i] + ".png", "picture");
    // The picture as the pipeline read it (a gray PNG stays 1 channel).
    const at::Tensor u8 = ref["input.adapter" + std::to_string(i) + "_u8"];
    EXPECT_EQ(u.image.channels, u8.dim() == 2 ? 1 : 3);
    EXPECT_TRUE(at::equal(at::from_blob(u.image.data.data(), u8.sizes(), at::kByte), u8));
    u.scale = scales[i];
    u.end = ends.empty() ? 1.0 : ends[i];
    units.push_back(u);
  }
  return std::make_shared<pipelines::T2IAdapterProvider>(units);
}

TEST(AdapterPipelineGolden, SketchAndMultiAdapterMatchDiffusersStepByStep) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string name : {"adapter_sketch", "adapter_multi"}) {
    const test::RefCase ref = test::load_ref("t2i_adapter", name);
    at::Generator gen = pipelines::make_generator(ref.meta["seed"].get<uint64_t>());
    pipelines::StableDiffusionParams p = seeded_params(ref, gen);
    p.residual_providers = {fixture_provider(ref, name)};
    run_and_compare("t2i_adapter/" + name, ref, p);
    // The adapter matters: the reference moved by this much without it, far beyond the tolerance.
    EXPECT_GT(ref.meta["max_abs_diff_vs_no_adapter"].get<double>(), 0.1);
  }
}

// cond_tau (--adapter-end): the steps inside the fraction are the full run's, bit for bit; the next one departs.
TEST(AdapterPipelineGolden, AdapterEndKeepsTheFeaturesForTheFirstStepsOnly) {
  DMX_REQUIRE_FIXTURES();
  const test::RefCase ref = test::load_ref("t2i_adapter", "adapter_sketch");
  auto run = [&](double end) {
    at::Generator gen = pipelines::make_generator(ref.meta["seed"].get<uint64_t>());
    pipelines::StableDiffusionParams p = seeded_params(ref, gen);
    p.residual_providers = {fixture_provider(ref, "adapter_sketch", {end})};
    std::vector<at::Tensor> steps;
    p.on_step_end = [&](int, double, at::Tensor& lat) { steps.push_back(lat.clone()); };
    pipelines::StableDiffusionPipeline(sd15()).run(p);
    return steps;
  };
  const auto full = run(1.0), half = run(0.5);  // 6 steps: features at steps 0, 1, 2
  ASSERT_EQ(half.size(), 6u);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::equal(half[i], full[i])) << "step " << i;
  EXPECT_FALSE(at::equal(half[3], full[3]));
  // The step without features equals the reference's own arithmetic: checked against full steps only here;
  // its distance from the full run is what the features add at step 3.
  EXPECT_GT((half[3] - full[3]).abs().max().item<double>(), 1e-3);
}

TEST(HypernetworkPipelineGolden, Txt2ImgMatchesA1111StepByStep) {
  DMX_REQUIRE_FIXTURES();
  const test::RefCase ref = test::load_ref("hypernet", "hypernet_txt2img");
  at::Generator gen = pipelines::make_generator(ref.meta["seed"].get<uint64_t>());
  pipelines::StableDiffusionParams p = seeded_params(ref, gen);
  auto hn = loaders::load_hypernetwork(test::fixture_model("hypernet") + "/tiny_hypernet.pt");
  auto m = sd15();
  {
    models::ScopedHypernetworks guard(*m->unet, {{hn, ref.meta["multiplier"].get<double>()}});
    run_and_compare("hypernet/hypernet_txt2img", ref, p);
  }
  EXPECT_GT(ref.meta["max_abs_diff_vs_no_hypernetwork"].get<double>(), 0.1);
  // The guard restored the UNet: the same run without the hypernetwork departs from the reference.
  at::Generator gen2 = pipelines::make_generator(ref.meta["seed"].get<uint64_t>());
  pipelines::StableDiffusionParams q = seeded_params(ref, gen2);
  const auto plain = pipelines::StableDiffusionPipeline(m).run(q);
  EXPECT_GT((plain.latents - ref["latents"]).abs().max().item<double>(), 0.1);
}

// The seed-driven cases of tests/ref/make_adapter_refs.py through the public API (what `dmx generate` runs).
TEST(AdapterSeededGolden, ApiRunsMatchTheReference) {
  DMX_REQUIRE_FIXTURES();
  const std::string fx = test::fixtures_dir(), here = test::repo_ref_dir();
  for (const std::string name : {"adapter_seeded_color_resized", "adapter_seeded_multi_scales", "adapter_seeded_lora",
                                 "adapter_seeded_controlnet", "adapter_seeded_two_images", "hypernet_seeded_chain"}) {
    const test::RefCase ref = test::load_ref_file(here + "/" + name);
    const auto words = test::split_command_line(ref.meta["dmx"].get<std::string>());
    GenerateOptions o;
    const std::string dir = test::temp_subdir("seeded_" + name);
    auto path = [&](const std::string& v) { return v.rfind("models/", 0) == 0 ? fx + "/" + v : here + "/" + v; };
    for (size_t i = 2; i + 1 < words.size(); i += 2) {
      const std::string& f = words[i];
      const std::string& v = words[i + 1];
      if (f == "--model")
        o.model = path(v);
      else if (f == "--prompt")
        o.prompt = v;
      else if (f == "--negative-prompt")
        o.negative_prompt = v;
      else if (f == "--width")
        o.width = std::stoi(v);
      else if (f == "--height")
        o.height = std::stoi(v);
      else if (f == "--steps")
        o.steps = std::stoi(v);
      else if (f == "--guidance-scale")
        o.guidance_scale = std::stod(v);
      else if (f == "--scheduler")
        o.scheduler = v;
      else if (f == "--seed")
        o.seed = std::stoull(v);
      else if (f == "--num-images")
        o.num_images = std::stoi(v);
      else if (f == "--adapter")
        o.adapters.push_back(path(v));
      else if (f == "--adapter-image")
        o.adapter_images.push_back(path(v));
      else if (f == "--adapter-scale")
        o.adapter_scales.push_back(std::stod(v));
      else if (f == "--controlnet")
        o.controlnets.push_back(path(v));
      else if (f == "--control-image")
        o.control_images.push_back(path(v));
      else if (f == "--control-scale")
        o.control_scales.push_back(std::stod(v));
      else if (f == "--lora" || f == "--hypernetwork")
        (f == "--lora" ? o.loras : o.hypernetworks).push_back(path(v));
      else if (f == "--save-latents")
        o.save_latents = dir + "/L.safetensors";
      else if (f == "--output")
        o.output = dir + "/O.png";
      else
        ADD_FAILURE() << name << ": flag " << f << " not mapped";
    }
    o.progress = false;
    generate(o);
    const at::Tensor lat = io::load_safetensors(o.save_latents).at("latents");
    const double e = (lat - ref["latents"]).abs().max().item<double>();
    int px = 0;
    if (o.num_images == 1) {
      px = test::max_u8_diff(load_image(o.output, "out"), ref["image_u8"]);
    } else {  // OUT-<i>.png
      ASSERT_EQ(lat.size(0), 2) << name;
      px = std::max(test::max_u8_diff(load_image(dir + "/O-0.png", "out"), ref["image_u8"]),
                    test::max_u8_diff(load_image(dir + "/O-1.png", "out"), ref["image_u8.1"]));
    }
    std::printf("[parity] %s: final latents max abs %.3g, picture max %d/255\n", name.c_str(), e, px);
    EXPECT_LE(e, 1e-3) << name;
    EXPECT_LE(px, 3) << name;
    for (const char* k : {"max_abs_diff_vs_no_adapter", "max_abs_diff_vs_first_adapter_only", "max_abs_diff_vs_no_lora",
                          "max_abs_diff_vs_first_only"})
      if (ref.meta.contains(k)) {
        EXPECT_GT(ref.meta[k].get<double>(), 10 * 1e-3) << name << " " << k;
      }
  }
}

// --adapter-preprocess canny = the Canny map (cv2.Canny of the RGB picture, as for ControlNet) given as the picture.
TEST(AdapterSeededGolden, CannyPreprocessEqualsTheCannyMapAsPicture) {
  DMX_REQUIRE_FIXTURES();
  const std::string fx = test::fixtures_dir(), dir = test::temp_subdir("adapter_canny");
  const std::string photo = test::repo_ref_dir() + "/adapter_seeded_multi_scales.color.png";
  save_png(dir + "/edges.png", to_gray(canny_edges(to_rgb(load_image(photo, "photo")), 100, 200)));
  auto run = [&](const std::string& picture, bool canny, const std::string& tag) {
    GenerateOptions o;
    o.model = fx + "/models/sd15";
    o.prompt = "a house";
    o.width = o.height = 128;
    o.steps = 3;
    o.scheduler = "ddim";
    o.seed = 9;
    o.adapters = {fx + "/models/t2i_adapter/sketch"};
    o.adapter_images = {picture};
    if (canny) o.adapter_preprocess = {"canny"};
    o.save_latents = dir + "/" + tag + ".safetensors";
    o.output = dir + "/" + tag + ".png";
    o.progress = false;
    generate(o);
    return io::load_safetensors(o.save_latents).at("latents");
  };
  const at::Tensor a = run(photo, true, "pre"), b = run(dir + "/edges.png", false, "map"), c = run(photo, false, "raw");
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_GT((a - c).abs().max().item<double>(), 1e-3);
  EXPECT_NE(read_image_parameters(dir + "/pre.png").find("Preprocess: canny"), std::string::npos);
}

// ------------------------------------------------------------------------------------------------ cli

// Python's repr of a list of str ("['generate', '--model', 'data:models/sd15', ...]") -> the words.
std::vector<std::string> python_str_list(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while ((i = s.find_first_of("'\"", i)) != std::string::npos) {
    const char q = s[i++];
    std::string w;
    while (i < s.size() && s[i] != q) {
      if (s[i] == '\\' && i + 1 < s.size()) ++i;
      w += s[i++];
    }
    ++i;
    out.push_back(w);
  }
  return out;
}

// Each fixture's dmx_args (data: = the fixtures folder) and each seed-driven case's command line, run by the
// dmx binary; --save-latents against the reference's final latents; the PNG records the settings.
TEST(AdapterCliGolden, RecordedCommandLinesGiveTheReferenceLatents) {
  DMX_REQUIRE_FIXTURES();
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
  const std::string fx = test::fixtures_dir(), here = test::repo_ref_dir();
  struct Case {
    std::string label;
    test::RefCase ref;
    std::vector<std::string> args;
  };
  std::vector<Case> cases;
  for (const auto& [family, name] : std::vector<std::pair<std::string, std::string>>{
           {"t2i_adapter", "adapter_sketch"}, {"t2i_adapter", "adapter_multi"}, {"hypernet", "hypernet_txt2img"}}) {
    Case c{family + "/" + name, test::load_ref(family, name), {}};
    const nlohmann::json& recorded = c.ref.meta["dmx_args"];  // a list of words (or its Python repr)
    const std::vector<std::string> words =
        recorded.is_array() ? recorded.get<std::vector<std::string>>() : python_str_list(recorded.get<std::string>());
    for (std::string w : words) {
      if (w.rfind("data:", 0) == 0) w = fx + "/" + w.substr(5);
      c.args.push_back(w);
    }
    cases.push_back(c);
  }
  for (const std::string name : {"adapter_seeded_multi_scales", "hypernet_seeded_chain"}) {
    Case c{name, test::load_ref_file(here + "/" + name), {}};
    const auto words = test::split_command_line(c.ref.meta["dmx"].get<std::string>());
    for (size_t i = 1; i < words.size(); ++i) {
      std::string w = words[i];
      if (w == "--save-latents" || w == "--output") {
        ++i;
        continue;
      }
      if (i > 1 && (words[i - 1] == "--model" || words[i - 1] == "--adapter" || words[i - 1] == "--adapter-image" ||
                    words[i - 1] == "--hypernetwork"))
        w = (w.rfind("models/", 0) == 0 ? fx : here) + "/" + w;
      c.args.push_back(w);
    }
    cases.push_back(c);
  }
  for (size_t k = 0; k < cases.size(); ++k) {
    const Case& c = cases[k];
    const std::string dir = test::temp_subdir("adapter_cli_" + std::to_string(k));
    std::vector<std::string> args = c.args;
    for (const std::string& a : std::vector<std::string>{"--save-latents", dir + "/L.safetensors", "--output",
                                                         dir + "/O.png", "--quiet", "--threads", "2"})
      args.push_back(a);
    const test::CliRun r = test::dmx_run(args);
    ASSERT_EQ(r.code, 0) << c.label << ": " << r.output;
    const at::Tensor lat = io::load_safetensors(dir + "/L.safetensors").at("latents");
    const double e = (lat - c.ref["latents"]).abs().max().item<double>();
    std::printf("[parity] cli %s: final latents max abs %.3g\n", c.label.c_str(), e);
    EXPECT_LE(e, 1e-3) << c.label;
    EXPECT_LE(test::max_u8_diff(load_image(dir + "/O.png", "out"), c.ref["image_u8"]), 3) << c.label;
    const std::string meta = read_image_parameters(dir + "/O.png");
    const bool adapter = c.label.find("adapter") != std::string::npos;
    EXPECT_NE(meta.find(adapter ? "T2I-Adapter 0: \"Model: sketch, Weight: " : "Hypernet: \"tiny_hypernet: "),
              std::string::npos)
        << meta;
  }
}

// Bad input: exit 2 naming the option, before anything is written.
TEST(AdapterCliGolden, BadInputIsRefusedWithExit2) {
  DMX_REQUIRE_FIXTURES();
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
  const std::string fx = test::fixtures_dir();
  const std::string model = fx + "/models/sd15", sketch = fx + "/models/t2i_adapter/sketch";
  const std::string pic = fx + "/ref/t2i_adapter/adapter_sketch.sketch.png";
  const std::string hn = fx + "/models/hypernet/tiny_hypernet.pt";
  const std::string dir = test::temp_subdir("adapter_cli_bad");
  const std::vector<std::string> base{"generate", "--model", model,      "--steps",      "1",      "--width", "128",
                                      "--height", "128",     "--output", dir + "/o.png", "--quiet"};
  struct Bad {
    std::vector<std::string> extra;
    std::string needle;
  };
  const std::vector<Bad> bad{
      {{"--adapter-image", pic}, "--adapter-image needs --adapter"},
      {{"--adapter", sketch}, "--adapter-image must be given once per --adapter"},
      {{"--adapter", sketch, "--adapter-image", pic, "--adapter-scale", "1", "--adapter-scale", "2"},
       "--adapter-scale"},
      {{"--adapter", sketch, "--adapter-image", pic, "--adapter-end", "0"}, "--adapter-end must be in (0, 1]"},
      {{"--adapter", sketch, "--adapter-image", pic, "--adapter-preprocess", "depth"}, "--adapter-preprocess"},
      {{"--adapter", sketch, "--adapter-image", pic, "--init-image", pic}, "img2img"},
      {{"--adapter", fx + "/models/sd15/unet", "--adapter-image", pic}, "--adapter"},
      {{"--adapter", sketch, "--adapter-image", fx + "/FIXTURES.md"}, "--adapter-image"},
      {{"--hypernetwork", hn + ":strong"}, "--hypernetwork"},
      {{"--hypernetwork", fx + "/models/sd15/unet/config.json"}, "--hypernetwork"},
      {{"--hypernetwork", dir + "/missing.pt"}, "file not found"},
      {{"--prompt", "x <hypernet:tiny_hypernet:0.5>"}, "--hypernetwork-dir"},
      {{"--prompt", "x <hypernet:../sd15/unet/config:0.5>", "--hypernetwork-dir", fx + "/models/hypernet"}, "'..'"},
  };
  for (const Bad& b : bad) {
    std::vector<std::string> args = base;
    args.insert(args.end(), b.extra.begin(), b.extra.end());
    if (std::find(b.extra.begin(), b.extra.end(), "--prompt") == b.extra.end()) {
      args.push_back("--prompt");
      args.push_back("x");
    }
    const test::CliRun r = test::dmx_run(args);
    EXPECT_EQ(r.code, 2) << b.needle << ": " << r.output;
    EXPECT_NE(r.output.find(b.needle), std::string::npos) << r.output;
    EXPECT_FALSE(path_exists(dir + "/o.png")) << b.needle;
  }
}

// A prompt tag finds the file in --hypernetwork-dir and is removed from the text encoded: the same latents as
// --hypernetwork FILE:MULT.
TEST(AdapterCliGolden, HypernetTagEqualsTheFlag) {
  DMX_REQUIRE_FIXTURES();
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
  const std::string fx = test::fixtures_dir();
  const std::string dir = test::temp_subdir("hypernet_tag");
  const std::vector<std::string> base{"generate",
                                      "--model",
                                      fx + "/models/sd15",
                                      "--negative-prompt",
                                      "blurry",
                                      "--steps",
                                      "2",
                                      "--width",
                                      "128",
                                      "--height",
                                      "128",
                                      "--seed",
                                      "5",
                                      "--scheduler",
                                      "ddim",
                                      "--quiet"};
  auto run = [&](const std::vector<std::string>& extra, const std::string& tag) {
    std::vector<std::string> a = base;
    a.insert(a.end(), extra.begin(), extra.end());
    for (const std::string& s : std::vector<std::string>{"--save-latents", dir + "/" + tag + ".safetensors", "--output",
                                                         dir + "/" + tag + ".png"})
      a.push_back(s);
    const test::CliRun r = test::dmx_run(a);
    EXPECT_EQ(r.code, 0) << r.output;
    return io::load_safetensors(dir + "/" + tag + ".safetensors").at("latents");
  };
  const at::Tensor flag =
      run({"--prompt", "an old man", "--hypernetwork", fx + "/models/hypernet/tiny_hypernet.pt:0.6"}, "flag");
  const at::Tensor tag =
      run({"--prompt", "an old man<hypernet:tiny_hypernet:0.6>", "--hypernetwork-dir", fx + "/models/hypernet"}, "tag");
  const at::Tensor none = run({"--prompt", "an old man"}, "none");
  EXPECT_TRUE(at::equal(flag, tag));
  EXPECT_GT((flag - none).abs().max().item<double>(), 1e-3);
  const std::string meta = read_image_parameters(dir + "/tag.png");
  EXPECT_NE(meta.find("<hypernet:tiny_hypernet:0.6>"), std::string::npos) << meta;
}

}  // namespace
}  // namespace dmx
