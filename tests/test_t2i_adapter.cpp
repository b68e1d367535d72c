// T2I-Adapters: diffusers' T2IAdapter (full, light, XL) and MultiAdapter, loaded from diffusers folders and from
// TencentARC's original layout (converted by the tables of io/t2i_adapter_tables.cpp); the UNet taking
// down_intrablock_additional_residuals. Golden: ref/t2i_adapter/components (diffusers 0.27.2).
// Suites: T2IAdapterUnit (config, conversion tables), T2IAdapterTiny (random adapters and UNets),
// T2IAdapterGolden (golden).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/t2i_adapter_names.h"
#include "io/torch_pickle.h"
#include "loaders/t2i_adapter_loader.h"
#include "models/t2i_adapter.h"
#include "models/unet_2d_condition.h"
#include "test_util.h"

using namespace dmx;
using models::T2IAdapter;
using models::T2IAdapterConfig;
using nlohmann::json;

namespace {
constexpr double kTol = 1e-5;

template <typename E>
void expect_throw_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception mentioning '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type for '" << needle << "': " << e.what();
  }
}

std::string adapter_dir(const std::string& name) { return test::fixture_model("t2i_adapter") + "/" + name; }

// The control picture as the pipeline feeds it: u8 / 255 in float32, [1, C, H, W].
at::Tensor picture(const at::Tensor& u8) {
  at::Tensor x = u8.to(at::kFloat) / 255.0;
  return u8.dim() == 2 ? x.unsqueeze(0).unsqueeze(0) : x.permute({2, 0, 1}).unsqueeze(0).contiguous();
}

// diffusers names -> TencentARC's, written out here independently of the conversion tables (the inverse of
// diffusers' scripts/convert_original_t2i_adapter.py).
io::TensorMap to_original(const io::TensorMap& diffusers, bool light, int nrb) {
  io::TensorMap out;
  for (const auto& [name, t] : diffusers) {
    std::vector<std::string> p;
    size_t start = 0, dot;
    while ((dot = name.find('.', start)) != std::string::npos) {
      p.push_back(name.substr(start, dot - start));
      start = dot + 1;
    }
    p.push_back(name.substr(start));
    EXPECT_EQ(p[0], "adapter") << name;
    std::string key;
    if (p[1] == "conv_in") {
      key = "conv_in." + p[2];
    } else {
      const int k = std::stoi(p[2]);
      if (p[3] == "resnets") {
        const int j = std::stoi(p[4]);
        key = light ? "body." + p[2] + ".body." + p[4] + "." + p[5] + "." + p[6]
                    : "body." + std::to_string(k * nrb + j) + "." + p[5] + "." + p[6];
      } else {  // in_conv / out_conv
        key = light ? "body." + p[2] + "." + p[3] + "." + p[4]
                    : "body." + std::to_string(k * nrb) + "." + p[3] + "." + p[4];
      }
    }
    out[key] = t;
  }
  return out;
}
}  // namespace

// ------------------------------------------------------------------------------------------------------
TEST(T2IAdapterUnit, ConfigFromJsonAndItsRules) {
  auto c = T2IAdapterConfig::from_json({{"in_channels", 1},
                                        {"channels", {320, 640, 1280, 1280}},
                                        {"num_res_blocks", 2},
                                        {"downscale_factor", 8},
                                        {"adapter_type", "full_adapter"}});
  EXPECT_EQ(c.num_features(), 4u);
  EXPECT_EQ(c.total_downscale_factor(), 64);
  EXPECT_EQ(T2IAdapterConfig::sd14_color().num_features(), 4u);
  EXPECT_EQ(T2IAdapterConfig::sd14_color().total_downscale_factor(), 64);
  auto xl = T2IAdapterConfig::from_json({{"adapter_type", "full_adapter_xl"}, {"downscale_factor", 16}});
  EXPECT_EQ(xl.total_downscale_factor(), 32);
  expect_throw_with<Unsupported>(
      [] {
        T2IAdapterConfig::from_json({{"adapter_type", "coadapter"}});
      },
      "adapter_type 'coadapter'");
  expect_throw_with<FormatError>([] { T2IAdapterConfig::from_json({{"channels", json::array()}}); }, "channels");
  expect_throw_with<FormatError>([] { T2IAdapterConfig::from_json({{"in_channels", "rgb"}}); }, "in_channels");
  expect_throw_with<FormatError>(
      [] {
        T2IAdapterConfig::from_json({{"num_res_blocks", 0}});
      },
      "num_res_blocks must be in [1, 64]");
  // FullAdapterXL's blocks after the third read the block before them at their own width.
  expect_throw_with<FormatError>(
      [] {
        T2IAdapterConfig::from_json({{"adapter_type", "full_adapter_xl"}, {"channels", {8, 16, 32, 64}}});
      },
      "channels[3] must equal channels[2] for full_adapter_xl");
  // The parameter count is diffusers' (sum of T2IAdapter(...).parameters() numel for these configs).
  T2IAdapterConfig tiny;
  tiny.in_channels = 1;
  tiny.channels = {8, 16, 16};
  EXPECT_DOUBLE_EQ(tiny.num_parameters(), 64 * 8 * 9 + 8 + 16 * 8 + 16 + 2 * (8 * 8 * 9 + 8 + 8 * 8 + 8) +
                                              4 * (16 * 16 * 9 + 16 + 16 * 16 + 16));
}

