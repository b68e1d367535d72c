// Tests for the unCLIP components (issue 16, component level): the CLIP text and vision towers with projections,
// CLIPImageProcessor with Pillow's resampling, the PriorTransformer, the prior's schedulers (DDPMScheduler with
// prediction "sample", UnCLIPScheduler), the image-embedding noise augmentation, the prior loop and the folder loader.
// Suites:
//   UnCLIPGolden            against ../shared/fixtures/sd-tiny/ref/unclip/components (skipped without it), 1e-5
//                           relative (the CLIP pixel values exactly)
//   PilResizeUnit, ClipImageProcessorUnit, UnCLIPSchedulerUnit (pure functions), PriorTransformerTiny, ClipTowersTiny
//                           (the small models in tests/ref) against tests/ref/unclip_refs.* (made by
//                           tests/ref/make_unclip_refs.py with the harness; no ../shared needed, so not *Golden)
//   UnCLIPUnit              configs, refusals and input errors (the loader's need the fixtures)
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/fs.h"
#include "core/image.h"
#include "core/resize.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "loaders/unclip.h"
#include "models/clip_image_processor.h"
#include "models/clip_text_model.h"
#include "models/clip_vision_model.h"
#include "models/prior_transformer.h"
#include "nn/attention.h"
#include "pipelines/unclip_steps.h"
#include "schedulers/registry.h"
#include "schedulers/scheduler.h"
#include "schedulers/scheduler_impl.h"
#include "test_util.h"

namespace dmx::test {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr double kTol = 1e-5;  // components and scheduler steps, relative to the largest reference value

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

Image u8_image(const at::Tensor& u8) {  // [H, W] or [H, W, C] uint8
  const at::Tensor t = u8.contiguous();
  Image img;
  img.height = static_cast<int>(t.size(0));
  img.width = static_cast<int>(t.size(1));
  img.channels = t.dim() == 2 ? 1 : static_cast<int>(t.size(2));
  img.data.assign(t.data_ptr<uint8_t>(), t.data_ptr<uint8_t>() + t.numel());
  return img;
}

at::Tensor image_tensor(const Image& img) {  // -> [H, W] or [H, W, C] uint8
  at::Tensor t = at::tensor(at::ArrayRef<uint8_t>(img.data), at::kByte);
  return img.channels == 1 ? t.view({img.height, img.width}) : t.view({img.height, img.width, img.channels});
}

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// ---------------------------------------------------------------------------------------------------------------
// Golden against the shared fixtures: unclip/components.

const std::string kPrompt = "a photograph of an astronaut riding a horse";

struct UnCLIPFixture {
  RefCase ref;
  std::shared_ptr<loaders::UnCLIPComponents> txt2img, img2img;
};
const UnCLIPFixture& fixture() {
  static UnCLIPFixture f = [] {
    UnCLIPFixture x;
    x.ref = load_ref("unclip", "components");
    x.txt2img = loaders::load_unclip_components(fixture_model("unclip"));
    x.img2img = loaders::load_unclip_components(fixture_model("unclip_img2img"));
    return x;
  }();
  return f;
}

TEST(UnCLIPGolden, PriorTextEncoderWithProjection) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const auto& f = fixture();
  const auto& ref = f.ref;
  const auto& tok = *f.txt2img->prior_tokenizer;
  // The tokenizer pads with <|endoftext|>; its attention mask covers BOS .. the first EOS.
  std::vector<int64_t> ids, mask;
  for (const std::string& p : {kPrompt, std::string()}) {
    std::vector<int64_t> m;
    const auto row = tok.encode_padded(p, 77, &m);
    ids.insert(ids.end(), row.begin(), row.end());
    mask.insert(mask.end(), m.begin(), m.end());
  }
  const at::Tensor input_ids = at::tensor(ids, at::kLong).view({2, 77});
  EXPECT_TRUE(at::equal(input_ids, ref["prior_text.input_ids"].to(at::kLong)));
  EXPECT_TRUE(at::equal(at::tensor(mask, at::kLong).view({2, 77}), ref["prior_text.attention_mask"].to(at::kLong)));
  const auto out = f.txt2img->prior_text_encoder->forward(input_ids);
  DMX_EXPECT_CLOSE("prior_text.text_embeds", out.text_embeds, ref["prior_text.text_embeds"], kTol);
  DMX_EXPECT_CLOSE("prior_text.last_hidden_state", out.last_hidden_state, ref["prior_text.last_hidden_state"], kTol);
  // encode_prior_prompt batches [uncond; cond], as _encode_prior_prompt does.
  const auto enc = pipelines::encode_prior_prompt(tok, f.txt2img->prior_text_encoder, {kPrompt}, true);
  EXPECT_TRUE(at::equal(enc.input_ids, input_ids.flip(0)));
  EXPECT_TRUE(at::equal(enc.attention_mask, ref["prior_text.attention_mask"].flip(0).to(at::kBool)));
  DMX_EXPECT_CLOSE("encode_prior_prompt text_embeds", enc.text_embeds, ref["prior_text.text_embeds"].flip(0), kTol);
}

TEST(UnCLIPGolden, PriorTransformerForward) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const auto& f = fixture();
  const auto& ref = f.ref;
  models::PriorTransformerInputs in;
  in.hidden_states = ref["prior.hidden_states"];
  in.proj_embedding = ref["prior_text.text_embeds"];
  in.encoder_hidden_states = ref["prior_text.last_hidden_state"];
  in.attention_mask = ref["prior_text.attention_mask"].to(at::kBool);
  for (int t : {800, 0}) {
    in.timestep = at::scalar_tensor(t, at::kLong);
    const std::string name = "prior.out.t" + std::to_string(t);
    DMX_EXPECT_CLOSE(name, f.txt2img->prior->forward(in), ref[name], kTol);
  }
  // Without a mask diffusers applies no mask at all, not even the causal one.
  in.timestep = at::scalar_tensor(800, at::kLong);
  in.attention_mask = at::Tensor();
  DMX_EXPECT_CLOSE("prior.out.t800.no_mask", f.txt2img->prior->forward(in), ref["prior.out.t800.no_mask"], kTol);
  DMX_EXPECT_CLOSE("prior.post_process", f.txt2img->prior->post_process_latents(ref["prior.hidden_states"]),
                   ref["prior.post_process"], kTol);
  // The mask matters here (a run that ignored it could not pass both).
  EXPECT_GT(max_abs(ref["prior.out.t800"], ref["prior.out.t800.no_mask"]), 1e-3);
}

