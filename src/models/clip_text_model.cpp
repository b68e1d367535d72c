// CLIP text encoder: mirrors transformers 4.37 modeling_clip.py (CLIPTextEmbeddings, CLIPTextTransformer,
// CLIPTextModel, CLIPTextModelWithProjection); the encoder layers are models/clip_encoder.h, which the vision
// tower shares.
#include "models/clip_text_model.h"

#include <limits>

#include "dmx/error.h"
#include "models/clip_encoder.h"
#include "models/config_json.h"
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

CLIPEncoderOptions CLIPTextConfig::encoder_options() const {
  CLIPEncoderOptions o;
  o.hidden_size = hidden_size;
  o.intermediate_size = intermediate_size;
  o.num_hidden_layers = num_hidden_layers;
  o.num_attention_heads = num_attention_heads;
  o.hidden_act = hidden_act;
  o.layer_norm_eps = layer_norm_eps;
  return o;
}

double CLIPTextConfig::parameter_count(bool with_projection) const {
  const double h = hidden_size;
  return static_cast<double>(vocab_size) * h + static_cast<double>(max_position_embeddings) * h +
         clip_encoder_parameter_count(encoder_options()) + 2 * h + (with_projection ? h * projection_dim : 0.0);
}

void CLIPTextConfig::validate() const {
  // Ranges (docs/limits.md): every CLIP text encoder of the Stable Diffusion family fits well inside.
  auto range = [](const char* name, int v, int lo, int hi) {
    DMX_CHECK_ARG(v >= lo && v <= hi, "CLIP text config: ", name, " must be in [", lo, ", ", hi, "], got ", v,
                  v < lo ? "" : " (limits: docs/limits.md)");
  };
  range("vocab_size", vocab_size, 1, 1000000);
  range("max_position_embeddings", max_position_embeddings, 1, 8192);
  range("projection_dim", projection_dim, 0, 8192);
  validate_clip_encoder(encoder_options(), "CLIP text config");
  cfgjson::check_parameter_count("the CLIP text config", parameter_count());
}

// ---------------------------------------------------------------- modules

namespace {

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
    encoder = register_module("encoder", CLIPEncoder(c.encoder_options()));
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
  torch::nn::Linear text_projection{nullptr};
};

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& cfg, bool with_projection)
    : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  parts_->text_model = register_module("text_model", CLIPTextTransformer(cfg_));
  if (with_projection) {
    DMX_CHECK_ARG(cfg_.projection_dim > 0, "CLIP text config: projection_dim must be > 0, got ", cfg_.projection_dim);
    parts_->text_projection =
        register_module("text_projection",
                        torch::nn::Linear(torch::nn::LinearOptions(cfg_.hidden_size, cfg_.projection_dim).bias(false)));
  }
}

bool CLIPTextModelImpl::has_projection() const { return !parts_->text_projection.is_empty(); }

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
  out.pooler_output = out.last_hidden_state.index({rows, eos_pos.to(at::kLong)});      // [B, C]
  if (has_projection()) out.text_embeds = parts_->text_projection(out.pooler_output);  // [B, projection_dim]
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
