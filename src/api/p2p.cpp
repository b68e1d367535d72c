// Public Prompt-to-Prompt API (include/dmx/p2p.h): checks, loading, optional (null-text) inversion of a real
// image, the edit, attention maps, and atomic PNG writes with A1111-style "parameters" metadata.
#include "dmx/p2p.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "api/options_util.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/log.h"
#include "core/phase_timer.h"
#include "core/runtime.h"
#include "core/utf8.h"
#include "dmx/dmx.h"
#include "extensions/attention_maps.h"
#include "loaders/model_bundle.h"
#include "pipelines/generation.h"
#include "pipelines/null_text_inversion.h"
#include "pipelines/prompt_to_prompt.h"

namespace dmx {

namespace {
using api::with_suffix;

bool has_word(const std::string& text, const std::string& word) {
  size_t start = 0;
  while (true) {
    const size_t sp = text.find(' ', start);
    if (text.substr(start, sp == std::string::npos ? std::string::npos : sp - start) == word) return true;
    if (sp == std::string::npos) return false;
    start = sp + 1;
  }
}

// [H, W, 3] + [H, W, 3] -> [H, 2W, 3]
Image side_by_side(const Image& a, const Image& b) {
  Image o;
  o.width = a.width + b.width;
  o.height = a.height;
  o.channels = 3;
  o.data.resize(static_cast<size_t>(o.width) * o.height * 3);
  for (int y = 0; y < o.height; ++y) {
    std::copy_n(&a.data[static_cast<size_t>(y) * a.width * 3], a.width * 3,
                &o.data[static_cast<size_t>(y) * o.width * 3]);
    std::copy_n(&b.data[static_cast<size_t>(y) * b.width * 3], b.width * 3,
                &o.data[(static_cast<size_t>(y) * o.width + a.width) * 3]);
  }
  return o;
}
}  // namespace

std::pair<std::string, double> parse_reweight(const std::string& arg) {
  const size_t eq = arg.rfind('=');
  DMX_CHECK_ARG(eq != std::string::npos, "--reweight must be WORD=SCALE, got '", arg, "' (no '=')");
  const std::string word = arg.substr(0, eq), num = arg.substr(eq + 1);
  DMX_CHECK_ARG(!word.empty(), "--reweight must be WORD=SCALE, got '", arg, "' (empty word)");
  DMX_CHECK_ARG(word.find(' ') == std::string::npos, "--reweight WORD must be one word (no spaces), got '", word, "'");
  char* end = nullptr;
  const double v = num.empty() ? NAN : std::strtod(num.c_str(), &end);
  DMX_CHECK_ARG(!num.empty() && end && *end == '\0' && std::isfinite(v),
                "--reweight SCALE must be a finite number, got '", num, "' in '", arg, "'");
  DMX_CHECK_ARG(v >= -100 && v <= 100, "--reweight SCALE must be in [-100, 100], got ", v, " in '", arg, "'");
  return {word, v};
}

P2PResult p2p(const P2POptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  set_log_level(o.verbose ? LogLevel::kVerbose : o.progress ? LogLevel::kInfo : LogLevel::kQuiet);
  // 1. Every cheap check before loading anything.
  check_text(o.prompt, "--prompt");
  check_text(o.edit_prompt, "--edit-prompt");
  check_text(o.negative_prompt, "--negative-prompt");
  DMX_CHECK_ARG(!o.model.empty(), "--model is required");
  DMX_CHECK_ARG(path_exists(o.model), "--model: path not found: ", o.model);
  DMX_CHECK_ARG(!o.prompt.empty(), "--prompt is required");
  DMX_CHECK_ARG(!o.edit_prompt.empty(), "--edit-prompt is required");
  DMX_CHECK_ARG(o.mode == "replace" || o.mode == "refine" || o.mode == "reweight",
                "--mode must be one of replace, refine, reweight, got '", o.mode, "'");
  pipelines::PromptToPromptParams p;
  for (const auto& r : o.reweight) p.reweight.push_back(parse_reweight(r));
  DMX_CHECK_ARG(o.mode == "reweight" || p.reweight.empty(), "--reweight needs --mode reweight, got --mode ", o.mode);
  DMX_CHECK_ARG(o.mode != "reweight" || !p.reweight.empty(),
                "--mode reweight needs at least one --reweight WORD=SCALE");
  for (const auto& ws : p.reweight)
    DMX_CHECK_ARG(has_word(o.edit_prompt, ws.first), "--reweight word '", ws.first,
                  "' is not a word of --edit-prompt '", o.edit_prompt, "' (words are split at spaces)");
  for (const auto& w : o.local_blend) {
    DMX_CHECK_ARG(!w.empty(), "--local-blend: empty word");
    DMX_CHECK_ARG(has_word(o.prompt, w) || has_word(o.edit_prompt, w), "--local-blend word '", w,
                  "' is in neither --prompt nor --edit-prompt");
  }
  DMX_CHECK_ARG(std::isfinite(o.cross_replace_steps) && o.cross_replace_steps >= 0 && o.cross_replace_steps <= 1,
                "--cross-replace-steps must be in [0, 1], got ", o.cross_replace_steps);
  DMX_CHECK_ARG(std::isfinite(o.self_replace_steps) && o.self_replace_steps >= 0 && o.self_replace_steps <= 1,
                "--self-replace-steps must be in [0, 1], got ", o.self_replace_steps);
  pipelines::check_num_inference_steps(o.steps, "--steps");
  pipelines::check_guidance_scale(o.guidance_scale, "--guidance-scale");
  DMX_CHECK_ARG(!o.null_text_inversion || !o.image.empty(), "--null-text-inversion needs --image");
  DMX_CHECK_ARG(!o.null_text_inversion || o.guidance_scale > 1,
                "--null-text-inversion needs --guidance-scale > 1, got ", o.guidance_scale);
  DMX_CHECK_ARG(o.null_text_inner_steps >= 1 && o.null_text_inner_steps <= 1000,
                "--null-text-inner-steps must be in [1, 1000], got ", o.null_text_inner_steps);
  if (o.mode == "replace") {
    auto count = [](const std::string& s) { return static_cast<size_t>(std::count(s.begin(), s.end(), ' ')) + 1; };
    DMX_CHECK_ARG(count(o.prompt) == count(o.edit_prompt), "--mode replace needs prompts with the same number of ",
                  "words, but --prompt has ", count(o.prompt), " words and --edit-prompt has ", count(o.edit_prompt),
                  "; use --mode refine to add words");
  }
  {
    // The three pictures and the maps are written together or not at all; none may be an input.
    api::OutputPlan plan(o.overwrite);
    api::add_model_inputs(plan, o);
    plan.input(o.image, "--image");
    plan.file(o.output, "--output", ".png");
    if (o.output.size() > 4) {
      plan.file(with_suffix(o.output, "-source"), "--output (its -source.png)", ".png");
      plan.file(with_suffix(o.output, "-edit"), "--output (its -edit.png)", ".png");
    }
    if (!o.save_attention_maps.empty()) plan.file(o.save_attention_maps, "--save-attention-maps", ".png");
    plan.prepare();
  }
  Image init;
  if (!o.image.empty()) {
    init = to_rgb(load_image(o.image, "--image"));
    DMX_CHECK_ARG((o.width == 0 || o.width == init.width) && (o.height == 0 || o.height == init.height),
                  "--width/--height (", o.width, "x", o.height, ") must match the --image size (", init.width, "x",
                  init.height, ") or be left out");
  }
  configure_threads(o.threads);

  p.prompt = o.prompt;
  p.edit_prompt = o.edit_prompt;
  p.mode = o.mode;
  p.cross_replace_steps = o.cross_replace_steps;
  p.self_replace_steps = o.self_replace_steps;
  p.local_blend_words = o.local_blend;
  p.local_blend_threshold = o.local_blend_threshold;
  p.negative_prompt = o.negative_prompt;
  p.width = init.width ? init.width : o.width;
  p.height = init.height ? init.height : o.height;
  p.num_inference_steps = o.steps;
  p.guidance_scale = o.guidance_scale;
  p.store_attention = !o.save_attention_maps.empty();
  p.show_progress = o.progress;
  const uint64_t seed = api::resolve_seed(o.seed);
  at::Generator generator = pipelines::make_generator(seed);  // every draw of the run
  p.generator = &generator;

  // 2. Load.
  loaders::LoadOptions lo;
  lo.config_dir = o.config_dir;
  lo.tokenizer_dir = o.tokenizer_dir;
  PhaseTimer load_timer("load");
  auto models = loaders::load_stable_diffusion(o.model, lo);
  load_timer.stop();
  pipelines::PromptToPromptPipeline pipe(models);
  pipe.check_params(p);  // word lookups need the tokenizer only; still before any denoising

  // 3. Real image: DDIM inversion, or null-text inversion.
  P2PResult r;
  r.seed = seed;
  at::Tensor target;
  if (!o.image.empty()) {
    const int f = models->vae_scale_factor();
    DMX_CHECK_ARG(init.width % f == 0 && init.height % f == 0, "--image size must be a multiple of ", f, ", got ",
                  init.width, "x", init.height);
    const auto ti = std::chrono::steady_clock::now();
    const at::Tensor image = image_to_tensor(init);
    target = (image / 2 + 0.5).clamp(0, 1).permute({0, 2, 3, 1})[0];
    if (o.null_text_inversion) {
      pipelines::NullTextInversionParams np;
      np.image = image;
      np.prompt = o.prompt;
      np.num_inference_steps = o.steps;
      np.guidance_scale = o.guidance_scale;
      np.num_inner_steps = o.null_text_inner_steps;
      np.show_progress = o.progress;
      auto inv = pipelines::null_text_invert(*models, np);
      p.latents = inv.x_T();
      p.uncond_embeddings = inv.uncond_embeddings;
    } else {
      const at::Tensor cond = pipelines::encode_prompt(*models, o.prompt);
      at::NoGradGuard no_grad;
      const at::Tensor z0 = models->vae->encode(image.to(models->device, models->dtype)).mean.to(at::kFloat) *
                            models->vae->config().scaling_factor;
      p.latents = pipelines::ddim_inversion_path(*models, z0, cond, o.steps, o.progress).back();
    }
    r.inversion_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - ti).count();
  }