TEST(UnCLIPGolden, PriorSamplingRun) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const auto& f = fixture();
  const auto& ref = f.ref;
  const auto& cfg = f.txt2img->prior_scheduler_config;
  auto scheduler = schedulers::create_scheduler(cfg.at("_class_name").get<std::string>(), cfg);
  EXPECT_EQ(scheduler->class_name(), "DDPMScheduler");
  EXPECT_EQ(scheduler->config().prediction_type, "sample");
  EXPECT_EQ(scheduler->config().variance_type, "fixed_small_log");
  pipelines::PriorRunParams p;
  p.prompt =
      pipelines::encode_prior_prompt(*f.txt2img->prior_tokenizer, f.txt2img->prior_text_encoder, {kPrompt}, true);
  p.num_inference_steps = 5;
  p.guidance_scale = 4.0;
  p.latents = ref["prior_run.initial_latents"];
  for (int k = 0; k < 4; ++k) p.step_noises.push_back(ref["prior_run.rng." + std::to_string(k)]);
  std::vector<double> ts;
  double worst_pred = 0, worst_lat = 0;
  p.on_step_end = [&](int i, double t, const at::Tensor& guided, const at::Tensor& latents) {
    ts.push_back(t);
    const std::string s = "prior_run.step." + std::to_string(i);
    worst_pred =
        std::max(worst_pred, check_close(s + ".guided_prediction", guided, ref[s + ".guided_prediction"], kTol));
    worst_lat = std::max(worst_lat, check_close(s + ".latents", latents, ref[s + ".latents"], kTol));
  };
  const at::Tensor embeds = pipelines::run_prior(f.txt2img->prior, *scheduler, p);
  EXPECT_EQ(ts, (std::vector<double>{800, 600, 400, 200, 0}));
  EXPECT_LE(worst_pred, kTol);
  EXPECT_LE(worst_lat, kTol);
  DMX_EXPECT_CLOSE("prior_run.image_embeds (replayed noise)", embeds, ref["prior_run.image_embeds"], kTol);
  // The same run drawing its step noise from torch.Generator().manual_seed(605), as the reference did.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(605);
  p.step_noises.clear();
  p.generator = &gen;
  p.on_step_end = nullptr;
  DMX_EXPECT_CLOSE("prior_run.image_embeds (seed 605)", pipelines::run_prior(f.txt2img->prior, *scheduler, p),
                   ref["prior_run.image_embeds"], kTol);
  // StableUnCLIPPipeline would step an UnCLIPScheduler to t - 1 every time: refused rather than run differently.
  auto unclip = schedulers::create_scheduler("unclip", json::object());
  expect_throw_with<Unsupported>([&] { pipelines::run_prior(f.txt2img->prior, *unclip, p); },
                                 {"UnCLIPScheduler", "DDPMScheduler"});
}

TEST(UnCLIPGolden, NoiseAugmentedImageEmbeddings) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const auto& f = fixture();
  const auto& ref = f.ref;
  const auto& cfg = f.txt2img->image_noising_scheduler_config;
  auto noising = schedulers::create_scheduler(cfg.at("_class_name").get<std::string>(), cfg);
  // squaredcos_cap_v2: betas in float64, stored float32, then cumprod in float32 (bit for bit).
  const auto* alpha = dynamic_cast<const schedulers::AlphaScheduler*>(noising.get());
  ASSERT_NE(alpha, nullptr);
  const at::Tensor acp = at::tensor(alpha->alphas_cumprod(), at::kFloat);
  EXPECT_EQ(max_abs(acp, ref["image_noising.alphas_cumprod"]), 0.0);
  DMX_EXPECT_CLOSE("image_normalizer.mean", f.txt2img->image_normalizer->mean, ref["image_normalizer.mean"], 0.0);
  for (int nl : {0, 50, 100}) {
    const std::string name = "noise_embeds.nl" + std::to_string(nl);
    const at::Tensor out = pipelines::noise_image_embeddings(
        f.txt2img->image_normalizer, *noising, ref["noise_embeds.image_embeds"], nl, ref["noise_embeds.noise"]);
    DMX_EXPECT_CLOSE(name, out, ref[name], kTol);
  }
}

TEST(UnCLIPGolden, ClipVisionEmbeddingWithoutAndWithResize) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const auto& f = fixture();
  const auto& ref = f.ref;
  ASSERT_TRUE(f.img2img->has_image_encoder());
  const auto& fe = f.img2img->feature_extractor;
  EXPECT_EQ(fe.shortest_edge, 32);
  EXPECT_EQ(fe.resample, 3);
  for (const std::string tag : {"exact", "resize"}) {
    const std::string p = "vision." + tag;
    const Image img = u8_image(ref[p + ".image_u8"]);
    const at::Tensor pv = models::clip_preprocess(fe, img);
    // Pillow's bicubic on the uint8 picture, then the same float32 ops as numpy: the same bits.
    EXPECT_EQ(max_abs(pv, ref[p + ".pixel_values"]), 0.0) << p << ".pixel_values";
    check_close(p + ".pixel_values", pv, ref[p + ".pixel_values"], 0.0);
    const auto out = f.img2img->image_encoder->forward(pv);
    DMX_EXPECT_CLOSE(p + ".image_embeds", out.image_embeds, ref[p + ".image_embeds"], kTol);
    DMX_EXPECT_CLOSE(p + ".last_hidden_state", out.last_hidden_state, ref[p + ".last_hidden_state"], kTol);
    DMX_EXPECT_CLOSE(p + " clip_image_embeds", pipelines::clip_image_embeds(fe, f.img2img->image_encoder, img),
                     ref[p + ".image_embeds"], kTol);
  }
  // The resize really ran: 56x40 -> 44x32 (shortest side 32, longer int(32 * 56 / 40)), crop at left 6.
  EXPECT_EQ((models::clip_resize_output_size(fe, 56, 40)), (std::array<int, 2>{32, 44}));
}

