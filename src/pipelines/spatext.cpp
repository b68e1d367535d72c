// SpaText's map and provider (spatext.h).
#include "pipelines/spatext.h"

#include <ATen/ATen.h>

#include "dmx/error.h"
#include "pipelines/generation.h"
#include "pipelines/unclip_steps.h"
#include "schedulers/scheduler.h"

namespace dmx::pipelines {

at::Tensor spatext_map(const at::Tensor& segments, const at::Tensor& embeds, int factor) {
  DMX_CHECK_ARG(segments.dim() == 3 && embeds.dim() == 2 && segments.size(0) == embeds.size(0),
                "spatext_map: segments [S, H, W] and embeds [S, D] must agree, got ", segments.sizes(), " and ",
                embeds.sizes());
  DMX_CHECK_ARG(factor >= 1 && segments.size(1) % factor == 0 && segments.size(2) % factor == 0,
                "spatext_map: the map's sides ", segments.size(2), "x", segments.size(1),
                " must be multiples of the VAE factor ", factor);
  const int64_t h = segments.size(1) / factor, w = segments.size(2) / factor;
  if (segments.size(0) == 0) return at::zeros({embeds.size(1), h, w}, at::kFloat);
  const at::Tensor share =
      at::avg_pool2d(segments.to(at::kFloat).unsqueeze(0), {factor, factor}).squeeze(0);  // [S,h,w]
  return at::einsum("shw,sd->dhw", {share, embeds.to(at::kFloat)}).contiguous();
}

at::Tensor spatext_region_embeddings(loaders::UnCLIPComponents& prior, const std::vector<std::string>& texts,
                                     uint64_t seed, int steps, double guidance_scale) {
  DMX_CHECK_ARG(prior.has_prior(), "spatext: the model folder has no prior");
  if (texts.empty()) return at::zeros({0, prior.prior->config().resolved_clip_embed_dim()}, at::kFloat);
  at::NoGradGuard no_grad;
  PriorRunParams p;
  p.prompt = encode_prior_prompt(*prior.prior_tokenizer, prior.prior_text_encoder, texts, guidance_scale > 1.0);
  p.num_inference_steps = steps;
  p.guidance_scale = guidance_scale;
  at::Generator gen = make_generator(seed);
  p.generator = &gen;
  auto scheduler = schedulers::create_scheduler(prior.prior_scheduler_config.at("_class_name").get<std::string>(),
                                                prior.prior_scheduler_config);
  const at::Tensor e = run_prior(prior.prior, *scheduler, p).to(at::kFloat);
  return e / e.norm(2, {1}, true).clamp_min(1e-12);
}

std::shared_ptr<SpaTextProvider> make_spatext_provider(loaders::SpaTextModel& s, const at::Tensor& segments,
                                                       const std::vector<std::string>& texts,
                                                       const std::vector<std::string>& names, uint64_t seed,
                                                       double layout_scale) {
  const int M = s.config.map_channels;
  if (!segments.defined()) return std::make_shared<SpaTextProvider>(at::Tensor(), s.base_in_channels, M, 0.0);
  DMX_CHECK_ARG(
      texts.size() == names.size() && segments.dim() == 3 && segments.size(0) == static_cast<int64_t>(texts.size()),
      "spatext: ", segments.sizes(), " segments for ", texts.size(), " region texts");
  const auto& tok = *s.prior->prior_tokenizer;
  for (size_t i = 0; i < texts.size(); ++i) {
    const size_t n = tok.encode(texts[i]).size();  // BOS and EOS included
    DMX_CHECK_ARG(static_cast<int64_t>(n) <= tok.model_max_length(), names[i],
                  ": the region text must fit the prior tokenizer's ", tok.model_max_length(),
                  " tokens (BOS and EOS included), got ", n, " for '", texts[i], "'");
  }
  const at::Tensor embeds = at::matmul(spatext_region_embeddings(*s.prior, texts, seed), s.projection.t());
  return std::make_shared<SpaTextProvider>(spatext_map(segments, embeds, s.models->vae_scale_factor()),
                                           s.base_in_channels, M, layout_scale);
}

SpaTextProvider::SpaTextProvider(at::Tensor map, int base_in_channels, int embedding_dim, double layout_scale)
    : map_(std::move(map)), base_in_(base_in_channels), dim_(embedding_dim), layout_scale_(layout_scale) {
  DMX_CHECK_ARG(!map_.defined() || (map_.dim() == 3 && map_.size(0) == dim_), "spatext: the map must be [", dim_,
                ", h, w], got ", map_.defined() ? map_.sizes() : at::IntArrayRef{});
  DMX_CHECK_ARG(layout_scale_ >= 0, "spatext: the layout guidance scale must be >= 0, got ", layout_scale_);
}

void SpaTextProvider::check(const ResidualRun& run) const {
  const auto& unet = run.models.unet;
  DMX_CHECK_ARG(unet->config().in_channels == base_in_ + dim_, "spatext: the UNet takes ", unet->config().in_channels,
                " input channels, a SpaText map of ", dim_, " needs ", base_in_ + dim_, " (a SpaText model folder)");
  if (map_.defined()) {
    const int f = run.models.vae_scale_factor();
    DMX_CHECK_ARG(map_.size(1) * f == run.height && map_.size(2) * f == run.width, "spatext: the map is ",
                  map_.size(2) * f, "x", map_.size(1) * f, " pixels, the run ", run.width, "x", run.height);
  }
}

void SpaTextProvider::prepare(const ResidualRun&) {}

std::vector<GuidanceBranch> SpaTextProvider::guidance_branches() const {
  if (!map_.defined() || layout_scale_ == 0) return {};
  return {GuidanceBranch{false, layout_scale_}};
}

void SpaTextProvider::apply(const ResidualStep& step, models::UNetInputs& in) {
  const at::Tensor& x = in.sample;
  const int64_t rows = x.size(0), h = x.size(2), w = x.size(3);
  const int groups = step.branches > 0 ? step.branches : 1;
  DMX_CHECK_ARG(rows % groups == 0, "spatext: ", rows, " UNet rows are not ", groups, " groups");
  const int64_t n = rows / groups;
  const auto opts = x.options();
  const at::Tensor zeros = at::zeros({n, dim_, h, w}, opts);
  std::vector<at::Tensor> maps;
  const bool has_map = map_.defined();
  const at::Tensor full = has_map ? map_.to(opts).unsqueeze(0).expand({n, dim_, h, w}) : zeros;
  if (groups == 1) {
    maps.push_back(full);  // unguided: eps(c_g, c_l)
  } else {
    maps.push_back(zeros);                                  // eps(0, 0)
    maps.push_back(zeros);                                  // eps(c_g, 0)
    for (int g = 2; g < groups; ++g) maps.push_back(full);  // eps(0, c_l)
  }
  in.sample = at::cat({x, at::cat(maps, 0)}, 1);
}
}  // namespace dmx::pipelines
