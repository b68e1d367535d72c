// Latent blending and background reconstruction for Blended Latent Diffusion (Avrahami, Fried & Lischinski,
// "Blended Latent Diffusion", SIGGRAPH 2023; official code omriav/blended-latent-diffusion), and the masked
// latent blending of diffusers 0.27.2's StableDiffusionInpaintPipeline with a 4-channel UNet and of the
// deprecated StableDiffusionInpaintPipelineLegacy.
//
// Per step:  z <- z_fg * m + noised(z_init, t') * (1 - m), m = the edit mask at latent size (1 = edit).
// After the loop: z <- z_fg * m + z_init * (1 - m). Background reconstruction then works in pixels.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "core/image.h"
#include "models/autoencoder_kl.h"
#include "schedulers/scheduler.h"

namespace dmx::extensions {

// ---- masks -------------------------------------------------------------------------------------------
// 8-bit mask (gray, RGB or RGBA; colour converted as PIL's convert("L")) -> [1, 1, H, W] float32 L / 255.
at::Tensor mask_to_tensor(const Image& mask);
// diffusers' VaeImageProcessor.binarize: values < 0.5 -> 0, the rest -> 1.
at::Tensor binarize_mask(const at::Tensor& mask);

// Nearest-neighbour downsampling of [B, C, H, W] to [B, C, h, w]:
//   kTorch: F.interpolate(mode="nearest"): src = min(floor(dst * float(in / out)), in - 1) (diffusers' inpaint);
//   kPil:   PIL Image.resize(NEAREST): src = floor((dst + 0.5) * in / out) (the legacy pipeline, the BLD code).
enum class NearestMode { kTorch, kPil };
at::Tensor resize_mask_nearest(const at::Tensor& mask, int64_t h, int64_t w, NearestMode mode);

// Progressive mask shrinking (the BLD code's mask_dilation_iterations): masks[0] is the mask dilated with a
// (3 + 2 (d - 1))-square, ..., masks[d - 1] with a 3-square, masks[d] the mask itself. [1, 1, h, w] each.
std::vector<at::Tensor> progressive_masks(const at::Tensor& mask, int dilation);
// Which of num_masks masks step `step` of `total_steps` uses: step / (total_steps / num_masks + 1).
int progressive_mask_index(int step, int total_steps, int num_masks);

// ---- the blend ---------------------------------------------------------------------------------------
enum class BlendSchedule {
  // diffusers' inpaint pipeline (4-channel UNet): after step i the background is noised to the level of
  // the NEXT timestep, timesteps[i + 1]: z = (1 - m) * noised + m * z.
  kNextTimestep,
  // The legacy inpaint pipeline and the BLD code: noised to the level of the step's own timestep t:
  // z = noised * keep + z * (1 - keep), keep = 1 - m.
  kSameTimestep,
};

struct LatentBlendConfig {
  at::Tensor image_latents;       // z_init, scaled: [N, 4, h, w]
  at::Tensor noise;               // the noise that noises z_init: [N, 4, h, w]
  std::vector<at::Tensor> masks;  // [1, 1, h, w], 1 = edit; several = progressive shrinking (first = widest)
  at::Tensor final_mask;          // [1, 1, h, w] used by the final blend (default: masks.back())
  BlendSchedule schedule = BlendSchedule::kNextTimestep;
  int start_index = 0;       // index in scheduler.timesteps() of the loop's first step
  int num_steps = 0;         // steps the loop runs
  int blend_start_step = 0;  // steps before blending begins (the paper's blending_start_percentage)
};

// The step callback (on_step_end) and the final blend. Holds a reference to the scheduler for add_noise.
class LatentBlend {
 public:
  LatentBlend(const schedulers::Scheduler& scheduler, LatentBlendConfig cfg);
  // Blends after loop step `step` (0-based within the run); a no-op before blend_start_step.
  void on_step_end(int step, at::Tensor& latents) const;
  // After the loop: z_init outside the mask, z inside.
  at::Tensor final_blend(const at::Tensor& latents) const;
  const at::Tensor& mask_at(int step) const;

 private:
  at::Tensor blend(const at::Tensor& background, const at::Tensor& latents, const at::Tensor& mask) const;
  const schedulers::Scheduler& sched_;
  LatentBlendConfig cfg_;
};

// ---- background reconstruction (BLD section 4.1) -----------------------------------------------------
enum class Background { kLatent, kPixel, kPoisson, kOptimizeLatents, kFinetuneDecoder };
Background parse_background(const std::string& name);  // InvalidArgument listing the choices
std::string background_name(Background b);
std::vector<std::string> background_names();

// Images here are [H, W, 3] float32 in [0, 1]; masks [H, W] float32 in {0, 1} (1 = edit).
// Pixel stitching: edited inside the mask, the original outside.
at::Tensor pixel_stitch(const at::Tensor& edited, const at::Tensor& original, const at::Tensor& mask);
// Poisson blending of the edited region into the original: OpenCV's seamlessClone (NORMAL_CLONE) on 8-bit
// images, placed at the centre of the mask's bounding box so that nothing moves. Returns [H, W, 3] in [0, 1]
// on the 1/255 grid. An empty mask returns the original.
at::Tensor poisson_blend(const at::Tensor& edited, const at::Tensor& original, const at::Tensor& mask);

struct ReconstructionOptions {
  int steps = 75;                  // the BLD code's optimization_steps
  double latents_lr = 0.1;         // Adam lr for "optimize latents" (the BLD code)
  double decoder_lr = 1e-4;        // Adam lr for "fine-tune decoder" (the paper and code)
  double background_weight = 100;  // lambda, the BLD code's preservation_ratio
  bool show_progress = false;
};
// loss(x) = mse(x * m, edited * m) + lambda * mse(x * (1 - m), original * (1 - m)), images in [-1, 1],
// x = D(z). optimize_latents optimises z from `latents` (scaled, [1, 4, h, w]); finetune_decoder optimises
// the VAE decoder's weights for this one image (restored before returning). Both return [H, W, 3] in [0, 1].
at::Tensor optimize_latents(models::AutoencoderKL& vae, const at::Tensor& latents, const at::Tensor& edited,
                            const at::Tensor& original, const at::Tensor& mask, const ReconstructionOptions& o);
at::Tensor finetune_decoder(models::AutoencoderKL& vae, const at::Tensor& latents, const at::Tensor& edited,
                            const at::Tensor& original, const at::Tensor& mask, const ReconstructionOptions& o);

// ---- measurements -----------------------------------------------------------------------------------
// Mean |result - original| over pixels outside the mask, in 0-255 units (0 when the mask covers all).
double error_outside_mask(const at::Tensor& result, const at::Tensor& original, const at::Tensor& mask);
// Seam visibility: the mean gradient magnitude of `result` over the pixels on the mask boundary (a pixel
// whose 4-neighbourhood holds both values) divided by that of `original` on the same pixels; ~1 = the seam
// is no sharper than the image was there, > 1 = a visible seam.
double seam_visibility(const at::Tensor& result, const at::Tensor& original, const at::Tensor& mask);
}  // namespace dmx::extensions
