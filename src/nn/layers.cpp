// Shared UNet / VAE building blocks (see layers.h), mirroring diffusers 0.27.2 op for op.
#include "nn/layers.h"

#include "core/runtime.h"
#include "dmx/error.h"
#include "nn/attention.h"
#include "nn/fused_ops.h"

namespace dmx::nn {

namespace tnn = torch::nn;

Act parse_act(const std::string& name, const std::string& field) {
  if (name == "silu" || name == "swish") return Act::SiLU;
  if (name == "mish") return Act::Mish;
  if (name == "gelu") return Act::GELU;
  if (name == "relu") return Act::ReLU;
  throw Unsupported(field + ": unsupported activation '" + name + "' (supported: silu, swish, mish, gelu, relu)");
}

at::Tensor apply_act(Act act, const at::Tensor& x) {
  switch (act) {
    case Act::SiLU:
      return at::silu(x);
    case Act::Mish:
      return at::mish(x);
    case Act::GELU:
      return at::gelu(x);
    case Act::ReLU:
      return at::relu(x);
  }
  return x;
}

// apply_act on a temporary the caller owns: in place where libtorch has the in-place kernel (same values).
static at::Tensor apply_act_(Act act, at::Tensor x) {
  if (x.requires_grad() && at::GradMode::is_enabled()) return apply_act(act, x);  // autograd needs the input
  if (act == Act::SiLU) return at::silu_(x);
  if (act == Act::ReLU) return at::relu_(x);
  return apply_act(act, x);
}

at::Tensor group_norm(const tnn::GroupNorm& norm, const at::Tensor& x) {
  const auto& o = norm->options;
  return group_norm_act(x, o.num_groups(), norm->weight, norm->bias, o.eps(), /*silu=*/false);
}

// GroupNorm then the block's activation: one fused kernel for SiLU (nn/fused_ops.h).
static at::Tensor group_norm_act_(const tnn::GroupNorm& norm, Act act, const at::Tensor& x) {
  const auto& o = norm->options;
  if (act == Act::SiLU) return group_norm_act(x, o.num_groups(), norm->weight, norm->bias, o.eps(), /*silu=*/true);
  return apply_act_(act, group_norm(norm, x));
}

at::Tensor to_compute_layout(const at::Tensor& x) {
  // Reduced precision only: libtorch 1.13's channels-last kernels (GroupNorm) round differently enough to
  // use up the 1e-5 float32 golden tolerance (VAE encode 5e-5), while bf16 gains 1.5x on the VAE.
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  return x.dim() == 4 && reduced && dmx::channels_last() ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

std::shared_ptr<tnn::Module> make_container(tnn::Module& parent, const std::string& name) {
  return parent.register_module(name, std::make_shared<tnn::Module>());
}

static LoRAConv2d conv2d(int64_t in, int64_t out, int64_t k, int64_t stride = 1, int64_t padding = 0) {
  return LoRAConv2d(tnn::Conv2dOptions(in, out, k).stride(stride).padding(padding));
}
static tnn::GroupNorm make_group_norm(int64_t groups, int64_t channels, double eps) {
  DMX_CHECK_ARG(groups > 0 && channels % groups == 0, "GroupNorm: channels (", channels,
                ") must be divisible by norm_num_groups (", groups, ")");
  return tnn::GroupNorm(tnn::GroupNormOptions(groups, channels).eps(eps).affine(true));
}
static LoRALinear linear(int64_t in, int64_t out, bool bias = true) {
  return LoRALinear(tnn::LinearOptions(in, out).bias(bias));
}

// ---------------------------------------------------------------------------------------------------
at::Tensor get_timestep_embedding(const at::Tensor& timesteps, int64_t embedding_dim, bool flip_sin_to_cos,
                                  double downscale_freq_shift, double scale, double max_period) {
  DMX_CHECK_ARG(timesteps.dim() == 1, "timesteps must be a 1-d tensor, got shape ", timesteps.sizes());
  const int64_t half_dim = embedding_dim / 2;
  // Same op order and dtypes as diffusers: float32 arange * (-log(max_period)) / (half - shift), exp.
  at::Tensor exponent = at::arange(0, half_dim, timesteps.options().dtype(at::kFloat)) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half_dim) - downscale_freq_shift);
  at::Tensor emb = exponent.exp();
  emb = timesteps.unsqueeze(1).to(at::kFloat) * emb.unsqueeze(0);  // [B, half]
  if (scale != 1.0) emb = emb * scale;
  emb = at::cat({emb.sin(), emb.cos()}, -1);
  if (flip_sin_to_cos) emb = at::cat({emb.narrow(1, half_dim, half_dim), emb.narrow(1, 0, half_dim)}, -1);
  if (embedding_dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0});
  return emb;  // [B, embedding_dim]
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim, Act act, int64_t out_dim,
                                             int64_t cond_proj_dim)
    : act_(act) {
  linear_1 = register_module("linear_1", linear(in_channels, time_embed_dim));
  linear_2 = register_module("linear_2", linear(time_embed_dim, out_dim > 0 ? out_dim : time_embed_dim));
  if (cond_proj_dim > 0)  // after linear_2: diffusers' creation order
    cond_proj = register_module("cond_proj",
                                torch::nn::Linear(torch::nn::LinearOptions(cond_proj_dim, in_channels).bias(false)));
}

