// dmx diffedit: DiffEdit editing of a real image (docs/editing-diffedit.md).
#include <cstdio>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/diffedit.h"

namespace dmx::cli {

int cmd_diffedit(int argc, char** argv) {
  DiffEditOptions o;
  const std::optional<Args> a = parse_options(kDiffEdit, argc, argv, o,
                                              {kModelRequired,
                                               {"image", "the image to edit"},
                                               {"source-prompt", "what the image shows"},
                                               {"target-prompt", "what the edited image should show"},
                                               kPngOutputRequired});
  if (!a) return 0;  // --help
  DMX_CHECK_ARG(!(a->has("quiet") && o.verbose), "--quiet and --verbose cannot be used together");
  const DiffEditResult r = diffedit(o);
  if (o.progress) {
    for (const std::string& p : {r.image, r.mask, r.latents})
      if (!p.empty()) std::fprintf(stderr, "wrote %s\n", p.c_str());
    std::fprintf(stderr, "seed %llu, mask %.1f%% of the image, %.2f s (mask %.2f s, inversion %.2f s, edit %.2f s)\n",
                 static_cast<unsigned long long>(r.seed), 100.0 * r.mask_fraction, r.seconds, r.mask_seconds,
                 r.invert_seconds, r.edit_seconds);
  }
  return 0;
}
}  // namespace dmx::cli
