// The rules between options of `dmx generate` and `dmx upscale` (cli/command_rules.h).
#include "cli/command_rules.h"

#include "cli/options.h"

namespace dmx::cli {

GenerateOptions generate_options(const Args& a, bool require_output) {
  GenerateOptions defaults;  // what settings read by --from fall back to
  GenerateOptions o;
  if (a.has("from")) {  // the stored parameters first: the flags given override them
    o = parse_parameters(read_image_parameters(a.str("from")));
    o.from = a.str("from");
  }
  check_required(a, {kModelRequired});
  DMX_CHECK_ARG(a.has("prompt") || a.has("from"), "--prompt is required");
  if (require_output) check_required(a, {kPngOutputRequired});
  // Blended latent diffusion (docs/editing-blended.md): without a --mask, settings read by --from are dropped.
  if (a.str("mask").empty()) {
    o.background = defaults.background;
    o.blend_start = defaults.blend_start;
    o.mask_dilation = defaults.mask_dilation;
    o.rank = defaults.rank;
    o.blend_variant = defaults.blend_variant;
  }
  DMX_CHECK_ARG(!a.has("mask") || a.has("init-image") || !o.init_image.empty(), "--mask needs --init-image");
  for (const char* f : {"background", "blend-start", "mask-dilation", "rank", "blend-variant"})
    DMX_CHECK_ARG(!a.has(f) || a.has("mask"), "--", f, " needs --mask");
  // Stable unCLIP folders: diffusers' StableUnCLIPPipeline defaults (20 steps, guidance 10) unless given.
  if (!a.has("from") && is_unclip_model(a.str("model"))) {
    o.steps = kUnCLIPSteps;
    o.guidance_scale = kUnCLIPGuidanceScale;
  }
  // LCM-distilled folders: diffusers' LatentConsistencyModelPipeline defaults (4 steps, guidance 8.5) unless given.
  if (!a.has("from") && is_lcm_distilled_model(a.str("model"))) {
    o.steps = kLCMSteps;
    o.guidance_scale = kLCMGuidanceScale;
  }
  DMX_CHECK_ARG(a.has("upscale-model") ||
                    !(a.has("upscale-noise-level") || a.has("upscale-steps") || a.has("upscale-guidance-scale")),
                "--upscale-noise-level/--upscale-steps/--upscale-guidance-scale need --upscale-model");
  DMX_CHECK_ARG(a.has("layout") || !(a.has("layout-method") || a.has("layout-guidance-scale")),
                "--layout-method/--layout-guidance-scale need --layout");
  apply_options(a, target(kGenerate, o));
  if (a.has("mask") && !a.has("strength") && !a.has("from")) o.strength = 1.0;  // diffusers' inpaint default
  DMX_CHECK_ARG(o.blend_start < 1.0, "--blend-start must be in [0, 1), got ", o.blend_start);
  DMX_CHECK_ARG(!a.has("strength") || a.has("init-image"), "--strength needs --init-image");
  DMX_CHECK_ARG(!(o.progress == false && o.verbose), "--quiet and --verbose cannot be used together");
  return o;
}

UpscaleOptions upscale_options(const Args& a, bool require_output) {
  UpscaleOptions o;
  if (a.has("from")) {  // the settings of an earlier run; the picture and the model are given again
    const GenerateOptions g = parse_parameters(read_image_parameters(a.str("from")));
    o.from = a.str("from");
    o.prompt = g.prompt;
    o.negative_prompt = g.negative_prompt;
    o.steps = g.steps;
    o.guidance_scale = g.guidance_scale;
    o.scheduler = g.scheduler;
    o.eta = g.eta;
    o.seed = g.seed;
    o.num_images = g.num_images;
    o.noise_level = g.upscale_noise_level;
  }
  check_required(a, {{"model", "a StableDiffusionUpscalePipeline folder"}, {"image", "the low-resolution picture"}});
  DMX_CHECK_ARG(a.has("prompt") || a.has("from"), "--prompt is required (what the picture shows)");
  if (require_output) check_required(a, {kPngOutputRequired});
  apply_options(a, target(kUpscale, o));
  DMX_CHECK_ARG(!(!o.progress && o.verbose), "--quiet and --verbose cannot be used together");
  return o;
}
}  // namespace dmx::cli
