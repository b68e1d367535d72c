// Evaluation (docs/evaluation.md): Fréchet distance and edge F1 against closed forms, the emoji classifier
// (shapes, batch invariance, save/load), `dmx train classifier` and `dmx eval` on a small synthetic emoji set
// built with `dmx data emoji`'s builder, and a tiny random model (tests/tiny_models.h) end to end.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <fstream>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/emoji_data.h"
#include "dmx/error.h"
#include "dmx/eval.h"
#include "emoji/emoji_classifier.h"
#include "emoji/emoji_classifier_train.h"
#include "metrics/metrics.h"
#include "models/t2i_adapter.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/adapter_train.h"

namespace fs = std::filesystem;
using namespace dmx;

namespace {

// A shape of colour (r, g, b) on a transparent 64x64 canvas: i % 3 picks disc / square / ring.
Image shape(int i, uint8_t r, uint8_t g, uint8_t b) {
  Image im;
  im.width = im.height = 64;
  im.channels = 4;
  im.data.assign(64 * 64 * 4, 0);
  const int rad = 12 + (i % 5) * 3;
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x) {
      const int dx = x - 32, dy = y - 32, d2 = dx * dx + dy * dy;
      bool in = false;
      if (i % 3 == 0) in = d2 <= rad * rad;
      if (i % 3 == 1) in = std::abs(dx) <= rad && std::abs(dy) <= rad;
      if (i % 3 == 2) in = d2 <= rad * rad && d2 >= (rad - 6) * (rad - 6);
      if (!in) continue;
      uint8_t* p = &im.data[(y * 64 + x) * 4];
      p[0] = r, p[1] = g, p[2] = b, p[3] = 255;
    }
  return im;
}

// A `dmx data emoji` folder with n synthetic concepts ("thing number i"), one held out, built once per process.
std::string synthetic_emoji_data() {
  static std::string out;
  if (!out.empty()) return out;
  const int n = 20;
  const std::string root = join_path(dmx::test::temp_dir(), "eval_src");
  nlohmann::json j = nlohmann::json::array();
  for (const std::string style : {"google", "twitter"}) {
    const std::string img = root + "/emoji-datasource-" + style + "/package/img/" + style + "/64";
    fs::create_directories(img);
    for (int i = 0; i < n; ++i)
      save_png(
          img + "/e" + std::to_string(i) + ".png",
          shape(i, static_cast<uint8_t>(12 * i), style == "google" ? 200 : 40, static_cast<uint8_t>(250 - 11 * i)));
  }
  for (int i = 0; i < n; ++i)
    j.push_back({{"name", "Thing Number " + std::to_string(i)},
                 {"short_name", "thing" + std::to_string(i)},
                 {"image", "e" + std::to_string(i) + ".png"},
                 {"category", i % 2 ? "Food & Drink" : "Objects"},
                 {"subcategory", "misc"},
                 {"sort_order", i},
                 {"has_img_google", true},
                 {"has_img_twitter", true}});
  for (const std::string style : {"google", "twitter"})
    std::ofstream(root + "/emoji-datasource-" + style + "/package/emoji.json") << j.dump();
  EmojiDataOptions o;
  o.source = root;
  o.out = join_path(dmx::test::temp_dir(), "eval_emoji");
  o.heldout_fraction = 0.05;  // one held-out concept
  o.progress = false;
  build_emoji_dataset(o);
  out = o.out;
  return out;
}

// A classifier trained for a few steps on the synthetic set, once per process.
std::string synthetic_classifier() {
  static std::string out;
  if (!out.empty()) return out;
  ClassifierTrainOptions o;
  o.data = synthetic_emoji_data();
  o.output = join_path(dmx::test::temp_dir(), "eval_clf");
  o.steps = 6;
  o.batch_size = 8;
  o.threads = 1;  // no OpenMP pool: the test binary keeps OpenMP's spin-waiting default
  o.progress = false;
  train_classifier(o);
  out = o.output;
  return out;
}

