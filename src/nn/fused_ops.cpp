// Fused GroupNorm (+ SiLU), see fused_ops.h.
#include "nn/fused_ops.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cmath>
#include <vector>

#include "core/runtime.h"
#include "dmx/error.h"
#include "nn/kernels_avx512.h"

namespace dmx::nn {

bool fused_kernels_available() {
#if defined(DMX_AVX512_KERNELS)
  return kernels::cpu_has_avx512_bf16();
#else
  return false;
#endif
}

at::Tensor group_norm_act_composite(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                    const at::Tensor& bias, double eps, bool silu) {
  at::Tensor y;
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) {
    y = at::group_norm(x, groups, weight, bias, eps);
  } else {  // reduced precision: float32 statistics, as diffusers' upcast GroupNorm does
    const at::Tensor w = weight.defined() ? weight.to(at::kFloat) : weight;
    const at::Tensor b = bias.defined() ? bias.to(at::kFloat) : bias;
    y = at::group_norm(x.to(at::kFloat), groups, w, b, eps).to(x.scalar_type());
  }
  if (!silu) return y;
  // In place on our own temporary, unless autograd needs the norm's output.
  return at::GradMode::is_enabled() && y.requires_grad() ? at::silu(y) : at::silu_(y);
}

#if defined(DMX_AVX512_KERNELS)
namespace {
enum class Layout { NCHW, NHWC, Other };

Layout layout_of(const at::Tensor& x) {
  if (x.is_contiguous()) return Layout::NCHW;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  if (x.dim() == 3 && x.transpose(1, 2).is_contiguous()) return Layout::NHWC;  // [N, C, L] view of [N, L, C]
  return Layout::Other;
}

bool fused_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!dmx::fused_kernels() || !fused_kernels_available()) return false;
  if (!x.device().is_cpu() || x.dim() < 3 || x.numel() == 0) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) return false;
  if (!weight.defined() || !bias.defined()) return false;
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad())) return false;
  return layout_of(x) != Layout::Other;
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

at::Tensor group_norm_act_fused(const at::Tensor& x, int64_t G, const at::Tensor& weight, const at::Tensor& bias,
                                double eps, bool silu) {
  RECORD_FUNCTION("dmx::group_norm_act_fused", std::vector<c10::IValue>());  // named in profiles
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C), cpg = C / G;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const Layout layout = layout_of(x);
  const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);  // same strides (dense input)

  // 1. statistics per (n, g) in double: sum and sum of squares
  std::vector<double> sum(N * G, 0.0), sumsq(N * G, 0.0);
  if (layout == Layout::NCHW) {
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (bf16)
          kernels::sum_sumsq_bf16(cptr<uint16_t>(x) + i * cpg * L, cpg * L, &sum[i], &sumsq[i]);
        else
          kernels::sum_sumsq_f32(cptr<float>(x) + i * cpg * L, cpg * L, &sum[i], &sumsq[i]);
      }
    });
  } else {  // NHWC: per-channel sums over row chunks, then per group
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(16, L / 256));
    const int64_t rows_per = (L + chunks - 1) / chunks;
    std::vector<double> cs(N * chunks * C, 0.0), cq(N * chunks * C, 0.0);
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / chunks, r0 = (t % chunks) * rows_per, rows = std::min(rows_per, L - r0);
        if (rows <= 0) continue;
        const int64_t off = (n * L + r0) * C;
        if (bf16)
          kernels::channel_sum_sumsq_bf16(cptr<uint16_t>(x) + off, rows, C, &cs[t * C], &cq[t * C]);
        else
          kernels::channel_sum_sumsq_f32(cptr<float>(x) + off, rows, C, &cs[t * C], &cq[t * C]);
      }
    });
    for (int64_t t = 0; t < N * chunks; ++t) {
      const int64_t n = t / chunks;
      for (int64_t c = 0; c < C; ++c) {
        sum[n * G + c / cpg] += cs[t * C + c];
        sumsq[n * G + c / cpg] += cq[t * C + c];
      }
    }
  }
  // 2. per-channel scale and shift: y = x * (rstd w) + (b - mean rstd w), as at::group_norm folds them
  std::vector<float> scale(N * C), shift(N * C);
  const double count = static_cast<double>(cpg * L);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const double mean = sum[n * G + g] / count;
      const double var = std::max(sumsq[n * G + g] / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const double s = rstd * w.data_ptr<float>()[c];
        scale[n * C + c] = static_cast<float>(s);
        shift[n * C + c] = static_cast<float>(b.data_ptr<float>()[c] - mean * s);
      }
    }
  }
  // 3. normalise + affine + activation in one read and one write
  if (layout == Layout::NCHW) {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (bf16)
          kernels::affine_act_bf16(cptr<uint16_t>(x) + i * L, mptr<uint16_t>(y) + i * L, L, scale[i], shift[i], silu);
        else
          kernels::affine_act_f32(cptr<float>(x) + i * L, mptr<float>(y) + i * L, L, scale[i], shift[i], silu);
      }
    });
  } else {
    const int64_t block = 64;  // rows per task
    const int64_t blocks = (L + block - 1) / block;
    at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / blocks, r0 = (t % blocks) * block, rows = std::min(block, L - r0);
        const int64_t off = (n * L + r0) * C;
        if (bf16)
          kernels::channel_affine_act_bf16(cptr<uint16_t>(x) + off, mptr<uint16_t>(y) + off, rows, C, &scale[n * C],
                                           &shift[n * C], silu);
        else
          kernels::channel_affine_act_f32(cptr<float>(x) + off, mptr<float>(y) + off, rows, C, &scale[n * C],
                                          &shift[n * C], silu);
      }
    });
  }
  return y;
}
}  // namespace
#endif

