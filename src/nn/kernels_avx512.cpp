// AVX-512 kernels (see kernels_avx512.h). This file alone is compiled with -mavx512f/bw/vl/dq/bf16 and
// includes no ATen/c10 header; the callers dispatch on cpu_has_avx512_bf16() at run time.
#include "nn/kernels_avx512.h"

#if defined(DMX_AVX512_KERNELS)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstring>

namespace dmx::nn::kernels {

bool cpu_has_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    if (!cpu_has_avx512_bf16()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    const bool amx = ((d >> 22) & 1u) && ((d >> 24) & 1u);  // AMX-BF16, AMX-TILE
    if (!amx) return false;
    // Linux needs each process to ask for the tile data state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

namespace {
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// 2^x for float32 lanes: x = n + f, f in [-0.5, 0.5], 2^f by its degree-7 Taylor polynomial (relative
// error < 1e-8 + rounding), 2^n by vscalefps (exact, gives 0 / inf out of range).
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(150.f)), _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252734e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 2^x for x <= 0 finite (softmax after max subtraction): degree-5 Taylor polynomial, relative error < 3e-6,
// far below the bf16 rounding of the probabilities (2^-9).
inline __m512 exp2_nonpos_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3333558e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// silu(y) = y / (1 + e^-y)
inline __m512 silu_ps(__m512 y) {
  const __m512 e = exp2_ps(_mm512_mul_ps(y, _mm512_set1_ps(-1.4426950408889634f)));
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 maskz_load_bf16(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }  // round to nearest even
inline void store_bf16(uint16_t* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, to_bf16(x)); }
inline void mask_store_bf16(uint16_t* p, __mmask16 m, __m512 x) { _mm256_mask_storeu_epi16(p, m, to_bf16(x)); }

inline __m512i bcast_pair(const uint16_t* p) {  // (p[0], p[1]) as one 32-bit lane, broadcast
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

constexpr int kMR = 8;  // rows per register tile

struct AttnDims {
  int64_t P, d2, NkB, ldp, Jv, dvp, ldq;
};
AttnDims dims(const AttnArgs& a) {
  AttnDims m;
  m.P = (a.d + 1) / 2;
  m.d2 = 2 * m.P;
  m.NkB = round_up(a.Nk, 32);                                     // score columns
  m.ldp = a.amx ? round_up(a.Nk, 32) : round_up(a.Nk, 16);        // probability row stride
  m.Jv = a.amx ? round_up(a.Nk, 32) / 2 : round_up(a.Nk, 2) / 2;  // key pairs in packed V
  m.dvp = round_up(a.dv, 16);
  m.ldq = a.amx ? round_up(a.d, 32) : m.d2;  // packed q row stride
  return m;
}

// S[r, 0:32] = scl * sum_p q[r, 2p:2p+2] . K[0:32, 2p:2p+2], r < 8. kb: one packed 32-key block [P][32][2].
inline void score_tile(const uint16_t* q, int64_t ldq, const uint16_t* kb, int64_t P, float* s, int64_t lds,
                       __m512 scl) {
  __m512 acc[kMR][2];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kb + p * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kb + p * 64 + 32);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512bh av = (__m512bh)bcast_pair(q + r * ldq + 2 * p);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(acc[r][0], scl));
    _mm512_storeu_ps(s + r * lds + 16, _mm512_mul_ps(acc[r][1], scl));
  }
}

// out[r, 0:16 NV] = inv_l[r] * sum_j P[r, 2j:2j+2] . V[2j:2j+2, 0:16 NV], r < min(8, rows).
template <int NV>
inline void pv_tile(const uint16_t* pr, int64_t ldp, const uint16_t* vb, int64_t ldv, int64_t J, const float* inv_l,
                    uint16_t* o, int64_t ldo, int64_t rows, int64_t cols) {
  __m512 acc[kMR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) b[c] = (__m512bh)_mm512_loadu_si512(vb + j * ldv + c * 32);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512bh av = (__m512bh)bcast_pair(pr + r * ldp + 2 * j);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, b[c]);
    }
  }
  const int64_t rn = imin(kMR, rows);
  for (int64_t r = 0; r < rn; ++r) {
    const __m512 il = _mm512_set1_ps(inv_l[r]);
    for (int c = 0; c < NV; ++c) {
      const int64_t left = cols - 16 * c;
      if (left <= 0) break;
      mask_store_bf16(o + r * ldo + 16 * c, tail_mask(left), _mm512_mul_ps(acc[r][c], il));
    }
  }
}

