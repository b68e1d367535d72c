// SpaText (docs/spatext.md): the map builder, the multi-conditional guidance, the provider's rows, the segment
// cut-out, the widened UNet, the LoRA merge, and `dmx train spatext` + `dmx generate --layout-method spatext`:
//   SpaTextUnit  the map against a hand computation; combine_guidance against the formula by hand; the provider's
//                maps per guidance group; the segment cut-out
//   SpaTextTiny  the widened UNet equals the base for any map; LoRA pairs merge into their weights as up @ down
//   SpaTextCli   a few steps on a tiny model, CLIP and prior write a SpaText folder that dmx generate runs with and
//                without a layout (scale 0 = the text-only run, bit for bit); bad input exits 2 and writes nothing
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "loaders/clip.h"
#include "loaders/spatext.h"
#include "pipelines/generation.h"
#include "pipelines/spatext.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "training/clip_train.h"
#include "training/spatext_train.h"

namespace dmx::test {
namespace {

namespace fs = std::filesystem;

TEST(SpaTextUnit, MapIsEachRegionsShareOfEveryLatentCell) {
  // 4 x 4 pixels, factor 2: region 0 = the left column pair of the top row of cells, region 1 = one pixel.
  at::Tensor seg = at::zeros({2, 4, 4}, at::kBool);
  seg[0].narrow(0, 0, 2).narrow(1, 0, 2).fill_(true);  // cell (0, 0) whole
  seg[0][2][1] = true;                                 // a quarter of cell (1, 0)
  seg[1][3][3] = true;                                 // a quarter of cell (1, 1)
  const at::Tensor e = at::tensor({1.0f, 2.0f, 3.0f, -1.0f, 0.5f, 4.0f}).view({2, 3});
  const at::Tensor map = pipelines::spatext_map(seg, e, 2);
  ASSERT_EQ(map.sizes(), (std::vector<int64_t>{3, 2, 2}));
  for (int d = 0; d < 3; ++d) {
    const float e0 = e[0][d].item<float>(), e1 = e[1][d].item<float>();
    EXPECT_FLOAT_EQ(map[d][0][0].item<float>(), e0);
    EXPECT_FLOAT_EQ(map[d][0][1].item<float>(), 0.0f);
    EXPECT_FLOAT_EQ(map[d][1][0].item<float>(), 0.25f * e0);
    EXPECT_FLOAT_EQ(map[d][1][1].item<float>(), 0.25f * e1);
  }
  EXPECT_TRUE(
      pipelines::spatext_map(at::zeros({0, 4, 4}, at::kBool), at::zeros({0, 3}), 2).equal(at::zeros({3, 2, 2})));
  EXPECT_THROW(pipelines::spatext_map(seg, e, 3), InvalidArgument);                  // 4 is no multiple of 3
  EXPECT_THROW(pipelines::spatext_map(seg, e.narrow(0, 0, 1), 2), InvalidArgument);  // 2 segments, 1 embedding
}

TEST(SpaTextUnit, GuidanceSumsEveryBranchAgainstTheUnconditional) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(1);
  const at::Tensor u = at::randn({2, 4, 3, 3}, g), c = at::randn({2, 4, 3, 3}, g), l = at::randn({2, 4, 3, 3}, g);
  // Two groups: plain classifier-free guidance.
  const at::Tensor two = pipelines::combine_guidance(at::cat({u, c}), 7.5, {});
  EXPECT_TRUE(two.allclose(u + 7.5 * (c - u), 0, 1e-6));
  // SpaText's three: eps_0 + s_g (eps(c_g, 0) - eps_0) + s_l (eps(0, c_l) - eps_0), element by element.
  const at::Tensor three = pipelines::combine_guidance(at::cat({u, c, l}), 3.0, {{false, 4.5}});
  const float* pu = u.data_ptr<float>();
  const float* pc = c.data_ptr<float>();
  const float* pl = l.data_ptr<float>();
  const at::Tensor got = three.contiguous();
  for (int64_t i = 0; i < u.numel(); ++i)
    EXPECT_NEAR(got.data_ptr<float>()[i], pu[i] + 3.0f * (pc[i] - pu[i]) + 4.5f * (pl[i] - pu[i]), 1e-5);
  // 5 rows are no 4 groups of equal size.
  EXPECT_THROW(pipelines::combine_guidance(at::cat({u, c, l.narrow(0, 0, 1)}), 3.0, {{false, 1}, {true, 1}}),
               InvalidArgument);
}

TEST(SpaTextUnit, ProviderGivesEachGuidanceGroupItsMap) {
  const at::Tensor map = at::arange(2 * 2 * 2, at::kFloat).view({2, 2, 2}) + 1;
  pipelines::SpaTextProvider p(map, 4, 2, 6.0);
  ASSERT_EQ(p.guidance_branches().size(), 1u);
  EXPECT_FALSE(p.guidance_branches()[0].text);
  EXPECT_DOUBLE_EQ(p.guidance_branches()[0].scale, 6.0);
  at::Tensor lat = at::zeros({1, 4, 2, 2});
  // Guided, three groups of N = 2: [no map; no map; map].
  models::UNetInputs in;
  in.sample = at::randn({6, 4, 2, 2});
  const at::Tensor x = in.sample.clone();
  std::unique_ptr<schedulers::Scheduler> s = schedulers::create_scheduler("DDIMScheduler", nlohmann::json::object());
  pipelines::ResidualStep step{0, 1, 999.0, lat, *s, true, 3};
  p.apply(step, in);
  ASSERT_EQ(in.sample.sizes(), (std::vector<int64_t>{6, 6, 2, 2}));
  EXPECT_TRUE(in.sample.narrow(1, 0, 4).equal(x));
  EXPECT_TRUE(in.sample.narrow(0, 0, 4).narrow(1, 4, 2).equal(at::zeros({4, 2, 2, 2})));
  EXPECT_TRUE(in.sample.narrow(0, 4, 2).narrow(1, 4, 2).equal(map.unsqueeze(0).expand({2, 2, 2, 2})));
  // Unguided: the one group gets the map. Without a map: no branch, zeros everywhere.
  in.sample = at::randn({1, 4, 2, 2});
  pipelines::ResidualStep one{0, 1, 999.0, lat, *s, false, 1};
  p.apply(one, in);
  EXPECT_TRUE(in.sample.narrow(1, 4, 2).equal(map.unsqueeze(0)));
  pipelines::SpaTextProvider none(at::Tensor(), 4, 2, 6.0);
  EXPECT_TRUE(none.guidance_branches().empty());
  pipelines::SpaTextProvider zero_scale(map, 4, 2, 0.0);
  EXPECT_TRUE(zero_scale.guidance_branches().empty());
  in.sample = at::randn({2, 4, 2, 2});
  pipelines::ResidualStep two{0, 1, 999.0, lat, *s, true, 2};
  none.apply(two, in);
  EXPECT_TRUE(in.sample.narrow(1, 4, 2).equal(at::zeros({2, 2, 2, 2})));
  EXPECT_THROW(pipelines::SpaTextProvider(at::zeros({3, 2, 2}), 4, 2, 1.0), InvalidArgument);  // D = 2, map of 3
}

TEST(SpaTextUnit, SegmentCutOutIsTheTightSquareWithWhiteOutside) {
  Image pic;
  pic.width = 10;
  pic.height = 8;
  pic.channels = 3;
  pic.data.assign(10 * 8 * 3, 7);
  at::Tensor mask = at::zeros({8, 10}, at::kBool);
  mask.narrow(0, 2, 2).narrow(1, 3, 4).fill_(true);  // rows 2-3, columns 3-6: a 4 x 2 box -> a 4 x 4 square
  const Image crop = training::spatext_segment_crop(pic, mask);
  ASSERT_EQ(crop.width, 4);
  ASSERT_EQ(crop.height, 4);
  int inside = 0, white = 0;
  for (size_t i = 0; i < crop.data.size(); i += 3) {
    if (crop.data[i] == 7) ++inside;
    if (crop.data[i] == 255) ++white;
  }
  EXPECT_EQ(inside, 8);  // the segment's pixels, all of them
  EXPECT_EQ(white, 8);
  EXPECT_THROW(training::spatext_segment_crop(pic, at::zeros({8, 10}, at::kBool)), InvalidArgument);
}

TEST(SpaTextTiny, WidenedUNetEqualsTheBaseForAnyMap) {
  auto m = load_tiny_model("test");
  at::manual_seed(2);
  auto wide = loaders::widen_unet_input(m->unet, 5);
  ASSERT_EQ(wide->config().in_channels, m->unet->config().in_channels + 5);
  at::NoGradGuard no_grad;
  m->unet->eval();
  wide->eval();
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(5);
  models::UNetInputs in;
  in.sample = at::randn({2, 4, 8, 8}, g);
  in.timestep = at::tensor({10, 900}, at::kLong);
  in.encoder_hidden_states = at::randn({2, 77, 32}, g);
  const at::Tensor base = m->unet->forward(in);
  in.sample = at::cat({in.sample, at::randn({2, 5, 8, 8}, g) * 3}, 1);
  EXPECT_TRUE(wide->forward(in).equal(base));
}

TEST(SpaTextTiny, LoRAPairsMergeIntoTheirWeights) {
  auto m = load_tiny_model("test");
  auto params = m->unet->named_parameters(true);
  const std::string lin = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
  const std::string conv = "down_blocks.0.resnets.0.conv1";
  ASSERT_NE(params.find(lin + ".weight"), nullptr);
  ASSERT_NE(params.find(conv + ".weight"), nullptr);
  const at::Tensor w_lin = params[lin + ".weight"].clone(), w_conv = params[conv + ".weight"].clone();
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(9);
  const int64_t out_l = w_lin.size(0), in_l = w_lin.size(1);
  const int64_t out_c = w_conv.size(0), in_c = w_conv.size(1);
  io::TensorMap t;
  t["unet." + lin + ".lora.down.weight"] = at::randn({2, in_l}, g);
  t["unet." + lin + ".lora.up.weight"] = at::randn({out_l, 2}, g);
  t["unet." + conv + ".lora.down.weight"] = at::randn({3, in_c, 3, 3}, g);
  t["unet." + conv + ".lora.up.weight"] = at::randn({out_c, 3, 1, 1}, g);
  t["unet.conv_in.weight"] = at::zeros({1});  // not a pair: ignored
  EXPECT_EQ(loaders::merge_unet_lora(m->unet, t), 2);
  const at::Tensor d_lin = at::matmul(t["unet." + lin + ".lora.up.weight"], t["unet." + lin + ".lora.down.weight"]);
  EXPECT_TRUE(params[lin + ".weight"].allclose(w_lin + d_lin, 1e-5, 1e-5));
  const at::Tensor d_conv =
      at::matmul(t["unet." + conv + ".lora.up.weight"].flatten(1), t["unet." + conv + ".lora.down.weight"].flatten(1))
          .view(w_conv.sizes());
  EXPECT_TRUE(params[conv + ".weight"].allclose(w_conv + d_conv, 1e-5, 1e-5));
  io::TensorMap bad;
  bad["unet.no_such.layer.lora.down.weight"] = at::zeros({2, 4});
  bad["unet.no_such.layer.lora.up.weight"] = at::zeros({4, 2});
  EXPECT_THROW(loaders::merge_unet_lora(m->unet, bad), FormatError);
  io::TensorMap wrong;
  wrong["unet." + lin + ".lora.down.weight"] = at::zeros({2, in_l + 1});
  wrong["unet." + lin + ".lora.up.weight"] = at::zeros({out_l, 2});
  EXPECT_THROW(loaders::merge_unet_lora(m->unet, wrong), FormatError);
}

// ---------------------------------------------------------------------------------------------------------------
// The commands.

constexpr int kSide = 32;  // the tiny model's default size

// A scene folder as `dmx data scenes` writes it (the parts dmx train spatext reads): n 32-px canvases, each with two
// squares (instances 1 and 2) on white, their instance map, captions, and layouts/0000.png with its colours.
std::string scene_folder(const std::string& name, int n) {
  const std::string dir = temp_subdir(name);
  fs::create_directories(dir + "/images");
  fs::create_directories(dir + "/instances");
  fs::create_directories(dir + "/layouts");
  static const char* kWords[] = {"red", "green", "blue", "yellow", "cat", "dog", "sun", "moon"};
  std::ofstream meta(dir + "/metadata.jsonl");
  for (int i = 0; i < n; ++i) {
    Image img, inst, layout;
    img.width = img.height = inst.width = inst.height = layout.width = layout.height = kSide;
    img.channels = layout.channels = 3;
    inst.channels = 1;
    img.data.assign(kSide * kSide * 3, 255);
    inst.data.assign(kSide * kSide, 0);
    layout.data.assign(kSide * kSide * 3, 0);
    for (int k = 1; k <= 2; ++k) {
      const int y0 = (i * 5 + k * 9) % 20, x0 = (i * 3 + k * 13) % 20;
      for (int y = y0; y < y0 + 10; ++y)
        for (int x = x0; x < x0 + 10; ++x) {
          uint8_t* p = &img.data[static_cast<size_t>((y * kSide + x) * 3)];
          p[0] = static_cast<uint8_t>(255 * ((i + k) & 1));
          p[1] = static_cast<uint8_t>(255 * (((i + k) >> 1) & 1));
          p[2] = static_cast<uint8_t>(128);
          inst.data[static_cast<size_t>(y * kSide + x)] = static_cast<uint8_t>(k);
          uint8_t* q = &layout.data[static_cast<size_t>((y * kSide + x) * 3)];
          q[0] = k == 1 ? 255 : 0;
          q[1] = k == 2 ? 255 : 0;
        }
    }
    char stem[16];
    std::snprintf(stem, sizeof stem, "%04d", i);
    save_png(dir + "/images/" + stem + ".png", img);
    save_png(dir + "/instances/" + stem + ".png", inst);
    if (i == 0) save_png(dir + "/layouts/0000.png", layout);
    const std::string a = kWords[i % 8], b = kWords[(i + 3) % 8];
    meta << nlohmann::json{{"file_name", std::string("images/") + stem + ".png"},
                           {"text", a + " and " + b},
                           {"instance_map", std::string("instances/") + stem + ".png"},
                           {"objects", {{{"instance", 1}, {"text", a}}, {{"instance", 2}, {"text", b}}}}}
                .dump()
         << "\n";
  }
  std::ofstream(dir + "/scenes.json") << nlohmann::json{{"format", "dmx-scenes-1"}, {"size", kSide}}.dump() << "\n";
  return dir;
}

// A tiny CLIP (16-px pictures, both towers and the projection 32 wide: a prior needs them equal) and a prior trained
// one step on it.
struct TinyTowers {
  std::string clip, prior;
};
const TinyTowers& tiny_towers() {
  static const TinyTowers t = [] {
    TinyTowers r;
    training::CLIPArchitecture a;
    a.width = 32;
    a.layers = 1;
    a.heads = 2;
    a.patch_size = 4;
    a.projection_dim = 32;
    a.image_size = 16;
    at::manual_seed(11);
    const auto m = training::new_clip_model(a, tiny_tokenizer_dir());
    const std::string d = temp_subdir("spatext-towers");
    r.clip = d + "/clip";
    loaders::save_clip(r.clip, *m);
    r.prior = d + "/prior";
    const CliRun p = dmx_run({"train",
                              "prior",
                              "--quiet",
                              "--data",
                              scene_folder("spatext-prior-data", 4),
                              "--clip",
                              r.clip,
                              "--output",
                              r.prior,
                              "--layers",
                              "1",
                              "--heads",
                              "2",
                              "--attention-head-dim",
                              "8",
                              "--batch-size",
                              "4",
                              "--steps",
                              "1",
                              "--seed",
                              "3",
                              "--threads",
                              "1"});
    EXPECT_EQ(p.code, 0) << p.output;
    return r;
  }();
  return t;
}

std::vector<std::string> spatext_args(const std::string& data, const std::string& out,
                                      const std::vector<std::string>& extra = {}) {
  std::vector<std::string> a = {"train",
                                "spatext",
                                "--model",
                                tiny_model_dir("test"),
                                "--clip",
                                tiny_towers().clip,
                                "--prior",
                                tiny_towers().prior,
                                "--data",
                                data,
                                "--output",
                                out,
                                "--steps",
                                "2",
                                "--batch-size",
                                "2",
                                "--rank",
                                "2",
                                "--resolution",
                                std::to_string(kSide),
                                "--seed",
                                "3",
                                "--learning-rate",
                                "1e-3",
                                "--proportion-empty-prompts",
                                "0.2",
                                "--threads",
                                "1",
                                "--quiet"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

TEST(SpaTextCli, FewStepsWriteAFolderThatDmxGenerateRunsWithAndWithoutALayout) {
  const std::string data = scene_folder("spatext-cli-data", 4);
  const std::string dir = temp_subdir("spatext-cli");
  const CliRun t = dmx_run(spatext_args(data, dir + "/st"));
  ASSERT_EQ(t.code, 0) << t.output;
  const loaders::SpaTextConfig cfg = loaders::read_spatext_config(dir + "/st");
  EXPECT_EQ(cfg.embedding_dim, 32);
  EXPECT_EQ(cfg.map_channels, training::kSpaTextMapChannels);
  EXPECT_EQ(cfg.resolution, kSide);
  EXPECT_EQ(cfg.lora_rank, 2);
  const auto st = loaders::load_spatext(dir + "/st");
  EXPECT_EQ(st->models->unet->config().in_channels, 4 + training::kSpaTextMapChannels);
  EXPECT_EQ(st->projection.sizes(), (std::vector<int64_t>{training::kSpaTextMapChannels, 32}));
  EXPECT_EQ(st->base_in_channels, 4);
  // The trained conv_in moved off zero in the map's channels (two steps at 1e-3).
  const io::TensorMap w = io::load_safetensors(dir + "/st/spatext.safetensors");
  EXPECT_GT(w.at("unet.conv_in.weight").narrow(1, 4, training::kSpaTextMapChannels).abs().max().item<double>(), 0.0);
  std::ifstream log(dir + "/st.train/train_log.jsonl");
  int lines = 0;
  for (std::string line; std::getline(log, line);) {
    ++lines;
    EXPECT_TRUE(std::isfinite(nlohmann::json::parse(line).at("loss").get<double>())) << line;
  }
  EXPECT_EQ(lines, 2);

  const std::vector<std::string> common = {"generate", "--model", dir + "/st", "--prompt", "red and cat",
                                           "--steps",  "2",       "--seed",    "5",        "--quiet"};
  auto with = [&](std::vector<std::string> more) {
    std::vector<std::string> a = common;
    a.insert(a.end(), more.begin(), more.end());
    return a;
  };
  const std::vector<std::string> layout = {
      "--layout",    data + "/layouts/0000.png", "--region", "#ff0000=red", "--region",
      "#00ff00=cat", "--layout-method",          "spatext"};
  auto plus = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  const CliRun g = dmx_run(with(plus(layout, {"--output", dir + "/l.png"})));
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(load_image(dir + "/l.png", "l").width, kSide);  // the size it was trained at
  const CliRun plain = dmx_run(with({"--output", dir + "/p.png"}));
  ASSERT_EQ(plain.code, 0) << plain.output;
  const CliRun zero = dmx_run(with(plus(layout, {"--layout-guidance-scale", "0", "--output", dir + "/z.png"})));
  ASSERT_EQ(zero.code, 0) << zero.output;
  EXPECT_EQ(load_image(dir + "/z.png", "z").data, load_image(dir + "/p.png", "p").data)
      << "scale 0 is the text-only run";
  EXPECT_NE(load_image(dir + "/l.png", "l").data, load_image(dir + "/p.png", "p").data) << "the map changes nothing";
  // Regional prompts run on a SpaText folder too, with its map empty (the same 64-px model, training-free layout).
  const CliRun reg = dmx_run(
      with(plus({"--layout", data + "/layouts/0000.png", "--region", "#ff0000=red"}, {"--output", dir + "/r.png"})));
  EXPECT_EQ(reg.code, 0) << reg.output;

  // Bad input: exit 2, nothing written.
  auto refused = [&](const std::vector<std::string>& args, const std::string& what) {
    const CliRun r = dmx_run(args);
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(what), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(dir + "/bad.png"));
    EXPECT_FALSE(fs::exists(dir + "/bad"));
  };
  refused(with({"--layout", data + "/layouts/0000.png", "--region", "#0000ff=moon", "--layout-method", "spatext",
                "--output", dir + "/bad.png"}),
          "not in the layout map");
  refused({"generate", "--model", tiny_model_dir("test"), "--prompt", "red", "--steps", "2", "--layout",
           data + "/layouts/0000.png", "--region", "#ff0000=red", "--layout-method", "spatext", "--output",
           dir + "/bad.png", "--quiet"},
          "needs a SpaText model folder");
  std::vector<std::string> res64 = spatext_args(data, dir + "/bad");
  *(std::find(res64.begin(), res64.end(), "--resolution") + 1) = "64";
  refused(res64, "--resolution must be the scene folder's size");
  refused(spatext_args(tiny_model_dir("test"), dir + "/bad"), "must be a scene folder");
  refused(spatext_args(data, dir + "/bad", {"--layout-dropout", "2"}), "--layout-dropout");
  refused(spatext_args(data, dir + "/bad", {"--random-flip"}), "random-flip");
}
}  // namespace
}  // namespace dmx::test
