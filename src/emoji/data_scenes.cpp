// `dmx data scenes` (include/dmx/scenes.h, docs/layouts.md): canvases composed from a `dmx data emoji` folder,
// with the instance, category and edge maps Make-A-Scene conditions on and an RGB layout SpaText-style methods
// and `dmx generate --layout` take.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/atomic_dir.h"
#include "core/fs.h"
#include "core/image.h"
#include "core/output_plan.h"
#include "core/progress.h"
#include "core/resize.h"
#include "dmx/error.h"
#include "dmx/eval.h"
#include "dmx/scenes.h"
#include "emoji/emoji_data.h"

namespace dmx {
namespace {

struct CategoryRow {
  const char* name;
  const char* group;
};
// emoji.json's nine categories (Component is never a concept); id = index + 1, anything else 10.
constexpr CategoryRow kCategories[] = {
    {"Smileys & Emotion", "face"}, {"People & Body", "human"},      {"Animals & Nature", "panoptic"},
    {"Food & Drink", "panoptic"},  {"Travel & Places", "panoptic"}, {"Activities", "panoptic"},
    {"Objects", "panoptic"},       {"Symbols", "panoptic"},         {"Flags", "panoptic"},
};
constexpr int kOtherCategory = 10;
constexpr uint8_t kBackground = 255;  // the canvas: plain white, as `dmx data emoji`'s default background

// splitmix64: a small, portable generator (std distributions differ between standard libraries).
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }  // [0, n)
};

struct Sprite {  // one concept at one side: RGB and its binary alpha
  Image rgb;
  std::vector<uint8_t> alpha;  // 1 inside
  int area = 0;
};

struct Placed {
  int concept = 0, x = 0, y = 0, side = 0, area = 0;
};

std::string caption_of(const std::vector<std::string>& names) {
  std::string c;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) c += i + 1 == names.size() ? " and " : ", ";
    c += names[i];
  }
  return c;
}

std::string numbered(int i, int width) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%0*d", width, i);
  return buf;
}
}  // namespace

const std::vector<std::string>& scene_layout_palette() {
  static const std::vector<std::string> p = {"#e6194b", "#3cb44b", "#ffe119", "#4363d8",
                                             "#f58231", "#911eb4", "#42d4f4", "#f032e6"};
  return p;
}

int scene_category_id(const std::string& category) {
  for (size_t i = 0; i < std::size(kCategories); ++i)
    if (category == kCategories[i].name) return static_cast<int>(i) + 1;
  return kOtherCategory;
}

std::string scene_category_group(const std::string& category) {
  for (const auto& c : kCategories)
    if (category == c.name) return c.group;
  return "panoptic";
}

void parse_scene_objects(const std::string& text, int& min_objects, int& max_objects) {
  const size_t dash = text.find('-');
  auto number = [&](const std::string& w) {
    DMX_CHECK_ARG(!w.empty() && w.size() <= 3 && w.find_first_not_of("0123456789") == std::string::npos,
                  "--objects must be N or A-B with 1 <= A <= B <= ", kMaxSceneObjects, ", got '", text, "'");
    return std::stoi(w);
  };
  const int a = number(text.substr(0, dash));
  const int b = dash == std::string::npos ? a : number(text.substr(dash + 1));
  DMX_CHECK_ARG(a >= 1 && a <= b && b <= kMaxSceneObjects,
                "--objects must be N or A-B with 1 <= A <= B <= ", kMaxSceneObjects, ", got '", text, "'");
  min_objects = a;
  max_objects = b;
}

