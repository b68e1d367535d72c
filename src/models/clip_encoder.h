// The transformer encoder CLIP's text and vision towers share (transformers 4.37 modeling_clip.py:
// CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPEncoder), with its state-dict key names
// (encoder.layers.N.self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1/fc2, layer_norm2).
// Internal header of the models layer.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <vector>

#include "nn/lora.h"

namespace dmx::models {

// The encoder fields of transformers' CLIPTextConfig and CLIPVisionConfig.
struct CLIPEncoderOptions {
  int hidden_size = 768;
  int intermediate_size = 3072;
  int num_hidden_layers = 12;
  int num_attention_heads = 12;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;
};

// Multi-head self-attention: q scaled by head_dim^-0.5 before q k^T, as transformers does.
struct CLIPAttentionImpl : torch::nn::Module {
  CLIPAttentionImpl(int hidden, int heads);
  // x: [B, N, C]; mask: additive [N, N] (the text tower's causal mask) or undefined (the vision tower).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& mask);
  int64_t heads, head_dim;
  double scale;
  nn::LoRALinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(CLIPAttention);

// fc1 -> quick_gelu (x * sigmoid(1.702 x)) or exact gelu -> fc2.
struct CLIPMLPImpl : torch::nn::Module {
  CLIPMLPImpl(int hidden, int intermediate, bool quick_gelu);
  at::Tensor forward(const at::Tensor& x);
  bool quick_gelu;
  nn::LoRALinear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CLIPMLP);

// Pre-LN residual block: x + attn(ln1(x)), then h + mlp(ln2(h)).
struct CLIPEncoderLayerImpl : torch::nn::Module {
  explicit CLIPEncoderLayerImpl(const CLIPEncoderOptions& o);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& mask);
  CLIPAttention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  CLIPMLP mlp{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

struct CLIPEncoderImpl : torch::nn::Module {
  explicit CLIPEncoderImpl(const CLIPEncoderOptions& o);
  torch::nn::ModuleList layers{nullptr};
  std::vector<CLIPEncoderLayer> list;
};
TORCH_MODULE(CLIPEncoder);

// InvalidArgument naming the field (prefixed by `what`) when a size is not positive, hidden_size is not
// divisible by num_attention_heads, hidden_act is unknown or layer_norm_eps is not positive.
void validate_clip_encoder(const CLIPEncoderOptions& o, const std::string& what);

// The number of parameters of the encoder's layers (a double: a malformed config may describe more than int64 holds;
// exact below 2^53).
double clip_encoder_parameter_count(const CLIPEncoderOptions& o);
}  // namespace dmx::models
