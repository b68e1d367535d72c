// PriorTransformer: mirrors diffusers 0.27.2 PriorTransformer.forward op for op (see prior_transformer.h).
#include "models/prior_transformer.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/normalization.h>

#include <vector>

#include "dmx/error.h"
#include "models/config_json.h"
#include "nn/layers.h"

namespace dmx::models {
namespace tnn = torch::nn;

namespace {
constexpr const char* kWhat = "PriorTransformer config";

// A string-or-null field: null is "" (None).
void get_optional_string(const nlohmann::json& j, const char* key, std::string& out) {
  auto it = j.find(key);
  if (it == j.end()) return;
  if (it->is_null()) {
    out.clear();
    return;
  }
  DMX_CHECK_FORMAT(it->is_string(), kWhat, ": field '", key, "' must be a string or null, got ", it->dump());
  out = it->get<std::string>();
}
// An int-or-null field: null is 0 (None: the size defaults to another one).
void get_optional_int(const nlohmann::json& j, const char* key, int& out) {
  auto it = j.find(key);
  if (it == j.end()) return;
  if (it->is_null()) {
    out = 0;
    return;
  }
  DMX_CHECK_FORMAT(it->is_number_integer(), kWhat, ": field '", key, "' must be an integer or null, got ", it->dump());
  out = it->get<int>();
}
}  // namespace

PriorTransformerConfig PriorTransformerConfig::from_json(const nlohmann::json& j) {
  DMX_CHECK_FORMAT(j.is_object(), kWhat, ": expected a JSON object, got ", j.type_name());
  PriorTransformerConfig c;
  cfgjson::get(j, kWhat, "num_attention_heads", c.num_attention_heads);
  cfgjson::get(j, kWhat, "attention_head_dim", c.attention_head_dim);
  cfgjson::get(j, kWhat, "num_layers", c.num_layers);
  cfgjson::get(j, kWhat, "embedding_dim", c.embedding_dim);
  cfgjson::get(j, kWhat, "num_embeddings", c.num_embeddings);
  cfgjson::get(j, kWhat, "additional_embeddings", c.additional_embeddings);
  cfgjson::get(j, kWhat, "dropout", c.dropout);
  cfgjson::get(j, kWhat, "time_embed_act_fn", c.time_embed_act_fn);
  get_optional_string(j, "norm_in_type", c.norm_in_type);
  get_optional_string(j, "embedding_proj_norm_type", c.embedding_proj_norm_type);
  get_optional_string(j, "encoder_hid_proj_type", c.encoder_hid_proj_type);
  get_optional_string(j, "added_emb_type", c.added_emb_type);
  get_optional_int(j, "time_embed_dim", c.time_embed_dim);
  get_optional_int(j, "embedding_proj_dim", c.embedding_proj_dim);
  get_optional_int(j, "clip_embed_dim", c.clip_embed_dim);
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(e.what());
  }
  return c;
}

double PriorTransformerConfig::parameter_count() const {
  const double i = inner_dim(), t = resolved_time_embed_dim(), p = resolved_embedding_proj_dim(),
               c = resolved_clip_embed_dim(), e = embedding_dim;
  const double time = (i * t + t) + (t * i + i);
  const double inputs = (e * i + i) + (p * i + i) + (e * i + i);  // proj_in, embedding_proj, encoder_hidden_states_proj
  const double tokens = static_cast<double>(sequence_length()) * i + i;  // positional_embedding, prd_embedding
  // norm1, attn1 (q, k, v and out with biases), norm3, ff (gelu proj i -> 4i, out 4i -> i)
  const double block = 2 * i + 4 * (i * i + i) + 2 * i + (i * 4 * i + 4 * i) + (4 * i * i + i);
  return time + inputs + tokens + num_layers * block + 2 * i + (i * c + c) + 2 * c;
}

