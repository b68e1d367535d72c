// CLIP's transformer encoder (clip_encoder.h): mirrors transformers 4.37 modeling_clip.py op for op.
#include "models/clip_encoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "dmx/error.h"

namespace dmx::models {
namespace tnn = torch::nn;

void validate_clip_encoder(const CLIPEncoderOptions& o, const std::string& what) {
  // Ranges (docs/limits.md): every CLIP tower of the Stable Diffusion and unCLIP families fits well inside.
  auto range = [&](const char* name, int v, int lo, int hi) {
    DMX_CHECK_ARG(v >= lo && v <= hi, what, ": ", name, " must be in [", lo, ", ", hi, "], got ", v,
                  v < lo ? "" : " (limits: docs/limits.md)");
  };
  range("hidden_size", o.hidden_size, 1, 8192);
  range("intermediate_size", o.intermediate_size, 1, 32768);
  range("num_hidden_layers", o.num_hidden_layers, 1, 128);
  range("num_attention_heads", o.num_attention_heads, 1, std::max(1, o.hidden_size));
  DMX_CHECK_ARG(o.hidden_size % o.num_attention_heads == 0, what, ": hidden_size must be divisible by ",
                "num_attention_heads, got hidden_size ", o.hidden_size, " and num_attention_heads ",
                o.num_attention_heads);
  DMX_CHECK_ARG(o.hidden_act == "quick_gelu" || o.hidden_act == "gelu", what,
                ": hidden_act must be \"quick_gelu\" or \"gelu\", got \"", o.hidden_act, "\"");
  DMX_CHECK_ARG(std::isfinite(o.layer_norm_eps) && o.layer_norm_eps > 0, what, ": layer_norm_eps must be > 0, got ",
                o.layer_norm_eps);
}

double clip_encoder_parameter_count(const CLIPEncoderOptions& o) {
  const double h = o.hidden_size, i = o.intermediate_size;
  // q, k, v, out projections with biases; fc1, fc2 with biases; two layer norms.
  const double layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * (2 * h);
  return o.num_hidden_layers * layer;
}

CLIPAttentionImpl::CLIPAttentionImpl(int hidden, int heads) : heads(heads), head_dim(hidden / heads) {
  scale = std::pow(static_cast<double>(head_dim), -0.5);
  k_proj = register_module("k_proj", nn::LoRALinear(hidden, hidden));
  v_proj = register_module("v_proj", nn::LoRALinear(hidden, hidden));
  q_proj = register_module("q_proj", nn::LoRALinear(hidden, hidden));
  out_proj = register_module("out_proj", nn::LoRALinear(hidden, hidden));
}

at::Tensor CLIPAttentionImpl::forward(const at::Tensor& x, const at::Tensor& mask) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  auto heads_first = [&](const at::Tensor& t) { return t.view({B, N, heads, head_dim}).transpose(1, 2); };
  at::Tensor q = heads_first(q_proj(x) * scale);  // [B, H, N, d]; scaled before the product, like transformers
  at::Tensor k = heads_first(k_proj(x));
  at::Tensor v = heads_first(v_proj(x));
  at::Tensor w = at::matmul(q, k.transpose(-1, -2));  // [B, H, N, N]
  if (mask.defined()) w = w + mask;
  at::Tensor p = at::softmax(w, -1);
  at::Tensor o = at::matmul(p, v);           // [B, H, N, d]
  o = o.transpose(1, 2).reshape({B, N, C});  // [B, N, C]
  return out_proj(o);
}

CLIPMLPImpl::CLIPMLPImpl(int hidden, int intermediate, bool quick_gelu) : quick_gelu(quick_gelu) {
  fc1 = register_module("fc1", nn::LoRALinear(hidden, intermediate));
  fc2 = register_module("fc2", nn::LoRALinear(intermediate, hidden));
}

at::Tensor CLIPMLPImpl::forward(const at::Tensor& x) {
  at::Tensor h = fc1(x);  // [B, N, intermediate]
  h = quick_gelu ? h * at::sigmoid(h * 1.702) : at::gelu(h);
  return fc2(h);
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPEncoderOptions& o) {
  self_attn = register_module("self_attn", CLIPAttention(o.hidden_size, o.num_attention_heads));
  layer_norm1 =
      register_module("layer_norm1", tnn::LayerNorm(tnn::LayerNormOptions({o.hidden_size}).eps(o.layer_norm_eps)));
  mlp = register_module("mlp", CLIPMLP(o.hidden_size, o.intermediate_size, o.hidden_act == "quick_gelu"));
  layer_norm2 =
      register_module("layer_norm2", tnn::LayerNorm(tnn::LayerNormOptions({o.hidden_size}).eps(o.layer_norm_eps)));
}

at::Tensor CLIPEncoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& mask) {
  at::Tensor h = x + self_attn(layer_norm1(x), mask);  // pre-LN residual blocks
  return h + mlp(layer_norm2(h));
}

CLIPEncoderImpl::CLIPEncoderImpl(const CLIPEncoderOptions& o) {
  layers = register_module("layers", tnn::ModuleList());
  for (int i = 0; i < o.num_hidden_layers; ++i) {
    auto layer = CLIPEncoderLayer(o);
    layers->push_back(layer);
    list.push_back(layer);
  }
}
}  // namespace dmx::models