at::Tensor TimestepEmbeddingImpl::forward(const at::Tensor& sample, const at::Tensor& condition) {
  at::Tensor x = sample;
  if (!cond_proj.is_empty()) {
    const int64_t d = cond_proj->options.in_features();
    DMX_CHECK_ARG(condition.defined() && condition.dim() == 2 && condition.size(1) == d &&
                      (condition.size(0) == sample.size(0) || condition.size(0) == 1),
                  "timestep_cond must be [B, ", d, "] (this UNet has time_cond_proj_dim ", d,
                  ": an LCM-distilled model's guidance embedding), got ",
                  condition.defined() ? c10::str(condition.sizes()) : std::string("none"));
    x = x + cond_proj->forward(condition.to(cond_proj->weight.scalar_type()));
  } else {
    DMX_CHECK_ARG(!condition.defined(), "timestep_cond was given, but this model has no time_cond_proj_dim");
  }
  return linear_2->forward(apply_act(act_, linear_1->forward(x)));
}

// ---------------------------------------------------------------------------------------------------
ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetBlock2DOptions& o) : o_(o) {
  if (o_.out_channels == 0) o_.out_channels = o_.in_channels;
  const int64_t in = o_.in_channels, out = o_.out_channels;
  norm1 = register_module("norm1", make_group_norm(o_.groups, in, o_.eps));
  conv1 = register_module("conv1", conv2d(in, out, 3, 1, 1));
  if (o_.temb_channels > 0) time_emb_proj = register_module("time_emb_proj", linear(o_.temb_channels, out));
  norm2 = register_module("norm2", make_group_norm(o_.groups, out, o_.eps));
  conv2 = register_module("conv2", conv2d(out, out, 3, 1, 1));
  if (in != out) conv_shortcut = register_module("conv_shortcut", conv2d(in, out, 1));
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  // Temporaries are updated in place (fewer large allocations; a + b == b + a exactly).
  at::Tensor h = conv1->forward(group_norm_act_(norm1, o_.act, x));
  if (time_emb_proj && temb.defined()) {
    at::Tensor t = time_emb_proj->forward(apply_act(o_.act, temb));  // [B, out]
    h.add_(t.unsqueeze(-1).unsqueeze(-1));
  }
  h = conv2->forward(group_norm_act_(norm2, o_.act, h));  // dropout is identity at inference
  if (conv_shortcut)
    h.add_(conv_shortcut->forward(x));
  else
    h.add_(x);
  if (o_.output_scale_factor != 1.0) h.div_(o_.output_scale_factor);
  return h;
}

