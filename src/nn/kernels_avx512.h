// Hand-written AVX-512 CPU kernels on raw pointers (no ATen in this interface, so the one translation unit
// compiled with -mavx512* never emits an inline ATen/c10 function another object could pick up on a CPU
// without AVX-512). Callers check cpu_has_avx512_bf16() and parallelise with at::parallel_for.
//   - Attention in bf16: an exact-softmax, row-block ("flash"-style: scores never leave the thread's
//     cache-sized workspace) kernel on AMX-BF16 tiles (or AVX512-BF16 dot products, vdpbf16ps), float32
//     scores, float32 softmax and float32 accumulation; mirrors diffusers' AttnProcessor
//     (softmax(scale q k^T) v).
//   - GroupNorm (+ optional SiLU) in one statistics pass and one normalise pass (Wu & He 2018,
//     torch.nn.GroupNorm followed by torch.nn.SiLU), float32 or bf16, NCHW or NHWC.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dmx::nn::kernels {

// True when this build has the kernels and the CPU runs AVX512-F/BW/VL/DQ and AVX512-BF16.
bool cpu_has_avx512_bf16();
// True when, in addition, the CPU has AMX-BF16 tiles and Linux granted this process the tile state.
bool cpu_has_amx_bf16();

// ---- attention -------------------------------------------------------------------------------------
// q: [B, H, Nq, d], k: [B, H, Nk, d], v: [B, H, Nk, dv], bf16 bit patterns, rows contiguous (the last
// stride is 1; the others are given in elements). out: [B, H, Nq, dv] contiguous bf16.
struct AttnArgs {
  const uint16_t* q = nullptr;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  uint16_t* out = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_sn = 0;
  int64_t k_sb = 0, k_sh = 0, k_sn = 0;
  int64_t v_sb = 0, v_sh = 0, v_sn = 0;
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, d = 0, dv = 0;
  float scale = 1.f;
  int64_t block_rows = 32;  // query rows per task (multiple of 32)
  bool amx = false;         // AMX tiles for both products (cpu_has_amx_bf16()); else AVX512-BF16 dot products
};
// Elements (uint16_t) of the packed K and V of one batch-head, and bytes of one task's workspace.
int64_t attn_packed_k_elems(const AttnArgs& a);
int64_t attn_packed_v_elems(const AttnArgs& a);
int64_t attn_workspace_bytes(const AttnArgs& a);
// Packs batch-head bh's K (pairs along d, 32 keys per block) and V (pairs of keys) for vdpbf16ps.
void attn_pack_kv(const AttnArgs& a, int64_t bh, uint16_t* kp, uint16_t* vp);
// Computes output rows [row0, row0 + block_rows) ∩ [0, Nq) of batch-head bh. ws: attn_workspace_bytes,
// 64-byte aligned.
void attn_rows(const AttnArgs& a, int64_t bh, int64_t row0, const uint16_t* kp, const uint16_t* vp, void* ws);

// ---- GroupNorm + SiLU --------------------------------------------------------------------------------
// Sums of x and x^2 (in double) over n contiguous values, added to *sum / *sumsq.
void sum_sumsq_f32(const float* x, int64_t n, double* sum, double* sumsq);
void sum_sumsq_bf16(const uint16_t* x, int64_t n, double* sum, double* sumsq);
// Per-channel sums over `rows` rows of C contiguous channels (NHWC), added to sum[C] / sumsq[C].
void channel_sum_sumsq_f32(const float* x, int64_t rows, int64_t C, double* sum, double* sumsq);
void channel_sum_sumsq_bf16(const uint16_t* x, int64_t rows, int64_t C, double* sum, double* sumsq);
// y = act(x * scale + shift) over n contiguous values of one channel (NCHW).
void affine_act_f32(const float* x, float* y, int64_t n, float scale, float shift, bool silu);
void affine_act_bf16(const uint16_t* x, uint16_t* y, int64_t n, float scale, float shift, bool silu);
// y[r, c] = act(x[r, c] * scale[c] + shift[c]) over `rows` rows of C channels (NHWC).
void channel_affine_act_f32(const float* x, float* y, int64_t rows, int64_t C, const float* scale, const float* shift,
                            bool silu);
void channel_affine_act_bf16(const uint16_t* x, uint16_t* y, int64_t rows, int64_t C, const float* scale,
                             const float* shift, bool silu);

// ---- GEGLU ---------------------------------------------------------------------------------------------
// out[r, :] = x[r, 0:n] * gelu(x[r, n:2n]) (exact, erf-based GELU) for `rows` rows of 2n contiguous bf16
// values; computed in float32, rounded once.
void geglu_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t n);
}  // namespace dmx::nn::kernels
