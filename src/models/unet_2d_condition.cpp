// UNet2DConditionModel (diffusers 0.27.2): time embedding, conv_in, down blocks, mid block, up blocks with
// skip connections, conv_norm_out / act / conv_out. ControlNet residuals are added to the skips and after
// the mid block exactly where diffusers adds them.
#include "models/unet_2d_condition.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/embedding.h>

#include <cmath>

#include "dmx/error.h"
#include "models/config_json.h"
#include "models/unet_encoder.h"
#include "nn/checkpoint.h"
#include "nn/layers.h"

namespace dmx::models {

namespace {
const char* kWhat = "UNet2DConditionModel config";

}  // namespace

// ---------------------------------------------------------------------------------------------------
UNet2DConditionConfig UNet2DConditionConfig::sd15() {
  // runwayml/stable-diffusion-v1-5 unet/config.json: attention_head_dim 8, block_out_channels
  // [320, 640, 1280, 1280], cross_attention_dim 768, sample_size 64, layers_per_block 2, norm_num_groups 32.
  return UNet2DConditionConfig{};
}

UNet2DConditionConfig UNet2DConditionConfig::sd21() {
  // stabilityai/stable-diffusion-2-1 unet/config.json: attention_head_dim [5, 10, 20, 20] (= heads, head
  // width 64), cross_attention_dim 1024, use_linear_projection true, upcast_attention true, sample_size 96.
  UNet2DConditionConfig c;
  c.sample_size = 96;
  c.attention_head_dim = {5, 10, 20, 20};
  c.cross_attention_dim = 1024;
  c.use_linear_projection = true;
  c.upcast_attention = true;
  return c;
}

std::vector<int> UNet2DConditionConfig::heads_per_block() const {
  // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (a naming quirk kept for
  // backward compatibility: SD configs' attention_head_dim is the number of heads).
  return num_attention_heads.empty() ? attention_head_dim : num_attention_heads;
}

void UNet2DConditionConfig::validate() const {
  const size_t n = down_block_types.size();
  check_encoder_config(*this, num_attention_heads.empty() ? "attention_head_dim" : "num_attention_heads");
  // The decoder and the UNet's own fields (docs/limits.md).
  DMX_CHECK_ARG(up_block_types.size() == n, "up_block_types must have one entry per down block (", n, "), got ",
                up_block_types.size());
  for (const auto& t : up_block_types)
    DMX_CHECK_SUPPORTED(t == "CrossAttnUpBlock2D" || t == "UpBlock2D", "up_block_types: unsupported block type '", t,
                        "' (supported: CrossAttnUpBlock2D, UpBlock2D)");
  DMX_CHECK_SUPPORTED(mid_block_type == "UNetMidBlock2DCrossAttn", "mid_block_type: unsupported block type '",
                      mid_block_type, "' (supported: UNetMidBlock2DCrossAttn)");
  DMX_CHECK_SUPPORTED(resnet_time_scale_shift == "default", "resnet_time_scale_shift '", resnet_time_scale_shift,
                      "' is not supported (only 'default')");
  using cfgjson::check_range;
  check_range("sample_size", sample_size, 1, 1024);
  check_range("out_channels", out_channels, 1, 64);
  DMX_CHECK_ARG(only_cross_attention.empty() || only_cross_attention.size() == n,
                "only_cross_attention must have one entry per down block (", n, "), got ", only_cross_attention.size());
  // Upper bounds far above any released model (x4 upscaler: 1000 classes; SDXL-size projections: 2816), so a
  // config cannot make the class embedding allocate without bound.
  DMX_CHECK_ARG(num_class_embeds >= 0 && num_class_embeds <= 100000,
                "num_class_embeds must be in [1, 100000] (or absent), got ", num_class_embeds);
  DMX_CHECK_ARG(projection_class_embeddings_input_dim >= 0 && projection_class_embeddings_input_dim <= 65536,
                "projection_class_embeddings_input_dim must be in [1, 65536] (or absent), got ",
                projection_class_embeddings_input_dim);
  DMX_CHECK_SUPPORTED(class_embed_type.empty() || class_embed_type == "timestep" || class_embed_type == "identity" ||
                          class_embed_type == "projection" || class_embed_type == "simple_projection",
                      "class_embed_type '", class_embed_type,
                      "' is not supported (supported: null, timestep, identity, projection, simple_projection)");
  if (class_embed_type == "projection" || class_embed_type == "simple_projection")
    DMX_CHECK_ARG(projection_class_embeddings_input_dim > 0, "class_embed_type '", class_embed_type,
                  "' requires projection_class_embeddings_input_dim");
  DMX_CHECK_ARG(!class_embeddings_concat || !class_embedding_kind().empty(),
                "class_embeddings_concat is true but the model has no class embedding (class_embed_type and "
                "num_class_embeds are both null)");
  cfgjson::check_parameter_count("the UNet config", parameter_count());
}

double UNet2DConditionConfig::parameter_count() const {
  namespace pc = nn::param_count;
  const auto& ch = block_out_channels;
  const int n = static_cast<int>(ch.size());
  const std::vector<int> heads = heads_per_block();
  const double temb = time_embed_dim();
  double total = pc::conv2d(in_channels, ch[0], 3) + pc::timestep_embedding(ch[0], temb);
  // The class embedding (the module's class_embedding; "identity" has no parameters). With
  // class_embeddings_concat the blocks' time projections read twice time_embed_dim (blocks_time_embed_dim,
  // through unet_block_options).
  const std::string kind = class_embedding_kind();
  if (kind == "embedding")
    total += static_cast<double>(num_class_embeds) * temb;
  else if (kind == "timestep")
    total += pc::timestep_embedding(ch[0], temb);
  else if (kind == "projection")
    total += pc::timestep_embedding(projection_class_embeddings_input_dim, temb);
  else if (kind == "simple_projection")
    total += pc::linear(projection_class_embeddings_input_dim, temb);
  int output_channel = ch[0];
  for (int i = 0; i < n; ++i) {
    nn::BlockOptions o = unet_block_options(*this, heads[i], nn::Act::SiLU, static_cast<size_t>(i));
    o.in_channels = output_channel;
    output_channel = ch[i];
    o.out_channels = output_channel;
    o.add_sampler = i != n - 1;
    o.cross_attention = down_block_types[i] == "CrossAttnDownBlock2D";
    total += pc::down_block(o);
  }
  nn::BlockOptions mid = unet_block_options(*this, heads.back(), nn::Act::SiLU, static_cast<size_t>(n - 1));
  mid.num_layers = 1;
  mid.in_channels = mid.out_channels = ch.back();
  mid.transformer.only_cross_attention = false;
  total += pc::mid_block_cross_attn(mid);
  output_channel = ch[n - 1];
  for (int i = 0; i < n; ++i) {
    const int rev = n - 1 - i;
    nn::BlockOptions o = unet_block_options(*this, heads[rev], nn::Act::SiLU, static_cast<size_t>(rev));
    o.num_layers = layers_per_block + 1;
    o.prev_output_channel = output_channel;
    output_channel = ch[rev];
    o.out_channels = output_channel;
    o.in_channels = ch[std::max(rev - 1, 0)];
    o.add_sampler = i != n - 1;
    o.cross_attention = up_block_types[i] == "CrossAttnUpBlock2D";
    total += pc::up_block(o);
  }
  return total + pc::norm(ch[0]) + pc::conv2d(ch[0], out_channels, 3);
}

std::string UNet2DConditionConfig::class_embedding_kind() const {
  // diffusers' _set_class_embedding: class_embed_type decides; num_class_embeds counts only without it.
  if (!class_embed_type.empty()) return class_embed_type;
  return num_class_embeds > 0 ? "embedding" : "";
}

UNet2DConditionConfig UNet2DConditionConfig::from_json(const nlohmann::json& j) {
  using cfgjson::get;
  DMX_CHECK_FORMAT(j.is_object(), kWhat, ": expected a JSON object, got ", j.type_name());
  UNet2DConditionConfig c;
  get(j, kWhat, "sample_size", c.sample_size);
  get(j, kWhat, "in_channels", c.in_channels);
  get(j, kWhat, "out_channels", c.out_channels);
  get(j, kWhat, "center_input_sample", c.center_input_sample);
  get(j, kWhat, "flip_sin_to_cos", c.flip_sin_to_cos);
  get(j, kWhat, "freq_shift", c.freq_shift);
  get(j, kWhat, "down_block_types", c.down_block_types);
  get(j, kWhat, "up_block_types", c.up_block_types);
  get(j, kWhat, "block_out_channels", c.block_out_channels);
  const size_t n = c.down_block_types.size();
  if (j.contains("mid_block_type") && j.at("mid_block_type").is_null())
    throw Unsupported(std::string(kWhat) + ": mid_block_type null (no mid block) is not supported");
  get(j, kWhat, "mid_block_type", c.mid_block_type);
  if (j.contains("only_cross_attention") && j.at("only_cross_attention").is_array()) {
    get(j, kWhat, "only_cross_attention", c.only_cross_attention);  // one per down block (checked by validate)
  } else {
    bool all = false;
    get(j, kWhat, "only_cross_attention", all);
    c.only_cross_attention.assign(n, all);
  }
  // mid_block_only_cross_attention: read by diffusers' UNetMidBlock2DSimpleCrossAttn only, not by the
  // UNetMidBlock2DCrossAttn dmx has (whose attn1 is always self-attention); type-checked, without effect.
  bool mid_only_cross = false;
  get(j, kWhat, "mid_block_only_cross_attention", mid_only_cross);
  get_uniform_int(j, kWhat, "layers_per_block", n, c.layers_per_block);
  get(j, kWhat, "downsample_padding", c.downsample_padding);
  get(j, kWhat, "mid_block_scale_factor", c.mid_block_scale_factor);
  get(j, kWhat, "act_fn", c.act_fn);
  if (j.contains("norm_num_groups") && j.at("norm_num_groups").is_null())
    throw Unsupported(std::string(kWhat) + ": norm_num_groups null (no output norm) is not supported");
  get(j, kWhat, "norm_num_groups", c.norm_num_groups);
  get(j, kWhat, "norm_eps", c.norm_eps);
  get_uniform_int(j, kWhat, "cross_attention_dim", n, c.cross_attention_dim);
  get_uniform_int(j, kWhat, "transformer_layers_per_block", n, c.transformer_layers_per_block);
  cfgjson::get_int_or_list(j, kWhat, "attention_head_dim", n, c.attention_head_dim);
  cfgjson::get_int_or_list(j, kWhat, "num_attention_heads", n, c.num_attention_heads);
  get(j, kWhat, "use_linear_projection", c.use_linear_projection);
  get(j, kWhat, "upcast_attention", c.upcast_attention);
  get(j, kWhat, "resnet_time_scale_shift", c.resnet_time_scale_shift);

  get(j, kWhat, "class_embed_type", c.class_embed_type);
  get(j, kWhat, "num_class_embeds", c.num_class_embeds);
  get(j, kWhat, "projection_class_embeddings_input_dim", c.projection_class_embeddings_input_dim);
  get(j, kWhat, "class_embeddings_concat", c.class_embeddings_concat);
  if (j.contains("num_class_embeds") && j.at("num_class_embeds").is_number_integer() && c.num_class_embeds <= 0)
    throw FormatError(std::string(kWhat) + ": num_class_embeds must be > 0 (or null), got " +
                      std::to_string(c.num_class_embeds));
  if (j.contains("projection_class_embeddings_input_dim") &&
      j.at("projection_class_embeddings_input_dim").is_number_integer() && c.projection_class_embeddings_input_dim <= 0)
    throw FormatError(std::string(kWhat) + ": projection_class_embeddings_input_dim must be > 0 (or null), got " +
                      std::to_string(c.projection_class_embeddings_input_dim));

  get(j, kWhat, "time_cond_proj_dim", c.time_cond_proj_dim);
  if (j.contains("time_cond_proj_dim") && !j.at("time_cond_proj_dim").is_null() &&
      (c.time_cond_proj_dim <= 0 || c.time_cond_proj_dim > 65536))
    throw FormatError(std::string(kWhat) + ": time_cond_proj_dim must be in [1, 65536] (or null), got " +
                      j.at("time_cond_proj_dim").dump());

  // Features of UNet2DConditionModel that dmx does not implement.
  for (const char* key : {"addition_embed_type", "addition_time_embed_dim", "encoder_hid_dim", "encoder_hid_dim_type",
                          "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "cross_attention_norm",
                          "reverse_transformer_layers_per_block"})
    cfgjson::require_default(j, kWhat, key, nullptr);
  cfgjson::require_default(j, kWhat, "time_embedding_type", "positional");
  cfgjson::require_default(j, kWhat, "conv_in_kernel", 3);
  cfgjson::require_default(j, kWhat, "conv_out_kernel", 3);
  cfgjson::require_default(j, kWhat, "attention_type", "default");
  cfgjson::require_default(j, kWhat, "dual_cross_attention", false);
  cfgjson::require_default(j, kWhat, "resnet_skip_time_act", false);
  cfgjson::require_default(j, kWhat, "resnet_out_scale_factor", 1.0);

  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(std::string(kWhat) + ": " + e.what());
  }
  return c;
}

