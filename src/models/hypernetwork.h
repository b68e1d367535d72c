// Hypernetworks as AUTOMATIC1111 (and NovelAI before it) run them: per context width, a pair of small MLPs (k,
// v) that transform the inputs of every attention layer's key and value projections,
//   k = to_k(x + mlp_k(x) * multiplier),  v = to_v(x + mlp_v(x) * multiplier),
// where x is what the projections read (the text for cross-attention, the layer's normalised input for
// self-attention) and the pair is chosen by x's width alone. Mirrors AUTOMATIC1111/stable-diffusion-webui
// modules/hypernetworks/hypernetwork.py (HypernetworkModule, parse_dropout_structure, Hypernetwork.load,
// apply_single_hypernetwork, apply_hypernetworks). diffusers has no hypernetworks; these run on diffusers'
// UNet through the attention seam (nn/attention_seam.h: an AttentionInputHook), queries untouched.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "nn/attention_seam.h"

namespace dmx::models {

// The fields of A1111's file (Hypernetwork.save's dict), with the defaults Hypernetwork.load applies when a
// key is missing.
struct HypernetworkConfig {
  std::vector<double> layer_structure{1.0, 2.0, 1.0};  // widths as multiples of the context width
  std::string activation_func;                         // "" = None; A1111's names ("swish" = Hardswish)
  bool is_layer_norm = false;                          // LayerNorm after every Linear
  bool activate_output = true;                         // the activation after the last Linear too
  bool use_dropout = false;
  std::vector<double> dropout_structure;  // empty = derived from use_dropout / last_layer_dropout
  bool last_layer_dropout = false;
  // Informational (kept, never used to compute).
  std::string name;
  int64_t step = 0;
  std::string weight_initialization = "Normal";
  std::string sd_checkpoint, sd_checkpoint_name;

  // The file's non-tensor fields as JSON (`.pt` dict values, or the `.safetensors` metadata parsed); a field
  // of the wrong type is a FormatError naming it. Unknown fields are ignored, as A1111 does.
  static HypernetworkConfig from_json(const nlohmann::json& fields);
  // Hypernetwork.load: the stored dropout_structure, else parse_dropout_structure(layer_structure,
  // use_dropout, last_layer_dropout). One value per layer_structure entry.
  std::vector<double> effective_dropout_structure() const;
  // A1111's asserts: layer_structure starts and ends with 1 and has >= 2 entries; dropout probabilities in
  // [0, 1). InvalidArgument naming the field.
  void validate() const;
};

// The activations a hypernetwork may name: A1111's activation_dict ("linear" = identity, "swish" = Hardswish,
// and every torch.nn activation class in lower case with its default arguments). Parameterless except
// "prelu" (one learned slope). Softmax-like classes (dim-dependent) and those needing arguments are refused.
std::vector<std::string> hypernetwork_activation_names();

// One module (k or v) of one width: A1111's HypernetworkModule. Its Sequential keeps A1111's indices, so the
// state-dict keys are linear.<index>.weight/bias, the activation and dropout taking an index without
// parameters. forward(x) = x + linear(x) * multiplier in eval mode (dropout off: inference); in training mode
// x + linear(x) with dropout on and the multiplier 1, as A1111's forward
// (`self.multiplier if not self.training else 1`). Modules are built in eval mode, as A1111's Hypernetwork.__init__
// leaves them.
class HypernetworkModuleImpl : public torch::nn::Module {
 public:
  HypernetworkModuleImpl(int64_t dim, const HypernetworkConfig& cfg);
  at::Tensor forward(const at::Tensor& x, double multiplier);  // [.., dim] -> [.., dim]
  int64_t dim() const { return dim_; }
  // Where training-mode dropout draws its masks (torch.nn.Dropout: keep with probability 1 - p, scale the kept
  // values by 1 / (1 - p)); null = the default generator. Not owned.
  void set_dropout_generator(at::Generator* gen) { dropout_gen_ = gen; }
  // The Sequential as A1111 builds it, one torch.nn class name per index ("Linear", "Hardswish", "LayerNorm",
  // "Dropout", ...).
  const std::vector<std::string>& layer_kinds() const { return kinds_; }