emoji::EmojiClassifierConfig small_config(int classes) {
  emoji::EmojiClassifierConfig c;
  c.block_out_channels = {16, 16, 32, 32};
  c.stem_channels = 16;
  for (int i = 0; i < classes; ++i) {
    c.class_names.push_back("c" + std::to_string(i));
    c.class_categories.push_back("cat");
    c.class_splits.push_back("train");
  }
  return c;
}

std::string write_text(const std::string& name, const std::string& text) {
  const std::string p = join_path(dmx::test::temp_dir(), name);
  std::ofstream(p) << text;
  return p;
}
}  // namespace

// ---- Fréchet distance ----

TEST(EvalFrechetUnit, DiagonalClosedForm) {
  // Commuting covariances Q D Q^T: d = |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const int D = 6;
  const at::Tensor q = std::get<0>(at::linalg_qr(at::randn({D, D}, gen, at::kDouble)));
  const at::Tensor d1 = at::rand({D}, gen, at::kDouble) * 3 + 0.1, d2 = at::rand({D}, gen, at::kDouble) * 2 + 0.05;
  const at::Tensor mu1 = at::randn({D}, gen, at::kDouble), mu2 = at::randn({D}, gen, at::kDouble);
  const double expected = (mu1 - mu2).pow(2).sum().item<double>() + (d1.sqrt() - d2.sqrt()).pow(2).sum().item<double>();
  const double diag = metrics::frechet_distance(mu1, at::diag(d1), mu2, at::diag(d2));
  const double rotated = metrics::frechet_distance(mu1, at::matmul(q * d1, q.t()), mu2, at::matmul(q * d2, q.t()));
  std::printf("[check] frechet diagonal: %.12f rotated: %.12f expected: %.12f\n", diag, rotated, expected);
  EXPECT_NEAR(diag, expected, 1e-6 * expected);
  EXPECT_NEAR(rotated, expected, 1e-6 * expected);
}

TEST(EvalFrechetUnit, NonCommuting2x2ClosedForm) {
  // For 2x2 S1 S2 with positive eigenvalues: tr(sqrt(S1 S2)) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
  const at::Tensor s1 = at::tensor({2.0, 0.7, 0.7, 1.0}, at::kDouble).view({2, 2});
  const at::Tensor s2 = at::tensor({0.5, -0.2, -0.2, 1.5}, at::kDouble).view({2, 2});
  const at::Tensor mu1 = at::tensor({0.3, -1.0}, at::kDouble), mu2 = at::tensor({1.0, 0.5}, at::kDouble);
  const double tr_sqrt = std::sqrt(at::matmul(s1, s2).trace().item<double>() +
                                   2 * std::sqrt(at::det(s1).item<double>() * at::det(s2).item<double>()));
  const double expected =
      (mu1 - mu2).pow(2).sum().item<double>() + s1.trace().item<double>() + s2.trace().item<double>() - 2 * tr_sqrt;
  const double got = metrics::frechet_distance(mu1, s1, mu2, s2);
  std::printf("[check] frechet 2x2: %.12f expected %.12f\n", got, expected);
  EXPECT_NEAR(got, expected, 1e-9);
}

TEST(EvalFrechetUnit, IdenticalSetsAreZeroAndShiftIsMeanTerm) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const at::Tensor a = at::randn({200, 16}, gen, at::kFloat);
  const double same = metrics::frechet_distance(a, a);
  std::printf("[check] frechet identical sets: %.3g\n", same);
  EXPECT_NEAR(same, 0.0, 1e-6);
  // Shifting every sample by v changes only the mean term: |v|^2.
  const at::Tensor v = at::full({16}, 0.5);
  EXPECT_NEAR(metrics::frechet_distance(a, a + v), 16 * 0.25, 1e-5);
  EXPECT_THROW(metrics::frechet_distance(a.slice(0, 0, 1), a), InvalidArgument);
  EXPECT_THROW(metrics::frechet_distance(a, a.slice(1, 0, 3)), InvalidArgument);
}

// ---- edge F1, IoU ----