void PriorTransformerConfig::validate() const {
  auto positive = [](const char* name, int v) { DMX_CHECK_ARG(v > 0, kWhat, ": ", name, " must be > 0, got ", v); };
  positive("num_attention_heads", num_attention_heads);
  positive("attention_head_dim", attention_head_dim);
  positive("num_layers", num_layers);
  positive("embedding_dim", embedding_dim);
  positive("num_embeddings", num_embeddings);
  DMX_CHECK_ARG(time_embed_dim >= 0 && embedding_proj_dim >= 0 && clip_embed_dim >= 0, kWhat,
                ": time_embed_dim, embedding_proj_dim and clip_embed_dim must be > 0 or null, got ", time_embed_dim,
                ", ", embedding_proj_dim, ", ", clip_embed_dim);
  DMX_CHECK_ARG(int64_t{num_attention_heads} * attention_head_dim <= (1 << 16) && embedding_dim <= (1 << 16) &&
                    num_embeddings <= (1 << 16) && num_layers <= 1024,
                kWhat, ": sizes are implausibly large (inner_dim ", int64_t{num_attention_heads} * attention_head_dim,
                ", embedding_dim ", embedding_dim, ", num_embeddings ", num_embeddings, ", num_layers ", num_layers,
                ")");
  DMX_CHECK_ARG(dropout >= 0 && dropout < 1, kWhat, ": dropout must be in [0, 1), got ", dropout);
  (void)nn::parse_act(time_embed_act_fn, std::string(kWhat) + ": time_embed_act_fn");
  // The token layout of the Karlo / Stable unCLIP / Kandinsky 2.2 priors; Shap-E's (no text tokens, no prd token,
  // layer norms on the inputs) is a different model.
  const std::string supported = " is not supported (dmx runs the priors of Karlo, Stable unCLIP and Kandinsky 2.2: ";
  DMX_CHECK_SUPPORTED(added_emb_type == "prd", kWhat,
                      ": added_emb_type = ", added_emb_type.empty() ? "null" : "\"" + added_emb_type + "\"", supported,
                      "\"prd\")");
  DMX_CHECK_SUPPORTED(encoder_hid_proj_type == "linear", kWhat, ": encoder_hid_proj_type = ",
                      encoder_hid_proj_type.empty() ? "null" : "\"" + encoder_hid_proj_type + "\"", supported,
                      "\"linear\")");
  DMX_CHECK_SUPPORTED(norm_in_type.empty(), kWhat, ": norm_in_type = \"", norm_in_type, "\"", supported, "null)");
  DMX_CHECK_SUPPORTED(embedding_proj_norm_type.empty(), kWhat, ": embedding_proj_norm_type = \"",
                      embedding_proj_norm_type, "\"", supported, "null)");
  // With text tokens and the prd token, the sequence is num_embeddings + 4 tokens.
  DMX_CHECK_SUPPORTED(additional_embeddings == 4, kWhat, ": additional_embeddings = ", additional_embeddings, supported,
                      "4: the text embedding, the time embedding, the image embedding and the prd token)");
}

struct PriorTransformerImpl::Parts {
  nn::TimestepEmbedding time_embedding{nullptr};
  tnn::Linear proj_in{nullptr}, embedding_proj{nullptr}, encoder_hidden_states_proj{nullptr};
  at::Tensor positional_embedding, prd_embedding;
  std::vector<nn::BasicTransformerBlock> transformer_blocks;
  tnn::LayerNorm norm_out{nullptr};
  tnn::Linear proj_to_clip_embeddings{nullptr};
  at::Tensor clip_mean, clip_std;
};

PriorTransformerImpl::PriorTransformerImpl(const PriorTransformerConfig& cfg)
    : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  auto& p = *parts_;
  const int64_t inner = cfg_.inner_dim();
  const auto linear = [](int64_t in, int64_t out) { return tnn::Linear(tnn::LinearOptions(in, out)); };
  // Created in diffusers' order (time_proj has no parameters).
  p.time_embedding = register_module(
      "time_embedding", nn::TimestepEmbedding(inner, cfg_.resolved_time_embed_dim(),
                                              nn::parse_act(cfg_.time_embed_act_fn, "time_embed_act_fn"), inner));
  p.proj_in = register_module("proj_in", linear(cfg_.embedding_dim, inner));
  p.embedding_proj = register_module("embedding_proj", linear(cfg_.resolved_embedding_proj_dim(), inner));
  p.encoder_hidden_states_proj = register_module("encoder_hidden_states_proj", linear(cfg_.embedding_dim, inner));
  p.positional_embedding = register_parameter("positional_embedding", at::zeros({1, cfg_.sequence_length(), inner}));
  p.prd_embedding = register_parameter("prd_embedding", at::zeros({1, 1, inner}));
  nn::TransformerOptions block;
  block.num_attention_heads = cfg_.num_attention_heads;
  block.attention_head_dim = cfg_.attention_head_dim;
  block.cross_attention = false;  // self-attention only
  block.attention_bias = true;
  block.activation_fn = "gelu";
  auto blocks = nn::make_container(*this, "transformer_blocks");
  for (int i = 0; i < cfg_.num_layers; ++i)
    p.transformer_blocks.push_back(blocks->register_module(std::to_string(i), nn::BasicTransformerBlock(inner, block)));
  p.norm_out = register_module("norm_out", tnn::LayerNorm(tnn::LayerNormOptions({inner})));
  p.proj_to_clip_embeddings = register_module("proj_to_clip_embeddings", linear(inner, cfg_.resolved_clip_embed_dim()));
  p.clip_mean = register_parameter("clip_mean", at::zeros({1, cfg_.resolved_clip_embed_dim()}));
  p.clip_std = register_parameter("clip_std", at::zeros({1, cfg_.resolved_clip_embed_dim()}));
}

