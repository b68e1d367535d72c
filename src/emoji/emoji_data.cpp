// Reading the `dmx data emoji` folders (see the header).
#include "emoji/emoji_data.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/fs.h"
#include "dmx/error.h"

namespace dmx::emoji {

at::Tensor image_to_tensor01(const Image& rgb) {
  DMX_CHECK_ARG(rgb.channels == 3, "image_to_tensor01 needs an RGB image, got ", rgb.channels, " channels");
  at::Tensor t = at::from_blob(const_cast<uint8_t*>(rgb.data.data()), {rgb.height, rgb.width, 3}, at::kByte);
  return t.permute({2, 0, 1}).to(at::kFloat).div(255.0).contiguous();  // [3, H, W]
}

EmojiData::EmojiData(const std::string& root, const std::string& param) : root_(root) {
  const std::string cpath = join_path(root, "concepts.json");
  DMX_CHECK_ARG(is_directory(root) && path_exists(cpath), param, ": ", root,
                " is not an emoji data folder (no concepts.json); build one with `dmx data emoji --out ", root, "`");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(cpath, param, kMaxJsonFileBytes));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(cpath + ": invalid JSON: " + e.what());
  }
  DMX_CHECK_FORMAT(j.is_array() && !j.empty(), cpath, ": must be a non-empty JSON array of concepts");
  for (size_t i = 0; i < j.size(); ++i) {
    const auto& e = j[i];
    DMX_CHECK_FORMAT(e.is_object() && e.contains("name") && e["name"].is_string(), cpath, ": entry ", i,
                     " has no string field 'name'");
    EmojiConcept c;
    c.name = e["name"].get<std::string>();
    try {  // a field of another type is the file's fault: FormatError, not a raw JSON error
      c.short_name = e.value("short_name", std::string());
      c.category = e.value("category", std::string());
      c.subcategory = e.value("subcategory", std::string());
      c.split = e.value("split", std::string("train"));
    } catch (const nlohmann::json::exception& ex) {
      throw FormatError(detail::concat(cpath, ": entry ", i, ": ", ex.what()));
    }
    DMX_CHECK_FORMAT(index_.emplace(c.name, static_cast<int>(concepts_.size())).second, cpath,
                     ": duplicate concept name '", c.name, "'");
    concepts_.push_back(c);
  }
  for (const std::string style : {"google", "twitter"}) {
    for (const std::string split : {"train", "heldout"}) {
      const std::string dir = join_path(join_path(root, style), split);
      const std::string meta = join_path(dir, "metadata.jsonl");
      if (!path_exists(meta)) continue;
      std::istringstream in(read_text_file(meta, "metadata.jsonl", kMaxMetadataFileBytes));
      std::string line;
      int line_no = 0;
      while (std::getline(in, line)) {
        ++line_no;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        nlohmann::json r;
        try {
          r = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          throw FormatError(meta + ":" + std::to_string(line_no) + ": invalid JSON: " + e.what());
        }
        DMX_CHECK_FORMAT(r.is_object() && r.contains("name") && r.contains("file_name"), meta, ":", line_no,
                         ": a row needs 'name' and 'file_name'");
        const auto it = index_.find(r["name"].get<std::string>());
        DMX_CHECK_FORMAT(it != index_.end(), meta, ":", line_no, ": concept '", r["name"].get<std::string>(),
                         "' is not in concepts.json");
        EmojiFiles f;
        f.image = join_path(dir, r["file_name"].get<std::string>());
        if (r.contains("conditioning_image")) f.edges = join_path(dir, r["conditioning_image"].get<std::string>());
        if (r.contains("mask")) f.mask = join_path(dir, r["mask"].get<std::string>());
        files_[style][it->second] = f;
      }
    }
  }
  DMX_CHECK_ARG(!files_.empty(), param, ": ", root, " has no <style>/<split>/metadata.jsonl");
}

int EmojiData::index_of(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? -1 : it->second;
}

std::vector<std::string> EmojiData::styles() const {
  std::vector<std::string> s;
  for (const auto& kv : files_) s.push_back(kv.first);
  return s;
}

bool EmojiData::has(const std::string& style, int concept) const {
  const auto it = files_.find(style);
  return it != files_.end() && it->second.count(concept) != 0;
}

const EmojiFiles& EmojiData::files(const std::string& style, int concept) const {
  DMX_CHECK_ARG(has(style, concept), "emoji data ", root_, " has no ", style, " image of concept ",
                concept >= 0 && concept < static_cast<int>(concepts_.size()) ? "'" + concepts_[concept].name + "'"
                                                                             : std::to_string(concept));
  return files_.at(style).at(concept);
}

at::Tensor EmojiData::image01(const std::string& style, int concept) const {
  const auto key = std::make_pair(style, concept);
  const auto it = cache_.find(key);
  if (it != cache_.end()) return it->second;
  at::Tensor t = image_to_tensor01(to_rgb(load_image(files(style, concept).image, "emoji image")));
  cache_[key] = t;
  return t;
}
}  // namespace dmx::emoji