// The pipeline cases (seed-driven, not run by these component tests before): the prior phase of StableUnCLIPPipeline
// from the seed alone (prior latents and step noises from one generator), the noise augmentation with the next draw,
// and that the generator then stands where the decoder's latents are drawn.
TEST(UnCLIPGolden, SeededPriorAndNoiseAugmentationOfTheTxt2ImgCases) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const auto& f = fixture();
  for (const std::string name : {"unclip_nl0", "unclip_nl100"}) {
    SCOPED_TRACE(name);
    const RefCase ref = load_ref("unclip", name);
    const auto& meta = ref.meta;
    const auto& cfg = f.txt2img->prior_scheduler_config;
    auto scheduler = schedulers::create_scheduler(cfg.at("_class_name").get<std::string>(), cfg);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(meta.at("seed").get<uint64_t>());
    pipelines::PriorRunParams p;
    p.prompt = pipelines::encode_prior_prompt(*f.txt2img->prior_tokenizer, f.txt2img->prior_text_encoder,
                                              {meta.at("prompt").get<std::string>()}, true);
    p.num_inference_steps = meta.at("prior_steps");
    p.guidance_scale = meta.at("prior_guidance_scale");
    p.generator = &gen;
    double worst = 0;
    std::vector<double> ts;
    p.on_step_end = [&](int i, double t, const at::Tensor&, const at::Tensor& latents) {
      ts.push_back(t);
      const std::string s = "prior.step." + std::to_string(i) + ".latents";
      worst = std::max(worst, check_close(name + " " + s, latents, ref[s], kTol));
    };
    const at::Tensor image_embeds = pipelines::run_prior(f.txt2img->prior, *scheduler, p);
    EXPECT_EQ(ts, meta.at("prior_timesteps").get<std::vector<double>>());
    EXPECT_LE(worst, kTol);
    DMX_EXPECT_CLOSE(name + " prior.image_embeds", image_embeds, ref["prior.image_embeds"], kTol);
    const auto& ncfg = f.txt2img->image_noising_scheduler_config;
    auto noising = schedulers::create_scheduler(ncfg.at("_class_name").get<std::string>(), ncfg);
    const at::Tensor noised = pipelines::noise_image_embeddings(f.txt2img->image_normalizer, *noising, image_embeds,
                                                                meta.at("noise_level").get<int64_t>(), {}, &gen);
    DMX_EXPECT_CLOSE(name + " noised_image_embeds", noised, ref["noised_image_embeds"], kTol);
    // 7 draws: prior latents, 4 step noises, the embedding noise; the next one is the decoder's latents.
    const at::Tensor next = at::randn({1, 4, 8, 8}, gen, at::TensorOptions().dtype(at::kFloat));
    EXPECT_EQ(max_abs(next, ref["rng.6"]), 0.0) << "the generator is not where diffusers draws the decoder latents";
  }
}

TEST(UnCLIPGolden, ImageVariationEmbeddingsOfTheImg2ImgCases) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const auto& f = fixture();
  for (const std::string name : {"variations_nl0", "variations_nl50"}) {
    SCOPED_TRACE(name);
    const RefCase ref = load_ref("unclip", name);
    const Image img = u8_image(ref["input.image_u8"]);
    const at::Tensor pv = models::clip_preprocess(f.img2img->feature_extractor, img);
    check_close(name + " pixel_values", pv, ref["pixel_values"], 0.0);
    EXPECT_EQ(max_abs(pv, ref["pixel_values"]), 0.0) << name << " pixel_values (Pillow's bicubic, bit for bit)";
    const at::Tensor embeds = pipelines::clip_image_embeds(f.img2img->feature_extractor, f.img2img->image_encoder, img);
    DMX_EXPECT_CLOSE(name + " clip_image_embeds", embeds, ref["clip_image_embeds"], kTol);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(ref.meta.at("seed").get<uint64_t>());
    const auto& ncfg = f.img2img->image_noising_scheduler_config;
    auto noising = schedulers::create_scheduler(ncfg.at("_class_name").get<std::string>(), ncfg);
    const at::Tensor noised = pipelines::noise_image_embeddings(f.img2img->image_normalizer, *noising, embeds,
                                                                ref.meta.at("noise_level").get<int64_t>(), {}, &gen);
    DMX_EXPECT_CLOSE(name + " noised_image_embeds", noised, ref["noised_image_embeds"], kTol);
    const at::Tensor next = at::randn({1, 4, 8, 8}, gen, at::TensorOptions().dtype(at::kFloat));
    EXPECT_EQ(max_abs(next, ref["rng.1"]), 0.0) << "the generator is not where diffusers draws the decoder latents";
  }
}

TEST(UnCLIPGolden, LoaderReadsBothFolders) {
  DMX_REQUIRE_FIXTURES();
  const auto& f = fixture();
  EXPECT_EQ(f.txt2img->pipeline_class, "StableUnCLIPPipeline");
  EXPECT_TRUE(f.txt2img->has_prior());
  EXPECT_FALSE(f.txt2img->has_image_encoder());
  EXPECT_TRUE(f.txt2img->prior_text_encoder->has_projection());
  EXPECT_EQ(f.txt2img->prior_tokenizer->pad_id(), f.txt2img->prior_tokenizer->eos_id());  // pads with <|endoftext|>
  EXPECT_EQ(f.img2img->pipeline_class, "StableUnCLIPImg2ImgPipeline");
  EXPECT_FALSE(f.img2img->has_prior());
  EXPECT_EQ(f.img2img->image_encoder->config().patch_size, 4);
  EXPECT_EQ(f.img2img->image_noising_scheduler_config.at("beta_schedule"), "squaredcos_cap_v2");
}

// ---------------------------------------------------------------------------------------------------------------
// Golden against tests/ref/unclip_refs.* (no ../shared needed).

std::string repo_ref(const std::string& name) { return std::string(DMX_SOURCE_DIR) + "/tests/ref/" + name; }

struct RepoRef {
  json meta;
  io::TensorMap tensors;
  const at::Tensor& operator[](const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw FormatError("tests/ref/unclip_refs has no tensor '" + name + "'");
    return it->second;
  }
};
const RepoRef& repo_refs() {
  static RepoRef r = [] {
    RepoRef x;
    x.meta = json::parse(read_text_file(repo_ref("unclip_refs.json"), "unclip_refs.json", kMaxJsonFileBytes));
    x.tensors = io::load_safetensors(repo_ref("unclip_refs.safetensors"));
    return x;
  }();
  return r;
}