// A config that describes far more than its weights hold is refused before the model is built (it would
// otherwise allocate without bound), naming both counts.
TEST(T2IAdapterUnit, ConfigLargerThanItsWeightsIsRefusedBeforeBuilding) {
  const io::TensorMap one{{"adapter.body.0.resnets.0.block1.weight", at::zeros({1})}};
  const json huge = {{"in_channels", 64}, {"channels", {16384, 16384, 16384, 16384}}, {"downscale_factor", 64}};
  expect_throw_with<FormatError>([&] { loaders::t2i_adapter_from_state_dict(one, "hostile", huge); },
                                 "parameters, but the weights hold 1");
  expect_throw_with<FormatError>(
      [&] {
        loaders::t2i_adapter_from_state_dict(one, "bad", {{"channels", "many"}});
      },
      "bad: T2IAdapter config");
}

// Every layer of diffusers' T2IAdapter, by name and shape, for the three types (keys as T2IAdapter.state_dict()
// lists them for these configs; XL: blocks 0 and 1 keep the resolution, block 2 halves it).
TEST(T2IAdapterTiny, KeyNamesShapesAndFeatureSizes) {
  at::NoGradGuard no_grad;
  T2IAdapterConfig full;
  full.in_channels = 1;
  full.channels = {8, 16, 16};
  T2IAdapter a(full);
  const io::TensorMap sd = io::module_state(*a);
  EXPECT_EQ(sd.at("adapter.conv_in.weight").sizes(), (std::vector<int64_t>{8, 64, 3, 3}));
  EXPECT_EQ(sd.at("adapter.body.1.in_conv.weight").sizes(), (std::vector<int64_t>{16, 8, 1, 1}));
  EXPECT_FALSE(sd.count("adapter.body.2.in_conv.weight"));  // same width: no in_conv
  EXPECT_EQ(sd.at("adapter.body.2.resnets.1.block2.weight").sizes(), (std::vector<int64_t>{16, 16, 1, 1}));
  EXPECT_EQ(sd.size(), 2u + 2u + 3u * 2u * 4u);
  auto f = a->forward(at::rand({2, 1, 40, 24}));
  ASSERT_EQ(f.size(), 3u);
  EXPECT_EQ(f[0].sizes(), (std::vector<int64_t>{2, 8, 5, 3}));
  EXPECT_EQ(f[1].sizes(), (std::vector<int64_t>{2, 16, 3, 2}));  // AvgPool2d(2, ceil_mode=True)
  EXPECT_EQ(f[2].sizes(), (std::vector<int64_t>{2, 16, 2, 1}));

  T2IAdapterConfig light = full;
  light.adapter_type = "light_adapter";
  light.in_channels = 3;
  light.num_res_blocks = 4;
  T2IAdapter l(light);
  const io::TensorMap sl = io::module_state(*l);
  EXPECT_FALSE(sl.count("adapter.conv_in.weight"));
  EXPECT_EQ(sl.at("adapter.body.0.in_conv.weight").sizes(), (std::vector<int64_t>{2, 192, 1, 1}));
  EXPECT_EQ(sl.at("adapter.body.3.out_conv.weight").sizes(), (std::vector<int64_t>{16, 4, 1, 1}));
  EXPECT_EQ(sl.at("adapter.body.3.resnets.3.block2.weight").sizes(), (std::vector<int64_t>{4, 4, 3, 3}));
  EXPECT_EQ(l->forward(at::rand({1, 3, 64, 64})).size(), 4u);

  T2IAdapterConfig xl = full;
  xl.adapter_type = "full_adapter_xl";
  xl.channels = {8, 16, 32, 32};
  xl.downscale_factor = 16;
  T2IAdapter x(xl);
  auto fx = x->forward(at::rand({1, 1, 64, 64}));
  ASSERT_EQ(fx.size(), 4u);
  EXPECT_EQ(fx[0].sizes(), (std::vector<int64_t>{1, 8, 4, 4}));
  EXPECT_EQ(fx[1].sizes(), (std::vector<int64_t>{1, 16, 4, 4}));
  EXPECT_EQ(fx[2].sizes(), (std::vector<int64_t>{1, 32, 2, 2}));
  EXPECT_EQ(fx[3].sizes(), (std::vector<int64_t>{1, 32, 2, 2}));

  expect_throw_with<InvalidArgument>([&] { a->forward(at::rand({1, 3, 64, 64})); }, "must be [B, 1, H, W]");
  expect_throw_with<InvalidArgument>([&] { a->forward(at::rand({1, 1, 60, 64})); }, "multiples of downscale_factor 8");
}

