// A fresh ControlNet from a UNet, and writing ControlNets in the layouts other tools load.
// Mirrors diffusers' ControlNetModel.from_unet (0.27.2): config copied from the UNet; conv_in, time_proj,
// time_embedding, down_blocks and mid_block weights copied; controlnet_down_blocks, controlnet_mid_block
// (the zero convolutions) and controlnet_cond_embedding.conv_out zero-initialised; the other hint-encoder
// convolutions keep their fresh initialisation. A fresh ControlNet therefore leaves the UNet output unchanged.
// Internal header of the training layer.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "models/controlnet.h"
#include "models/unet_2d_condition.h"

namespace dmx::training {

// vae_scale_factor sets how far the hint encoder downsamples the control image (diffusers' default widths
// (16, 32, 96, 256) are the factor 8 of SD's VAE).
models::ControlNetModel controlnet_from_unet(models::UNet2DConditionModel& unet, int conditioning_channels = 3,
                                             int vae_scale_factor = 8);

// diffusers' ControlNetModel config.json for `cfg`: every field diffusers 0.27.2 writes, with its names, plus
// "_class_name": "ControlNetModel" and "_diffusers_version": "0.27.2" (keys sorted, as diffusers writes them).
nlohmann::json controlnet_config_json(const models::ControlNetConfig& cfg);

// diffusers layout: dir/config.json + dir/diffusion_pytorch_model.safetensors (written atomically; the folder
// is created). Loads in diffusers' ControlNetModel.from_pretrained with no missing or unexpected weight.
void save_controlnet_diffusers(models::ControlNetModel& net, const std::string& dir);
// Original (lllyasviel ControlNet) single-file layout: control_model.* keys, as A1111 loads.
void save_controlnet_original(models::ControlNetModel& net, const std::string& file);
}  // namespace dmx::training
