// Regional prompts (docs/regional.md): DenseDiffusion's modulation against its formula on hand-computed tensors
// (the modulation, one cross and one self attention call of the processor), the masks at each attention
// resolution, the region tokens in the caption, the layout map (colours, background, exact resizing, errors), and
// `dmx generate --layout` on a tiny random model (differs from the plain run, stays finite, scale 0 = the plain run
// bit for bit, with a ControlNet and a LoRA) and through the binary (exit 2, nothing written).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "api/layout.h"
#include "core/fs.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "emoji/emoji_classifier.h"
#include "extensions/regional_attention.h"
#include "io/safetensors.h"
#include "nn/attention.h"
#include "pipelines/regional.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {

using extensions::RegionalMaps;

at::Tensor bools(std::vector<std::vector<int>> rows) {
  const int64_t n = static_cast<int64_t>(rows.size()), m = static_cast<int64_t>(rows[0].size());
  at::Tensor t = at::zeros({n, m}, at::kBool);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) t[i][j] = rows[static_cast<size_t>(i)][static_cast<size_t>(j)] != 0;
  return t;
}

// ---------------------------------------------------------------- the formula

TEST(RegionalUnit, ModulationMatchesTheFormulaByHand) {
  // s' = s + w S (max - s) where R, s - w S (s - min) elsewhere; min / max over each query's keys.
  const at::Tensor s = at::tensor({1.0f, 2.0f, 4.0f, 0.0f, -1.0f, 3.0f}).reshape({1, 1, 2, 3});
  const at::Tensor cond = bools({{1, 0, 1}, {0, 1, 0}});
  const at::Tensor size = at::tensor({0.5f, 0.25f}).reshape({2, 1});
  const at::Tensor out = extensions::dense_diffusion_modulate(s, cond, size, 0.4);
  // row 0: max 4, min 1, w S = 0.2: 1 + 0.2*3, 2 - 0.2*1, 4 + 0; row 1: max 3, min -1, w S = 0.1:
  // 0 - 0.1*1, -1 + 0.1*4, 3 - 0.1*4.
  const at::Tensor expected = at::tensor({1.6f, 1.8f, 4.0f, -0.1f, -0.6f, 2.6f}).reshape({1, 1, 2, 3});
  EXPECT_TRUE(at::allclose(out, expected, 1e-6, 1e-6)) << out;
  EXPECT_DOUBLE_EQ(extensions::dense_diffusion_time_weight(1.0, 500), 0.03125);  // (500 / 1000)^5
  EXPECT_DOUBLE_EQ(extensions::dense_diffusion_time_weight(0.3, 1000), 0.3);
  EXPECT_DOUBLE_EQ(extensions::dense_diffusion_time_weight(2.0, 0), 0.0);
}

// One attention call by hand: softmax over keys of the modulated scaled scores, then the weighted values.
std::vector<float> by_hand(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t row, double scale,
                           const at::Tensor* cond, const at::Tensor* size, double w) {
  const int64_t N = q.size(2), M = k.size(2), d = q.size(3), dv = v.size(3);
  std::vector<float> out;
  for (int64_t i = 0; i < N; ++i) {
    std::vector<double> s(static_cast<size_t>(M));
    for (int64_t j = 0; j < M; ++j) {
      double dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += q[row][0][i][c].item<double>() * k[row][0][j][c].item<double>();
      s[static_cast<size_t>(j)] = dot * scale;
    }
    if (cond) {
      double mx = s[0], mn = s[0];
      for (double x : s) mx = std::max(mx, x), mn = std::min(mn, x);
      const double ws = w * (*size)[i][0].item<double>();
      for (int64_t j = 0; j < M; ++j) {
        double& x = s[static_cast<size_t>(j)];
        x = (*cond)[i][j].item<bool>() ? x + ws * (mx - x) : x - ws * (x - mn);
      }
    }
    double mx = s[0], z = 0;
    for (double x : s) mx = std::max(mx, x);
    for (double& x : s) z += (x = std::exp(x - mx));
    for (int64_t c = 0; c < dv; ++c) {
      double acc = 0;
      for (int64_t j = 0; j < M; ++j) acc += s[static_cast<size_t>(j)] / z * v[row][0][j][c].item<double>();
      out.push_back(static_cast<float>(acc));
    }
  }
  return out;
}