// ---------------------------------------------------------------------------------------------------
Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding) : padding_(padding) {
  conv = register_module("conv", conv2d(channels, out_channels, 3, 2, padding));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  if (padding_ == 0) return conv->forward(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));
  return conv->forward(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, int64_t out_channels) {
  conv = register_module("conv", conv2d(channels, out_channels, 3, 1, 1));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x, std::optional<std::vector<int64_t>> output_size) {
  // diffusers upsamples bf16 in float32 for old CUDA kernels; nearest copies values, so upsampling in bf16
  // is identical and avoids two casts of the largest activations (libtorch 1.13's CPU kernel takes bf16).
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor h = dtype == at::kBFloat16 && !x.device().is_cpu() ? x.to(at::kFloat) : x;
  if (output_size) {
    h = at::upsample_nearest2d(h, *output_size, c10::nullopt, c10::nullopt);
  } else {
    h = at::upsample_nearest2d(h, {h.size(2) * 2, h.size(3) * 2}, 2.0, 2.0);  // [B, C, 2H, 2W]
  }
  if (h.scalar_type() != dtype) h = h.to(dtype);
  return conv->forward(h);
}

// ---------------------------------------------------------------------------------------------------
AttentionImpl::AttentionImpl(const AttentionOptions& o) : o_(o), cross_(o.cross_attention_dim != 0) {
  if (o_.cross_attention_dim == 0) o_.cross_attention_dim = o_.query_dim;
  DMX_CHECK_ARG(o_.heads > 0 && o_.dim_head > 0, "Attention: heads and dim_head must be > 0, got ", o_.heads, " and ",
                o_.dim_head);
  const int64_t inner = o_.heads * o_.dim_head;
  scale_ = 1.0 / std::sqrt(static_cast<double>(o_.dim_head));  // dim_head ** -0.5
  if (o_.norm_num_groups > 0)
    group_norm = register_module("group_norm", make_group_norm(o_.norm_num_groups, o_.query_dim, o_.eps));
  to_q = register_module("to_q", linear(o_.query_dim, inner, o_.bias));
  to_k = register_module("to_k", linear(o_.cross_attention_dim, inner, o_.bias));
  to_v = register_module("to_v", linear(o_.cross_attention_dim, inner, o_.bias));
  auto to_out = make_container(*this, "to_out");
  to_out_0 = to_out->register_module("0", linear(inner, o_.query_dim, o_.out_bias));
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& context, const at::Tensor& attn_bias) {
  const bool spatial = x.dim() == 4;
  int64_t B = x.size(0), C = 0, Hs = 0, Ws = 0;
  at::Tensor h = x;
  if (spatial) {
    C = x.size(1), Hs = x.size(2), Ws = x.size(3);
    h = x.reshape({B, C, Hs * Ws}).transpose(1, 2);  // [B, HW, C] (a view unless x is channels-last)
  }
  if (group_norm) h = nn::group_norm(group_norm, h.transpose(1, 2)).transpose(1, 2);
  const at::Tensor& ctx = context.defined() ? context : h;
  const int64_t Nq = h.size(1), Nk = ctx.size(1), heads = o_.heads, d = o_.dim_head;
  at::Tensor q = to_q->forward(h).view({B, Nq, heads, d}).permute({0, 2, 1, 3});  // [B, heads, Nq, d]
  at::Tensor k, v;
  if (seam_ && !seam_->input_hooks.empty()) {  // hypernetworks: k = to_k(f_k(ctx)), v = to_v(f_v(ctx))
    const KeyValueInputs kv = apply_input_hooks(site_, seam_.get(), ctx);
    k = to_k->forward(kv.key).view({B, Nk, heads, d}).permute({0, 2, 1, 3});  // [B, heads, Nk, d]
    v = to_v->forward(kv.value).view({B, Nk, heads, d}).permute({0, 2, 1, 3});
  } else {
    k = to_k->forward(ctx).view({B, Nk, heads, d}).permute({0, 2, 1, 3});  // [B, heads, Nk, d]
    v = to_v->forward(ctx).view({B, Nk, heads, d}).permute({0, 2, 1, 3});
  }
  const bool upcast = o_.upcast_attention || o_.upcast_softmax;
  // The seam path when a controller or processor is installed, or when autograd needs a differentiable
  // graph (nn::attention writes into preallocated outputs); the fast path otherwise.
  const bool grad = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  const bool seam_active = seam_ && seam_->active();
  if (attn_bias.defined() && seam_active)
    throw Unsupported("attention controllers and processors do not support masked attention (" + site_.path + ")");
  at::Tensor a = attn_bias.defined()   ? attention(q, k, v, scale_, /*causal=*/false, upcast, attn_bias)
                 : seam_active || grad ? attention_through_seam(site_, seam_.get(), q, k, v, scale_, upcast)
                                       : attention(q, k, v, scale_, /*causal=*/false, upcast);
  a = a.permute({0, 2, 1, 3}).reshape({B, Nq, heads * d});  // [B, Nq, inner]
  at::Tensor out = to_out_0->forward(a);
  if (spatial) out = out.transpose(-1, -2).reshape({B, C, Hs, Ws});
  if (o_.residual_connection) out = out + x;
  if (o_.rescale_output_factor != 1.0) out = out / o_.rescale_output_factor;
  return out;
}