// The UNet's intrablock residuals: zero features change nothing; a feature of the wrong shape, or one no block
// takes, is an error naming its index.
TEST(T2IAdapterTiny, UNetIntrablockResidualsAreCheckedAndConsumed) {
  at::NoGradGuard no_grad;
  at::manual_seed(3);
  models::UNet2DConditionConfig c;
  c.block_out_channels = {32, 64};
  c.down_block_types = {"CrossAttnDownBlock2D", "DownBlock2D"};
  c.up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D"};
  c.attention_head_dim = {8, 8};
  c.layers_per_block = 1;
  c.cross_attention_dim = 16;
  c.norm_num_groups = 8;
  models::UNet2DConditionModel unet(c);
  unet->eval();
  models::UNetInputs in;
  in.sample = at::randn({2, 4, 8, 8});
  in.timestep = at::tensor({3.0f, 400.0f});
  in.encoder_hidden_states = at::randn({2, 5, 16});
  const at::Tensor plain = unet->forward(in);
  in.down_intrablock_additional_residuals = {at::zeros({2, 32, 8, 8}), at::zeros({1, 64, 4, 4})};
  DMX_EXPECT_CLOSE("zero adapter features", unet->forward(in), plain, 0.0);
  in.down_intrablock_additional_residuals = {at::randn({2, 32, 8, 8}), at::randn({1, 64, 4, 4})};
  EXPECT_GT((unet->forward(in) - plain).abs().max().item<double>(), 1e-4);
  in.down_intrablock_additional_residuals = {at::zeros({2, 32, 4, 4})};
  expect_throw_with<InvalidArgument>([&] { unet->forward(in); }, "down_intrablock_additional_residuals[0] must match");
  in.down_intrablock_additional_residuals = {at::zeros({2, 32, 8, 8}), at::zeros({2, 64, 4, 4}),
                                             at::zeros({2, 64, 2, 2})};
  expect_throw_with<InvalidArgument>([&] { unet->forward(in); }, "3 features given, but only 2 fit");
  // A leftover of the mid block's shape is taken there (diffusers' T2I-Adapter-XL rule).
  in.down_intrablock_additional_residuals = {at::zeros({2, 32, 8, 8}), at::zeros({2, 64, 4, 4}),
                                             at::zeros({2, 64, 4, 4})};
  DMX_EXPECT_CLOSE("zero features incl. mid", unet->forward(in), plain, 0.0);
  in.down_intrablock_additional_residuals = {at::zeros({2, 32, 8, 8}), at::zeros({2, 64, 4, 4}), at::Tensor()};
  expect_throw_with<InvalidArgument>([&] { unet->forward(in); }, "feature 2 is undefined");

  // Features are added in the UNet's dtype: float64 features on a float32 UNet keep it float32 throughout (a
  // promoted sum would reach the next convolution as float64, which has float32 weights).
  const std::vector<at::Tensor> features{at::randn({2, 32, 8, 8}), at::randn({1, 64, 4, 4})};
  in.down_intrablock_additional_residuals = features;
  const at::Tensor out32 = unet->forward(in);
  in.down_intrablock_additional_residuals = {features[0].to(at::kDouble), features[1].to(at::kDouble)};
  const at::Tensor out64 = unet->forward(in);
  EXPECT_EQ(out64.scalar_type(), at::kFloat);
  DMX_EXPECT_CLOSE("float64 features on a float32 UNet", out64, out32, 0.0);
}

