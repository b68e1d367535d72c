// Emoji scenes (docs/layouts.md): `dmx data scenes` on a synthetic `dmx data emoji` folder (maps against the
// picture and the emoji masks, held-out concepts, determinism, layout colours, bad input), the layout measures
// on hand-made cases, `dmx eval --layouts` end to end (the real canvases score IoU ~1; the text baseline on the
// tiny model), and the command's exit codes.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "core/fs.h"
#include "core/image.h"
#include "core/resize.h"
#include "dmx/emoji_data.h"
#include "dmx/error.h"
#include "dmx/eval.h"
#include "dmx/scenes.h"
#include "emoji/emoji_classifier.h"
#include "emoji/emoji_data.h"
#include "emoji/layout_metrics.h"
#include "test_util.h"
#include "tiny_models.h"

namespace fs = std::filesystem;
using namespace dmx;

namespace {

// A disc (i even) or a square (i odd) of colour (r, g, b) on a transparent 64x64 canvas; never white.
Image sprite(int i, uint8_t r, uint8_t g, uint8_t b) {
  Image im;
  im.width = im.height = 64;
  im.channels = 4;
  im.data.assign(64 * 64 * 4, 0);
  const int rad = 14 + (i % 4) * 4;
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x) {
      const int dx = x - 32, dy = y - 32;
      const bool in = i % 2 ? std::abs(dx) <= rad && std::abs(dy) <= rad : dx * dx + dy * dy <= rad * rad;
      if (!in) continue;
      uint8_t* p = &im.data[(y * 64 + x) * 4];
      p[0] = r, p[1] = g, p[2] = b, p[3] = 255;
    }
  return im;
}

// A `dmx data emoji` folder of 40 synthetic concepts ("thing number i"), two of them held out (every 20th), built
// once per process.
std::string scene_emoji_data() {
  static std::string out;
  if (!out.empty()) return out;
  const int n = 40;
  const std::string root = join_path(dmx::test::temp_dir(), "scene_src");
  nlohmann::json j = nlohmann::json::array();
  const std::string img = root + "/emoji-datasource-google/package/img/google/64";
  fs::create_directories(img);
  for (int i = 0; i < n; ++i)
    save_png(img + "/e" + std::to_string(i) + ".png",
             sprite(i, static_cast<uint8_t>(6 * i), static_cast<uint8_t>(200 - 4 * i), static_cast<uint8_t>(90 + i)));
  const char* cats[] = {"Smileys & Emotion", "People & Body", "Food & Drink", "Objects"};
  for (int i = 0; i < n; ++i)
    j.push_back({{"name", "Thing Number " + std::to_string(i)},
                 {"short_name", "thing" + std::to_string(i)},
                 {"image", "e" + std::to_string(i) + ".png"},
                 {"category", cats[i % 4]},
                 {"subcategory", "misc"},
                 {"sort_order", i},
                 {"has_img_google", true}});
  std::ofstream(root + "/emoji-datasource-google/package/emoji.json") << j.dump();
  EmojiDataOptions o;
  o.source = root;
  o.styles = {"google"};
  o.out = join_path(dmx::test::temp_dir(), "scene_emoji");
  o.heldout_fraction = 0.05;
  o.progress = false;
  build_emoji_dataset(o);
  out = o.out;
  return out;
}

SceneDataOptions scene_options(const std::string& name) {
  SceneDataOptions o;
  o.emoji = scene_emoji_data();
  o.out = join_path(dmx::test::temp_dir(), name);
  o.count = 8;
  o.seed = 5;
  o.progress = false;
  return o;
}

std::vector<nlohmann::json> read_rows(const std::string& dir) {
  std::vector<nlohmann::json> rows;
  std::ifstream f(dir + "/metadata.jsonl");
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

std::string file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::string hex(const uint8_t* p) {
  char b[8];
  std::snprintf(b, sizeof b, "#%02x%02x%02x", p[0], p[1], p[2]);
  return b;
}

// The concepts of one split of the synthetic data, by name.
std::set<std::string> split_names(const std::string& split) {
  std::set<std::string> s;
  const emoji::EmojiData data(scene_emoji_data());
  for (const auto& c : data.concepts())
    if (c.split == split) s.insert(c.name);
  return s;
}

at::Tensor white_picture(int h, int w) { return at::ones({3, h, w}); }
}  // namespace