std::vector<float> row_of(const at::Tensor& t, int64_t row) {
  const at::Tensor r = t[row].contiguous();
  return std::vector<float>(r.data_ptr<float>(), r.data_ptr<float>() + r.numel());
}

void expect_near(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5) << what << " at " << i;
}

TEST(RegionalUnit, ProcessorModulatesOneCrossAndOneSelfAttentionCallAsTheFormula) {
  at::manual_seed(3);
  // A 2 x 2 latent (N = 4), 3 tokens; batch [uncond; cond]; one head.
  RegionalMaps maps;
  maps.height = maps.width = 2;
  maps.cross_condition = bools({{0, 1, 0}, {0, 1, 0}, {0, 0, 1}, {0, 0, 0}});
  maps.self_condition = bools({{1, 1, 0, 0}, {1, 1, 0, 0}, {0, 0, 1, 0}, {0, 0, 0, 1}});
  maps.size_weight = at::tensor({0.5f, 0.5f, 0.75f, 0.75f}).reshape({4, 1});
  extensions::DenseDiffusionConfig cfg;
  cfg.cross_weight = 0.8;
  cfg.self_weight = 0.3;
  auto proc = std::make_shared<extensions::RegionalAttentionProcessor>(cfg);
  proc->set_maps({{4, maps}});
  const double t = 900, scale = 0.7;
  proc->set_call({/*index=*/2, /*num_timesteps=*/10, t, /*conditional_rows=*/{1}});
  ASSERT_TRUE(proc->active());  // 2 < 0.3 * 10
  nn::AttentionSite cross, self;
  cross.path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2";
  cross.is_cross = true;
  self.path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
  const at::Tensor q = at::randn({2, 1, 4, 3}), kc = at::randn({2, 1, 3, 3}), vc = at::randn({2, 1, 3, 2});
  const at::Tensor ks = at::randn({2, 1, 4, 3}), vs = at::randn({2, 1, 4, 2});
  const double tw = std::pow(t / 1000, 5);
  const at::Tensor oc = proc->forward(cross, {}, q, kc, vc, scale, false);
  expect_near(row_of(oc, 1), by_hand(q, kc, vc, 1, scale, &maps.cross_condition, &maps.size_weight, 0.8 * tw),
              "cross, conditional row");
  expect_near(row_of(oc, 0), by_hand(q, kc, vc, 0, scale, nullptr, nullptr, 0), "cross, unconditional row");
  const at::Tensor os = proc->forward(self, {}, q, ks, vs, scale, true);
  expect_near(row_of(os, 1), by_hand(q, ks, vs, 1, scale, &maps.self_condition, &maps.size_weight, 0.3 * tw),
              "self, conditional row");
  expect_near(row_of(os, 0), by_hand(q, ks, vs, 0, scale, nullptr, nullptr, 0), "self, unconditional row");
  // The modulation moved the conditional row (so the comparison above can fail).
  EXPECT_GT((oc[1] - nn::attention(q, kc, vc, scale)[1]).abs().max().item<double>(), 1e-3);
  // Outside the window (3 >= 0.3 * 10): the layer's fast path, bit for bit.
  proc->set_call({3, 10, t, {1}});
  EXPECT_FALSE(proc->active());
  EXPECT_TRUE(at::equal(proc->forward(cross, {}, q, kc, vc, scale, false), nn::attention(q, kc, vc, scale)));
  // Unguided: every row conditional.
  proc->set_call({0, 10, t, {0, 1}});
  const at::Tensor all = proc->forward(cross, {}, q, kc, vc, scale, false);
  expect_near(row_of(all, 0), by_hand(q, kc, vc, 0, scale, &maps.cross_condition, &maps.size_weight, 0.8 * tw),
              "unguided row 0");
  // A resolution without maps is refused by name.
  proc->set_call({0, 10, t, {1}});
  EXPECT_THROW(proc->forward(cross, {}, at::randn({2, 1, 9, 3}), kc, vc, scale, false), Unsupported);
}

// ---------------------------------------------------------------- masks at each resolution