void AttentionImpl::set_site(AttentionSite site, std::shared_ptr<AttentionSeam> seam) {
  site_ = std::move(site);
  seam_ = std::move(seam);
}

// ---------------------------------------------------------------------------------------------------
FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t inner_dim, const std::string& activation_fn) {
  DMX_CHECK_ARG(activation_fn == "geglu" || activation_fn == "gelu",
                "FeedForward: activation_fn must be \"geglu\" or \"gelu\", got \"", activation_fn, "\"");
  geglu_ = activation_fn == "geglu";
  auto net = make_container(*this, "net");
  auto act = net->register_module("0", std::make_shared<tnn::Module>());
  proj = act->register_module("proj", linear(dim, geglu_ ? inner_dim * 2 : inner_dim));
  out = net->register_module("2", linear(inner_dim, dim));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) {
  if (!geglu_) return out->forward(at::gelu(proj->forward(x)));
  return out->forward(geglu(proj->forward(x)));  // hidden * gelu(gate), fused for bf16 (nn/fused_ops.h)
}

BasicTransformerBlockImpl::BasicTransformerBlockImpl(int64_t dim, const TransformerOptions& o)
    : only_cross_attention_(o.only_cross_attention) {
  auto ln = [&](const char* name) {
    return register_module(name, tnn::LayerNorm(tnn::LayerNormOptions({dim}).eps(1e-5).elementwise_affine(true)));
  };
  AttentionOptions a;
  a.query_dim = dim;
  a.heads = o.num_attention_heads;
  a.dim_head = o.attention_head_dim;
  a.bias = o.attention_bias;
  a.upcast_attention = o.upcast_attention;
  norm1 = ln("norm1");
  a.cross_attention_dim = o.only_cross_attention ? o.cross_attention_dim : 0;
  attn1 = register_module("attn1", Attention(a));
  if (o.cross_attention) {
    norm2 = ln("norm2");
    a.cross_attention_dim = o.cross_attention_dim;
    attn2 = register_module("attn2", Attention(a));
  }
  norm3 = ln("norm3");
  ff = register_module("ff", FeedForward(dim, dim * 4, o.activation_fn));
}

namespace {
// Under bf16 autocast (mixed-precision training) the activations arrive in bf16 while the norm's parameters
// are float32, and torch 1.13's CPU autocast has no rule for layer_norm: normalise in the parameters' dtype.
at::Tensor layer_norm_(tnn::LayerNorm& n, const at::Tensor& x) {
  const at::Tensor& w = n->weight;
  return n->forward(w.defined() && x.scalar_type() != w.scalar_type() ? x.to(w.scalar_type()) : x);
}
}  // namespace

