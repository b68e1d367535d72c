// `dmx data emoji` on a small emoji-datasource package built here in the real format (emoji.json + 64-px
// RGBA PNGs), and on the installed npm packages when they are present.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/emoji_data.h"
#include "dmx/error.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace dmx;

namespace {
// A disc of colour c on a transparent 64x64 canvas.
Image disc(uint8_t r, uint8_t g, uint8_t b, int radius) {
  Image im;
  im.width = im.height = 64;
  im.channels = 4;
  im.data.assign(64 * 64 * 4, 0);
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x) {
      if ((x - 32) * (x - 32) + (y - 32) * (y - 32) > radius * radius) continue;
      uint8_t* p = &im.data[(y * 64 + x) * 4];
      p[0] = r, p[1] = g, p[2] = b, p[3] = 255;
    }
  return im;
}

// emoji-datasource-<style>/package/{emoji.json,img/<style>/64/*.png} with n concepts.
std::string make_source(const std::string& name, int n, bool corrupt_one = false) {
  const std::string root = join_path(dmx::test::temp_dir(), name);
  nlohmann::json j = nlohmann::json::array();
  for (const std::string style : {"google", "twitter"}) {
    const std::string img = root + "/emoji-datasource-" + style + "/package/img/" + style + "/64";
    fs::create_directories(img);
    for (int i = 0; i < n; ++i) {
      const std::string file = "e" + std::to_string(i) + ".png";
      if (corrupt_one && i == n - 1) {
        std::ofstream(img + "/" + file) << "not a png";
      } else {
        save_png(img + "/" + file, disc(static_cast<uint8_t>(40 * i), style == "google" ? 200 : 30, 90, 10 + i));
      }
    }
  }
  for (int i = 0; i < n; ++i)
    j.push_back({{"name", "Thing Number " + std::to_string(i)},
                 {"short_name", "thing" + std::to_string(i)},
                 {"image", "e" + std::to_string(i) + ".png"},
                 {"category", i % 2 ? "Food & Drink" : "Objects"},
                 {"subcategory", "misc"},
                 {"sort_order", n - i},
                 {"has_img_google", true},
                 {"has_img_twitter", i != 0}});
  j.push_back({{"name", "Skin Tone"}, {"image", "e0.png"}, {"category", "Component"}, {"has_img_google", true}});
  for (const std::string style : {"google", "twitter"})
    std::ofstream(root + "/emoji-datasource-" + style + "/package/emoji.json") << j.dump();
  return root;
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  return rows;
}
}  // namespace

TEST(DataEmojiUnit, BuildsTrainAndHeldoutFolders) {
  EmojiDataOptions o;
  o.source = make_source("src_ok", 10);
  o.out = join_path(dmx::test::temp_dir(), "emoji_ok");
  o.heldout_fraction = 0;
  o.size = 32;
  o.progress = false;
  const EmojiDataReport r = build_emoji_dataset(o);
  EXPECT_EQ(r.concepts, 10);  // the Component entry is left out
  EXPECT_TRUE(r.heldout.empty());
  const auto g = read_jsonl(o.out + "/google/train/metadata.jsonl");
  const auto t = read_jsonl(o.out + "/twitter/train/metadata.jsonl");
  EXPECT_EQ(g.size(), 10u);
  EXPECT_EQ(t.size(), 9u);  // concept 0 has no Twitter image
  EXPECT_EQ(r.train_images, 19);
  // Sorted by sort_order: the last concept comes first.
  EXPECT_EQ(g[0]["name"], "thing number 9");
  EXPECT_EQ(g[0]["text"], "thing number 9, food & drink, google style");
  EXPECT_EQ(t[0]["text"], "thing number 9, food & drink, twitter style");
  for (const auto& row : g) {
    const Image im = load_image(o.out + "/google/train/" + row["file_name"].get<std::string>(), "t");
    const Image edges = load_image(o.out + "/google/train/" + row["conditioning_image"].get<std::string>(), "t");
    const Image mask = load_image(o.out + "/google/train/" + row["mask"].get<std::string>(), "t");
    EXPECT_EQ(im.width, 32);
    EXPECT_EQ(im.channels, 3);
    EXPECT_EQ(mask.channels, 1);
    int on = 0;
    for (uint8_t v : mask.data) {
      ASSERT_TRUE(v == 0 || v == 255);
      on += v == 255;
    }
    EXPECT_GT(on, 0);
    EXPECT_LT(on, 32 * 32);
    int edge = 0;
    for (uint8_t v : edges.data) edge += v == 255;
    EXPECT_GT(edge, 0) << "a disc has an outline";
    // Corners are background (white), the centre is the emoji.
    EXPECT_EQ(im.data[0], 255);
  }
  EXPECT_TRUE(path_exists(o.out + "/concepts.json"));
  EXPECT_TRUE(path_exists(o.out + "/README.md"));
  EXPECT_FALSE(path_exists(o.out + ".partial"));
}

