// DenseDiffusion's attention modulation (see regional_attention.h).
#include "extensions/regional_attention.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "dmx/error.h"
#include "nn/attention.h"

namespace dmx::extensions {

std::vector<std::pair<int64_t, int64_t>> attention_resolutions(int64_t h, int64_t w, int levels) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int i = 0; i < levels; ++i) {
    out.emplace_back(h, w);
    h = (h + 1) / 2;
    w = (w + 1) / 2;
  }
  return out;
}

RegionalMaps build_regional_maps(const at::Tensor& segments, const std::vector<int64_t>& token_segment, int64_t height,
                                 int64_t width, double size_scale) {
  DMX_CHECK_ARG(segments.dim() == 3 && segments.size(0) >= 1, "regional maps: segments must be [S, h, w], got ",
                segments.sizes());
  DMX_CHECK_ARG(height >= 1 && width >= 1, "regional maps: resolution must be positive, got ", height, "x", width);
  const int64_t S = segments.size(0), N = height * width, L = static_cast<int64_t>(token_segment.size());
  // F.interpolate(layouts, (res, res), mode='nearest') of the reference.
  const at::Tensor m = at::upsample_nearest2d(segments.to(at::kFloat).unsqueeze(0), {height, width})
                           .squeeze(0)
                           .reshape({S, N});  // [S, N]
  RegionalMaps r;
  r.height = height;
  r.width = width;
  // sreg_maps: sum over segments of m_s m_s^T (> 0 where both pixels are in one segment).
  const at::Tensor same = at::matmul(m.t(), m);  // [N, N]
  r.self_condition = same.gt(0);
  // reg_sizes: 1 - sizereg * (row sum of the same-segment map) / N.
  r.size_weight = (1.0 - size_scale * same.sum(-1, /*keepdim=*/true) / static_cast<double>(N)).contiguous();
  // creg_maps: column j = the mask of token j's segment (zeros for tokens of no region).
  at::Tensor cross = at::zeros({N, L}, at::kFloat);
  for (int64_t j = 0; j < L; ++j) {
    const int64_t s = token_segment[static_cast<size_t>(j)];
    if (s < 0) continue;
    DMX_CHECK_ARG(s < S, "regional maps: token ", j, " names segment ", s, " of ", S);
    cross.select(1, j).copy_(m[s]);
  }
  r.cross_condition = cross.gt(0);
  return r;
}

double dense_diffusion_time_weight(double weight, double t, double exponent) {
  return weight * std::pow(t / 1000.0, exponent);
}

at::Tensor dense_diffusion_modulate(const at::Tensor& scores, const at::Tensor& condition,
                                    const at::Tensor& size_weight, double weight) {
  DMX_CHECK_ARG(scores.dim() == 4 && condition.dim() == 2 && condition.size(0) == scores.size(2) &&
                    condition.size(1) == scores.size(3),
                "regional modulation: scores [B, H, N, M] and condition [N, M] do not match: ", scores.sizes(), " vs ",
                condition.sizes());
  // min_value / max_value of the reference: over the keys of each query, before the update.
  const at::Tensor max_v = std::get<0>(scores.max(-1, /*keepdim=*/true));
  const at::Tensor min_v = std::get<0>(scores.min(-1, /*keepdim=*/true));
  const at::Tensor cond = condition.to(scores.device());
  const at::Tensor w = (size_weight.to(scores.device(), scores.scalar_type()) * weight);  // [N, 1]
  const at::Tensor raise = w * (max_v - scores);
  const at::Tensor lower = w * (scores - min_v);
  return at::where(cond, scores + raise, scores - lower);
}

RegionalAttentionProcessor::RegionalAttentionProcessor(DenseDiffusionConfig config) : config_(config) {}

void RegionalAttentionProcessor::set_maps(std::map<int64_t, RegionalMaps> maps) { maps_ = std::move(maps); }

void RegionalAttentionProcessor::set_call(RegionalCall call) {
  call_ = std::move(call);
  active_ = (config_.cross_weight != 0 || config_.self_weight != 0) && !call_.conditional_rows.empty() &&
            static_cast<double>(call_.index) < config_.step_fraction * static_cast<double>(call_.num_timesteps);
}

at::Tensor RegionalAttentionProcessor::forward(const nn::AttentionSite& site, const nn::AttentionContext&,
                                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale, bool upcast) {
  const double base = site.is_cross ? config_.cross_weight : config_.self_weight;
  if (!active_ || base == 0) return nn::attention(q, k, v, scale, /*causal=*/false, upcast);
  const int64_t B = q.size(0), N = q.size(2), M = k.size(2);
  const auto it = maps_.find(N);
  DMX_CHECK_SUPPORTED(it != maps_.end(), "regional prompts: attention at ", site.path, " runs over ", N,
                      " query pixels, a resolution the layout maps were not built for");
  const RegionalMaps& maps = it->second;
  const at::Tensor& condition = site.is_cross ? maps.cross_condition : maps.self_condition;
  DMX_CHECK_SUPPORTED(condition.size(1) == M, "regional prompts: attention at ", site.path, " has ", M,
                      " keys; the layout's ", site.is_cross ? "token" : "pixel", " map has ", condition.size(1));
  std::vector<int64_t> rows;
  for (int64_t r : call_.conditional_rows)
    if (r >= 0 && r < B) rows.push_back(r);
  DMX_CHECK_ARG(rows.size() == call_.conditional_rows.size(), "regional prompts: conditional rows out of the batch of ",
                B, " at ", site.path);
  const bool all_rows = static_cast<int64_t>(rows.size()) == B;
  const at::Tensor idx = at::tensor(rows, at::kLong).to(q.device());
  const at::Tensor qc = all_rows ? q : q.index_select(0, idx);
  const at::Tensor kc = all_rows ? k : k.index_select(0, idx);
  const at::Tensor vc = all_rows ? v : v.index_select(0, idx);
  // The reference's sim (baddbmm with alpha = scale, on float32 q and k when upcasting), modulated, softmax,
  // probabilities cast back to the compute dtype.
  const at::Tensor qq = upcast ? qc.to(at::kFloat) : qc;
  const at::Tensor kk = upcast ? kc.to(at::kFloat) : kc;
  at::Tensor scores = at::matmul(qq, kk.transpose(-1, -2)).mul(scale);  // [b, H, N, M]
  scores = dense_diffusion_modulate(scores, condition, maps.size_weight,
                                    dense_diffusion_time_weight(base, call_.t, config_.time_exponent));
  at::Tensor probs = scores.softmax(-1);
  if (probs.scalar_type() != vc.scalar_type()) probs = probs.to(vc.scalar_type());
  const at::Tensor modulated = at::matmul(probs, vc);  // [b, H, N, d]
  if (all_rows) return modulated;
  // The other (unconditional) rows: the layer's own fast path, as without a layout.
  std::vector<int64_t> others;
  for (int64_t r = 0; r < B; ++r)
    if (std::find(rows.begin(), rows.end(), r) == rows.end()) others.push_back(r);
  const at::Tensor oidx = at::tensor(others, at::kLong).to(q.device());
  const at::Tensor plain = nn::attention(q.index_select(0, oidx), k.index_select(0, oidx), v.index_select(0, oidx),
                                         scale, /*causal=*/false, upcast);
  at::Tensor out = at::empty({B, q.size(1), N, v.size(3)}, plain.options());
  out.index_copy_(0, oidx, plain);
  out.index_copy_(0, idx, modulated.to(plain.scalar_type()));
  return out;
}
}  // namespace dmx::extensions
