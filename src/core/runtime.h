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
// Hand-written fused CPU kernels (nn/kernels_avx512: bf16 attention, GroupNorm+SiLU) where the CPU has
// AVX512-BF16. On by default; the DMX_FUSED_KERNELS=0 environment variable or `dmx bench --no-fused`
// turns them off (the composite libtorch ops then run), for A/B measurements and as an escape hatch.
void set_fused_kernels(bool on);
bool fused_kernels();
}  // namespace dmx