// ---- AMX tiles: 16 rows x 64 bytes each; C (fp32 16x16) += A (bf16 16x32) B (bf16 pairs 16x16x2) ----
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
inline void amx_begin() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// S[0:32, 0:32] = Q[0:32, :] K[0:32, :]^T (raw, unscaled). q: [32, ldq] bf16; kb0/kb1: packed 16-key tiles
// [dch][16 pairs][16 keys][2].
inline void amx_score_32x32(const uint16_t* q, int64_t ldq, const uint16_t* kb0, const uint16_t* kb1, int64_t dch,
                            float* s, int64_t lds) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t ch = 0; ch < dch; ++ch) {
    _tile_loadd(4, q + ch * 32, ldq * 2);
    _tile_loadd(5, q + 16 * ldq + ch * 32, ldq * 2);
    _tile_loadd(6, kb0 + ch * 512, 64);
    _tile_loadd(7, kb1 + ch * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, s, lds * 4);
  _tile_stored(1, s + 16, lds * 4);
  _tile_stored(2, s + 16 * lds, lds * 4);
  _tile_stored(3, s + 16 * lds + 16, lds * 4);
}

// O[0:16, 0:16 nc] = P[0:16, 0:32 kc] V[0:32 kc, 0:16 nc], nc <= 3. p: [16, ldp] bf16; vb: packed V
// [pairs][dvp][2] at the first column; o: fp32 [16, ldo].
inline void amx_pv_16(const uint16_t* p, int64_t ldp, const uint16_t* vb, int64_t dvp, int64_t kc, int nc, float* o,
                      int64_t ldo) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  const int64_t ldv = dvp * 4;  // bytes per key pair
  for (int64_t c = 0; c < kc; ++c) {
    _tile_loadd(3, p + c * 32, ldp * 2);
    const uint16_t* v = vb + c * 16 * dvp * 2;
    _tile_loadd(4, v, ldv);
    _tile_dpbf16ps(0, 3, 4);
    if (nc > 1) {
      _tile_loadd(5, v + 32, ldv);
      _tile_dpbf16ps(1, 3, 5);
    }
    if (nc > 2) {
      _tile_loadd(6, v + 64, ldv);
      _tile_dpbf16ps(2, 3, 6);
    }
  }
  _tile_stored(0, o, ldo * 4);
  if (nc > 1) _tile_stored(1, o + 16, ldo * 4);
  if (nc > 2) _tile_stored(2, o + 32, ldo * 4);
}
}  // namespace

int64_t attn_packed_k_elems(const AttnArgs& a) {
  const AttnDims m = dims(a);
  return m.NkB * m.ldq;
}
int64_t attn_packed_v_elems(const AttnArgs& a) {
  const AttnDims m = dims(a);
  return 2 * m.Jv * m.dvp;
}
int64_t attn_workspace_bytes(const AttnArgs& a) {
  const AttnDims m = dims(a);
  const int64_t M = a.block_rows;
  return round_up(M * m.ldq * 2, 64) + round_up(M * m.NkB * 4, 64) + round_up(M * m.ldp * 2, 64) + round_up(M * 4, 64) +
         round_up(M * m.dvp * 4, 64);
}

void attn_pack_kv(const AttnArgs& a, int64_t bh, uint16_t* kp, uint16_t* vp) {
  const AttnDims m = dims(a);
  const int64_t b = bh / a.H, h = bh % a.H;
  const uint16_t* K = a.k + b * a.k_sb + h * a.k_sh;
  const uint16_t* V = a.v + b * a.v_sb + h * a.v_sh;
  if (a.amx) {
    // kp[key / 16][c / 32][(c % 32) / 2][key % 16][c % 2] = K[key][c]
    const int64_t dch = m.ldq / 32;
    for (int64_t key = 0; key < m.NkB; ++key) {
      uint16_t* dst = kp + (key / 16) * dch * 512 + (key % 16) * 2;
      const uint16_t* src = K + key * a.k_sn;
      for (int64_t c = 0; c < m.ldq; ++c)
        dst[(c / 32) * 512 + ((c % 32) / 2) * 32 + (c % 2)] = key < a.Nk && c < a.d ? src[c] : uint16_t(0);
    }
  } else {
    // kp[key / 32][c / 2][key % 32][c % 2] = K[key][c]
    for (int64_t key = 0; key < m.NkB; ++key) {
      uint16_t* dst = kp + (key / 32) * m.P * 64 + (key % 32) * 2;
      const uint16_t* src = K + key * a.k_sn;
      for (int64_t c = 0; c < m.d2; ++c) dst[(c / 2) * 64 + (c % 2)] = key < a.Nk && c < a.d ? src[c] : uint16_t(0);
    }
  }
  // vp[key / 2][c][key % 2] = V[key][c]
  for (int64_t key = 0; key < 2 * m.Jv; ++key) {
    uint16_t* dst = vp + (key / 2) * m.dvp * 2 + (key % 2);
    const uint16_t* src = V + key * a.v_sn;
    for (int64_t c = 0; c < m.dvp; ++c) dst[c * 2] = key < a.Nk && c < a.dv ? src[c] : uint16_t(0);
  }
}

