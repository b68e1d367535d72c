// The rules between a command's options that its parser alone does not apply (defaults that depend on other
// options, --from, "X needs Y"): one function per command that has them, shared by the command line (cmd_*.cpp)
// and `dmx serve`'s /dmx/v1 endpoints, so both turn the same options into the same run.
#pragma once
#include "cli/args.h"
#include "dmx/dmx.h"
#include "dmx/upscale.h"

namespace dmx::cli {
// `dmx generate`: --from, blended editing's options and --strength default (1 with --mask, as diffusers'
// inpainting), Stable unCLIP's defaults (20 steps, guidance 10), the upscaler cascade's and layouts' "needs".
// InvalidArgument naming the option. `require_output`: --output is required (the command line).
GenerateOptions generate_options(const Args& a, bool require_output = true);
// `dmx upscale`: --from and the required options.
UpscaleOptions upscale_options(const Args& a, bool require_output = true);
}  // namespace dmx::cli