at::Tensor BasicTransformerBlockImpl::forward(const at::Tensor& x, const at::Tensor& context,
                                              const at::Tensor& attn_bias) {
  at::Tensor h = attn1->forward(layer_norm_(norm1, x), only_cross_attention_ ? context : at::Tensor(), attn_bias) + x;
  if (attn2) h = attn2->forward(layer_norm_(norm2, h), context) + h;
  return ff->forward(layer_norm_(norm3, h)) + h;
}

Transformer2DModelImpl::Transformer2DModelImpl(const TransformerOptions& o) : o_(o) {
  const int64_t inner = o.num_attention_heads * o.attention_head_dim;
  norm = register_module("norm", make_group_norm(o.norm_num_groups, o.in_channels, 1e-6));
  if (o.use_linear_projection)
    proj_in_linear = register_module("proj_in", linear(o.in_channels, inner));
  else
    proj_in_conv = register_module("proj_in", conv2d(o.in_channels, inner, 1));
  auto blocks = make_container(*this, "transformer_blocks");
  for (int64_t i = 0; i < o.num_layers; ++i)
    transformer_blocks.push_back(blocks->register_module(std::to_string(i), BasicTransformerBlock(inner, o)));
  if (o.use_linear_projection)
    proj_out_linear = register_module("proj_out", linear(inner, o.in_channels));
  else
    proj_out_conv = register_module("proj_out", conv2d(inner, o.in_channels, 1));
}

at::Tensor Transformer2DModelImpl::forward(const at::Tensor& x, const at::Tensor& context) {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  at::Tensor h = group_norm(norm, x);
  int64_t inner = 0;
  if (proj_in_conv) {
    h = proj_in_conv->forward(h);
    inner = h.size(1);
    h = h.permute({0, 2, 3, 1}).reshape({B, H * W, inner});  // [B, HW, inner]
  } else {
    inner = h.size(1);
    h = proj_in_linear->forward(h.permute({0, 2, 3, 1}).reshape({B, H * W, inner}));
    inner = h.size(2);
  }
  for (auto& block : transformer_blocks) h = block->forward(h, context);
  if (proj_out_conv) {
    h = proj_out_conv->forward(h.reshape({B, H, W, inner}).permute({0, 3, 1, 2}).contiguous(x.suggest_memory_format()));
  } else {
    h = proj_out_linear->forward(h);
    h = h.reshape({B, H, W, h.size(2)}).permute({0, 3, 1, 2}).contiguous(x.suggest_memory_format());  // [B, C, H, W]
  }
  return h + x;
}

// ---------------------------------------------------------------------------------------------------
static ResnetBlock2D make_resnet(const BlockOptions& o, int64_t in, int64_t out) {
  ResnetBlock2DOptions r;
  r.in_channels = in;
  r.out_channels = out;
  r.temb_channels = o.temb_channels;
  r.groups = o.resnet_groups;
  r.eps = o.resnet_eps;
  r.output_scale_factor = o.output_scale_factor;
  r.act = o.act;
  return ResnetBlock2D(r);
}

static Transformer2DModel make_transformer(const BlockOptions& o, int64_t channels) {
  TransformerOptions t = o.transformer;
  DMX_CHECK_ARG(t.num_attention_heads > 0 && channels % t.num_attention_heads == 0, "attention heads (",
                t.num_attention_heads, ") must divide the block's channel count (", channels, ")");
  t.in_channels = channels;
  t.attention_head_dim = channels / t.num_attention_heads;
  t.norm_num_groups = o.resnet_groups;
  return Transformer2DModel(t);
}

