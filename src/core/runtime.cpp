#include "core/runtime.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>

#include "dmx/error.h"

namespace dmx {
int hardware_cores() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

void configure_threads(int threads) {
  DMX_CHECK_ARG(threads >= 0 && threads <= 1024, "threads must be in [0, 1024] (0 = all cores), got ", threads);
  const int n = threads == 0 ? hardware_cores() : threads;
  at::set_num_threads(n);
}
int runtime_threads() { return at::get_num_threads(); }

namespace {
std::atomic<bool> g_channels_last{true};
}
void set_channels_last(bool on) { g_channels_last.store(on); }
bool channels_last() { return g_channels_last.load(); }

namespace {
bool initial_fused() {
  const char* e = std::getenv("DMX_FUSED_KERNELS");
  return !(e && std::string(e) == "0");
}
std::atomic<bool> g_fused{initial_fused()};
}  // namespace
void set_fused_kernels(bool on) { g_fused.store(on); }
bool fused_kernels() { return g_fused.load(); }
}  // namespace dmx
