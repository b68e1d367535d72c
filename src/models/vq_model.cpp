// VQModel (see vq_model.h).
#include "models/vq_model.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/embedding.h>

#include "core/tensor_util.h"
#include "dmx/error.h"
#include "models/config_json.h"
#include "models/vae_coders.h"

namespace dmx::models {

namespace {
const char* kWhat = "VQModel config";
}  // namespace

AutoencoderKLConfig VQModelConfig::default_coder() {
  AutoencoderKLConfig c;
  c.down_block_types = {"DownEncoderBlock2D"};
  c.up_block_types = {"UpDecoderBlock2D"};
  c.block_out_channels = {64};
  c.layers_per_block = 1;
  c.latent_channels = 3;
  c.sample_size = 32;
  return c;
}

void VQModelConfig::validate() const {
  coder.validate();
  cfgjson::check_range("num_vq_embeddings", num_vq_embeddings, 1, 1 << 20);
  cfgjson::check_range("vq_embed_dim", vq_embed_dim, 0, 8192);
  cfgjson::check_parameter_count("the VQModel config", parameter_count());
}

double VQModelConfig::parameter_count() const {
  namespace pc = nn::param_count;
  const int e = embed_dim(), l = coder.latent_channels;
  return vae::coder_parameter_count(coder, /*double_z=*/false) + pc::conv2d(l, e, 1) + pc::conv2d(e, l, 1) +
         static_cast<double>(num_vq_embeddings) * e;
}

VQModelConfig VQModelConfig::from_json(const nlohmann::json& j) {
  using cfgjson::get;
  DMX_CHECK_FORMAT(j.is_object(), kWhat, ": expected a JSON object, got ", j.type_name());
  VQModelConfig c;
  AutoencoderKLConfig& a = c.coder;
  get(j, kWhat, "in_channels", a.in_channels);
  get(j, kWhat, "out_channels", a.out_channels);
  get(j, kWhat, "down_block_types", a.down_block_types);
  get(j, kWhat, "up_block_types", a.up_block_types);
  get(j, kWhat, "block_out_channels", a.block_out_channels);
  get(j, kWhat, "layers_per_block", a.layers_per_block);
  get(j, kWhat, "act_fn", a.act_fn);
  get(j, kWhat, "latent_channels", a.latent_channels);
  get(j, kWhat, "norm_num_groups", a.norm_num_groups);
  get(j, kWhat, "sample_size", a.sample_size);
  get(j, kWhat, "scaling_factor", a.scaling_factor);
  get(j, kWhat, "mid_block_add_attention", a.mid_block_add_attention);
  get(j, kWhat, "num_vq_embeddings", c.num_vq_embeddings);
  get(j, kWhat, "vq_embed_dim", c.vq_embed_dim);
  std::string norm_type = "group";
  get(j, kWhat, "norm_type", norm_type);
  DMX_CHECK_SUPPORTED(norm_type == "group", kWhat, ": norm_type '", norm_type,
                      "' is not supported (supported: group; \"spatial\" is MoVQ's decoder)");
  cfgjson::require_default(j, kWhat, "lookup_from_codebook", false);
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(std::string(kWhat) + ": " + e.what());
  }
  return c;
}

nlohmann::json VQModelConfig::to_json() const {
  const AutoencoderKLConfig& a = coder;
  nlohmann::json j = {{"_class_name", "VQModel"},
                      {"_diffusers_version", "0.27.2"},
                      {"act_fn", a.act_fn},
                      {"block_out_channels", a.block_out_channels},
                      {"down_block_types", a.down_block_types},
                      {"force_upcast", false},
                      {"in_channels", a.in_channels},
                      {"latent_channels", a.latent_channels},
                      {"layers_per_block", a.layers_per_block},
                      {"lookup_from_codebook", false},
                      {"mid_block_add_attention", a.mid_block_add_attention},
                      {"norm_num_groups", a.norm_num_groups},
                      {"norm_type", "group"},
                      {"num_vq_embeddings", num_vq_embeddings},
                      {"out_channels", a.out_channels},
                      {"sample_size", a.sample_size},
                      {"scaling_factor", a.scaling_factor},
                      {"up_block_types", a.up_block_types}};
  j["vq_embed_dim"] = vq_embed_dim > 0 ? nlohmann::json(vq_embed_dim) : nlohmann::json(nullptr);
  return j;
}

