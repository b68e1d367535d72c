// Writing model folders from training recipes (the unCLIP decoder, SpaText, the scene model): a folder tree copied
// with symlinks followed (the copy holds plain files), a text-to-image model's parts, and a JSON file written
// atomically (2-space indent, final newline).
// Internal header of the training layer.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace dmx::training {
void copy_folder(const std::string& from, const std::string& to);
void write_json_file(const std::string& path, const nlohmann::json& j);
// The base text-to-image model's parts (tokenizer/, text_encoder/, vae/, scheduler/, unet/, model_index.json) of the
// diffusers folder `model_dir` copied into `to` (FormatError naming a missing part), for the folders that keep the
// base unchanged beside their own files (SpaText, scene).
void copy_text_to_image_parts(const std::string& model_dir, const std::string& to);
}  // namespace dmx::training
