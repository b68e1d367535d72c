// dmx variations: image variations with a Stable unCLIP folder (docs/unclip.md). Its options are rows of the
// option table (cli/options.cpp).
#include <cstdio>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/unclip.h"

namespace dmx::cli {

int cmd_variations(int argc, char** argv) {
  VariationsOptions o;
  if (!parse_options(kVariations, argc, argv, o,
                     {{"model", "a StableUnCLIPImg2ImgPipeline folder"},
                      {"image", "the picture to make variations of"},
                      kPngOutputRequired}))
    return 0;  // --help
  DMX_CHECK_ARG(!(!o.progress && o.verbose), "--quiet and --verbose cannot be used together");
  const VariationsResult r = variations(o);
  if (o.progress) {
    for (const auto& p : r.images) std::fprintf(stderr, "wrote %s\n", p.c_str());
    std::fprintf(stderr, "seed %llu, %.2f s\n", static_cast<unsigned long long>(r.seed), r.seconds);
  }
  return 0;
}
}  // namespace dmx::cli