void attn_rows(const AttnArgs& a, int64_t bh, int64_t row0, const uint16_t* kp, const uint16_t* vp, void* ws) {
  const AttnDims m = dims(a);
  const int64_t M = a.block_rows, rows = imin(M, a.Nq - row0);
  char* w = static_cast<char*>(ws);
  uint16_t* qb = reinterpret_cast<uint16_t*>(w);  // [M, ldq] zero-padded q rows
  w += round_up(M * m.ldq * 2, 64);
  float* S = reinterpret_cast<float*>(w);  // [M, NkB] raw scores q.k
  w += round_up(M * m.NkB * 4, 64);
  uint16_t* Pb = reinterpret_cast<uint16_t*>(w);  // [M, ldp] unnormalised probabilities, bf16, padding 0
  w += round_up(M * m.ldp * 2, 64);
  float* inv_l = reinterpret_cast<float*>(w);  // [M]
  w += round_up(M * 4, 64);
  float* Ob = reinterpret_cast<float*>(w);  // [M, dvp] (AMX path)

  const int64_t b = bh / a.H, h = bh % a.H;
  const uint16_t* Q = a.q + b * a.q_sb + h * a.q_sh + row0 * a.q_sn;
  for (int64_t r = 0; r < M; ++r) {
    uint16_t* dst = qb + r * m.ldq;
    if (r < rows) {
      std::memcpy(dst, Q + r * a.q_sn, a.d * sizeof(uint16_t));
      std::memset(dst + a.d, 0, (m.ldq - a.d) * sizeof(uint16_t));
    } else {
      std::memset(dst, 0, m.ldq * sizeof(uint16_t));
    }
  }

  // 1. raw scores S = q k^T (float32 accumulation)
  if (a.amx) {
    amx_begin();
    const int64_t dch = m.ldq / 32;
    for (int64_t r0 = 0; r0 < rows; r0 += 32)
      for (int64_t n0 = 0; n0 < m.NkB; n0 += 32)
        amx_score_32x32(qb + r0 * m.ldq, m.ldq, kp + (n0 / 16) * dch * 512, kp + (n0 / 16 + 1) * dch * 512, dch,
                        S + r0 * m.NkB + n0, m.NkB);
  } else {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t blk = 0; blk < m.NkB / 32; ++blk) {
      const uint16_t* kb = kp + blk * m.P * 64;
      for (int64_t r0 = 0; r0 < rows; r0 += kMR)
        score_tile(qb + r0 * m.ldq, m.ldq, kb, m.P, S + r0 * m.NkB + blk * 32, m.NkB, one);
    }
  }
  // 2. exact softmax per row in float32: p = 2^((s - max) scale log2 e), l = sum p; p stored as bf16
  const __m512 scl = _mm512_set1_ps(a.scale * 1.4426950408889634f);
  const int64_t rows_pad = round_up(rows, a.amx ? 16 : kMR);
  for (int64_t r = 0; r < rows_pad; ++r) {
    const float* s = S + r * m.NkB;
    uint16_t* pr = Pb + r * m.ldp;
    if (r >= rows) {  // padding rows of the last register tile
      std::memset(pr, 0, m.ldp * sizeof(uint16_t));
      inv_l[r] = 0.f;
      continue;
    }
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < a.Nk; i += 16) {
      const __mmask16 mk = tail_mask(a.Nk - i);
      vmax = _mm512_mask_max_ps(vmax, mk, vmax, _mm512_maskz_loadu_ps(mk, s + i));
    }
    const __m512 mx_scl = _mm512_mul_ps(_mm512_set1_ps(_mm512_reduce_max_ps(vmax)), scl);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t i = 0; i < m.ldp; i += 16) {
      const __mmask16 mk = tail_mask(a.Nk - i);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, s + i), scl, mx_scl);  // (s - max) scale log2 e
      const __m512 e = _mm512_maskz_mov_ps(mk, exp2_nonpos_ps(_mm512_min_ps(x, _mm512_setzero_ps())));
      vsum = _mm512_add_ps(vsum, e);
      store_bf16(pr + i, e);
    }
    inv_l[r] = 1.f / _mm512_reduce_add_ps(vsum);
  }
  // 3. out = (p v) / l
  uint16_t* O = a.out + (bh * a.Nq + row0) * a.dv;
  const int64_t NV = m.dvp / 16;
  if (a.amx) {
    const int64_t kc = m.ldp / 32;
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
      for (int64_t c0 = 0; c0 < NV; c0 += 3)
        amx_pv_16(Pb + r0 * m.ldp, m.ldp, vp + c0 * 32, m.dvp, kc, static_cast<int>(imin(3, NV - c0)),
                  Ob + r0 * m.dvp + c0 * 16, m.dvp);
    _tile_release();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 il = _mm512_set1_ps(inv_l[r]);
      for (int64_t c = 0; c < a.dv; c += 16)
        mask_store_bf16(O + r * a.dv + c, tail_mask(a.dv - c), _mm512_mul_ps(_mm512_loadu_ps(Ob + r * m.dvp + c), il));
    }
    return;
  }
  const int64_t ldv = m.dvp * 2;
  for (int64_t c0 = 0; c0 < NV; c0 += 3) {
    const int64_t nv = imin(3, NV - c0), cols = a.dv - 16 * c0;
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const uint16_t* pr = Pb + r0 * m.ldp;
      const uint16_t* vb = vp + c0 * 32;
      uint16_t* o = O + r0 * a.dv + 16 * c0;
      if (nv == 3)
        pv_tile<3>(pr, m.ldp, vb, ldv, m.Jv, inv_l + r0, o, a.dv, rows - r0, cols);
      else if (nv == 2)
        pv_tile<2>(pr, m.ldp, vb, ldv, m.Jv, inv_l + r0, o, a.dv, rows - r0, cols);
      else
        pv_tile<1>(pr, m.ldp, vb, ldv, m.Jv, inv_l + r0, o, a.dv, rows - r0, cols);
    }
  }
}