DownBlock2DImpl::DownBlock2DImpl(const BlockOptions& o) : out_channels_(o.out_channels) {
  auto rs = make_container(*this, "resnets");
  std::shared_ptr<tnn::Module> as = o.cross_attention ? make_container(*this, "attentions") : nullptr;
  for (int64_t i = 0; i < o.num_layers; ++i) {
    const std::string idx = std::to_string(i);
    resnets.push_back(
        rs->register_module(idx, make_resnet(o, i == 0 ? o.in_channels : o.out_channels, o.out_channels)));
    if (as) attentions.push_back(as->register_module(idx, make_transformer(o, o.out_channels)));
  }
  if (o.add_sampler) {
    auto ds = make_container(*this, "downsamplers");
    downsampler = ds->register_module("0", Downsample2D(o.out_channels, o.out_channels, o.downsample_padding));
  }
}

DownBlockOutput DownBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                                         const at::Tensor& additional_residual) {
  DMX_CHECK_ARG(!additional_residual.defined() || has_cross_attention(),
                "DownBlock2D: an additional residual goes inside cross-attention blocks only");
  DownBlockOutput r;
  at::Tensor h = x;
  for (size_t i = 0; i < resnets.size(); ++i) {
    h = resnets[i]->forward(h, temb);
    if (!attentions.empty()) h = attentions[i]->forward(h, context);
    if (i + 1 == resnets.size() && additional_residual.defined()) h = h + additional_residual;
    r.res_samples.push_back(h);
  }
  if (downsampler) {
    h = downsampler->forward(h);
    r.res_samples.push_back(h);
  }
  r.hidden_states = h;
  return r;
}

UpBlock2DImpl::UpBlock2DImpl(const BlockOptions& o) {
  auto rs = make_container(*this, "resnets");
  std::shared_ptr<tnn::Module> as = o.cross_attention ? make_container(*this, "attentions") : nullptr;
  for (int64_t i = 0; i < o.num_layers; ++i) {
    const std::string idx = std::to_string(i);
    const int64_t skip = i == o.num_layers - 1 ? o.in_channels : o.out_channels;
    const int64_t in = i == 0 ? o.prev_output_channel : o.out_channels;
    resnets.push_back(rs->register_module(idx, make_resnet(o, in + skip, o.out_channels)));
    if (as) attentions.push_back(as->register_module(idx, make_transformer(o, o.out_channels)));
  }
  if (o.add_sampler) {
    auto us = make_container(*this, "upsamplers");
    upsampler = us->register_module("0", Upsample2D(o.out_channels, o.out_channels));
  }
}

at::Tensor UpBlock2DImpl::forward(const at::Tensor& x, const std::vector<at::Tensor>& res_samples,
                                  const at::Tensor& temb, const at::Tensor& context,
                                  std::optional<std::vector<int64_t>> upsample_size) {
  DMX_CHECK_ARG(res_samples.size() == resnets.size(), "up block expects ", resnets.size(), " skip tensors, got ",
                res_samples.size());
  at::Tensor h = x;
  for (size_t i = 0; i < resnets.size(); ++i) {
    const at::Tensor& skip = res_samples[res_samples.size() - 1 - i];
    h = resnets[i]->forward(at::cat({h, skip}, 1), temb);
    if (!attentions.empty()) h = attentions[i]->forward(h, context);
  }
  if (upsampler) h = upsampler->forward(h, std::move(upsample_size));
  return h;
}

UpDecoderBlock2DImpl::UpDecoderBlock2DImpl(const BlockOptions& o) {
  auto rs = make_container(*this, "resnets");
  for (int64_t i = 0; i < o.num_layers; ++i)
    resnets.push_back(rs->register_module(std::to_string(i),
                                          make_resnet(o, i == 0 ? o.in_channels : o.out_channels, o.out_channels)));
  if (o.add_sampler) {
    auto us = make_container(*this, "upsamplers");
    upsampler = us->register_module("0", Upsample2D(o.out_channels, o.out_channels));
  }
}