TEST(DataEmojiUnit, HeldOutConceptsAreNeverInTraining) {
  EmojiDataOptions o;
  o.source = make_source("src_held", 40);
  o.out = join_path(dmx::test::temp_dir(), "emoji_held");
  o.heldout_fraction = 0.05;  // every 20th concept
  o.styles = {"google"};
  o.progress = false;
  const EmojiDataReport r = build_emoji_dataset(o);
  ASSERT_EQ(r.heldout.size(), 2u);
  const auto train = read_jsonl(o.out + "/google/train/metadata.jsonl");
  const auto held = read_jsonl(o.out + "/google/heldout/metadata.jsonl");
  EXPECT_EQ(train.size() + held.size(), 40u);
  EXPECT_EQ(held.size(), 2u);
  for (const auto& row : train)
    for (const auto& h : r.heldout) EXPECT_NE(row["name"].get<std::string>(), h);
}

TEST(DataEmojiUnit, BadInputIsRejectedAndNothingIsLeftBehind) {
  const std::string tmp = dmx::test::temp_dir();
  EmojiDataOptions o;
  o.progress = false;
  o.source = join_path(tmp, "no_such_source");
  o.out = join_path(tmp, "emoji_bad");
  EXPECT_THROW(build_emoji_dataset(o), InvalidArgument);
  o.source = make_source("src_bad", 3, /*corrupt_one=*/true);
  try {
    build_emoji_dataset(o);
    FAIL() << "a corrupt image must be rejected";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("emoji image"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(path_exists(o.out));
  EXPECT_FALSE(path_exists(o.out + ".tmp." + std::to_string(::getpid())));
  o.heldout_fraction = 0.5;
  EXPECT_THROW(build_emoji_dataset(o), InvalidArgument);
  o.heldout_fraction = 0.02;
  o.caption_format = "{nam}";
  EXPECT_THROW(build_emoji_dataset(o), InvalidArgument);
  o.caption_format = "{name}";
  o.out = join_path(tmp, "emoji_exists");  // exists
  std::filesystem::create_directories(o.out);
  try {
    build_emoji_dataset(o);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos);
  }
}

// The command's exit codes, and --only's comma-separated list (the names are checked in-process above).
TEST(DataEmojiCli, ExitCodes) {
  const std::string tmp = dmx::test::temp_dir();
  auto r = dmx::test::dmx_run({"data", "emoji", "--out", tmp + "/cli_out", "--size", "4"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.output.find("--size"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"data", "nonsense"});
  EXPECT_EQ(r.code, 2);
  const std::string src = make_source("src_cli", 4);
  r = dmx::test::dmx_run({"data", "emoji", "--source", src, "--out", tmp + "/cli_out", "--quiet"});
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(path_exists(tmp + "/cli_out/google/train/metadata.jsonl"));
  r = dmx::test::dmx_run({"data", "emoji", "--source", src, "--out", tmp + "/cli_only", "--only", "thing2,nope"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("'nope'"), std::string::npos) << r.output;
  EXPECT_FALSE(path_exists(tmp + "/cli_only"));
  r = dmx::test::dmx_run(
      {"data", "emoji", "--source", src, "--out", tmp + "/cli_only", "--only", "thing2,thing3", "--quiet"});
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(read_jsonl(tmp + "/cli_only/google/train/metadata.jsonl").size(), 2u);
}

// --only builds the named concepts with the layout of a full build; held-out concepts stay held out.
TEST(DataEmojiUnit, OnlyBuildsTheNamedConcepts) {
  EmojiDataOptions o;
  o.source = make_source("src_only", 40);
  o.out = join_path(dmx::test::temp_dir(), "emoji_only");
  o.heldout_fraction = 0.05;  // sorted positions 10 and 30: thing29 and thing9
  o.styles = {"google"};
  o.only = {"thing1", "thing29"};
  o.progress = false;
  const EmojiDataReport r = build_emoji_dataset(o);
  EXPECT_EQ(r.concepts, 2);
  EXPECT_EQ(r.train_images, 1);
  EXPECT_EQ(r.heldout_images, 1);
  ASSERT_EQ(r.heldout.size(), 1u);
  EXPECT_EQ(r.heldout[0], "thing number 29");
  const auto train = read_jsonl(o.out + "/google/train/metadata.jsonl");
  const auto held = read_jsonl(o.out + "/google/heldout/metadata.jsonl");
  ASSERT_EQ(train.size(), 1u);
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(train[0]["short_name"], "thing1");
  EXPECT_EQ(held[0]["short_name"], "thing29");
  EXPECT_TRUE(path_exists(o.out + "/google/train/images/thing1.png"));
  EXPECT_TRUE(path_exists(o.out + "/google/train/edges/thing1.png"));
  EXPECT_TRUE(path_exists(o.out + "/google/heldout/masks/thing29.png"));
}

TEST(DataEmojiUnit, OnlyWithUnknownNamesFailsNamingThem) {
  EmojiDataOptions o;
  o.source = make_source("src_only_bad", 4);
  o.out = join_path(dmx::test::temp_dir(), "emoji_only_bad");
  o.progress = false;
  o.only = {"thing1", "no_such_emoji", "pizzza"};
  try {
    build_emoji_dataset(o);
    FAIL() << "unknown short names must be rejected";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--only"), std::string::npos) << m;
    EXPECT_NE(m.find("'no_such_emoji'"), std::string::npos) << m;
    EXPECT_NE(m.find("'pizzza'"), std::string::npos) << m;
    EXPECT_EQ(m.find("'thing1'"), std::string::npos) << m;
  }
  EXPECT_FALSE(path_exists(o.out));
  EXPECT_FALSE(path_exists(o.out + ".tmp." + std::to_string(::getpid())));
  // An empty item is an error too (the CLI's "thing2," splits into "thing2" and "").
  o.only = {"thing2", ""};
  try {
    build_emoji_dataset(o);
    FAIL() << "an empty short name must be rejected";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--only: empty short name"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(path_exists(o.out));
}

// The real npm packages, when scripts/setup.sh --emoji has installed them.
TEST(DataEmojiUnit, RealPackagesWhenInstalled) {
  const std::string src = default_emoji_source();
  if (!path_exists(src + "/emoji-datasource-google/package/emoji.json"))
    GTEST_SKIP() << "emoji packages not installed in " << src << " (scripts/setup.sh --emoji)";
  EmojiDataOptions o;
  o.source = src;
  o.out = join_path(dmx::test::temp_dir(), "emoji_real");
  o.styles = {"google"};
  o.progress = false;
  const EmojiDataReport r = build_emoji_dataset(o);
  EXPECT_GT(r.concepts, 1800);
  EXPECT_LE(r.heldout.size(), static_cast<size_t>(0.05 * r.concepts));
  const auto rows = read_jsonl(o.out + "/google/train/metadata.jsonl");
  bool pizza = false;
  for (const auto& row : rows) pizza = pizza || row["name"] == "slice of pizza";
  EXPECT_TRUE(pizza);
}
