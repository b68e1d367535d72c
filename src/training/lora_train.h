// Trainable LoRA adapters (Hu et al. 2021) on the UNet and optionally the CLIP text encoder, and the
// `dmx train lora` recipe. Mirrors diffusers 0.27.2 examples/text_to_image/train_text_to_image_lora.py and
// dreambooth/train_dreambooth_lora.py (peft LoraConfig on to_q/to_k/to_v/to_out.0, text encoder
// q_proj/k_proj/v_proj/out_proj) and kohya sd-scripts networks/lora.py (all Linear / Conv2d layers of the
// down/mid/up blocks with "all"; alpha / rank scaling).
//
// Initialisation as peft's default (init_lora_weights=True) and kohya: down (lora_A) kaiming-uniform with
// a = sqrt(5) (bound 1 / sqrt(fan_in)), up (lora_B) zeros, so a fresh adapter leaves the model unchanged;
// "gaussian" (diffusers' training scripts) draws down ~ N(0, 1/r). Draws come from a CPU generator seeded
// with the run's seed, layer by layer in module order (UNet, then text encoder), down before up.
//
// Layouts written (every pair attaches to a layer of the model, checked by dmx's loader):
//   diffusers: unet.<module>.lora.{down,up}.weight, text_encoder.<module>.lora_linear_layer.{down,up}.weight
//              (what diffusers 0.27.2 save_lora_weights writes and load_lora_weights reads); alpha / r is
//              folded into `up` (diffusers files carry no alpha).
//   peft:      unet.<module>.lora_{A,B}.weight, text_encoder.<module>.lora_{A,B}.weight, alpha / r folded
//              into lora_B, plus adapter_config.json beside the file (r, lora_alpha = r, target_modules).
//   kohya:     lora_unet_<module with _>.lora_{down,up}.weight + .alpha, lora_te_<...> for the text
//              encoder (sd-scripts / A1111), up unscaled.
// Internal header of the training layer.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "loaders/lora_formats.h"
#include "loaders/model_bundle.h"
#include "nn/lora.h"
#include "training/trainer.h"

namespace dmx::training {

// LoRA rank limit (docs/limits.md): the adapters' size grows with rank x (in + out) per layer.
constexpr int kMaxLoRARank = 1024;

struct LoRATrainOptions {
  int rank = 4;
  double alpha = 0.0;                 // 0 = rank (scale 1, as diffusers' scripts)
  std::string targets = "attention";  // attention | all (every Linear / Conv2d of the down/mid/up blocks)
  bool train_text_encoder = false;
  std::string text_encoder_targets = "attention";  // attention (q/k/v/out_proj) | all (+ fc1, fc2)
  std::string init = "kaiming";                    // kaiming (peft / kohya default) | gaussian
  void validate() const;                           // InvalidArgument naming --rank / --alpha / --lora-targets
};

enum class LoRASaveFormat { Diffusers, PEFT, Kohya };
LoRASaveFormat parse_lora_save_format(const std::string& s);  // diffusers | peft | kohya (--save-format)

// One adapted layer.
struct TrainableLoRALayer {
  loaders::LoRAComponent component = loaders::LoRAComponent::UNet;
  std::string module;  // diffusers module path inside its component
  bool conv = false;
  int64_t in = 0, out = 0, kh = 1, kw = 1;
  at::Tensor down, up;                       // float32 masters: [r, in] / [r, in, kh, kw], [out, r] / [out, r, 1, 1]
  std::shared_ptr<nn::LoRAAdapter> adapter;  // attached to the layer (runtime mode)
};

class LoRANetwork {
 public:
  // Attaches fresh adapters to the selected layers of m (UNet, and the text encoder when asked).
  // Layers that already carry adapters: InvalidArgument.
  LoRANetwork(loaders::StableDiffusionModels& m, const LoRATrainOptions& o, uint64_t seed);
  ~LoRANetwork();  // detaches the adapters
  LoRANetwork(const LoRANetwork&) = delete;
  LoRANetwork& operator=(const LoRANetwork&) = delete;

