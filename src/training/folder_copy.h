// Writing model folders from training recipes (the unCLIP decoder, SpaText): a folder tree copied with symlinks
// followed (the copy holds plain files), and a JSON file written atomically (2-space indent, final newline).
// Internal header of the training layer.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace dmx::training {
void copy_folder(const std::string& from, const std::string& to);
void write_json_file(const std::string& path, const nlohmann::json& j);
}  // namespace dmx::training
