#include "api/presets.h"

#include "dmx/error.h"

namespace dmx {
namespace {
ModelPreset tiny_preset() {
  ModelPreset p;
  p.text.vocab_size = 1000;
  p.text.hidden_size = 32;
  p.text.intermediate_size = 37;
  p.text.num_hidden_layers = 5;
  p.text.num_attention_heads = 4;
  p.text.projection_dim = 512;
  p.unet.sample_size = 32;
  p.unet.block_out_channels = {32, 64};
  p.unet.down_block_types = {"DownBlock2D", "CrossAttnDownBlock2D"};
  p.unet.up_block_types = {"CrossAttnUpBlock2D", "UpBlock2D"};
  p.unet.attention_head_dim = {8, 8};
  p.unet.norm_num_groups = 8;
  p.unet.cross_attention_dim = 32;
  p.vae.block_out_channels = {32, 64};
  p.vae.down_block_types = {"DownEncoderBlock2D", "DownEncoderBlock2D"};
  p.vae.up_block_types = {"UpDecoderBlock2D", "UpDecoderBlock2D"};
  p.vae.layers_per_block = 1;
  p.vae.norm_num_groups = 8;
  p.vae.sample_size = 64;
  p.native_size = 64;
  return p;
}
}  // namespace

ModelPreset model_preset(const std::string& name) {
  ModelPreset p;
  if (name == "sd15") {
    p.text = models::CLIPTextConfig::sd15();
    p.unet = models::UNet2DConditionConfig::sd15();
    p.vae = models::AutoencoderKLConfig::sd15();
    p.native_size = 512;
  } else if (name == "sd21") {
    p.text = models::CLIPTextConfig::sd21();
    p.unet = models::UNet2DConditionConfig::sd21();
    p.vae = models::AutoencoderKLConfig::sd21();
    p.native_size = 768;
  } else if (name == "tiny") {
    p = tiny_preset();
  } else {
    throw InvalidArgument("--preset must be one of sd15, sd21, tiny, got '" + name + "'");
  }
  return p;
}
}  // namespace dmx
