// AUTOMATIC1111 hypernetworks: the module built from A1111's fields (layer_structure, activation names with
// "swish" = Hardswish, is_layer_norm, activate_output, dropout structure, old linear1/linear2 keys), loading A1111's
// .pt (weights-only torch.save reader), its .safetensors copy and the flattened form, refusing malformed dicts, and
// the attention seam's input hook applying them to
// the keys and values of every attention whose context width matches. Golden: ref/hypernet/components.
// Suites: HypernetworkUnit (fields, modules, malformed files), HypernetworkGolden (golden).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_pickle.h"
#include "loaders/hypernetwork_loader.h"
#include "models/hypernetwork.h"
#include "models/unet_2d_condition.h"
#include "nn/attention_seam.h"
#include "test_util.h"

using namespace dmx;
using models::Hypernetwork;
using models::HypernetworkConfig;
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

std::string hn_path(const std::string& ext) { return test::fixture_model("hypernet") + "/tiny_hypernet" + ext; }

models::HypernetworkModule module(int64_t dim, const json& fields) {
  return models::HypernetworkModule(dim, HypernetworkConfig::from_json(fields));
}
}  // namespace

// ------------------------------------------------------------------------------------------------------
TEST(HypernetworkUnit, FieldsAndDefaultsAsA1111LoadsThem) {
  // Missing keys: layer_structure [1, 2, 1], activation None, no layer norm, activate_output True.
  HypernetworkConfig d = HypernetworkConfig::from_json(json::object());
  EXPECT_EQ(d.layer_structure, (std::vector<double>{1, 2, 1}));
  EXPECT_TRUE(d.activation_func.empty());
  EXPECT_FALSE(d.is_layer_norm);
  EXPECT_TRUE(d.activate_output);
  EXPECT_EQ(d.effective_dropout_structure(), (std::vector<double>{0, 0, 0}));
  // parse_dropout_structure (A1111's comment: [1, 2, 2, 1] -> [0, 0.3, 0, 0], with last_layer_dropout
  // [0, 0.3, 0.3, 0]).
  json f = {{"layer_structure", {1, 2, 2, 1}}, {"use_dropout", true}};
  EXPECT_EQ(HypernetworkConfig::from_json(f).effective_dropout_structure(), (std::vector<double>{0, 0.3, 0, 0}));
  f["last_layer_dropout"] = true;
  EXPECT_EQ(HypernetworkConfig::from_json(f).effective_dropout_structure(), (std::vector<double>{0, 0.3, 0.3, 0}));
  // A stored dropout_structure wins, and any non-zero entry turns use_dropout on.
  f["dropout_structure"] = {0, 0, 0.1, 0};
  f["use_dropout"] = false;
  const HypernetworkConfig s = HypernetworkConfig::from_json(f);
  EXPECT_TRUE(s.use_dropout);
  EXPECT_EQ(s.effective_dropout_structure(), (std::vector<double>{0, 0, 0.1, 0}));

  expect_throw_with<FormatError>(
      [] {
        HypernetworkConfig::from_json({{"layer_structure", {2, 1}}});
      },
      "must start and end with 1");
  expect_throw_with<FormatError>(
      [] {
        HypernetworkConfig::from_json({{"layer_structure", "1,2,1"}});
      },
      "layer_structure");
  expect_throw_with<FormatError>([] { HypernetworkConfig::from_json({{"is_layer_norm", "yes"}}); }, "is_layer_norm");
  expect_throw_with<FormatError>(
      [] {
        HypernetworkConfig::from_json({{"layer_structure", {1, 2, 1}}, {"dropout_structure", {0, 1.5, 0}}});
      },
      "dropout_structure entries must be in [0, 1)");
}

