// A CLIP model folder: the two towers of transformers' CLIPModel (Radford et al. 2021) as separate components, in
// the layouts the unCLIP folders already use, so one loader reads a trained CLIP and a Stable unCLIP's encoders:
//   model_index.json        {"_class_name": "CLIPModel", "text_encoder": ["transformers",
//                            "CLIPTextModelWithProjection"], "image_encoder": [..., "CLIPVisionModelWithProjection"],
//                            "tokenizer": [..., "CLIPTokenizer"], "feature_extractor": [..., "CLIPImageProcessor"],
//                            "logit_scale": the learned log temperature}
//   text_encoder/           config.json (CLIPTextConfig) + model.safetensors (text_model.*, text_projection.weight)
//   image_encoder/          config.json (CLIPVisionConfig) + model.safetensors (vision_model.*, visual_projection)
//   tokenizer/              vocab.json, merges.txt (+ tokenizer_config.json, special_tokens_map.json)
//   feature_extractor/      preprocessor_config.json (CLIPImageProcessor)
// `dmx train clip` writes it (training/clip_train.h), `dmx embed` and `dmx eval --clip` read it.
// Internal header of the loaders layer.
#pragma once
#include <cmath>
#include <memory>
#include <string>

#include "loaders/model_bundle.h"
#include "models/clip_image_processor.h"
#include "models/clip_text_model.h"
#include "models/clip_tokenizer.h"
#include "models/clip_vision_model.h"

namespace dmx::loaders {

// CLIP's initial temperature: logit_scale = ln(1 / 0.07), and the clamp of its exponential at 100.
inline const double kCLIPLogitScaleInit = std::log(1.0 / 0.07);
inline const double kCLIPLogitScaleMax = std::log(100.0);

struct CLIPComponents {
  std::shared_ptr<models::CLIPTokenizer> tokenizer;
  std::string tokenizer_dir;                    // where the tokenizer's files are (copied when the folder is saved)
  models::CLIPTextModel text_encoder{nullptr};  // with projection: text_embeds
  models::CLIPImageProcessorConfig feature_extractor;
  models::CLIPVisionModelWithProjection image_encoder{nullptr};
  double logit_scale = kCLIPLogitScaleInit;
};

// True when path is a folder whose model_index.json names _class_name CLIPModel.
bool is_clip_folder(const std::string& path);

// Loads a CLIP folder strictly (every component required; a missing one is a FormatError naming the folder and each
// missing part; malformed configs or weights a FormatError naming the file; the towers' projection widths, the
// tokenizer's length against the text tower's positions and the feature extractor's size against the image tower's,
// a FormatError naming both sizes). Modules in eval mode, on opts.device in opts.dtype.
std::shared_ptr<CLIPComponents> load_clip(const std::string& path, const LoadOptions& opts = {});

// Writes m into the folder dir (which must not exist yet, or is replaced atomically: callers check with an output
// plan first): configs, float32 weights, the tokenizer's files copied from m.tokenizer_dir.
void save_clip(const std::string& dir, const CLIPComponents& m);

// transformers' CLIPTextConfig / CLIPVisionConfig as config.json (model_type, architectures and every field the
// models read).
nlohmann::json clip_text_config_json(const models::CLIPTextConfig& c);
nlohmann::json clip_vision_config_json(const models::CLIPVisionConfig& c);
nlohmann::json clip_image_processor_json(const models::CLIPImageProcessorConfig& c);
}  // namespace dmx::loaders
