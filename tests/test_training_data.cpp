// Datasets for training: folder layouts, bad rows, transforms, and the sampler's sharding over ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/image.h"
#include "core/resize.h"
#include "dmx/error.h"
#include "test_util.h"
#include "training/dataset.h"

namespace fs = std::filesystem;
using namespace dmx;
using namespace dmx::training;

namespace {

Image gradient_image(int w, int h, int seed) {
  Image img;
  img.width = w;
  img.height = h;
  img.channels = 3;
  img.data.resize(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c)
        img.data[(static_cast<size_t>(y) * w + x) * 3 + c] =
            static_cast<uint8_t>(std::min(255, x * 200 / w + y + c * 5 + seed * 3));  // increasing in x
  return img;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

std::string fresh_dir(const std::string& name) {
  const std::string d = test::temp_dir() + "/" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Three images with captions, and conditioning images, in metadata.jsonl.
std::string make_controlnet_folder(const std::string& name) {
  const std::string d = fresh_dir(name);
  fs::create_directories(d + "/cond");
  std::string meta;
  for (int i = 0; i < 3; ++i) {
    const std::string n = "img" + std::to_string(i) + ".png";
    save_png(d + "/" + n, gradient_image(24 + 8 * i, 16, i));
    save_png(d + "/cond/" + n, gradient_image(24 + 8 * i, 16, 10 + i));
    meta += "{\"file_name\": \"" + n + "\", \"text\": \"caption " + std::to_string(i) +
            "\", \"conditioning_image\": \"cond/" + n + "\"}\n";
  }
  write_text(d + "/metadata.jsonl", meta);
  return d;
}
}  // namespace

TEST(TrainingDataUnit, ResizeBilinearMatchesPillowByHand) {
  // Pillow's BILINEAR at scale 2: support 2, weights (3, 3, 1) / 7 and (1, 3, 3) / 7.
  Image row;
  row.width = 4;
  row.height = 1;
  row.channels = 1;
  row.data = {0, 70, 140, 210};
  const Image out = resize_bilinear(row, 2, 1);
  ASSERT_EQ(out.data.size(), 2u);
  EXPECT_EQ(out.data[0], 50);
  EXPECT_EQ(out.data[1], 160);
  Image flat = gradient_image(9, 5, 0);
  std::fill(flat.data.begin(), flat.data.end(), 77);
  const Image up = resize_bilinear(flat, 20, 13);
  for (uint8_t v : up.data) ASSERT_EQ(v, 77);
}

TEST(TrainingDataUnit, TxtPairsLayout) {
  const std::string d = fresh_dir("txt_pairs");
  save_png(d + "/b.png", gradient_image(32, 16, 1));
  write_text(d + "/b.txt", "  a red cube\n");
  save_png(d + "/a.png", gradient_image(16, 16, 2));
  write_text(d + "/a.txt", "a blue ball");
  write_text(d + "/notes.md", "ignored");
  DatasetOptions o;
  o.dir = d;
  o.resolution = 16;
  ImageCaptionDataset ds(o);
  ASSERT_EQ(ds.size(), 2u);
  EXPECT_EQ(ds.rows()[0].caption, "a blue ball");  // sorted by file name
  EXPECT_EQ(ds.rows()[1].caption, "a red cube");   // trimmed
  EXPECT_EQ(ds.rows()[1].origin, "b.png");
  // 32x16 at resolution 16: no resize, center crop at left = round((32 - 16) / 2) = 8; ToTensor + Normalize.
  const Example ex = ds.get(1, 0);
  ASSERT_EQ(ex.pixel_values.sizes(), (at::IntArrayRef{3, 16, 16}));
  const Image src = gradient_image(32, 16, 1);
  for (int c = 0; c < 3; ++c) {
    const float v = src.data[(static_cast<size_t>(5) * 32 + (8 + 3)) * 3 + c];
    EXPECT_EQ(ex.pixel_values[c][5][3].item<float>(), (v / 255.0f - 0.5f) / 0.5f);
  }
  EXPECT_FALSE(ex.conditioning.defined());
  const Batch b = ds.collate({1, 0, 1}, 5);
  EXPECT_EQ(b.pixel_values.sizes(), (at::IntArrayRef{3, 3, 16, 16}));
  EXPECT_EQ(b.captions[0], "a red cube");
  EXPECT_EQ(b.indices, (std::vector<int64_t>{1, 0, 1}));
}

TEST(TrainingDataUnit, MetadataJsonlWithConditioning) {
  const std::string d = make_controlnet_folder("meta_cond");
  DatasetOptions o;
  o.dir = d;
  o.resolution = 8;
  o.require_conditioning = true;
  ImageCaptionDataset ds(o);
  ASSERT_EQ(ds.size(), 3u);
  EXPECT_EQ(ds.rows()[2].caption, "caption 2");
  EXPECT_EQ(ds.rows()[2].origin, "metadata.jsonl:3");
  const Example ex = ds.get(2, 1);
  ASSERT_TRUE(ex.conditioning.defined());
  EXPECT_EQ(ex.conditioning.sizes(), (at::IntArrayRef{3, 8, 8}));
  EXPECT_GE(ex.conditioning.min().item<float>(), 0.0f);  // conditioning stays in [0, 1]
  EXPECT_LE(ex.conditioning.max().item<float>(), 1.0f);
  EXPECT_GE(ex.pixel_values.min().item<float>(), -1.0f);
  const Batch b = ds.collate({0, 1}, 0);
  EXPECT_EQ(b.conditioning.sizes(), (at::IntArrayRef{2, 3, 8, 8}));
}

TEST(TrainingDataUnit, ControlNetNeedsConditioningColumn) {
  const std::string d = fresh_dir("no_cond");
  save_png(d + "/a.png", gradient_image(16, 16, 0));
  write_text(d + "/metadata.jsonl", "{\"file_name\": \"a.png\", \"text\": \"x\"}\n");
  DatasetOptions o;
  o.dir = d;
  o.resolution = 8;
  o.require_conditioning = true;
  try {
    ImageCaptionDataset ds(o);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("metadata.jsonl:1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("conditioning_image"), std::string::npos) << e.what();
  }
  // Pairs layout cannot carry conditioning at all.
  const std::string p = fresh_dir("no_cond_pairs");
  save_png(p + "/a.png", gradient_image(16, 16, 0));
  write_text(p + "/a.txt", "x");
  o.dir = p;
  EXPECT_THROW(ImageCaptionDataset{o}, InvalidArgument);
}

TEST(TrainingDataUnit, BadRowsRejectListsEveryRowElseSkip) {
  const std::string d = fresh_dir("bad_rows");
  save_png(d + "/ok.png", gradient_image(16, 16, 0));
  write_text(d + "/broken.png", "this is not a png");
  write_text(d + "/metadata.jsonl",
             "{\"file_name\": \"ok.png\", \"text\": \"fine\"}\n"
             "{\"file_name\": \"missing.png\", \"text\": \"x\"}\n"
             "\n"
             "{\"file_name\": \"broken.png\", \"text\": \"x\"}\n"
             "{\"file_name\": \"ok.png\", \"text\": \"\"}\n"
             "not json\n");
  DatasetOptions o;
  o.dir = d;
  o.resolution = 8;
  try {
    ImageCaptionDataset ds(o);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    for (const char* line : {"metadata.jsonl:2", "metadata.jsonl:4", "metadata.jsonl:5", "metadata.jsonl:6"})
      EXPECT_NE(m.find(line), std::string::npos) << line << " in: " << m;
    EXPECT_EQ(m.find("metadata.jsonl:1:"), std::string::npos) << m;
    EXPECT_NE(m.find("4 bad rows"), std::string::npos) << m;
  }
  o.bad_rows = BadRows::Skip;
  ImageCaptionDataset ds(o);
  EXPECT_EQ(ds.size(), 1u);
  ASSERT_EQ(ds.skipped().size(), 4u);
  EXPECT_NE(ds.skipped()[0].find("missing.png"), std::string::npos);
  // Captions optional: the empty caption is no longer a bad row.
  o.require_captions = false;
  EXPECT_EQ(ImageCaptionDataset(o).size(), 2u);
}

TEST(TrainingDataUnit, FolderErrors) {
  DatasetOptions o;
  o.dir = test::temp_dir() + "/does_not_exist";
  try {
    ImageCaptionDataset ds(o);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--data"), std::string::npos) << e.what();
  }
  o.dir = fresh_dir("empty");
  EXPECT_THROW(ImageCaptionDataset{o}, InvalidArgument);
  o.resolution = 12;
  try {
    ImageCaptionDataset ds(o);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--resolution"), std::string::npos) << e.what();
  }
}

TEST(TrainingDataUnit, RandomCropAndFlipDeterministicPerSeed) {
  const std::string d = make_controlnet_folder("augment");
  DatasetOptions o;
  o.dir = d;
  o.resolution = 8;  // images 24x16 .. 40x16 -> 12x8 .. 20x8 after the resize
  o.center_crop = false;
  o.random_flip = true;
  ImageCaptionDataset ds(o);
  std::set<std::string> distinct;
  int flips = 0;
  for (uint64_t seed = 0; seed < 16; ++seed) {
    const Example a = ds.get(2, seed), b = ds.get(2, seed);
    ASSERT_TRUE(at::equal(a.pixel_values, b.pixel_values));
    ASSERT_TRUE(at::equal(a.conditioning, b.conditioning));
    std::ostringstream key;
    key << a.pixel_values.sum().item<double>();
    distinct.insert(key.str());
    // Image and conditioning are flipped together: both images are gradients in x; the sign of the horizontal
    // difference of each tells its orientation.
    const double dx_img = (a.pixel_values[0].select(1, 7) - a.pixel_values[0].select(1, 0)).sum().item<double>();
    const double dx_cond = (a.conditioning[0].select(1, 7) - a.conditioning[0].select(1, 0)).sum().item<double>();
    if (dx_img < 0) ++flips;
    EXPECT_EQ(dx_img < 0, dx_cond < 0) << "seed " << seed;
  }
  EXPECT_GT(distinct.size(), 3u);
  EXPECT_GT(flips, 0);
  EXPECT_LT(flips, 16);
}

TEST(TrainingDataUnit, SamplerUnionOverRanksIsTheGlobalBatch) {
  const size_t n = 7;
  const BatchSampler single(n, 6, 0, 1, 42);
  for (int64_t step = 0; step < 5; ++step) {
    std::vector<size_t> joined;
    for (int r = 0; r < 3; ++r) {
      const BatchSampler s(n, 2, r, 3, 42);
      const auto idx = s.indices(step);
      ASSERT_EQ(idx.size(), 2u);
      joined.insert(joined.end(), idx.begin(), idx.end());
      EXPECT_EQ(s.augment_seed(step), single.augment_seed(step));
      EXPECT_EQ(s.global_indices(step), single.global_indices(step));
    }
    EXPECT_EQ(joined, single.indices(step)) << "step " << step;
  }
  // Each epoch is a permutation: the first n entries of the stream cover every row once.
  const BatchSampler one(n, 1, 0, 1, 3);
  std::set<size_t> seen;
  for (int64_t s = 0; s < static_cast<int64_t>(n); ++s) seen.insert(one.indices(s)[0]);
  EXPECT_EQ(seen.size(), n);
  // Without shuffle, in order.
  const BatchSampler ordered(n, 3, 0, 1, 3, false);
  EXPECT_EQ(ordered.indices(2), (std::vector<size_t>{6, 0, 1}));
  EXPECT_THROW(BatchSampler(n, 2, 3, 3, 0), InvalidArgument);
  EXPECT_THROW(BatchSampler(n, 0, 0, 1, 0), InvalidArgument);
  EXPECT_THROW(BatchSampler(0, 1, 0, 1, 0), InvalidArgument);
}
