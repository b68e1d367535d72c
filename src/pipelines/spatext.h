// SpaText (Avrahami et al. 2023; docs/spatext.md): the spatio-textual map and the provider that gives it to a SpaText
// UNet (loaders/spatext.h) as extra input channels, with the paper's multi-conditional classifier-free guidance.
//
// The map: each region's embedding e_s (a unit-length CLIP image embedding: of the segment's picture at training,
// of the prior's sample for the region's text at inference) painted into the region's shape at the latent size,
// zero elsewhere. A latent cell takes each region in proportion to the share of its f x f pixels the region covers
// (average pooling of the pixel mask), so training and inference build it the same way at any size.
//
// Guidance (the paper's multi-scale form, section 3.4): with the global text c_g and the map c_l,
//   eps = eps(0, 0) + s_g (eps(c_g, 0) - eps(0, 0)) + s_l (eps(0, c_l) - eps(0, 0))
// three UNet rows per picture: [uncond text, no map; text, no map; uncond text, map] (the generation core's extra
// guidance branch). s_g is --guidance-scale; s_l = --layout-guidance-scale x s_g (1 by default: equal weights);
// s_l = 0 is the text-only run of the same model. Unguided runs (s_g <= 1) take eps(c_g, c_l).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "loaders/spatext.h"
#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

// segments [S, H, W] (bool or float in [0, 1]), embeds [S, D] -> [D, H / factor, W / factor] float32:
// sum_s avg_pool(segment_s, factor) e_s. H and W must be multiples of factor.
at::Tensor spatext_map(const at::Tensor& segments, const at::Tensor& embeds, int factor);

// The prior's image embeddings of region texts (StableUnCLIPPipeline's prior loop, `steps` steps, guidance
// `guidance_scale`, its draws from a generator seeded with `seed`), each scaled to unit length. -> [S, D] float32.
at::Tensor spatext_region_embeddings(loaders::UnCLIPComponents& prior, const std::vector<std::string>& texts,
                                     uint64_t seed, int steps = 25, double guidance_scale = 4.0);

class SpaTextProvider;

// The provider of a run on a SpaText folder, the one builder `dmx generate` and `dmx eval --layouts` share. With
// segments [S, H, W] (the output size) and S region texts: each text checked against the prior tokenizer's length
// (InvalidArgument naming names[i]), its prior embedding (spatext_region_embeddings, seeded with `seed`) projected to
// the map's channels and painted (spatext_map); layout_scale is s_l. Without segments (undefined): no map, the
// model's text-only run.
std::shared_ptr<SpaTextProvider> make_spatext_provider(loaders::SpaTextModel& s, const at::Tensor& segments,
                                                       const std::vector<std::string>& texts,
                                                       const std::vector<std::string>& names, uint64_t seed,
                                                       double layout_scale);

class SpaTextProvider : public ResidualProvider {
 public:
  // map [D, h, w] float32 or undefined (no layout: the text-only run); base_in_channels: the latents' channels;
  // layout_scale: s_l (>= 0).
  SpaTextProvider(at::Tensor map, int base_in_channels, int embedding_dim, double layout_scale);
  std::string name() const override { return "spatext"; }
  void check(const ResidualRun& run) const override;
  void prepare(const ResidualRun& run) override;
  void apply(const ResidualStep& step, models::UNetInputs& in) override;
  std::vector<GuidanceBranch> guidance_branches() const override;
  int extra_input_channels() const override { return dim_; }

 private:
  at::Tensor map_;
  int base_in_ = 0, dim_ = 0;
  double layout_scale_ = 0;
};
}  // namespace dmx::pipelines
