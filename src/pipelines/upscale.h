// Text-guided x4 super-resolution: diffusers 0.27.2's StableDiffusionUpscalePipeline (stabilityai's
// stable-diffusion-x4-upscaler), i.e. a cascaded-diffusion super-resolution stage (Ho et al. 2021, "Cascaded
// Diffusion Models for High Fidelity Image Generation") with noise-conditioning augmentation: the low-resolution
// picture is itself noised with the low-res scheduler at `noise_level`, concatenated to the latents at every
// UNet call (latents first), and the noise level is the UNet's class label. Latents keep the low-res size; the
// /4 VAE decodes them to 4x that size.
//
// Steps of run() (diffusers' __call__): 1 check; 2 encode the prompts ([negative; prompt] with guidance);
// 3 the scheduler's timesteps; 4 noise the picture: the FIRST draw of the generator, [1, 3, h, w],
// image = sqrt(acp[nl]) image + sqrt(1 - acp[nl]) noise (low_res_scheduler.add_noise); 5 the latents: the
// SECOND draw, [N, latent_channels, h, w] x init_noise_sigma; 6 the denoising loop of the generation core with
// the picture and the noise level given to the UNet by a provider (LowResConditioning); 7 decode latents /
// 0.08333 (optionally in tiles).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "core/image.h"
#include "loaders/upscale.h"
#include "pipelines/generation.h"
#include "pipelines/memory_estimate.h"
#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

// Tiled VAE decoding (diffusers' AutoencoderKL.tiled_decode): latent tiles of `tile_latent` with overlap
// `overlap` (a share of the tile), each decoded alone and blended linearly with its upper and left
// neighbours over `blend` output pixels. Used for outputs too large to decode at once.
struct VaeTiling {
  bool enabled = false;
  int tile_sample_size = 0;  // output pixels per tile; 0 = the VAE's sample_size (diffusers' tile_sample_min_size)
  double overlap = 0.25;     // diffusers' tile_overlap_factor
};

struct UpscaleParams : GenerationParams {
  // The low-resolution picture [1, 3, h, w] in [-1, 1]; h and w multiples of the VAE factor
  // (preprocess_low_res makes it so from a picture).
  at::Tensor image;
  int noise_level = 20;    // in [0, max_noise_level]
  at::Tensor latents;      // given initial latents [N, C, h, w] (before init_noise_sigma); replaces the 2nd draw
  at::Tensor image_noise;  // given noise for the picture [1, 3, h, w]; replaces the 1st draw
  VaeTiling tiling;
  UpscaleParams() {
    num_inference_steps = 75;  // diffusers' __call__ defaults
    guidance_scale = 9.0;
  }
};

struct UpscaleOutput {
  at::Tensor images;        // [N, 4h, 4w, 3] float32 in [0, 1]
  at::Tensor latents;       // [N, C, h, w] float32 after the last step (before 1 / scaling)
  at::Tensor noised_image;  // [1, 3, h, w] the picture after noise augmentation
  std::vector<double> timesteps;
};

// diffusers' VaeImageProcessor(vae_scale_factor = f, resample = "bicubic").preprocess of a PIL RGB picture:
// sides rounded down to multiples of f (PIL bicubic resize only when that changes them), then 2 x (u8 / 255) - 1
// -> [1, 3, h, w] float32. InvalidArgument (naming --image) when a side is smaller than f.
at::Tensor preprocess_low_res(const Image& rgb, int f);
// The size preprocess_low_res gives a w x h picture: {w - w % f, h - h % f}.
std::pair<int, int> low_res_size(int width, int height, int f);

// Gives the UNet the noised picture (concatenated after the latents on the channel axis) and the noise level
// (class_labels), batched like the run's UNet batch: [uncond (N); cond (N)] with guidance.
class LowResConditioning : public ResidualProvider {
 public:
  LowResConditioning(at::Tensor noised_image, int noise_level);
  std::string name() const override { return "low-res image (noise level " + std::to_string(noise_level_) + ")"; }
  void check(const ResidualRun& run) const override;
  void prepare(const ResidualRun& run) override;
  void apply(const ResidualStep& step, models::UNetInputs& in) override;

 private:
  at::Tensor image_;  // [1, 3, h, w] float32 CPU
  int noise_level_;
  at::Tensor batch_image_, batch_labels_;  // prepared for the run, on the device
};

// The peak memory of a run on a low_w x low_h picture (pipelines/memory_estimate.h's model): the weights, the
// UNet's activations at the latent size (the whole CFG batch), and the VAE decode at the output size, or at one
// tile's size plus the output with tiling. The output side of the tile plan is what `tiling` decides.
MemoryEstimate estimate_upscale_memory(const loaders::UpscaleModels& m, int low_w, int low_h, int num_images,
                                       bool guided, const VaeTiling& tiling);

class UpscalePipeline {
 public:
  explicit UpscalePipeline(std::shared_ptr<loaders::UpscaleModels> models);
  UpscaleOutput run(const UpscaleParams& p);

  // Phases, for tests and the cascade.
  void check_params(const UpscaleParams& p) const;
  // low_res_scheduler.add_noise(image, noise, noise_level) (diffusers' step 5).
  at::Tensor noise_image(const at::Tensor& image, const at::Tensor& noise, int noise_level) const;
  // latents / vae_scaling_factor -> VAE -> [N, H, W, 3] in [0, 1]; tiled when tiling.enabled.
  at::Tensor decode_latents(const at::Tensor& latents, const VaeTiling& tiling = {}, bool show_progress = false);
  // The VAE output [1, 3, H, W] (before the [0, 1] mapping) of z = latents / scaling, whole or tiled.
  at::Tensor decode_raw(const at::Tensor& z, const VaeTiling& tiling);
  const loaders::UpscaleModels& models() const { return *m_; }

 private:
  std::shared_ptr<loaders::UpscaleModels> m_;
};
}  // namespace dmx::pipelines
