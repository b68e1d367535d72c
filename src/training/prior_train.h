// `dmx train prior`: the diffusion prior of Ramesh et al. 2022 ("Hierarchical Text-Conditional Image Generation with
// CLIP Latents", DALL-E 2, section 2.1) as diffusers' PriorTransformer (models/prior_transformer.h), trained on
// image-caption folders with a frozen CLIP (a `dmx train clip` folder: its text tower conditions the prior, its image
// tower gives the targets). The paper's objective, with the Stable unCLIP prior scheduler's forward process:
//   z      = (image_embeds - clip_mean) / clip_std                      [B, E]  (statistics of the training images)
//   t      ~ U{0, ..., T - 1},  eps ~ N(0, I)
//   z_t    = sqrt(a_t) z + sqrt(1 - a_t) eps                            (DDPM add_noise, squaredcos_cap_v2, T = 1000)
//   text   = the caption's (last_hidden_state, text_embeds, attention mask), or with probability p_drop the empty
//            prompt's: what StableUnCLIPPipeline feeds the unconditional branch (the prior tokenizer's "" through
//            the prior text encoder), so classifier-free guidance has something to subtract
//   loss   = mean_b mean_e (prior(z_t, t, text) - z)^2                  (the prior predicts the clean embedding:
//                                                                         the scheduler's prediction_type "sample")
// Draws per micro-step, from the trainer's generator, for the global batch G (this rank keeps its rows):
//   1. timesteps [G] (randint)   2. noise [G, E] (randn)   3. text dropout [G] (rand, only when p_drop > 0).
// The CLIP features of every row are computed once per run, before the loop. The output is the prior half of a
// StableUnCLIPPipeline folder: prior/ (config.json, diffusion_pytorch_model.safetensors with clip_mean/clip_std),
// prior_scheduler/scheduler_config.json (Stable unCLIP's DDPMScheduler), prior_text_encoder/ and prior_tokenizer/
// (copies of the CLIP folder's text_encoder/ and tokenizer/), which loaders/unclip.h loads once the decoder half is
// beside it. Internal header of the training layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "loaders/clip.h"
#include "models/prior_transformer.h"
#include "training/trainer.h"