// ------------------------------------------------------------------------------------------------------
// TencentARC's names convert to diffusers' names by the tables, for a full and a light adapter; the tensors
// come out unchanged, and the variants diffusers cannot express are refused by name.
TEST(T2IAdapterGolden, OriginalLayoutConvertsToTheDiffusersWeights) {
  DMX_REQUIRE_FIXTURES();
  for (const std::string name : {"sketch", "color"}) {
    const bool light = name == "color";
    const json cfg = io::load_json_file(adapter_dir(name) + "/config.json", "adapter config");
    const io::TensorMap diffusers = io::load_safetensors(adapter_dir(name) + "/diffusion_pytorch_model.safetensors");
    const io::TensorMap original = to_original(diffusers, light, cfg["num_res_blocks"].get<int>());
    ASSERT_EQ(io::t2i_adapter_layout(original),
              light ? io::T2IAdapterLayout::OriginalLight : io::T2IAdapterLayout::OriginalFull);
    const json detected = io::detect_original_t2i_adapter_config(original);
    for (const char* f : {"in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type"})
      EXPECT_EQ(detected[f], cfg[f]) << name << " " << f;
    const io::TensorMap back = io::convert_original_t2i_adapter(original, detected);
    ASSERT_EQ(back.size(), diffusers.size()) << name;
    for (const auto& [k, t] : diffusers) {
      ASSERT_TRUE(back.count(k)) << name << ": " << k;
      EXPECT_TRUE(back.at(k).equal(t)) << k;
    }
    // The same through the loader's seam (a state dict from any source).
    at::NoGradGuard no_grad;
    T2IAdapter from_original = loaders::t2i_adapter_from_state_dict(original, name + " (original)");
    T2IAdapter from_folder = loaders::load_t2i_adapter(adapter_dir(name));
    const at::Tensor x = at::rand({1, cfg["in_channels"].get<int64_t>(), 64, 64});
    auto fa = from_original->forward(x), fb = from_folder->forward(x);
    for (size_t k = 0; k < fa.size(); ++k) EXPECT_TRUE(fa[k].equal(fb[k])) << name << " feature " << k;
  }

  const io::TensorMap sketch =
      to_original(io::load_safetensors(adapter_dir("sketch") + "/diffusion_pytorch_model.safetensors"), false, 2);
  io::TensorMap skep = sketch;
  skep["body.2.skep.weight"] = at::zeros({64, 32, 1, 1});
  expect_throw_with<Unsupported>([&] { io::detect_original_t2i_adapter_config(skep); }, "skep");
  io::TensorMap conv_down = sketch;
  conv_down["body.2.down_opt.op.weight"] = at::zeros({32, 32, 3, 3});
  expect_throw_with<Unsupported>([&] { io::detect_original_t2i_adapter_config(conv_down); }, "down_opt");
  io::TensorMap junk = sketch;
  junk["body.3.extra.weight"] = at::zeros({1});
  const json cfg = io::detect_original_t2i_adapter_config(sketch);
  expect_throw_with<FormatError>([&] { io::convert_original_t2i_adapter(junk, cfg); }, "body.3.extra.weight");
  // 8 blocks read as levels of 3: not a whole number of levels.
  expect_throw_with<FormatError>([&] { io::detect_original_t2i_adapter_config(sketch, 3); },
                                 "8 body blocks are not levels of 3");
  expect_throw_with<FormatError>(
      [&] {
        loaders::t2i_adapter_from_state_dict({{"foo.weight", at::zeros({1})}}, "x");
      },
      "not a T2I-Adapter");
  expect_throw_with<InvalidArgument>([&] { loaders::load_t2i_adapter(adapter_dir("sketch") + "/config.json"); },
                                     "neither a diffusers T2IAdapter folder nor");
  const std::string pth = test::temp_dir() + "/t2iadapter_sketch_sd15v2.pth";
  { std::ofstream(pth) << "not a pickle"; }
  expect_throw_with<FormatError>([&] { loaders::load_t2i_adapter(pth); }, "not a torch.save file");
}