TEST(EvalEdgeF1Unit, SyntheticMaps) {
  at::Tensor target = at::zeros({32, 32}, at::kBool);
  target.slice(0, 8, 9).slice(1, 8, 24).fill_(true);  // top side of a square outline
  target.slice(0, 23, 24).slice(1, 8, 24).fill_(true);
  target.slice(1, 8, 9).slice(0, 8, 24).fill_(true);
  target.slice(1, 23, 24).slice(0, 8, 24).fill_(true);
  EXPECT_DOUBLE_EQ(metrics::edge_f1(target, target, 0), 1.0);
  const at::Tensor shift1 = at::roll(target, {1}, {1});
  EXPECT_DOUBLE_EQ(metrics::edge_f1(shift1, target, 1), 1.0);  // within the 1-pixel tolerance
  EXPECT_LT(metrics::edge_f1(shift1, target, 0), 0.6);
  const at::Tensor shift3 = at::roll(target, {3, 3}, {0, 1});
  EXPECT_LT(metrics::edge_f1(shift3, target, 1), 0.2);
  // Half the edges found, nothing wrong: P = 1, R = 0.5 -> F1 = 2/3.
  at::Tensor half = target.clone();
  half.slice(1, 16, 32).fill_(false);
  const double r = half.sum().item<double>() / target.sum().item<double>();
  // recall counts target pixels within 1 px of a prediction (the cut column adds one)
  const double f1 = metrics::edge_f1(half, target, 1);
  EXPECT_GT(f1, 2 * r / (1 + r) - 1e-9);
  EXPECT_LT(f1, 0.75);
  EXPECT_DOUBLE_EQ(metrics::edge_f1(at::zeros({32, 32}, at::kBool), target, 1), 0.0);
  EXPECT_DOUBLE_EQ(metrics::edge_f1(at::zeros({32, 32}, at::kBool), at::zeros({32, 32}, at::kBool), 1), 1.0);
  EXPECT_THROW(metrics::edge_f1(target, target.slice(0, 0, 4), 1), InvalidArgument);
}

TEST(EvalEdgeF1Unit, ToleranceIsBsdsShareOfTheDiagonal) {
  // 0.0075 of the diagonal, rounded: exact matching at emoji sizes, a few pixels at SD sizes.
  EXPECT_EQ(metrics::edge_tolerance(32, 32), 0);
  EXPECT_EQ(metrics::edge_tolerance(47, 47), 0);
  EXPECT_EQ(metrics::edge_tolerance(64, 64), 1);
  EXPECT_EQ(metrics::edge_tolerance(128, 128), 1);
  EXPECT_EQ(metrics::edge_tolerance(512, 512), 5);
  EXPECT_EQ(metrics::edge_tolerance(768, 512), 7);
}

// SSIM against hand computations: equal pictures 1; two constant pictures a, b (every local variance 0) give
// (2ab + C1) / (a^2 + b^2 + C1) everywhere; symmetric; noise lowers it; too small or mismatched pictures refused.
TEST(EvalSsimUnit, ClosedFormsAndRules) {
  at::manual_seed(3);
  const at::Tensor x = at::rand({3, 20, 24});
  EXPECT_NEAR(metrics::ssim(x, x), 1.0, 1e-12);
  const double a = 0.3, b = 0.7, c1 = 1e-4;
  EXPECT_NEAR(metrics::ssim(at::full({3, 16, 16}, a, at::kDouble), at::full({3, 16, 16}, b, at::kDouble)),
              (2 * a * b + c1) / (a * a + b * b + c1), 1e-9);
  const at::Tensor y = (x + 0.2 * at::randn({3, 20, 24})).clamp(0, 1);
  const double xy = metrics::ssim(x, y);
  EXPECT_NEAR(xy, metrics::ssim(y, x), 1e-12);
  EXPECT_LT(xy, 0.95);
  EXPECT_GT(xy, metrics::ssim(x, at::rand({3, 20, 24})));  // a noisy copy is closer than another random picture
  EXPECT_THROW(metrics::ssim(at::rand({3, 10, 20}), at::rand({3, 10, 20})), InvalidArgument);
  EXPECT_THROW(metrics::ssim(at::rand({3, 16, 16}), at::rand({3, 16, 17})), InvalidArgument);
}