// ---- dmx data scenes ----

TEST(SceneDataUnit, MapsMatchThePictureAndTheEmojiMasks) {
  const SceneDataOptions o = scene_options("scenes_maps");
  const SceneDataReport rep = build_scene_dataset(o);
  EXPECT_EQ(rep.canvases, 8);
  const emoji::EmojiData data(o.emoji);
  const auto rows = read_rows(o.out);
  ASSERT_EQ(rows.size(), 8u);
  int objects = 0, multi = 0;
  for (const auto& row : rows) {
    const Image im = load_image(o.out + "/" + row["file_name"].get<std::string>(), "t");
    const Image inst = load_image(o.out + "/" + row["instance_map"].get<std::string>(), "t");
    const Image cat = load_image(o.out + "/" + row["category_map"].get<std::string>(), "t");
    const Image edges = load_image(o.out + "/" + row["edges"].get<std::string>(), "t");
    const Image layout = load_image(o.out + "/" + row["layout"].get<std::string>(), "t");
    ASSERT_EQ(im.width, 64);
    ASSERT_EQ(im.channels, 3);
    ASSERT_EQ(inst.channels, 1);
    ASSERT_EQ(layout.channels, 3);
    const auto& objs = row["objects"];
    ASSERT_GE(objs.size(), 1u);
    ASSERT_LE(objs.size(), 4u);
    objects += static_cast<int>(objs.size());
    multi += objs.size() > 1;
    std::vector<int> count(objs.size() + 1, 0);
    std::vector<int> edge_count(objs.size() + 1, 0);
    for (size_t p = 0; p < inst.data.size(); ++p) {
      const int id = inst.data[p];
      ASSERT_LE(id, static_cast<int>(objs.size()));
      count[static_cast<size_t>(id)] += 1;
      const bool white = im.data[p * 3] == 255 && im.data[p * 3 + 1] == 255 && im.data[p * 3 + 2] == 255;
      // The sprites are never white: background <=> no instance.
      ASSERT_EQ(white, id == 0) << "pixel " << p;
      if (id == 0) {
        ASSERT_EQ(cat.data[p], 0);
        ASSERT_EQ(edges.data[p], 0);
        ASSERT_EQ(hex(&layout.data[p * 3]), "#000000");
        continue;
      }
      const auto& ob = objs[static_cast<size_t>(id - 1)];
      ASSERT_EQ(cat.data[p], ob["category_id"].get<int>());
      ASSERT_EQ(hex(&layout.data[p * 3]), ob["color"].get<std::string>());
      edge_count[static_cast<size_t>(id)] += edges.data[p] == 255;
    }
    for (size_t k = 0; k < objs.size(); ++k) {
      const auto& ob = objs[k];
      EXPECT_EQ(ob["pixels"].get<int>(), count[k + 1]);
      EXPECT_GT(edge_count[k + 1], 0) << "every object has an outline";
      EXPECT_EQ(ob["category_id"].get<int>(), scene_category_id(ob["category"].get<std::string>()));
      // The instance is the emoji's own alpha mask, resized to its box: inside it, all of it for the top object.
      const int c = data.index_of(ob["text"].get<std::string>());
      ASSERT_GE(c, 0);
      const auto box = ob["box"];
      const int x0 = box[0], y0 = box[1], side = box[2];
      const Image m = resize_lanczos(to_gray(load_image(data.files("google", c).mask, "mask")), side, side);
      for (int y = 0; y < 64; ++y)
        for (int x = 0; x < 64; ++x) {
          const bool in_box = x >= x0 && x < x0 + side && y >= y0 && y < y0 + side;
          const bool in_mask = in_box && m.data[static_cast<size_t>((y - y0) * side + (x - x0))] >= 128;
          const bool is_k = inst.data[static_cast<size_t>(y * 64 + x)] == static_cast<int>(k + 1);
          if (is_k) {
            ASSERT_TRUE(in_mask) << "object " << k << " at " << x << "," << y;
          }
          if (k + 1 == objs.size()) {
            ASSERT_EQ(is_k, in_mask) << "top object " << k << " at " << x << "," << y;
          }
        }
      // Occlusion keeps at least half of every object.
      int area = 0;
      for (uint8_t v : m.data) area += v >= 128;
      EXPECT_GE(2 * count[k + 1], area);
    }
  }
  EXPECT_EQ(rep.objects, objects);
  EXPECT_GT(multi, 0) << "some canvases hold several objects";
  const auto sj = nlohmann::json::parse(file_bytes(o.out + "/scenes.json"));
  EXPECT_EQ(sj["size"], 64);
  EXPECT_EQ(sj["split"], "train");
  EXPECT_FALSE(path_exists(o.out + ".tmp." + std::to_string(getpid())));
}