namespace {
class VectorQuantizerImpl : public torch::nn::Module {
 public:
  VectorQuantizerImpl(int64_t n, int64_t dim) {
    embedding = register_module("embedding", torch::nn::Embedding(n, dim));
    // diffusers: embedding.weight.data.uniform_(-1 / n, 1 / n)
    torch::NoGradGuard no_grad;
    embedding->weight.uniform_(-1.0 / static_cast<double>(n), 1.0 / static_cast<double>(n));
  }
  torch::nn::Embedding embedding{nullptr};
};
TORCH_MODULE(VectorQuantizer);
}  // namespace

struct VQModelImpl::Parts {
  vae::Encoder encoder{nullptr};
  vae::Decoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};
  VectorQuantizer quantize{nullptr};
};

VQModelImpl::VQModelImpl(const VQModelConfig& cfg) : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  const nn::Act act = nn::parse_act(cfg_.coder.act_fn, "act_fn");
  const int l = cfg_.coder.latent_channels, e = cfg_.embed_dim();
  Parts& p = *parts_;
  // diffusers' construction order: encoder, quant_conv, quantize, post_quant_conv, decoder (a seeded model draws
  // its initial weights in this order).
  p.encoder = register_module("encoder", vae::Encoder(cfg_.coder, act, /*double_z=*/false));
  p.quant_conv = register_module("quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(l, e, 1)));
  p.quantize = register_module("quantize", VectorQuantizer(cfg_.num_vq_embeddings, e));
  p.post_quant_conv = register_module("post_quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(e, l, 1)));
  p.decoder = register_module("decoder", vae::Decoder(cfg_.coder, act));
}

at::Tensor VQModelImpl::encode(const at::Tensor& x) {
  DMX_CHECK_ARG(x.defined() && x.dim() == 4 && x.size(1) == cfg_.coder.in_channels, "VQModel encode input must be [B, ",
                cfg_.coder.in_channels, ", H, W], got ", shape_string(x));
  const int f = cfg_.downscale_factor();
  DMX_CHECK_ARG(x.size(2) % f == 0 && x.size(3) % f == 0, "VQModel encode input sides must be multiples of ", f,
                ", got ", shape_string(x));
  return parts_->quant_conv->forward(parts_->encoder->forward(x)).contiguous();
}

at::Tensor VQModelImpl::codebook_weight() const { return parts_->quantize->embedding->weight; }

VQQuantized VQModelImpl::quantize(const at::Tensor& h) {
  DMX_CHECK_ARG(h.defined() && h.dim() == 4 && h.size(1) == cfg_.embed_dim(), "VQModel quantize input must be [B, ",
                cfg_.embed_dim(), ", h, w], got ", shape_string(h));
  const at::Tensor w = codebook_weight();
  const at::Tensor z = h.permute({0, 2, 3, 1}).contiguous();  // [B, h, w, E]
  const at::Tensor flat = z.reshape({-1, z.size(3)});
  // |z - e|^2 = |z|^2 - 2 z.e + |e|^2, computed in float32 (or the codebook's type).
  at::Tensor d;
  {
    at::NoGradGuard no_grad;
    d = flat.pow(2).sum(1, true) - 2 * at::mm(flat, w.t()) + w.pow(2).sum(1).unsqueeze(0);
  }
  VQQuantized q;
  const at::Tensor idx = d.argmin(1);
  const at::Tensor zq = at::embedding(w, idx).view(z.sizes());
  q.indices = idx.view({z.size(0), z.size(1), z.size(2)});
  q.codebook = (zq - z.detach()).pow(2).mean();
  q.commitment = (zq.detach() - z).pow(2).mean();
  q.quantized = (z + (zq - z).detach()).permute({0, 3, 1, 2}).contiguous();
  return q;
}

at::Tensor VQModelImpl::decode(const at::Tensor& h, bool force_not_quantize) {
  const at::Tensor quant = force_not_quantize ? h : quantize(h).quantized;
  return parts_->decoder->forward(parts_->post_quant_conv->forward(quant)).contiguous();
}

at::Tensor VQModelImpl::decode_indices(const at::Tensor& indices) {
  DMX_CHECK_ARG(indices.defined() && indices.dim() == 3, "VQModel decode_indices: [B, h, w] codes expected, got ",
                shape_string(indices));
  DMX_CHECK_ARG(indices.numel() == 0 ||
                    (indices.min().item<int64_t>() >= 0 && indices.max().item<int64_t>() < cfg_.num_vq_embeddings),
                "VQModel decode_indices: codes must be in [0, ", cfg_.num_vq_embeddings, ")");
  const at::Tensor zq = at::embedding(codebook_weight(), indices.to(at::kLong)).permute({0, 3, 1, 2}).contiguous();
  return decode(zq, /*force_not_quantize=*/true);
}
}  // namespace dmx::models
