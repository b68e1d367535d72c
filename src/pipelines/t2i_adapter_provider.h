// T2I-Adapters as a residual provider (diffusers 0.27.2 StableDiffusionAdapterPipeline, with TencentARC's
// cond_tau). The adapters run once per picture, before the loop; their scaled features are handed to every UNet
// call as down_intrablock_additional_residuals (added inside the down blocks, before each downsampler, so the
// skip connections carry them), the same features for both guidance halves.
//
// Several adapters combine as the pipeline combines them: it passes adapter_conditioning_scale to MultiAdapter
// as its adapter_weights, so feature_k = sum_i scale_i * adapter_i(x_i)_k in the order given; no 1/N and no
// further scaling (scales 0.6 and 0.4 mean 0.6 x the first + 0.4 x the second). One adapter: scale x feature_k.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/image.h"
#include "models/t2i_adapter.h"
#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

// One adapter of a run with its control picture and settings.
struct T2IAdapterUnit {
  models::T2IAdapter model{nullptr};
  Image image;         // the control picture as read (gray, RGB or RGBA; 8 bits), preprocessed if asked
  double scale = 1.0;  // adapter_conditioning_scale for this adapter
  double end = 1.0;    // cond_tau: the fraction of the steps (from the first) during which the features apply
  std::string name;    // for messages (the path)
};

// _preprocess_adapter_image for one picture: converted to the adapter's channels (1: PIL's convert("L") luma
// unless it already is gray; 3: convert("RGB"), alpha dropped, gray repeated), resized to width x height with
// PIL's Lanczos only when the size differs, then /255 -> [1, C, height, width] float32 in [0, 1] (no
// normalisation to [-1, 1]).
at::Tensor prepare_adapter_image(const Image& img, int in_channels, int width, int height);

// The output size for an adapter picture when width/height are not given (the pipeline's _default_height_width):
// the picture's size rounded down to a multiple of the adapter's downscale_factor.
std::pair<int, int> default_adapter_size(const Image& img, int downscale_factor);

// TencentARC's cond_tau (ldm/models/diffusion/ddim.py ddim_sampling): at loop step i of n the features apply iff
// index = n - i - 1 >= int((1 - tau) * n). tau = 1 keeps them at every step.
bool adapter_keep(int i, int num_timesteps, double tau);

// All the adapters of a run (one provider: MultiAdapter when several). Per UNet evaluation: the sum, in order,
// of scale_i x features_i of the adapters kept at that step (with every adapter kept: exactly MultiAdapter's sum).
class T2IAdapterProvider : public ResidualProvider {
 public:
  explicit T2IAdapterProvider(std::vector<T2IAdapterUnit> units);
  std::string name() const override;
  // img2img: Unsupported (diffusers has no adapter img2img pipeline); scales finite, ends in (0, 1]; every adapter
  // agrees with the UNet (feature widths = the down blocks' widths, downscale_factor = the VAE factor) and, when
  // several, with each other (downscaling and feature count, as MultiAdapter requires).
  void check(const ResidualRun& run) const override;
  // Pictures prepared at the run's size, the adapters run once, features scaled, repeated per image and doubled
  // for guidance, on the UNet's device.
  void prepare(const ResidualRun& run) override;
  void apply(const ResidualStep& step, models::UNetInputs& in) override;
  std::optional<std::pair<int, int>> default_size() const override;  // the first picture's, rounded down
  const std::vector<T2IAdapterUnit>& units() const { return units_; }
  // The scaled features of adapter i for the run (tests): [N or 2N, C_k, h_k, w_k].
  const std::vector<at::Tensor>& features(size_t i) const { return features_.at(i); }

 private:
  std::string what(size_t i) const;
  std::vector<T2IAdapterUnit> units_;
  std::vector<std::vector<at::Tensor>> features_;  // per adapter, scaled and batched for the run
};
}  // namespace dmx::pipelines
