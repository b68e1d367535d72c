// LoRA-capable layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with the
// LyCORIS variants LoHa (Hyeon-Woo et al. 2022, FedPara Hadamard product) and LoKr (Kronecker product), and
// DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"). Mirrors peft 0.10 tuners/lora/layer.py
// (Linear / Conv2d: runtime `base(x) + lora_B(lora_A(x)) * scaling`, merge `W += B @ A * scaling`, DoRA
// `m / ||W + s dW|| * (W + s dW)`), and LyCORIS modules/{locon,loha,lokr}.py for the other kinds.
//
// LoRALinear / LoRAConv2d are torch::nn::Linear / Conv2d with the same parameters and state-dict names and,
// with no adapter attached, the very same forward. Attached adapters act in one of two modes:
//   runtime: y = W x + b + sum_i contribution_i(x) (the base weight is untouched);
//   merged:  the weight is patched (float32 math) and forward is the plain layer; unmerge restores the
//            original weight bit for bit from a saved copy (never by subtraction).
// Internal header of the nn layer.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <vector>

namespace dmx::nn {

enum class LoRAKind {
  LoRA,  // up @ down (LoCon for convolutions; optional Tucker `mid` core)
  LoHa,  // (w1a @ w1b) * (w2a @ w2b), optional Tucker cores t1 / t2
  LoKr,  // kron(w1, w2), w1 / w2 full or factorised (a @ b), optional Tucker core t2
  Full,  // a full weight difference (LyCORIS `diff`)
};

enum class DoRAStyle {
  None,
  PEFT,     // lora_magnitude_vector m [out]: W' = m / ||W + s*dW||_row * (W + s*dW)
  LyCORIS,  // dora_scale m [out,1,..] or [1,in,..]: W' = W + s * ((W + dW) * m / (||W + dW|| + eps) - W)
};

// One adapter of one layer, as read from a file. Tensors are in the layer's dtype and device; the shapes
// follow the layer (down [r, in] / [r, in, kh, kw], up [out, r] / [out, r, 1, 1], ...).
struct LoRAAdapter {
  std::string source;  // file (or name) it came from, for messages
  LoRAKind kind = LoRAKind::LoRA;
  double scale = 1.0;        // the user's multiplier (diffusers' cross_attention_kwargs scale / lora_scale)
  double alpha_scale = 1.0;  // alpha / rank as the format defines it (1 without alpha)
  at::Tensor down, up, mid;  // LoRA
  at::Tensor w1a, w1b, w2a, w2b, t1, t2;  // LoHa (hada_*) and LoKr (lokr_*: w1 = w1a when w1b undefined)
  at::Tensor diff;                        // Full
  DoRAStyle dora = DoRAStyle::None;
  at::Tensor magnitude;  // DoRA m
};

// The adapters of one layer and, while merged, the exact weight they replaced.
struct LoRAState {
  std::vector<std::shared_ptr<const LoRAAdapter>> adapters;
  at::Tensor original_weight;               // defined while merged
  std::vector<at::Tensor> runtime_weights;  // cached full contributions for non-low-rank runtime adapters
  bool merged() const { return original_weight.defined(); }
};

// The adapter's weight difference dW (alpha_scale applied, user scale not), float32, shaped like `weight_shape`.
at::Tensor lora_delta_weight(const LoRAAdapter& a, at::IntArrayRef weight_shape);
// What the adapter adds to the original weight W0 (float32), user scale and DoRA included:
// W0 + lora_contribution(a, W0) is the adapted weight.
at::Tensor lora_contribution(const LoRAAdapter& a, const at::Tensor& w0_float);

// Conv geometry the adapters of a convolution reuse (the base layer's own).
struct ConvGeometry {
  std::vector<int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};
  int64_t groups = 1;
};

// Attaching and merging. Attaching to or clearing a merged layer first unmerges it.
void lora_attach(LoRAState& s, at::Tensor& weight, std::shared_ptr<const LoRAAdapter> a);
void lora_clear(LoRAState& s, at::Tensor& weight);
void lora_merge(LoRAState& s, at::Tensor& weight);    // no-op when merged or without adapters
void lora_unmerge(LoRAState& s, at::Tensor& weight);  // restores the saved weight bit for bit

// Runtime term: sum of the adapters' contributions for input x (undefined if none / merged).
at::Tensor lora_runtime_linear(LoRAState& s, const at::Tensor& weight, const at::Tensor& bias_or_undef,
                               const at::Tensor& x, const at::Tensor& base_out);
at::Tensor lora_runtime_conv2d(LoRAState& s, const at::Tensor& weight, const at::Tensor& bias_or_undef,
                               const ConvGeometry& g, const at::Tensor& x, const at::Tensor& base_out);

// torch::nn::Linear with LoRA adapters.
class LoRALinearImpl : public torch::nn::LinearImpl {
 public:
  using torch::nn::LinearImpl::LinearImpl;
  at::Tensor forward(const at::Tensor& x);  // [.., in] -> [.., out]
  LoRAState lora;
};
TORCH_MODULE(LoRALinear);

// torch::nn::Conv2d with LoRA adapters (LoCon).
class LoRAConv2dImpl : public torch::nn::Conv2dImpl {
 public:
  using torch::nn::Conv2dImpl::Conv2dImpl;
  at::Tensor forward(const at::Tensor& x);  // [B, in, H, W] -> [B, out, H', W']
  ConvGeometry geometry() const;
  LoRAState lora;
};
TORCH_MODULE(LoRAConv2d);

}  // namespace dmx::nn
