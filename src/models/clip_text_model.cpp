// CLIP text encoder: mirrors transformers 4.37 modeling_clip.py (CLIPTextEmbeddings, CLIPAttention,
// CLIPMLP, CLIPEncoderLayer, CLIPEncoder, CLIPTextTransformer, CLIPTextModel).
#include "models/clip_text_model.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "dmx/error.h"
#include "models/config_json.h"
#include "nn/layers.h"
#include "nn/lora.h"

namespace dmx::models {
namespace nn = torch::nn;

// ---------------------------------------------------------------- config

namespace {
template <typename T>
T json_field(const nlohmann::json& j, const char* key, T fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const auto& v = j[key];
  if constexpr (std::is_same_v<T, std::string>) {
    DMX_CHECK_FORMAT(v.is_string(), "CLIP text config: ", key, " must be a string, got ", v.dump());
    return v.get<std::string>();
  } else if constexpr (std::is_floating_point_v<T>) {
    DMX_CHECK_FORMAT(v.is_number(), "CLIP text config: ", key, " must be a number, got ", v.dump());
    return v.get<T>();
  } else {
    DMX_CHECK_FORMAT(v.is_number_integer(), "CLIP text config: ", key, " must be an integer, got ", v.dump());
    return cfgjson::exact_int<T>(v, "CLIP text config", key);  // within T's range, no silent wrap
  }
}
}  // namespace

CLIPTextConfig CLIPTextConfig::from_json(const nlohmann::json& root) {
  DMX_CHECK_FORMAT(root.is_object(), "CLIP text config must be a JSON object");
  const nlohmann::json& j =
      root.contains("text_config") && root["text_config"].is_object() ? root["text_config"] : root;
  CLIPTextConfig c;  // transformers' CLIPTextConfig defaults for absent fields
  c.vocab_size = json_field(j, "vocab_size", 49408);
  c.hidden_size = json_field(j, "hidden_size", 512);
  c.intermediate_size = json_field(j, "intermediate_size", 2048);
  c.projection_dim = json_field(j, "projection_dim", 512);
  c.num_hidden_layers = json_field(j, "num_hidden_layers", 12);
  c.num_attention_heads = json_field(j, "num_attention_heads", 8);
  c.max_position_embeddings = json_field(j, "max_position_embeddings", 77);
  c.hidden_act = json_field<std::string>(j, "hidden_act", "quick_gelu");
  c.layer_norm_eps = json_field(j, "layer_norm_eps", 1e-5);
  c.pad_token_id = json_field<int64_t>(j, "pad_token_id", 1);
  c.bos_token_id = json_field<int64_t>(j, "bos_token_id", 49406);
  c.eos_token_id = json_field<int64_t>(j, "eos_token_id", 49407);
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(e.what());
  }
  return c;
}

CLIPTextConfig CLIPTextConfig::sd15() {
  CLIPTextConfig c;
  c.vocab_size = 49408;
  c.hidden_size = 768;
  c.intermediate_size = 3072;
  c.num_hidden_layers = 12;
  c.num_attention_heads = 12;
  c.max_position_embeddings = 77;
  c.hidden_act = "quick_gelu";
  c.layer_norm_eps = 1e-5;
  c.bos_token_id = 0;
  c.eos_token_id = 2;
  c.pad_token_id = 1;
  c.projection_dim = 768;
  return c;
}

CLIPTextConfig CLIPTextConfig::sd21() {
  CLIPTextConfig c = sd15();
  c.hidden_size = 1024;
  c.intermediate_size = 4096;
  c.num_hidden_layers = 23;
  c.num_attention_heads = 16;
  c.hidden_act = "gelu";
  c.projection_dim = 512;
  return c;
}

void CLIPTextConfig::validate() const {
  // Ranges (docs/limits.md): every CLIP text encoder of the Stable Diffusion family fits well inside.
  auto range = [](const char* name, int v, int lo, int hi) {
    DMX_CHECK_ARG(v >= lo && v <= hi, "CLIP text config: ", name, " must be in [", lo, ", ", hi, "], got ", v,
                  v < lo ? "" : " (limits: docs/limits.md)");
  };
  range("vocab_size", vocab_size, 1, 1000000);
  range("hidden_size", hidden_size, 1, 8192);
  range("intermediate_size", intermediate_size, 1, 32768);
  range("num_hidden_layers", num_hidden_layers, 1, 128);
  range("num_attention_heads", num_attention_heads, 1, std::max(1, hidden_size));
  range("max_position_embeddings", max_position_embeddings, 1, 8192);
  range("projection_dim", projection_dim, 0, 8192);
  DMX_CHECK_ARG(hidden_size % num_attention_heads == 0, "CLIP text config: hidden_size must be divisible by ",
                "num_attention_heads, got hidden_size ", hidden_size, " and num_attention_heads ", num_attention_heads);
  DMX_CHECK_ARG(hidden_act == "quick_gelu" || hidden_act == "gelu",
                "CLIP text config: hidden_act must be \"quick_gelu\" or \"gelu\", got \"", hidden_act, "\"");
  DMX_CHECK_ARG(std::isfinite(layer_norm_eps) && layer_norm_eps > 0, "CLIP text config: layer_norm_eps must be > 0, got ",
                layer_norm_eps);
  cfgjson::check_parameter_count("the CLIP text config", parameter_count());
}

