// `dmx train unclip`: the decoder of Stable unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image
// Generation with CLIP Latents", section 2.1; Stability AI's stable-diffusion-2-1-unclip, which diffusers 0.27.2 runs
// as StableUnCLIPPipeline and StableUnCLIPImg2ImgPipeline): a text-to-image UNet fine-tuned with a "projection" class
// embedding of the noise-augmented CLIP image embedding of its training picture, exactly as those pipelines feed it
// (pipelines/stable_unclip.h), so that `dmx generate` and `dmx variations` run the result unchanged. Per example:
//   e      = image_embeds(picture)          CLIPImageProcessor + CLIPVisionModelWithProjection, as dmx variations
//   level  ~ U{0, ..., T' - 1}               T' = the image-noising scheduler's num_train_timesteps (1000)
//   n      ~ N(0, I)                         [E]
//   e'     = unscale(add_noise(scale(e), n, level))   StableUnCLIPImageNormalizer, the image-noising DDPMScheduler
//   labels = cat(e', timestep_embedding(level, E, flip_sin_to_cos, shift 0))        [2E] (noise_image_embeddings)
//            or zeros [2E] with probability image_embedding_dropout (the pipelines' unconditional class labels)
//   pred   = unet(noisy latents, t, text(caption, "" with --proportion-empty-prompts), class_labels = labels)
// The loss, AdamW, the LR schedule, EMA, bf16 autocast, checkpoints, exact resume and DDP are the trainer's
// (training/trainer.h); the draws of level, n and the dropout are its draw 5 (Recipe::draw_conditioning).
// The UNet of a text-to-image --model gets the class embedding (TimestepEmbedding(2E, time_embed_dim): linear_1,
// SiLU, linear_2) with linear_1 drawn as PyTorch's default and linear_2 zero, so the fine-tune starts as the base
// model; an unCLIP decoder as --model is continued with its own class embedding, normalizer and image encoder.
// The result is a StableUnCLIPImg2ImgPipeline folder (docs/unclip.md "Training the decoder").
// Internal header of the training layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "loaders/model_bundle.h"
#include "models/clip_image_processor.h"
#include "models/clip_vision_model.h"
#include "models/image_normalizer.h"
#include "schedulers/scheduler.h"
#include "training/trainer.h"

namespace dmx::training {

// Stability's image_noising_scheduler (stabilityai/stable-diffusion-2-1-unclip image_noising_scheduler/
// scheduler_config.json): DDPMScheduler, squaredcos_cap_v2, 1000 steps.
nlohmann::json stable_unclip_noising_scheduler_config();

// Where the decoder's image conditioning comes from: the image tower (feature extractor + image encoder), the
// normalizer and the image-noising scheduler. `source_dir`: the folder whose feature_extractor/ and image_encoder/
// the output folder copies (a CLIP folder or an unCLIP folder).
struct UnCLIPImageTower {
  std::string source_dir;
  models::CLIPImageProcessorConfig feature_extractor;
  models::CLIPVisionModelWithProjection image_encoder{nullptr};
  // Continuing an unCLIP decoder: its normalizer (kept, not recomputed) and noising scheduler config.
  models::StableUnCLIPImageNormalizer image_normalizer{nullptr};
  nlohmann::json image_noising_scheduler_config;  // null: stable_unclip_noising_scheduler_config()
};

// CLIP image embeddings [N, E] (float32) of the pictures at `paths`, each read as dmx variations reads --image
// (load_image, to_rgb) and run through the feature extractor and the image encoder one at a time.
at::Tensor clip_image_embeddings(const models::CLIPImageProcessorConfig& feature_extractor,
                                 models::CLIPVisionModelWithProjection& image_encoder,
                                 const std::vector<std::string>& paths);

// noise_image_embeddings (pipelines/unclip_steps.h) with a noise level per row: image_embeds [B, E], levels [B] int64
// in [0, T'), noise [B, E] -> [B, 2E]. Row i equals noise_image_embeddings(image_embeds[i], levels[i], noise[i]).
at::Tensor noise_image_embeddings_per_row(models::StableUnCLIPImageNormalizer& normalizer,
                                          const schedulers::Scheduler& noising, const at::Tensor& image_embeds,
                                          const at::Tensor& levels, const at::Tensor& noise);

// The UNet config.json (diffusers' fields) of the decoder made from `unet_config`: class_embed_type "projection",
// projection_class_embeddings_input_dim 2E. InvalidArgument when the UNet already has another class embedding.
nlohmann::json unclip_unet_config(const nlohmann::json& unet_config, int embedding_dim);

// A UNet with the projection class embedding of width 2E and the weights of `base` (which has none): linear_1 from
// PyTorch's default initialisation (the global generator: seed it), linear_2 weight and bias zero, so its output
// equals base's for any class labels.
models::UNet2DConditionModel add_image_embedding_class(const models::UNet2DConditionModel& base,
                                                       const nlohmann::json& decoder_unet_config);

class UnCLIPDecoderRecipe : public Recipe {
 public:
  // m: the text-to-image model or the unCLIP decoder to continue (from its diffusers folder, m->source_path); its
  // UNet is replaced by the decoder's (add_image_embedding_class) when it has no class embedding. image_paths: the
  // picture of each row of the batch source, in index order. image_embedding_dropout in [0, 1].
  UnCLIPDecoderRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, UnCLIPImageTower tower,
                      std::vector<std::string> image_paths, double image_embedding_dropout);
  std::string name() const override { return "unclip"; }
  // The image embeddings of every row (and, for a new decoder, the normalizer's mean and std over them); the
  // VAE and text encoder frozen (bf16 with --mixed-precision bf16), the UNet trained (bf16 autocast).
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;  // the UNet's, "unet." + diffusers names
  void train_mode(bool on) override;
  // Draws, for the global batch in this order: levels randint(0, T', (G,)), noise randn(G, E), dropout rand(G);
  // keeps this rank's rows and sets the class labels of predict.
  void draw_conditioning(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  // A StableUnCLIPImg2ImgPipeline folder: the source folder's tokenizer, text encoder, VAE and scheduler, the
  // tower's feature_extractor/ and image_encoder/ (files copied byte for byte), image_normalizer/,
  // image_noising_scheduler/, the trained unet/ (float32) and model_index.json.
  void save(const std::string& dir) override;
  // Validation pictures come from `dmx variations` on the written folder (no pipeline runs in training).
  void validate(const TrainConfig&, int64_t, const std::string&) override {}
  io::TensorMap extra_state() override;  // the normalizer's mean and std
  void load_extra_state(const io::TensorMap& s) override;

  const at::Tensor& image_embeddings() const { return embeds_; }  // [N, E]
  const at::Tensor& class_labels() const { return labels_; }      // of the last draw, [rows, 2E]
  models::StableUnCLIPImageNormalizer& image_normalizer() { return normalizer_; }
  const nlohmann::json& unet_config_json() const { return unet_config_; }

 private:
  UnCLIPImageTower tower_;
  std::vector<std::string> paths_;
  double dropout_;
  nlohmann::json unet_config_, noising_config_;
  std::unique_ptr<schedulers::Scheduler> noising_;
  models::StableUnCLIPImageNormalizer normalizer_{nullptr};
  bool new_normalizer_ = false;
  at::Tensor embeds_;  // [N, E] float32
  at::Tensor labels_;
  bool autocast_bf16_ = false;
};
}  // namespace dmx::training
