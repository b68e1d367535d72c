#include "core/tensor_util.h"

#include <ATen/ATen.h>

#include <sstream>

namespace dmx {
void TensorRecorder::record(const std::string& name, const at::Tensor& t) {
  if (filter && !filter(name)) return;
  tensors[name] = t.detach().clone();
}

std::string shape_string(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}
}  // namespace dmx
