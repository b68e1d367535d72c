// The single attention function every attention layer calls (matmul/baddbmm + softmax in
// libtorch 1.13; the one place to add memory-efficient or fused kernels).
#pragma once
#include <ATen/core/Tensor.h>

namespace dmx::nn {
// q: [B, H, Nq, d], k and v: [B, H, Nk, d] -> [B, H, Nq, d]. scale multiplies q.k.
// upcast: compute scores and softmax in float32 (diffusers' upcast_attention / upcast_softmax).
// causal: mask j > i (CLIP text encoder).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                     bool causal = false, bool upcast = false);
}  // namespace dmx::nn
