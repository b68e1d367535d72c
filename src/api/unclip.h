// Stable unCLIP entry points of the api (docs/unclip.md): `dmx generate` on a StableUnCLIPPipeline folder, and
// the checks that keep unCLIP-only options off other models.
#pragma once
#include <string>

#include "dmx/dmx.h"

namespace dmx::api {

// model_index.json's _class_name when it names a Stable unCLIP pipeline, else "".
std::string unclip_pipeline_class(const std::string& model);
// generate() on a Stable unCLIP folder: the options that make no sense there are refused (InvalidArgument naming
// them), every input and output is checked before any work, then prior -> noise augmentation -> decoder.
GenerateResult generate_unclip(const GenerateOptions& o);
// generate() on any other model: --prior-steps, --prior-guidance-scale, --noise-level are refused.
void check_no_unclip_options(const GenerateOptions& o);
}  // namespace dmx::api