TEST(EvalEdgeF1Unit, MaskIoU) {
  at::Tensor a = at::zeros({10, 10}, at::kBool), b = at::zeros({10, 10}, at::kBool);
  a.slice(0, 0, 5).fill_(true);  // 50 pixels
  b.slice(0, 2, 7).fill_(true);  // 50 pixels, 30 shared
  EXPECT_DOUBLE_EQ(metrics::mask_iou(a, b), 30.0 / 70.0);
  EXPECT_DOUBLE_EQ(metrics::mask_iou(a, a), 1.0);
}

// ---- classifier ----

TEST(EmojiClassifierTiny, ShapesBatchInvarianceAndSaveLoad) {
  at::manual_seed(0);
  emoji::EmojiClassifier m(small_config(7));
  m->eval();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const at::Tensor x = at::rand({4, 3, 64, 64}, gen) * 2 - 1;
  const emoji::EmojiClassifierOutput o = emoji::classify(m, x, 4);
  EXPECT_EQ(o.features.sizes(), (at::IntArrayRef{4, 32}));
  EXPECT_EQ(o.concept_logits.sizes(), (at::IntArrayRef{4, 7}));
  EXPECT_EQ(o.style_logits.sizes(), (at::IntArrayRef{4, 2}));
  for (int i = 0; i < 4; ++i) {
    const emoji::EmojiClassifierOutput one = emoji::classify(m, x.slice(0, i, i + 1), 1);
    DMX_EXPECT_CLOSE("batch 1 vs batch 4, features " + std::to_string(i), one.features, o.features.slice(0, i, i + 1),
                     1e-5);
    DMX_EXPECT_CLOSE("batch 1 vs batch 4, logits " + std::to_string(i), one.concept_logits,
                     o.concept_logits.slice(0, i, i + 1), 1e-5);
  }
  // Other sizes are resized to 64.
  EXPECT_EQ(emoji::classify(m, at::zeros({1, 3, 32, 32}), 1).features.size(1), 32);
  EXPECT_THROW(m->forward(at::zeros({1, 1, 64, 64})), InvalidArgument);
  // fp32 round trip is exact.
  const std::string dir = join_path(dmx::test::temp_dir(), "clf_roundtrip");
  emoji::save_emoji_classifier(m, dir, false);
  emoji::EmojiClassifier back = emoji::load_emoji_classifier(dir);
  DMX_EXPECT_CLOSE("reloaded classifier logits", emoji::classify(back, x, 4).concept_logits, o.concept_logits, 1e-6);
  EXPECT_EQ(back->config().class_names, m->config().class_names);
  // Malformed config.
  std::ofstream(dir + "/config.json") << R"({"_class_name": "Nope"})";
  EXPECT_THROW(emoji::load_emoji_classifier(dir), FormatError);
  EXPECT_THROW(emoji::load_emoji_classifier(dir + "/missing"), InvalidArgument);
}

TEST(EmojiAugmentUnit, AugmentationIsSeededAndInRange) {
  const at::Tensor x = at::rand({3, 3, 64, 64});
  at::Generator g1 = at::make_generator<at::CPUGeneratorImpl>(9), g2 = at::make_generator<at::CPUGeneratorImpl>(9);
  const at::Tensor a = emoji::augment_emoji_batch(x, g1), b = emoji::augment_emoji_batch(x, g2);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_EQ(a.sizes(), x.sizes());
  EXPECT_GE(a.min().item<float>(), 0.0f);
  EXPECT_LE(a.max().item<float>(), 1.0f);
  // A white image stays nearly white (white border fill; only noise and jitter).
  const at::Tensor w = emoji::augment_emoji_batch(at::ones({2, 3, 64, 64}), g1);
  EXPECT_GT(w.mean().item<float>(), 0.85f);
}