TEST(RegionalUnit, MapsAtEachAttentionResolution) {
  // 4 x 4 latent: region 0 = the left half, region 1 = the top-right quarter, background = the bottom-right one.
  at::Tensor seg = at::zeros({3, 4, 4});
  seg[0].narrow(1, 0, 2).fill_(1);
  seg[1].narrow(0, 0, 2).narrow(1, 2, 2).fill_(1);
  seg[2].narrow(0, 2, 2).narrow(1, 2, 2).fill_(1);
  const std::vector<int64_t> tokens = {-1, 0, 0, 1, -1};
  const RegionalMaps m4 = extensions::build_regional_maps(seg, tokens, 4, 4, 1.0);
  auto region_of = [](int64_t y, int64_t x) { return x < 2 ? 0 : y < 2 ? 1 : 2; };
  for (int64_t i = 0; i < 16; ++i) {
    const int64_t ri = region_of(i / 4, i % 4);
    EXPECT_FLOAT_EQ(m4.size_weight[i][0].item<float>(), ri == 0 ? 0.5f : 0.75f) << i;
    for (int64_t j = 0; j < 16; ++j)
      EXPECT_EQ(m4.self_condition[i][j].item<bool>(), ri == region_of(j / 4, j % 4)) << i << "," << j;
    for (int64_t j = 0; j < 5; ++j)
      EXPECT_EQ(m4.cross_condition[i][j].item<bool>(), tokens[size_t(j)] >= 0 && tokens[size_t(j)] == ri) << i;
  }
  // 2 x 2: nearest keeps pixels (0, 0), (0, 2), (2, 0), (2, 2): regions 0, 1 / 0, background.
  const RegionalMaps m2 = extensions::build_regional_maps(seg, tokens, 2, 2, 1.0);
  EXPECT_TRUE(at::equal(m2.self_condition, bools({{1, 0, 1, 0}, {0, 1, 0, 0}, {1, 0, 1, 0}, {0, 0, 0, 1}})));
  EXPECT_TRUE(at::allclose(m2.size_weight, at::tensor({0.5f, 0.75f, 0.5f, 0.75f}).reshape({4, 1})));
  EXPECT_TRUE(
      at::equal(m2.cross_condition, bools({{0, 1, 1, 0, 0}, {0, 0, 0, 1, 0}, {0, 1, 1, 0, 0}, {0, 0, 0, 0, 0}})));
  // size_scale 0: no size weighting.
  EXPECT_TRUE(at::equal(extensions::build_regional_maps(seg, tokens, 2, 2, 0.0).size_weight, at::ones({4, 1})));
  const auto res = extensions::attention_resolutions(5, 3, 4);
  const std::vector<std::pair<int64_t, int64_t>> want = {{5, 3}, {3, 2}, {2, 1}, {1, 1}};
  EXPECT_EQ(res, want);
}

// ---------------------------------------------------------------- region tokens in the caption

std::vector<int64_t> ids_without_ends(const std::string& text) {
  std::vector<int64_t> ids = tiny_tokenizer().encode(text);
  return std::vector<int64_t>(ids.begin() + 1, ids.end() - 1);
}

