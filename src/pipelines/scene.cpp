// Make-A-Scene's scene tokens as a residual provider (see scene.h).
#include "pipelines/scene.h"

#include <ATen/ATen.h>

#include <cctype>

#include "core/tensor_util.h"
#include "core/text.h"
#include "dmx/error.h"

namespace dmx::pipelines {

namespace {
// dmx data scenes' categories (docs/layouts.md), id = index + 1.
const char* const kCategoryNames[] = {
    "Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
    "Activities",        "Objects",       "Symbols",          "Flags",        "other"};
}  // namespace

SceneGuidance parse_scene_guidance(const std::string& s) {
  if (s == "text") return SceneGuidance::KeepScene;
  if (s == "all") return SceneGuidance::DropAll;
  throw InvalidArgument(
      "--scene-guidance must be text (drop the text, keep the scene: Make-A-Scene's) or all (drop "
      "both), got '" +
      s + "'");
}

int parse_scene_category(const std::string& text, const std::string& param) {
  const std::string t = to_lower_ascii(trim(text));
  if (t == "face") return 1;
  if (t == "human") return 2;
  std::string list;
  for (int i = 0; i < 10; ++i) {
    if (t == to_lower_ascii(kCategoryNames[i]) || t == std::to_string(i + 1)) return i + 1;
    list += (i ? ", " : "") + std::to_string(i + 1) + " " + kCategoryNames[i];
  }
  throw InvalidArgument(param + ": the scene category must be one of " + list +
                        " (by name or number; face = 1, human = 2), got '" + text + "'");
}

SceneTokensProvider::SceneTokensProvider(at::Tensor tokens, at::Tensor dropped, SceneGuidance guidance, int resolution)
    : tokens_(std::move(tokens)), dropped_(std::move(dropped)), guidance_(guidance), res_(resolution) {
  DMX_CHECK_ARG(dropped_.defined() && dropped_.dim() == 2, "scene: the dropped scene's tokens must be [T, D]");
  DMX_CHECK_ARG(!tokens_.defined() || tokens_.sizes().equals(dropped_.sizes()), "scene: the tokens ",
                shape_string(tokens_), " must be shaped as the dropped scene's ", shape_string(dropped_));
}

void SceneTokensProvider::check(const ResidualRun& run) const {
  DMX_CHECK_ARG(run.models.unet->config().cross_attention_dim == dropped_.size(1),
                "scene: the UNet's context width is ", run.models.unet->config().cross_attention_dim,
                ", the scene tokens' ", dropped_.size(1));
  DMX_CHECK_ARG(run.models.unet->config().in_channels > loaders::kSceneCoordChannels, "scene: the UNet takes ",
                run.models.unet->config().in_channels, " input channels, a scene model's reads the latents and ",
                loaders::kSceneCoordChannels, " coordinate channels (a scene folder)");
  DMX_CHECK_ARG(run.width == res_ && run.height == res_, "--width/--height: a scene model makes ", res_, "x", res_,
                " pictures (its VQ-SEG's token grid), got ", run.width, "x", run.height);
}

void SceneTokensProvider::apply(const ResidualStep& step, models::UNetInputs& in) {
  const at::Tensor& ctx = in.encoder_hidden_states;
  const int64_t rows = ctx.size(0);
  const int groups = step.branches > 0 ? step.branches : 1;
  DMX_CHECK_ARG(rows % groups == 0, "scene: ", rows, " UNet rows are not ", groups, " groups");
  const int64_t n = rows / groups, T = dropped_.size(0), D = dropped_.size(1);
  const auto opts = ctx.options();
  const at::Tensor drop = dropped_.to(opts).unsqueeze(0).expand({n, T, D});
  const at::Tensor scene = tokens_.defined() ? tokens_.to(opts).unsqueeze(0).expand({n, T, D}) : drop;
  std::vector<at::Tensor> parts;
  if (groups == 1) {
    parts.push_back(scene);  // eps(t, s)
  } else {
    parts.push_back(guidance_ == SceneGuidance::KeepScene ? scene : drop);  // eps(0, s) or eps(0, 0)
    for (int g = 1; g < groups; ++g) parts.push_back(scene);                // eps(t, s)
  }
  in.encoder_hidden_states = at::cat({ctx, at::cat(parts, 0)}, 1);
  const at::Tensor& x = in.sample;
  const at::Tensor coords = loaders::scene_coordinates(x.size(2), x.size(3)).to(x.options()).unsqueeze(0);
  in.sample = at::cat({x, coords.expand({x.size(0), loaders::kSceneCoordChannels, x.size(2), x.size(3)})}, 1);
}

std::shared_ptr<SceneTokensProvider> make_scene_provider(loaders::SceneModel& s, const at::Tensor& labels,
                                                         const at::Tensor& regions, SceneGuidance guidance) {
  const auto& c = s.config;
  const int64_t T = static_cast<int64_t>(c.grid) * c.grid;
  const at::Tensor dropped = loaders::scene_token_embeddings(at::full({1, c.grid, c.grid}, c.codes, at::kLong),
                                                             s.code_embedding, s.row_embedding, s.col_embedding)
                                 .reshape({T, -1});
  at::Tensor tokens;
  if (labels.defined()) {
    DMX_CHECK_ARG(labels.dim() == 2 && labels.size(0) == c.resolution && labels.size(1) == c.resolution &&
                      regions.defined() && regions.sizes().equals(labels.sizes()),
                  "--layout: a scene model reads ", c.resolution, "x", c.resolution, " layouts (its VQ-SEG's), got ",
                  shape_string(labels));
    const at::Tensor map =
        loaders::scene_map_tensor(labels, loaders::scene_edges(regions), s.vqseg.categories).unsqueeze(0);
    const at::Tensor codes = loaders::scene_codes(s.vqseg, map);  // [1, g, g]
    DMX_CHECK_ARG(codes.size(1) == c.grid && codes.size(2) == c.grid, "scene: VQ-SEG gave ", shape_string(codes),
                  " codes, the model takes ", c.grid, "x", c.grid);
    tokens =
        loaders::scene_token_embeddings(codes, s.code_embedding, s.row_embedding, s.col_embedding).reshape({T, -1});
  }
  return std::make_shared<SceneTokensProvider>(tokens, dropped, guidance, c.resolution);
}
}  // namespace dmx::pipelines
