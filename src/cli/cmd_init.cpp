// `dmx init`: a diffusers folder with freshly initialised weights, to train from scratch (docs/training.md).
#include <cstdio>

#include "cli/commands.h"
#include "cli/options.h"
#include "dmx/error.h"
#include "dmx/train.h"

namespace dmx::cli {
int cmd_init(int argc, char** argv) {
  InitModelOptions o;
  const std::optional<Args> a = parse_options(kInit, argc, argv, o);
  if (!a) return 0;  // --help
  const InitModelReport r = init_model(o);
  if (!a->has("quiet"))
    std::printf("wrote %s: unet %.2fM, vae %.2fM, text encoder %.2fM parameters\n", o.output.c_str(),
                r.unet_parameters / 1e6, r.vae_parameters / 1e6, r.text_encoder_parameters / 1e6);
  return 0;
}
}  // namespace dmx::cli