// The Sequential's indices (activations and dropouts take one without parameters), the activation choice
// (none after the last Linear unless activate_output; "swish" is Hardswish), int(dim * ratio) widths.
TEST(HypernetworkUnit, ModulesAreBuiltWithA1111sIndices) {
  auto m = module(32, {{"layer_structure", {1, 2, 1}},
                       {"activation_func", "swish"},
                       {"is_layer_norm", true},
                       {"activate_output", false},
                       {"dropout_structure", {0, 0.3, 0}}});
  EXPECT_EQ(m->layer_kinds(),
            (std::vector<std::string>{"Linear", "Hardswish", "LayerNorm", "Dropout", "Linear", "LayerNorm"}));
  std::vector<std::string> keys;
  for (const auto& kv : io::module_state(*m)) keys.push_back(kv.first);
  EXPECT_EQ(keys, (std::vector<std::string>{"linear.0.bias", "linear.0.weight", "linear.2.bias", "linear.2.weight",
                                            "linear.4.bias", "linear.4.weight", "linear.5.bias", "linear.5.weight"}));
  auto relu_out = module(10, {{"layer_structure", {1, 1.55, 1}}, {"activation_func", "relu"}});
  EXPECT_EQ(relu_out->layer_kinds(), (std::vector<std::string>{"Linear", "ReLU", "Linear", "ReLU"}));
  EXPECT_EQ(io::module_state(*relu_out).at("linear.0.weight").size(0), 15);  // int(10 * 1.55)
  auto lin = module(8, {{"activation_func", "linear"}});
  EXPECT_EQ(lin->layer_kinds(), (std::vector<std::string>{"Linear", "Linear"}));
  auto prelu = module(8, {{"activation_func", "prelu"}});
  EXPECT_TRUE(io::module_state(*prelu).count("linear.1.weight"));  // PReLU's slope
  expect_throw_with<Unsupported>([] { module(8, {{"activation_func", "softmax"}}); }, "activation_func 'softmax'");
  // An unknown name that no layer uses is not an error (A1111 checks it only where it builds one).
  EXPECT_NO_THROW(module(8, {{"activation_func", "softmax"}, {"layer_structure", {1, 1}}, {"activate_output", false}}));

  // forward = x + mlp(x) * multiplier, mlp computed by hand.
  at::NoGradGuard no_grad;
  at::manual_seed(0);
  const io::TensorMap sd = io::module_state(*relu_out);
  const at::Tensor x = at::randn({2, 3, 10});
  at::Tensor h = at::relu(at::linear(x, sd.at("linear.0.weight"), sd.at("linear.0.bias")));
  h = at::relu(at::linear(h, sd.at("linear.2.weight"), sd.at("linear.2.bias")));
  DMX_EXPECT_CLOSE("module forward", relu_out->forward(x, 0.7), x + h * 0.7, 1e-6);
}

