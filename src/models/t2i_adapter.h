// T2IAdapter and MultiAdapter (diffusers 0.27.2, models/adapter.py; Mou et al. 2023, "T2I-Adapter: Learning
// Adapters to Dig out More Controllable Ability for Text-to-Image Diffusion Models"; TencentARC's Adapter and
// Adapter_light). A small network run once on a control picture; its features are added inside the UNet's down
// blocks (UNetInputs::down_intrablock_additional_residuals). It is a plain function of the picture: compute the
// features once per run, scale them, hand them to every UNet call.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace dmx::models {

struct T2IAdapterConfig {
  int in_channels = 3;  // 1 for TencentARC's sketch and canny adapters
  std::vector<int> channels{320, 640, 1280, 1280};
  int num_res_blocks = 2;
  int downscale_factor = 8;
  std::string adapter_type = "full_adapter";  // "full_adapter" | "light_adapter" | "full_adapter_xl"

  // diffusers' adapter config.json. Wrong types / invalid values: FormatError naming the field; another
  // adapter_type: Unsupported.
  static T2IAdapterConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;
  // TencentARC/t2iadapter_*_sd15v2 (full_adapter, channels 320/640/1280/1280, 2 res blocks); in_channels 1 for
  // sketch / canny, 3 otherwise.
  static T2IAdapterConfig sd15_full(int in_channels);
  // TencentARC/t2iadapter_color_sd14v1 (light_adapter, channels 320/640/1280, 4 res blocks).
  static T2IAdapterConfig sd14_color();
  void validate() const;  // InvalidArgument naming the field
  // The factor from the picture to the last feature (diffusers' total_downscale_factor).
  int total_downscale_factor() const;
  // Features the adapter returns (one per UNet down block it feeds): channels.size(), +1 for the light adapter.
  size_t num_features() const;
  // The widths of the features, in order (a light adapter adds one block of its last width).
  std::vector<int> feature_widths() const;
  // The parameters the adapter has (computed, nothing allocated): loaders compare it with the weights before
  // building the model, so a config cannot make dmx allocate more than its weights hold.
  double num_parameters() const;
};

// diffusers' T2IAdapter with its key names (adapter.conv_in, adapter.body.<k>.in_conv / resnets.<j>.block1 /
// block2 / out_conv). Full: PixelUnshuffle -> conv_in 3x3 -> one AdapterBlock per channel entry (AvgPool 2x2
// ceil for k > 0, a 1x1 in_conv when the width changes, res blocks x + conv1x1(relu(conv3x3(x)))). Light:
// PixelUnshuffle -> channels.size() + 1 LightAdapterBlocks (AvgPool for k > 0, 1x1 in_conv to out/4, res blocks
// x + conv3x3(relu(conv3x3(x))), 1x1 out_conv). XL: the full blocks without downsampling except block 2.
class T2IAdapterImpl : public torch::nn::Module {
 public:
  explicit T2IAdapterImpl(const T2IAdapterConfig& cfg);
  // x: [B, in_channels, H, W], the control picture in [0, 1] (no normalisation), H and W multiples of
  // downscale_factor. Returns feature k of block k: [B, channels[k], H / f_k, W / f_k].
  std::vector<at::Tensor> forward(const at::Tensor& x);
  const T2IAdapterConfig& config() const { return cfg_; }

 private:
  T2IAdapterConfig cfg_;
  struct Parts;
  std::shared_ptr<Parts> parts_;
};
TORCH_MODULE(T2IAdapter);

struct UNet2DConditionConfig;
// Whether an adapter fits a UNet (not full_adapter_xl, which has its own layout): downscale_factor = the VAE's
// scale factor (the first feature is at the latent size) and feature k as wide as down block k. InvalidArgument
// starting with `what` otherwise.
void check_t2i_adapter_matches_unet(const T2IAdapterConfig& c, const UNet2DConditionConfig& unet, int vae_scale_factor,
                                    const std::string& what);

// diffusers' MultiAdapter: feature_k = sum_i w_i * adapter_i(x_i)_k, in the order given, with w_i a float32
// scalar. weights absent: 1/N each (MultiAdapter's default). The adapters must agree on their downscaling
// (InvalidArgument otherwise). StableDiffusionAdapterPipeline passes its adapter_conditioning_scale list as the
// weights, so a pipeline gives the scales here and scales nothing further.
std::vector<at::Tensor> multi_adapter_features(std::vector<T2IAdapter>& adapters, const std::vector<at::Tensor>& xs,
                                               const std::optional<std::vector<double>>& weights = std::nullopt);
}  // namespace dmx::models