TEST(PilResizeUnit, EveryFilterEqualsPillowByteForByte) {
  const auto& r = repo_refs();
  const std::map<std::string, std::function<Image(const Image&, int, int)>> filters = {{"bicubic", resize_bicubic},
                                                                                       {"lanczos", resize_lanczos},
                                                                                       {"bilinear", resize_bilinear},
                                                                                       {"box", resize_box},
                                                                                       {"hamming", resize_hamming}};
  int checked = 0;
  for (const auto& [name, c] : r.meta.at("pil_resize").items()) {
    const Image in = u8_image(r["resize." + name + ".input"]);
    const int w = c.at("width"), h = c.at("height");
    for (const auto& fname : c.at("filters")) {
      const std::string f = fname.get<std::string>();
      const Image out = filters.at(f)(in, w, h);
      const at::Tensor expected = r["resize." + name + "." + f];
      ASSERT_EQ(image_tensor(out).sizes(), expected.sizes()) << name << " " << f;
      const int64_t differing = image_tensor(out).ne(expected).sum().item<int64_t>();
      std::printf("[check] pil resize %-16s %-8s %dx%d -> %dx%d: %ld of %ld bytes differ\n", name.c_str(), f.c_str(),
                  in.width, in.height, w, h, static_cast<long>(differing), static_cast<long>(expected.numel()));
      EXPECT_EQ(differing, 0) << name << " " << f << " (max diff " << max_abs(image_tensor(out), expected) << ")";
      ++checked;
    }
  }
  EXPECT_GE(checked, 15);
  // resize_pil maps Pillow's constants; NEAREST is refused.
  const Image in = u8_image(r["resize.noise_down.input"]);
  EXPECT_EQ(resize_pil(in, 44, 32, 3).data, resize_bicubic(in, 44, 32).data);
  EXPECT_EQ(resize_pil(in, 44, 32, 5).data, resize_hamming(in, 44, 32).data);
  expect_throw_with<Unsupported>([&] { resize_pil(in, 44, 32, 0); }, {"resample = 0", "NEAREST"});
}

TEST(ClipImageProcessorUnit, PicturesAndConfigsTheFixturesLack) {
  const auto& r = repo_refs();
  int checked = 0;
  for (const auto& [name, c] : r.meta.at("clip_processor").items()) {
    const auto cfg = models::CLIPImageProcessorConfig::from_json(c.at("config"));
    const at::Tensor pv = models::clip_preprocess(cfg, u8_image(r["proc." + name + ".image_u8"]));
    const at::Tensor& expected = r["proc." + name + ".pixel_values"];
    ASSERT_EQ(pv.sizes(), expected.sizes()) << name;
    EXPECT_EQ(max_abs(pv, expected), 0.0) << name;
    check_close("clip processor " + name, pv, expected, 0.0);
    ++checked;
  }
  EXPECT_EQ(checked, 8);  // portrait, rgba, gray, other_config, padded, padded_odd, padded_both, exact_lanczos
}

TEST(UnCLIPSchedulerUnit, TimestepsAndRunsMatchDiffusers) {
  const auto& r = repo_refs();
  const auto& u = r.meta.at("unclip_scheduler");
  for (const auto& [n, expected] : u.at("timesteps").items()) {
    auto s = schedulers::create_scheduler("unclip", json::object());
    s->set_timesteps(std::stoi(n));
    std::vector<double> want;
    for (const auto& t : expected) want.push_back(t.get<double>());
    EXPECT_EQ(s->timesteps(), want) << n << " steps";
  }
  double worst = 0;
  for (const auto& [name, run] : u.at("runs").items()) {
    SCOPED_TRACE(name);
    json cfg = run.at("config");
    cfg["_class_name"] = "UnCLIPScheduler";
    auto s = schedulers::create_scheduler("unclip", cfg);
    EXPECT_EQ(s->class_name(), "UnCLIPScheduler");
    const int steps = run.at("steps");
    for (const bool replay : {true, false}) {
      s->set_timesteps(steps);
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(run.at("generator_seed").get<uint64_t>());
      at::Tensor x = r["sched." + name + ".x_T"];
      int draw = 0;
      for (int i = 0; i < steps; ++i) {
        const std::string k = "sched." + name + ".";
        EXPECT_EQ(s->timesteps()[i], run.at("timesteps")[i].get<double>());
        schedulers::StepArgs args;
        args.generator = &gen;
        if (replay && s->timesteps()[i] > 0) args.variance_noise = r[k + "rng." + std::to_string(draw++)];
        const auto out = s->step(r[k + "model_output." + std::to_string(i)], i, x, args);
        const std::string tag = name + (replay ? " replay" : " seeded") + " step " + std::to_string(i);
        worst = std::max(worst, check_close(tag + " x0", out.pred_original_sample,
                                            r[k + "pred_original_sample." + std::to_string(i)], kTol));
        worst = std::max(worst,
                         check_close(tag + " prev", out.prev_sample, r[k + "prev_sample." + std::to_string(i)], kTol));
        x = r[k + "prev_sample." + std::to_string(i)];  // each step from the reference's input
      }
      if (replay) {
        EXPECT_EQ(draw, run.at("draws").get<int>());
      }
    }
  }
  EXPECT_LE(worst, kTol);
  // add_noise at training timesteps (the table every step uses).
  auto s = schedulers::create_scheduler("unclip", json::object());
  for (int t : {0, 1, 500, 999})
    DMX_EXPECT_CLOSE("unclip add_noise t" + std::to_string(t),
                     s->add_noise_at_timestep(r["sched.add_noise.x0"], r["sched.add_noise.noise"], t),
                     r["sched.add_noise.t" + std::to_string(t)], kTol);
}

