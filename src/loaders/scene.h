// Make-A-Scene as diffusion (Gafni et al. 2022, "Make-A-Scene: Scene-Based Text-to-Image Generation with Human
// Priors"; issue 18, docs/scene.md): VQ-SEG folders (an autoencoder of scene maps) and scene model folders.
//
// A scene map, as VQ-SEG reads it: [categories + 1, H, W] float, the one-hot of the category map (channel 0 the
// background; `dmx data scenes`' categories 1..10, docs/layouts.md) and the edge channel (1 on an object pixel whose
// 4-neighbour holds another object or the background). Make-A-Scene's panoptic, human and face groups are one map
// here: the face and human groups are the categories Smileys & Emotion and People & Body.
//
// A VQ-SEG folder (`dmx train vqseg`):
//   config.json + diffusion_pytorch_model.safetensors   a diffusers VQModel (in = out = categories + 1 channels)
//   vqseg.json   {"format": "dmx-vqseg-1", "categories": C, "resolution": R, "codebook_usage": ...}
// A scene folder (`dmx train scene`):
//   tokenizer/ text_encoder/ vae/ scheduler/ unet/ model_index.json   the base text-to-image model, unchanged
//   vqseg/                the VQ-SEG folder the tokens come from
//   scene.json            {"format": "dmx-scene-1", "grid": g, "codes": K, "resolution": R, "lora_rank": r, ...}
//   scene.safetensors     scene.code_embedding.weight [K + 1, D] (row K: the dropped scene), scene.row_embedding.weight
//                         and scene.col_embedding.weight [g, D] (D: the UNet's cross_attention_dim), and the LoRA
//                         pairs "unet.<module>.lora.{down,up}.weight" (loaders/spatext.h's merge_unet_lora)
// The scene tokens (code embedding + row embedding + column embedding of each of the g x g codes, row-major) are
// appended to the text encoder's hidden states: the UNet's cross-attention context is [77 + g^2, D]. So that the
// picture's side knows where it is (Make-A-Scene's transformer gives its image tokens positions; a UNet's features
// have none), the UNet also reads two coordinate channels (x and y in [-1, 1] at the latent cells' centres) beside
// the latents: conv_in widened by kSceneCoordChannels (loaders/spatext.h's widen_unet_input, new weights from zero),
// its weights in scene.safetensors as unet.conv_in.{weight,bias}.
//
// scene.json's "attention" says how the picture's cells see the scene tokens:
//   "cell" (what `dmx train scene` writes): decoupled cell attention (SceneCellAttention below). In every
//          cross-attention the context [text; scene tokens] is split: the queries attend to the text as without a
//          scene, and in a softmax of their own to the scene tokens of the grid cells their footprint overlaps; the
//          layer's output is the sum (IP-Adapter's decoupled cross-attention, Ye et al. 2023, with a locality mask).
//          The tables start at zero, so to_v of a token is zero and the first forward is the base model's.
//   "all"  (a folder without the key): the tokens joined to the text in one softmax, every query seeing every
//          token. The first emoji scene model was trained so and learnt to ignore the tokens: its region IoU equalled
//          its text-only run's (docs/scene.md).
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>

#include "loaders/model_bundle.h"
#include "models/vq_model.h"
#include "nn/attention_seam.h"

