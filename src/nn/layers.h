// Shared building blocks of the diffusers UNet / VAE family, with diffusers' key names:
//   ResnetBlock2D, Downsample2D, Upsample2D (diffusers/models/resnet.py, upsampling.py, downsampling.py),
//   get_timestep_embedding, TimestepEmbedding (embeddings.py; DDPM / "Attention is all you need" sinusoids),
//   Attention with the classic AttnProcessor (attention_processor.py), GEGLU FeedForward,
//   BasicTransformerBlock (attention.py), Transformer2DModel (transformers/transformer_2d.py),
//   CrossAttnDownBlock2D / DownBlock2D / DownEncoderBlock2D, CrossAttnUpBlock2D / UpBlock2D,
//   UpDecoderBlock2D, UNetMidBlock2DCrossAttn, UNetMidBlock2D (unets/unet_2d_blocks.py), diffusers 0.27.2.
// Internal header of the nn and models layers (not part of the public API).
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "nn/attention_seam.h"
#include "nn/lora.h"

#include <optional>
#include <string>
#include <vector>

namespace dmx::nn {

// Activations named as in diffusers' get_activation.
enum class Act { SiLU, Mish, GELU, ReLU };
// Throws dmx::Unsupported naming `field` for an unknown name.
Act parse_act(const std::string& name, const std::string& field);
at::Tensor apply_act(Act act, const at::Tensor& x);

// GroupNorm that normalises reduced-precision (bf16 / fp16) inputs in float32 and casts back; float32 inputs
// take exactly torch's GroupNorm. (libtorch 1.13's bf16 CPU kernel loses ~3x more precision.)
at::Tensor group_norm(const torch::nn::GroupNorm& norm, const at::Tensor& x);

// The layout models compute in: a 4-d bf16/fp16 x made channels-last when dmx::channels_last() is on (values
// unchanged); float32 stays NCHW, the layout that matches the reference to 1e-5.
at::Tensor to_compute_layout(const at::Tensor& x);

// A plain container whose children are registered under "0", "1", ... (diffusers' nn.ModuleList keys),
// with typed access kept by the owner.
std::shared_ptr<torch::nn::Module> make_container(torch::nn::Module& parent, const std::string& name);

// ---------------------------------------------------------------------------------------------------
// Timesteps: diffusers' get_timestep_embedding. timesteps [B] (any dtype, cast to float32) -> [B, dim].
at::Tensor get_timestep_embedding(const at::Tensor& timesteps, int64_t embedding_dim, bool flip_sin_to_cos,
                                  double downscale_freq_shift, double scale = 1.0, double max_period = 10000.0);

// TimestepEmbedding: linear_1 -> act -> linear_2. out_dim 0 = time_embed_dim (the PriorTransformer sets it).
// cond_proj_dim > 0 (diffusers' cond_proj_dim, a UNet's time_cond_proj_dim): a bias-free Linear cond_proj of a
// condition [B, cond_proj_dim] is added to the sample before linear_1 (an LCM-distilled UNet's guidance embedding).
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim, Act act, int64_t out_dim = 0,
                        int64_t cond_proj_dim = 0);
  // [B, in] -> [B, out_dim]; condition [B, cond_proj_dim] or undefined (required exactly when cond_proj exists).
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& condition = {});
  LoRALinear linear_1{nullptr}, linear_2{nullptr};
  torch::nn::Linear cond_proj{nullptr};

 private:
  Act act_;
};
TORCH_MODULE(TimestepEmbedding);

// ---------------------------------------------------------------------------------------------------
struct ResnetBlock2DOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;   // 0 = in_channels
  int64_t temb_channels = 0;  // 0 = no time-embedding projection (VAE)
  int64_t groups = 32;
  double eps = 1e-6;
  double output_scale_factor = 1.0;
  Act act = Act::SiLU;
};

// (x + conv2(act(norm2(conv1(act(norm1(x))) + proj(act(temb)))))) / output_scale_factor; the shortcut is a
// 1x1 conv_shortcut when the channel count changes.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  explicit ResnetBlock2DImpl(const ResnetBlock2DOptions& o);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {});  // [B, in, H, W] -> [B, out, H, W]
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  LoRAConv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  LoRALinear time_emb_proj{nullptr};

 private:
  ResnetBlock2DOptions o_;
};
TORCH_MODULE(ResnetBlock2D);

// conv 3x3 stride 2; padding 0 means diffusers' asymmetric (0, 1, 0, 1) zero pad first (VAE encoder).
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding);
  at::Tensor forward(const at::Tensor& x);  // [B, C, H, W] -> [B, out, ceil(H/2), ceil(W/2)]
  LoRAConv2d conv{nullptr};

 private:
  int64_t padding_;
};
TORCH_MODULE(Downsample2D);

