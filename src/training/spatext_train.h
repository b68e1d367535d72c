// `dmx train spatext`: SpaText (Avrahami et al. 2023, "SpaText: Spatio-Textual Representation for Controllable Image
// Generation"; docs/spatext.md) on a `dmx data scenes` folder, from a text-to-image model.
//
// Per training canvas, once (setup): every object's segment (its visible pixels in the instance map) is cut out as
// the paper does (the tight square around it, every pixel outside the segment set to the canvas background, white),
// embedded by the CLIP image tower and scaled to unit length (e_k), and its share of each latent cell computed
// (pipelines/spatext.h's painting: average pooling of the pixel mask). Per step (draw_conditioning, the trainer's
// draw 5, for the global batch in this order): u = rand(G) (the whole map dropped to zeros when u < map_dropout) and
// v = rand(G, 8) (object k kept when v[k] < kSpaTextKeep, at least the one with the smallest v: users label only
// some regions); the map is sum over kept k of share_k e_k, [D, h, w]. The caption is dropped independently by the
// trainer (--proportion-empty-prompts), so the model learns eps(c_g, c_l), eps(c_g, 0), eps(0, c_l) and eps(0, 0),
// the four terms of the multi-conditional guidance.
//
// The map's D channels go through a learned projection to kSpaTextMapChannels (M) before the UNet (a Linear without
// bias per cell, PyTorch's default initialisation): dmx's UNet takes at most 64 input channels, and it makes the
// first convolution D / M times smaller. The UNet: the base's with conv_in widened by M input channels whose weights
// start at zero (loaders/spatext.h:
// the first forward is the base model's), conv_in trained whole and every Linear / Conv2d of the down, mid and up
// blocks through LoRA adapters of rank r (training/lora_train.h; the base weights frozen), under bf16 autocast with
// --mixed-precision bf16. What is written is a SpaText folder (loaders/spatext.h): the base's parts, spatext.json,
// spatext.safetensors (conv_in + the LoRA pairs, float32) and the prior's parts (for inference).
// Internal header of the training layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "models/clip_image_processor.h"
#include "models/clip_vision_model.h"
#include "training/dataset.h"
#include "training/lora_train.h"
#include "training/trainer.h"

namespace dmx::training {

constexpr double kSpaTextKeep = 0.75;    // each object's chance to be painted into a training map
constexpr int kSpaTextMapChannels = 32;  // the map's channels after the learned projection

// The objects of one canvas of a scene folder, for the row of the dataset that shows its picture.
struct SpaTextCanvas {
  std::string image;      // the picture (the dataset row's path)
  std::string instances;  // the instance map (8-bit gray, 0 = background, k = object k)
  std::vector<int> instance_ids;
};

// The canvases of `dir`'s metadata.jsonl, in the order of `rows` (matched by picture path). FormatError naming the
// file for a row that is not in the scene folder's metadata, a path leaving the folder or a bad JSON row.
std::vector<SpaTextCanvas> read_spatext_canvases(const std::string& dir, const std::vector<DatasetRow>& rows);

// The segment cut-out the image tower sees: the tight square around the mask's pixels (centred, clipped to the
// picture), pixels outside the mask white. picture RGB [H, W], mask [H, W] bool, at least one pixel.
Image spatext_segment_crop(const Image& picture, const at::Tensor& mask);

struct SpaTextTrainOptions {
  LoRATrainOptions lora;        // rank, alpha; targets "all" (every Linear / Conv2d of the blocks)
  double map_dropout = 0.2;     // share of rows trained without the map
  std::string prior_dir;        // copied into the output folder (prior_tokenizer, prior_text_encoder, prior, ...)
  std::string image_tower_dir;  // a CLIP folder (image_encoder/, feature_extractor/): the segments' embeddings
};

class SpaTextRecipe : public Recipe {
 public:
  SpaTextRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, SpaTextTrainOptions o,
                models::CLIPImageProcessorConfig feature_extractor, models::CLIPVisionModelWithProjection image_encoder,
                std::vector<SpaTextCanvas> canvases);
  std::string name() const override { return "spatext"; }
  void setup(const TrainConfig& cfg) override;
  // the LoRA pairs, unet.conv_in.{weight,bias}, spatext.projection.weight
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  void draw_conditioning(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  void save(const std::string& dir) override;
  void validate(const TrainConfig&, int64_t, const std::string&) override {}  // `dmx generate --layout` instead

  int embedding_dim() const { return dim_; }
  const std::vector<at::Tensor>& segment_embeddings() const { return embeds_; }  // per canvas [K, D]
  const std::vector<at::Tensor>& segment_shares() const { return shares_; }      // per canvas [K, h, w]
  const at::Tensor& maps() const { return maps_; }                               // of the last draw [B, D, h, w]

 private:
  SpaTextTrainOptions o_;
  models::CLIPImageProcessorConfig fe_;
  models::CLIPVisionModelWithProjection enc_{nullptr};
  std::vector<SpaTextCanvas> canvases_;
  std::unique_ptr<LoRANetwork> net_;
  std::vector<at::Tensor> embeds_, shares_;
  at::Tensor maps_;
  at::Tensor projection_;  // [M, D]
  int dim_ = 0, base_in_ = 0;
  bool autocast_bf16_ = false;
};
}  // namespace dmx::training
