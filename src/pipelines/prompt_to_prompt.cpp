// Prompt-to-Prompt pipeline (see prompt_to_prompt.h).
#include "pipelines/prompt_to_prompt.h"

#include <cmath>
#include <optional>

#include "core/phase_timer.h"
#include "core/progress.h"
#include "core/text.h"
#include "dmx/error.h"
#include "nn/attention_seam.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

namespace {
bool has_word(const std::string& text, const std::string& word) {
  for (const auto& w : split(text, ' '))
    if (w == word) return true;
  return false;
}
}  // namespace

PromptToPromptPipeline::PromptToPromptPipeline(std::shared_ptr<loaders::StableDiffusionModels> models)
    : m_(std::move(models)) {
  DMX_CHECK_ARG(m_ != nullptr, "PromptToPromptPipeline: models must not be null");
}

void PromptToPromptPipeline::check_params(const PromptToPromptParams& p) const {
  DMX_CHECK_ARG(p.mode == "replace" || p.mode == "refine" || p.mode == "reweight",
                "mode must be one of replace, refine, reweight, got \"", p.mode, "\"");
  DMX_CHECK_ARG(!p.prompt.empty(), "prompt must not be empty");
  DMX_CHECK_ARG(!p.edit_prompt.empty(), "edit_prompt must not be empty");
  check_generation_params(p, *m_);
  DMX_CHECK_SUPPORTED(p.num_images_per_prompt == 1, "Prompt-to-Prompt makes one image per prompt ",
                      "(num_images_per_prompt 1), got ", p.num_images_per_prompt);
  check_output_size(*m_, p.width, p.height, 2, p.guided());
  DMX_CHECK_ARG(std::isfinite(p.cross_replace_steps) && p.cross_replace_steps >= 0 && p.cross_replace_steps <= 1,
                "cross_replace_steps must be in [0, 1], got ", p.cross_replace_steps);
  DMX_CHECK_ARG(std::isfinite(p.self_replace_steps) && p.self_replace_steps >= 0 && p.self_replace_steps <= 1,
                "self_replace_steps must be in [0, 1], got ", p.self_replace_steps);
  DMX_CHECK_ARG(std::isfinite(p.local_blend_threshold) && p.local_blend_threshold >= 0 && p.local_blend_threshold <= 1,
                "local_blend_threshold must be in [0, 1], got ", p.local_blend_threshold);
  if (p.mode == "reweight") {
    DMX_CHECK_ARG(!p.reweight.empty(), "mode reweight needs at least one word=scale (--reweight WORD=SCALE)");
  } else {
    DMX_CHECK_ARG(p.reweight.empty(), "word=scale re-weighting needs mode reweight, got mode ", p.mode);
  }
  for (const auto& ws : p.reweight) {
    DMX_CHECK_ARG(std::isfinite(ws.second) && ws.second >= -100 && ws.second <= 100, "reweight scale of \"", ws.first,
                  "\" must be in [-100, 100], got ", ws.second);
    DMX_CHECK_ARG(has_word(p.edit_prompt, ws.first), "reweight word \"", ws.first,
                  "\" is not a word of the edit prompt \"", p.edit_prompt, "\" (words are split at spaces)");
  }
  for (const auto& w : p.local_blend_words)
    DMX_CHECK_ARG(has_word(p.prompt, w) || has_word(p.edit_prompt, w), "local blend word \"", w,
                  "\" is in neither prompt (\"", p.prompt, "\", \"", p.edit_prompt, "\")");
  if (p.mode == "replace") {
    const size_t a = split(p.prompt, ' ').size(), b = split(p.edit_prompt, ' ').size();
    DMX_CHECK_ARG(a == b, "replace edits need prompts with the same number of words, but the prompt has ", a,
                  " words and the edit prompt has ", b, "; use --mode refine to add words");
  }
  for (size_t i = 0; i < p.uncond_embeddings.size(); ++i)
    DMX_CHECK_ARG(
        p.uncond_embeddings[i].defined() && p.uncond_embeddings[i].dim() == 3 && p.uncond_embeddings[i].size(0) == 1,
        "uncond_embeddings[", i, "] must be [1, tokens, dim]");
  DMX_CHECK_ARG(p.uncond_embeddings.empty() || static_cast<int>(p.uncond_embeddings.size()) == p.num_inference_steps,
                "uncond_embeddings must hold one embedding per step (", p.num_inference_steps, "), got ",
                p.uncond_embeddings.size());
}

std::shared_ptr<extensions::AttentionEdit> PromptToPromptPipeline::make_controller(
    const PromptToPromptParams& p) const {
  const std::vector<std::string> prompts{p.prompt, p.edit_prompt};
  const auto& tok = *m_->tokenizer;
  const int L = tok.model_max_length();
  const int n = p.num_inference_steps;
  if (p.mode == "replace")
    return std::make_shared<extensions::AttentionReplace>(prompts, tok, n, p.cross_replace_steps, p.self_replace_steps,
                                                          L);
  if (p.mode == "refine")
    return std::make_shared<extensions::AttentionRefine>(prompts, tok, n, p.cross_replace_steps, p.self_replace_steps,
                                                         L);
  DMX_CHECK_ARG(p.mode == "reweight", "mode must be one of replace, refine, reweight, got \"", p.mode, "\"");
  at::Tensor eq = extensions::get_equalizer(p.edit_prompt, p.reweight, tok, L);
  return std::make_shared<extensions::AttentionReweight>(2, n, p.cross_replace_steps, p.self_replace_steps, eq, nullptr,
                                                         L);
}

