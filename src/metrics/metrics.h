// Evaluation metrics on tensors, for the engine and the emoji module alike (`dmx eval`, tests). Internal
// header of the metrics layer (core only below it).
//  - Fréchet distance between Gaussians fitted to feature sets (Heusel et al. 2017, "GANs Trained by a Two
//    Time-Scale Update Rule...", the FID formula; pytorch-fid's calculate_frechet_distance):
//      d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
//    with unbiased covariances (np.cov), computed in float64. tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with
//    A = S1^(1/2): A S2 A is symmetric positive semi-definite, so both square roots are symmetric
//    eigen-decompositions (negative round-off eigenvalues clamped to 0) and no complex sqrtm is needed.
//  - SSIM (below) for the similarity and diversity of pictures.
//  - Edge F1 with a pixel tolerance (the BSDS boundary benchmark's idea, with a square neighbourhood instead
//    of a bipartite matching): precision = predicted edge pixels with a true edge within `tolerance` pixels
//    (Chebyshev distance), recall = true edge pixels with a predicted edge within `tolerance`.
#pragma once
#include <ATen/core/Tensor.h>

namespace dmx::metrics {

// a: [N, D], b: [M, D] (N, M >= 2). Returns the Fréchet distance squared (FID's convention).
double frechet_distance(const at::Tensor& a, const at::Tensor& b);
// From moments: mu [D], sigma [D, D].
double frechet_distance(const at::Tensor& mu1, const at::Tensor& sigma1, const at::Tensor& mu2,
                        const at::Tensor& sigma2);

// pred, target: [H, W] bool edge maps. Both empty: 1. One empty: 0.
double edge_f1(const at::Tensor& pred, const at::Tensor& target, int tolerance);
// The matching tolerance in pixels for an H x W image: the BSDS benchmark's default maxDist, 0.0075 of the
// image diagonal, rounded to whole pixels (0 up to 47 x 47, so exact matching for the
// 32-px emoji; 1 up to 141 x 141; 5 at 512 x 512).
int edge_tolerance(int64_t height, int64_t width);

// SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural Similarity"): the
// paper's 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, dynamic range 1, over the valid region (no
// padding), each channel separately, averaged over positions and channels. a, b: [C, H, W] in [0, 1], H and W >= 11;
// computed in float64. 1 for equal pictures.
double ssim(const at::Tensor& a, const at::Tensor& b);

// masks [H, W] bool: |A and B| / |A or B| (both empty: 1).
double mask_iou(const at::Tensor& a, const at::Tensor& b);
}  // namespace dmx::metrics
