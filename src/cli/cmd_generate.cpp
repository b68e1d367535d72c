// `dmx generate`: text-to-image, image-to-image, blended editing, LoRA, ControlNet, T2I-Adapters, hypernetworks,
// Stable unCLIP folders and the x4 upscaler cascade (include/dmx/dmx.h). Its
// options are rows of the option table (cli/options.cpp), the rules between them cli/command_rules.cpp.
#include <cstdio>
#include <string>

#include "cli/command_rules.h"
#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/dmx.h"

namespace dmx::cli {

int cmd_generate(int argc, char** argv) {
  GenerateOptions defaults;  // the help's defaults
  std::optional<Args> parsed = parse_args(kGenerate, argc, argv, target(kGenerate, defaults));
  if (!parsed) return 0;  // --help
  const GenerateOptions o = generate_options(*parsed);
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