// TencentARC's own .pth files (tests/data/t2i_adapter, made by make_original.py with TencentARC's Adapter and
// Adapter_light classes as their get_adapters builds the released adapters): read by the weights-only torch.save
// reader (the zip format and the legacy one), the config detected from the shapes, the names converted; the
// features equal what TencentARC's own forward computed.
TEST(T2IAdapterTiny, TencentARCPthFilesGiveTheOriginalCodesFeatures) {
  at::NoGradGuard no_grad;
  const std::string dir = std::string(DMX_SOURCE_DIR) + "/tests/data/t2i_adapter";
  const io::TensorMap ref = io::load_safetensors(dir + "/original_adapters.safetensors");
  struct Case {
    std::string name, type;
    int in_channels;
    std::vector<int> channels;
    int num_res_blocks;
  };
  double worst = 0;
  for (const Case& c : {Case{"full_sketch", "full_adapter", 1, {8, 16, 16, 16}, 2},
                        Case{"light_color", "light_adapter", 3, {8, 16, 16}, 4}}) {
    const std::string path = dir + "/" + c.name + ".pth";
    T2IAdapter a = loaders::load_t2i_adapter(path);
    EXPECT_EQ(a->config().adapter_type, c.type);
    EXPECT_EQ(a->config().in_channels, c.in_channels);
    EXPECT_EQ(a->config().channels, c.channels);
    EXPECT_EQ(a->config().num_res_blocks, c.num_res_blocks);
    EXPECT_EQ(a->config().downscale_factor, 8);
    const std::vector<at::Tensor> f = a->forward(ref.at("x." + c.name));
    ASSERT_EQ(f.size(), 4u) << c.name;
    for (size_t k = 0; k < f.size(); ++k) {
      const std::string key = c.name + ".feature." + std::to_string(k);
      worst = std::max(worst, test::check_close("t2i original " + key, f[k], ref.at(key), kTol));
    }
    // The same keys with TencentARC's training prefix "adapter." (their loader drops it).
    io::TensorMap prefixed;
    for (const auto& [k, t] : io::torch_state_dict(*io::load_torch_file(path))) prefixed.emplace("adapter." + k, t);
    T2IAdapter b = loaders::t2i_adapter_from_state_dict(prefixed, c.name + " (prefixed)");
    EXPECT_TRUE(b->forward(ref.at("x." + c.name)).back().equal(f.back())) << c.name;
  }
  EXPECT_LE(worst, kTol);
}

// Features of each adapter, the MultiAdapter sums (weights 0.6 / 0.4 and the 1/N default), and the UNet with
// the multi features as intrablock residuals, against diffusers.
TEST(T2IAdapterGolden, FeaturesMultiAdapterAndUNetMatchDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const test::RefCase ref = test::load_ref("t2i_adapter", "components");
  std::vector<T2IAdapter> adapters{loaders::load_t2i_adapter(adapter_dir("sketch")),
                                   loaders::load_t2i_adapter(adapter_dir("color"))};
  EXPECT_EQ(adapters[0]->config().to_json()["adapter_type"], ref.meta.at("sketch.config").at("adapter_type"));
  const std::vector<at::Tensor> xs{picture(ref["sketch.image_u8"]), picture(ref["color.image_u8"])};
  ASSERT_EQ(xs[0].sizes(), (std::vector<int64_t>{1, 1, 64, 64}));
  double worst = 0;
  auto check = [&](const std::string& what, const at::Tensor& got, const at::Tensor& want) {
    worst = std::max(worst, test::check_close(what, got, want, kTol));
  };
  const char* names[] = {"sketch", "color"};
  for (size_t i = 0; i < 2; ++i) {
    auto f = adapters[i]->forward(xs[i]);
    ASSERT_EQ(f.size(), 4u);
    for (size_t k = 0; k < f.size(); ++k) {
      const std::string key = std::string(names[i]) + ".feature." + std::to_string(k);
      check("t2i " + key, f[k], ref[key]);
    }
  }
  const auto weights = ref.meta.at("multi_weights").get<std::vector<double>>();
  auto multi = models::multi_adapter_features(adapters, xs, weights);
  auto multi_default = models::multi_adapter_features(adapters, xs);
  for (size_t k = 0; k < multi.size(); ++k) {
    check("t2i multi.feature." + std::to_string(k), multi[k], ref["multi.feature." + std::to_string(k)]);
    check("t2i multi_default_weights.feature." + std::to_string(k), multi_default[k],
          ref["multi_default_weights.feature." + std::to_string(k)]);
  }

  models::UNet2DConditionModel unet(models::UNet2DConditionConfig::from_json(
      io::load_json_file(test::fixture_model("sd15") + "/unet/config.json", "unet config")));
  io::load_state_dict(*unet, io::load_diffusers_component(test::fixture_model("sd15"), "unet"), "unet");
  unet->eval();
  models::UNetInputs in;
  in.sample = ref["unet.latents"];
  in.timestep = at::scalar_tensor(500, at::kLong);
  in.encoder_hidden_states = ref["unet.prompt_embeds"];
  check("t2i unet.out_no_adapter", unet->forward(in), ref["unet.out_no_adapter"]);
  for (const auto& f : multi) in.down_intrablock_additional_residuals.push_back(at::cat({f, f}));  // both halves
  check("t2i unet.out", unet->forward(in), ref["unet.out"]);
  EXPECT_LE(worst, kTol) << "worst relative error over the t2i_adapter components";
}