// ---------------------------------------------------------------------------------------------------
struct UNet2DConditionModelImpl::Parts {
  nn::LoRAConv2d conv_in{nullptr}, conv_out{nullptr};
  nn::TimestepEmbedding time_embedding{nullptr};
  // class_embedding: one of these, by cfg.class_embedding_kind() ("identity" has no parameters).
  torch::nn::Embedding class_table{nullptr};  // "embedding"
  nn::TimestepEmbedding class_mlp{nullptr};   // "timestep", "projection"
  nn::LoRALinear class_linear{nullptr};       // "simple_projection"
  std::string class_kind;
  std::vector<nn::DownBlock2D> down_blocks;
  nn::UNetMidBlock2DCrossAttn mid_block{nullptr};
  std::vector<nn::UpBlock2D> up_blocks;
  torch::nn::GroupNorm conv_norm_out{nullptr};
  nn::Act act = nn::Act::SiLU;
  int num_upsamplers = 0;
};

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNet2DConditionConfig& cfg)
    : cfg_(cfg), parts_(std::make_shared<Parts>()) {
  cfg_.validate();
  Parts& p = *parts_;
  const auto& ch = cfg_.block_out_channels;
  const int n = static_cast<int>(ch.size());
  const std::vector<int> heads = cfg_.heads_per_block();
  p.act = nn::parse_act(cfg_.act_fn, "act_fn");

  p.conv_in =
      register_module("conv_in", nn::LoRAConv2d(torch::nn::Conv2dOptions(cfg_.in_channels, ch[0], 3).padding(1)));
  p.time_embedding = register_module(
      "time_embedding", nn::TimestepEmbedding(ch[0], cfg_.time_embed_dim(), p.act, 0, cfg_.time_cond_proj_dim));
  // After the time embedding, before the blocks: diffusers' creation order (seeded initial weights).
  p.class_kind = cfg_.class_embedding_kind();
  const int temb = cfg_.time_embed_dim();
  if (p.class_kind == "embedding")
    p.class_table = register_module("class_embedding", torch::nn::Embedding(cfg_.num_class_embeds, temb));
  else if (p.class_kind == "timestep")
    p.class_mlp = register_module("class_embedding", nn::TimestepEmbedding(ch[0], temb, p.act));
  else if (p.class_kind == "projection")  // diffusers builds it with TimestepEmbedding's default act, SiLU
    p.class_mlp = register_module(
        "class_embedding", nn::TimestepEmbedding(cfg_.projection_class_embeddings_input_dim, temb, nn::Act::SiLU));
  else if (p.class_kind == "simple_projection")
    p.class_linear = register_module(
        "class_embedding", nn::LoRALinear(torch::nn::LinearOptions(cfg_.projection_class_embeddings_input_dim, temb)));

  auto block_options = [&](int heads_i, int level) {
    return unet_block_options(cfg_, heads_i, p.act, static_cast<size_t>(level));
  };

  p.down_blocks = build_down_blocks(*this, cfg_, p.act);
  p.mid_block = build_mid_block(*this, cfg_, p.act);

  auto ups = nn::make_container(*this, "up_blocks");
  int output_channel = ch[n - 1];
  for (int i = 0; i < n; ++i) {
    const int rev = n - 1 - i;  // reversed_block_out_channels[i] = ch[rev]
    nn::BlockOptions o = block_options(heads[rev], rev);
    o.num_layers = cfg_.layers_per_block + 1;
    o.prev_output_channel = output_channel;
    output_channel = ch[rev];
    o.out_channels = output_channel;
    o.in_channels = ch[std::max(rev - 1, 0)];  // reversed[min(i + 1, n - 1)]
    o.add_sampler = i != n - 1;
    if (o.add_sampler) ++p.num_upsamplers;
    o.cross_attention = cfg_.up_block_types[i] == "CrossAttnUpBlock2D";
    p.up_blocks.push_back(ups->register_module(std::to_string(i), nn::UpBlock2D(o)));
  }

  p.conv_norm_out = register_module(
      "conv_norm_out",
      torch::nn::GroupNorm(torch::nn::GroupNormOptions(cfg_.norm_num_groups, ch[0]).eps(cfg_.norm_eps)));
  p.conv_out =
      register_module("conv_out", nn::LoRAConv2d(torch::nn::Conv2dOptions(ch[0], cfg_.out_channels, 3).padding(1)));
  // Every attention layer learns its site (diffusers path, place, block, layer) once, here.
  nn::assign_attention_sites(*this);
}

