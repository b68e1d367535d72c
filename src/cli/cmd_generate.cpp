// `dmx generate`: text-to-image, image-to-image, blended editing, LoRA, ControlNet, T2I-Adapters, hypernetworks,
// Stable unCLIP folders and the x4 upscaler cascade (include/dmx/dmx.h). Its
// options are rows of the option table (cli/options.cpp); what is here are the rules between them.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/dmx.h"

namespace dmx::cli {

int cmd_generate(int argc, char** argv) {
  GenerateOptions defaults;  // the help's defaults, and what settings read by --from fall back to
  std::optional<Args> parsed = parse_args(kGenerate, argc, argv, target(kGenerate, defaults));
  if (!parsed) return 0;  // --help
  const Args& a = *parsed;
  GenerateOptions o;
  if (a.has("from")) {  // the stored parameters first: the flags given override them
    o = parse_parameters(read_image_parameters(a.str("from")));
    o.from = a.str("from");
  }
  check_required(a, {kModelRequired});
  DMX_CHECK_ARG(a.has("prompt") || a.has("from"), "--prompt is required");
  check_required(a, {kPngOutputRequired});
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
  GenerateResult r = generate(o);
  if (o.progress) {
    for (size_t i = 0; i < r.images.size(); ++i) {
      if (i < r.scores.size())
        std::fprintf(stderr, "rank %zu: sample %d, score %.6g: ", i + 1, r.samples[i], r.scores[i]);
      std::fprintf(stderr, "wrote %s\n", r.images[i].c_str());
    }
    std::fprintf(stderr, "seed %llu, %.2f s\n", static_cast<unsigned long long>(r.seed), r.seconds);
  }
  return 0;
}
}  // namespace dmx::cli
