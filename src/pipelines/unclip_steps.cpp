// Stable unCLIP's shared steps (unclip_steps.h), in the order and with the ops of diffusers 0.27.2.
#include "pipelines/unclip_steps.h"

#include <ATen/ATen.h>

#include <cmath>

#include "dmx/error.h"
#include "nn/layers.h"

namespace dmx::pipelines {

PriorPromptEmbeddings encode_prior_prompt(const models::CLIPTokenizer& tokenizer, models::CLIPTextModel& text_encoder,
                                          const std::vector<std::string>& prompts, bool do_classifier_free_guidance,
                                          int num_images_per_prompt) {
  DMX_CHECK_ARG(!prompts.empty(), "encode_prior_prompt: at least one prompt is needed");
  DMX_CHECK_ARG(num_images_per_prompt >= 1 && num_images_per_prompt <= 64,
                "num_images_per_prompt must be in [1, 64], got ", num_images_per_prompt);
  DMX_CHECK_ARG(text_encoder->has_projection(),
                "the prior text encoder must be a CLIPTextModelWithProjection (it has no text_projection)");
  const int L = tokenizer.model_max_length();
  auto tokenize = [&](const std::vector<std::string>& texts, at::Tensor& ids, at::Tensor& mask) {
    std::vector<int64_t> all_ids, all_mask;
    for (const auto& text : texts) {
      std::vector<int64_t> m;
      const std::vector<int64_t> row = tokenizer.encode_padded(text, L, &m);
      all_ids.insert(all_ids.end(), row.begin(), row.end());
      all_mask.insert(all_mask.end(), m.begin(), m.end());
    }
    const int64_t n = static_cast<int64_t>(texts.size());
    ids = at::tensor(all_ids, at::kLong).view({n, L});
    mask = at::tensor(all_mask, at::kLong).view({n, L}).to(at::kBool);
  };
  at::NoGradGuard no_grad;
  PriorPromptEmbeddings out;
  at::Tensor ids, mask;
  tokenize(prompts, ids, mask);
  auto enc = text_encoder->forward(ids);
  out.input_ids = ids.repeat_interleave(num_images_per_prompt, 0);
  out.attention_mask = mask.repeat_interleave(num_images_per_prompt, 0);
  out.text_embeds = enc.text_embeds.repeat_interleave(num_images_per_prompt, 0);
  out.last_hidden_state = enc.last_hidden_state.repeat_interleave(num_images_per_prompt, 0);
  if (do_classifier_free_guidance) {
    at::Tensor uids, umask;
    tokenize(std::vector<std::string>(prompts.size(), ""), uids, umask);
    auto uenc = text_encoder->forward(uids);
    out.input_ids = at::cat({uids.repeat_interleave(num_images_per_prompt, 0), out.input_ids});
    out.attention_mask = at::cat({umask.repeat_interleave(num_images_per_prompt, 0), out.attention_mask});
    out.text_embeds = at::cat({uenc.text_embeds.repeat_interleave(num_images_per_prompt, 0), out.text_embeds});
    out.last_hidden_state =
        at::cat({uenc.last_hidden_state.repeat_interleave(num_images_per_prompt, 0), out.last_hidden_state});
  }
  return out;
}

at::Tensor run_prior(models::PriorTransformer& prior, schedulers::Scheduler& scheduler, const PriorRunParams& p) {
  at::NoGradGuard no_grad;
  // StableUnCLIPPipeline calls prior_scheduler.step(output, t, latents) with no prev_timestep: an UnCLIPScheduler
  // there steps to t - 1 at every step. dmx's UnCLIPScheduler steps to the next timestep of the run (Karlo's and
  // Kandinsky's pipelines pass it), so this loop would not be diffusers' loop with it.
  DMX_CHECK_SUPPORTED(
      scheduler.class_name() != "UnCLIPScheduler",
      "run_prior: UnCLIPScheduler is not supported as the Stable unCLIP prior scheduler (diffusers' ",
      "StableUnCLIPPipeline steps it to t - 1 whatever the step count); use a DDPMScheduler, as Stable ",
      "unCLIP folders do");
  const bool cfg = p.guidance_scale > 1.0;
  DMX_CHECK_ARG(std::isfinite(p.guidance_scale), "prior_guidance_scale must be finite, got ", p.guidance_scale);
  DMX_CHECK_ARG(
      p.prompt.text_embeds.defined() && p.prompt.last_hidden_state.defined() && p.prompt.attention_mask.defined(),
      "run_prior: the prompt embeddings are missing (use encode_prior_prompt)");
  const int64_t rows = p.prompt.text_embeds.size(0);
  DMX_CHECK_ARG(!cfg || rows % 2 == 0, "run_prior: with prior_guidance_scale > 1 the prompt embeddings need ",
                "[uncond; cond] rows (an even count), got ", rows);
  const int64_t B = cfg ? rows / 2 : rows;
  const int64_t E = prior->config().embedding_dim;
  DMX_CHECK_ARG(prior->config().resolved_clip_embed_dim() == E, "run_prior: the prior predicts ",
                prior->config().resolved_clip_embed_dim(), "-wide embeddings (clip_embed_dim) but samples ", E,
                "-wide latents (embedding_dim)");

  // 1. timesteps
  scheduler.set_timesteps(p.num_inference_steps);
  const std::vector<double> timesteps = scheduler.timesteps();

  // 2. initial latents [B, E] (drawn like diffusers' randn_tensor, then x init_noise_sigma)
  const at::Tensor& ref = p.prompt.text_embeds;
  at::Tensor latents;
  if (p.latents.defined()) {
    DMX_CHECK_ARG(p.latents.dim() == 2 && p.latents.size(0) == B && p.latents.size(1) == E, "prior latents must be [",
                  B, ", ", E, "] (batch, embedding_dim), got ", p.latents.sizes());
    latents = p.latents.to(ref.device(), ref.scalar_type());
  } else {
    const auto opts = at::TensorOptions().dtype(ref.scalar_type());
    latents = (p.generator ? at::randn({B, E}, *p.generator, opts) : at::randn({B, E}, opts)).to(ref.device());
  }
  latents = latents * scheduler.init_noise_sigma();

  // 3. denoising loop with classifier-free guidance
  size_t noise_index = 0;
  for (size_t i = 0; i < timesteps.size(); ++i) {
    const double t = timesteps[i];
    at::Tensor model_input = cfg ? at::cat({latents, latents}) : latents;
    model_input = scheduler.scale_model_input(model_input, static_cast<int>(i));
    models::PriorTransformerInputs in;
    in.hidden_states = model_input;
    in.timestep =
        t == std::floor(t) ? at::scalar_tensor(static_cast<int64_t>(t), at::kLong) : at::scalar_tensor(t, at::kFloat);
    in.proj_embedding = p.prompt.text_embeds;
    in.encoder_hidden_states = p.prompt.last_hidden_state;
    in.attention_mask = p.prompt.attention_mask;
    at::Tensor prediction = prior->forward(in);  // [rows, E]
    if (cfg) {
      const auto halves = prediction.chunk(2);
      prediction = halves[0] + p.guidance_scale * (halves[1] - halves[0]);
    }
    schedulers::StepArgs args;
    args.generator = p.generator;
    if (!p.step_noises.empty() && t > 0) {
      DMX_CHECK_ARG(noise_index < p.step_noises.size(), "run_prior: ", p.step_noises.size(),
                    " step noises given, the run needs more");
      args.variance_noise = p.step_noises[noise_index++];
    }
    latents = scheduler.step(prediction, static_cast<int>(i), latents, args).prev_sample;
    if (p.on_step_end) p.on_step_end(static_cast<int>(i), t, prediction, latents);
  }

  // 4. de-normalise with the stored CLIP statistics
  return prior->post_process_latents(latents);
}

at::Tensor clip_image_embeds(const models::CLIPImageProcessorConfig& feature_extractor,
                             models::CLIPVisionModelWithProjection& image_encoder, const Image& image,
                             const std::string& param) {
  at::NoGradGuard no_grad;
  const at::Tensor pixel_values = models::clip_preprocess(feature_extractor, image, param);
  return image_encoder->forward(pixel_values).image_embeds;
}

at::Tensor noise_image_embeddings(models::StableUnCLIPImageNormalizer& image_normalizer,
                                  const schedulers::Scheduler& image_noising_scheduler, const at::Tensor& image_embeds,
                                  int64_t noise_level, const at::Tensor& noise, at::Generator* generator) {
  at::NoGradGuard no_grad;
  const int T = image_noising_scheduler.config().num_train_timesteps;
  DMX_CHECK_ARG(noise_level >= 0 && noise_level < T, "noise_level must be in [0, ", T - 1,
                "] (the image_noising_scheduler's num_train_timesteps - 1), got ", noise_level);
  DMX_CHECK_ARG(image_embeds.defined() && image_embeds.dim() == 2, "image_embeds must be [batch, embedding_dim], got ",
                image_embeds.defined() ? image_embeds.sizes() : at::IntArrayRef{});
  at::Tensor n = noise;
  if (n.defined()) {
    DMX_CHECK_ARG(n.sizes().equals(image_embeds.sizes()), "noise must have the shape of image_embeds ",
                  image_embeds.sizes(), ", got ", n.sizes());
    n = n.to(image_embeds.device(), image_embeds.scalar_type());
  } else {
    const auto opts = at::TensorOptions().dtype(image_embeds.scalar_type());
    n = (generator ? at::randn(image_embeds.sizes(), *generator, opts) : at::randn(image_embeds.sizes(), opts))
            .to(image_embeds.device());
  }
  at::Tensor e = image_normalizer->scale(image_embeds);
  e = image_noising_scheduler.add_noise_at_timestep(e, n, noise_level);
  e = image_normalizer->unscale(e);
  const at::Tensor levels = at::full({image_embeds.size(0)}, noise_level, at::TensorOptions().dtype(at::kLong));
  const at::Tensor level_embedding =
      nn::get_timestep_embedding(levels, e.size(1), /*flip_sin_to_cos=*/true, /*shift=*/0.0)
          .to(e.device(), e.scalar_type());
  return at::cat({e, level_embedding}, 1);  // [B, 2E]
}
}  // namespace dmx::pipelines