// Old NovelAI files (linear1 / linear2) and the names of a flattened torch.save ("<dim>.0" / "<dim>.1").
TEST(HypernetworkUnit, OldKeysAndFlattenedPtNames) {
  at::manual_seed(1);
  io::TensorMap t;
  for (const char* kv : {"k", "v"}) {
    t[std::string("16.") + kv + ".linear1.weight"] = at::randn({32, 16});
    t[std::string("16.") + kv + ".linear1.bias"] = at::randn({32});
    t[std::string("16.") + kv + ".linear2.weight"] = at::randn({16, 32});
    t[std::string("16.") + kv + ".linear2.bias"] = at::randn({16});
  }
  Hypernetwork hn = loaders::hypernetwork_from_flat(t, {}, "old", "old");  // no fields: A1111's defaults
  const io::TensorMap sd = io::module_state(*hn);
  EXPECT_TRUE(sd.at("16.k.linear.1.weight").equal(t.at("16.k.linear2.weight")));
  EXPECT_EQ(hn->config().name, "old");

  io::TensorMap flat;
  for (const auto& [k, v] : sd) flat[k.substr(0, 3) + (k[3] == 'k' ? "0" : "1") + k.substr(4)] = v;
  Hypernetwork again = loaders::hypernetwork_from_flat(flat, {{"name", "\"again\""}}, "flat", "x");
  EXPECT_EQ(again->config().name, "again");
  for (const auto& [k, v] : io::module_state(*again)) EXPECT_TRUE(v.equal(sd.at(k))) << k;

  expect_throw_with<FormatError>(
      [&] {
        loaders::hypernetwork_from_flat({{"16.q.linear.0.weight", at::zeros({1})}}, {}, "f", "f");
      },
      "16.q.linear.0.weight");
  io::TensorMap missing = t;
  missing.erase("16.v.linear2.bias");
  expect_throw_with<FormatError>([&] { loaders::hypernetwork_from_flat(missing, {}, "f", "f"); }, "16.v.linear.1.bias");
  expect_throw_with<FormatError>(
      [&] {
        loaders::hypernetwork_from_flat(t, {{"layer_structure", "[1, 2"}}, "f", "f");
      },
      "field 'layer_structure' is not JSON");
  // A width or layer_structure describing far more than the file holds is refused before any module is built.
  expect_throw_with<FormatError>(
      [&] {
        loaders::hypernetwork_from_flat({{"999999.k.linear.0.weight", at::zeros({1})}}, {}, "wide", "f");
      },
      "wide: layer_structure [1.0,2.0,1.0] at widths [999999] describes 7999990000002 parameters, but the file "
      "holds 1");
  expect_throw_with<FormatError>(
      [&] {
        loaders::hypernetwork_from_flat({{"64.k.linear.0.weight", at::zeros({1})}},
                                        {{"layer_structure", "[1, 64, 64, 1]"}}, "deep", "f");
      },
      "deep: layer_structure [1.0,64.0,64.0,1.0] at widths [64] describes 34619520 parameters, but the file holds 1");
}

// Two hooks chain as A1111's apply_hypernetworks: each takes the previous one's key / value inputs, chosen by
// their width; other widths pass through.
TEST(HypernetworkUnit, HooksChainInOrder) {
  at::NoGradGuard no_grad;
  at::manual_seed(2);
  auto make = [](int64_t w) {
    Hypernetwork h(HypernetworkConfig::from_json({{"activation_func", "tanh"}}), std::vector<int64_t>{w});
    for (auto& p : h->parameters()) p.normal_(0, 0.3);
    return h;
  };
  Hypernetwork a = make(12), b = make(12), other = make(20);
  nn::AttentionSeam seam;
  seam.input_hooks = {std::make_shared<models::HypernetworkHook>(a, 0.8),
                      std::make_shared<models::HypernetworkHook>(other, 1.0),
                      std::make_shared<models::HypernetworkHook>(b, 0.5)};
  const at::Tensor c = at::randn({2, 7, 12});
  const nn::KeyValueInputs kv = nn::apply_input_hooks(nn::AttentionSite{}, &seam, c);
  DMX_EXPECT_CLOSE("chained k", kv.key, b->k(12)->forward(a->k(12)->forward(c, 0.8), 0.5), 0.0);
  DMX_EXPECT_CLOSE("chained v", kv.value, b->v(12)->forward(a->v(12)->forward(c, 0.8), 0.5), 0.0);
  const at::Tensor c9 = at::randn({1, 3, 9});
  EXPECT_TRUE(nn::apply_input_hooks(nn::AttentionSite{}, &seam, c9).key.equal(c9));
}

