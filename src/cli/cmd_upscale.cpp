// dmx upscale: text-guided x4 super-resolution with Stable Diffusion's x4 upscaler (docs/upscale.md). Its options
// are rows of the option table (cli/options.cpp); what is here is --from and the rules between flags.
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/dmx.h"
#include "dmx/upscale.h"

namespace dmx::cli {

int cmd_upscale(int argc, char** argv) {
  UpscaleOptions defaults;
  std::optional<Args> parsed = parse_args(kUpscale, argc, argv, target(kUpscale, defaults));
  if (!parsed) return 0;  // --help
  const Args& a = *parsed;
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
  check_required(a, {kPngOutputRequired});
  apply_options(a, target(kUpscale, o));
  DMX_CHECK_ARG(!(!o.progress && o.verbose), "--quiet and --verbose cannot be used together");
  const UpscaleResult r = upscale(o);
  if (o.progress) {
    for (const auto& p : r.images) std::fprintf(stderr, "wrote %s\n", p.c_str());
    if (!r.latents.empty()) std::fprintf(stderr, "wrote %s\n", r.latents.c_str());
    std::fprintf(stderr, "seed %llu, %dx%d -> %dx%d%s, %.2f s\n", static_cast<unsigned long long>(r.seed),
                 r.low_res_width, r.low_res_height, r.width, r.height, r.tiled ? " (VAE in tiles)" : "", r.seconds);
  }
  return 0;
}
}  // namespace dmx::cli