TEST(PriorTransformerTiny, EverySizeSetApart) {
  const auto& r = repo_refs();
  at::NoGradGuard no_grad;
  const std::string folder = repo_ref(r.meta.at("tiny_prior").at("folder").get<std::string>());
  const auto cfg = models::PriorTransformerConfig::from_json(io::load_json_file(folder + "/config.json", "config"));
  EXPECT_EQ(cfg.resolved_time_embed_dim(), 24);
  EXPECT_EQ(cfg.resolved_embedding_proj_dim(), 10);
  EXPECT_EQ(cfg.resolved_clip_embed_dim(), 14);
  models::PriorTransformer prior(cfg);
  io::load_state_dict(*prior, io::load_safetensors(folder + "/diffusion_pytorch_model.safetensors"), folder);
  prior->eval();
  models::PriorTransformerInputs in;
  in.hidden_states = r["prior.hidden_states"];
  in.proj_embedding = r["prior.proj_embedding"];
  in.encoder_hidden_states = r["prior.encoder_hidden_states"];
  in.attention_mask = r["prior.attention_mask"];  // int64 0/1 works like bool
  in.timestep = at::scalar_tensor(37, at::kLong);
  DMX_EXPECT_CLOSE("tiny prior t37", prior->forward(in), r["prior.out.t37"], kTol);
  in.timestep = at::tensor(std::vector<int64_t>{5, 250, 999}, at::kLong);
  DMX_EXPECT_CLOSE("tiny prior per-row timesteps", prior->forward(in), r["prior.out.per_row"], kTol);
  in.timestep = at::scalar_tensor(37.0, at::kFloat);  // a float timestep gives the same sinusoids
  in.attention_mask = at::Tensor();
  DMX_EXPECT_CLOSE("tiny prior t37 no mask", prior->forward(in), r["prior.out.t37.no_mask"], kTol);
  DMX_EXPECT_CLOSE("tiny prior post_process", prior->post_process_latents(r["prior.post_process.input"]),
                   r["prior.post_process"], kTol);
}

TEST(ClipTowersTiny, GeluVisionAndNonLegacyEosText) {
  const auto& r = repo_refs();
  at::NoGradGuard no_grad;
  const std::string folder = repo_ref(r.meta.at("tiny_clip").at("folder").get<std::string>());
  const auto vcfg = models::CLIPVisionConfig::from_json(io::load_json_file(folder + "/image_encoder/config.json", "c"));
  EXPECT_EQ(vcfg.hidden_act, "gelu");
  EXPECT_EQ(vcfg.num_positions(), 17);
  models::CLIPVisionModelWithProjection vision(vcfg);
  auto vs = io::load_safetensors(folder + "/image_encoder/model.safetensors");
  models::clean_clip_vision_state_dict(vs);
  io::load_state_dict(*vision, vs, folder);
  const auto vo = vision->forward(r["vision.pixel_values"]);
  DMX_EXPECT_CLOSE("tiny vision image_embeds", vo.image_embeds, r["vision.image_embeds"], kTol);
  DMX_EXPECT_CLOSE("tiny vision last_hidden_state", vo.last_hidden_state, r["vision.last_hidden_state"], kTol);
  const auto tcfg = models::CLIPTextConfig::from_json(io::load_json_file(folder + "/text_encoder/config.json", "c"));
  EXPECT_EQ(tcfg.eos_token_id, 49);
  models::CLIPTextModel text(tcfg, /*with_projection=*/true);
  auto ts = io::load_safetensors(folder + "/text_encoder/model.safetensors");
  models::clean_clip_state_dict(ts);
  io::load_state_dict(*text, ts, folder);
  const auto to = text->forward(r["text.input_ids"]);
  DMX_EXPECT_CLOSE("tiny text text_embeds (first eos)", to.text_embeds, r["text.text_embeds"], kTol);
  DMX_EXPECT_CLOSE("tiny text last_hidden_state", to.last_hidden_state, r["text.last_hidden_state"], kTol);
}

// ---------------------------------------------------------------------------------------------------------------
// Unit: configs, refusals, input errors.

json stable_unclip_prior_config() {
  return json::parse(R"({"_class_name": "PriorTransformer", "added_emb_type": "prd", "additional_embeddings": 4,
    "attention_head_dim": 8, "clip_embed_dim": null, "dropout": 0.0, "embedding_dim": 16, "embedding_proj_dim": null,
    "embedding_proj_norm_type": null, "encoder_hid_proj_type": "linear", "norm_in_type": null,
    "num_attention_heads": 2, "num_embeddings": 6, "num_layers": 1, "time_embed_act_fn": "silu",
    "time_embed_dim": null})");
}

TEST(UnCLIPUnit, PriorConfigRefusesOtherTokenLayouts) {
  const auto c = models::PriorTransformerConfig::from_json(stable_unclip_prior_config());
  EXPECT_EQ(c.inner_dim(), 16);
  EXPECT_EQ(c.sequence_length(), 10);
  EXPECT_EQ(c.resolved_clip_embed_dim(), 16);
  const std::vector<std::pair<std::string, json>> refused = {
      {"added_emb_type", nullptr},           {"encoder_hid_proj_type", nullptr}, {"norm_in_type", "layer"},
      {"embedding_proj_norm_type", "layer"}, {"additional_embeddings", 0},       {"time_embed_act_fn", "tanh"}};
  for (const auto& [key, value] : refused) {
    json j = stable_unclip_prior_config();
    j[key] = value;
    expect_throw_with<Unsupported>([&] { models::PriorTransformerConfig::from_json(j); }, {key});
  }
  json bad = stable_unclip_prior_config();
  bad["num_layers"] = 0;
  expect_throw_with<FormatError>([&] { models::PriorTransformerConfig::from_json(bad); }, {"num_layers", "> 0"});
  bad = stable_unclip_prior_config();
  bad["embedding_dim"] = "wide";
  expect_throw_with<FormatError>([&] { models::PriorTransformerConfig::from_json(bad); }, {"embedding_dim"});
}

double module_parameters(const torch::nn::Module& m) {
  double n = 0;
  for (const auto& p : m.parameters()) n += static_cast<double>(p.numel());
  return n;
}

