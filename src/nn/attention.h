// The single attention function every attention layer calls (matmul + softmax in libtorch 1.13; the one
// place to add memory-efficient or fused kernels). Mirrors diffusers' Attention.get_attention_scores +
// AttnProcessor (scores = scale * q k^T, softmax, @ v) and transformers' CLIP causal attention.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dmx::nn {
// q: [B, H, Nq, d], k and v: [B, H, Nk, d] -> [B, H, Nq, d]. scale multiplies q.k.
// upcast: compute scores and softmax in float32 (diffusers' upcast_attention / upcast_softmax); the
// probabilities are cast back to v's dtype before the product with v, as diffusers does.
// causal: mask j > i (CLIP text encoder). bias: an additive mask added to the scaled scores, broadcastable to
// [B, H, Nq, Nk] (diffusers' attention_mask as baddbmm adds it; the PriorTransformer's -10000 causal and
// padding mask).
// Computed in tiles of (batch-heads) x (query rows) so that one score tensor holds at most
// max_score_elements() values (all batch-heads of the tile together); the result does not depend on the
// tiling beyond float rounding. The scale is applied to q before the product.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal = false,
                     bool upcast = false, const at::Tensor& bias = {});

// Score-tile budget (default 2^20 elements = 4 MiB in float32, measured fastest: docs/performance.md;
// the DMX_ATTN_SCORE_ELEMENTS environment variable sets the initial value, for measurements).
int64_t max_score_elements();
void set_max_score_elements(int64_t n);  // n >= 1; throws InvalidArgument otherwise

// bf16 inference on CPUs with AVX512-BF16 (dmx::fused_kernels() on, causal false, no bias, no input requiring grad)
// runs a fused kernel instead of the tiles above: float32 scores and softmax kept in a per-thread
// workspace, AMX tiles for both products where the CPU has them (docs/performance.md). This switch
// (initially off when DMX_ATTN_AMX=0) selects the AVX512-BF16 dot-product variant instead, for tests and A/B.
void set_attention_amx(bool on);
}  // namespace dmx::nn
