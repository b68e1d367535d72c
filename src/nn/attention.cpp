// Scaled dot-product attention, chunked over queries (see attention.h).
#include "nn/attention.h"

#include <atomic>
#include <cstdlib>
#include <limits>

#include "dmx/error.h"

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
}  // namespace

int64_t max_score_elements() { return g_max_score_elements.load(); }

void set_max_score_elements(int64_t n) {
  DMX_CHECK_ARG(n >= 1, "max_score_elements must be >= 1, got ", n);
  g_max_score_elements.store(n);
}

// Tiled over (groups of batch-heads) x (rows of queries) so that one tile's scores stay small (cache-sized
// at the default budget): scores = (scale q) k^T into a reused buffer, softmax in place, then probs @ v
// straight into the output rows. No tensor of all scores is ever formed.
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

  // Training: the tiled path writes into buffers (bmm_out, in-place softmax), which autograd cannot
  // differentiate; with grad needed, the same math as plain differentiable ops.
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    const at::ScalarType st = upcast ? at::kFloat : q.scalar_type();
    at::Tensor scores = at::matmul(q.to(st) * scale, k.to(st).transpose(2, 3));  // [B, H, Nq, Nk]
    if (causal) {
      const at::Tensor mask = at::ones({Nq, Nk}, scores.options().dtype(at::kBool)).triu(1);
      scores = scores.masked_fill(mask, -std::numeric_limits<double>::infinity());
    }
    return at::matmul(at::softmax(scores, -1).to(v.scalar_type()), v);  // [B, H, Nq, dv]
  }

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