// The loader compares these counts with the weight file before building a model: they must be exact.
TEST(UnCLIPUnit, ParameterCountsAreTheModulesOwn) {
  json all_apart = stable_unclip_prior_config();
  all_apart["time_embed_dim"] = 24;
  all_apart["embedding_proj_dim"] = 10;
  all_apart["clip_embed_dim"] = 14;
  all_apart["num_layers"] = 3;
  for (const json& j : {stable_unclip_prior_config(), all_apart}) {
    const auto cfg = models::PriorTransformerConfig::from_json(j);
    models::PriorTransformer prior(cfg);
    EXPECT_EQ(cfg.parameter_count(), module_parameters(*prior)) << j.dump();
  }
  const auto vcfg = models::CLIPVisionConfig::from_json(json::parse(
      R"({"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 12, "patch_size": 4, "projection_dim": 6, "num_channels": 3})"));
  models::CLIPVisionModelWithProjection vision(vcfg);
  EXPECT_EQ(vcfg.parameter_count(), module_parameters(*vision));
  models::CLIPTextConfig tcfg;
  tcfg.vocab_size = 50;
  tcfg.hidden_size = 8;
  tcfg.intermediate_size = 12;
  tcfg.num_hidden_layers = 2;
  tcfg.num_attention_heads = 2;
  tcfg.max_position_embeddings = 10;
  tcfg.projection_dim = 6;
  for (const bool projection : {false, true}) {
    models::CLIPTextModel text(tcfg, projection);
    EXPECT_EQ(tcfg.parameter_count(projection), module_parameters(*text)) << "with_projection " << projection;
  }
  // A hostile config describes more than any file holds (and more than int64 counts).
  json huge = stable_unclip_prior_config();
  huge["num_attention_heads"] = 256;
  huge["attention_head_dim"] = 256;
  huge["num_layers"] = 1024;
  EXPECT_GT(models::PriorTransformerConfig::from_json(huge).parameter_count(), 8e11);
}

TEST(UnCLIPUnit, PriorInputErrorsNameTheInput) {
  at::NoGradGuard no_grad;
  models::PriorTransformer prior(models::PriorTransformerConfig::from_json(stable_unclip_prior_config()));
  models::PriorTransformerInputs in;
  in.hidden_states = at::randn({2, 16});
  in.proj_embedding = at::randn({2, 16});
  in.encoder_hidden_states = at::randn({2, 6, 16});
  in.timestep = at::scalar_tensor(3, at::kLong);
  in.attention_mask = at::ones({2, 6}, at::kBool);
  EXPECT_EQ(prior->forward(in).sizes(), (at::IntArrayRef{2, 16}));
  auto with = [&](const std::function<void(models::PriorTransformerInputs&)>& edit, const std::string& needle) {
    models::PriorTransformerInputs x = in;
    edit(x);
    expect_throw_with<InvalidArgument>([&] { prior->forward(x); }, {needle});
  };
  with([](auto& x) { x.hidden_states = at::randn({2, 15}); }, "hidden_states");
  with([](auto& x) { x.proj_embedding = at::randn({3, 16}); }, "proj_embedding");
  with([](auto& x) { x.encoder_hidden_states = at::randn({2, 7, 16}); }, "num_embeddings");
  with([](auto& x) { x.timestep = at::zeros({3}, at::kLong); }, "timestep");
  with([](auto& x) { x.attention_mask = at::ones({2, 5}, at::kBool); }, "attention_mask");
  // A fully padded text still attends to the 4 extra tokens: finite output.
  in.attention_mask = at::zeros({2, 6}, at::kBool);
  EXPECT_TRUE(at::isfinite(prior->forward(in)).all().item<bool>());
}

TEST(UnCLIPUnit, AttentionBiasIsAddedToTheScaledScores) {
  at::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor q = at::randn({2, 3, 5, 4}, gen, f32), k = at::randn({2, 3, 7, 4}, gen, f32),
                   v = at::randn({2, 3, 7, 6}, gen, f32), bias = at::randn({2, 1, 5, 7}, gen, f32) * 3;
  const at::Tensor expected = at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * 0.5 + bias, -1), v);
  DMX_EXPECT_CLOSE("attention with bias", nn::attention(q, k, v, 0.5, false, false, bias), expected, 1e-6);
  // Tiled (a 1-element score budget) gives the same.
  const int64_t budget = nn::max_score_elements();
  nn::set_max_score_elements(8);
  DMX_EXPECT_CLOSE("attention with bias, tiled", nn::attention(q, k, v, 0.5, false, false, bias), expected, 1e-6);
  nn::set_max_score_elements(budget);
  expect_throw_with<InvalidArgument>(
      [&] {
        nn::attention(q, k, v, 0.5, false, false, at::zeros({2, 2, 5, 7}));
      },
      {"bias must broadcast"});
}

TEST(UnCLIPUnit, ClipImageProcessorConfigAndInputErrors) {
  const auto c = models::CLIPImageProcessorConfig::from_json(json::parse(R"({"size": 40, "crop_size": 30})"));
  EXPECT_EQ(c.shortest_edge, 40);
  EXPECT_EQ(c.crop_height, 30);
  EXPECT_EQ(c.crop_width, 30);
  EXPECT_EQ(c.resample, 3);
  EXPECT_DOUBLE_EQ(c.image_mean[0], 0.48145466);
  EXPECT_EQ((models::clip_resize_output_size(c, 100, 50)), (std::array<int, 2>{40, 80}));
  EXPECT_EQ((models::clip_resize_output_size(c, 33, 100)), (std::array<int, 2>{121, 40}));  // int(40*100/33)
  // use_square_size (Kosmos-2's old kwarg) squares the size only when true, as transformers 4.44 does.
  const auto square =
      models::CLIPImageProcessorConfig::from_json(json::parse(R"({"size": 40, "use_square_size": true})"));
  EXPECT_EQ((models::clip_resize_output_size(square, 100, 50)), (std::array<int, 2>{40, 40}));
  const auto not_square =
      models::CLIPImageProcessorConfig::from_json(json::parse(R"({"size": 40, "use_square_size": false})"));
  EXPECT_EQ((models::clip_resize_output_size(not_square, 100, 50)), (std::array<int, 2>{40, 80}));
  expect_throw_with<Unsupported>(
      [] {
        models::CLIPImageProcessorConfig::from_json(json::parse(R"({"image_processor_type": "ViTImageProcessor"})"));
      },
      {"ViTImageProcessor"});
  expect_throw_with<Unsupported>([] { models::CLIPImageProcessorConfig::from_json(json::parse(R"({"resample": 0})")); },
                                 {"resample = 0"});
  expect_throw_with<FormatError>(
      [] { models::CLIPImageProcessorConfig::from_json(json::parse(R"({"image_mean": [0.5, 0.5]})")); },
      {"image_mean"});
  expect_throw_with<FormatError>(
      [] { models::CLIPImageProcessorConfig::from_json(json::parse(R"({"size": {"longest_edge": 3}})")); }, {"size"});
  expect_throw_with<FormatError>(
      [] { models::CLIPImageProcessorConfig::from_json(json::parse(R"({"image_std": 0})")); }, {"image_std"});
  // A 1 x 4000 strip would become 40 x 160000: refused before any allocation.
  Image strip;
  strip.width = 4000;
  strip.height = 1;
  strip.channels = 3;
  strip.data.assign(12000, 7);
  expect_throw_with<InvalidArgument>([&] { models::clip_preprocess(c, strip, "--image"); }, {"16384", "4000x1"});
  models::CLIPImageProcessorConfig no_rgb = c;
  no_rgb.do_convert_rgb = false;
  Image gray;
  gray.width = gray.height = 8;
  gray.channels = 1;
  gray.data.assign(64, 1);
  expect_throw_with<InvalidArgument>([&] { models::clip_preprocess(no_rgb, gray, "--image"); }, {"--image", "RGB"});
}

