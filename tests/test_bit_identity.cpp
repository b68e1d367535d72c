// In-process recordings for scripts/bit_identity.py: tensors the CLI does not write (per-step latents of
// seeded runs, Prompt-to-Prompt latents and local-blend masks, null-text embeddings, the DiffEdit phases,
// blended ranking scores). Only with DMX_BIT_IDENTITY_DIR set (the script sets it); skipped otherwise.
// The script records them before and after a change to the generation core and compares them bit for bit.
#include <ATen/CPUGeneratorImpl.h>

#include <cstdlib>

#include "core/image.h"
#include "extensions/latent_blend.h"
#include "io/safetensors.h"
#include "loaders/model_bundle.h"
#include "pipelines/blended_latent_diffusion.h"
#include "pipelines/diffedit.h"
#include "pipelines/null_text_inversion.h"
#include "pipelines/prompt_to_prompt.h"
#include "pipelines/stable_diffusion.h"
#include "test_util.h"

namespace dmx::test {
namespace {

std::string dump_dir() {
  const char* d = std::getenv("DMX_BIT_IDENTITY_DIR");
  return d ? d : "";
}

#define DMX_REQUIRE_DUMP_DIR()                                                                                \
  do {                                                                                                        \
    DMX_REQUIRE_FIXTURES();                                                                                   \
    if (dump_dir().empty()) GTEST_SKIP() << "DMX_BIT_IDENTITY_DIR not set (scripts/bit_identity.py sets it)"; \
  } while (0)

std::shared_ptr<loaders::StableDiffusionModels> sd15() {
  static auto m = loaders::load_stable_diffusion(fixture_model("sd15"));
  return m;
}

at::Tensor fixture_image() {  // diffedit_seeded.image.png, 192x128, as [1, 3, H, W] in [-1, 1]
  return image_to_tensor(to_rgb(load_image(fixtures_dir() + "/ref/sd15/diffedit_seeded.image.png", "image")));
}

at::Tensor ellipse_mask(int64_t h, int64_t w) {  // [1, 1, H, W], 1 = edit
  at::Tensor y = at::arange(h, at::kFloat).view({h, 1}), x = at::arange(w, at::kFloat).view({1, w});
  at::Tensor inside = ((x - w * 0.5) / (w * 0.3)).pow(2) + ((y - h * 0.45) / (h * 0.3)).pow(2) <= 1;
  return inside.to(at::kFloat).view({1, 1, h, w});
}

void save(const std::string& name, io::TensorMap t) {
  for (auto& kv : t) kv.second = kv.second.contiguous();
  io::save_safetensors(dump_dir() + "/" + name + ".safetensors", t);
}

// The seed convention of the pipelines: one CPU generator per run (kept alive until the runs are done).
template <typename P>
void seed(P& p, uint64_t s) {
  static std::vector<std::unique_ptr<at::Generator>> generators;
  generators.push_back(std::make_unique<at::Generator>(pipelines::make_generator(s)));
  p.generator = generators.back().get();
}

io::TensorMap steps_of(const std::vector<at::Tensor>& steps) {
  io::TensorMap t;
  for (size_t i = 0; i < steps.size(); ++i) t["step." + std::to_string(i)] = steps[i];
  return t;
}

TEST(BitIdentityDumpGolden, StableDiffusion) {
  DMX_REQUIRE_DUMP_DIR();
  pipelines::StableDiffusionPipeline pipe(sd15());
  for (const std::string sched : {"ddim", "euler_a", "dpmpp_2m", "pndm", "lms"}) {
    pipelines::StableDiffusionParams p;
    p.prompt = "a red apple";
    p.negative_prompt = "blurry";
    p.width = p.height = 64;
    p.num_inference_steps = 4;
    p.scheduler = sched;
    p.eta = 0.3;
    p.num_images_per_prompt = 2;
    p.show_progress = false;
    seed(p, 100);
    std::vector<at::Tensor> steps;
    p.on_step_end = [&](int, double, at::Tensor& l) { steps.push_back(l.clone()); };
    auto out = pipe.run(p);
    io::TensorMap t = steps_of(steps);
    t["latents"] = out.latents;
    t["images"] = out.images;
    save("sd_" + sched, t);
  }
  // img2img with a seeded generator (posterior draw, then the noise).
  pipelines::StableDiffusionParams p;
  p.prompt = "a red apple";
  p.num_inference_steps = 5;
  p.scheduler = "euler_a";
  p.init_image = fixture_image();
  p.strength = 0.7;
  p.show_progress = false;
  seed(p, 101);
  save("sd_img2img", {{"latents", pipe.run(p).latents}});
}

TEST(BitIdentityDumpGolden, PromptToPrompt) {
  DMX_REQUIRE_DUMP_DIR();
  auto m = sd15();
  pipelines::PromptToPromptPipeline pipe(m);
  pipelines::PromptToPromptParams p;
  p.prompt = "a cat sitting on a sofa";
  p.edit_prompt = "a dog sitting on a sofa";
  p.local_blend_words = {"cat", "dog"};
  p.width = p.height = 64;
  p.num_inference_steps = 4;
  p.show_progress = false;
  seed(p, 200);
  std::vector<at::Tensor> steps;
  p.on_step_end = [&](int, double, at::Tensor& l) { steps.push_back(l.clone()); };
  auto out = pipe.run(p);
  io::TensorMap t = steps_of(steps);
  t["latents"] = out.latents;
  t["local_blend_mask"] = out.local_blend_mask;
  save("p2p_replace_local_blend", t);

  pipelines::PromptToPromptParams r;
  r.prompt = "a cat";
  r.edit_prompt = "a cat with a hat";
  r.mode = "refine";
  r.width = r.height = 64;
  r.num_inference_steps = 3;
  r.show_progress = false;
  seed(r, 201);
  save("p2p_refine", {{"latents", pipe.run(r).latents}});

  // Null-text inversion of a real image, then the edit with its embeddings, and DDIM sampling with them.
  pipelines::NullTextInversionParams np;
  np.image = fixture_image();
  np.prompt = "a cat sitting on a sofa";
  np.num_inference_steps = 4;
  np.num_inner_steps = 2;
  np.show_progress = false;
  auto inv = pipelines::null_text_invert(*m, np);
  io::TensorMap nt;
  for (size_t i = 0; i < inv.uncond_embeddings.size(); ++i)
    nt["uncond." + std::to_string(i)] = inv.uncond_embeddings[i];
  for (size_t i = 0; i < inv.ddim_latents.size(); ++i) nt["ddim." + std::to_string(i)] = inv.ddim_latents[i];
  nt["losses"] = at::tensor(inv.losses, at::kDouble);
  nt["first_losses"] = at::tensor(inv.first_losses, at::kDouble);
  pipelines::StableDiffusionPipeline sd(m);
  const at::Tensor cond = sd.encode_prompt(np.prompt);
  nt["ddim_sample"] = pipelines::ddim_sample(*m, inv.x_T(), cond, inv.uncond_embeddings, 4, 7.5);
  pipelines::PromptToPromptParams e = p;
  e.local_blend_words.clear();
  e.on_step_end = nullptr;
  e.width = 192;
  e.height = 128;
  e.latents = inv.x_T();
  e.uncond_embeddings = inv.uncond_embeddings;
  nt["edit_latents"] = pipe.run(e).latents;
  save("null_text", nt);
}

TEST(BitIdentityDumpGolden, DiffEdit) {
  DMX_REQUIRE_DUMP_DIR();
  pipelines::DiffEditPipeline pipe(sd15());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(300);
  pipelines::DiffEditMaskParams mp;
  mp.image = fixture_image();
  mp.source_prompt = "a cat sitting on a sofa";
  mp.target_prompt = "a dog sitting on a sofa";
  mp.num_maps_per_mask = 3;
  mp.num_inference_steps = 5;
  mp.generator = &gen;
  auto mask = pipe.generate_mask(mp);
  pipelines::DiffEditInvertParams ip;
  ip.image = mp.image;
  ip.prompt = mp.source_prompt;
  ip.num_inference_steps = 5;
  ip.guidance_scale = 2.0;
  ip.negative_prompt = "blurry";
  ip.generator = &gen;
  ip.show_progress = false;
  auto inv = pipe.invert(ip);
  pipelines::DiffEditParams ep;
  ep.prompt = mp.target_prompt;
  ep.mask_image = mask.mask;
  ep.image_latents = inv.latents;
  ep.num_inference_steps = 5;
  ep.eta = 0.5;  // DDIM draws from the generator
  ep.generator = &gen;
  ep.show_progress = false;
  auto out = pipe.run(ep);
  save("diffedit",
       {{"mask", mask.mask}, {"guidance_map", mask.guidance_map}, {"inverted", inv.latents}, {"latents", out.latents}});
}

TEST(BitIdentityDumpGolden, Blended) {
  DMX_REQUIRE_DUMP_DIR();
  pipelines::BlendedLatentDiffusionPipeline pipe(sd15());
  for (auto variant : {pipelines::BlendVariant::kInpaint, pipelines::BlendVariant::kLegacy}) {
    const bool legacy = variant == pipelines::BlendVariant::kLegacy;
    pipelines::BlendedLatentDiffusionParams p;
    p.prompt = "a red apple";
    p.num_inference_steps = 5;
    p.scheduler = legacy ? "ddim" : "euler_a";
    p.init_image = fixture_image();
    p.mask = ellipse_mask(128, 192);
    p.strength = 0.8;
    p.variant = variant;
    p.num_images_per_prompt = 2;
    p.mask_dilation = 1;
    p.blend_start = 0.2;
    p.rank = true;
    p.show_progress = false;
    seed(p, legacy ? 401 : 400);
    p.rank_options.seed = legacy ? 401 : 400;
    std::vector<at::Tensor> steps;
    p.on_step_end = [&](int, double, at::Tensor& l) { steps.push_back(l.clone()); };
    auto out = pipe.run(p);
    io::TensorMap t = steps_of(steps);
    t["latents"] = out.latents;
    t["scores"] = at::tensor(out.scores, at::kDouble);
    save(legacy ? "blended_legacy" : "blended_inpaint", t);
  }
}

}  // namespace
}  // namespace dmx::test
