// A small residual CNN that recognises emoji (issue #7's evaluator): the ResNet basic block (He et al. 2016,
// "Deep Residual Learning for Image Recognition") with GroupNorm (Wu & He 2018) instead of BatchNorm, so a
// batch of one gives exactly what a batch of N gives. Two heads on one pooled feature vector: the emoji
// concept (every concept of the dataset's concepts.json, held-out ones included) and the drawing style
// (google / twitter). The pooled features serve Fréchet distances and subject similarity.
//
//   image [B, 3, 64, 64] in [-1, 1]
//   conv_in 3x3 (stride 2) -> GN -> SiLU               [B, c0, 32, 32]
//   stages.i: BasicBlock(stride 2)                     [B, c_i, 32 / 2^(i+1), ...]  (16, 8, 4)
//   global average pool                                [B, feature_dim]  (feature_dim = last channel count)
//   concept_head Linear -> [B, num_concepts], style_head Linear -> [B, num_styles]
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dmx::emoji {

struct EmojiClassifierConfig {
  int image_size = 64;
  std::vector<int> block_out_channels = {64, 128, 256};  // one stride-2 stage each
  int stem_channels = 32;
  int stem_stride = 2;
  int norm_num_groups = 8;
  std::vector<std::string> class_names;       // emoji names (lower-cased, as concepts.json's `name`)
  std::vector<std::string> class_categories;  // their categories (concepts.json `category`)
  std::vector<std::string> class_splits;      // "train" | "heldout" (which concepts the generator saw)
  std::vector<std::string> styles = {"google", "twitter"};
  int feature_dim() const { return block_out_channels.back(); }
  nlohmann::json to_json() const;
  // FormatError naming the field for a malformed config.
  static EmojiClassifierConfig from_json(const nlohmann::json& j);
};

// One residual stage: conv3x3(stride) GN SiLU conv3x3 GN (+ 1x1 stride conv shortcut), SiLU.
class BasicBlockImpl : public torch::nn::Module {
 public:
  BasicBlockImpl(int in_channels, int out_channels, int stride, int groups);
  at::Tensor forward(const at::Tensor& x);

 private:
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, shortcut{nullptr};
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr}, norm_shortcut{nullptr};
};
TORCH_MODULE(BasicBlock);

struct EmojiClassifierOutput {
  at::Tensor features;        // [B, feature_dim]
  at::Tensor concept_logits;  // [B, num_concepts]
  at::Tensor style_logits;    // [B, num_styles]
};

class EmojiClassifierImpl : public torch::nn::Module {
 public:
  explicit EmojiClassifierImpl(EmojiClassifierConfig cfg);
  // x: [B, 3, H, W] in [-1, 1]; other sizes are resized (bilinear) to image_size.
  EmojiClassifierOutput forward(const at::Tensor& x);
  const EmojiClassifierConfig& config() const { return cfg_; }

 private:
  EmojiClassifierConfig cfg_;
  torch::nn::Conv2d conv_in{nullptr};
  torch::nn::GroupNorm norm_in{nullptr};
  torch::nn::ModuleList stages{nullptr};
  torch::nn::Linear concept_head{nullptr}, style_head{nullptr};
};
TORCH_MODULE(EmojiClassifier);

// Forward in chunks of `batch_size` without gradients, results concatenated (on the CPU, float32).
EmojiClassifierOutput classify(EmojiClassifier& model, const at::Tensor& images, int batch_size = 64);

// A folder with config.json + model.safetensors (fp16 or fp32 storage). Strict load; FormatError / IoError.
EmojiClassifier load_emoji_classifier(const std::string& dir);
// Writes the folder atomically (files first as temporaries); weights stored as fp16 when `fp16`.
void save_emoji_classifier(EmojiClassifier& model, const std::string& dir, bool fp16 = true);
}  // namespace dmx::emoji