TEST(UnCLIPUnit, VisionConfigAndInputErrors) {
  expect_throw_with<FormatError>(
      [] { models::CLIPVisionConfig::from_json(json::parse(R"({"image_size": 30, "patch_size": 4})")); },
      {"multiple of patch_size"});
  const auto c = models::CLIPVisionConfig::from_json(json::parse(
      R"({"vision_config": {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 8, "patch_size": 4, "projection_dim": 4}})"));
  EXPECT_EQ(c.num_positions(), 5);
  models::CLIPVisionModelWithProjection m(c);
  at::NoGradGuard no_grad;
  EXPECT_EQ(m->forward(at::zeros({2, 3, 8, 8})).image_embeds.sizes(), (at::IntArrayRef{2, 4}));
  expect_throw_with<InvalidArgument>([&] { m->forward(at::zeros({1, 3, 16, 16})); }, {"pixel_values", "image_size"});
}

TEST(UnCLIPUnit, SchedulerRowsAndRefusals) {
  // UnCLIPScheduler has only the cosine schedule: diffusers raises for another, so does dmx (naming the field).
  json sd = json::parse(R"({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                             "beta_end": 0.012, "num_train_timesteps": 1000})");
  expect_throw_with<InvalidArgument>([&] { schedulers::create_scheduler("unclip", sd); },
                                     {"beta_schedule", "squaredcos_cap_v2", "UnCLIPScheduler"});
  json bad = json::parse(R"({"_class_name": "UnCLIPScheduler", "variance_type": "fixed_small"})");
  expect_throw_with<InvalidArgument>([&] { schedulers::create_scheduler("unclip", bad); }, {"variance_type"});
  bad = json::parse(R"({"_class_name": "UnCLIPScheduler", "prediction_type": "v_prediction"})");
  expect_throw_with<InvalidArgument>([&] { schedulers::create_scheduler("UnCLIPScheduler", bad); },
                                     {"prediction_type"});
  auto s = schedulers::create_scheduler("unclip", json::object());
  expect_throw_with<InvalidArgument>([&] { s->set_timesteps(1); }, {"num_inference_steps", ">= 2"});
  EXPECT_EQ(schedulers::scheduler_name_for_config(json::parse(
                R"({"_class_name": "UnCLIPScheduler", "prediction_type": "sample", "clip_sample_range": 5.0})")),
            "unclip");
  EXPECT_EQ(schedulers::sampler_label("unclip"), "");  // not offered to the decoder's --scheduler
  // Noising at a training timestep: the DDPM family only.
  auto euler = schedulers::create_scheduler("euler", sd);
  expect_throw_with<Unsupported>([&] { euler->add_noise_at_timestep(at::zeros({1}), at::zeros({1}), 5); },
                                 {"EulerDiscreteScheduler"});
  expect_throw_with<InvalidArgument>([&] { s->add_noise_at_timestep(at::zeros({1}), at::zeros({1}), 1000); },
                                     {"training timestep", "1000"});
}

TEST(UnCLIPUnit, NoiseLevelOutOfRangeAndNormalizerShape) {
  at::NoGradGuard no_grad;
  models::StableUnCLIPImageNormalizer norm(models::StableUnCLIPImageNormalizerConfig{8});
  auto noising = schedulers::create_scheduler("ddpm", json::parse(R"({"beta_schedule": "squaredcos_cap_v2"})"));
  const at::Tensor e = at::randn({2, 8});
  EXPECT_EQ(pipelines::noise_image_embeddings(norm, *noising, e, 999, at::zeros({2, 8})).sizes(),
            (at::IntArrayRef{2, 16}));
  // noise level 0 with zero noise and the identity normaliser: sqrt(acp[0]) e, then sin/cos of 0.
  const at::Tensor out = pipelines::noise_image_embeddings(norm, *noising, e, 0, at::zeros({2, 8}));
  const float a0 = dynamic_cast<const schedulers::AlphaScheduler&>(*noising).alphas_cumprod()[0];
  DMX_EXPECT_CLOSE("nl0 embedding", out.narrow(1, 0, 8), e * std::sqrt(a0), 1e-7);
  DMX_EXPECT_CLOSE("nl0 sinusoids (cos first)", out.narrow(1, 8, 8), at::cat({at::ones({2, 4}), at::zeros({2, 4})}, 1),
                   0.0);
  expect_throw_with<InvalidArgument>([&] { pipelines::noise_image_embeddings(norm, *noising, e, 1000); },
                                     {"noise_level must be in [0, 999]", "1000"});
  expect_throw_with<InvalidArgument>([&] { pipelines::noise_image_embeddings(norm, *noising, e, -1); },
                                     {"noise_level", "-1"});
  expect_throw_with<InvalidArgument>(
      [&] {
        pipelines::noise_image_embeddings(norm, *noising, e, 5, at::zeros({2, 7}));
      },
      {"noise must have the shape"});
  expect_throw_with<InvalidArgument>([&] { norm->scale(at::randn({2, 9})); }, {"embedding_dim"});
}

// The loader on copies of the fixture folders with a component removed or broken.
std::string folder_copy(const std::string& variant, const std::string& name,
                        const std::function<void(const fs::path&)>& edit) {
  const fs::path dst = fs::path(temp_dir()) / ("unclip-" + name);
  fs::remove_all(dst);
  fs::copy(fixture_model(variant), dst, fs::copy_options::recursive);
  // The fixtures are read-only and the copy keeps their modes: make it writable before editing it.
  fs::permissions(dst, fs::perms::owner_write, fs::perm_options::add);
  for (const auto& e : fs::recursive_directory_iterator(dst))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  edit(dst);
  return dst.string();
}