TEST(EmojiClassifierTiny, TrainsOnSyntheticDataDeterministically) {
  ClassifierTrainOptions o;
  o.data = synthetic_emoji_data();
  o.steps = 4;
  o.batch_size = 8;
  o.threads = 1;
  o.progress = false;
  o.output = join_path(dmx::test::temp_dir(), "clf_a");
  const ClassifierTrainResult r = train_classifier(o);
  o.output = join_path(dmx::test::temp_dir(), "clf_b");
  train_classifier(o);
  EXPECT_EQ(r.num_classes, 20);
  EXPECT_EQ(r.num_images, 40);
  ASSERT_EQ(r.styles.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_GE(r.top1[i], 0.0);
    EXPECT_LE(r.top1[i], r.top5[i]);
    EXPECT_LE(r.top5[i], 1.0);
  }
  const auto a = io::load_safetensors(join_path(dmx::test::temp_dir(), "clf_a/model.safetensors"));
  const auto b = io::load_safetensors(join_path(dmx::test::temp_dir(), "clf_b/model.safetensors"));
  ASSERT_EQ(a.size(), b.size());
  for (const auto& kv : a) EXPECT_TRUE(at::equal(kv.second, b.at(kv.first))) << kv.first;
  EXPECT_EQ(a.at("concept_head.weight").scalar_type(), at::kHalf);
  emoji::EmojiClassifier m = emoji::load_emoji_classifier(join_path(dmx::test::temp_dir(), "clf_a"));
  EXPECT_EQ(m->config().class_splits.size(), 20u);
  o.data = join_path(dmx::test::temp_dir(), "no_such_data");
  EXPECT_THROW(train_classifier(o), InvalidArgument);
}

// ---- prompts ----

