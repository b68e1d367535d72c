// `dmx train clip`: a small CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
// Supervision") trained from scratch on image-caption folders: a ViT image tower and a text tower
// (transformers' CLIPVisionModelWithProjection and CLIPTextModelWithProjection, models/clip_*.h), the symmetric
// contrastive loss of the paper's pseudo-code (figure 3) and of transformers' CLIPModel (clip_loss):
//   I = normalize(image_embeds), T = normalize(text_embeds)          [B, E]
//   logits = exp(min(t, ln 100)) * I T^T                               [B, B] (logits_per_image)
//   loss = (CE(logits, arange(B)) + CE(logits^T, arange(B))) / 2
// with the learned log temperature t initialised to ln(1 / 0.07) and its exponential clamped at 100, as the paper
// does. The result is a CLIP folder (loaders/clip.h) that `dmx embed` and `dmx eval --clip` load.
// The loss uses the whole batch as negatives, so a run is one process (no gather across ranks).
// Internal header of the training layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "loaders/clip.h"
#include "training/trainer.h"

namespace dmx::training {

// Per-example symmetric contrastive loss [B]: (CE_image->text[i] + CE_text->image[i]) / 2, whose mean is the CLIP
// loss. image_embeds, text_embeds: [B, E] (not normalised; any float dtype, computed in float32); logit_scale: a
// scalar tensor (the log temperature, clamped at ln 100 before the exponential).
at::Tensor clip_contrastive_loss(const at::Tensor& image_embeds, const at::Tensor& text_embeds,
                                 const at::Tensor& logit_scale);

// The sizes of a new CLIP: both towers share width, depth and heads (MLP 4 x width, quick_gelu).
struct CLIPArchitecture {
  int width = 128;
  int layers = 4;
  int heads = 4;
  int patch_size = 4;
  int projection_dim = 128;
  int image_size = 32;
  // InvalidArgument naming the flag (--width, --layers, --heads, --patch-size, --projection-dim, --image-size).
  void validate() const;
};

// A new CLIP of that architecture with the tokenizer of tokenizer_dir (its vocabulary and model_max_length size
// the text tower), transformers' CLIPPreTrainedModel._init_weights drawn from the global generator (seed it), a
// feature extractor that resizes to image_size and normalises with mean = std = 0.5 (pixels in [-1, 1], what
// the training folders give), and logit_scale ln(1 / 0.07).
std::shared_ptr<loaders::CLIPComponents> new_clip_model(const CLIPArchitecture& arch, const std::string& tokenizer_dir);
// The same with given tower configs (--config: a CLIP folder's text_encoder/ and image_encoder/ config.json).
// InvalidArgument when the tokenizer does not fit the text tower (ids past vocab_size, model_max_length past
// max_position_embeddings) or the projection widths differ.
std::shared_ptr<loaders::CLIPComponents> new_clip_model(const models::CLIPTextConfig& text,
                                                        const models::CLIPVisionConfig& vision,
                                                        const std::string& tokenizer_dir);

// transformers' CLIPPreTrainedModel._init_weights (initializer_factor 1, initializer_range 0.02) for either tower.
void init_clip_weights(torch::nn::Module& tower, int hidden_size, int num_layers);

// Batches from several image-caption folders, concatenated (rows of folder 0, then folder 1, ...; Batch::indices
// are indices into that concatenation), with the sampler and the augmentation seeds of DatasetBatchSource: rank r
// of world_size takes its share of the global batch (dmx train clip runs one process; dmx train unclip any).
class ConcatBatchSource : public BatchSource {
 public:
  ConcatBatchSource(std::vector<std::shared_ptr<ImageCaptionDataset>> datasets, int batch_size, uint64_t seed,
                    int rank = 0, int world_size = 1);
  Batch get(int64_t micro_step) override;
  size_t size() const override { return total_; }
  bool latents_cacheable() const override;  // every folder center-cropped and unflipped
  // The image path of each row of the concatenation, in index order.
  std::vector<std::string> image_paths() const;

 private:
  std::vector<std::shared_ptr<ImageCaptionDataset>> ds_;
  size_t total_ = 0;
  BatchSampler sampler_;
  int batch_size_, rank_;
};

class CLIPRecipe : public Recipe {
 public:
  explicit CLIPRecipe(std::shared_ptr<loaders::CLIPComponents> clip);
  std::string name() const override { return "clip"; }
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  at::Tensor custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) override;
  void save(const std::string& dir) override;
  // No pictures to make: the log records the loss (and dmx eval --clip measures retrieval).
  void validate(const TrainConfig&, int64_t, const std::string&) override {}
  loaders::CLIPComponents& clip() { return *clip_; }
  double logit_scale() const;

 private:
  std::shared_ptr<loaders::CLIPComponents> clip_;
  at::Tensor logit_scale_;  // float32 scalar leaf
  at::Tensor mean_, std_;   // [1, 3, 1, 1]: the feature extractor's normalisation
  bool autocast_bf16_ = false;
};

// The bundle the trainer's generic parts read (a DDPM config for its unused diffusion state); holds no model.
std::shared_ptr<loaders::StableDiffusionModels> clip_bundle(const std::string& source);
}  // namespace dmx::training
