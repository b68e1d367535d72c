// Internal: dmx::generate's one implementation, shared by the file-writing run (dmx::generate) and the in-memory
// run of a Session (include/dmx/session.h), so both take the same checks, loading and pipelines.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>

#include "dmx/dmx.h"
#include "dmx/session.h"
#include "loaders/model_bundle.h"

namespace dmx::api {

// What a Session gives generate_core instead of files.
struct GenerateSink {
  // The model (kept in memory by the session) and its A1111 hash.
  std::function<std::shared_ptr<loaders::StableDiffusionModels>(const std::string& model,
                                                                const loaders::LoadOptions& lo, std::string* hash)>
      load;
  // After each scheduler step of the run (may throw Cancelled).
  std::function<void(loaders::StableDiffusionModels& models, int step, double t, const at::Tensor& latents)> on_step;
  SessionResult result;  // filled instead of writing files
};

// sink == nullptr: dmx::generate (files written atomically); else the pictures go to sink->result.
GenerateResult generate_core(const GenerateOptions& o, GenerateSink* sink);
}  // namespace dmx::api