TEST(SceneDataUnit, LayoutColoursAreDistinctAndListed) {
  const SceneDataOptions o = scene_options("scenes_layout");
  build_scene_dataset(o);
  const auto& palette = scene_layout_palette();
  EXPECT_EQ(std::set<std::string>(palette.begin(), palette.end()).size(), palette.size());
  EXPECT_EQ(palette.size(), static_cast<size_t>(kMaxSceneObjects));
  for (const auto& row : read_rows(o.out)) {
    const Image layout = load_image(o.out + "/" + row["layout"].get<std::string>(), "t");
    std::set<std::string> drawn;
    for (size_t p = 0; p < layout.data.size() / 3; ++p) drawn.insert(hex(&layout.data[p * 3]));
    drawn.erase("#000000");
    const auto rj = nlohmann::json::parse(file_bytes(o.out + "/" + row["regions"].get<std::string>()));
    EXPECT_EQ(rj["prompt"], row["text"]);
    std::set<std::string> listed, texts;
    for (const auto& [color, text] : rj["regions"].items()) {
      EXPECT_EQ(color.size(), 7u);
      EXPECT_EQ(color[0], '#');
      listed.insert(color);
      texts.insert(text.get<std::string>());
    }
    EXPECT_EQ(drawn, listed) << "every colour drawn is listed, and every colour listed is drawn";
    EXPECT_EQ(listed.size(), row["objects"].size());
    EXPECT_EQ(texts.size(), row["objects"].size()) << "distinct concepts per canvas";
    for (const auto& t : texts) EXPECT_NE(row["text"].get<std::string>().find(t), std::string::npos);
  }
}

