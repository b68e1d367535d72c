// Memory of the process: its resident size, and building modules directly in the dtype they run in.
#pragma once
#include <c10/core/DefaultDtype.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace dmx {
// Resident memory of this process from /proc/self/status (Linux): VmRSS now and VmHWM, its peak since the start
// (mapped file pages that were read count too). 0 where unavailable.
int64_t process_rss_bytes();
int64_t process_peak_rss_bytes();

// While alive, modules are built with their floating parameters created directly in `t` (libtorch's default
// dtype), so that a bf16 model never exists in float32: its peak memory is that of its own weights. Restores
// the previous default dtype when it ends. libtorch's default dtype is process-wide: a tensor another thread
// creates without naming a dtype while the guard lives gets `t` too (the model loaders hold it only while they
// build a module).
class DefaultDtypeGuard {
 public:
  explicit DefaultDtypeGuard(at::ScalarType t) : prev_(c10::get_default_dtype()) {
    c10::set_default_dtype(c10::scalarTypeToTypeMeta(t));
  }
  ~DefaultDtypeGuard() { c10::set_default_dtype(prev_); }
  DefaultDtypeGuard(const DefaultDtypeGuard&) = delete;
  DefaultDtypeGuard& operator=(const DefaultDtypeGuard&) = delete;

 private:
  caffe2::TypeMeta prev_;
};
}  // namespace dmx
