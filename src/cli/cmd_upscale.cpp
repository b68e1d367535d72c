// dmx upscale: text-guided x4 super-resolution with Stable Diffusion's x4 upscaler (docs/upscale.md). Its options
// are rows of the option table (cli/options.cpp), --from and the rules between flags cli/command_rules.cpp.
#include <cstdio>
#include <string>

#include "cli/command_rules.h"
#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/dmx.h"
#include "dmx/upscale.h"

namespace dmx::cli {

int cmd_upscale(int argc, char** argv) {
  UpscaleOptions defaults;
  std::optional<Args> parsed = parse_args(kUpscale, argc, argv, target(kUpscale, defaults));
  if (!parsed) return 0;  // --help
  const UpscaleOptions o = upscale_options(*parsed);
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
