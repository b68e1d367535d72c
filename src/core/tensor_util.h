// Small tensor helpers shared across layers.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>

namespace dmx {

// Named intermediates: an optional recorder passed down a forward captures tensors by path
// (e.g. "down_blocks.1.attentions.0"), for tests and debugging. Null = record nothing.
struct TensorRecorder {
  std::map<std::string, at::Tensor> tensors;
  std::function<bool(const std::string&)> filter;  // empty = record all
  void record(const std::string& name, const at::Tensor& t);
};
inline void record(TensorRecorder* r, const std::string& name, const at::Tensor& t) {
  if (r) r->record(name, t);
}

std::string shape_string(const at::Tensor& t);
}  // namespace dmx