PromptToPromptOutput PromptToPromptPipeline::run(const PromptToPromptParams& p_in) {
  at::NoGradGuard no_grad;
  PromptToPromptParams p = p_in;
  if (p.width == 0) p.width = m_->default_sample_size();
  if (p.height == 0) p.height = m_->default_sample_size();

  // 1. Check inputs; build the controller (and local blend) from the prompts' tokens.
  check_params(p);
  const std::vector<std::string> prompts{p.prompt, p.edit_prompt};
  const int P = static_cast<int>(prompts.size());
  std::shared_ptr<extensions::AttentionEdit> controller = make_controller(p);
  std::unique_ptr<extensions::LocalBlend> blend;
  if (!p.local_blend_words.empty()) {
    std::vector<std::vector<std::string>> words(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i)
      for (const auto& w : p.local_blend_words)
        if (has_word(prompts[i], w)) words[i].push_back(w);
    blend = std::make_unique<extensions::LocalBlend>(prompts, words, *m_->tokenizer, p.local_blend_threshold,
                                                     m_->tokenizer->model_max_length());
  }
  std::shared_ptr<extensions::AttentionStore> store;
  if (blend || p.store_attention) store = std::make_shared<extensions::AttentionStore>();

  const bool cfg = p.guided();
  DMX_CHECK_ARG(cfg || p.uncond_embeddings.empty(), "uncond_embeddings need guidance_scale > 1, got ",
                p.guidance_scale);

  // 2. Encode the prompts; the unconditional rows come first, as in the reference.
  PhaseTimer encode_timer("text encode");
  std::vector<at::Tensor> conds;
  for (const auto& s : prompts) conds.push_back(encode_prompt(*m_, s, p.clip_skip));
  const at::Tensor cond = at::cat(conds, 0);  // [P, 77, D]
  const at::Tensor uncond_default =
      cfg ? encode_prompt(*m_, p.negative_prompt, p.clip_skip).repeat({P, 1, 1}) : at::Tensor();
  encode_timer.stop();

  // 3. Timesteps.
  auto sched = make_scheduler(*m_, p.scheduler, p.num_inference_steps);
  const std::vector<double>& ts = sched->timesteps();
  const int num_steps = static_cast<int>(ts.size());

  // 4. Latents: one noise for both prompts.
  const int f = m_->vae_scale_factor();
  const int64_t h = p.height / f, w = p.width / f, c = m_->unet->config().in_channels;
  at::Tensor latents;
  if (p.latents.defined()) {
    DMX_CHECK_ARG(p.latents.dim() == 4 && (p.latents.size(0) == 1 || p.latents.size(0) == P) &&
                      p.latents.size(1) == c && p.latents.size(2) == h && p.latents.size(3) == w,
                  "init latents must have shape [1, ", c, ", ", h, ", ", w, "], got ", p.latents.sizes());
    latents = p.latents.to(at::kFloat).expand({P, c, h, w}).contiguous();
  } else {
    latents = randn_tensor({1, c, h, w}, p.generator).expand({P, c, h, w}).contiguous();
  }
  latents = latents * sched->init_noise_sigma();

  // 5. Denoising loop, with the controller (then the store, which sees the edited maps) on the UNet.
  std::vector<nn::AttentionRow> rows;
  if (cfg)
    for (int i = 0; i < P; ++i) rows.push_back({false, i});
  for (int i = 0; i < P; ++i) rows.push_back({true, i});
  torch::nn::Module& unet_module = *m_->unet;
  nn::ScopedAttentionController edit_guard(unet_module, controller);
  std::optional<nn::ScopedAttentionController> store_guard;
  if (store) store_guard.emplace(unet_module, store);

  PhaseTimer denoise_timer("denoise");
  schedulers::StepArgs args;
  args.eta = p.eta;
  args.generator = p.generator;
  ProgressBar bar("steps", num_steps, p.show_progress);
  for (int i = 0; i < num_steps; ++i) {
    const double t = ts[i];
    // Null-text inversion: this step's unconditional embedding.
    at::Tensor embeds = cond;
    if (cfg) {
      const at::Tensor un = p.uncond_embeddings.empty()
                                ? uncond_default
                                : p.uncond_embeddings[static_cast<size_t>(i)].to(at::kFloat).expand(cond.sizes());
      embeds = at::cat({un, cond}, 0);
    }
    at::Tensor noise_pred;
    {
      nn::ScopedAttentionContext ctx(unet_module, nn::AttentionContext{i, num_steps, t, rows});
      noise_pred = guided_noise_prediction(*m_, *sched, latents, i, embeds, p.guidance_scale);
    }
    args.variance_noise =
        static_cast<size_t>(i) < p.step_noises.size() ? p.step_noises[static_cast<size_t>(i)] : at::Tensor();
    latents = sched->step(noise_pred, i, latents, args).prev_sample;
    if (blend) latents = (*blend)(latents, *store);
    if (p.on_step_end) p.on_step_end(i, t, latents);
    bar.tick();
  }
  bar.finish();
  denoise_timer.stop();

  // 6. Decode.
  PhaseTimer decode_timer("decode");
  PromptToPromptOutput out;
  out.latents = latents.contiguous();
  out.timesteps = ts;
  out.prompts = prompts;
  out.store = store;
  if (blend) out.local_blend_mask = blend->last_mask();
  out.images = StableDiffusionPipeline(m_).decode_latents(latents, false);
  return out;
}
}  // namespace dmx::pipelines
