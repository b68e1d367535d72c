// ControlNet as a residual provider (diffusers 0.27.2 StableDiffusionControlNetPipeline and
// MultiControlNetModel): loading (diffusers folders and original `control_model.*` single files), control
// image preparation (VaeImageProcessor(do_convert_rgb=True, do_normalize=False)), the per-step keep
// schedule of control_guidance_start / control_guidance_end, guess mode, and the provider that adds a net's
// residuals to the UNet inputs (several nets = several providers: MultiControlNet).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/image.h"
#include "loaders/model_bundle.h"
#include "models/controlnet.h"
#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

// One ControlNet with its conditioning image and schedule (diffusers' controlnet_conditioning_scale,
// control_guidance_start, control_guidance_end for that net).
struct ControlNetUnit {
  models::ControlNetModel model{nullptr};
  at::Tensor image;  // [1, C, H, W] float32 in [0, 1] at the output size (prepare_control_image)
  double scale = 1.0;
  double start = 0.0;  // fraction of the steps before which the net is off
  double end = 1.0;    // fraction of the steps after which the net is off
  std::string name;    // for messages (the path)
};

// path: a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors), a model folder
// with a controlnet/ subfolder, or a .safetensors single file with control_model.* keys (ControlNet 1.0 /
// 1.1; a <stem>.yaml beside it supplies heads). Moved to opts.device / opts.dtype, in eval mode.
// `param` names the option in messages ("--controlnet").
models::ControlNetModel load_controlnet(const std::string& path, const loaders::LoadOptions& opts = {},
                                        const std::string& param = "--controlnet");

// The multiple the output size of a ControlNet run is rounded down to: the VAE factor
// (VaeImageProcessor.get_default_height_width), and at least 8, which the pipeline requires of every size
// (a VAE with factor 4 would otherwise give sizes like 100x60 that the size check refuses).
int control_size_multiple(int vae_scale_factor);
// The output size for a control image when width/height are not given: the image size rounded down to a
// multiple of control_size_multiple(vae_scale_factor) (docs/controlnet.md).
std::pair<int, int> default_control_size(const Image& img, int vae_scale_factor);

// VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess(image, height, width): convert to RGB,
// resize with PIL's Lanczos when the size differs, /255. -> [1, 3, height, width] float32 in [0, 1].
at::Tensor prepare_control_image(const Image& img, int width, int height);

// diffusers' controlnet_keep[i] for one net: 1 - float(i / n < start or (i + 1) / n > end).
double controlnet_keep(int i, int num_timesteps, double start, double end);

// Sum of the residuals of several ControlNets (MultiControlNetModel). Empty `acc` takes `add`.
void add_residuals(models::ControlNetOutput& acc, const models::ControlNetOutput& add);

// One ControlNet of a run. Per UNet evaluation: conditioning scale = scale x keep(step) (a net switched off
// by its start/end adds nothing); the net sees the UNet's sample and prompt embeddings, or in guess mode
// with guidance only the conditional half (its residuals then padded with zeros for the unconditional rows).
class ControlNetProvider : public ResidualProvider {
 public:
  // index: the net's position among the run's ControlNets (messages: "controlnet[1] (PATH)").
  ControlNetProvider(ControlNetUnit unit, int index, bool guess_mode);
  std::string name() const override { return name_; }
  void check(const ResidualRun& run) const override;  // img2img: Unsupported; model and image against the run
  void prepare(const ResidualRun& run) override;      // the image repeated per image, doubled for guidance
  void apply(const ResidualStep& step, models::UNetInputs& in) override;
  std::optional<std::pair<int, int>> default_size() const override;  // the image's size
  const ControlNetUnit& unit() const { return unit_; }
  bool guess_mode() const { return guess_; }

 private:
  ControlNetUnit unit_;
  std::string name_;
  bool guess_;
  at::Tensor image_;  // prepared for the run: [N or 2N, C, H, W] on the device, in the model dtype
};

// The providers of a MultiControlNet run, one per unit in order. Guess mode applies to every net: given, or
// read from the first net's config (global_pool_conditions), as diffusers' pipeline decides it.
ResidualProviders controlnet_providers(const std::vector<ControlNetUnit>& units, bool guess_mode = false);
}  // namespace dmx::pipelines