// ------------------------------------------------------------------------------------------------------
// A1111's own .pt (read by the weights-only torch.save reader: BINFLOAT lists, OrderedDict state dicts with
// _metadata) and its .safetensors copy give the same modules, and both match the reference: each module at
// multipliers 1.0 and 0.8, and the UNet with the hypernetwork in every attention layer (then gone with the scope).
TEST(HypernetworkGolden, ModulesAndUNetMatchA1111OnDiffusers) {
  DMX_REQUIRE_FIXTURES();
  at::NoGradGuard no_grad;
  const test::RefCase ref = test::load_ref("hypernet", "components");
  models::UNet2DConditionModel unet(models::UNet2DConditionConfig::from_json(
      io::load_json_file(test::fixture_model("sd15") + "/unet/config.json", "unet config")));
  io::load_state_dict(*unet, io::load_diffusers_component(test::fixture_model("sd15"), "unet"), "unet");
  unet->eval();
  // Which module pair each attention layer takes: the width its keys read (the reference lists them).
  const io::TensorMap sd = io::module_state(*unet);
  for (const auto& [path, kind_width] : ref.meta.at("attention_layers").items()) {
    EXPECT_EQ(sd.at(path + ".to_k.weight").size(1), kind_width[1].get<int64_t>()) << path;
  }
  models::UNetInputs in;
  in.sample = ref["unet.latents"];
  in.timestep = at::scalar_tensor(500, at::kLong);
  in.encoder_hidden_states = ref["unet.prompt_embeds"];

  double worst = 0;
  for (const std::string ext : {".pt", ".safetensors"}) {
    Hypernetwork hn = loaders::load_hypernetwork(hn_path(ext));
    EXPECT_EQ(hn->widths(), (std::vector<int64_t>{32, 64})) << ext;
    EXPECT_EQ(hn->config().name, "tiny_hypernet") << ext;
    EXPECT_EQ(hn->config().activation_func, "swish") << ext;
    EXPECT_EQ(hn->config().step, 1000) << ext;
    EXPECT_EQ(hn->config().dropout_structure, (std::vector<double>{0.0, 0.3, 0.0})) << ext;
    for (const std::string w : {"32", "64"})
      EXPECT_EQ(json(hn->k(std::stoll(w))->layer_kinds()), ref.meta.at("sequential").at(w)) << w << ext;
    for (const std::string w : {"32", "64"}) {
      const int64_t dim = std::stoll(w);
      for (const std::string m : {"1.0", "0.8"}) {
        const double mult = std::stod(m);
        const std::string tag = "hypernet" + ext + " ";
        worst = std::max(worst, test::check_close(tag + "k." + w + ".m" + m, hn->k(dim)->forward(ref["x." + w], mult),
                                                  ref["k." + w + ".m" + m], kTol));
        worst = std::max(worst, test::check_close(tag + "v." + w + ".m" + m, hn->v(dim)->forward(ref["x." + w], mult),
                                                  ref["v." + w + ".m" + m], kTol));
      }
    }
    {
      models::ScopedHypernetworks scope(*unet, {{hn, 0.8}});
      worst = std::max(
          worst, test::check_close("hypernet" + ext + " unet.out.m0.8", unet->forward(in), ref["unet.out.m0.8"], kTol));
    }
    // Gone with the scope.
    worst = std::max(
        worst, test::check_close("hypernet" + ext + " unet.out.none", unet->forward(in), ref["unet.out.none"], kTol));
  }
  EXPECT_LE(worst, kTol) << "worst relative error over the hypernet components";
}

