// Checkpoint formats: diffusers folders and original (CompVis/LDM) single-file checkpoints.
// Canonical names are diffusers names; every conversion lives in ldm_names.h (tables), which this loader
// uses and which never uses it.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "io/safetensors.h"

namespace dmx::io {

// An original single-file checkpoint split into components with diffusers key names, and the
// component configs (diffusers config.json form) detected from tensor shapes, or read from
// config_dir/<component>/config.json when config_dir is given (diffusers' from_single_file(config=...)).
struct SingleFileCheckpoint {
  TensorMap unet, vae, text_encoder;
  nlohmann::json unet_config, vae_config, text_encoder_config, scheduler_config;
  std::string family;  // "sd1" | "sd2" (what detection found)
};
SingleFileCheckpoint load_single_file(const std::string& path, const std::string& config_dir = "");

// The tensors of one weights file, by content: safetensors, or a torch.save pickle (.ckpt/.pt/.pth/.bin, zip
// or legacy) read by the weights-only loader (io/torch_pickle.h), whose state dict is returned flat (the
// dict under "state_dict" keys when there is one, as in .ckpt files).
TensorMap load_weights_file(const std::string& path);

// Weights of one component of a diffusers folder: <dir>/<component>/{diffusion_pytorch_model,model}.safetensors,
// else the .bin pickles diffusers and transformers wrote before safetensors.
TensorMap load_diffusers_component(const std::string& dir, const std::string& component);
nlohmann::json load_json_file(const std::string& path, const std::string& what);
}  // namespace dmx::io