TEST(SceneDataUnit, HeldOutConceptsStayHeldOut) {
  const std::set<std::string> train = split_names("train"), held = split_names("heldout");
  ASSERT_EQ(held.size(), 2u);
  SceneDataOptions o = scene_options("scenes_train");
  o.count = 40;
  build_scene_dataset(o);
  for (const auto& row : read_rows(o.out))
    for (const auto& ob : row["objects"]) {
      EXPECT_TRUE(train.count(ob["text"].get<std::string>())) << ob["text"];
      EXPECT_FALSE(held.count(ob["text"].get<std::string>())) << ob["text"];
    }
  o = scene_options("scenes_heldout");
  o.split = "heldout";
  o.max_objects = 2;
  o.count = 6;
  build_scene_dataset(o);
  std::set<std::string> seen;
  for (const auto& row : read_rows(o.out))
    for (const auto& ob : row["objects"]) seen.insert(ob["text"].get<std::string>());
  EXPECT_EQ(seen, held);
  // Three distinct objects cannot be drawn from two held-out concepts.
  o = scene_options("scenes_heldout3");
  o.split = "heldout";
  o.max_objects = 3;
  try {
    build_scene_dataset(o);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--objects"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(path_exists(o.out));
}

TEST(SceneDataUnit, DeterministicForASeed) {
  SceneDataOptions a = scene_options("scenes_a"), b = scene_options("scenes_b"), c = scene_options("scenes_c"),
                   d = scene_options("scenes_d");
  c.seed = 6;
  d.count = 3;
  for (auto* o : {&a, &b, &c, &d}) build_scene_dataset(*o);
  for (const char* f : {"metadata.jsonl", "images/0000.png", "images/0007.png", "instances/0005.png",
                        "categories/0005.png", "edges/0005.png", "layouts/0005.png", "layouts/0005.json"})
    EXPECT_EQ(file_bytes(a.out + "/" + f), file_bytes(b.out + "/" + f)) << f;
  EXPECT_NE(file_bytes(a.out + "/metadata.jsonl"), file_bytes(c.out + "/metadata.jsonl"));
  // Canvas i depends on the seed and i, not on --count.
  const auto ra = read_rows(a.out), rd = read_rows(d.out);
  ASSERT_EQ(rd.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(ra[i], rd[i]);
  EXPECT_EQ(file_bytes(a.out + "/images/0002.png"), file_bytes(d.out + "/images/0002.png"));
}

TEST(SceneDataUnit, BadInputNamesTheParameterAndWritesNothing) {
  auto expect_invalid = [](SceneDataOptions o, const std::string& what) {
    try {
      build_scene_dataset(o);
      ADD_FAILURE() << "expected InvalidArgument for " << what;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_FALSE(path_exists(o.out)) << what;
  };
  SceneDataOptions o = scene_options("scenes_bad");
  o.size = 32;
  expect_invalid(o, "--size must be in [64, 1024]");
  o = scene_options("scenes_bad");
  o.count = 0;
  expect_invalid(o, "--count");
  o = scene_options("scenes_bad");
  o.split = "test";
  expect_invalid(o, "--split must be train or heldout, got 'test'");
  o = scene_options("scenes_bad");
  o.style = "twitter";
  expect_invalid(o, "--style");
  o = scene_options("scenes_bad");
  o.emoji = join_path(dmx::test::temp_dir(), "no_such_emoji");
  expect_invalid(o, "--emoji");
  int lo = 0, hi = 0;
  parse_scene_objects("2-3", lo, hi);
  EXPECT_EQ(lo, 2);
  EXPECT_EQ(hi, 3);
  parse_scene_objects("4", lo, hi);
  EXPECT_EQ(lo, 4);
  EXPECT_EQ(hi, 4);
  for (const char* bad : {"0", "3-2", "1-9", "a", "-", "1-", "2-x", ""})
    EXPECT_THROW(parse_scene_objects(bad, lo, hi), InvalidArgument) << bad;
  // An existing folder is replaced only with --overwrite.
  o = scene_options("scenes_exists");
  o.count = 1;
  build_scene_dataset(o);
  EXPECT_THROW(build_scene_dataset(o), InvalidArgument);
  o.overwrite = true;
  EXPECT_NO_THROW(build_scene_dataset(o));
}

// ---- the measures ----

TEST(LayoutMetricsUnit, ForegroundMaskFillsHolesAndIgnoresNearWhite) {
  at::Tensor pic = white_picture(20, 20);
  pic.slice(1, 0, 20).slice(2, 0, 20) -= 0.05;  // near-white noise: background
  // A red ring (rows/cols 4..15) around a white hole (7..12): the hole is foreground.
  pic.slice(1, 4, 16).slice(2, 4, 16).select(0, 1).fill_(0);
  pic.slice(1, 4, 16).slice(2, 4, 16).select(0, 2).fill_(0);
  pic.slice(1, 7, 13).slice(2, 7, 13).fill_(1.0);
  const at::Tensor fg = emoji::foreground_mask(pic);
  at::Tensor expected = at::zeros({20, 20}, at::kBool);
  expected.slice(0, 4, 16).slice(1, 4, 16).fill_(true);
  EXPECT_TRUE(fg.equal(expected));
  // A gap in the ring lets the background in: the hole is background again.
  pic.slice(1, 4, 7).slice(2, 9, 10).fill_(1.0);
  const at::Tensor fg2 = emoji::foreground_mask(pic);
  EXPECT_FALSE(fg2[10][10].item<bool>());
  EXPECT_TRUE(fg2[5][5].item<bool>());
  // A darker background with its own level.
  const at::Tensor gray = at::full({3, 8, 8}, 0.5);
  EXPECT_FALSE(emoji::foreground_mask(gray, 0.5).any().item<bool>());
  EXPECT_TRUE(emoji::foreground_mask(gray).all().item<bool>());
}

TEST(LayoutMetricsUnit, RegionIouOfKnownMasks) {
  auto box = [](int y0, int y1, int x0, int x1) {
    at::Tensor m = at::zeros({10, 10}, at::kBool);
    m.slice(0, y0, y1).slice(1, x0, x1).fill_(true);
    return m;
  };
  const at::Tensor none = at::zeros({10, 10}, at::kBool);
  const at::Tensor r = box(0, 4, 0, 4);  // 16 px
  EXPECT_DOUBLE_EQ(emoji::region_iou(r, none, r), 1.0);
  EXPECT_DOUBLE_EQ(emoji::region_iou(r, none, box(0, 4, 0, 2)), 8.0 / 16.0);
  EXPECT_DOUBLE_EQ(emoji::region_iou(r, none, box(2, 6, 2, 6)), 4.0 / 28.0);
  EXPECT_DOUBLE_EQ(emoji::region_iou(r, none, none), 0.0);
  EXPECT_DOUBLE_EQ(emoji::region_iou(none, none, none), 1.0);
  // Foreground on another region counts against neither; foreground on the background counts.
  const at::Tensor other = box(0, 4, 4, 8);
  EXPECT_DOUBLE_EQ(emoji::region_iou(r, other, box(0, 4, 0, 8)), 1.0);
  EXPECT_DOUBLE_EQ(emoji::region_iou(r, other, box(0, 5, 0, 8)), 16.0 / 24.0);
  EXPECT_THROW(emoji::region_iou(r, none, at::zeros({9, 10}, at::kBool)), InvalidArgument);
}

TEST(LayoutMetricsUnit, RegionCropIsTheSquareAroundTheRegion) {
  at::Tensor pic = at::rand({3, 40, 50});
  at::Tensor region = at::zeros({40, 50}, at::kBool);
  region.slice(0, 10, 26).slice(1, 20, 36).fill_(true);  // 16 x 16 at (20, 10)
  EXPECT_TRUE(emoji::region_crop(pic, region, 16).equal(pic.slice(1, 10, 26).slice(2, 20, 36)));
  // A tall region (16 x 8) gets the 16-px square centred on it; what lies outside the region is white.
  region.zero_();
  region.slice(0, 10, 26).slice(1, 24, 32).fill_(true);
  const at::Tensor tall = emoji::region_crop(pic, region, 16);
  EXPECT_TRUE(tall.slice(2, 4, 12).equal(pic.slice(1, 10, 26).slice(2, 24, 32)));
  EXPECT_TRUE(tall.slice(2, 0, 4).eq(1.0).all().item<bool>());
  EXPECT_TRUE(tall.slice(2, 12, 16).eq(1.0).all().item<bool>());
  // A region that is not a rectangle: the pixels of its box outside it are white.
  region.zero_();
  region.slice(0, 10, 26).slice(1, 20, 36).fill_(true);
  region[12][22] = false;
  const at::Tensor holed = emoji::region_crop(pic, region, 16);
  EXPECT_TRUE(holed.select(1, 2).select(1, 2).eq(1.0).all().item<bool>());
  EXPECT_TRUE(holed.select(1, 3).equal(pic.select(1, 13).slice(1, 20, 36)));
  // Beyond the border: white.
  region.zero_();
  region.slice(0, 0, 8).slice(1, 0, 4).fill_(true);
  const at::Tensor c = emoji::region_crop(pic, region, 8);
  EXPECT_TRUE(c.slice(2, 0, 2).eq(1.0).all().item<bool>());
  EXPECT_TRUE(c.slice(2, 2, 6).equal(pic.slice(1, 0, 8).slice(2, 0, 4)));
  EXPECT_TRUE(c.slice(2, 6, 8).eq(1.0).all().item<bool>());
  // Resized to the side asked.
  EXPECT_EQ(emoji::region_crop(pic, region, 64).sizes(), at::IntArrayRef({3, 64, 64}));
  EXPECT_THROW(emoji::region_crop(pic, at::zeros({40, 50}, at::kBool), 8), InvalidArgument);
  const at::Tensor logits = at::tensor({0.1, 2.0, -1.0, 0.5});
  EXPECT_EQ(emoji::label_rank(logits, 1), 0);
  EXPECT_EQ(emoji::label_rank(logits, 3), 1);
  EXPECT_EQ(emoji::label_rank(logits, 2), 3);
}

// A region that is exactly an emoji gives the classifier what the emoji itself gives (the crop adds nothing), so the
// class of a crop is the class of the emoji.
TEST(LayoutMetricsTiny, CropOfAnEmojiClassifiesAsTheEmoji) {
  emoji::EmojiClassifierConfig cfg;
  cfg.block_out_channels = {16, 32};
  cfg.stem_channels = 16;
  const emoji::EmojiData data(scene_emoji_data());
  for (const auto& c : data.concepts()) {
    cfg.class_names.push_back(c.name);
    cfg.class_categories.push_back(c.category);
    cfg.class_splits.push_back(c.split);
  }
  torch::manual_seed(0);
  emoji::EmojiClassifier clf(cfg);
  for (int c : {3, 17}) {
    const at::Tensor e = data.image01("google", c);  // [3, 64, 64]
    at::Tensor canvas = at::ones({3, 128, 128});
    canvas.slice(1, 30, 94).slice(2, 50, 114).copy_(e);
    at::Tensor region = at::zeros({128, 128}, at::kBool);
    region.slice(0, 30, 94).slice(1, 50, 114).fill_(true);
    const at::Tensor crop = emoji::region_crop(canvas, region, 64);
    ASSERT_TRUE(crop.equal(e));
    const auto a = emoji::classify(clf, crop.unsqueeze(0) * 2.0 - 1.0),
               b = emoji::classify(clf, e.unsqueeze(0) * 2.0 - 1.0);
    EXPECT_TRUE(a.concept_logits.equal(b.concept_logits));
    EXPECT_EQ(a.concept_logits.argmax(1).item<int64_t>(), b.concept_logits.argmax(1).item<int64_t>());
  }
}

// ---- dmx eval --layouts ----

TEST(LayoutEvalTiny, RealCanvasesScoreIouOneAndTheTextBaselineRuns) {
  SceneDataOptions so = scene_options("scenes_eval");
  so.count = 4;
  build_scene_dataset(so);
  // A small classifier trained for a few steps on the synthetic emoji (its accuracy is not what is tested here).
  ClassifierTrainOptions co;
  co.data = scene_emoji_data();
  co.output = join_path(dmx::test::temp_dir(), "scenes_clf");
  co.steps = 4;
  co.batch_size = 8;
  co.threads = 1;
  co.progress = false;
  train_classifier(co);
  LayoutEvalOptions o;
  o.layouts = so.out;
  o.classifier = co.output;
  o.method = "real";
  o.progress = false;
  o.threads = 1;
  o.clip = "";  // not measured
  const LayoutEvalResult real = evaluate_layouts(o);
  std::printf("[check] real canvases: %s\n", real.to_json().substr(0, 300).c_str());
  EXPECT_EQ(real.canvases, 4);
  EXPECT_EQ(real.regions, static_cast<int>(real.per_region.size()));
  EXPECT_GE(real.region_iou, 0.98);
  EXPECT_GE(real.layout_iou, 0.98);
  EXPECT_NEAR(real.frechet, 0.0, 1e-3);
  EXPECT_LE(real.top1, real.top5);
  EXPECT_EQ(real.clip_similarity, -2.0) << "no CLIP folder: not measured";
  // The global CLIP similarity with the bundled CLIP: a mean cosine, in the JSON; a folder that is no CLIP refused.
  o.clip = std::string(DMX_SOURCE_DIR) + "/models/emoji-clip";
  const LayoutEvalResult with_clip = evaluate_layouts(o);
  EXPECT_GE(with_clip.clip_similarity, -1.0);
  EXPECT_LE(with_clip.clip_similarity, 1.0);
  EXPECT_NE(with_clip.to_json().find("\"clip_similarity\""), std::string::npos);
  o.clip = so.out;
  EXPECT_THROW(evaluate_layouts(o), InvalidArgument);
  o.clip = "";
  // The text baseline on the tiny model (2 steps): pictures scored, numbers in range, the same seed the same numbers.
  o.method = "text";
  o.model = dmx::test::tiny_model_dir("test");
  o.steps = 2;
  o.limit = 2;
  o.out_dir = join_path(dmx::test::temp_dir(), "scenes_eval_out");
  const auto j = nlohmann::json::parse(evaluate_layouts(o).to_json());
  EXPECT_EQ(j["canvases"], 2);
  for (const char* k : {"top1", "top5", "region_iou", "layout_iou"}) {
    EXPECT_GE(j[k].get<double>(), 0.0) << k;
    EXPECT_LE(j[k].get<double>(), 1.0) << k;
  }
  EXPECT_GT(j["frechet"].get<double>(), 0.0);
  EXPECT_TRUE(path_exists(o.out_dir + "/layouts-text/0001.png"));
  const auto j2 = nlohmann::json::parse(evaluate_layouts(o).to_json());
  EXPECT_EQ(j2["per_region"], j["per_region"]);
  // The regional method (DenseDiffusion, regions from the instance maps) runs on the same canvases, and its
  // pictures differ from the text baseline's.
  o.method = "regional";
  const auto jr = nlohmann::json::parse(evaluate_layouts(o).to_json());
  EXPECT_EQ(jr["canvases"], 2);
  for (const char* k : {"top1", "top5", "region_iou", "layout_iou"}) {
    EXPECT_GE(jr[k].get<double>(), 0.0) << k;
    EXPECT_LE(jr[k].get<double>(), 1.0) << k;
  }
  const Image text_pic = load_image(o.out_dir + "/layouts-text/0001.png", "text picture");
  const Image regional_pic = load_image(o.out_dir + "/layouts-regional/0001.png", "regional picture");
  EXPECT_NE(text_pic.data, regional_pic.data) << "the layout had no effect";
  // spatext needs a SpaText folder, scene a scene folder; unknown methods are refused too.
  o.method = "spatext";
  try {
    evaluate_layouts(o);
    ADD_FAILURE() << "spatext on a plain model";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("needs a SpaText folder"), std::string::npos) << e.what();
  }
  o.method = "scene";
  try {
    evaluate_layouts(o);
    ADD_FAILURE() << "scene on a plain model";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("needs a scene folder"), std::string::npos) << e.what();
  }
  o.method = "magic";
  EXPECT_THROW(evaluate_layouts(o), InvalidArgument);
  o.method = "real";  // no model for the real canvases
  EXPECT_THROW(evaluate_layouts(o), InvalidArgument);
}

TEST(ScenesCli, ExitCodes) {
  const std::string out = join_path(dmx::test::temp_dir(), "scenes_cli");
  auto r = dmx::test::dmx_run({"data", "scenes", "--emoji", scene_emoji_data(), "--out", out, "--size", "32"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--size"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"data", "scenes", "--emoji", scene_emoji_data(), "--out", out, "--objects", "0-3"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--objects must be N or A-B"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"data", "scenes", "--emoji", scene_emoji_data(), "--out", out, "--split", "all"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--split must be train or heldout, got 'all'"), std::string::npos) << r.output;
  EXPECT_FALSE(path_exists(out));
  r = dmx::test::dmx_run(
      {"data", "scenes", "--emoji", scene_emoji_data(), "--out", out, "--count", "2", "--seed", "1", "--quiet"});
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(path_exists(out + "/layouts/0001.json"));
  r = dmx::test::dmx_run({"eval", "--layouts", out, "--layout-method", "scene", "--model", out});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--layout-method scene needs a scene folder"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"eval", "--layouts", join_path(out, "images"), "--layout-method", "real"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--layouts"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"eval", "--layout-method", "text", "--model", out});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--layout-method applies to --layouts"), std::string::npos) << r.output;
}

// The sanity check of docs/layouts.md as a test, on the real emoji set when it is installed: the real canvases of
// held-out concepts must score a layout IoU near 1 and a high top-5 with the bundled classifier.
TEST(LayoutEvalTiny, RealEmojiCanvasesPassTheSanityCheck) {
  const std::string emoji = default_emoji_data_dir();
  const std::string clf = std::string(DMX_SOURCE_DIR) + "/models/emoji-classifier";
  if (emoji.empty()) GTEST_SKIP() << "no emoji data (dmx data emoji --out ~/.cache/dmx/emoji-data)";
  const emoji::EmojiClassifier model = emoji::load_emoji_classifier(clf);
  if (model->config().class_names.size() != emoji::EmojiData(emoji).concepts().size())
    GTEST_SKIP() << emoji << " is not the full emoji set the bundled classifier knows";
  SceneDataOptions so;
  so.emoji = emoji;
  so.out = join_path(dmx::test::temp_dir(), "real_scenes");
  so.split = "heldout";
  so.count = 20;  // the held-out set of docs/layouts.md's figures
  so.seed = 1;
  so.progress = false;
  build_scene_dataset(so);
  LayoutEvalOptions o;
  o.layouts = so.out;
  o.classifier = clf;
  o.method = "real";
  o.threads = 1;
  o.progress = false;
  const LayoutEvalResult r = evaluate_layouts(o);
  std::printf("[check] real held-out canvases: %d regions, top-1 %.3f, top-5 %.3f, region IoU %.3f, layout IoU %.3f\n",
              r.regions, r.top1, r.top5, r.region_iou, r.layout_iou);
  EXPECT_GE(r.layout_iou, 0.95);
  EXPECT_GE(r.region_iou, 0.85);
  EXPECT_GE(r.top5, 0.85);
}
