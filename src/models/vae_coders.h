// The Encoder and Decoder of diffusers' autoencoders (diffusers 0.27.2, models/autoencoders/vae.py), shared by
// AutoencoderKL (models/autoencoder_kl.h: double_z) and VQModel (models/vq_model.h: one latent per channel), with
// diffusers' key names (conv_in, down_blocks.<i>, mid_block, up_blocks.<i>, conv_norm_out, conv_out).
// Internal header of the models layer.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <vector>

#include "models/autoencoder_kl.h"
#include "nn/layers.h"

namespace dmx::models::vae {

constexpr double kVaeEps = 1e-6;  // diffusers' Encoder/Decoder fix resnet and norm eps at 1e-6

// The block options of the coders' resnets (no time embedding, eps 1e-6, the config's groups).
nn::BlockOptions block_options(const AutoencoderKLConfig& c, nn::Act act);

// The decoder's activation layout (channels-last where the fused GroupNorm runs; see vae_coders.cpp).
at::Tensor decode_layout(const at::Tensor& z);

// diffusers' vae.py Encoder: conv_in, DownEncoderBlock2D..., UNetMidBlock2D, norm/act, conv_out to
// (double_z ? 2 : 1) x latent_channels.
class EncoderImpl : public torch::nn::Module {
 public:
  EncoderImpl(const AutoencoderKLConfig& c, nn::Act act, bool double_z);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  std::vector<nn::DownBlock2D> down_blocks;
  nn::UNetMidBlock2D mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};

 private:
  nn::Act act_;
};
TORCH_MODULE(Encoder);

// diffusers' vae.py Decoder (norm_type "group"): conv_in, UNetMidBlock2D, UpDecoderBlock2D..., norm/act, conv_out.
class DecoderImpl : public torch::nn::Module {
 public:
  DecoderImpl(const AutoencoderKLConfig& c, nn::Act act);
  at::Tensor forward(const at::Tensor& z);
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  nn::UNetMidBlock2D mid_block{nullptr};
  std::vector<nn::UpDecoderBlock2D> up_blocks;
  torch::nn::GroupNorm conv_norm_out{nullptr};

 private:
  nn::Act act_;
};
TORCH_MODULE(Decoder);

// The parameters of an Encoder (double_z) plus a Decoder of config c (nothing allocated).
double coder_parameter_count(const AutoencoderKLConfig& c, bool double_z);
}  // namespace dmx::models::vae
