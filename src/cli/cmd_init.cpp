// `dmx init`: a diffusers folder with freshly initialised weights, to train from scratch (docs/training.md).
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "dmx/error.h"
#include "dmx/train.h"

namespace dmx::cli {
int cmd_init(int argc, char** argv) {
  Args a("init", {
                     {"config", "DIR", "configs: model_index.json, unet/ vae/ text_encoder/ scheduler/ (required)"},
                     {"tokenizer", "DIR", "tokenizer folder (default: <config>/tokenizer)"},
                     {"output", "DIR", "diffusers folder to create (required)"},
                     {"seed", "N", "seed of the initialisation (default 0)"},
                     {"overwrite", "", "replace --output if it exists"},
                     {"quiet", "", "print nothing on success"},
                     {"verbose", "", "stack traces"},
                     {"help", "", "show this help"},
                 });
  a.parse(argc, argv, 2);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return 0;
  }
  InitModelOptions o;
  o.config = a.str("config");
  o.tokenizer = a.str("tokenizer");
  o.output = a.str("output");
  if (a.has("seed")) o.seed = a.u64("seed");
  o.overwrite = a.has("overwrite");
  const InitModelReport r = init_model(o);
  if (!a.has("quiet"))
    std::printf("wrote %s: unet %.2fM, vae %.2fM, text encoder %.2fM parameters\n", o.output.c_str(),
                r.unet_parameters / 1e6, r.vae_parameters / 1e6, r.text_encoder_parameters / 1e6);
  return 0;
}
}  // namespace dmx::cli