at::Tensor UNet2DConditionModelImpl::class_embedding(const at::Tensor& labels, int64_t batch, at::ScalarType dtype) {
  // diffusers' get_class_embed, with the labels' shapes checked and a batch of 1 broadcast.
  Parts& p = *parts_;
  const std::string& kind = p.class_kind;
  at::Tensor emb;
  if (kind == "embedding" || kind == "timestep") {
    const at::Tensor l = labels.dim() == 0 ? labels.reshape({1}) : labels;
    DMX_CHECK_ARG(l.dim() == 1 && (l.size(0) == 1 || l.size(0) == batch), "class_labels must be 0-d, [1] or [", batch,
                  "] for class embedding '", kind, "', got ", shape_string(labels));
    const at::Tensor lb = l.expand({batch});
    if (kind == "embedding") {
      DMX_CHECK_ARG(!at::isFloatingType(lb.scalar_type()) && !at::isComplexType(lb.scalar_type()) &&
                        lb.scalar_type() != at::kBool,
                    "class_labels must be integers (class indices) for num_class_embeds, got ", lb.scalar_type());
      const at::Tensor idx = lb.to(at::kLong);
      const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
      DMX_CHECK_ARG(lo >= 0 && hi < cfg_.num_class_embeds, "class_labels must be in [0, ", cfg_.num_class_embeds - 1,
                    "] (num_class_embeds ", cfg_.num_class_embeds, "), got ", lo < 0 ? lo : hi);
      emb = p.class_table->forward(idx);
    } else {
      // The labels go through the same sinusoids as the timesteps (time_proj), cast to the sample's dtype.
      emb = p.class_mlp->forward(timestep_features(cfg_, lb, dtype));
    }
  } else {
    const int64_t d = kind == "identity" ? cfg_.time_embed_dim() : cfg_.projection_class_embeddings_input_dim;
    DMX_CHECK_ARG(labels.dim() == 2 && (labels.size(0) == 1 || labels.size(0) == batch) && labels.size(1) == d,
                  "class_labels must be [", batch, ", ", d, "] (or [1, ", d, "]) for class_embed_type '", kind,
                  "', got ", shape_string(labels));
    DMX_CHECK_ARG(at::isFloatingType(labels.scalar_type()),
                  "class_labels must be floating point for class_embed_type '", kind, "', got ", labels.scalar_type());
    const at::Tensor lb = labels.expand({batch, d});
    if (kind == "identity") {
      emb = lb;
    } else {
      const at::Tensor& w = kind == "projection" ? p.class_mlp->linear_1->weight : p.class_linear->weight;
      const at::Tensor x = lb.to(w.scalar_type());
      emb = kind == "projection" ? p.class_mlp->forward(x) : p.class_linear->forward(x);
    }
  }
  return emb.to(dtype);  // [B, time_embed_dim]
}

