// Fused CPU inference ops with a composite fallback: GroupNorm (Wu & He 2018, torch.nn.GroupNorm) with an
// optional SiLU (diffusers' ResnetBlock2D norm -> nonlinearity, the VAE's conv_norm_out -> conv_act) in one
// statistics pass and one normalise pass, on AVX-512 kernels (nn/kernels_avx512.h). The fused path runs
// only for inference (no input requires grad, or grad mode is off), on CPU float32/bf16 tensors that are
// contiguous or channels-last, when dmx::fused_kernels() is on and the CPU has AVX512-BF16; everything
// else takes the differentiable composite (at::group_norm, at::silu) with the same results up to rounding.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dmx::nn {
// True when this build and CPU have the AVX-512 kernels (independent of dmx::fused_kernels()).
bool fused_kernels_available();

// group_norm(x, groups, weight, bias, eps) followed by SiLU when `silu`. x: [N, C, *]. Reduced-precision
// inputs are normalised with float32 statistics and arithmetic and rounded once (the composite rounds
// after the norm and again after the SiLU). Returns x's dtype and memory format.
at::Tensor group_norm_act(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                          double eps, bool silu);

// The composite the fused path replaces (kept for tests and A/B measurements).
at::Tensor group_norm_act_composite(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                    const at::Tensor& bias, double eps, bool silu);

// diffusers' GEGLU after its projection: h, gate = proj.chunk(2, -1); h * gelu(gate) (exact GELU).
// proj: [..., 2 n] -> [..., n]. bf16 CPU inference runs one fused pass (float32 math, one rounding; the
// composite rounds the GELU and the product); everything else runs the composite.
at::Tensor geglu(const at::Tensor& proj);
at::Tensor geglu_composite(const at::Tensor& proj);
}  // namespace dmx::nn