namespace dmx::training {

// The size of a new prior: inner width = heads x head_dim; its embedding_dim is the CLIP's width.
struct PriorArchitecture {
  int layers = 6;
  int heads = 4;
  int head_dim = 32;
  // InvalidArgument naming the flag (--layers, --heads, --attention-head-dim).
  void validate() const;
};

// Stable unCLIP's prior_scheduler (stabilityai/stable-diffusion-2-1-unclip-small, prior_scheduler/
// scheduler_config.json): DDPMScheduler, 1000 steps, squaredcos_cap_v2, prediction_type "sample", clip_sample to +-5,
// variance_type fixed_small_log.
nlohmann::json stable_unclip_prior_scheduler_config();

// The PriorTransformer config of a prior conditioned by this CLIP: embedding_dim = the text tower's hidden size,
// which must equal both towers' projection_dim (Stable unCLIP's layout: the noisy image embedding, the text embedding
// and the text token states are all E wide); num_embeddings = the tokenizer's model_max_length.
// InvalidArgument naming both sizes when the CLIP does not fit.
models::PriorTransformerConfig prior_config_for_clip(const PriorArchitecture& arch, const models::CLIPTextConfig& text,
                                                     const models::CLIPVisionConfig& vision, int model_max_length);

// The CLIP features of the training rows, computed once: what the prior sees and predicts.
struct PriorFeatures {
  at::Tensor last_hidden_state;  // [N, L, D] float32: the text encoder's last_hidden_state of each caption
  at::Tensor text_embeds;        // [N, E]: text_projection(pooled)
  at::Tensor attention_mask;     // [N, L] bool: the real tokens
  at::Tensor image_embeds;       // [N, E]: the image tower's image_embeds of each picture (the targets)
  // The empty prompt (the unconditional branch of the pipeline): [1, L, D], [1, E], [1, L].
  at::Tensor uncond_hidden_state, uncond_text_embeds, uncond_attention_mask;
  std::vector<std::string> captions;
  size_t size() const { return captions.size(); }
};
// The prompts' text features, as StableUnCLIPPipeline._encode_prior_prompt computes them (the prior tokenizer padded
// to model_max_length with its mask, the text encoder without the mask), batched by 256. No grad.
void encode_prior_texts(loaders::CLIPComponents& clip, const std::vector<std::string>& texts, at::Tensor& hidden,
                        at::Tensor& text_embeds, at::Tensor& mask);
// The pictures' image_embeds through the feature extractor (as dmx embed and StableUnCLIPImg2ImgPipeline read a
// picture: 8-bit RGB, CLIPImageProcessor), batched by 256. No grad.
at::Tensor encode_prior_images(loaders::CLIPComponents& clip, const std::vector<std::string>& image_paths,
                               const std::string& param);
// Both, for rows of (picture, caption).
PriorFeatures compute_prior_features(loaders::CLIPComponents& clip, const std::vector<std::string>& image_paths,
                                     const std::vector<std::string>& captions, const std::string& param);

// Rows by index only: the batch's indices (this rank's share, BatchSampler's order and shuffling) with their
// captions, and a [B, 1, 1, 1] placeholder for pixel_values (the prior reads the precomputed features).
class FeatureBatchSource : public BatchSource {
 public:
  FeatureBatchSource(std::vector<std::string> captions, int batch_size_per_rank, int rank, int world_size,
                     uint64_t seed);
  Batch get(int64_t micro_step) override;
  size_t size() const override { return captions_.size(); }

 private:
  std::vector<std::string> captions_;
  BatchSampler sampler_;
};

class PriorRecipe : public Recipe {
 public:
  // prior: a new PriorTransformer (its clip_mean / clip_std are set here from features.image_embeds: per-dimension
  // mean and standard deviation, unbiased); clip_dir: the CLIP folder whose text_encoder/ and tokenizer/ the output
  // copies; text_drop: the probability of the empty prompt.
  PriorRecipe(models::PriorTransformer prior, std::shared_ptr<const PriorFeatures> features, std::string clip_dir,
              double text_drop);
  std::string name() const override { return "prior"; }
  void setup(const TrainConfig& cfg) override;
  // Every parameter but clip_mean and clip_std (data statistics, not trained).
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  at::Tensor custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) override;
  void save(const std::string& dir) override;
  // No pictures: the log records the loss, `dmx eval --prior` measures the sampled embeddings.
  void validate(const TrainConfig&, int64_t, const std::string&) override {}
  models::PriorTransformer& prior() { return prior_; }
  const at::Tensor& alphas_cumprod() const { return alphas_cumprod_; }

 private:
  models::PriorTransformer prior_;
  std::shared_ptr<const PriorFeatures> f_;
  std::string clip_dir_;
  double text_drop_;
  at::Tensor alphas_cumprod_;  // float32 [T] of the prior scheduler
  at::Tensor mean_, std_;      // [1, E]: clip_mean, clip_std
  bool autocast_bf16_ = false;
};

// Writes the prior half of a StableUnCLIPPipeline folder into dir (replaced atomically; callers check with an output
// plan first): prior/, prior_scheduler/, and prior_text_encoder/ + prior_tokenizer/ copied from clip_dir.
void save_prior_folder(const std::string& dir, models::PriorTransformer& prior, const std::string& clip_dir);
// diffusers' prior/config.json of a config.
nlohmann::json prior_config_json(const models::PriorTransformerConfig& c);

// The bundle the trainer's generic parts read (a DDPM config for its unused diffusion state); holds no model.
std::shared_ptr<loaders::StableDiffusionModels> prior_bundle(const std::string& source);
}  // namespace dmx::training