at::Tensor UpDecoderBlock2DImpl::forward(const at::Tensor& x) {
  at::Tensor h = x;
  for (auto& r : resnets) h = r->forward(h);
  if (upsampler) h = upsampler->forward(h);
  return h;
}

UNetMidBlock2DCrossAttnImpl::UNetMidBlock2DCrossAttnImpl(const BlockOptions& o) {
  auto rs = make_container(*this, "resnets");
  auto as = make_container(*this, "attentions");
  resnets.push_back(rs->register_module("0", make_resnet(o, o.in_channels, o.in_channels)));
  for (int64_t i = 0; i < o.num_layers; ++i) {
    attentions.push_back(as->register_module(std::to_string(i), make_transformer(o, o.in_channels)));
    resnets.push_back(rs->register_module(std::to_string(i + 1), make_resnet(o, o.in_channels, o.in_channels)));
  }
}

at::Tensor UNetMidBlock2DCrossAttnImpl::forward(const at::Tensor& x, const at::Tensor& temb,
                                                const at::Tensor& context) {
  at::Tensor h = resnets[0]->forward(x, temb);
  for (size_t i = 0; i < attentions.size(); ++i) {
    h = attentions[i]->forward(h, context);
    h = resnets[i + 1]->forward(h, temb);
  }
  return h;
}

UNetMidBlock2DImpl::UNetMidBlock2DImpl(const BlockOptions& o, bool add_attention) {
  auto rs = make_container(*this, "resnets");
  std::shared_ptr<tnn::Module> as = add_attention ? make_container(*this, "attentions") : nullptr;
  resnets.push_back(rs->register_module("0", make_resnet(o, o.in_channels, o.in_channels)));
  for (int64_t i = 0; i < o.num_layers; ++i) {
    if (as) {
      AttentionOptions a;
      a.query_dim = o.in_channels;
      a.heads = 1;  // attention_head_dim = in_channels -> one head of full width
      a.dim_head = o.in_channels;
      a.bias = true;
      a.upcast_softmax = true;
      a.norm_num_groups = o.resnet_groups;
      a.eps = o.resnet_eps;
      a.residual_connection = true;
      a.rescale_output_factor = o.output_scale_factor;
      attentions.push_back(as->register_module(std::to_string(i), Attention(a)));
    }
    resnets.push_back(rs->register_module(std::to_string(i + 1), make_resnet(o, o.in_channels, o.in_channels)));
  }
}

at::Tensor UNetMidBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  at::Tensor h = resnets[0]->forward(x, temb);
  for (size_t i = 0; i + 1 < resnets.size(); ++i) {
    if (!attentions.empty()) h = attentions[i]->forward(h);
    h = resnets[i + 1]->forward(h, temb);
  }
  return h;
}