 private:
  int64_t dim_;
  std::vector<std::string> kinds_;
  std::vector<std::shared_ptr<torch::nn::Module>> layers_;  // parameterised entries; nullptr otherwise
  std::vector<at::Tensor (*)(const at::Tensor&)> fns_;      // parameterless activations; nullptr otherwise
  std::vector<double> dropout_p_;                           // Dropout entries: p; 0 otherwise
  at::Generator* dropout_gen_ = nullptr;
};
TORCH_MODULE(HypernetworkModule);

// A hypernetwork: one (k, v) module pair per context width. Parameters are named "<dim>.k.linear.<i>.*" /
// "<dim>.v.linear.<i>.*" (the .safetensors layout of FIXTURES.md).
class HypernetworkImpl : public torch::nn::Module {
 public:
  // The modules in the order of `widths` (A1111's enable_sizes order: the order of the saved dict and of
  // named_parameters()).
  HypernetworkImpl(const HypernetworkConfig& cfg, const std::vector<int64_t>& widths);
  const HypernetworkConfig& config() const { return cfg_; }
  std::vector<int64_t> widths() const;  // ascending
  const std::vector<int64_t>& width_order() const { return order_; }
  // The informational fields a save records (they never change what the modules compute).
  void set_record(const std::string& name, int64_t step, const std::string& sd_checkpoint_name);
  void set_dropout_generator(at::Generator* gen);
  bool has_width(int64_t dim) const { return modules_.count(dim) != 0; }
  HypernetworkModule& k(int64_t dim);
  HypernetworkModule& v(int64_t dim);
  // A1111's apply_single_hypernetwork: the pair for key.size(-1), when there is one; else unchanged.
  nn::KeyValueInputs apply(nn::KeyValueInputs in, double multiplier);

 private:
  HypernetworkConfig cfg_;
  std::map<int64_t, std::pair<HypernetworkModule, HypernetworkModule>> modules_;
  std::vector<int64_t> order_;
};
TORCH_MODULE(Hypernetwork);

// A hypernetwork from its tensors and fields. Tensor names "<dim>.<k|v|0|1>.<module key>": "k"/"v" is the
// .safetensors layout, "0"/"1" what a flattened torch.save of A1111's dict gives ({dim: (k_sd, v_sd)}); old
// NovelAI keys linear1/linear2 mean linear.0/linear.1 (A1111's fix_old_state_dict). Strict: a missing,
// unexpected or mis-shaped tensor is a FormatError listing them all.
Hypernetwork hypernetwork_from_state_dict(const io::TensorMap& tensors, const HypernetworkConfig& cfg,
                                          const std::string& what);

// The attention seam's input hook for one hypernetwork at one multiplier: every attention layer whose
// key/value input width has a module pair. Several hooks installed in order chain as A1111's
// apply_hypernetworks does. The modules run in their own dtype (A1111's cond_cast_float) and the result is
// cast back to the input's.
class HypernetworkHook : public nn::AttentionInputHook {
 public:
  HypernetworkHook(Hypernetwork hypernetwork, double multiplier);
  nn::KeyValueInputs on_key_value_inputs(const nn::AttentionSite& site, const nn::AttentionContext& ctx,
                                         nn::KeyValueInputs in) override;

 private:
  Hypernetwork hn_;
  double multiplier_;
};

// Installs hypernetworks (each with its multiplier, applied in the order given) on a model's attention layers
// for the guard's lifetime; the model is as before afterwards.
class ScopedHypernetworks {
 public:
  ScopedHypernetworks(torch::nn::Module& root, const std::vector<std::pair<Hypernetwork, double>>& hypernetworks);
  ScopedHypernetworks(const ScopedHypernetworks&) = delete;
  ScopedHypernetworks& operator=(const ScopedHypernetworks&) = delete;

 private:
  std::vector<std::unique_ptr<nn::ScopedAttentionInputHook>> guards_;
};
}  // namespace dmx::models
