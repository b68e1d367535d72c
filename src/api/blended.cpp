#include "api/blended.h"

#include <algorithm>
#include <cmath>

#include "core/resize.h"

#include "pipelines/blended_latent_diffusion.h"

namespace dmx::api {

void check_blended_options(const GenerateOptions& o) {
  if (o.mask.empty()) {
    DMX_CHECK_ARG(o.background == "latent" && o.blend_start == 0.0 && o.mask_dilation == 0 && !o.rank &&
                      o.blend_variant == "inpaint",
                  "--background/--blend-start/--mask-dilation/--rank/--blend-variant need --mask");
    return;
  }
  DMX_CHECK_ARG(!o.init_image.empty(), "--mask needs --init-image (the image to edit)");
  DMX_CHECK_ARG(o.controlnets.empty(), "--mask with --controlnet is not supported");
  DMX_CHECK_ARG(std::isfinite(o.strength) && o.strength >= 0 && o.strength <= 1, "--strength must be in [0, 1], got ",
                o.strength);
  DMX_CHECK_ARG(std::isfinite(o.blend_start) && o.blend_start >= 0 && o.blend_start < 1,
                "--blend-start must be in [0, 1), got ", o.blend_start);
  DMX_CHECK_ARG(o.mask_dilation >= 0 && o.mask_dilation <= 64, "--mask-dilation must be in [0, 64], got ",
                o.mask_dilation);
  DMX_CHECK_ARG(o.blend_variant == "inpaint" || o.blend_variant == "legacy",
                "--blend-variant must be one of inpaint, legacy, got '", o.blend_variant, "'");
  try {
    (void)extensions::parse_background(o.background);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(std::string("--") + e.what());
  }
}

Image load_mask(const GenerateOptions& o, const Image& init_rgb) {
  Image mask = load_image(o.mask, "--mask");
  if (o.width || o.height) return mask;  // both are resized to the requested size (resize_inpaint_inputs)
  DMX_CHECK_ARG(mask.width == init_rgb.width && mask.height == init_rgb.height, "--mask is ", mask.width, "x",
                mask.height, " but --init-image is ", init_rgb.width, "x", init_rgb.height,
                " (the mask must have the image's size)");
  return mask;
}

void resize_inpaint_inputs(const GenerateOptions& o, int vae_scale_factor, Image& init_rgb, Image& mask) {
  const int f = std::max(1, vae_scale_factor);
  const int w = (o.width ? o.width : init_rgb.width) / f * f, h = (o.height ? o.height : init_rgb.height) / f * f;
  DMX_CHECK_ARG(w > 0 && h > 0, "--width/--height: ", o.width, "x", o.height, " rounds down to ", w, "x", h,
                " (multiples of the VAE factor ", f, "); give at least ", f, " pixels");
  init_rgb = resize_lanczos(init_rgb, w, h);
  if (mask.channels == 2 || mask.channels == 4) {
    // PIL resizes LA/RGBA with premultiplied alpha before convert("L") drops it; exact only for an opaque mask.
    const int c = mask.channels;
    bool opaque = true;
    for (size_t i = static_cast<size_t>(c - 1); i < mask.data.size() && opaque; i += static_cast<size_t>(c))
      opaque = mask.data[i] == 255;
    DMX_CHECK_ARG(opaque, "--mask: resizing a mask with transparency (--width/--height) is not supported; save it ",
                  "without an alpha channel or at the image's size");
    Image solid;
    solid.width = mask.width;
    solid.height = mask.height;
    solid.channels = c - 1;
    solid.data.reserve(mask.data.size() / static_cast<size_t>(c) * static_cast<size_t>(c - 1));
    for (size_t i = 0; i < mask.data.size(); i += static_cast<size_t>(c))
      solid.data.insert(solid.data.end(), mask.data.begin() + static_cast<long>(i),
                        mask.data.begin() + static_cast<long>(i) + c - 1);
    mask = std::move(solid);
  }
  mask = resize_lanczos(mask, w, h);
}

BlendedRun run_blended(std::shared_ptr<loaders::StableDiffusionModels> models,
                       const pipelines::StableDiffusionParams& sp, const GenerateOptions& o, const Image& mask,
                       uint64_t seed) {
  pipelines::BlendedLatentDiffusionParams p;
  static_cast<pipelines::GenerationParams&>(p) = sp;
  p.init_image = sp.init_image;
  p.latents = sp.latents;
  p.strength = sp.strength;
  p.mask = extensions::mask_to_tensor(mask);
  p.blend_start = o.blend_start;
  p.mask_dilation = o.mask_dilation;
  p.variant = o.blend_variant == "legacy" ? pipelines::BlendVariant::kLegacy : pipelines::BlendVariant::kInpaint;
  p.background = extensions::parse_background(o.background);
  p.reconstruction.show_progress = sp.show_progress;
  p.rank = o.rank;
  p.rank_options.seed = seed;
  pipelines::BlendedLatentDiffusionPipeline pipe(std::move(models));
  auto out = pipe.run(p);
  BlendedRun r;
  const at::Tensor idx = at::tensor(std::vector<int64_t>(out.order.begin(), out.order.end()), at::kLong);
  r.images = out.images.index_select(0, idx).contiguous();
  r.latents = out.latents.index_select(0, idx).contiguous();
  if (o.rank) {
    for (int i : out.order) {
      r.scores.push_back(out.scores[static_cast<size_t>(i)]);
      r.samples.push_back(i);
    }
  }
  return r;
}
}  // namespace dmx::api
