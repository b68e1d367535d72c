// Training-free regional prompts for any Stable Diffusion 1.x/2.x model (DenseDiffusion, Kim et al. 2023; the
// modulation itself is extensions/regional_attention.h). This file holds the pipeline's side of it:
//   - where each region's text sits in the caption (regional_caption): DenseDiffusion finds each region phrase's
//     tokens inside the full caption; a region text the caption lacks is appended (", TEXT");
//   - the residual provider (RegionalPromptProvider) that, at each UNet evaluation, writes each region's own text
//     encoding over its tokens in the conditional rows (the reference's cond_embeddings[0][j:j+wlen] =
//     cond_embeddings[i][1:1+wlen]) and tells the attention processor the step, timestep and conditional rows.
// The processor must be installed on the UNet for the run (nn::ScopedAttentionProcessor with processor()); the
// provider goes first in the run's provider list, so a ControlNet reads the same text conditioning as the UNet.
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "extensions/regional_attention.h"
#include "models/clip_tokenizer.h"
#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

struct RegionalCaption {
  std::string caption;                                       // the prompt encoded: the global prompt + appended texts
  std::vector<std::pair<int64_t, int64_t>> spans;            // per region: token positions [begin, end), BOS at 0
  std::vector<bool> appended;                                // per region: its text was appended to the caption
  std::vector<int64_t> token_segment(int64_t length) const;  // per token position: its region, or -1
};

// For each region text in order: its tokens are looked for in the caption's (lower-cased BPE ids, BOS/EOS
// excluded), first occurrence not already taken by an earlier region; when none, ", TEXT" is appended to the
// caption (just TEXT when the caption is empty) and the appended tokens are the region's. InvalidArgument naming
// `param`: a text with no token; a caption (with the appended texts) longer than the tokenizer's model_max_length
// (BOS and EOS included), with both counts.
RegionalCaption regional_caption(const models::CLIPTokenizer& tok, const std::string& prompt,
                                 const std::vector<std::string>& texts, const std::string& param = "--region");

struct RegionalLayout {
  // [S, H, W] bool at the output size: the regions in the order of `texts`, then (when some pixel is in no
  // region) the background, a segment of its own without text (gradio_app.py's white background with an empty
  // prompt). Disjoint.
  at::Tensor segments;
  std::vector<std::string> texts;  // one per region (texts.size() <= S)
  std::vector<std::string> names;  // per region, for messages ("--region #ff0000")
};

// Each region keeps at least one cell of the latent grid (the map sampled by nearest neighbour, every f-th
// pixel, as the reference resizes its layouts): InvalidArgument naming the region otherwise.
void check_regions_cover_latents(const RegionalLayout& layout, int vae_scale_factor);

class RegionalPromptProvider : public ResidualProvider {
 public:
  RegionalPromptProvider(RegionalLayout layout, RegionalCaption caption, extensions::DenseDiffusionConfig config,
                         int clip_skip = 0);
  std::string name() const override { return "--layout (regional)"; }
  // The map's size equals the run's; not img2img (the modulated window is the start of a schedule from noise).
  void check(const ResidualRun& run) const override;
  // Masks at the latent size (nearest, as the reference) and at every attention resolution of the UNet; each
  // region must keep a latent cell (InvalidArgument naming it); the region texts encoded alone.
  void prepare(const ResidualRun& run) override;
  void apply(const ResidualStep& step, models::UNetInputs& in) override;
  const std::shared_ptr<extensions::RegionalAttentionProcessor>& processor() const { return processor_; }
  // The latent-size segments of the last prepare() (tests): [S, h, w] float32.
  const at::Tensor& latent_segments() const { return latent_segments_; }

 private:
  RegionalLayout layout_;
  RegionalCaption caption_;
  int clip_skip_ = 0;
  std::shared_ptr<extensions::RegionalAttentionProcessor> processor_;
  at::Tensor latent_segments_;
  std::vector<at::Tensor> region_embeds_;  // per region: [len, D] its own encoding without BOS/EOS
  int batch_ = 1;
};
}  // namespace dmx::pipelines
