// Process-wide runtime settings: threads and OpenMP policy, device and dtype parsing.
#pragma once
#include <string>

namespace dmx {
// Sets libtorch's intra-op threads (0 = all cores). Libtorch starts with 1 thread here.
void configure_threads(int threads);
int hardware_cores();
// libtorch's current intra-op thread count.
int runtime_threads();
// Convolution layout: models run their bf16/fp16 4-d activations channels-last (NHWC, oneDNN's native layout;
// measured 1.5x faster VAE decoding in bf16, see docs/performance.md). On by default; float32 stays NCHW.
void set_channels_last(bool on);
bool channels_last();
}  // namespace dmx