TEST(EvalPromptsUnit, DefaultListAndFileParsing) {
  const std::string data = synthetic_emoji_data();
  const auto p = default_eval_prompts(data, 10);
  ASSERT_EQ(p.size(), 10u);
  EXPECT_TRUE(p[4].find(", objects, google style") != std::string::npos ||
              p[4].find(", food & drink, google style") != std::string::npos)
      << p[4];
  EXPECT_EQ(p[0].find(','), std::string::npos);
  for (const auto& s : p) EXPECT_NE(s.find("thing number"), std::string::npos);
  EXPECT_THROW(default_eval_prompts(data, 300), InvalidArgument);  // 19 train concepts only
  const std::string good =
      write_text("good_prompts.txt", "# comment\nthing number 3\n\nthing number 4, objects, twitter style\n");
  EXPECT_EQ(read_eval_prompts(good, data).size(), 2u);
  const std::string bad = write_text("bad_prompts.txt", "thing number 3\nslice of unicorn\n");
  try {
    read_eval_prompts(bad, data);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("bad_prompts.txt:2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("slice of unicorn"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_eval_prompts(write_text("empty_prompts.txt", "\n# only a comment\n"), data), InvalidArgument);
  EXPECT_THROW(read_eval_prompts(join_path(dmx::test::temp_dir(), "missing.txt"), data), InvalidArgument);
}

// ---- bad input, file metrics ----

TEST(EvalUnit, BadInputNamesTheFlag) {
  const std::string tmp = dmx::test::temp_dir();
  auto expect_invalid = [](const EvalOptions& o, const std::string& needle) {
    try {
      evaluate(o);
      ADD_FAILURE() << "expected InvalidArgument mentioning '" << needle << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  EvalOptions o;
  expect_invalid(o, "--model is required");
  o.model = "/nonexistent/model";
  expect_invalid(o, "--model: path not found");
  o.model = tmp;
  o.steps = 0;
  expect_invalid(o, "--steps must be in [1, 1000], got 0");
  o.steps = 2;
  o.data = synthetic_emoji_data();
  o.classifier = tmp;
  // (the classifier folder is checked first, loaded after the prompts)
  o.prompts_file = write_text("api_bad_prompts.txt", "thing number 1\n\nno such emoji\n");
  expect_invalid(o, "api_bad_prompts.txt:3: 'no such emoji'");
  o.prompts_file = "/nonexistent.txt";
  expect_invalid(o, "--prompts: file not found");
  o.prompts_file.clear();
  o.classifier = "/nonexistent";
  expect_invalid(o, "--classifier: not a folder");
  o.classifier = tmp;
  o.data = "/nonexistent";
  expect_invalid(o, "--data");
  EXPECT_THROW(mask_iou("/nonexistent.png", "/nonexistent.png"), InvalidArgument);
  ClassifierTrainOptions c;
  c.output = "/tmp/x";
  try {
    train_classifier(c);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--data is required"), std::string::npos) << e.what();
  }
}

TEST(EvalUnit, FileMetrics) {
  const std::string data = synthetic_emoji_data();
  const std::string img = data + "/google/train/images/thing3.png";
  const std::string mask = data + "/google/train/masks/thing3.png";
  const std::string edges = data + "/google/train/edges/thing3.png";
  EXPECT_DOUBLE_EQ(mask_iou(mask, mask), 1.0);
  EXPECT_DOUBLE_EQ(edge_f1_files(img, edges), 1.0);  // the map is Canny(image)
  EXPECT_DOUBLE_EQ(background_error(img, img, mask), 0.0);
  const std::string other = data + "/google/train/images/thing4.png";
  EXPECT_GT(background_error(img, other, mask), 0.0);
}

// The commands' exit codes, the options only the command line has, and one file metric as JSON.
TEST(EvalCli, ExitCodes) {
  auto r = dmx::test::dmx_run({"eval"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--model is required"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"eval", "--model", "/nonexistent/model"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--model: path not found"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"eval", "--model", dmx::test::temp_dir(), "--steps", "zero"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--steps"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"train", "classifier", "--output", "/tmp/x"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--data is required"), std::string::npos) << r.output;
  r = dmx::test::dmx_run({"eval", "--mask-iou", "a.png"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--reference"), std::string::npos) << r.output;
  const std::string mask = synthetic_emoji_data() + "/google/train/masks/thing3.png";
  r = dmx::test::dmx_run({"eval", "--mask-iou", mask, "--reference", mask, "--json"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_DOUBLE_EQ(nlohmann::json::parse(r.output)["mask_iou"].get<double>(), 1.0);
}

// ---- end to end on a tiny random model ----

TEST(EvalTiny, EndToEndJson) {
  const std::string model = dmx::test::tiny_model_dir("test");
  const std::string lora = dmx::test::tiny_lora_file("test", "diffusers");
  const std::string data = synthetic_emoji_data();
  const std::string clf = synthetic_classifier();
  const std::string prompts = write_text(
      "e2e_prompts.txt", "thing number 1\nthing number 2, objects, google style\nthing number 5\nthing number 6\n");
  const std::string out = join_path(dmx::test::temp_dir(), "e2e_out");
  EvalOptions o;
  o.model = model;
  o.classifier = clf;
  o.data = data;
  o.prompts_file = prompts;
  o.steps = 2;
  o.progress = false;
  o.threads = 2;
  EvalOptions plain = o;
  o.out_dir = out;
  o.controlnet = dmx::test::tiny_controlnet_dir("test");
  o.lora = lora;
  o.aux_prompts = 2;
  o.dreambooth = lora;
  o.dreambooth_prompt = "sks emoji";
  o.dreambooth_concept = "thing number 0";
  o.dreambooth_images = 2;
  const auto j = nlohmann::json::parse(evaluate(o).to_json());
  std::printf("[check] dmx eval on the tiny model: %s\n", j.dump().c_str());
  EXPECT_EQ(j["n"], 4);
  for (const char* k :
       {"top1", "top5", "twitter_fraction", "edge_f1", "edge_f1_without", "edge_f1_empty", "edge_f1_empty_without",
        "lora_style_accuracy", "lora_style_accuracy_without", "dreambooth_top5", "dreambooth_top5_without"}) {
    ASSERT_TRUE(j.contains(k)) << k;
    EXPECT_GE(j[k].get<double>(), 0.0) << k;
    EXPECT_LE(j[k].get<double>(), 1.0) << k;
  }
  EXPECT_LE(j["top1"].get<double>(), j["top5"].get<double>());
  EXPECT_GE(j["frechet"].get<double>(), 0.0);
  EXPECT_GT(j["frechet_real"].get<double>(), 0.0);
  EXPECT_GE(j["dreambooth_similarity"].get<double>(), -1.0);
  EXPECT_LE(j["dreambooth_similarity"].get<double>(), 1.0 + 1e-6);
  EXPECT_EQ(j["controlnet_n"], 2);
  EXPECT_TRUE(path_exists(out + "/base/0003.png"));
  EXPECT_TRUE(path_exists(out + "/base_grid.png"));
  EXPECT_TRUE(path_exists(out + "/controlnet/0001.png"));
  EXPECT_TRUE(path_exists(out + "/controlnet-empty-prompt/0001.png"));
  EXPECT_TRUE(path_exists(out + "/empty-prompt/0001.png"));
  const Image cn_out = load_image(out + "/controlnet/0001.png", "controlnet output");
  EXPECT_EQ(j["edge_tolerance"].get<int>(), metrics::edge_tolerance(cn_out.height, cn_out.width));
  // Same seed, same numbers.
  const auto j2 = nlohmann::json::parse(evaluate(plain).to_json());
  EXPECT_EQ(j2["top1"], j["top1"]);
  EXPECT_NEAR(j2["frechet"].get<double>(), j["frechet"].get<double>(), 1e-9);
  EXPECT_FALSE(j2.contains("edge_f1"));
}

// `dmx eval --adapter`: the edge F1 of a T2I-Adapter, with and without prompt, beside the shared "without" figures,
// and the seconds per picture of each set. The tiny sd15 architecture (cross-attention down blocks, which adapters
// need) with sample_size 8, so that it draws the 64-px pictures of the synthetic data.
TEST(EvalTiny, AdapterEdgeF1AndTimings) {
  const std::string model = join_path(dmx::test::temp_dir(), "eval_sd15_64");
  if (!fs::exists(model)) {
    fs::copy(dmx::test::tiny_model_dir("sd15"), model, fs::copy_options::recursive);
    const std::string cfg = model + "/unet/config.json";
    nlohmann::json u = nlohmann::json::parse(std::ifstream(cfg));
    u["sample_size"] = 8;
    std::ofstream(cfg) << u.dump();
  }
  models::T2IAdapterConfig ac;
  ac.in_channels = 1;
  ac.channels = {32, 64, 64, 64};
  ac.downscale_factor = 8;
  torch::manual_seed(0);
  models::T2IAdapter adapter(ac);
  const std::string adapter_dir = join_path(dmx::test::temp_dir(), "eval_adapter");
  training::save_t2i_adapter_diffusers(adapter, adapter_dir);
  const std::string prompts = write_text("adapter_prompts.txt", "thing number 1\nthing number 2\nthing number 5\n");
  const std::string out = join_path(dmx::test::temp_dir(), "eval_adapter_out");
  EvalOptions o;
  o.model = model;
  o.classifier = synthetic_classifier();
  o.data = synthetic_emoji_data();
  o.prompts_file = prompts;
  o.steps = 2;
  o.progress = false;
  o.threads = 2;
  o.out_dir = out;
  o.adapter = adapter_dir;
  o.aux_prompts = 2;
  const auto j = nlohmann::json::parse(evaluate(o).to_json());
  std::printf("[check] dmx eval --adapter on the tiny model: %s\n", j.dump().c_str());
  EXPECT_EQ(j["adapter_n"], 2);
  EXPECT_FALSE(j.contains("controlnet_n"));
  for (const char* k : {"adapter_edge_f1", "adapter_edge_f1_empty", "edge_f1_without", "edge_f1_empty_without"}) {
    ASSERT_TRUE(j.contains(k)) << k;
    EXPECT_GE(j[k].get<double>(), 0.0) << k;
    EXPECT_LE(j[k].get<double>(), 1.0) << k;
  }
  EXPECT_GT(j["seconds_per_image"].get<double>(), 0.0);
  EXPECT_GT(j["adapter_seconds_per_image"].get<double>(), 0.0);
  EXPECT_FALSE(j.contains("controlnet_seconds_per_image"));
  for (const char* f : {"/adapter/0001.png", "/adapter-empty-prompt/0001.png", "/empty-prompt/0001.png"})
    EXPECT_TRUE(path_exists(out + f)) << f;
  // The adapter changes the pictures: the empty-prompt ones differ from those without it (same seeds).
  const Image a = load_image(out + "/adapter-empty-prompt/0000.png", "with");
  const Image b = load_image(out + "/empty-prompt/0000.png", "without");
  EXPECT_NE(a.data, b.data);
  EvalOptions bad = o;
  bad.out_dir.clear();
  bad.adapter = "/nonexistent/adapter";
  EXPECT_THROW(evaluate(bad), InvalidArgument);
}

// `dmx eval` on Stable unCLIP folders (the tiny fixture pair): base images text -> prior -> decoder, and variations
// of the real pictures of the first --aux-prompts concepts and of the held-out one, scored by the classifier and SSIM;
// the same seed gives the same numbers; the options that cannot apply are refused naming the flag.
TEST(EvalUnclipGolden, ThroughPriorAndVariations) {
  DMX_REQUIRE_FIXTURES();
  const std::string prompts =
      write_text("unclip_prompts.txt", "thing number 1\nthing number 2, objects, google style\nthing number 5\n");
  const std::string out = join_path(dmx::test::temp_dir(), "unclip_out");
  EvalOptions o;
  o.model = dmx::test::fixture_model("unclip");
  o.variations = dmx::test::fixture_model("unclip_img2img");
  o.classifier = synthetic_classifier();
  o.data = synthetic_emoji_data();
  o.prompts_file = prompts;
  o.steps = 2;
  o.prior_steps = 2;
  o.aux_prompts = 2;
  o.variations_per_image = 2;
  o.progress = false;
  o.threads = 2;
  EvalOptions again = o;
  o.out_dir = out;
  const auto j = nlohmann::json::parse(evaluate(o).to_json());
  std::printf("[check] dmx eval on the tiny unCLIP pair: %s\n", j.dump().c_str());
  EXPECT_EQ(j["n"], 3);
  EXPECT_TRUE(j.value("through_prior", false));
  EXPECT_EQ(j["variations_n"], 2);
  EXPECT_EQ(j["variations_heldout_n"], 1);
  for (const char* k :
       {"top1", "top5", "variations_top1", "variations_top5", "variations_heldout_top1", "variations_heldout_top5"}) {
    EXPECT_GE(j[k].get<double>(), 0.0) << k;
    EXPECT_LE(j[k].get<double>(), 1.0) << k;
  }
  EXPECT_LE(j["variations_top1"].get<double>(), j["variations_top5"].get<double>());
  const double pair = j["variations_pairwise_ssim"].get<double>();
  EXPECT_GE(pair, -1.0);
  EXPECT_LT(pair, 1.0);  // two draws of one seed's generator differ
  EXPECT_TRUE(path_exists(out + "/base/0002.png"));
  EXPECT_TRUE(path_exists(out + "/variations/0003.png"));  // 2 sources x 2 variations
  EXPECT_FALSE(path_exists(out + "/variations/0004.png"));
  EXPECT_TRUE(path_exists(out + "/variations-heldout/0001.png"));
  EXPECT_TRUE(path_exists(out + "/variations_grid.png"));
  const auto j2 = nlohmann::json::parse(evaluate(again).to_json());
  EXPECT_EQ(j2["top1"], j["top1"]);
  EXPECT_NEAR(j2["variations_pairwise_ssim"].get<double>(), pair, 1e-12);
  EXPECT_NEAR(j2["frechet"].get<double>(), j["frechet"].get<double>(), 1e-9);

  auto expect_invalid = [](const EvalOptions& bad, const std::string& needle) {
    try {
      evaluate(bad);
      ADD_FAILURE() << "expected InvalidArgument mentioning '" << needle << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  EvalOptions bad = again;
  bad.controlnet = dmx::test::tiny_controlnet_dir("test");
  expect_invalid(bad, "--controlnet does not apply to a Stable unCLIP --model");
  bad = again;
  bad.model = dmx::test::fixture_model("unclip_img2img");
  expect_invalid(bad, "give it as --variations");
  bad = again;
  bad.variations = dmx::test::fixture_model("unclip");
  expect_invalid(bad, "--variations");
  bad = again;
  bad.variations_per_image = 1;
  expect_invalid(bad, "--variations-per-image must be in [2, 64]");
  bad = again;
  bad.prior_steps = 0;
  expect_invalid(bad, "--prior-steps");
}
