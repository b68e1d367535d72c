// dmx restore: Palette restoration (docs/palette.md). Its options are rows of the option table (cli/options.cpp).
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/restore.h"

namespace dmx::cli {

int cmd_restore(int argc, char** argv) {
  RestoreOptions o;
  if (!parse_options(kRestore, argc, argv, o,
                     {{"model", "a Palette folder made by dmx train palette"},
                      {"image", "the picture to restore"},
                      kPngOutputRequired}))
    return 0;  // --help
  DMX_CHECK_ARG(!(!o.progress && o.verbose), "--quiet and --verbose cannot be used together");
  const RestoreResult r = restore(o);
  if (o.progress) {
    for (const auto& p : r.images) std::fprintf(stderr, "wrote %s\n", p.c_str());
    std::fprintf(stderr, "Palette %s, %dx%d, %d steps, seed %llu, %.2f s\n", r.task.c_str(), r.width, r.height, r.steps,
                 static_cast<unsigned long long>(r.seed), r.seconds);
  }
  return 0;
}
}  // namespace dmx::cli