TEST(UnCLIPLoaderGolden, LoaderIsStrict) {
  DMX_REQUIRE_FIXTURES();
  const std::string no_prior = folder_copy("unclip", "no-prior", [](const fs::path& d) {
    fs::remove_all(d / "prior");
    fs::remove_all(d / "image_normalizer");
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(no_prior); },
                                 {no_prior, "StableUnCLIPPipeline", "missing prior/", "image_normalizer/"});
  const std::string no_encoder =
      folder_copy("unclip_img2img", "no-encoder", [](const fs::path& d) { fs::remove_all(d / "image_encoder"); });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(no_encoder); }, {no_encoder, "image_encoder/"});
  const std::string bad_weights = folder_copy("unclip", "bad-weights", [](const fs::path& d) {
    fs::copy_file(d / "image_normalizer/diffusion_pytorch_model.safetensors",
                  d / "prior/diffusion_pytorch_model.safetensors", fs::copy_options::overwrite_existing);
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(bad_weights); },
                                 {"prior/config.json describes a model of 34496 parameters", "hold 64 values"});
  // Weights of the right size under a wrong name: strict loading names the missing and the unexpected key.
  const std::string renamed = folder_copy("unclip", "renamed-key", [](const fs::path& d) {
    const std::string file = (d / "prior/diffusion_pytorch_model.safetensors").string();
    io::TensorMap t = io::load_safetensors(file);
    for (auto& kv : t) kv.second = kv.second.clone();  // off the file's mapping before it is rewritten
    t["prd_embeddings"] = t.at("prd_embedding");
    t.erase("prd_embedding");
    io::save_safetensors(file, t);
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(renamed); },
                                 {"/prior", "missing", "prd_embedding", "unexpected", "prd_embeddings"});
  const std::string shape_e = folder_copy("unclip", "shape-e", [](const fs::path& d) {
    json cfg = io::load_json_file((d / "prior/config.json").string(), "c");
    cfg["added_emb_type"] = nullptr;
    const std::string text = cfg.dump();
    write_bytes_atomic((d / "prior/config.json").string(), text.data(), text.size());
  });
  expect_throw_with<Unsupported>([&] { loaders::load_unclip_components(shape_e); }, {"added_emb_type"});
  const std::string bad_sched = folder_copy("unclip", "bad-sched", [](const fs::path& d) {
    json cfg = io::load_json_file((d / "prior_scheduler/scheduler_config.json").string(), "c");
    cfg["prediction_type"] = "flow";
    const std::string text = cfg.dump();
    write_bytes_atomic((d / "prior_scheduler/scheduler_config.json").string(), text.data(), text.size());
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(bad_sched); }, {"prior_scheduler", "flow"});
  const std::string unclip_sched = folder_copy("unclip", "unclip-sched", [](const fs::path& d) {
    json cfg = io::load_json_file((d / "prior_scheduler/scheduler_config.json").string(), "c");
    cfg["_class_name"] = "UnCLIPScheduler";
    const std::string text = cfg.dump();
    write_bytes_atomic((d / "prior_scheduler/scheduler_config.json").string(), text.data(), text.size());
  });
  expect_throw_with<Unsupported>([&] { loaders::load_unclip_components(unclip_sched); },
                                 {"prior_scheduler", "UnCLIPScheduler", "t - 1"});
  for (const auto& [key, value] : std::vector<std::pair<std::string, json>>{
           {"projection_class_embeddings_input_dim", 32}, {"class_embed_type", nullptr}}) {
    const std::string unet = folder_copy("unclip_img2img", "unet-" + key, [&](const fs::path& d) {
      json cfg = io::load_json_file((d / "unet/config.json").string(), "c");
      cfg[key] = value;
      const std::string text = cfg.dump();
      write_bytes_atomic((d / "unet/config.json").string(), text.data(), text.size());
    });
    expect_throw_with<FormatError>([&] { loaders::load_unclip_components(unet); },
                                   {"do not fit together", "projection_class_embeddings_input_dim 64"});
  }
  // Configs that describe far more than their weights: refused before any allocation, naming the file.
  const std::string big_prior = folder_copy("unclip", "big-prior", [](const fs::path& d) {
    json cfg = io::load_json_file((d / "prior/config.json").string(), "c");
    cfg["num_layers"] = 1000;
    cfg["num_attention_heads"] = 256;
    const std::string text = cfg.dump();
    write_bytes_atomic((d / "prior/config.json").string(), text.data(), text.size());
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(big_prior); },
                                 {"prior/config.json describes a model of", "the config does not match the weights"});
  const std::string big_encoder = folder_copy("unclip_img2img", "big-encoder", [](const fs::path& d) {
    json cfg = io::load_json_file((d / "image_encoder/config.json").string(), "c");
    cfg["image_size"] = 4096;  // 16.8 million patches: under the 2-billion limit, far more than the weights hold
    cfg["patch_size"] = 1;
    const std::string text = cfg.dump();
    write_bytes_atomic((d / "image_encoder/config.json").string(), text.data(), text.size());
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(big_encoder); },
                                 {"image_encoder/config.json describes a model of"});
  // A config one token short of its weights: strict loading names the tensor and both shapes.
  const std::string short_prior = folder_copy("unclip", "short-prior", [](const fs::path& d) {
    json cfg = io::load_json_file((d / "prior/config.json").string(), "c");
    cfg["num_embeddings"] = 76;
    const std::string text = cfg.dump();
    write_bytes_atomic((d / "prior/config.json").string(), text.data(), text.size());
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(short_prior); },
                                 {"positional_embedding", "[1, 81, 32]", "[1, 80, 32]"});
  // A truncated weight file.
  const std::string truncated = folder_copy("unclip_img2img", "truncated", [](const fs::path& d) {
    const fs::path w = d / "image_encoder/model.safetensors";
    fs::resize_file(w, fs::file_size(w) / 2);
  });
  expect_throw_with<FormatError>([&] { loaders::load_unclip_components(truncated); }, {"image_encoder"});
  expect_throw_with<Unsupported>([&] { loaders::load_unclip_components(fixture_model("sd15")); },
                                 {"StableDiffusionPipeline"});
  expect_throw_with<InvalidArgument>([&] { loaders::load_unclip_components(temp_dir() + "/nowhere"); }, {"not found"});
}
}  // namespace
}  // namespace dmx::test