SceneDataReport build_scene_dataset(const SceneDataOptions& in) {
  SceneDataOptions o = in;
  // 1. Every rule before any work.
  DMX_CHECK_ARG(!o.out.empty(), "--out is required (the folder to create)");
  DMX_CHECK_ARG(o.size >= 64 && o.size <= 1024,
                "--size must be in [64, 1024] (at 32 px an object is a few latent cells), got ", o.size);
  DMX_CHECK_ARG(o.count >= 1 && o.count <= 100000, "--count must be in [1, 100000], got ", o.count);
  DMX_CHECK_ARG(o.min_objects >= 1 && o.min_objects <= o.max_objects && o.max_objects <= kMaxSceneObjects,
                "--objects must be N or A-B with 1 <= A <= B <= ", kMaxSceneObjects, ", got ", o.min_objects, "-",
                o.max_objects);
  DMX_CHECK_ARG(o.split == "train" || o.split == "heldout", "--split must be train or heldout, got '", o.split, "'");
  if (o.emoji.empty()) o.emoji = default_emoji_data_dir();
  DMX_CHECK_ARG(!o.emoji.empty(),
                "--emoji: no emoji data found ($DMX_EMOJI_DATA, ~/.cache/dmx/emoji-data, /tmp/emoji_ds); build it "
                "with `dmx data emoji --out DIR` and pass --emoji DIR");
  OutputPlan plan(o.overwrite);
  plan.input(o.emoji, "--emoji");
  {
    std::string out = o.out;
    while (out.size() > 1 && out.back() == '/') out.pop_back();
    plan.folder(out, "--out", {"scenes.json"}, "scene data folder");
  }
  plan.check();
  const emoji::EmojiData data(o.emoji, "--emoji");
  const std::vector<std::string> styles = data.styles();
  DMX_CHECK_ARG(
      std::find(styles.begin(), styles.end(), o.style) != styles.end(), "--style: ", o.emoji, " has no '", o.style,
      "' images (it has: ",
      [&] {
        std::string s;
        for (const auto& st : styles) s += (s.empty() ? "" : ", ") + st;
        return s;
      }(),
      ")");
  std::vector<int> pool;  // the split's concepts with an image of the style
  for (int c = 0; c < static_cast<int>(data.concepts().size()); ++c)
    if (data.concepts()[static_cast<size_t>(c)].split == o.split && data.has(o.style, c)) pool.push_back(c);
  DMX_CHECK_ARG(static_cast<int>(pool.size()) >= o.max_objects, "--objects: the ", o.split, " split of ", o.emoji,
                " has ", pool.size(), " ", o.style, " concept(s), fewer than the ", o.max_objects,
                " distinct objects a canvas may hold");
  plan.prepare();

  // 2. Sprites: each concept's image and alpha mask resized to a side (Lanczos; alpha thresholded at 128).
  std::map<int, std::pair<Image, Image>> sources;  // concept -> (RGB, mask)
  std::map<std::pair<int, int>, Sprite> sprites;
  auto sprite = [&](int c, int side) -> const Sprite& {
    const auto key = std::make_pair(c, side);
    const auto it = sprites.find(key);
    if (it != sprites.end()) return it->second;
    auto src = sources.find(c);
    if (src == sources.end()) {
      const emoji::EmojiFiles& f = data.files(o.style, c);
      DMX_CHECK_FORMAT(!f.mask.empty(), o.emoji, ": concept '", data.concepts()[static_cast<size_t>(c)].name,
                       "' has no mask (rebuild the folder with `dmx data emoji`)");
      Image rgb = to_rgb(load_image(f.image, "--emoji image"));
      Image mask = to_gray(load_image(f.mask, "--emoji mask"));
      DMX_CHECK_FORMAT(mask.width == rgb.width && mask.height == rgb.height, f.mask, ": mask is ", mask.width, "x",
                       mask.height, ", the image ", rgb.width, "x", rgb.height);
      src = sources.emplace(c, std::make_pair(std::move(rgb), std::move(mask))).first;
    }
    Sprite s;
    s.rgb = resize_lanczos(src->second.first, side, side);
    const Image m = resize_lanczos(src->second.second, side, side);
    s.alpha.resize(static_cast<size_t>(side) * side);
    for (size_t p = 0; p < s.alpha.size(); ++p) {
      s.alpha[p] = m.data[p] >= 128 ? 1 : 0;
      s.area += s.alpha[p];
    }
    return sprites.emplace(key, std::move(s)).first->second;
  };

  const int S = o.size;
  const int lo = static_cast<int>(std::lround(0.35 * S)), hi = static_cast<int>(std::lround(0.6 * S));
  const int width = std::max(4, static_cast<int>(std::to_string(o.count - 1).size()));
  const auto& palette = scene_layout_palette();
  SceneDataReport rep;
  rep.out = o.out;
  rep.concepts = static_cast<int>(pool.size());

  write_directory_atomic(o.out, "the scene data folder", [&](const std::string& tmp) {
    for (const char* sub : {"images", "instances", "categories", "edges", "layouts"})
      std::filesystem::create_directories(join_path(tmp, sub));
    ProgressBar bar("scenes", o.count, o.progress);
    std::string jsonl;
    for (int i = 0; i < o.count; ++i) {
      // 3. One canvas: its own generator, so canvas i does not depend on --count.
      Rng rng{o.seed * 0x2545f4914f6cdd1dull + static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull + 1};
      const int n = o.min_objects + rng.below(o.max_objects - o.min_objects + 1);
      Image rgb;
      rgb.width = rgb.height = S;
      rgb.channels = 3;
      rgb.data.assign(static_cast<size_t>(S) * S * 3, kBackground);
      std::vector<uint8_t> inst(static_cast<size_t>(S) * S, 0);
      std::vector<Placed> objs;
      std::set<int> used;
      for (int k = 0; k < n; ++k) {
        int c = pool[static_cast<size_t>(rng.below(static_cast<int>(pool.size())))];
        while (used.count(c)) c = pool[static_cast<size_t>(rng.below(static_cast<int>(pool.size())))];
        used.insert(c);
        // Occlusion is allowed, but every object already placed keeps at least half of its pixels: up to 20
        // positions are tried, then the object is left out.
        for (int attempt = 0; attempt < 20; ++attempt) {
          const int side = lo + rng.below(hi - lo + 1);
          const int x0 = rng.below(S - side + 1), y0 = rng.below(S - side + 1);
          const Sprite& sp = sprite(c, side);
          if (sp.area == 0) break;
          std::vector<int> covered(objs.size() + 1, 0);
          for (int y = 0; y < side; ++y)
            for (int x = 0; x < side; ++x)
              if (sp.alpha[static_cast<size_t>(y) * side + x])
                covered[inst[static_cast<size_t>(y0 + y) * S + x0 + x]] += 1;
          std::vector<int> visible(objs.size() + 1, 0);
          for (uint8_t v : inst) visible[v] += 1;
          bool ok = true;
          for (size_t j = 0; j < objs.size(); ++j) ok = ok && 2 * (visible[j + 1] - covered[j + 1]) >= objs[j].area;
          if (!ok) continue;
          const uint8_t id = static_cast<uint8_t>(objs.size() + 1);
          for (int y = 0; y < side; ++y)
            for (int x = 0; x < side; ++x) {
              const size_t sp_p = static_cast<size_t>(y) * side + x;
              if (!sp.alpha[sp_p]) continue;
              const size_t p = static_cast<size_t>(y0 + y) * S + x0 + x;
              inst[p] = id;
              for (int ch = 0; ch < 3; ++ch) rgb.data[p * 3 + ch] = sp.rgb.data[sp_p * 3 + ch];
            }
          objs.push_back({c, x0, y0, side, sp.area});
          break;
        }
      }
      DMX_CHECK_FORMAT(!objs.empty(), "--emoji: canvas ", i, ": no object could be drawn (empty masks?)");

      // 4. The maps: category (panoptic id), edges between objects, the RGB layout.
      Image cat, edges, layout, inst_img;
      cat.width = edges.width = layout.width = inst_img.width = S;
      cat.height = edges.height = layout.height = inst_img.height = S;
      cat.channels = edges.channels = inst_img.channels = 1;
      layout.channels = 3;
      cat.data.assign(static_cast<size_t>(S) * S, 0);
      edges.data.assign(static_cast<size_t>(S) * S, 0);
      layout.data.assign(static_cast<size_t>(S) * S * 3, 0);
      inst_img.data = inst;
      std::vector<int> visible(objs.size() + 1, 0);
      for (int y = 0; y < S; ++y)
        for (int x = 0; x < S; ++x) {
          const size_t p = static_cast<size_t>(y) * S + x;
          const int id = inst[p];
          visible[static_cast<size_t>(id)] += 1;
          if (id == 0) continue;
          const auto& concept = data.concepts()[static_cast<size_t>(objs[static_cast<size_t>(id - 1)].concept)];
          cat.data[p] = static_cast<uint8_t>(scene_category_id(concept.category));
          const bool edge = (x > 0 && inst[p - 1] != id) || (x + 1 < S && inst[p + 1] != id) ||
                            (y > 0 && inst[p - S] != id) || (y + 1 < S && inst[p + S] != id);
          edges.data[p] = edge ? 255 : 0;
          const std::string& hex = palette[static_cast<size_t>(id - 1)];
          for (int ch = 0; ch < 3; ++ch)
            layout.data[p * 3 + ch] = static_cast<uint8_t>(std::stoi(hex.substr(1 + 2 * ch, 2), nullptr, 16));
        }

      const std::string stem = numbered(i, width);
      save_png(join_path(tmp, "images/" + stem + ".png"), rgb);
      save_png(join_path(tmp, "instances/" + stem + ".png"), inst_img);
      save_png(join_path(tmp, "categories/" + stem + ".png"), cat);
      save_png(join_path(tmp, "edges/" + stem + ".png"), edges);
      save_png(join_path(tmp, "layouts/" + stem + ".png"), layout);
      std::vector<std::string> names;
      nlohmann::json objects = nlohmann::json::array(), regions = nlohmann::json::object();
      for (size_t k = 0; k < objs.size(); ++k) {
        const auto& c = data.concepts()[static_cast<size_t>(objs[k].concept)];
        names.push_back(c.name);
        regions[palette[k]] = c.name;
        objects.push_back({{"instance", k + 1},
                           {"color", palette[k]},
                           {"text", c.name},
                           {"short_name", c.short_name},
                           {"category", c.category},
                           {"category_id", scene_category_id(c.category)},
                           {"group", scene_category_group(c.category)},
                           {"box", {objs[k].x, objs[k].y, objs[k].side, objs[k].side}},
                           {"pixels", visible[k + 1]}});
      }
      const std::string caption = caption_of(names);
      const std::string rj = nlohmann::json{{"prompt", caption}, {"regions", regions}}.dump(1) + "\n";
      write_bytes_atomic(join_path(tmp, "layouts/" + stem + ".json"), rj.data(), rj.size());
      jsonl += nlohmann::json{{"file_name", "images/" + stem + ".png"},
                              {"text", caption},
                              {"instance_map", "instances/" + stem + ".png"},
                              {"category_map", "categories/" + stem + ".png"},
                              {"edges", "edges/" + stem + ".png"},
                              {"layout", "layouts/" + stem + ".png"},
                              {"regions", "layouts/" + stem + ".json"},
                              {"objects", objects}}
                   .dump() +
               "\n";
      rep.canvases += 1;
      rep.objects += static_cast<int>(objs.size());
      bar.tick();
    }
    bar.finish();
    write_bytes_atomic(join_path(tmp, "metadata.jsonl"), jsonl.data(), jsonl.size());

    nlohmann::json cats = nlohmann::json::array();
    for (size_t i = 0; i < std::size(kCategories); ++i)
      cats.push_back({{"id", i + 1}, {"name", kCategories[i].name}, {"group", kCategories[i].group}});
    cats.push_back({{"id", kOtherCategory}, {"name", "other"}, {"group", "panoptic"}});
    const nlohmann::json sj = {{"format", "dmx-scenes-1"},
                               {"count", o.count},
                               {"size", o.size},
                               {"seed", o.seed},
                               {"split", o.split},
                               {"style", o.style},
                               {"objects", {o.min_objects, o.max_objects}},
                               {"emoji", std::filesystem::absolute(o.emoji).lexically_normal().string()},
                               {"background", "#ffffff"},
                               {"palette", palette},
                               {"categories", cats}};
    const std::string sjs = sj.dump(1) + "\n";
    write_bytes_atomic(join_path(tmp, "scenes.json"), sjs.data(), sjs.size());
    const std::string readme =
        "# emoji scenes built by `dmx data scenes` (docs/layouts.md)\n\n"
        "Canvases composed from the " +
        o.style + " images of " + o.split +
        " concepts of the emoji folder named in scenes.json (licences: its README.md).\n"
        "metadata.jsonl: one row per canvas (file_name, text = the global caption, instance_map, category_map,\n"
        "edges, layout, regions, objects). instances/: 0 background, k = object k of `objects` (paint order).\n"
        "categories/: 0 background, else the category id of scenes.json. edges/: 255 on an object pixel next to\n"
        "another instance or the background. layouts/NNNN.png: black background, object k in palette colour k;\n"
        "layouts/NNNN.json: {prompt, regions: {\"#rrggbb\": text}}.\n";
    write_bytes_atomic(join_path(tmp, "README.md"), readme.data(), readme.size());
  });
  return rep;
}
}  // namespace dmx
