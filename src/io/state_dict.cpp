#include "io/state_dict.h"

#include <torch/nn/module.h>

#include <algorithm>
#include <set>
#include <sstream>

#include "dmx/error.h"
#include "io/releasing_load.h"

namespace dmx::io {

static std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

std::string LoadReport::describe(const std::string& what, size_t max_per_list) const {
  std::ostringstream os;
  os << what << ": state dict does not match the model (" << missing.size() << " missing, " << unexpected.size()
     << " unexpected, " << mismatched.size() << " mis-shaped)";
  auto list = [&](const char* title, const std::vector<std::string>& v) {
    if (v.empty()) return;
    os << "\n  " << title << ":";
    for (size_t i = 0; i < v.size() && i < max_per_list; ++i) os << "\n    " << v[i];
    if (v.size() > max_per_list) os << "\n    ... and " << v.size() - max_per_list << " more";
  };
  list("missing", missing);
  list("unexpected", unexpected);
  list("mis-shaped", mismatched);
  return os.str();
}

TensorMap module_state(const torch::nn::Module& module) {
  TensorMap out;
  for (const auto& p : module.named_parameters(true)) out[p.key()] = p.value();
  for (const auto& b : module.named_buffers(true)) out[b.key()] = b.value();
  return out;
}

namespace {
LoadReport check_state(const TensorMap& target, const TensorMap& state) {
  LoadReport r;
  for (const auto& kv : target) {
    auto it = state.find(kv.first);
    if (it == state.end()) {
      r.missing.push_back(kv.first);
      continue;
    }
    if (!it->second.sizes().equals(kv.second.sizes())) {
      r.mismatched.push_back(kv.first + ": file " + shape_str(it->second.sizes()) + " vs model " +
                             shape_str(kv.second.sizes()));
    }
  }
  for (const auto& kv : state)
    if (!target.count(kv.first)) r.unexpected.push_back(kv.first);
  return r;
}
}  // namespace

LoadReport load_state_dict(torch::nn::Module& module, const TensorMap& state, const std::string& what, bool strict) {
  TensorMap target = module_state(module);
  LoadReport r = check_state(target, state);
  if (strict && !r.ok()) throw FormatError(r.describe(what));
  at::NoGradGuard no_grad;
  for (auto& kv : target) {
    auto it = state.find(kv.first);
    if (it == state.end() || !it->second.sizes().equals(kv.second.sizes())) continue;
    kv.second.copy_(it->second);
    ++r.loaded;
  }
  return r;
}

LoadReport load_state_dict_releasing(torch::nn::Module& module, TensorMap& state, const std::string& what,
                                     size_t chunk_bytes) {
  TensorMap target = module_state(module);
  LoadReport r = check_state(target, state);
  if (!r.ok()) throw FormatError(r.describe(what));
  at::NoGradGuard no_grad;
  for (auto& kv : target) {
    auto it = state.find(kv.first);
    const at::Tensor& src = it->second;
    const size_t bytes = static_cast<size_t>(src.numel()) * src.element_size();
    if (bytes > chunk_bytes && src.dim() > 0 && src.size(0) > 1 && src.is_contiguous()) {
      // Slices of whole rows: the same element-wise cast, so the same values as one copy.
      const int64_t rows = std::max<int64_t>(1, static_cast<int64_t>(chunk_bytes / (bytes / src.size(0))));
      for (int64_t i = 0; i < src.size(0); i += rows) {
        const int64_t k = std::min(rows, src.size(0) - i);
        kv.second.narrow(0, i, k).copy_(src.narrow(0, i, k));
        release_mapped_pages(src.narrow(0, i, k));
      }
    } else {
      kv.second.copy_(src);
    }
    release_mapped_pages(src);
    state.erase(it);
    ++r.loaded;
  }
  return r;
}

void check_weights_cover_config(double params, const TensorMap& state, const std::string& what) {
  double stored = 0;
  for (const auto& kv : state) stored += static_cast<double>(kv.second.numel());
  if (params <= stored) return;
  throw FormatError(detail::concat(what, ": the config describes a model of ", static_cast<int64_t>(params),
                                   " parameters, but the weights hold only ", static_cast<int64_t>(stored),
                                   " values: the config does not match the weights (nothing was built)"));
}
}  // namespace dmx::io