// ---- GroupNorm + SiLU --------------------------------------------------------------------------------
namespace {
inline void acc_pd(__m512 x, __m512d& s0, __m512d& s1, __m512d& q0, __m512d& q1) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1));
  s0 = _mm512_add_pd(s0, lo);
  s1 = _mm512_add_pd(s1, hi);
  q0 = _mm512_fmadd_pd(lo, lo, q0);
  q1 = _mm512_fmadd_pd(hi, hi, q1);
}
template <bool BF16, typename T>
void sum_sumsq(const T* x, int64_t n, double* sum, double* sumsq) {
  __m512d s0 = _mm512_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    __m512 v;
    if constexpr (BF16)
      v = maskz_load_bf16(mk, reinterpret_cast<const uint16_t*>(x) + i);
    else
      v = _mm512_maskz_loadu_ps(mk, reinterpret_cast<const float*>(x) + i);
    acc_pd(v, s0, s1, q0, q1);
  }
  *sum += _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  *sumsq += _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
}
template <bool BF16, typename T>
void channel_sum_sumsq(const T* x, int64_t rows, int64_t C, double* sum, double* sumsq) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 mk = tail_mask(C - c);
      __m512 v;
      if constexpr (BF16)
        v = maskz_load_bf16(mk, reinterpret_cast<const uint16_t*>(x) + r * C + c);
      else
        v = _mm512_maskz_loadu_ps(mk, reinterpret_cast<const float*>(x) + r * C + c);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
      const __mmask8 ml = __mmask8(mk & 0xFF), mh = __mmask8(mk >> 8);
      _mm512_mask_storeu_pd(sum + c, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, sum + c), lo));
      _mm512_mask_storeu_pd(sumsq + c, ml, _mm512_fmadd_pd(lo, lo, _mm512_maskz_loadu_pd(ml, sumsq + c)));
      _mm512_mask_storeu_pd(sum + c + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, sum + c + 8), hi));
      _mm512_mask_storeu_pd(sumsq + c + 8, mh, _mm512_fmadd_pd(hi, hi, _mm512_maskz_loadu_pd(mh, sumsq + c + 8)));
    }
  }
}
template <bool SILU>
inline __m512 affine_act(__m512 x, __m512 scale, __m512 shift) {
  const __m512 y = _mm512_fmadd_ps(x, scale, shift);
  if constexpr (SILU) return silu_ps(y);
  return y;
}
template <bool BF16, bool SILU, typename T>
void affine_act(const T* x, T* y, int64_t n, float scale, float shift) {
  const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    if constexpr (BF16) {
      const __m512 v = maskz_load_bf16(mk, reinterpret_cast<const uint16_t*>(x) + i);
      mask_store_bf16(reinterpret_cast<uint16_t*>(y) + i, mk, affine_act<SILU>(v, sc, sh));
    } else {
      const __m512 v = _mm512_maskz_loadu_ps(mk, reinterpret_cast<const float*>(x) + i);
      _mm512_mask_storeu_ps(reinterpret_cast<float*>(y) + i, mk, affine_act<SILU>(v, sc, sh));
    }
  }
}
template <bool BF16, bool SILU, typename T>
void channel_affine_act(const T* x, T* y, int64_t rows, int64_t C, const float* scale, const float* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 mk = tail_mask(C - c);
      const __m512 sc = _mm512_maskz_loadu_ps(mk, scale + c), sh = _mm512_maskz_loadu_ps(mk, shift + c);
      if constexpr (BF16) {
        const __m512 v = maskz_load_bf16(mk, reinterpret_cast<const uint16_t*>(x) + r * C + c);
        mask_store_bf16(reinterpret_cast<uint16_t*>(y) + r * C + c, mk, affine_act<SILU>(v, sc, sh));
      } else {
        const __m512 v = _mm512_maskz_loadu_ps(mk, reinterpret_cast<const float*>(x) + r * C + c);
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(y) + r * C + c, mk, affine_act<SILU>(v, sc, sh));
      }
    }
  }
}
}  // namespace