TEST(RegionalUnit, RegionTextsAreFoundInTheCaptionOrAppended) {
  const auto& tok = tiny_tokenizer();
  const auto c = pipelines::regional_caption(tok, "a cat and a dog", {"dog", "a", "red car", "a"});
  EXPECT_EQ(c.caption, "a cat and a dog, red car");
  EXPECT_EQ(c.appended, (std::vector<bool>{false, false, true, false}));
  const std::vector<int64_t> ids = tok.encode(c.caption);
  const std::vector<std::string> texts = {"dog", "a", "red car", "a"};
  for (size_t r = 0; r < texts.size(); ++r) {
    const auto [b, e] = c.spans[r];
    EXPECT_EQ(std::vector<int64_t>(ids.begin() + b, ids.begin() + e), ids_without_ends(texts[r])) << texts[r];
  }
  // The two "a" regions take the two occurrences, in order; the appended text sits at the end, before EOS.
  EXPECT_EQ(c.spans[1].first, 1);
  EXPECT_GT(c.spans[3].first, c.spans[1].first);
  EXPECT_EQ(c.spans[2].second, static_cast<int64_t>(ids.size()) - 1);
  const auto seg = c.token_segment(static_cast<int64_t>(ids.size()) + 2);
  EXPECT_EQ(seg[0], -1);
  EXPECT_EQ(seg[static_cast<size_t>(c.spans[0].first)], 0);
  EXPECT_EQ(seg[static_cast<size_t>(c.spans[2].first)], 2);
  // An empty prompt becomes the region texts.
  EXPECT_EQ(pipelines::regional_caption(tok, "", {"cat", "dog"}).caption, "cat, dog");
  // Too long with the appended texts, and a text without tokens: InvalidArgument naming --region.
  std::string long_text;
  for (int i = 0; i < 80; ++i) long_text += "cat ";
  try {
    pipelines::regional_caption(tok, "a dog", {long_text});
    ADD_FAILURE() << "a caption over the tokenizer's length was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--region: the prompt with the region texts must fit the tokenizer's 77"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(pipelines::regional_caption(tok, "a dog", {"   "}), InvalidArgument);
}

// ---------------------------------------------------------------- the layout map

Image map_of(int w, int h, const std::vector<uint32_t>& pixels) {
  Image img;
  img.width = w;
  img.height = h;
  img.channels = 3;
  for (uint32_t p : pixels) {
    img.data.push_back(static_cast<uint8_t>(p >> 16));
    img.data.push_back(static_cast<uint8_t>(p >> 8));
    img.data.push_back(static_cast<uint8_t>(p));
  }
  return img;
}

constexpr uint32_t kRed = 0xff0000, kGreen = 0x00ff00, kBlue = 0x0000ff, kWhite = 0xffffff;

template <typename F>
void expect_invalid(F f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "accepted; expected an error mentioning '" << needle << "'";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(RegionalUnit, LayoutMapColoursBecomeMasksWithTheBackgroundLast) {
  EXPECT_EQ(api::parse_layout_color("#FF00aa", "--region"), (std::array<uint8_t, 3>{255, 0, 170}));
  for (const char* bad : {"ff0000", "#ff00", "#gg0000", "#ff00000", ""})
    expect_invalid([&] { api::parse_layout_color(bad, "--region"); }, "must be #rrggbb");
  // 4 x 2: red red blue white / red red white blue; regions red (0) and green (1, absent here is the caller's rule).
  const Image map = map_of(4, 2, {kRed, kRed, kBlue, kWhite, kRed, kRed, kWhite, kBlue});
  const std::vector<LayoutRegion> regions = {{"#ff0000", "apple"}, {"#0000ff", "sea"}};
  const at::Tensor same = api::layout_segments(map, regions, 4, 2);
  ASSERT_EQ(same.sizes(), (std::vector<int64_t>{3, 2, 4}));
  EXPECT_TRUE(at::equal(same[0], bools({{1, 1, 0, 0}, {1, 1, 0, 0}})));
  EXPECT_TRUE(at::equal(same[1], bools({{0, 0, 1, 0}, {0, 0, 0, 1}})));
  EXPECT_TRUE(at::equal(same[2], bools({{0, 0, 0, 1}, {0, 0, 1, 0}})));  // white: background
  // Upscale x2: each pixel a 2 x 2 block.
  const at::Tensor up = api::layout_segments(map, regions, 8, 4);
  ASSERT_EQ(up.sizes(), (std::vector<int64_t>{3, 4, 8}));
  EXPECT_TRUE(up[1][1][5].item<bool>() && up[1][0][4].item<bool>() && !up[1][2][4].item<bool>());
  // Downscale x2: the right block mixes blue (a region) and white (background): not exact.
  expect_invalid([&] { api::layout_segments(map, regions, 2, 1); }, "holds pixels of several regions");
  // ... but with blue unlisted both are background, and the map has no region-free pixel left out.
  const at::Tensor down = api::layout_segments(map, {{"#ff0000", "apple"}}, 2, 1);
  ASSERT_EQ(down.sizes(), (std::vector<int64_t>{2, 1, 2}));
  EXPECT_TRUE(at::equal(down[0], bools({{1, 0}})));
  // No background when every pixel is in a region.
  EXPECT_EQ(api::layout_segments(map_of(2, 1, {kRed, kGreen}), {{"#ff0000", "a"}, {"#00ff00", "b"}}, 2, 1).size(0), 2);
  // Sizes no integer factor maps exactly, or different factors for width and height.
  expect_invalid([&] { api::layout_segments(map, regions, 3, 2); }, "integer multiple or fraction");
  expect_invalid([&] { api::layout_segments(map, regions, 4, 4); }, "the map is 4x2 and the output 4x4");
}

TEST(RegionalUnit, LayoutOptionRulesBeforeAnyFile) {
  GenerateOptions o;
  o.layout_path = "map.png";
  o.regions = {{"#ff0000", "apple"}};
  EXPECT_NO_THROW(api::check_layout_options(o));
  auto with = [&](auto edit) {
    GenerateOptions c = o;
    edit(c);
    return c;
  };
  expect_invalid([&] { api::check_layout_options(with([](auto& c) { c.regions.clear(); })); },
                 "--layout needs at least one --region");
  expect_invalid([&] { api::check_layout_options(with([](auto& c) { c.layout_path.clear(); })); },
                 "--region needs --layout");
  expect_invalid([&] { api::check_layout_options(with([](auto& c) {
                         c.regions.push_back({"#FF0000", "b"});
                       })); },
                 "each colour may be listed once");
  expect_invalid([&] { api::check_layout_options(with([](auto& c) { c.regions[0].color = "red"; })); },
                 "must be #rrggbb");
  expect_invalid([&] { api::check_layout_options(with([](auto& c) { c.regions[0].text = " "; })); },
                 "the region text must not be empty");
  expect_invalid([&] { api::check_layout_options(with([](auto& c) { c.layout_guidance_scale = 11; })); },
                 "--layout-guidance-scale must be in [0, 10], got 11");
  expect_invalid([&] { api::check_layout_options(with([](auto& c) { c.layout_method = "magic"; })); },
                 "--layout-method must be one of regional, spatext, scene, got 'magic'");
  // spatext and scene are built (their models are checked when loaded: a SpaText or a scene folder).
  EXPECT_NO_THROW(api::check_layout_options(with([&](auto& c) { c.layout_method = "spatext"; })));
  EXPECT_NO_THROW(api::check_layout_options(with([&](auto& c) { c.layout_method = "scene"; })));
  expect_invalid([&] { api::check_layout_options(with([](auto& c) { c.scene_guidance = "both"; })); },
                 "--scene-guidance must be text");
  EXPECT_THROW(api::check_layout_options(with([](auto& c) { c.init_image = "x.png"; })), Unsupported);
  EXPECT_EQ(layout_method_names(), (std::vector<std::string>{"regional", "spatext", "scene"}));
}

// ---------------------------------------------------------------- tiny-model runs

// 32 x 32 map: left half red, right half green.
std::string write_map(const std::string& dir, int w = 32, int h = 32) {
  std::vector<uint32_t> px;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) px.push_back(x < w / 2 ? kRed : kGreen);
  const std::string path = dir + "/map.png";
  save_png(path, map_of(w, h, px));
  return path;
}

GenerateOptions tiny_options(const std::string& dir, const std::string& name) {
  GenerateOptions o;
  o.model = tiny_model_dir("sd15");
  o.prompt = "a cat and a dog";
  o.width = o.height = 32;
  o.steps = 4;
  o.seed = 7;
  o.progress = false;
  o.output = dir + "/" + name + ".png";
  o.save_latents = dir + "/" + name + ".safetensors";
  return o;
}

at::Tensor latents_of(const GenerateOptions& o) { return io::load_safetensors(o.save_latents).at("latents"); }

TEST(RegionalTiny, LayoutChangesTheRunAndScaleZeroIsThePlainRunBitForBit) {
  const std::string dir = temp_subdir("RegionalTiny-Layout");
  const std::string map = write_map(dir);
  GenerateOptions plain = tiny_options(dir, "plain");
  generate(plain);
  GenerateOptions regional = tiny_options(dir, "regional");
  regional.layout_path = map;
  regional.regions = {{"#ff0000", "cat"}, {"#00ff00", "dog"}};
  generate(regional);
  GenerateOptions zero = regional;
  zero.output = dir + "/zero.png";
  zero.save_latents = dir + "/zero.safetensors";
  zero.layout_guidance_scale = 0;
  generate(zero);
  const at::Tensor a = latents_of(plain), b = latents_of(regional), z = latents_of(zero);
  EXPECT_TRUE(at::isfinite(b).all().item<bool>());
  EXPECT_GT((a - b).abs().max().item<double>(), 1e-4) << "the layout changed nothing";
  EXPECT_TRUE(at::equal(a, z)) << "scale 0 differs from the plain run by " << (a - z).abs().max().item<double>();
  EXPECT_EQ(load_image(plain.output, "a").data, load_image(zero.output, "z").data);
  // The scale acts through the attention modulation alone (the region embeddings are the same at any scale > 0):
  // scale 3 differs from scale 1, so the processor is live inside the pipeline's loop.
  GenerateOptions strong = regional;
  strong.output = dir + "/strong.png";
  strong.save_latents = dir + "/strong.safetensors";
  strong.layout_guidance_scale = 3;
  generate(strong);
  EXPECT_GT((latents_of(strong) - b).abs().max().item<double>(), 1e-4) << "the modulation changed nothing";
  // A region text the prompt lacks is appended: scale 0 is then the plain run of the longer caption.
  GenerateOptions extra = zero;
  extra.regions[1].text = "red car";
  extra.output = dir + "/extra.png";
  extra.save_latents = dir + "/extra.safetensors";
  generate(extra);
  GenerateOptions longer = tiny_options(dir, "longer");
  longer.prompt = "a cat and a dog, red car";
  generate(longer);
  EXPECT_TRUE(at::equal(latents_of(extra), latents_of(longer)));
  EXPECT_FALSE(at::equal(latents_of(extra), a));
}

TEST(RegionalTiny, WorksWithAControlNetAndALoRAAndAnUpscaledMap) {
  const std::string dir = temp_subdir("RegionalTiny-Composes");
  const std::string map = write_map(dir, 16, 16);  // upscaled x2 to the output
  std::vector<uint32_t> px(32 * 32, 0x808080);
  save_png(dir + "/control.png", map_of(32, 32, px));
  GenerateOptions base = tiny_options(dir, "base");
  base.controlnets = {tiny_controlnet_dir("sd15")};
  base.control_images = {dir + "/control.png"};
  base.loras = {tiny_lora_file("sd15")};
  generate(base);
  GenerateOptions with = tiny_options(dir, "with");
  with.controlnets = base.controlnets;
  with.control_images = base.control_images;
  with.loras = base.loras;
  with.layout_path = map;
  with.regions = {{"#00ff00", "dog"}};
  generate(with);
  const at::Tensor a = latents_of(base), b = latents_of(with);
  EXPECT_TRUE(at::isfinite(b).all().item<bool>());
  EXPECT_GT((a - b).abs().max().item<double>(), 1e-4);
}

// ---------------------------------------------------------------- the command

void expect_exit2(const std::vector<std::string>& args, const std::string& needle, const std::string& out) {
  CliRun r = dmx_run(args);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
  EXPECT_FALSE(path_exists(out)) << out << " must not be written";
}

TEST(RegionalCli, LayoutErrorsExit2AndWriteNothing) {
  const std::string dir = temp_subdir("RegionalCli-Errors");
  const std::string map = write_map(dir);
  const std::string out = dir + "/out.png";
  std::ofstream(dir + "/garbage.png") << "not a png";
  const std::vector<std::string> base = {"generate",
                                         "--model",
                                         tiny_model_dir("sd15"),
                                         "--prompt",
                                         "a cat and a dog",
                                         "--output",
                                         out,
                                         "--steps",
                                         "2",
                                         "--width",
                                         "32",
                                         "--height",
                                         "32",
                                         "--threads",
                                         "1"};
  auto with = [&](std::vector<std::string> extra) {
    auto v = base;
    v.insert(v.end(), extra.begin(), extra.end());
    return v;
  };
  expect_exit2(with({"--layout", map, "--region", "#ff000=cat"}), "must be #rrggbb (six hex digits), got '#ff000'",
               out);
  expect_exit2(with({"--layout", map, "--region", "#0000ff=cat"}),
               "--region #0000ff: the colour is not in the layout map", out);
  expect_exit2(with({"--layout", map, "--region", "cat"}), "--region must be COLOR=TEXT", out);
  expect_exit2(with({"--layout", map}), "--layout needs at least one --region", out);
  expect_exit2(with({"--region", "#ff0000=cat"}), "--region needs --layout", out);
  expect_exit2(with({"--layout-guidance-scale", "2"}), "need --layout", out);
  expect_exit2(with({"--layout", map, "--region", "#ff0000=cat", "--layout-method", "spatext"}),
               "--layout-method spatext needs a SpaText model folder", out);
  expect_exit2(with({"--layout", map, "--region", "#ff0000=cat", "--layout-method", "scene"}),
               "needs a scene model folder", out);
  expect_exit2(with({"--layout", dir + "/garbage.png", "--region", "#ff0000=cat"}), "--layout", out);
  expect_exit2(with({"--layout", dir + "/missing.png", "--region", "#ff0000=cat"}), "--layout: file not found", out);
  std::vector<std::string> wide = with({"--layout", map, "--region", "#ff0000=cat"});
  wide[std::find(wide.begin(), wide.end(), "--width") - wide.begin() + 1] = "24";
  expect_exit2(wide, "the map is 32x32 and the output 24x32", out);
  std::string long_text;
  for (int i = 0; i < 80; ++i) long_text += "dog ";
  expect_exit2(with({"--layout", map, "--region", "#ff0000=" + long_text}),
               "the prompt with the region texts must fit the tokenizer's 77 tokens", out);
  CliRun ok = dmx_run(with({"--layout", map, "--region", "#ff0000=cat", "--region", "#00ff00=dog", "--quiet"}));
  EXPECT_EQ(ok.code, 0) << ok.output;
  EXPECT_TRUE(path_exists(out));
}

// ---------------------------------------------------------------- the bundled emoji model (docs/regional.md)

// Two emoji side by side on a 64 x 32 canvas (left half red, right half green), the region texts appended to an
// empty global prompt ("A, B"), at --layout-guidance-scale 0 (the text-only run of the same caption), 1 (the
// paper's weights) and 3, seeds 0..3 each. The emoji classifier scores the crop of each region (the left and right
// 32 x 32 halves) against the region's concept. The table and, with DMX_REGIONAL_OUT=DIR, the pictures (per row:
// the layout, then scales 0, 1, 3) are what docs/regional.md shows. The check: the modulation changes the bundled
// model's pictures at the paper's weights, and the scale changes them further (it does not claim that it helps
// there: it hardly does).
TEST(RegionalSlow, EmojiTwoRegionLayoutsScorePerRegion) {
  const std::string root = DMX_SOURCE_DIR;
  if (!path_exists(root + "/models/emoji") || !path_exists(root + "/models/emoji-classifier"))
    GTEST_SKIP() << "models/emoji or models/emoji-classifier is not in this checkout";
  const std::string dir = temp_subdir("RegionalSlow-Emoji");
  const std::string map = write_map(dir, 64, 32);
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"red apple", "rocket"},        {"slice of pizza", "dog face"},
      {"hamburger", "snowman"},       {"banana", "ghost"},
      {"cat face", "automobile"},     {"fire", "strawberry"},
      {"christmas tree", "doughnut"}, {"penguin", "birthday cake"}};
  const int seeds = 4;
  auto clf = emoji::load_emoji_classifier(root + "/models/emoji-classifier");
  const auto& names = clf->config().class_names;
  auto index_of = [&](const std::string& n) {
    const auto it = std::find(names.begin(), names.end(), n);
    EXPECT_NE(it, names.end()) << n;
    return static_cast<int64_t>(it - names.begin());
  };
  struct Score {
    int top1 = 0, top5 = 0, both5 = 0, n = 0;
    double change = 0;    // sum over pictures of the mean absolute pixel difference from the text-only picture
    double from_one = 0;  // ... from the scale-1 picture
  };
  const std::vector<double> scales = {0.0, 1.0, 3.0};  // 0: text only (the same caption)
  std::vector<Score> score(scales.size());
  std::vector<at::Tensor> rows;  // [3, 32, 64 * 4] per layout and seed: the map, then one picture per scale
  at::Tensor drawn = image_to_tensor(load_image(map, "map"))[0] * 0.5 + 0.5;
  for (size_t i = 0; i < pairs.size(); ++i)
    for (int seed = 0; seed < seeds; ++seed) {
      std::vector<at::Tensor> row = {drawn};
      for (size_t si = 0; si < scales.size(); ++si) {
        const double scale = scales[si];
        GenerateOptions o;
        o.model = root + "/models/emoji";
        o.prompt = "";
        o.layout_path = map;
        o.regions = {{"#ff0000", pairs[i].first}, {"#00ff00", pairs[i].second}};
        o.layout_guidance_scale = scale;
        o.width = 64;
        o.height = 32;
        o.steps = 25;
        o.guidance_scale = 3;
        o.seed = static_cast<uint64_t>(seed);
        o.threads = 1;
        o.progress = false;
        o.output = dir + "/out.png";
        o.overwrite = true;
        generate(o);
        const at::Tensor img = image_to_tensor(load_image(o.output, "out"))[0];  // [3, 32, 64] in [-1, 1]
        row.push_back(img * 0.5 + 0.5);
        score[si].change += (row.back() - row[1]).abs().mean().item<double>();  // row[1]: the text-only picture
        if (row.size() > 2) score[si].from_one += (row.back() - row[2]).abs().mean().item<double>();  // row[2]: scale 1
        const at::Tensor crops = at::stack({img.narrow(2, 0, 32), img.narrow(2, 32, 32)});
        const at::Tensor top5 = std::get<1>(emoji::classify(clf, crops).concept_logits.topk(5, 1));
        Score& sc = score[si];
        bool both = true;
        for (int64_t r = 0; r < 2; ++r) {
          const int64_t want = index_of(r == 0 ? pairs[i].first : pairs[i].second);
          const bool in5 = top5[r].eq(want).any().item<bool>();
          sc.top1 += top5[r][0].item<int64_t>() == want;
          sc.top5 += in5;
          both = both && in5;
          ++sc.n;
        }
        sc.both5 += both;
      }
      rows.push_back(at::cat(row, 2));
    }
  auto pct = [](int k, int n) { return 100.0 * k / std::max(1, n); };
  std::printf(
      "| --layout-guidance-scale | region crops | top-1 | top-5 | pictures with both regions in top-5 | mean |pixel "
      "change| from scale 0 | from scale 1 |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (size_t si = 0; si < scales.size(); ++si)
    std::printf("| %g%s | %d | %.1f %% | %.1f %% | %.1f %% | %.5f | %.5f |\n", scales[si],
                scales[si] == 0 ? " (text only)" : "", score[si].n, pct(score[si].top1, score[si].n),
                pct(score[si].top5, score[si].n), pct(score[si].both5, score[si].n / 2),
                score[si].change / (score[si].n / 2), score[si].from_one / (score[si].n / 2));
  if (const char* out = std::getenv("DMX_REGIONAL_OUT")) {
    // One picture per layout at seed 0, and the whole set.
    std::vector<at::Tensor> firsts;
    for (size_t i = 0; i < rows.size(); i += static_cast<size_t>(seeds)) firsts.push_back(rows[i]);
    auto save_x2 = [&](const std::string& name, const at::Tensor& grid) {  // [3, H, W] in [0, 1], shown at 2x
      const at::Tensor big = at::upsample_nearest2d(grid.unsqueeze(0), {grid.size(1) * 2, grid.size(2) * 2})[0];
      save_png(std::string(out) + "/" + name, tensor_to_image(big.permute({1, 2, 0}).contiguous()));
    };
    save_x2("regional-emoji.png", at::cat(firsts, 1));
    save_x2("regional-emoji-all-seeds.png", at::cat(rows, 1));
  }
  for (const Score& sc : score) EXPECT_EQ(sc.n, static_cast<int>(2 * pairs.size()) * seeds);
  // The layout acts on the bundled model (the window and the processor are live), and the scale matters; how little
  // it changes these pictures is what docs/regional.md reports.
  EXPECT_EQ(score[0].change, 0.0);
  EXPECT_GT(score[1].change, 0.0);
  EXPECT_GT(score[2].from_one, 0.0);
}
}  // namespace
}  // namespace dmx::test
