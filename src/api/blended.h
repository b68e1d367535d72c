// generate() with --mask: option checks and the run of BlendedLatentDiffusionPipeline (internal to the api layer).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/image.h"
#include "dmx/dmx.h"
#include "loaders/model_bundle.h"
#include "pipelines/stable_diffusion.h"

namespace dmx::api {

// Cheap checks before anything is loaded: the mask options need --mask and --init-image, ranges, names.
void check_blended_options(const GenerateOptions& o);
// Loads --mask (InvalidArgument if unreadable) and, unless --width/--height are given (then both are resized),
// checks that it has the init image's size.
Image load_mask(const GenerateOptions& o, const Image& init_rgb);
// --width/--height with --mask: diffusers' StableDiffusionInpaintPipeline(height=, width=) resizes the image and
// the mask with VaeImageProcessor.preprocess (resize_mode "default"): each to (width, height) rounded down to a
// multiple of the VAE factor, with PIL's Lanczos in the image's own mode (the mask before its conversion to gray
// and binarisation at 0.5). A side not given keeps the init image's (diffusers would use unet.sample_size * factor;
// dmx keeps the input's size by default, see docs/editing-blended.md).
void resize_inpaint_inputs(const GenerateOptions& o, int vae_scale_factor, Image& init_rgb, Image& mask);

struct BlendedRun {
  at::Tensor images;           // [N, H, W, 3] in [0, 1], in the order to write (best first with rank)
  at::Tensor latents;          // [N, 4, h, w] after the final blend, same order
  std::vector<double> scores;  // with rank, same order
  std::vector<int> samples;    // with rank, sample index of each
};
// Runs the edit with the settings of `p` (the shared generation parameters with the run's generator, init
// image, strength, given latents) and the mask options of `o`; `seed` seeds the ranking's own noise.
BlendedRun run_blended(std::shared_ptr<loaders::StableDiffusionModels> models,
                       const pipelines::StableDiffusionParams& p, const GenerateOptions& o, const Image& mask,
                       uint64_t seed);
}  // namespace dmx::api
