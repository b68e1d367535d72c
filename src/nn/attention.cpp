// Scaled dot-product attention, chunked over queries (see attention.h).
#include "nn/attention.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/runtime.h"
#include "dmx/error.h"
#include "nn/fused_ops.h"
#include "nn/kernels_avx512.h"

namespace dmx::nn {

namespace {
int64_t initial_budget() {
  // Developer knob for measuring chunk sizes (docs/performance.md); the default is the measured best.
  if (const char* e = std::getenv("DMX_ATTN_SCORE_ELEMENTS")) {
    const long long n = std::atoll(e);
    if (n >= 1) return n;
  }
  return int64_t{1} << 20;
}
std::atomic<int64_t> g_max_score_elements{initial_budget()};

int64_t initial_block_rows() {
  // Developer knob for the fused kernel's query rows per task (multiple of 8; docs/performance.md).
  if (const char* e = std::getenv("DMX_ATTN_BLOCK_ROWS")) {
    const long long n = std::atoll(e);
    if (n >= 32) return (n + 31) / 32 * 32;
  }
  return 32;
}
const int64_t g_block_rows = initial_block_rows();
// AMX tiles where available; DMX_ATTN_AMX=0 selects the AVX512-BF16 dot-product kernel (for A/B).
std::atomic<bool> g_attn_amx_allowed{[] {
  const char* e = std::getenv("DMX_ATTN_AMX");
  return !(e && std::string(e) == "0");
}()};

#if defined(DMX_AVX512_KERNELS)
bool fused_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  if (causal || !dmx::fused_kernels() || !fused_kernels_available()) return false;
  for (const at::Tensor* t : {&q, &k, &v})
    if (t->scalar_type() != at::kBFloat16 || !t->device().is_cpu() || t->stride(3) != 1) return false;
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) return false;
  return q.size(2) > 0 && k.size(2) > 0 && q.size(3) > 0 && v.size(3) > 0;
}

// bf16 inputs: float32 scores and softmax, bf16 probabilities times v with float32 accumulation, one
// rounding of the output (the composite rounds scores, probabilities and output to bf16 unless upcast).
at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  RECORD_FUNCTION("dmx::fused_attention", std::vector<c10::IValue>());  // named in profiles
  kernels::AttnArgs a;
  a.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  a.k = reinterpret_cast<const uint16_t*>(k.data_ptr());
  a.v = reinterpret_cast<const uint16_t*>(v.data_ptr());
  a.q_sb = q.stride(0), a.q_sh = q.stride(1), a.q_sn = q.stride(2);
  a.k_sb = k.stride(0), a.k_sh = k.stride(1), a.k_sn = k.stride(2);
  a.v_sb = v.stride(0), a.v_sh = v.stride(1), a.v_sn = v.stride(2);
  a.B = q.size(0), a.H = q.size(1), a.Nq = q.size(2), a.Nk = k.size(2), a.d = q.size(3), a.dv = v.size(3);
  a.scale = static_cast<float>(scale);
  a.block_rows = g_block_rows;
  a.amx = g_attn_amx_allowed && kernels::cpu_has_amx_bf16();
  at::Tensor out = at::empty({a.B, a.H, a.Nq, a.dv}, v.options().memory_format(at::MemoryFormat::Contiguous));
  a.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t BH = a.B * a.H, kpe = kernels::attn_packed_k_elems(a), vpe = kernels::attn_packed_v_elems(a);
  at::Tensor packed = at::empty({BH * (kpe + vpe)}, v.options());
  uint16_t* kp = reinterpret_cast<uint16_t*>(packed.data_ptr());
  uint16_t* vp = kp + BH * kpe;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) kernels::attn_pack_kv(a, bh, kp + bh * kpe, vp + bh * vpe);
  });
  const int64_t blocks = (a.Nq + a.block_rows - 1) / a.block_rows;
  const size_t ws_bytes = static_cast<size_t>(kernels::attn_workspace_bytes(a));
  at::parallel_for(0, BH * blocks, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<void, decltype(&std::free)> ws(std::aligned_alloc(64, (ws_bytes + 63) / 64 * 64), &std::free);
    if (!ws) throw std::bad_alloc();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / blocks;
      kernels::attn_rows(a, bh, (t % blocks) * a.block_rows, kp + bh * kpe, vp + bh * vpe, ws.get());
    }
  });
  return out;  // [B, H, Nq, dv]
}
#endif
}  // namespace

int64_t max_score_elements() { return g_max_score_elements.load(); }

void set_attention_amx(bool on) { g_attn_amx_allowed.store(on); }

void set_max_score_elements(int64_t n) {
  DMX_CHECK_ARG(n >= 1, "max_score_elements must be >= 1, got ", n);
  g_max_score_elements.store(n);
}

// Training: the same formula without out= products or in-place ops, so that autograd records it (all
// scores at once: backward needs the probabilities anyway).
static at::Tensor attention_differentiable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                           bool causal, bool upcast, const at::Tensor& bias) {
  const at::ScalarType score_dtype = upcast ? at::kFloat : q.scalar_type();
  at::Tensor scores = at::matmul(q.to(score_dtype) * scale, k.to(score_dtype).transpose(-1, -2));  // [B, H, Nq, Nk]
  if (bias.defined()) scores = scores + bias.to(score_dtype);
  if (causal) {
    const int64_t Nq = q.size(2), Nk = k.size(2);
    const at::Tensor mask = at::ones({Nq, Nk}, scores.options().dtype(at::kBool)).triu(1);
    scores = scores.masked_fill(mask, -std::numeric_limits<double>::infinity());
  }
  return at::matmul(at::softmax(scores, -1).to(v.scalar_type()), v);  // [B, H, Nq, dv]
}