at::Tensor PriorTransformerImpl::forward(const PriorTransformerInputs& in) {
  auto& p = *parts_;
  const int64_t M = cfg_.num_embeddings;
  auto shape = [](const at::Tensor& t) { return t.defined() ? t.sizes() : at::IntArrayRef{}; };
  DMX_CHECK_ARG(in.hidden_states.defined() && in.hidden_states.dim() == 2 && in.hidden_states.size(0) >= 1 &&
                    in.hidden_states.size(1) == cfg_.embedding_dim,
                "PriorTransformer: hidden_states must be [batch, ", cfg_.embedding_dim, "] (embedding_dim), got ",
                shape(in.hidden_states));
  const int64_t B = in.hidden_states.size(0);
  DMX_CHECK_ARG(in.proj_embedding.defined() && in.proj_embedding.dim() == 2 && in.proj_embedding.size(0) == B &&
                    in.proj_embedding.size(1) == cfg_.resolved_embedding_proj_dim(),
                "PriorTransformer: proj_embedding must be [", B, ", ", cfg_.resolved_embedding_proj_dim(),
                "] (batch, embedding_proj_dim), got ", shape(in.proj_embedding));
  DMX_CHECK_ARG(in.encoder_hidden_states.defined() && in.encoder_hidden_states.dim() == 3 &&
                    in.encoder_hidden_states.size(0) == B && in.encoder_hidden_states.size(1) == M &&
                    in.encoder_hidden_states.size(2) == cfg_.embedding_dim,
                "PriorTransformer: encoder_hidden_states must be [", B, ", ", M, ", ", cfg_.embedding_dim,
                "] (batch, num_embeddings, embedding_dim), got ", shape(in.encoder_hidden_states));
  DMX_CHECK_ARG(
      in.timestep.defined() && (in.timestep.numel() == 1 || (in.timestep.dim() == 1 && in.timestep.size(0) == B)),
      "PriorTransformer: timestep must be a scalar or hold one value per batch row (", B, "), got shape ",
      shape(in.timestep));
  DMX_CHECK_ARG(!in.attention_mask.defined() ||
                    (in.attention_mask.dim() == 2 && in.attention_mask.size(0) == B && in.attention_mask.size(1) == M),
                "PriorTransformer: attention_mask must be [", B, ", ", M, "] (batch, num_embeddings), got ",
                shape(in.attention_mask));
  const at::Tensor& w = p.proj_in->weight;
  const auto dtype = w.scalar_type();
  const auto dev = w.device();

  // Time embedding: timesteps broadcast to the batch, sinusoids (flip_sin_to_cos, shift 0), MLP.
  at::Tensor timesteps = in.timestep.reshape({-1}).to(dev);
  timesteps = timesteps * at::ones({B}, timesteps.options());  // [B]
  const at::Tensor t_proj = nn::get_timestep_embedding(timesteps, cfg_.inner_dim(), true, 0.0).to(dtype);
  const at::Tensor time_embeddings = p.time_embedding->forward(t_proj);  // [B, inner]

  const at::Tensor proj_embeddings = p.embedding_proj(in.proj_embedding.to(dev, dtype));  // [B, inner]
  const at::Tensor text_states =
      p.encoder_hidden_states_proj(in.encoder_hidden_states.to(dev, dtype));      // [B, M, inner]
  const at::Tensor image_embedding = p.proj_in(in.hidden_states.to(dev, dtype));  // [B, inner]

  // Tokens: [text states, text embedding, time embedding, noisy image embedding, prd] + positional embedding.
  at::Tensor h = at::cat({text_states, proj_embeddings.unsqueeze(1), time_embeddings.unsqueeze(1),
                          image_embedding.unsqueeze(1), p.prd_embedding.to(dtype).expand({B, 1, -1})},
                         1);  // [B, M + 4, inner]
  h = h + p.positional_embedding.to(dtype);

  at::Tensor bias;  // [B, 1, N, N]: causal + text padding, the same for every head
  if (in.attention_mask.defined()) {
    const int64_t N = cfg_.sequence_length();
    at::Tensor pad = (1 - in.attention_mask.to(dev, dtype)) * -10000.0;         // [B, M]
    pad = at::constant_pad_nd(pad, {0, cfg_.additional_embeddings}, 0.0);       // [B, N]
    const at::Tensor causal = at::full({N, N}, -10000.0, h.options()).triu(1);  // [N, N]
    bias = (pad.unsqueeze(1) + causal.unsqueeze(0)).unsqueeze(1);               // [B, 1, N, N]
  }
  for (auto& block : p.transformer_blocks) h = block->forward(h, at::Tensor(), bias);
  h = p.norm_out(h);
  return p.proj_to_clip_embeddings(h.select(1, h.size(1) - 1));  // the prd token -> [B, clip_embed_dim]
}

at::Tensor PriorTransformerImpl::post_process_latents(const at::Tensor& prior_latents) const {
  return prior_latents * parts_->clip_std + parts_->clip_mean;
}
}  // namespace dmx::models
