// Strict state-dict loading: missing, unexpected and mis-shaped keys are reported together in one
// FormatError. Parameters keep their dtype and device; checkpoint tensors are cast on copy.
#pragma once
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace torch::nn {
class Module;
}

namespace dmx::io {

struct LoadReport {
  std::vector<std::string> missing;     // in the module, not in the file
  std::vector<std::string> unexpected;  // in the file, not in the module
  std::vector<std::string> mismatched;  // "name: file [a, b] vs model [c, d]"
  size_t loaded = 0;
  bool ok() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  std::string describe(const std::string& what, size_t max_per_list = 10) const;
};

// Copies matching tensors into module parameters and buffers. With strict, any problem throws.
LoadReport load_state_dict(torch::nn::Module& module, const TensorMap& state, const std::string& what,
                           bool strict = true);
// Before a module is built from its config: the weights must hold at least the `params` values the config
// describes (a strict load needs every one), else FormatError naming both counts, so that a config that
// does not match its weights (layers_per_block 1000 beside a small model) is refused before the memory for
// the module is spent.
void check_weights_cover_config(double params, const TensorMap& state, const std::string& what);
// All parameters and buffers by their dotted names.
TensorMap module_state(const torch::nn::Module& module);

// How many more parameters than a file holds a loader may build a model with before it refuses the file's
// config (16 MiB of float32): enough for the strict load to report small differences key by key, far too
// little for a hostile config to make the model's construction allocate without bound.
constexpr double kLoadSlackParameters = 4.0 * 1024 * 1024;
}  // namespace dmx::io
