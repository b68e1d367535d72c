// Make-A-Scene as diffusion (Gafni et al. 2022; docs/scene.md): the scene tokens of a layout given to a scene model's
// UNet (loaders/scene.h) by appending them to the cross-attention context, with the paper's classifier-free guidance.
//
// The layout: a category per pixel (0 = background; dmx data scenes' categories 1..10) and the regions it came from
// (their borders are the edge channel, dmx data scenes' rule). VQ-SEG encodes the map to g x g codes; each becomes a
// token (code, row and column embeddings) after the text's 77.
//
// Guidance (--scene-guidance):
//   text  eps = eps(0, s) + g (eps(t, s) - eps(0, s)): the unconditional row drops the text and keeps the scene,
//         as Make-A-Scene does (its classifier-free guidance replaces the text tokens only);
//   all   eps = eps(0, 0) + g (eps(t, s) - eps(0, 0)): the unconditional row drops the scene too ("dropped scene"
//         tokens, as in training).
// Without a layout every row gets the dropped scene: the model's text-only run. Every row also gets the coordinate
// channels after the latents (loaders/scene.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "loaders/scene.h"
#include "pipelines/residual_provider.h"

namespace dmx::pipelines {

enum class SceneGuidance { KeepScene, DropAll };
// "text" -> KeepScene, "all" -> DropAll; InvalidArgument naming --scene-guidance otherwise.
SceneGuidance parse_scene_guidance(const std::string& s);

class SceneTokensProvider : public ResidualProvider {
 public:
  // tokens [T, D]: the layout's scene tokens (undefined: none, the text-only run); dropped [T, D]: the dropped
  // scene's tokens.
  SceneTokensProvider(at::Tensor tokens, at::Tensor dropped, SceneGuidance guidance, int resolution);
  std::string name() const override { return "scene"; }
  void check(const ResidualRun& run) const override;
  void prepare(const ResidualRun&) override {}
  void apply(const ResidualStep& step, models::UNetInputs& in) override;
  std::optional<std::pair<int, int>> default_size() const override { return std::make_pair(res_, res_); }
  // The coordinate channels (loaders::scene_coordinates) concatenated to every row's sample.
  int extra_input_channels() const override { return loaders::kSceneCoordChannels; }

 private:
  at::Tensor tokens_, dropped_;
  SceneGuidance guidance_;
  int res_ = 0;
};

// The provider of a run on a scene folder, the one builder `dmx generate` and `dmx eval --layouts` share.
// labels [H, W] (category per pixel, 0 background) and regions [H, W] (0 background, k = region k: the edges), both
// at the folder's resolution (InvalidArgument naming --layout otherwise); undefined labels: the text-only run.
std::shared_ptr<SceneTokensProvider> make_scene_provider(loaders::SceneModel& s, const at::Tensor& labels,
                                                         const at::Tensor& regions, SceneGuidance guidance);

// The scene category named by `text` (case-insensitive): a category name of docs/layouts.md ("Animals & Nature"),
// its number 1..10, or the group names "face" (Smileys & Emotion) and "human" (People & Body). InvalidArgument
// naming `param` and listing the names otherwise.
int parse_scene_category(const std::string& text, const std::string& param);
}  // namespace dmx::pipelines