void sum_sumsq_f32(const float* x, int64_t n, double* sum, double* sumsq) { sum_sumsq<false>(x, n, sum, sumsq); }
void sum_sumsq_bf16(const uint16_t* x, int64_t n, double* sum, double* sumsq) { sum_sumsq<true>(x, n, sum, sumsq); }
void channel_sum_sumsq_f32(const float* x, int64_t rows, int64_t C, double* sum, double* sumsq) {
  channel_sum_sumsq<false>(x, rows, C, sum, sumsq);
}
void channel_sum_sumsq_bf16(const uint16_t* x, int64_t rows, int64_t C, double* sum, double* sumsq) {
  channel_sum_sumsq<true>(x, rows, C, sum, sumsq);
}
void affine_act_f32(const float* x, float* y, int64_t n, float scale, float shift, bool silu) {
  silu ? affine_act<false, true>(x, y, n, scale, shift) : affine_act<false, false>(x, y, n, scale, shift);
}
void affine_act_bf16(const uint16_t* x, uint16_t* y, int64_t n, float scale, float shift, bool silu) {
  silu ? affine_act<true, true>(x, y, n, scale, shift) : affine_act<true, false>(x, y, n, scale, shift);
}
void channel_affine_act_f32(const float* x, float* y, int64_t rows, int64_t C, const float* scale, const float* shift,
                            bool silu) {
  silu ? channel_affine_act<false, true>(x, y, rows, C, scale, shift)
       : channel_affine_act<false, false>(x, y, rows, C, scale, shift);
}
void channel_affine_act_bf16(const uint16_t* x, uint16_t* y, int64_t rows, int64_t C, const float* scale,
                             const float* shift, bool silu) {
  silu ? channel_affine_act<true, true>(x, y, rows, C, scale, shift)
       : channel_affine_act<true, false>(x, y, rows, C, scale, shift);
}

// ---- GEGLU ---------------------------------------------------------------------------------------------
namespace {
// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7): 1 - t (a1 + t (a2 + ...)) e^(-x^2),
// t = 1 / (1 + p |x|), odd extension.
inline __m512 erf_ps(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 t =
      _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(ax, ax), _mm512_set1_ps(-1.4426950408889634f)));
  const __m512 r = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.f));  // erf(|x|)
  return _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))));
}
}  // namespace

void geglu_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t n) {
  const __m512 half = _mm512_set1_ps(0.5f), rsqrt2 = _mm512_set1_ps(0.70710678118654752f);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* a = x + r * 2 * n;
    const uint16_t* g = a + n;
    uint16_t* o = out + r * n;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = tail_mask(n - i);
      const __m512 gv = maskz_load_bf16(mk, g + i);
      const __m512 gelu =
          _mm512_mul_ps(_mm512_mul_ps(half, gv), _mm512_add_ps(_mm512_set1_ps(1.f), erf_ps(_mm512_mul_ps(gv, rsqrt2))));
      mask_store_bf16(o + i, mk, _mm512_mul_ps(maskz_load_bf16(mk, a + i), gelu));
    }
  }
}
}  // namespace dmx::nn::kernels

#else  // no AVX-512 kernels in this build: callers take the composite path

namespace dmx::nn::kernels {
bool cpu_has_avx512_bf16() { return false; }
}  // namespace dmx::nn::kernels
#endif
