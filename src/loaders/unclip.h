// The unCLIP components of a diffusers Stable unCLIP folder, loaded strictly: what StableUnCLIPPipeline
// (prior_tokenizer, prior_text_encoder, prior, prior_scheduler) and StableUnCLIPImg2ImgPipeline (feature_extractor,
// image_encoder) add to a Stable Diffusion 2 decoder, and the noise augmentation both use (image_normalizer,
// image_noising_scheduler). The decoder itself (tokenizer, text_encoder, unet, vae, scheduler) is what
// load_stable_diffusion reads from the same folder.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "loaders/model_bundle.h"
#include "models/clip_image_processor.h"
#include "models/clip_text_model.h"
#include "models/clip_tokenizer.h"
#include "models/clip_vision_model.h"
#include "models/image_normalizer.h"
#include "models/prior_transformer.h"

namespace dmx::loaders {

struct UnCLIPComponents {
  std::string pipeline_class;  // model_index.json's _class_name: StableUnCLIPPipeline | StableUnCLIPImg2ImgPipeline
  // StableUnCLIPPipeline: text -> CLIP image embedding.
  std::shared_ptr<models::CLIPTokenizer> prior_tokenizer;
  models::CLIPTextModel prior_text_encoder{nullptr};  // CLIPTextModelWithProjection
  models::PriorTransformer prior{nullptr};
  nlohmann::json prior_scheduler_config;  // DDPMScheduler or UnCLIPScheduler (checked by building it once)
  // StableUnCLIPImg2ImgPipeline: picture -> CLIP image embedding.
  models::CLIPImageProcessorConfig feature_extractor;
  models::CLIPVisionModelWithProjection image_encoder{nullptr};
  // Both: the noise augmentation of the image embedding.
  models::StableUnCLIPImageNormalizer image_normalizer{nullptr};
  nlohmann::json image_noising_scheduler_config;  // a DDPM-family scheduler (it must add noise at a noise level)
  bool has_prior() const { return !prior.is_empty(); }
  bool has_image_encoder() const { return !image_encoder.is_empty(); }
};

// path: a diffusers folder whose model_index.json names StableUnCLIPPipeline or StableUnCLIPImg2ImgPipeline.
// Every component that pipeline needs is required: a missing one is a FormatError naming the folder and each
// missing component; a malformed config or weight file a FormatError naming the file (strict state-dict loading);
// components whose sizes do not fit together (the prior's widths against its text encoder's and the normalizer's,
// the image encoder's projection and input size against the normalizer and the feature extractor, the decoder
// UNet's class embedding against 2 x the embedding width) a FormatError naming both sizes; another pipeline class,
// a component class dmx does not run, or an UnCLIPScheduler prior_scheduler (StableUnCLIPPipeline steps it to t - 1
// whatever the step count), Unsupported. Modules are in eval mode, on opts.device in opts.dtype.
std::shared_ptr<UnCLIPComponents> load_unclip_components(const std::string& path, const LoadOptions& opts = {});

// The prior half alone (prior_tokenizer/, prior_text_encoder/, prior/, prior_scheduler/ of path, no model_index.json
// needed): what `dmx train prior` writes and `dmx eval --prior` reads. The same checks as load_unclip_components
// (strict weights, a config against its weight file, the prior's widths against its text encoder and tokenizer,
// no UnCLIPScheduler); with embedding_dim > 0, also the prior's embedding_dim and clip_embed_dim against it (the
// image_normalizer's). Fills the prior fields of a UnCLIPComponents (pipeline_class stays empty).
std::shared_ptr<UnCLIPComponents> load_unclip_prior(const std::string& path, const LoadOptions& opts = {},
                                                    int embedding_dim = 0);
}  // namespace dmx::loaders
