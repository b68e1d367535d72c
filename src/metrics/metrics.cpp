// Evaluation metrics (see metrics.h).
#include "metrics/metrics.h"

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "dmx/error.h"

namespace dmx::metrics {
double frechet_distance(const at::Tensor& mu1, const at::Tensor& sigma1, const at::Tensor& mu2,
                        const at::Tensor& sigma2) {
  DMX_CHECK_ARG(mu1.dim() == 1 && mu1.sizes() == mu2.sizes() && sigma1.dim() == 2 && sigma1.size(0) == mu1.size(0) &&
                    sigma1.sizes() == sigma2.sizes(),
                "frechet_distance: mu [D] and sigma [D, D] of both sets must agree, got ", mu1.sizes(), ", ",
                sigma1.sizes(), ", ", mu2.sizes(), ", ", sigma2.sizes());
  const at::Tensor m1 = mu1.to(at::kDouble), m2 = mu2.to(at::kDouble);
  at::Tensor s1 = sigma1.to(at::kDouble), s2 = sigma2.to(at::kDouble);
  s1 = (s1 + s1.t()) / 2;
  s2 = (s2 + s2.t()) / 2;
  // A = S1^(1/2) (symmetric), then tr((S1 S2)^(1/2)) = sum sqrt(eig(A S2 A)).
  auto e1 = at::linalg_eigh(s1);
  const at::Tensor v1 = std::get<1>(e1);
  const at::Tensor a = at::matmul(v1 * std::get<0>(e1).clamp_min(0).sqrt().unsqueeze(0), v1.t());  // [D, D]
  at::Tensor m = at::matmul(at::matmul(a, s2), a);
  m = (m + m.t()) / 2;
  const double tr_covmean = at::linalg_eigvalsh(m).clamp_min(0).sqrt().sum().item<double>();
  const double diff = (m1 - m2).pow(2).sum().item<double>();
  return diff + s1.trace().item<double>() + s2.trace().item<double>() - 2.0 * tr_covmean;
}

double frechet_distance(const at::Tensor& a, const at::Tensor& b) {
  DMX_CHECK_ARG(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
                "frechet_distance: feature sets must be [N, D] and [M, D], got ", a.sizes(), " and ", b.sizes());
  DMX_CHECK_ARG(a.size(0) >= 2 && b.size(0) >= 2, "frechet_distance needs at least 2 samples per set, got ", a.size(0),
                " and ", b.size(0));
  auto moments = [](const at::Tensor& x) {
    const at::Tensor xd = x.to(at::kDouble);
    const at::Tensor mu = xd.mean(0);
    const at::Tensor c = xd - mu;
    return std::make_pair(mu, at::matmul(c.t(), c) / static_cast<double>(x.size(0) - 1));  // np.cov(rowvar=False)
  };
  const auto ma = moments(a), mb = moments(b);
  return frechet_distance(ma.first, ma.second, mb.first, mb.second);
}

double edge_f1(const at::Tensor& pred, const at::Tensor& target, int tolerance) {
  DMX_CHECK_ARG(pred.dim() == 2 && pred.sizes() == target.sizes(),
                "edge_f1: edge maps must be [H, W] of one size, got ", pred.sizes(), " and ", target.sizes());
  DMX_CHECK_ARG(tolerance >= 0, "edge_f1: tolerance must be >= 0, got ", tolerance);
  const at::Tensor p = pred.to(at::kBool), t = target.to(at::kBool);
  const double np = p.sum().item<double>(), nt = t.sum().item<double>();
  if (np == 0 && nt == 0) return 1.0;
  if (np == 0 || nt == 0) return 0.0;
  auto dilate = [&](const at::Tensor& m) {  // Chebyshev neighbourhood of radius `tolerance`
    const int k = 2 * tolerance + 1;
    return at::max_pool2d(m.to(at::kFloat).unsqueeze(0).unsqueeze(0), {k, k}, {1, 1}, {tolerance, tolerance})
        .squeeze(0)
        .squeeze(0)
        .gt(0.5);
  };
  const double precision = p.logical_and(dilate(t)).sum().item<double>() / np;
  const double recall = t.logical_and(dilate(p)).sum().item<double>() / nt;
  return precision + recall > 0 ? 2 * precision * recall / (precision + recall) : 0.0;
}

double mask_iou(const at::Tensor& a, const at::Tensor& b) {
  DMX_CHECK_ARG(a.dim() == 2 && a.sizes() == b.sizes(), "mask_iou: masks must be [H, W] of one size, got ", a.sizes(),
                " and ", b.sizes());
  const at::Tensor x = a.to(at::kBool), y = b.to(at::kBool);
  const double uni = x.logical_or(y).sum().item<double>();
  return uni == 0 ? 1.0 : x.logical_and(y).sum().item<double>() / uni;
}

double ssim(const at::Tensor& a, const at::Tensor& b) {
  DMX_CHECK_ARG(a.dim() == 3 && a.sizes() == b.sizes(), "ssim: pictures must be [C, H, W] of one size, got ", a.sizes(),
                " and ", b.sizes());
  constexpr int64_t kWin = 11;
  DMX_CHECK_ARG(a.size(1) >= kWin && a.size(2) >= kWin, "ssim: pictures must be at least ", kWin, "x", kWin,
                " (the Gaussian window), got ", a.size(2), "x", a.size(1));
  const int64_t c = a.size(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor r = at::arange(kWin, f64) - (kWin - 1) / 2.0;
  at::Tensor g = at::exp(-(r * r) / (2 * 1.5 * 1.5));
  g = g / g.sum();
  const at::Tensor w = at::outer(g, g).expand({c, 1, kWin, kWin}).contiguous();
  auto blur = [&](const at::Tensor& x) {
    return at::conv2d(x.unsqueeze(0), w, c10::optional<at::Tensor>(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                      at::IntArrayRef{1, 1}, c)
        .squeeze(0);
  };
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  const at::Tensor mx = blur(x);
  const at::Tensor my = blur(y);
  const at::Tensor sxx = blur(x * x) - mx * mx;
  const at::Tensor syy = blur(y * y) - my * my;
  const at::Tensor sxy = blur(x * y) - mx * my;
  constexpr double c1 = 0.01 * 0.01, c2 = 0.03 * 0.03;
  const at::Tensor map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2));
  return map.mean().item<double>();
}

int edge_tolerance(int64_t height, int64_t width) {
  return static_cast<int>(std::lround(0.0075 * std::hypot(static_cast<double>(height), static_cast<double>(width))));
}

}  // namespace dmx::metrics
