// Internal: the model architectures `dmx bench` and `dmx train bench` build with random weights.
#pragma once
#include <string>

#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/unet_2d_condition.h"

namespace dmx {
struct ModelPreset {
  models::CLIPTextConfig text;
  models::UNet2DConditionConfig unet;
  models::AutoencoderKLConfig vae;
  int native_size = 512;  // image side the preset was trained for
};
// "sd15" (runwayml/stable-diffusion-v1-5), "sd21" (stabilityai/stable-diffusion-2-1), "tiny" (the fixtures' test
// variant: diffusers' tiny test pipeline shapes). InvalidArgument naming --preset otherwise.
ModelPreset model_preset(const std::string& name);
}  // namespace dmx