at::Tensor geglu_composite(const at::Tensor& proj) {
  auto parts = proj.chunk(2, -1);  // hidden, gate: [..., n] each
  return parts[0] * at::gelu(parts[1]);
}

at::Tensor geglu(const at::Tensor& proj) {
  DMX_CHECK_ARG(proj.dim() >= 1 && proj.size(-1) % 2 == 0, "geglu: the last dimension must be even, got shape ",
                proj.sizes());
#if defined(DMX_AVX512_KERNELS)
  const bool fused = dmx::fused_kernels() && fused_kernels_available() && proj.device().is_cpu() &&
                     proj.scalar_type() == at::kBFloat16 && proj.is_contiguous() && proj.numel() > 0 &&
                     !(at::GradMode::is_enabled() && proj.requires_grad());
  if (fused) {
    RECORD_FUNCTION("dmx::geglu_fused", std::vector<c10::IValue>());
    const int64_t n = proj.size(-1) / 2, rows = proj.numel() / (2 * n);
    std::vector<int64_t> shape = proj.sizes().vec();
    shape.back() = n;
    at::Tensor out = at::empty(shape, proj.options());
    const uint16_t* x = cptr<uint16_t>(proj);
    uint16_t* y = mptr<uint16_t>(out);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      kernels::geglu_bf16(x + begin * 2 * n, y + begin * n, end - begin, n);
    });
    return out;
  }
#endif
  return geglu_composite(proj);
}

at::Tensor group_norm_act(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                          double eps, bool silu) {
  DMX_CHECK_ARG(x.dim() >= 2, "group_norm: x must be at least 2-d [N, C, ...], got ", x.dim(), "-d");
  DMX_CHECK_ARG(groups > 0 && x.size(1) % groups == 0, "group_norm: channels (", x.size(1),
                ") must be divisible by num_groups (", groups, ")");
#if defined(DMX_AVX512_KERNELS)
  if (fused_applies(x, weight, bias)) return group_norm_act_fused(x, groups, weight, bias, eps, silu);
#endif
  return group_norm_act_composite(x, groups, weight, bias, eps, silu);
}
}  // namespace dmx::nn