  const std::vector<TrainableLoRALayer>& layers() const { return layers_; }
  std::vector<NamedParameter> parameters() const;  // "<unet|text_encoder>.<module>.lora_{down,up}"
  int64_t num_parameters() const;
  // Points the attached adapters at the masters (float32) or at differentiable copies in `dtype`.
  void refresh(at::ScalarType unet_dtype, at::ScalarType text_encoder_dtype);
  double alpha() const { return alpha_; }
  int rank() const { return rank_; }
  io::TensorMap state_dict(LoRASaveFormat f) const;
  // Writes `path` atomically (and adapter_config.json beside it for peft).
  void save(const std::string& path, LoRASaveFormat f) const;
  void detach();

 private:
  loaders::StableDiffusionModels* m_;
  std::vector<TrainableLoRALayer> layers_;
  int rank_;
  double alpha_;
  LoRATrainOptions o_;
  bool attached_ = false;
};

// The formula the tests check: sum over adapted layers of r * (in + out) (linear) or
// r * (in * kh * kw + out) (conv).
int64_t lora_parameter_formula(const std::vector<TrainableLoRALayer>& layers, int rank);

// `dmx train lora` (and DreamBooth's LoRA mode).
class LoRARecipe : public Recipe {
 public:
  LoRARecipe(std::shared_ptr<loaders::StableDiffusionModels> m, LoRATrainOptions o, LoRASaveFormat fmt);
  std::string name() const override { return "lora"; }
  void setup(const TrainConfig& cfg) override;
  std::vector<NamedParameter> trainable_parameters() override;
  void train_mode(bool on) override;
  bool text_encoder_trainable() const override { return o_.train_text_encoder; }
  at::Tensor encode_prompt(const Batch& batch) override;
  at::Tensor predict(const at::Tensor& noisy_latents, const at::Tensor& timesteps,
                     const at::Tensor& encoder_hidden_states, const Batch& batch) override;
  void save(const std::string& path) override;
  // The base model with the adapters' float32 masters (the trainer runs validation in float32).
  void validate(const TrainConfig& cfg, int64_t step, const std::string& out_dir) override;
  LoRANetwork& network() { return *net_; }

 private:
  LoRATrainOptions o_;
  LoRASaveFormat fmt_;
  std::unique_ptr<LoRANetwork> net_;
  at::ScalarType unet_dtype_ = at::kFloat, te_dtype_ = at::kFloat;
  bool checkpointing_ = false;
};

// Freezes every parameter of a module (requires_grad false).
void freeze(torch::nn::Module& m);
// Casts the frozen parts for --mixed-precision bf16 (VAE and text encoder; the UNet too when `unet`).
void cast_frozen_for_mixed_precision(loaders::StableDiffusionModels& m, bool unet, bool text_encoder);
// The recipes that train an add-on beside a frozen base (LoRA, ControlNet, T2I-Adapter, hypernetwork): freezes the
// UNet, VAE and text encoder, casts all three to bf16 under --mixed-precision bf16, and returns the UNet's dtype.
at::ScalarType freeze_base_models(loaders::StableDiffusionModels& m, const TrainConfig& cfg);
// The recipes that train LoRA adapters on the blocks of a frozen UNet beside parts of their own (SpaText, scene):
// freezes the three models, casts the VAE and text encoder to bf16 and sets autocast_bf16 under --mixed-precision bf16
// (the UNet stays float32 and runs under autocast: unet_forward_autocast), turns on gradient checkpointing when asked,
// and attaches the adapters (seeded with cfg.seed).
std::unique_ptr<LoRANetwork> frozen_base_with_lora(loaders::StableDiffusionModels& m, const TrainConfig& cfg,
                                                   const LoRATrainOptions& o, bool& autocast_bf16);
// unet(in), under bf16 autocast when `autocast_bf16` (the result as float32).
at::Tensor unet_forward_autocast(models::UNet2DConditionModel& unet, const models::UNetInputs& in, bool autocast_bf16);
}  // namespace dmx::training
