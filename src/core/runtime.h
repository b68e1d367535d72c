// Process-wide runtime settings: threads and OpenMP policy, device and dtype parsing.
#pragma once
#include <string>

namespace dmx {
// Sets libtorch's intra-op threads (0 = all cores). Libtorch starts with 1 thread here.
void configure_threads(int threads);
int hardware_cores();
// libtorch's current intra-op thread count.
int runtime_threads();
}  // namespace dmx
