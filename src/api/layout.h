// Layouts for `dmx generate` (docs/regional.md): the `--layout MAP.png --region COLOR=TEXT ...` options, the map
// read and resized exactly to the output size, and the table of layout methods (--layout-method), each row a
// builder of what the run needs: regional (DenseDiffusion, pipelines/regional.h), spatext (a SpaText model folder,
// pipelines/spatext.h) and scene (a Make-A-Scene-style scene folder, pipelines/scene.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/image.h"
#include "dmx/dmx.h"
#include "loaders/model_bundle.h"
#include "loaders/spatext.h"

namespace dmx::loaders {
struct SceneModel;
}
#include "nn/attention_seam.h"
#include "pipelines/residual_provider.h"

namespace dmx::api {

// "#rrggbb" (hex digits in either case) -> {r, g, b}; InvalidArgument naming `param` otherwise.
std::array<uint8_t, 3> parse_layout_color(const std::string& color, const std::string& param);

// Every layout rule that needs no file: the method (a row of the table; Unsupported "not built yet" for one without
// a builder), --layout and --region together, each colour well-formed and listed once, each text non-empty, at most
// kMaxLayoutRegions regions, the scale in [0, 10], txt2img only (not with --init-image, --mask or a Stable unCLIP
// folder). Nothing when no layout option is set.
constexpr size_t kMaxLayoutRegions = 16;
void check_layout_options(const GenerateOptions& o);

// The map as RGB (gray repeated, alpha dropped), each region's colour present in it (InvalidArgument naming the
// region and listing the map's colours otherwise). Unreadable or not an image: InvalidArgument naming --layout.
Image load_layout_map(const GenerateOptions& o);

// The map resized exactly to width x height: the same size; an integer upscale k (nearest: each pixel a k x k block);
// or an integer downscale k where each k x k block lies in one region (or all in the background). Any other size:
// InvalidArgument naming --layout, both sizes and the rule. -> [S, height, width] bool: the regions in order, then
// the background (the pixels of unlisted colours) when there is any.
at::Tensor layout_segments(const Image& map, const std::vector<LayoutRegion>& regions, int width, int height);

// What a layout method adds to a run.
struct LayoutRun {
  std::string prompt;  // the prompt to encode (regional: the global prompt with the region texts it lacks)
  std::shared_ptr<pipelines::ResidualProvider> provider;  // first in the run's providers; null: no effect
  std::shared_ptr<nn::AttentionProcessor> processor;      // installed on the UNet for the run; may be null
};

// The method's row of the table builds the run's layout parts for the output size width x height. spatext: the
// SpaText folder loaded (null when --model is none: spatext is then refused; other methods run on a SpaText folder
// with its map empty); seed: the run's (the prior's draws for the region texts come from their own generator seeded
// with it).
LayoutRun make_layout_run(const GenerateOptions& o, const Image& map, const loaders::StableDiffusionModels& m,
                          const std::string& prompt, int width, int height, loaders::SpaTextModel* spatext = nullptr,
                          uint64_t seed = 0, loaders::SceneModel* scene = nullptr);

// The SpaText provider of a run on a SpaText folder without --layout: no map (the text-only run of the model).
std::shared_ptr<pipelines::ResidualProvider> spatext_text_only_provider(loaders::SpaTextModel& s);
}  // namespace dmx::api