// nearest x2 (or to output_size) then conv 3x3.
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, int64_t out_channels);
  at::Tensor forward(const at::Tensor& x, std::optional<std::vector<int64_t>> output_size = std::nullopt);
  LoRAConv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// ---------------------------------------------------------------------------------------------------
struct AttentionOptions {
  int64_t query_dim = 0;
  int64_t cross_attention_dim = 0;  // 0 = query_dim (self-attention)
  int64_t heads = 8;
  int64_t dim_head = 64;
  bool bias = false;     // to_q / to_k / to_v
  bool out_bias = true;  // to_out.0
  bool upcast_attention = false;
  bool upcast_softmax = false;
  int64_t norm_num_groups = 0;  // > 0: group_norm on the input (VAE mid-block attention)
  double eps = 1e-5;
  bool residual_connection = false;
  double rescale_output_factor = 1.0;
};

// diffusers' Attention + AttnProcessor: to_q/to_k/to_v, heads split, nn::attention, to_out.0.
// Accepts [B, N, C] or [B, C, H, W] (flattened to tokens and restored, as the processor does).
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& o);
  // context: [B, M, cross_attention_dim] or undefined for self-attention. attn_bias: an additive mask
  // broadcastable to [B, heads, N, M] (diffusers' attention_mask after prepare_attention_mask, the
  // PriorTransformer's causal + padding mask); layers with a bias bypass the attention seam (Unsupported when
  // a controller or processor is installed).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context = {}, const at::Tensor& attn_bias = {});
  const AttentionOptions& options() const { return o_; }
  // Whether keys and values come from a context (cross_attention_dim given: attn2, and attn1 of
  // only_cross_attention blocks), whatever its width.
  bool is_cross_attention() const { return cross_; }
  LoRALinear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out_0{nullptr};
  torch::nn::GroupNorm group_norm{nullptr};
  // The attention seam (nn/attention_seam.h): set once by assign_attention_sites.
  const AttentionSite& site() const { return site_; }
  const std::shared_ptr<AttentionSeam>& seam() const { return seam_; }
  void set_site(AttentionSite site, std::shared_ptr<AttentionSeam> seam);

 private:
  AttentionOptions o_;
  bool cross_ = false;
  double scale_;
  AttentionSite site_;
  std::shared_ptr<AttentionSeam> seam_;
};
TORCH_MODULE(Attention);

// FeedForward (diffusers' attention.py): activation_fn "geglu": net.0.proj (dim -> 2*inner), x * gelu(gate);
// "gelu": net.0.proj (dim -> inner), gelu (exact); then net.2 (inner -> dim).
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t inner_dim, const std::string& activation_fn = "geglu");
  at::Tensor forward(const at::Tensor& x);  // [B, N, dim] -> [B, N, dim]
  LoRALinear proj{nullptr}, out{nullptr};

 private:
  bool geglu_ = true;
};
TORCH_MODULE(FeedForward);

struct TransformerOptions {
  int64_t num_attention_heads = 8;
  int64_t attention_head_dim = 40;  // per-head width; inner_dim = heads * head_dim
  int64_t in_channels = 0;
  int64_t num_layers = 1;
  int64_t cross_attention_dim = 768;
  int64_t norm_num_groups = 32;
  bool use_linear_projection = false;
  bool only_cross_attention = false;
  bool upcast_attention = false;
  // BasicTransformerBlock settings the UNet leaves at their defaults and the PriorTransformer sets:
  bool cross_attention = true;          // false: no norm2/attn2 (diffusers' cross_attention_dim None)
  bool attention_bias = false;          // biases on to_q / to_k / to_v
  std::string activation_fn = "geglu";  // the feed-forward: geglu | gelu
};

// norm1 + attn1 (self, or cross when only_cross_attention), norm2 + attn2 (cross; absent without
// cross_attention), norm3 + ff, residuals. attn_bias: attn1's additive mask (see AttentionImpl::forward).
class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  BasicTransformerBlockImpl(int64_t dim, const TransformerOptions& o);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context, const at::Tensor& attn_bias = {});  // [B, N, dim]
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};

 private:
  bool only_cross_attention_;
};
TORCH_MODULE(BasicTransformerBlock);

// Transformer2DModel (continuous input): GroupNorm, proj_in (1x1 conv or linear), blocks, proj_out, residual.
class Transformer2DModelImpl : public torch::nn::Module {
 public:
  explicit Transformer2DModelImpl(const TransformerOptions& o);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& context);  // [B, C, H, W] -> [B, C, H, W]
  torch::nn::GroupNorm norm{nullptr};
  LoRAConv2d proj_in_conv{nullptr}, proj_out_conv{nullptr};
  LoRALinear proj_in_linear{nullptr}, proj_out_linear{nullptr};
  std::vector<BasicTransformerBlock> transformer_blocks;

 private:
  TransformerOptions o_;
};
TORCH_MODULE(Transformer2DModel);

