// CLIP image encoder: mirrors transformers 4.37 modeling_clip.py (CLIPVisionEmbeddings, CLIPVisionTransformer,
// CLIPVisionModelWithProjection) op for op.
#include "models/clip_vision_model.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "dmx/error.h"
#include "models/clip_encoder.h"
#include "models/config_json.h"

namespace dmx::models {
namespace tnn = torch::nn;

CLIPVisionConfig CLIPVisionConfig::from_json(const nlohmann::json& root) {
  DMX_CHECK_FORMAT(root.is_object(), "CLIP vision config must be a JSON object");
  const nlohmann::json& j =
      root.contains("vision_config") && root["vision_config"].is_object() ? root["vision_config"] : root;
  const std::string what = "CLIP vision config";
  CLIPVisionConfig c;  // transformers' CLIPVisionConfig defaults for absent fields
  cfgjson::get(j, what, "hidden_size", c.hidden_size);
  cfgjson::get(j, what, "intermediate_size", c.intermediate_size);
  cfgjson::get(j, what, "projection_dim", c.projection_dim);
  cfgjson::get(j, what, "num_hidden_layers", c.num_hidden_layers);
  cfgjson::get(j, what, "num_attention_heads", c.num_attention_heads);
  cfgjson::get(j, what, "num_channels", c.num_channels);
  cfgjson::get(j, what, "image_size", c.image_size);
  cfgjson::get(j, what, "patch_size", c.patch_size);
  cfgjson::get(j, what, "hidden_act", c.hidden_act);
  cfgjson::get(j, what, "layer_norm_eps", c.layer_norm_eps);
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(e.what());
  }
  return c;
}

CLIPEncoderOptions CLIPVisionConfig::encoder_options() const {
  CLIPEncoderOptions o;
  o.hidden_size = hidden_size;
  o.intermediate_size = intermediate_size;
  o.num_hidden_layers = num_hidden_layers;
  o.num_attention_heads = num_attention_heads;
  o.hidden_act = hidden_act;
  o.layer_norm_eps = layer_norm_eps;
  return o;
}

double CLIPVisionConfig::parameter_count() const {
  const double h = hidden_size, grid = static_cast<double>(image_size / patch_size);
  // class token, bias-free patch convolution, positions, pre/post layer norms, the encoder, visual_projection.
  return h + h * num_channels * patch_size * patch_size + (grid * grid + 1) * h + 2 * (2 * h) +
         clip_encoder_parameter_count(encoder_options()) + h * projection_dim;
}

void CLIPVisionConfig::validate() const {
  const char* what = "CLIP vision config";
  auto positive = [&](const char* name, int v) { DMX_CHECK_ARG(v > 0, what, ": ", name, " must be > 0, got ", v); };
  positive("projection_dim", projection_dim);
  positive("num_channels", num_channels);
  positive("image_size", image_size);
  positive("patch_size", patch_size);
  DMX_CHECK_ARG(image_size % patch_size == 0 && image_size <= 16384, what,
                ": image_size must be a multiple of patch_size (and at most 16384), got image_size ", image_size,
                " and patch_size ", patch_size);
  validate_clip_encoder(encoder_options(), what);
  cfgjson::check_parameter_count("the CLIP vision config", parameter_count());
}

namespace {

struct CLIPVisionEmbeddingsImpl : tnn::Module {
  explicit CLIPVisionEmbeddingsImpl(const CLIPVisionConfig& c) {
    class_embedding = register_parameter("class_embedding", at::randn({c.hidden_size}));
    patch_embedding = register_module(
        "patch_embedding",
        tnn::Conv2d(tnn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size).stride(c.patch_size).bias(false)));
    position_embedding = register_module("position_embedding", tnn::Embedding(c.num_positions(), c.hidden_size));
    // transformers' position_ids is a non-persistent buffer: not registered, so strict loading matches.
  }
  at::Tensor forward(const at::Tensor& pixel_values) {
    const int64_t B = pixel_values.size(0);
    const at::Tensor& w = patch_embedding->weight;
    at::Tensor patches = patch_embedding(pixel_values.to(w.scalar_type()));       // [B, C, grid, grid]
    patches = patches.flatten(2).transpose(1, 2);                                 // [B, grid*grid, C]
    const at::Tensor cls = class_embedding.expand({B, 1, -1});                    // [B, 1, C]
    return at::cat({cls, patches}, 1) + position_embedding->weight.unsqueeze(0);  // [B, 1 + grid*grid, C]
  }
  at::Tensor class_embedding;
  tnn::Conv2d patch_embedding{nullptr};
  tnn::Embedding position_embedding{nullptr};
};
TORCH_MODULE(CLIPVisionEmbeddings);

struct CLIPVisionTransformerImpl : tnn::Module {
  explicit CLIPVisionTransformerImpl(const CLIPVisionConfig& c) {
    const auto ln = [&] { return tnn::LayerNorm(tnn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
    embeddings = register_module("embeddings", CLIPVisionEmbeddings(c));
    pre_layrnorm = register_module("pre_layrnorm", ln());  // sic: transformers' name
    encoder = register_module("encoder", CLIPEncoder(c.encoder_options()));
    post_layernorm = register_module("post_layernorm", ln());
  }
  CLIPVisionEmbeddings embeddings{nullptr};
  tnn::LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
  CLIPEncoder encoder{nullptr};
};
TORCH_MODULE(CLIPVisionTransformer);
}  // namespace

struct CLIPVisionModelWithProjectionImpl::Parts {
  CLIPVisionTransformer vision_model{nullptr};
  tnn::Linear visual_projection{nullptr};
};

CLIPVisionModelWithProjectionImpl::CLIPVisionModelWithProjectionImpl(const CLIPVisionConfig& cfg)
    : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  parts_->vision_model = register_module("vision_model", CLIPVisionTransformer(cfg_));
  parts_->visual_projection = register_module(
      "visual_projection", tnn::Linear(tnn::LinearOptions(cfg_.hidden_size, cfg_.projection_dim).bias(false)));
}

CLIPVisionOutput CLIPVisionModelWithProjectionImpl::forward(const at::Tensor& pixel_values) {
  DMX_CHECK_ARG(pixel_values.defined() && pixel_values.dim() == 4 && pixel_values.size(0) >= 1 &&
                    pixel_values.size(1) == cfg_.num_channels && pixel_values.size(2) == cfg_.image_size &&
                    pixel_values.size(3) == cfg_.image_size,
                "pixel_values must be [batch, ", cfg_.num_channels, ", ", cfg_.image_size, ", ", cfg_.image_size,
                "] (num_channels, image_size), got ",
                pixel_values.defined() ? pixel_values.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(at::isFloatingType(pixel_values.scalar_type()), "pixel_values must be a float tensor, got ",
                pixel_values.scalar_type());
  auto& vm = *parts_->vision_model;
  const at::Tensor x = pixel_values.to(vm.embeddings->patch_embedding->weight.device());
  at::Tensor h = vm.pre_layrnorm(vm.embeddings(x));                 // [B, 1 + patches, C]
  for (auto& layer : vm.encoder->list) h = layer(h, at::Tensor());  // no mask: every token sees every token
  CLIPVisionOutput out;
  out.last_hidden_state = h;
  out.pooler_output = vm.post_layernorm(h.select(1, 0));            // [B, C], the class token
  out.image_embeds = parts_->visual_projection(out.pooler_output);  // [B, projection_dim]
  return out;
}

int clean_clip_vision_state_dict(io::TensorMap& state) {
  return static_cast<int>(state.erase("vision_model.embeddings.position_ids"));
}
}  // namespace dmx::models
