// Make-A-Scene as diffusion (Gafni et al. 2022; docs/scene.md), on `dmx data scenes` folders: two recipes.
//
// `dmx train vqseg` (VQSegRecipe): VQ-SEG, a diffusers VQModel of scene maps (loaders/scene.h: the one-hot category
// map plus the edge channel), from scratch. Per example: cross-entropy of the decoded category logits against the
// category map (object pixels weighted kVQSegObjectWeight: the background is most of a canvas) + binary cross-entropy
// of the decoded edge logit against the edge map (edge pixels weighted kVQSegEdgeWeight) + the codebook term
// |sg(h) - z_q|^2 + beta |h - sg(z_q)|^2 (van den Oord et al., beta 0.25). The codebook starts from encoder outputs of
// the first batch and, every kVQSegRestartEvery steps, each code no row chose over those steps is moved to a random
// encoder output of the current batch (dead-code restarts, as VQ trainers commonly do, so the codebook stays in use).
//
// `dmx train scene` (SceneRecipe): the text-to-image UNet given the scene tokens of a frozen VQ-SEG: each canvas's
// g x g codes become g^2 tokens (a learned code embedding, plus learned row and column embeddings) appended to the
// caption's hidden states in every cross-attention. The whole scene is replaced by the "dropped scene" code (row K of
// the code table) for a share of rows (--layout-dropout), the caption by "" for another, independently
// (--proportion-empty-prompts): so the model learns eps(text, scene), eps(0, scene), eps(text, 0) and eps(0, 0), the
// terms of both guidance modes (pipelines/scene.h). The UNet also reads the coordinate channels (loaders/scene.h:
// conv_in widened, new weights from zero, so the first forward is the base model's), so that its queries know where
// they are; conv_in and the three tables are trained whole, the rest through LoRA adapters of rank r on every
// Linear / Conv2d of its blocks (the base frozen).
// Internal header of the training layer.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "loaders/scene.h"
#include "training/dataset.h"
#include "training/lora_train.h"
#include "training/trainer.h"

namespace dmx::training {

constexpr double kVQSegBeta = 0.25;
constexpr double kVQSegObjectWeight = 4.0;  // cross-entropy weight of object pixels (background 1)
constexpr double kVQSegEdgeWeight = 4.0;    // binary cross-entropy weight of edge pixels (pos_weight)
constexpr int kVQSegRestartEvery = 50;
constexpr double kSceneTableGain = 20.0;  // the scene tables' learning-rate multiplier (SceneRecipe)

// One canvas of a scene folder's metadata.jsonl.
struct SceneCanvas {
  std::string image;       // the picture
  std::string categories;  // the category map (8-bit gray, 0 = background)
  std::string edges;       // the edge map (8-bit gray, nonzero = edge)
  std::string caption;
};
// Every row of `dir`'s metadata.jsonl (InvalidArgument if dir is not a scene folder; FormatError naming the file and
// line for a bad row or a path leaving the folder).
std::vector<SceneCanvas> read_scene_canvases(const std::string& dir);
// The canvases of the dataset rows `rows`, matched by picture path (FormatError for a row not in the metadata).
std::vector<SceneCanvas> scene_canvases_of(const std::string& dir, const std::vector<DatasetRow>& rows);
// The canvas's scene map [categories + 1, H, W] (loaders::scene_map_tensor); FormatError naming the file for a map of
// another size than `side` or a category id outside [0, categories).
at::Tensor load_scene_map(const SceneCanvas& c, int categories, int side);

// The VQ-SEG architecture `dmx train vqseg` builds: widths 16, 32, 64, 64, ... (log2(factor) + 1 blocks), one resnet
// per block, latent 32, code width 16, norm groups 8, in = out = categories + 1.
models::VQModelConfig vqseg_config(int categories, int resolution, int factor, int codebook_size);

struct CodebookUsage {
  int64_t used = 0;            // codes chosen at least once
  int64_t size = 0;            // K
  double perplexity = 0;       // exp(entropy of the code frequencies)
  double pixel_accuracy = 0;   // share of pixels whose decoded category is right
  double object_accuracy = 0;  // the same over object (non-background) pixels
  double edge_f1 = 0;
};
// The whole set through the model (no grad): codes used, perplexity and reconstruction accuracy.
CodebookUsage measure_codebook(models::VQModel& model, const std::vector<at::Tensor>& maps, int categories);

class VQSegRecipe : public Recipe {
 public:
  // maps: every canvas's scene map [categories + 1, R, R] (load_scene_map), in the batch source's row order.
  // new_codebook: the codebook starts from the first batch's encoder outputs (false: a model continued keeps its own).
  VQSegRecipe(models::VQModel model, std::vector<at::Tensor> maps, int categories, int resolution,
              bool new_codebook = true);
  std::string name() const override { return "vqseg"; }
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  at::Tensor custom_loss(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Batch&) override;
  void save(const std::string& dir) override;
  void validate(const TrainConfig&, int64_t, const std::string&) override {}
  io::TensorMap extra_state() override;
  void load_extra_state(const io::TensorMap& s) override;
  const CodebookUsage& usage() const { return usage_; }

 private:
  models::VQModel model_;
  std::vector<at::Tensor> maps_;
  int categories_ = 0, resolution_ = 0;
  at::Tensor counts_;  // [K] int64: rows choosing each code since the last restart
  int64_t calls_ = 0;  // custom_loss calls (initialisation at the first, restarts every kVQSegRestartEvery)
  bool new_codebook_ = true;
  CodebookUsage usage_;
};

struct SceneTrainOptions {
  LoRATrainOptions lora;  // rank, alpha; targets "all"
  double scene_dropout = 0.2;
  std::string vqseg_dir;  // copied into the output's vqseg/
};

class SceneRecipe : public Recipe {
 public:
  SceneRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, SceneTrainOptions o, loaders::VQSeg vqseg,
              std::vector<SceneCanvas> canvases);
  std::string name() const override { return "scene"; }
  void setup(const TrainConfig& cfg) override;
  // the LoRA pairs, scene.code_embedding.weight, scene.row_embedding.weight, scene.col_embedding.weight
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  void draw_conditioning(const Batch& batch, at::Generator& gen, int64_t r0, int64_t global_rows) override;
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  void save(const std::string& dir) override;
  void validate(const TrainConfig&, int64_t, const std::string&) override {}  // `dmx generate --layout` instead

  const std::vector<at::Tensor>& canvas_codes() const { return codes_; }  // per canvas [g, g]
  const at::Tensor& drawn_codes() const { return drawn_; }                // of the last draw [B, g, g]

 private:
  SceneTrainOptions o_;
  loaders::VQSeg vqseg_;
  std::vector<SceneCanvas> canvases_;
  std::unique_ptr<LoRANetwork> net_;
  std::vector<at::Tensor> codes_;
  at::Tensor drawn_;
  at::Tensor code_embedding_, row_embedding_, col_embedding_;  // raw: the tables are kSceneTableGain x these
  int K_ = 0, grid_ = 0, resolution_ = 0, base_in_ = 0;
  bool autocast_bf16_ = false;
};
}  // namespace dmx::training