// ---------------------------------------------------------------------------------------------------
// Settings shared by the resnets / attentions of one UNet or VAE block.
struct BlockOptions {
  int64_t num_layers = 2;
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t prev_output_channel = 0;  // up blocks: channels arriving from the previous up block
  int64_t temb_channels = 0;        // 0 = no time embedding (VAE)
  double resnet_eps = 1e-5;
  int64_t resnet_groups = 32;
  Act act = Act::SiLU;
  double output_scale_factor = 1.0;
  bool add_sampler = false;  // downsample / upsample at the end
  int64_t downsample_padding = 1;
  bool cross_attention = false;    // Transformer2DModel after each resnet
  TransformerOptions transformer;  // used when cross_attention (in_channels set by the block)
};

struct DownBlockOutput {
  at::Tensor hidden_states;
  std::vector<at::Tensor> res_samples;  // one per resnet (+1 after the downsampler)
};

// CrossAttnDownBlock2D (cross_attention), DownBlock2D, DownEncoderBlock2D (temb_channels 0).
class DownBlock2DImpl : public torch::nn::Module {
 public:
  explicit DownBlock2DImpl(const BlockOptions& o);
  // additional_residual (CrossAttnDownBlock2D's T2I-Adapter input, optional): added after the last (resnet,
  // attention) pair, before the downsampler, so the last skip and the downsampler both see the sum. Blocks
  // without attention take none (diffusers adds it to their output instead: the UNet's job).
  DownBlockOutput forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context,
                          const at::Tensor& additional_residual = {});
  bool has_cross_attention() const { return !attentions.empty(); }
  int64_t out_channels() const { return out_channels_; }
  std::vector<ResnetBlock2D> resnets;
  std::vector<Transformer2DModel> attentions;
  Downsample2D downsampler{nullptr};

 private:
  int64_t out_channels_ = 0;
};
TORCH_MODULE(DownBlock2D);

// CrossAttnUpBlock2D (cross_attention) and UpBlock2D: each resnet consumes one skip tensor (from the back).
class UpBlock2DImpl : public torch::nn::Module {
 public:
  explicit UpBlock2DImpl(const BlockOptions& o);
  // res_samples: the skips of this block, in down order; consumed last first.
  at::Tensor forward(const at::Tensor& x, const std::vector<at::Tensor>& res_samples, const at::Tensor& temb,
                     const at::Tensor& context, std::optional<std::vector<int64_t>> upsample_size);
  size_t num_resnets() const { return resnets.size(); }
  std::vector<ResnetBlock2D> resnets;
  std::vector<Transformer2DModel> attentions;
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(UpBlock2D);

// UpDecoderBlock2D (VAE decoder): resnets without skips, then upsample.
class UpDecoderBlock2DImpl : public torch::nn::Module {
 public:
  explicit UpDecoderBlock2DImpl(const BlockOptions& o);
  at::Tensor forward(const at::Tensor& x);
  std::vector<ResnetBlock2D> resnets;
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(UpDecoderBlock2D);

// UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) x num_layers. in_channels = out_channels.
class UNetMidBlock2DCrossAttnImpl : public torch::nn::Module {
 public:
  explicit UNetMidBlock2DCrossAttnImpl(const BlockOptions& o);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, const at::Tensor& context);
  std::vector<ResnetBlock2D> resnets;
  std::vector<Transformer2DModel> attentions;
};
TORCH_MODULE(UNetMidBlock2DCrossAttn);

// UNetMidBlock2D (VAE): resnet, then (single-head Attention with group_norm and residual, resnet).
class UNetMidBlock2DImpl : public torch::nn::Module {
 public:
  UNetMidBlock2DImpl(const BlockOptions& o, bool add_attention);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {});
  std::vector<ResnetBlock2D> resnets;
  std::vector<Attention> attentions;
};
TORCH_MODULE(UNetMidBlock2D);

// ---------------------------------------------------------------------------------------------------
// Parameter counts of the blocks above from their options alone, nothing allocated (in double: exact far
// beyond any size a model may have, and no overflow for absurd configs). Models estimate their size from a
// config before constructing anything (UNet2DConditionConfig::parameter_count(), ...); each function mirrors
// its constructor (tests compare every count with the constructed module's).
namespace param_count {
double linear(double in, double out, bool bias = true);
double conv2d(double in, double out, double k);  // with bias
double norm(double channels);                    // GroupNorm / LayerNorm with affine weights
double resnet(double in, double out, double temb_channels);
double attention(const AttentionOptions& o);
double transformer(const TransformerOptions& o);  // in_channels and attention_head_dim set
double timestep_embedding(double in, double dim);
double down_block(const BlockOptions& o);
double up_block(const BlockOptions& o);
double up_decoder_block(const BlockOptions& o);
double mid_block_cross_attn(const BlockOptions& o);
double mid_block(const BlockOptions& o, bool add_attention);
}  // namespace param_count

}  // namespace dmx::nn
