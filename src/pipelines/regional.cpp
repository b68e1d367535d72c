// Regional prompts: the caption's region tokens and the residual provider (see regional.h).
#include "pipelines/regional.h"

#include <ATen/ATen.h>

#include <map>

#include "dmx/error.h"
#include "pipelines/generation.h"

namespace dmx::pipelines {

namespace {
// ids without BOS and EOS
std::vector<int64_t> words(const models::CLIPTokenizer& tok, const std::string& text) {
  std::vector<int64_t> ids = tok.encode(text);
  return std::vector<int64_t>(ids.begin() + 1, ids.end() - 1);
}

bool overlaps(const std::vector<std::pair<int64_t, int64_t>>& taken, int64_t b, int64_t e) {
  for (const auto& s : taken)
    if (b < s.second && s.first < e) return true;
  return false;
}

// The first (or, from_end, last) position of `needle` in ids[1, ids.size() - 1) not overlapping `taken`; -1.
int64_t find_span(const std::vector<int64_t>& ids, const std::vector<int64_t>& needle,
                  const std::vector<std::pair<int64_t, int64_t>>& taken, bool from_end) {
  const int64_t n = static_cast<int64_t>(needle.size()), last = static_cast<int64_t>(ids.size()) - 1 - n;
  for (int64_t k = 1; k <= last; ++k) {
    const int64_t j = from_end ? last + 1 - k : k;
    if (overlaps(taken, j, j + n)) continue;
    if (std::equal(needle.begin(), needle.end(), ids.begin() + j)) return j;
  }
  return -1;
}
}  // namespace

std::vector<int64_t> RegionalCaption::token_segment(int64_t length) const {
  std::vector<int64_t> out(static_cast<size_t>(length), -1);
  for (size_t r = 0; r < spans.size(); ++r)
    for (int64_t j = spans[r].first; j < spans[r].second && j < length; ++j) out[static_cast<size_t>(j)] = int64_t(r);
  return out;
}

RegionalCaption regional_caption(const models::CLIPTokenizer& tok, const std::string& prompt,
                                 const std::vector<std::string>& texts, const std::string& param) {
  RegionalCaption c;
  c.caption = prompt;
  std::vector<int64_t> ids = tok.encode(c.caption);
  for (size_t r = 0; r < texts.size(); ++r) {
    const std::vector<int64_t> needle = words(tok, texts[r]);
    DMX_CHECK_ARG(!needle.empty(), param, " ", r, ": the region text must have at least one token, got '", texts[r],
                  "'");
    int64_t j = find_span(ids, needle, c.spans, /*from_end=*/false);
    const bool appended = j < 0;
    if (appended) {
      c.caption += (c.caption.empty() ? "" : ", ") + texts[r];
      ids = tok.encode(c.caption);
      j = find_span(ids, needle, c.spans, /*from_end=*/true);
      DMX_CHECK_ARG(j >= 0, param, " ", r, ": the tokens of '", texts[r], "' are not found in the caption '", c.caption,
                    "' even after appending it");
    }
    c.spans.emplace_back(j, j + static_cast<int64_t>(needle.size()));
    c.appended.push_back(appended);
  }
  const int max_len = tok.model_max_length();
  DMX_CHECK_ARG(static_cast<int64_t>(ids.size()) <= max_len, param,
                ": the prompt with the region texts must fit the tokenizer's ", max_len,
                " tokens (BOS and EOS included), got ", ids.size(), " tokens for '", c.caption,
                "'; shorten the prompt or the region texts");
  return c;
}

namespace {
// The reference's F.interpolate(layouts, (sp_sz, sp_sz), mode='nearest') from the image-size map: [S, h, w] float.
at::Tensor latent_masks(const at::Tensor& segments, int64_t h, int64_t w) {
  return at::upsample_nearest2d(segments.to(at::kFloat).unsqueeze(0), {h, w}).squeeze(0);
}
}  // namespace

void check_regions_cover_latents(const RegionalLayout& layout, int f) {
  const int64_t h = layout.segments.size(1) / f, w = layout.segments.size(2) / f;
  DMX_CHECK_ARG(h >= 1 && w >= 1, "--layout: the output is smaller than the VAE factor ", f);
  const at::Tensor lat = latent_masks(layout.segments, h, w);
  for (size_t r = 0; r < layout.texts.size(); ++r)
    DMX_CHECK_ARG(lat[static_cast<int64_t>(r)].sum().item<double>() > 0, layout.names[r],
                  ": the region covers no cell of the ", w, "x", h, " latent grid (the map is sampled at every ", f,
                  "th pixel); draw it larger");
}

RegionalPromptProvider::RegionalPromptProvider(RegionalLayout layout, RegionalCaption caption,
                                               extensions::DenseDiffusionConfig config, int clip_skip)
    : layout_(std::move(layout)),
      caption_(std::move(caption)),
      clip_skip_(clip_skip),
      processor_(std::make_shared<extensions::RegionalAttentionProcessor>(config)) {
  DMX_CHECK_ARG(layout_.segments.defined() && layout_.segments.dim() == 3, "--layout: segments must be [S, H, W]");
  DMX_CHECK_ARG(layout_.texts.size() == caption_.spans.size() && layout_.texts.size() == layout_.names.size() &&
                    static_cast<int64_t>(layout_.texts.size()) <= layout_.segments.size(0),
                "--layout: ", layout_.texts.size(), " region texts for ", caption_.spans.size(), " caption spans and ",
                layout_.segments.size(0), " segments");
}

void RegionalPromptProvider::check(const ResidualRun& run) const {
  DMX_CHECK_SUPPORTED(!run.img2img,
                      "--layout with --init-image is not supported: the modulation acts on the first 30% of a "
                      "schedule that starts from noise");
  DMX_CHECK_ARG(layout_.segments.size(2) == run.width && layout_.segments.size(1) == run.height, "--layout: the map (",
                layout_.segments.size(2), "x", layout_.segments.size(1), " after resizing) must have the output size ",
                run.width, "x", run.height);
}

void RegionalPromptProvider::prepare(const ResidualRun& run) {
  at::NoGradGuard no_grad;
  check(run);
  const loaders::StableDiffusionModels& m = run.models;
  const int f = m.vae_scale_factor();
  const int64_t h = run.height / f, w = run.width / f;
  // The reference: F.interpolate(layouts, (sp_sz, sp_sz), mode='nearest') from the image-size map.
  check_regions_cover_latents(layout_, f);
  latent_segments_ = latent_masks(layout_.segments, h, w);
  const int64_t L = m.tokenizer->model_max_length();
  const std::vector<int64_t> token_segment = caption_.token_segment(L);
  const int levels = static_cast<int>(m.unet->config().block_out_channels.size());
  std::map<int64_t, extensions::RegionalMaps> maps;
  for (const auto& [lh, lw] : extensions::attention_resolutions(h, w, levels))
    maps[lh * lw] =
        extensions::build_regional_maps(latent_segments_, token_segment, lh, lw, processor_->config().size_scale);
  processor_->set_maps(std::move(maps));
  region_embeds_.clear();
  for (size_t r = 0; r < layout_.texts.size(); ++r) {
    const int64_t len = caption_.spans[r].second - caption_.spans[r].first;
    region_embeds_.push_back(encode_prompt(m, layout_.texts[r], clip_skip_)[0].narrow(0, 1, len));  // [len, D]
  }
  batch_ = run.batch;
}

void RegionalPromptProvider::apply(const ResidualStep& step, models::UNetInputs& in) {
  const int64_t B = in.encoder_hidden_states.size(0);
  const int64_t first = step.guided ? batch_ : 0;  // the core's batch: [uncond (N); cond (N)] when guided
  DMX_CHECK_ARG(B == first + batch_, "--layout: the UNet batch has ", B, " rows, expected ", first + batch_);
  at::Tensor embeds = in.encoder_hidden_states.clone();
  for (size_t r = 0; r < region_embeds_.size(); ++r) {
    const auto [b, e] = caption_.spans[r];
    if (e > embeds.size(1)) continue;
    embeds.narrow(0, first, batch_).narrow(1, b, e - b).copy_(region_embeds_[r].unsqueeze(0).expand({batch_, -1, -1}));
  }
  in.encoder_hidden_states = embeds;
  extensions::RegionalCall call;
  call.index = step.index;
  call.num_timesteps = step.num_timesteps;
  call.t = step.t;
  for (int64_t i = first; i < B; ++i) call.conditional_rows.push_back(i);
  processor_->set_call(std::move(call));
}
}  // namespace dmx::pipelines
