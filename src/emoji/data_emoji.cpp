// `dmx data emoji`: builds an image-caption training folder (diffusers ImageFolder layout, metadata.jsonl)
// from the emoji-datasource npm packages.
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "core/atomic_dir.h"
#include "core/canny.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/output_plan.h"
#include "core/progress.h"
#include "core/resize.h"
#include "core/text.h"
#include "dmx/emoji_data.h"
#include "dmx/error.h"

namespace dmx {
namespace fs = std::filesystem;

namespace {
struct Concept {
  std::string name, short_name, category, subcategory, image;
  int sort_order = 0;
  std::map<std::string, bool> has;  // style -> has image
  bool heldout = false;
};

std::string package_dir(const std::string& source, const std::string& style) {
  return join_path(join_path(source, "emoji-datasource-" + style), "package");
}

std::string caption(const std::string& fmt, const Concept& c, const std::string& style) {
  std::string out;
  for (size_t i = 0; i < fmt.size();) {
    if (fmt[i] == '{') {
      const size_t j = fmt.find('}', i);
      DMX_CHECK_ARG(j != std::string::npos, "--caption-format: unclosed '{' in '", fmt, "'");
      const std::string key = fmt.substr(i + 1, j - i - 1);
      if (key == "name")
        out += c.name;
      else if (key == "short_name")
        out += c.short_name;
      else if (key == "category")
        out += to_lower_ascii(c.category);
      else if (key == "subcategory")
        out += c.subcategory;
      else if (key == "style")
        out += style;
      else
        throw InvalidArgument("--caption-format: unknown field {" + key +
                              "} (known: {name} {short_name} {category} {subcategory} {style})");
      i = j + 1;
    } else {
      out += fmt[i++];
    }
  }
  return out;
}

// RGBA emoji -> RGB over a plain background, and its binary alpha mask, at `size`.
void prepare(const Image& src, int size, int background, Image& rgb, Image& mask) {
  Image rgba = src;
  if (rgba.channels != 4) {  // an opaque emoji: alpha 255
    const Image c = to_rgb(src);
    rgba.channels = 4;
    rgba.data.resize(static_cast<size_t>(c.width) * c.height * 4);
    for (size_t p = 0; p < static_cast<size_t>(c.width) * c.height; ++p) {
      for (int k = 0; k < 3; ++k) rgba.data[p * 4 + k] = c.data[p * 3 + k];
      rgba.data[p * 4 + 3] = 255;
    }
  }
  if (rgba.width != size || rgba.height != size) rgba = resize_lanczos(rgba, size, size);
  rgb.width = mask.width = size;
  rgb.height = mask.height = size;
  rgb.channels = 3;
  mask.channels = 1;
  rgb.data.resize(static_cast<size_t>(size) * size * 3);
  mask.data.resize(static_cast<size_t>(size) * size);
  for (size_t p = 0; p < static_cast<size_t>(size) * size; ++p) {
    const int a = rgba.data[p * 4 + 3];
    for (int k = 0; k < 3; ++k) {
      const int v = (rgba.data[p * 4 + k] * a + background * (255 - a) + 127) / 255;
      rgb.data[p * 3 + k] = static_cast<uint8_t>(v);
    }
    mask.data[p] = a >= 128 ? 255 : 0;
  }
}

std::vector<Concept> read_concepts(const EmojiDataOptions& o) {
  // emoji.json is the same in every package; read it from the first style present.
  std::string json_path;
  for (const auto& s : o.styles) {
    const std::string p = join_path(package_dir(o.source, s), "emoji.json");
    if (path_exists(p)) {
      json_path = p;
      break;
    }
  }
  DMX_CHECK_ARG(!json_path.empty(), "--source: no emoji-datasource-<style>/package/emoji.json under '", o.source,
                "' (run scripts/setup.sh --emoji, or set --source / DMX_EMOJI_DIR)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(json_path, "emoji.json", kMaxJsonFileBytes));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(json_path + ": not valid JSON: " + e.what());
  }
  DMX_CHECK_FORMAT(j.is_array() && !j.empty(), json_path, ": expected a non-empty array of emoji");
  std::vector<Concept> out;
  std::set<std::string> seen;
  for (const auto& e : j) {
    DMX_CHECK_FORMAT(e.is_object() && e.contains("name") && e.contains("image") && e.contains("category"), json_path,
                     ": every entry needs name, image and category");
    Concept c;
    try {  // a field of another type is the file's fault: FormatError, not a raw JSON error
      c.name = e["name"].is_string() ? to_lower_ascii(e["name"].get<std::string>()) : "";
      c.short_name = e.value("short_name", "");
      c.category = e.value("category", "");
      c.subcategory = e.value("subcategory", "");
      c.image = e["image"].get<std::string>();
      c.sort_order = e.value("sort_order", 0);
      for (const auto& s : o.styles) c.has[s] = e.value("has_img_" + s, false);
    } catch (const nlohmann::json::exception& ex) {
      throw FormatError(json_path + ": entry '" + e.value("name", nlohmann::json()).dump() + "': " + ex.what());
    }
    if (c.name.empty() || c.category == "Component" || !seen.insert(c.name).second) continue;
    DMX_CHECK_FORMAT(c.image.find('/') == std::string::npos && c.image.find("..") == std::string::npos, json_path,
                     ": image file name must be a plain name, got '", c.image, "'");
    bool any = false;
    for (const auto& s : o.styles) any = any || c.has[s];
    if (any) out.push_back(std::move(c));
  }
  std::sort(out.begin(), out.end(), [](const Concept& a, const Concept& b) { return a.sort_order < b.sort_order; });
  return out;
}

std::string file_name_for(const Concept& c) {
  std::string s;
  for (char ch : c.short_name.empty() ? c.name : c.short_name)
    s += (std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_') ? ch : '_';
  return s + ".png";
}
// --only: the concepts with these short names, in emoji.json's order; every unknown name is reported.
std::vector<Concept> select_only(const std::vector<Concept>& all, const std::vector<std::string>& only) {
  std::set<std::string> want, found;
  for (const auto& n : only) {
    DMX_CHECK_ARG(!n.empty(),
                  "--only: empty short name in the list (comma-separated short names, e.g. grinning,pizza)");
    want.insert(n);
  }
  std::vector<Concept> out;
  for (const auto& c : all)
    if (want.count(c.short_name)) {
      out.push_back(c);
      found.insert(c.short_name);
    }
  std::string missing;
  for (const auto& n : only)
    if (!found.count(n) && missing.find("'" + n + "'") == std::string::npos)
      missing += (missing.empty() ? "'" : ", '") + n + "'";
  DMX_CHECK_ARG(missing.empty(), "--only: no emoji with short name ", missing,
                " in emoji.json with an image in the chosen styles (short names are emoji.json's short_name, "
                "e.g. grinning, pizza, cat)");
  return out;
}
}  // namespace

std::string default_emoji_source() {
  if (const char* d = std::getenv("DMX_EMOJI_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return join_path(join_path(x, "dmx"), "emoji");
  const char* home = std::getenv("HOME");
  return join_path(join_path(join_path(home && *home ? home : ".", ".cache"), "dmx"), "emoji");
}

EmojiDataReport build_emoji_dataset(const EmojiDataOptions& in) {
  EmojiDataOptions o = in;
  if (o.source.empty()) o.source = default_emoji_source();
  DMX_CHECK_ARG(!o.out.empty(), "--out is required (the folder to create)");
  DMX_CHECK_ARG(o.size >= 8 && o.size <= 1024, "--size must be in [8, 1024], got ", o.size);
  DMX_CHECK_ARG(o.background >= 0 && o.background <= 255, "--background must be in [0, 255], got ", o.background);
  DMX_CHECK_ARG(o.heldout_fraction >= 0 && o.heldout_fraction <= 0.05,
                "--heldout-fraction must be in [0, 0.05] (few held-out concepts), got ", o.heldout_fraction);
  DMX_CHECK_ARG(!o.styles.empty(), "--style: at least one style is needed");
  for (const auto& s : o.styles)
    DMX_CHECK_ARG(s == "google" || s == "twitter" || s == "apple" || s == "facebook",
                  "--style must be google, twitter, apple or facebook, got '", s, "'");
  {
    OutputPlan plan(o.overwrite);
    plan.input(o.source, "--source");
    std::string out = o.out;
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    plan.folder(out, "--out", {"concepts.json"}, "emoji data folder");
    plan.prepare();
  }
  caption(o.caption_format, Concept{}, "x");  // validate the format before any work
  for (const auto& f : o.extra_caption_formats) caption(f, Concept{}, "x");

  std::vector<Concept> concepts = read_concepts(o);
  DMX_CHECK_FORMAT(!concepts.empty(), "--source: emoji.json lists no emoji with images for the chosen styles");
  if (o.heldout_fraction > 0) {
    const size_t k = static_cast<size_t>(std::lround(1.0 / o.heldout_fraction));
    for (size_t i = k / 2; i < concepts.size(); i += k) concepts[i].heldout = true;
  }
  if (!o.only.empty()) concepts = select_only(concepts, o.only);

  EmojiDataReport rep;
  rep.out = o.out;
  rep.concepts = static_cast<int>(concepts.size());
  for (const auto& c : concepts)
    if (c.heldout) rep.heldout.push_back(c.name);

  // Built in <out>.tmp.<pid> (removed on failure or a signal) and renamed at the end.
  write_directory_atomic(o.out, "the emoji data folder", [&](const std::string& tmp) {
    int total = 0;
    for (const auto& s : o.styles)
      for (const auto& c : concepts) total += c.has.at(s) ? 1 : 0;
    ProgressBar bar("emoji", total, o.progress);
    for (const auto& style : o.styles) {
      const std::string img_dir = join_path(join_path(join_path(package_dir(o.source, style), "img"), style), "64");
      DMX_CHECK_ARG(is_directory(img_dir), "--source: missing image folder '", img_dir,
                    "' (install the npm package emoji-datasource-", style, ")");
      for (const char* split : {"train", "heldout"}) {
        const std::string dir = join_path(join_path(tmp, style), split);
        for (const char* sub : {"images", "edges", "masks"}) fs::create_directories(join_path(dir, sub));
        std::string jsonl;
        for (const auto& c : concepts) {
          if (!c.has.at(style) || c.heldout != (std::string(split) == "heldout")) continue;
          const Image src = load_image(join_path(img_dir, c.image), "emoji image");
          Image rgb, mask;
          prepare(src, o.size, o.background, rgb, mask);
          const Image edges = canny_edges(rgb, o.canny_low, o.canny_high);
          const std::string fn = file_name_for(c);
          save_png(join_path(join_path(dir, "images"), fn), rgb);
          save_png(join_path(join_path(dir, "edges"), fn), to_gray(edges));
          save_png(join_path(join_path(dir, "masks"), fn), mask);
          nlohmann::json row = {{"file_name", "images/" + fn},
                                {"text", caption(o.caption_format, c, style)},
                                {"conditioning_image", "edges/" + fn},
                                {"mask", "masks/" + fn},
                                {"name", c.name},
                                {"short_name", c.short_name},
                                {"category", c.category},
                                {"subcategory", c.subcategory},
                                {"style", style}};
          jsonl += row.dump() + "\n";
          for (const auto& f : o.extra_caption_formats) {  // the same image again under another caption
            row["text"] = caption(f, c, style);
            jsonl += row.dump() + "\n";
          }
          (c.heldout ? rep.heldout_images : rep.train_images) += 1;
          bar.tick();
        }
        write_bytes_atomic(join_path(dir, "metadata.jsonl"), jsonl.data(), jsonl.size());
      }
    }
    bar.finish();

    nlohmann::json cj = nlohmann::json::array();
    for (const auto& c : concepts) {
      nlohmann::json styles = nlohmann::json::array();
      for (const auto& [s, h] : c.has)
        if (h) styles.push_back(s);
      cj.push_back({{"name", c.name},
                    {"short_name", c.short_name},
                    {"category", c.category},
                    {"subcategory", c.subcategory},
                    {"split", c.heldout ? "heldout" : "train"},
                    {"styles", styles}});
    }
    const std::string cjs = cj.dump(1) + "\n";
    write_bytes_atomic(join_path(tmp, "concepts.json"), cjs.data(), cjs.size());
    std::string readme =
        "# emoji training data built by `dmx data emoji`\n\n"
        "Images from the npm packages emoji-datasource-<style> (names and categories from emoji.json,\n"
        "https://github.com/iamcal/emoji-data, MIT). Google's Noto emoji images: Apache License 2.0\n"
        "(https://github.com/googlefonts/noto-emoji). Twemoji images: Copyright Twitter, Inc. and other contributors,\n"
        "CC-BY 4.0 (https://github.com/twitter/twemoji).\n\n"
        "Layout per style: train/ and heldout/ with metadata.jsonl (file_name, text, conditioning_image = Canny\n"
        "edges, mask = alpha mask), images/, edges/, masks/. Held-out concepts (never in train/):\n\n";
    for (const auto& n : rep.heldout) readme += "- " + n + "\n";
    write_bytes_atomic(join_path(tmp, "README.md"), readme.data(), readme.size());
  });
  return rep;
}
}  // namespace dmx