at::Tensor UNet2DConditionModelImpl::forward(const UNetInputs& in) {
  Parts& p = *parts_;
  const at::Tensor& ctx = in.encoder_hidden_states;
  DMX_CHECK_ARG(in.sample.defined() && in.sample.dim() == 4 && in.sample.size(1) == cfg_.in_channels,
                "sample must be [B, ", cfg_.in_channels, ", h, w], got ", shape_string(in.sample));
  const int64_t B = in.sample.size(0);
  DMX_CHECK_ARG(ctx.defined() && ctx.dim() == 3 && ctx.size(0) == B && ctx.size(2) == cfg_.cross_attention_dim,
                "encoder_hidden_states must be [", B, ", N, ", cfg_.cross_attention_dim, "], got ", shape_string(ctx));
  const at::Tensor t = batch_timesteps(in.timestep, B);  // [B]
  if (p.class_kind.empty())
    DMX_CHECK_ARG(!in.class_labels.defined(),
                  "class_labels given, but this UNet has no class embedding (class_embed_type and num_class_embeds "
                  "are null in its config)");
  else
    DMX_CHECK_ARG(in.class_labels.defined(), "class_labels must be given: this UNet has a class embedding (",
                  p.class_kind == "embedding" ? "num_class_embeds " + std::to_string(cfg_.num_class_embeds)
                                              : "class_embed_type " + p.class_kind,
                  ")");
  const bool controlnet = !in.down_block_additional_residuals.empty() || in.mid_block_additional_residual.defined();
  if (controlnet)
    DMX_CHECK_ARG(!in.down_block_additional_residuals.empty() && in.mid_block_additional_residual.defined(),
                  "ControlNet residuals: down_block_additional_residuals and mid_block_additional_residual must be "
                  "given together");

  // Latent sizes not divisible by the overall up factor: upsample to the skip's size (diffusers'
  // forward_upsample_size).
  const int64_t up_factor = int64_t{1} << p.num_upsamplers;
  const bool forward_upsample_size = in.sample.size(2) % up_factor != 0 || in.sample.size(3) % up_factor != 0;

  // 1. time
  const at::Tensor t_emb = timestep_features(cfg_, t, in.sample.scalar_type());  // [B, C0]
  at::Tensor emb = p.time_embedding->forward(t_emb, in.timestep_cond);           // [B, 4 C0]
  record(in.recorder, "time_embedding", emb);
  if (!p.class_kind.empty()) {
    const at::Tensor class_emb = class_embedding(in.class_labels, B, in.sample.scalar_type());  // [B, 4 C0]
    record(in.recorder, "class_embedding", class_emb);
    emb = cfg_.class_embeddings_concat ? at::cat({emb, class_emb}, -1) : emb + class_emb;
  }

  // 2. pre-process
  at::Tensor h = cfg_.center_input_sample ? in.sample * 2.0 - 1.0 : in.sample;
  h = p.conv_in->forward(nn::to_compute_layout(h));
  record(in.recorder, "conv_in", h);

  const bool ckpt = gradient_checkpointing_ && at::GradMode::is_enabled();

  // 3. down
  std::vector<at::Tensor> res{h};
  IntrablockResiduals adapter{&in.down_intrablock_additional_residuals};
  h = run_down_blocks(p.down_blocks, h, emb, ctx, ckpt, res, in.recorder, &adapter);
  if (controlnet) {
    const auto& extra = in.down_block_additional_residuals;
    DMX_CHECK_ARG(extra.size() == res.size(), "down_block_additional_residuals must have ", res.size(),
                  " tensors (one per skip connection), got ", extra.size());
    for (size_t i = 0; i < res.size(); ++i) {
      DMX_CHECK_ARG(extra[i].sizes().equals(res[i].sizes()), "down_block_additional_residuals[", i, "] must be ",
                    shape_string(res[i]), ", got ", shape_string(extra[i]));
      res[i] = res[i] + extra[i];
    }
  }

  // 4. mid
  h = run_mid_block(p.mid_block, h, emb, ctx, ckpt);
  record(in.recorder, "mid_block", h);
  // diffusers (T2I-Adapter-XL): a feature left after the down blocks goes to the mid block's output when its
  // shape equals it exactly; any other leftover would be silently dropped there, so it is an error here.
  if (adapter.pending()) {
    const at::Tensor& left = (*adapter.features)[adapter.next];
    if (left.defined() && left.sizes().equals(h.sizes())) h = h + adapter.take(h.sizes(), h.scalar_type());
  }
  DMX_CHECK_ARG(!adapter.pending(),
                "down_intrablock_additional_residuals: ", in.down_intrablock_additional_residuals.size(),
                " features given, but only ", adapter.next,
                " fit this UNet (one per down block, then one of the mid block's shape ", h.sizes(), "); feature ",
                adapter.next, " is ", shape_string(in.down_intrablock_additional_residuals[adapter.next]));
  if (controlnet) {
    DMX_CHECK_ARG(in.mid_block_additional_residual.sizes().equals(h.sizes()), "mid_block_additional_residual must be ",
                  shape_string(h), ", got ", shape_string(in.mid_block_additional_residual));
    h = h + in.mid_block_additional_residual;
  }

  // 5. up
  for (size_t i = 0; i < p.up_blocks.size(); ++i) {
    const bool is_final = i + 1 == p.up_blocks.size();
    const size_t k = p.up_blocks[i]->num_resnets();
    std::vector<at::Tensor> skips(res.end() - static_cast<std::ptrdiff_t>(k), res.end());
    res.resize(res.size() - k);
    std::optional<std::vector<int64_t>> upsample_size;
    if (!is_final && forward_upsample_size)
      upsample_size = std::vector<int64_t>{res.back().size(2), res.back().size(3)};
    if (ckpt) {  // inputs: h, emb, ctx, skips...
      std::vector<at::Tensor> args{h, emb, ctx};
      args.insert(args.end(), skips.begin(), skips.end());
      h = nn::checkpoint(
          [blk = p.up_blocks[i].ptr(), upsample_size](const std::vector<at::Tensor>& x) {
            const std::vector<at::Tensor> sk(x.begin() + 3, x.end());
            return std::vector<at::Tensor>{blk->forward(x[0], sk, x[1], x[2], upsample_size)};
          },
          args)[0];
    } else {
      h = p.up_blocks[i]->forward(h, skips, emb, ctx, upsample_size);
    }
    record(in.recorder, "up_blocks." + std::to_string(i), h);
  }

  // 6. post-process
  h = nn::group_norm(p.conv_norm_out, h);
  record(in.recorder, "conv_norm_out", h);
  h = p.conv_out->forward(nn::apply_act(p.act, h));
  record(in.recorder, "conv_out", h);
  return h.contiguous();  // [B, out_channels, h, w]
}
}  // namespace dmx::models