// The .pt and its .safetensors copy hold the same tensors and fields; the flattened form (what `dmx convert`
// makes of a .pt: "<dim>.0/1" tensors, the fields as JSON text) loads through the same seam.
TEST(HypernetworkGolden, PtSafetensorsAndFlattenedFormAgree) {
  DMX_REQUIRE_FIXTURES();
  auto f = io::SafeTensorsFile::open(hn_path(".safetensors"));
  io::TensorMap flat;
  for (const auto& name : f->names()) {
    std::string n = name;
    const size_t dot = n.find('.');
    n[dot + 1] = n[dot + 1] == 'k' ? '0' : '1';
    flat[n] = f->get(name);
  }
  std::map<std::string, std::string> fields = f->metadata();
  fields.erase("format");
  Hypernetwork a = loaders::hypernetwork_from_flat(flat, fields, "flattened .pt", "x");
  Hypernetwork b = loaders::load_hypernetwork(hn_path(".safetensors"));
  Hypernetwork c = loaders::load_hypernetwork(hn_path(".pt"));
  const io::TensorMap sa = io::module_state(*a), sb = io::module_state(*b), sc = io::module_state(*c);
  ASSERT_EQ(sa.size(), sb.size());
  ASSERT_EQ(sc.size(), sb.size());
  for (const auto& [k, v] : sb) {
    EXPECT_TRUE(sa.at(k).equal(v)) << k;
    EXPECT_TRUE(sc.at(k).equal(v)) << k;
  }
  EXPECT_EQ(a->config().dropout_structure, b->config().dropout_structure);
  EXPECT_EQ(c->config().layer_structure, b->config().layer_structure);
  EXPECT_EQ(c->config().is_layer_norm, b->config().is_layer_norm);
  EXPECT_EQ(c->config().activate_output, b->config().activate_output);
  EXPECT_EQ(c->config().sd_checkpoint_name, "sd15");
}

// Malformed and hostile A1111 dicts (bare pickles through the weights-only machine) are FormatErrors naming the
// value; files that are not torch.save files are refused before anything is parsed.
TEST(HypernetworkUnit, MalformedPickledDictsNameTheValue) {
  auto load = [](const std::string& bytes) {
    auto file = io::parse_bare_pickle(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "evil.pt");
    return loaders::hypernetwork_from_torch_file(*file, "evil");
  };
  const std::string proto = std::string("\x80\x02", 2);
  auto s = [](std::initializer_list<int> b) {
    std::string out;
    for (int c : b) out.push_back(static_cast<char>(c));
    return out;
  };
  // [] : not a dict
  expect_throw_with<FormatError>([&] { load(proto + "]."); }, "must be an A1111 hypernetwork dict");
  // {32: 'x'}
  expect_throw_with<FormatError>(
      [&] {
        load(proto + "}K " + s({'X', 1, 0, 0, 0}) + "xs.");
      },
      "must be a pair (k state dict, v state dict), got a str");
  // {32: ({}, 5)}
  expect_throw_with<FormatError>(
      [&] {
        load(proto + "}K }K" + s({5, 0x86}) + "s.");
      },
      "must be a state dict, got an int");
  // {-1: ({}, {})}
  expect_throw_with<FormatError>(
      [&] {
        load(proto + "}J" + s({0xff, 0xff, 0xff, 0xff}) + "}}" + s({0x86}) + "s.");
      },
      "module width must be > 0, got -1");
  // {32: ({'linear.0.weight': 3}, {})}
  expect_throw_with<FormatError>(
      [&] {
        load(proto + "}K }X" + s({15, 0, 0, 0}) + "linear.0.weight" + "K" + s({3}) + "s}" + s({0x86}) + "s.");
      },
      "must be a tensor");
  // {'layer_structure': 'abc'}
  expect_throw_with<FormatError>(
      [&] {
        load(proto + "}X" + s({15, 0, 0, 0}) + "layer_structure" + "X" + s({3, 0, 0, 0}) + "abcs.");
      },
      "evil.pt: hypernetwork: field 'layer_structure' must be a list of numbers");
  // {} : no modules
  expect_throw_with<FormatError>([&] { load(proto + "}."); }, "no hypernetwork modules");

  const std::string junk = test::temp_dir() + "/junk.hypernet";
  { std::ofstream(junk) << "plain text"; }
  expect_throw_with<InvalidArgument>([&] { loaders::load_hypernetwork(junk); },
                                     "neither a .safetensors file nor a torch.save file");
  const std::string bad_pt = test::temp_dir() + "/bad.pt";
  { std::ofstream(bad_pt) << "plain text"; }
  expect_throw_with<FormatError>([&] { loaders::load_hypernetwork(bad_pt); }, "not a torch.save file");
}
