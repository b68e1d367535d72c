// `dmx train hypernetwork`: an AUTOMATIC1111 hypernetwork (models/hypernetwork.h) trained on a frozen model, as
// A1111's modules/hypernetworks/hypernetwork.py creates (create_hypernetwork, Hypernetwork.__init__,
// HypernetworkModule.__init__) and trains it (train_hypernetwork: the modules in train mode, so dropout is on
// and the multiplier is 1; AdamW on every module parameter; the denoising loss of the frozen model). The loop
// is the one trainer's (training/trainer.h): data, checkpoints, exact resume, bf16, DDP as the other recipes.
//
// Structure and initialisation follow A1111's defaults unless the options say otherwise: layer_structure
// [1, 2, 1], activation "linear", weight_init "Normal" (every Linear and LayerNorm weight ~ N(0, 0.01^2), biases
// zero; LayerNorms always so, whatever weight_init says), no LayerNorm, no dropout, activate_output false (what
// create_hypernetwork leaves). The module widths default to every width the UNet's attention layers read their
// keys and values from (the cross-attention width first, then the self-attention widths ascending): A1111's UI
// creates the sizes it is asked for, by default 768, 320, 640, 1280 = exactly that set for SD 1.x. Draws come
// from a CPU generator seeded with the run's seed, width by width in that order, k module before v, layer by
// layer, weight before bias. Dropout masks come from a second generator (seed + 1), saved in checkpoints.
// Internal header of the training layer.
#pragma once
#include <ATen/core/Generator.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/hypernetwork.h"
#include "training/trainer.h"

namespace dmx::training {

// Module widths at most (docs/limits.md): each module holds about 2 * max(layer_structure) * width^2 weights.
constexpr int64_t kMaxHypernetworkWidth = 8192;
constexpr size_t kMaxHypernetworkWidths = 16;

struct HypernetworkTrainOptions {
  std::vector<double> layer_structure{1.0, 2.0, 1.0};
  std::string activation = "linear";      // A1111's names ("linear" = none, "swish" = Hardswish, ...)
  std::string weight_init = "Normal";     // Normal | XavierUniform | XavierNormal | KaimingUniform | KaimingNormal
  bool layer_norm = false;                // add_layer_norm
  bool use_dropout = false;               // with no dropout_structure: parse_dropout_structure's 0.3 layers
  std::vector<double> dropout_structure;  // one probability per layer_structure entry (wins over use_dropout)
  bool last_layer_dropout = false;
  bool activate_output = false;
  std::vector<int64_t> widths;  // empty = the model's attention widths (attention_widths)
  // InvalidArgument naming the option (--layer-structure, --activation, --weight-init, --dropout-structure,
  // --hypernetwork-widths), the rule and the value.
  void validate() const;
  // The file's fields (HypernetworkConfig) these options give.
  models::HypernetworkConfig config() const;
};

// The widths the UNet's attention layers read keys and values from (in_features of every to_k): the
// cross-attention width(s) first, then the others ascending; each once.
std::vector<int64_t> attention_widths(torch::nn::Module& unet);

// A1111's initialisation of a fresh hypernetwork (HypernetworkModule.__init__ without a state dict), drawing
// from gen in the order of the header comment. weight_init as A1111 names it; KeyError there, InvalidArgument here.
void init_hypernetwork(models::Hypernetwork& hn, const std::string& weight_init, at::Generator& gen);

class HypernetworkRecipe : public Recipe {
 public:
  HypernetworkRecipe(std::shared_ptr<loaders::StableDiffusionModels> m, HypernetworkTrainOptions o);
  ~HypernetworkRecipe() override;
  std::string name() const override { return "hypernetwork"; }
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;  // "hypernetwork.<width>.<k|v>.linear.<i>.*"
  void train_mode(bool on) override;
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  // .pt (A1111's torch.save dict) or .safetensors by the extension (loaders::save_hypernetwork), with 'step' =
  // the run's --steps and 'name' = the output's stem.
  void save(const std::string& path) override;
  io::TensorMap extra_state() override;  // the dropout generator
  void load_extra_state(const io::TensorMap& s) override;
  models::Hypernetwork& hypernetwork() { return hn_; }

 private:
  HypernetworkTrainOptions o_;
  models::Hypernetwork hn_{nullptr};
  at::Generator dropout_gen_;
  std::unique_ptr<models::ScopedHypernetworks> guard_;
  at::ScalarType unet_dtype_ = at::kFloat;
  int64_t steps_ = 0;
};
}  // namespace dmx::training