namespace dmx::loaders {

constexpr int kSceneCategories = 11;    // background + dmx data scenes' 10 categories
constexpr int kSceneCoordChannels = 2;  // the coordinate channels the scene UNet reads beside the latents
constexpr const char* kVQSegConfigFile = "vqseg.json";
constexpr const char* kSceneConfigFile = "scene.json";
constexpr const char* kSceneWeightsFile = "scene.safetensors";

// labels [H, W] integer in [0, categories), edges [H, W] (nonzero = edge) -> [categories + 1, H, W] float32.
// InvalidArgument for a label outside the range or shapes that differ.
at::Tensor scene_map_tensor(const at::Tensor& labels, const at::Tensor& edges, int categories);
// dmx data scenes' edge rule on an instance (or region) map [H, W] (0 = background): true on a nonzero pixel whose
// 4-neighbour (inside the picture) differs from it.
at::Tensor scene_edges(const at::Tensor& instances);

struct VQSeg {
  models::VQModel model{nullptr};
  int categories = 0;
  int resolution = 0;  // the training maps' side
};
bool is_vqseg_folder(const std::string& path);
// FormatError naming the file for a folder that is not one, or a VQModel whose in/out channels are not categories+1.
VQSeg load_vqseg(const std::string& dir);

struct SceneConfig {
  int grid = 0;        // g: the token grid's side (resolution / the VQ factor)
  int codes = 0;       // K: the codebook size (row K of the code embedding is the dropped scene)
  int resolution = 0;  // the training pictures' side (pixels)
  int lora_rank = 0;
  bool cell_attention = false;  // scene.json's "attention": "cell" (true) or "all"
};

struct SceneModel {
  std::shared_ptr<StableDiffusionModels> models;  // unet: the base widened by the coordinates, the LoRA merged
  int base_in_channels = 0;                       // the latents' channels
  VQSeg vqseg;
  SceneConfig config;
  at::Tensor code_embedding;  // [K + 1, D] float32
  at::Tensor row_embedding;   // [g, D]
  at::Tensor col_embedding;   // [g, D]
};

bool is_scene_folder(const std::string& path);
SceneConfig read_scene_config(const std::string& dir);  // checked; FormatError naming the file
std::shared_ptr<SceneModel> load_scene(const std::string& dir, const LoadOptions& opts = {});

// Which scene tokens the queries of an h x w attention map see: [h * w, grid * grid] bool, true where the query
// cell's footprint (row i covers [i / h, (i + 1) / h) of the picture) overlaps the token's grid cell (row r covers
// [r / grid, (r + 1) / grid)), in both directions. Row-major on both sides.
at::Tensor scene_cell_mask(int64_t h, int64_t w, int64_t grid);

// The "cell" attention of a scene UNet, an attention processor of the seam (nn/attention_seam.h) on the
// cross-attention sites: of the M keys the last grid^2 are the scene tokens. Output = attention(q, text keys, text
// values) + softmax(scale q k_s^T, -inf outside scene_cell_mask) v_s. The query maps are square (a scene model makes
// resolution x resolution pictures); another count of queries, or no more keys than scene tokens, is an
// InvalidArgument naming the site.
class SceneCellAttention : public nn::AttentionProcessor {
 public:
  explicit SceneCellAttention(int64_t grid);
  bool wants(const nn::AttentionSite& site) const override { return site.is_cross; }
  at::Tensor forward(const nn::AttentionSite& site, const nn::AttentionContext& ctx, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, double scale, bool upcast) override;

 private:
  int64_t grid_;
  std::map<int64_t, at::Tensor> hidden_;  // per query side: NOT scene_cell_mask (a UNet runs one call at a time)
};
// Sets SceneCellAttention(grid) as the processor of unet's seam, for the UNet's lifetime (a scene UNet always
// runs with it).
void install_scene_cell_attention(models::UNet2DConditionModel& unet, int64_t grid);

// The coordinate channels at the latent size: [2, h, w] float32, x then y, each (2 i + 1) / n - 1.
at::Tensor scene_coordinates(int64_t h, int64_t w);

// codes [B, g, g] int64 in [0, K] -> [B, g^2, D]: code_embedding[code] + row_embedding[y] + col_embedding[x],
// row-major (differentiable in the three tables).
at::Tensor scene_token_embeddings(const at::Tensor& codes, const at::Tensor& code_embedding,
                                  const at::Tensor& row_embedding, const at::Tensor& col_embedding);
// The scene map's codes through VQ-SEG: map [B, categories + 1, H, W] -> [B, H/f, W/f] int64 (no grad).
at::Tensor scene_codes(VQSeg& vqseg, const at::Tensor& map);
}  // namespace dmx::loaders
