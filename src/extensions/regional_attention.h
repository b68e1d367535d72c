// Training-free regional prompts: DenseDiffusion's attention modulation (Kim et al. 2023, "Dense Text-to-Image
// Generation with Attention Modulation", ICCV; the official code naver-ai/DenseDiffusion, inference.ipynb and
// gradio_app.py's mod_forward). Before the softmax of every attention layer of the UNet, in the conditional rows
// and during the first part of the schedule, the scaled scores s = scale q k^T of query i and key j become
//
//   s'_ij = s_ij + w_t S_i R_ij (max_j s_ij - s_ij) - w_t S_i (1 - R_ij) (s_ij - min_j s_ij)
//
// with R the query-key condition (cross attention: key j is a token of the region holding pixel i; self
// attention: pixels i and j lie in the same segment), S_i = 1 - size_scale * |segment of i| / N (the size
// weight: small regions are pushed harder), w_t = w (t / 1000)^5 (the time weight; w = w^c for cross and w^s for
// self attention) and min / max taken over the keys of each query (the modulation stays within the scores'
// range). docs/regional.md lists every choice and where it comes from.
//
// It plugs into the attention seam (nn/attention_seam.h) as an AttentionProcessor: the modulation needs the
// scores before the softmax, which controllers do not see. The per-call state (step, timestep, conditional rows)
// is set before each UNet call by the pipeline's regional provider (pipelines/regional.h). Outside the step
// window, and for unconditional rows, the layer's own fast path runs unchanged.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "nn/attention_seam.h"

namespace dmx::extensions {

// The method's constants (gradio_app.py's defaults: creg 1.0, sreg 0.3, sizereg 1.0; 0.3 of the steps).
struct DenseDiffusionConfig {
  double cross_weight = 1.0;   // w^c
  double self_weight = 0.3;    // w^s
  double size_scale = 1.0;     // sizereg: S_i = 1 - size_scale * area_i / N
  double step_fraction = 0.3;  // modulated UNet evaluations: loop index < step_fraction * number of timesteps
  double time_exponent = 5.0;  // w_t = w * (t / 1000)^time_exponent
};

// The masks of one attention resolution (N = h * w query pixels, L tokens).
struct RegionalMaps {
  int64_t height = 0, width = 0;
  at::Tensor self_condition;   // [N, N] bool: pixels i and j lie in the same segment
  at::Tensor cross_condition;  // [N, L] bool: token j belongs to the region holding pixel i
  at::Tensor size_weight;      // [N, 1] float32: 1 - size_scale * (pixels of i's segment) / N
};

// The resolutions a UNet's attention runs at for a latent of h x w: level 0 is the latent, each further level
// halves with ceil (the down blocks' stride-2 convolutions with padding 1; the up blocks upsample to the skip
// connections' sizes, so they run at the same ones). `levels` sizes.
std::vector<std::pair<int64_t, int64_t>> attention_resolutions(int64_t h, int64_t w, int levels);

// segments: [S, h, w] 0/1 masks at the latent resolution (disjoint; segments without text, such as the
// background, have no token); token_segment: for each of the L token positions of the context, the segment
// whose region text it belongs to, or -1. Each mask is resized to (height, width) by nearest neighbour (torch's
// interpolate(mode="nearest"), as the reference resizes its layouts), then the conditions and size weight
// built as the reference's sreg_maps, creg_maps and reg_sizes.
RegionalMaps build_regional_maps(const at::Tensor& segments, const std::vector<int64_t>& token_segment, int64_t height,
                                 int64_t width, double size_scale);

// w_t of the method: weight * (t / 1000)^exponent.
double dense_diffusion_time_weight(double weight, double t, double exponent = 5.0);

// The modulation on scaled scores [B, H, N, M] (every row given is modulated): condition [N, M] bool,
// size_weight [N, 1], weight = w_t. Returns the modulated scores (same dtype).
at::Tensor dense_diffusion_modulate(const at::Tensor& scores, const at::Tensor& condition,
                                    const at::Tensor& size_weight, double weight);

// What the processor needs of the UNet call it is in.
struct RegionalCall {
  int index = 0;          // loop index in the scheduler's timesteps
  int num_timesteps = 0;  // the scheduler's timesteps().size()
  double t = 0;
  std::vector<int64_t> conditional_rows;  // batch rows to modulate (the others run unchanged)
};

class RegionalAttentionProcessor : public nn::AttentionProcessor {
 public:
  explicit RegionalAttentionProcessor(DenseDiffusionConfig config);
  // The maps of every resolution, keyed by the number of query pixels.
  void set_maps(std::map<int64_t, RegionalMaps> maps);
  // Before each UNet call.
  void set_call(RegionalCall call);
  // Whether the current call is modulated (inside the step window, a weight non-zero).
  bool active() const { return active_; }
  const DenseDiffusionConfig& config() const { return config_; }

  at::Tensor forward(const nn::AttentionSite& site, const nn::AttentionContext& ctx, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, double scale, bool upcast) override;

 private:
  DenseDiffusionConfig config_;
  std::map<int64_t, RegionalMaps> maps_;
  RegionalCall call_;
  bool active_ = false;
};
}  // namespace dmx::extensions
