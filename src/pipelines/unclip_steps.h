// The steps the two Stable unCLIP pipelines of diffusers 0.27.2 share (pipeline_stable_unclip.py,
// pipeline_stable_unclip_img2img.py; Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP
// Latents"): the prior's prompt encoding and sampling loop (text -> CLIP image embedding), the CLIP embedding of a
// picture (image variations), and the noise augmentation of the image embedding that conditions the decoder.
// The decoder's denoising loop is the Stable Diffusion one with class labels (the pipelines come later).
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "core/image.h"
#include "models/clip_image_processor.h"
#include "models/clip_text_model.h"
#include "models/clip_tokenizer.h"
#include "models/clip_vision_model.h"
#include "models/image_normalizer.h"
#include "models/prior_transformer.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

// StableUnCLIPPipeline._encode_prior_prompt: the prior tokenizer (padding to model_max_length, truncating) and the
// prior text encoder (with projection, run without the mask). With guidance the rows are [uncond ("") x B*n;
// prompts, each repeated num_images_per_prompt times].
struct PriorPromptEmbeddings {
  at::Tensor input_ids;          // [rows, L] int64
  at::Tensor attention_mask;     // [rows, L] bool: the real tokens (BOS, words, first EOS)
  at::Tensor text_embeds;        // [rows, projection_dim] = text_projection(pooled), not normalised
  at::Tensor last_hidden_state;  // [rows, L, hidden]
};
PriorPromptEmbeddings encode_prior_prompt(const models::CLIPTokenizer& tokenizer, models::CLIPTextModel& text_encoder,
                                          const std::vector<std::string>& prompts, bool do_classifier_free_guidance,
                                          int num_images_per_prompt = 1);

// The prior's denoising loop of StableUnCLIPPipeline.__call__ (steps 1-4 of FIXTURES.md's "what diffusers does").
struct PriorRunParams {
  PriorPromptEmbeddings prompt;  // from encode_prior_prompt; [uncond; cond] rows when guidance_scale > 1
  int num_inference_steps = 25;
  double guidance_scale = 4.0;          // prior_guidance_scale; > 1 turns classifier-free guidance on
  at::Tensor latents;                   // initial [B, embedding_dim] before init_noise_sigma, or undefined: drawn
  at::Generator* generator = nullptr;   // the initial latents' and the scheduler's draws (nullptr = global)
  std::vector<at::Tensor> step_noises;  // replays the scheduler's draws (one per step with t > 0), in order
  // After each step: index, timestep, the guided prediction the scheduler consumed, the new latents.
  std::function<void(int step, double t, const at::Tensor& guided_prediction, const at::Tensor& latents)> on_step_end;
};
// Runs the loop with `scheduler` (the folder's prior_scheduler, a DDPMScheduler in Stable unCLIP folders; set_timesteps
// is called here) and returns image_embeds = prior.post_process_latents(final latents) [B, clip_embed_dim].
// InvalidArgument naming the parameter for inconsistent shapes or values; Unsupported for an UnCLIPScheduler, which
// StableUnCLIPPipeline steps to t - 1 at every step (dmx's steps to the run's next timestep, as Karlo does).
at::Tensor run_prior(models::PriorTransformer& prior, schedulers::Scheduler& scheduler, const PriorRunParams& p);

// StableUnCLIPImg2ImgPipeline._encode_image: CLIPImageProcessor then the image encoder -> image_embeds [1, E].
at::Tensor clip_image_embeds(const models::CLIPImageProcessorConfig& feature_extractor,
                             models::CLIPVisionModelWithProjection& image_encoder, const Image& image,
                             const std::string& param = "image");

// StableUnCLIPPipeline.noise_image_embeddings: e = normalizer.scale(image_embeds);
// e = image_noising_scheduler.add_noise(e, noise, noise_level); e = normalizer.unscale(e);
// -> cat([e, timestep_embedding(noise_level, E, flip_sin_to_cos=True, shift 0)], 1) [B, 2E], the decoder UNet's
// class labels (its unconditional half gets zeros). noise: [B, E], or undefined: one draw from `generator`
// (drawn even at noise_level 0, as diffusers does). InvalidArgument unless 0 <= noise_level < the scheduler's
// num_train_timesteps.
at::Tensor noise_image_embeddings(models::StableUnCLIPImageNormalizer& image_normalizer,
                                  const schedulers::Scheduler& image_noising_scheduler, const at::Tensor& image_embeds,
                                  int64_t noise_level, const at::Tensor& noise = {},
                                  at::Generator* generator = nullptr);
}  // namespace dmx::pipelines