// ---------------------------------------------------------------------------------------------------
namespace param_count {
double linear(double in, double out, bool bias) { return in * out + (bias ? out : 0); }
double conv2d(double in, double out, double k) { return in * out * k * k + out; }
double norm(double channels) { return 2 * channels; }

double resnet(double in, double out, double temb_channels) {
  return norm(in) + conv2d(in, out, 3) + (temb_channels > 0 ? linear(temb_channels, out) : 0) + norm(out) +
         conv2d(out, out, 3) + (in != out ? conv2d(in, out, 1) : 0);
}

double attention(const AttentionOptions& o) {
  const double q = static_cast<double>(o.query_dim);
  const double kv = static_cast<double>(o.cross_attention_dim == 0 ? o.query_dim : o.cross_attention_dim);
  const double inner = static_cast<double>(o.heads) * static_cast<double>(o.dim_head);
  return (o.norm_num_groups > 0 ? norm(q) : 0) + linear(q, inner, o.bias) + 2 * linear(kv, inner, o.bias) +
         linear(inner, q, o.out_bias);
}

double transformer(const TransformerOptions& o) {
  const double c = static_cast<double>(o.in_channels);
  const double inner = static_cast<double>(o.num_attention_heads) * static_cast<double>(o.attention_head_dim);
  AttentionOptions a;
  a.query_dim = static_cast<int64_t>(inner);
  a.heads = o.num_attention_heads;
  a.dim_head = o.attention_head_dim;
  a.bias = false;
  a.cross_attention_dim = o.only_cross_attention ? o.cross_attention_dim : 0;
  const double attn1 = attention(a);
  a.cross_attention_dim = o.cross_attention_dim;
  const double attn2 = attention(a);
  const double ff = linear(inner, inner * 4 * 2) + linear(inner * 4, inner);
  const double block = 3 * norm(inner) + attn1 + attn2 + ff;
  const double proj =
      o.use_linear_projection ? linear(c, inner) + linear(inner, c) : conv2d(c, inner, 1) + conv2d(inner, c, 1);
  return norm(c) + proj + static_cast<double>(o.num_layers) * block;
}

double timestep_embedding(double in, double dim) { return linear(in, dim) + linear(dim, dim); }

namespace {
// make_transformer's options for a block of `channels` channels.
double block_transformer(const BlockOptions& o, int64_t channels) {
  TransformerOptions t = o.transformer;
  t.in_channels = channels;
  t.attention_head_dim = t.num_attention_heads > 0 ? channels / t.num_attention_heads : 0;
  return transformer(t);
}
}  // namespace

double down_block(const BlockOptions& o) {
  double n = 0;
  for (int64_t i = 0; i < o.num_layers; ++i) {
    n += resnet(static_cast<double>(i == 0 ? o.in_channels : o.out_channels), static_cast<double>(o.out_channels),
                static_cast<double>(o.temb_channels));
    if (o.cross_attention) n += block_transformer(o, o.out_channels);
  }
  if (o.add_sampler) n += conv2d(static_cast<double>(o.out_channels), static_cast<double>(o.out_channels), 3);
  return n;
}

double up_block(const BlockOptions& o) {
  double n = 0;
  for (int64_t i = 0; i < o.num_layers; ++i) {
    const double skip = static_cast<double>(i == o.num_layers - 1 ? o.in_channels : o.out_channels);
    const double in = static_cast<double>(i == 0 ? o.prev_output_channel : o.out_channels);
    n += resnet(in + skip, static_cast<double>(o.out_channels), static_cast<double>(o.temb_channels));
    if (o.cross_attention) n += block_transformer(o, o.out_channels);
  }
  if (o.add_sampler) n += conv2d(static_cast<double>(o.out_channels), static_cast<double>(o.out_channels), 3);
  return n;
}

double up_decoder_block(const BlockOptions& o) {
  double n = 0;
  for (int64_t i = 0; i < o.num_layers; ++i)
    n += resnet(static_cast<double>(i == 0 ? o.in_channels : o.out_channels), static_cast<double>(o.out_channels),
                static_cast<double>(o.temb_channels));
  if (o.add_sampler) n += conv2d(static_cast<double>(o.out_channels), static_cast<double>(o.out_channels), 3);
  return n;
}

double mid_block_cross_attn(const BlockOptions& o) {
  const double c = static_cast<double>(o.in_channels), temb = static_cast<double>(o.temb_channels);
  return resnet(c, c, temb) +
         static_cast<double>(o.num_layers) * (block_transformer(o, o.in_channels) + resnet(c, c, temb));
}

double mid_block(const BlockOptions& o, bool add_attention) {
  const double c = static_cast<double>(o.in_channels), temb = static_cast<double>(o.temb_channels);
  AttentionOptions a;
  a.query_dim = o.in_channels;
  a.heads = 1;
  a.dim_head = o.in_channels;
  a.bias = true;
  a.norm_num_groups = o.resnet_groups;
  return resnet(c, c, temb) +
         static_cast<double>(o.num_layers) * ((add_attention ? attention(a) : 0) + resnet(c, c, temb));
}
}  // namespace param_count
}  // namespace dmx::nn