// Tiled over (groups of batch-heads) x (rows of queries) so that one tile's scores stay small (cache-sized
// at the default budget): scores = (scale q) k^T into a reused buffer, softmax in place, then probs @ v
// straight into the output rows. No tensor of all scores is ever formed.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
                     bool upcast, const at::Tensor& bias) {
  DMX_CHECK_ARG(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention expects q, k, v of shape [B, H, N, d], got ",
                q.dim(), "-d, ", k.dim(), "-d, ", v.dim(), "-d tensors");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  const int64_t Nk = k.size(2);
  DMX_CHECK_ARG(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H,
                "attention: q, k, v must share batch and heads");
  DMX_CHECK_ARG(k.size(3) == d && v.size(2) == Nk, "attention: k must have q's head width and v k's length");
  const int64_t BH = B * H, dv = v.size(3);
  if (bias.defined()) {
    DMX_CHECK_ARG(bias.dim() <= 4, "attention: the bias must broadcast to [B, H, Nq, Nk], got shape ", bias.sizes());
    std::vector<int64_t> padded(4 - bias.dim(), 1);
    for (int64_t s : bias.sizes()) padded.push_back(s);
    const int64_t full[4] = {B, H, Nq, Nk};
    for (int i = 0; i < 4; ++i)
      DMX_CHECK_ARG(padded[i] == 1 || padded[i] == full[i], "attention: the bias must broadcast to [", B, ", ", H, ", ",
                    Nq, ", ", Nk, "], got shape ", bias.sizes());
  }
#if defined(DMX_AVX512_KERNELS)
  if (!bias.defined() && fused_attention_applies(q, k, v, causal)) return fused_attention(q, k, v, scale);
#endif
  if (at::GradMode::is_enabled() &&
      (q.requires_grad() || k.requires_grad() || v.requires_grad() || (bias.defined() && bias.requires_grad())))
    return attention_differentiable(q, k, v, scale, causal, upcast, bias);

  const at::ScalarType out_dtype = v.scalar_type();
  const at::ScalarType score_dtype = upcast ? at::kFloat : q.scalar_type();
  // The scale is folded into q (N*d multiplications instead of N*M).
  at::Tensor qs = at::empty({B, H, Nq, d}, q.options().dtype(score_dtype));
  qs.copy_(q).mul_(scale);
  qs = qs.view({BH, Nq, d});
  at::Tensor kt = k.reshape({BH, Nk, d});
  if (kt.scalar_type() != score_dtype) kt = kt.to(score_dtype);
  kt = kt.transpose(1, 2);  // [BH, d, Nk]
  const at::Tensor vf = v.reshape({BH, Nk, dv});
  at::Tensor bias_bh;  // [BH, Nq, Nk] (a view where the bias is already complete)
  if (bias.defined()) bias_bh = bias.to(score_dtype).expand({B, H, Nq, Nk}).reshape({BH, Nq, Nk});

  const int64_t budget = max_score_elements();
  int64_t groups = 1, rows = Nq;
  if (Nq * Nk <= budget)
    groups = std::min<int64_t>(BH, budget / (Nq * Nk));
  else
    rows = std::max<int64_t>(1, budget / Nk);
  at::Tensor buf = at::empty({groups, rows, Nk}, qs.options());
  at::Tensor out = at::empty({BH, Nq, dv}, vf.options());
  for (int64_t g = 0; g < BH; g += groups) {
    const int64_t gc = std::min(groups, BH - g);
    for (int64_t s = 0; s < Nq; s += rows) {
      const int64_t rc = std::min(rows, Nq - s);
      at::Tensor scores = gc == groups && rc == rows ? buf : at::empty({gc, rc, Nk}, qs.options());
      at::bmm_out(scores, qs.narrow(0, g, gc).narrow(1, s, rc), kt.narrow(0, g, gc));  // [gc, rc, Nk]
      if (causal) {
        // Row r is query i = s + r; keys j > i are masked: triu with diagonal s + 1.
        at::Tensor mask = at::ones({rc, Nk}, scores.options().dtype(at::kBool)).triu(s + 1);
        scores.masked_fill_(mask, -std::numeric_limits<double>::infinity());
      }
      if (bias_bh.defined()) scores.add_(bias_bh.narrow(0, g, gc).narrow(1, s, rc));
      at::_softmax_out(scores, scores, -1, false);  // in place
      const at::Tensor probs = scores.scalar_type() == out_dtype ? scores : scores.to(out_dtype);
      at::Tensor dst = out.narrow(0, g, gc).narrow(1, s, rc);  // [gc, rc, dv]
      if (dst.is_contiguous()) {
        at::bmm_out(dst, probs, vf.narrow(0, g, gc));
      } else {
        dst.copy_(at::bmm(probs, vf.narrow(0, g, gc)));
      }
    }
  }
  return out.view({B, H, Nq, dv});  // [B, H, Nq, d]
}
}  // namespace dmx::nn
