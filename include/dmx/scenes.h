// Emoji scenes (issue 18, docs/layouts.md): `dmx data scenes`, canvases composed from the emoji set with their
// instance, category and edge maps and a drawable RGB layout, and `dmx eval --layouts`, the measures of a picture
// made from a layout (per-region recognition in its crop, region IoU against a foreground mask, Fréchet distance
// against the real canvases). Torch-free public API of the emoji module.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dmx {

// ---------------------------------------------------------------------------------------------------
// `dmx data scenes`
struct SceneDataOptions {
  std::string emoji;  // a `dmx data emoji` folder (images + alpha masks); "" = default_emoji_data_dir()
  std::string out;    // folder to create (must not exist, unless overwrite)
  int count = 100;    // canvases, 1..100000
  int size = 64;      // canvas side in pixels, 64..1024 (at 32 px an object is a few latent cells)
  int min_objects = 1, max_objects = 4;  // objects per canvas, 1 <= min <= max <= kMaxSceneObjects
  uint64_t seed = 0;                     // canvas i depends only on (seed, i, the options)
  std::string split = "train";           // train: train concepts only; heldout: held-out concepts only
  std::string style = "google";          // the emoji style drawn (a style folder of --emoji)
  bool overwrite = false;
  bool progress = true;
};
constexpr int kMaxSceneObjects = 8;  // the layout palette's colours

struct SceneDataReport {
  std::string out;
  int canvases = 0, objects = 0;
  int concepts = 0;  // concepts of the split that were drawn from
};

// Parses "--objects": "N" or "A-B" (1 <= A <= B <= kMaxSceneObjects); InvalidArgument naming --objects otherwise.
void parse_scene_objects(const std::string& text, int& min_objects, int& max_objects);

// Writes out/{images,instances,categories,edges,layouts}/NNNN.png, layouts/NNNN.json, metadata.jsonl,
// scenes.json and README.md (docs/layouts.md has the format), built under out.tmp.<pid> and renamed at the end.
SceneDataReport build_scene_dataset(const SceneDataOptions& o);

// The layout colours, in object order (object k of a canvas gets colour k - 1): "#rrggbb", distinct, none black.
const std::vector<std::string>& scene_layout_palette();

// The panoptic category id of an emoji.json category (1..9 for the nine emoji.json categories, 10 for any
// other) and its group: "face" (Smileys & Emotion), "human" (People & Body) or "panoptic".
int scene_category_id(const std::string& category);
std::string scene_category_group(const std::string& category);

// ---------------------------------------------------------------------------------------------------
// `dmx eval --layouts DIR`
struct LayoutEvalOptions {
  std::string layouts;          // a `dmx data scenes` folder
  std::string model;            // diffusers folder (not needed for the method "real")
  std::string method = "text";  // a row of layout_methods()
  std::string classifier = "models/emoji-classifier";
  std::string clip = "models/emoji-clip";  // global CLIP similarity; "" or a missing default: not measured
  int steps = 25;
  double guidance_scale = 3.0;
  double layout_guidance_scale = 1.0;   // spatext: the map's scale over guidance_scale (as dmx generate's)
  std::string scene_guidance = "text";  // scene: what guidance's unconditional row drops (as dmx generate's)
  std::string scheduler;                // "" = the model's own
  uint64_t seed = 0;                    // canvas i uses seed + i
  int limit = 0;                        // > 0: only the first `limit` canvases
  int threads = 0;
  std::string out_dir;  // when set: the pictures scored are written to out_dir/layouts-<method>/NNNN.png
  bool progress = true;
};

// One way to make a picture from a layout. `available` false: refused ("not available in this build").
struct LayoutMethodInfo {
  std::string name, description;
  bool available = false;
  bool needs_model = true;
};
const std::vector<LayoutMethodInfo>& layout_methods();

struct LayoutRegionScore {
  int canvas = 0;
  std::string color, text;
  bool top1 = false, top5 = false;
  std::string predicted;  // the classifier's top-1 concept in the region's crop
  double iou = 0;         // region IoU (docs/layouts.md)
};

struct LayoutEvalResult {
  std::string method;
  int canvases = 0, regions = 0;
  double top1 = 0, top5 = 0;  // share of regions whose concept is the top-1 (among the top-5) of its crop
  double region_iou = 0;      // mean over regions
  double layout_iou = 0;      // mean over canvases: IoU of the union of the regions and the foreground mask
  double frechet = -1;        // classifier features, pictures vs the real canvases (-1: fewer than 2 canvases)
  // Mean cosine of each picture's CLIP image embedding and its global caption's CLIP text embedding (the `clip`
  // folder's towers); -2 when no CLIP folder was given or found.
  double clip_similarity = -2;
  double seconds_per_image = 0;  // wall time per picture made (0 for "real")
  double seconds = 0;
  std::vector<LayoutRegionScore> per_region;
  std::string to_json() const;  // one line, per-region rows included
};

LayoutEvalResult evaluate_layouts(const LayoutEvalOptions& o);
}  // namespace dmx