  // 4. Edit.
  const auto te = std::chrono::steady_clock::now();
  auto out = pipe.run(p);
  r.edit_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - te).count();
  if (target.defined()) r.reconstruction_psnr = pipelines::psnr(out.images[0], target);

  // 5. Write: side by side, then each image; the attention maps.
  PhaseTimer write_timer("write");
  const int w = static_cast<int>(out.images.size(2)), h = static_cast<int>(out.images.size(1));
  GenerateOptions meta;
  meta.prompt = o.prompt;
  meta.negative_prompt = o.negative_prompt;
  meta.steps = o.steps;
  meta.guidance_scale = o.guidance_scale;
  meta.scheduler = "ddim";
  std::ostringstream extra;
  extra << ", P2P edit prompt: " << api::quoted(o.edit_prompt) << ", P2P mode: " << o.mode
        << ", P2P cross replace steps: " << o.cross_replace_steps
        << ", P2P self replace steps: " << o.self_replace_steps;
  for (const auto& ws : p.reweight)
    extra << ", P2P reweight: " << api::quoted(ws.first + "=" + std::to_string(ws.second));
  if (!o.local_blend.empty()) {
    std::string words;
    for (const auto& wd : o.local_blend) words += (words.empty() ? "" : " ") + wd;
    extra << ", P2P local blend: " << api::quoted(words);
  }
  if (!o.image.empty()) extra << ", P2P inversion: " << (o.null_text_inversion ? "null-text" : "ddim");
  const TextChunks text = {{"parameters", format_parameters(meta, seed, w, h, models->name) + extra.str()}};
  const Image src = tensor_to_image(out.images[0]), edit = tensor_to_image(out.images[1]);
  r.source = with_suffix(o.output, "-source");
  r.edit = with_suffix(o.output, "-edit");
  std::vector<PendingFile> files = {{r.source, encode_png(src, text)},
                                    {r.edit, encode_png(edit, text)},
                                    {o.output, encode_png(side_by_side(src, edit), text)}};
  if (!o.save_attention_maps.empty()) {
    const int f = models->vae_scale_factor();
    const Image grid = extensions::attention_map_grid(*out.store, out.prompts, *models->tokenizer, h / f, w / f);
    files.push_back({o.save_attention_maps, encode_png(grid)});
  }
  write_files_atomic(files);  // all or nothing
  r.output = o.output;
  if (!o.save_attention_maps.empty()) r.attention_maps = o.save_attention_maps;
  write_timer.stop();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}
}  // namespace dmx
