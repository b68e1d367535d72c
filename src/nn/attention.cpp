// Scaled dot-product attention, chunked over queries (see attention.h).
#include "nn/attention.h"

#include <atomic>

#include "dmx/error.h"

namespace dmx::nn {

namespace {
std::atomic<int64_t> g_max_score_elements{int64_t{1} << 24};

// One chunk of queries: q [BH, c, d] (rows q_begin..q_begin+c of the full sequence), k, v [BH, Nk, d].
at::Tensor attend_chunk(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v, double scale, bool causal,
                        int64_t q_begin, at::ScalarType probs_dtype) {
  at::Tensor scores = at::bmm(q, k_t);  // [BH, c, Nk]
  scores.mul_(scale);
  if (causal) {
    // Row r is query i = q_begin + r; keys j > i are masked: triu with diagonal q_begin + 1.
    at::Tensor mask = at::ones({q.size(1), k_t.size(2)}, scores.options().dtype(at::kBool)).triu(q_begin + 1);
    scores.masked_fill_(mask, -std::numeric_limits<double>::infinity());
  }
  at::Tensor probs = at::softmax(scores, -1);
  if (probs.scalar_type() != probs_dtype) probs = probs.to(probs_dtype);
  return at::bmm(probs, v);  // [BH, c, d]
}
}  // namespace

int64_t max_score_elements() { return g_max_score_elements.load(); }

void set_max_score_elements(int64_t n) {
  DMX_CHECK_ARG(n >= 1, "max_score_elements must be >= 1, got ", n);
  g_max_score_elements.store(n);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
                     bool upcast) {
  DMX_CHECK_ARG(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention expects q, k, v of shape [B, H, N, d], got ",
                q.dim(), "-d, ", k.dim(), "-d, ", v.dim(), "-d tensors");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  const int64_t Nk = k.size(2);
  DMX_CHECK_ARG(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H,
                "attention: q, k, v must share batch and heads");
  DMX_CHECK_ARG(k.size(3) == d && v.size(2) == Nk, "attention: k must have q's head width and v k's length");
  const int64_t BH = B * H, dv = v.size(3);

  const at::ScalarType out_dtype = v.scalar_type();
  at::Tensor qf = q.reshape({BH, Nq, d});
  at::Tensor kt = k.reshape({BH, Nk, d}).transpose(1, 2);  // [BH, d, Nk]
  const at::Tensor vf = v.reshape({BH, Nk, dv});
  if (upcast && qf.scalar_type() != at::kFloat) {
    qf = qf.to(at::kFloat);
    kt = kt.to(at::kFloat);
  }

  const int64_t budget = max_score_elements();
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(Nq, budget / std::max<int64_t>(1, BH * Nk)));
  at::Tensor out;
  if (chunk >= Nq) {
    out = attend_chunk(qf, kt, vf, scale, causal, 0, out_dtype);
  } else {
    out = at::empty({BH, Nq, dv}, vf.options());
    for (int64_t s = 0; s < Nq; s += chunk) {
      const int64_t c = std::min(chunk, Nq - s);
      out.narrow(1, s, c).copy_(attend_chunk(qf.narrow(1, s, c), kt, vf, scale, causal, s, out_dtype));
    }
  }
  return out.view({B, H, Nq, dv});  // [B, H, Nq, d]
}
}  // namespace dmx::nn