double CLIPTextConfig::parameter_count() const {
  namespace pc = dmx::nn::param_count;
  const double h = hidden_size, i = intermediate_size;
  const double layer = 4 * pc::linear(h, h) + 2 * pc::norm(h) + pc::linear(h, i) + pc::linear(i, h);
  return (static_cast<double>(vocab_size) + max_position_embeddings) * h + num_hidden_layers * layer + pc::norm(h);
}

// ---------------------------------------------------------------- modules

namespace {

struct CLIPAttentionImpl : nn::Module {
  CLIPAttentionImpl(int hidden, int heads) : heads(heads), head_dim(hidden / heads) {
    scale = std::pow(static_cast<double>(head_dim), -0.5);
    k_proj = register_module("k_proj", dmx::nn::LoRALinear(hidden, hidden));
    v_proj = register_module("v_proj", dmx::nn::LoRALinear(hidden, hidden));
    q_proj = register_module("q_proj", dmx::nn::LoRALinear(hidden, hidden));
    out_proj = register_module("out_proj", dmx::nn::LoRALinear(hidden, hidden));
  }
  // x: [B, N, C]; causal_mask: [N, N], 0 on and below the diagonal, the dtype's lowest value above.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& causal_mask) {
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
    auto heads_first = [&](const at::Tensor& t) { return t.view({B, N, heads, head_dim}).transpose(1, 2); };
    at::Tensor q = heads_first(q_proj(x) * scale);  // [B, H, N, d]; scaled before the product, like transformers
    at::Tensor k = heads_first(k_proj(x));
    at::Tensor v = heads_first(v_proj(x));
    at::Tensor w = at::matmul(q, k.transpose(-1, -2)) + causal_mask;  // [B, H, N, N]
    at::Tensor p = at::softmax(w, -1);
    at::Tensor o = at::matmul(p, v);           // [B, H, N, d]
    o = o.transpose(1, 2).reshape({B, N, C});  // [B, N, C]
    return out_proj(o);
  }
  int64_t heads, head_dim;
  double scale;
  dmx::nn::LoRALinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(CLIPAttention);

struct CLIPMLPImpl : nn::Module {
  CLIPMLPImpl(int hidden, int intermediate, bool quick_gelu) : quick_gelu(quick_gelu) {
    fc1 = register_module("fc1", dmx::nn::LoRALinear(hidden, intermediate));
    fc2 = register_module("fc2", dmx::nn::LoRALinear(intermediate, hidden));
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = fc1(x);  // [B, N, intermediate]
    h = quick_gelu ? h * at::sigmoid(h * 1.702) : at::gelu(h);
    return fc2(h);
  }
  bool quick_gelu;
  dmx::nn::LoRALinear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CLIPMLP);

struct CLIPEncoderLayerImpl : nn::Module {
  explicit CLIPEncoderLayerImpl(const CLIPTextConfig& c) {
    self_attn = register_module("self_attn", CLIPAttention(c.hidden_size, c.num_attention_heads));
    layer_norm1 =
        register_module("layer_norm1", nn::LayerNorm(nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
    mlp = register_module("mlp", CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act == "quick_gelu"));
    layer_norm2 =
        register_module("layer_norm2", nn::LayerNorm(nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
  }
  at::Tensor forward(const at::Tensor& x, const at::Tensor& causal_mask) {
    at::Tensor h = x + self_attn(layer_norm1(x), causal_mask);  // pre-LN residual blocks
    return h + mlp(layer_norm2(h));
  }
  CLIPAttention self_attn{nullptr};
  nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  CLIPMLP mlp{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

struct CLIPEncoderImpl : nn::Module {
  explicit CLIPEncoderImpl(const CLIPTextConfig& c) {
    layers = register_module("layers", nn::ModuleList());
    for (int i = 0; i < c.num_hidden_layers; ++i) {
      auto layer = CLIPEncoderLayer(c);
      layers->push_back(layer);
      list.push_back(layer);
    }
  }
  nn::ModuleList layers{nullptr};
  std::vector<CLIPEncoderLayer> list;
};
TORCH_MODULE(CLIPEncoder);

struct CLIPTextEmbeddingsImpl : nn::Module {
  explicit CLIPTextEmbeddingsImpl(const CLIPTextConfig& c) {
    token_embedding = register_module("token_embedding", nn::Embedding(c.vocab_size, c.hidden_size));
    position_embedding = register_module("position_embedding", nn::Embedding(c.max_position_embeddings, c.hidden_size));
    // transformers' position_ids is a non-persistent buffer: not registered, so strict loading matches.
  }
  nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
};
TORCH_MODULE(CLIPTextEmbeddings);

struct CLIPTextTransformerImpl : nn::Module {
  explicit CLIPTextTransformerImpl(const CLIPTextConfig& c) {
    embeddings = register_module("embeddings", CLIPTextEmbeddings(c));
    encoder = register_module("encoder", CLIPEncoder(c));
    final_layer_norm =
        register_module("final_layer_norm", nn::LayerNorm(nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
  }
  CLIPTextEmbeddings embeddings{nullptr};
  CLIPEncoder encoder{nullptr};
  nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(CLIPTextTransformer);

// [N, N] additive causal mask in dtype: 0 where key j <= query i, the dtype's lowest value where j > i
// (transformers' _create_4d_causal_attention_mask uses torch.finfo(dtype).min).
at::Tensor causal_mask(int64_t n, const at::TensorOptions& opts) {
  const double lowest = opts.dtype() == at::kBFloat16 ? -3.3895313892515355e38
                        : opts.dtype() == at::kHalf   ? -65504.0
                        : opts.dtype() == at::kDouble ? std::numeric_limits<double>::lowest()
                                                      : static_cast<double>(std::numeric_limits<float>::lowest());
  return at::full({n, n}, lowest, opts).triu(1);
}
}  // namespace

struct CLIPTextModelImpl::Parts {
  CLIPTextTransformer text_model{nullptr};
};

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& cfg) : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  parts_->text_model = register_module("text_model", CLIPTextTransformer(cfg_));
}

at::Tensor CLIPTextModelImpl::embed(const at::Tensor& input_ids) {
  DMX_CHECK_ARG(input_ids.defined() && input_ids.dim() == 2, "input_ids must be a [batch, tokens] tensor, got ",
                input_ids.defined() ? input_ids.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
                "input_ids must be int64 or int32, got ", input_ids.scalar_type());
  const int64_t n = input_ids.size(1);
  DMX_CHECK_ARG(n >= 1 && n <= cfg_.max_position_embeddings, "input_ids length must be in [1, ",
                cfg_.max_position_embeddings, "] (max_position_embeddings), got ", n);
  DMX_CHECK_ARG(input_ids.size(0) >= 1, "input_ids batch must be >= 1, got ", input_ids.size(0));
  const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
  DMX_CHECK_ARG(lo >= 0 && hi < cfg_.vocab_size, "input_ids must be in [0, ", cfg_.vocab_size,
                ") (vocab_size), got values in [", lo, ", ", hi, "]");
  auto& emb = *parts_->text_model->embeddings;
  const at::Tensor ids = input_ids.to(emb.token_embedding->weight.device(), at::kLong);
  const at::Tensor pos = at::arange(n, ids.options());
  return emb.token_embedding(ids) + emb.position_embedding(pos).unsqueeze(0);  // [B, N, C]
}

CLIPTextOutput CLIPTextModelImpl::forward(const at::Tensor& input_ids, bool output_hidden_states) {
  auto& tm = *parts_->text_model;
  CLIPTextOutput out;
  at::Tensor h = embed(input_ids);
  const at::Tensor mask = causal_mask(h.size(1), h.options());
  if (output_hidden_states) out.hidden_states.push_back(h);
  for (auto& layer : tm.encoder->list) {
    h = layer(h, mask);
    if (output_hidden_states) out.hidden_states.push_back(h);
  }
  out.last_hidden_state = tm.final_layer_norm(h);
  // Pooled output at the EOS token: transformers keeps the legacy argmax over ids when eos_token_id == 2,
  // otherwise takes the first position holding eos_token_id.
  const at::Tensor ids = input_ids.to(h.device(), at::kInt);
  const at::Tensor eos_pos =
      cfg_.eos_token_id == 2 ? ids.argmax(-1) : ids.eq(cfg_.eos_token_id).to(at::kInt).argmax(-1);
  const at::Tensor rows = at::arange(h.size(0), eos_pos.options().dtype(at::kLong));
  out.pooler_output = out.last_hidden_state.index({rows, eos_pos.to(at::kLong)});  // [B, C]
  return out;
}

at::Tensor CLIPTextModelImpl::encode(const at::Tensor& input_ids, int clip_skip) {
  DMX_CHECK_ARG(clip_skip >= 0 && clip_skip <= cfg_.num_hidden_layers, "clip_skip must be in [0, ",
                cfg_.num_hidden_layers, "] (num_hidden_layers), got ", clip_skip);
  auto& tm = *parts_->text_model;
  at::Tensor h = embed(input_ids);
  const at::Tensor mask = causal_mask(h.size(1), h.options());
  const size_t run = static_cast<size_t>(cfg_.num_hidden_layers - clip_skip);
  for (size_t i = 0; i < run; ++i) h = tm.encoder->list[i](h, mask);
  return tm.final_layer_norm(h);  // [B, N, C]
}

int clean_clip_state_dict(io::TensorMap& state) {
  return static_cast<int>(state.erase("text_model.embeddings.position_ids"));
}
}  // namespace dmx::models
